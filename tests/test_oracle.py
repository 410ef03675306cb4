"""The engine against the independent float64 oracle (explicit scalar graph,
semiring definitions evaluated directly), on every program and semiring."""

import pytest
import torch

import semitriton
from conftest import SEMIRINGS, assert_semiring_close, triton_ok
from oracle import brute_force, enumerate_paths, oracle, run_steps
from programs import all_programs, intermediate_input, mha, residual_mlp

PROGRAMS = all_programs()
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _engine(prog, semiring, dtype, backend=None):
    inputs = {k: v.to(dtype).clone().requires_grad_() for k, v in prog.inputs.items()}
    out = prog.engine(**inputs)
    vals = semitriton.grad_values(out, list(inputs.values()), semiring=semiring, backend=backend)
    return dict(zip(inputs, vals)), out


@pytest.mark.parametrize("prog", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_programs_agree_forward(prog):
    ref = run_steps(prog)[prog.output]
    got = prog.engine(**{k: v.clone() for k, v in prog.inputs.items()})
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


BACKENDS = [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32)]


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=["f64", "f32", "triton-f32"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("prog", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_engine_matches_oracle(prog, semiring, backend, dtype):
    if backend == "triton" and not triton_ok():
        pytest.skip("triton unavailable (or no GPU and TRITON_INTERPRET unset)")
    expected = oracle(prog, semiring, token=True)
    vals, out = _engine(prog, semiring, dtype, backend=backend)
    sr = semitriton.semirings.get(semiring)
    for name, v in vals.items():
        assert v[0].dtype == dtype
        assert_semiring_close(sr.readout(v), expected[name], semiring, TOL[dtype], f"{prog.name}/{name}")
        assert_semiring_close(semitriton.token_readout(v, semiring), expected[name + ":token"], semiring,
                              TOL[dtype], f"{prog.name}/{name} per-token")


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_rows_in_column_blocks(semiring, monkeypatch):
    """Rows whose dense n×n Jacobian is over the chunk budget (a group norm's
    rows of C/G·H·W elements) are contracted in column blocks and ⊕-ed: the
    same values (layer norms and softmaxes with rows of 6–8 against a budget
    of 12 entries)."""
    from semitriton.semirings import base
    monkeypatch.setattr(base, "_CPU_CHUNK_ELEMS", 12)
    for prog in (residual_mlp(), mha(mask="causal")):
        expected = oracle(prog, semiring)
        vals, _ = _engine(prog, semiring, torch.float64, backend="torch")
        sr = semitriton.semirings.get(semiring)
        for name, v in vals.items():
            assert_semiring_close(sr.readout(v), expected[name], semiring, 1e-9, f"{prog.name}/{name}")


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_zeros_in_weights_are_not_edges(semiring):
    for prog in all_programs(zeros=0.4)[:3] + [mha(mask="causal", zeros=0.5)]:
        expected = oracle(prog, semiring)
        vals, _ = _engine(prog, semiring, torch.float64)
        sr = semitriton.semirings.get(semiring)
        for name, v in vals.items():
            assert_semiring_close(sr.readout(v), expected[name], semiring, 1e-9, f"{prog.name}/{name}")


def test_intermediate_and_leaf_inputs_together():
    prog = intermediate_input()
    x = prog.inputs["x"].clone().requires_grad_()
    W1, W2 = [s.fn for s in prog.steps[:2]]
    h = prog.steps[0].fn(x)
    out = prog.steps[2].fn(prog.steps[1].fn(h), x)
    for semiring in SEMIRINGS:
        rx, rh = semitriton.grad(out, [x, h], semiring=semiring)
        expected = oracle(prog, semiring)
        assert_semiring_close(rx, expected["x"], semiring, 1e-9, "x")
        if semiring == "real":
            torch.testing.assert_close(rh, torch.autograd.grad(out, h, retain_graph=True)[0])


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_oracle_itself_against_path_enumeration(semiring):
    """The oracle's dynamic programme equals explicit enumeration of paths."""
    from oracle import Program, Step
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, generator=g, dtype=torch.float64)
    W = torch.randn(3, 3, generator=g, dtype=torch.float64)
    prog = Program("tiny", {"x": x}, [
        Step("a", lambda x: x @ W, ("x",)),
        Step("b", lambda a: torch.softmax(a, -1), ("a",)),
        Step("c", lambda b, x: b * x + x, ("b", "x")),
        Step("out", lambda c: torch.tanh(c).sum(), ("c",)),
    ], engine=None)
    ours = oracle(prog, semiring)["x"].reshape(-1)
    paths = enumerate_paths(prog, "x")
    for i, ps in paths.items():
        bf = brute_force(ps, semiring)
        assert abs(ours[i] - bf) <= 1e-10 * max(1.0, abs(bf)), (i, ours[i], bf)


def test_one_forward_many_semirings():
    prog = mha(mask="bool")
    x = prog.inputs["x"].clone().requires_grad_()
    out = prog.engine(x)
    first = [semitriton.grad(out, x, semiring=s)[0] for s in SEMIRINGS]
    second = [semitriton.grad(out, x, semiring=s)[0] for s in reversed(SEMIRINGS)][::-1]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    # and the ordinary backward still works afterwards
    (g,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(g, first[0])


def test_non_scalar_output_gives_per_example_statistics():
    """A batch of independent examples in one pass equals one pass per example."""
    prog = residual_mlp(sink=True)
    x = prog.inputs["x"].clone().requires_grad_()
    y = prog.engine(x)                                  # [2, 3, 6], examples independent
    per_ex = y.sum(dim=(1, 2))                          # one output per example
    for semiring in SEMIRINGS:
        (both,) = semitriton.grad(per_ex, x, semiring=semiring)
        for b in range(2):
            xb = prog.inputs["x"][b:b + 1].clone().requires_grad_()
            yb = prog.engine(torch.cat([xb, prog.inputs["x"][1 - b:2 - b]]) if b == 0 else
                             torch.cat([prog.inputs["x"][:1], xb]))
            (single,) = semitriton.grad(yb[b].sum(), xb, semiring=semiring)
            torch.testing.assert_close(both[b:b + 1], single, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_a_leaf_passed_twice(semiring):
    """``inputs=[x, x]`` reads x's value twice (as torch.autograd.grad does)."""
    prog = residual_mlp()
    x = prog.inputs["x"].clone().requires_grad_()
    out = prog.engine(x)
    a, b = semitriton.grad(out, [x, x], semiring=semiring)
    expected = oracle(prog, semiring)["x"]
    assert_semiring_close(a, expected, semiring, 1e-9, "first")
    assert_semiring_close(b, expected, semiring, 1e-9, "second")
