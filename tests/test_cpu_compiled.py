"""The compiled CPU contractions (``semirings/_cpu_compiled.py``) against the
chunked torch reference they replace and against the float64 oracle, the
``SEMITRITON_CPU_COMPILE`` switch, and the fallback when compiling fails."""

import warnings

import pytest
import torch

import semitriton
from conftest import assert_semiring_close
from oracle import oracle
from programs import all_programs
from semitriton.semirings import _cpu_compiled, get
from semitriton.semirings._util import signed_max_matmul, tropical_matmul

NEG, POS = float("-inf"), float("inf")


@pytest.fixture
def compile_mode(monkeypatch):
    """Set SEMITRITON_CPU_COMPILE for one call: ``with compile_mode("1"): ...``."""
    class _Mode:
        def __call__(self, mode):
            monkeypatch.setenv("SEMITRITON_CPU_COMPILE", mode)
            return self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            monkeypatch.delenv("SEMITRITON_CPU_COMPILE", raising=False)
    return _Mode()


def _equal(a, b):
    """Bit-equal, NaN where the other has NaN."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))


def _log_values(g, shape, dtype):
    l = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) * 3
    l[torch.rand(*shape, generator=g) < 0.2] = NEG          # no path
    return l


def _signed_values(g, shape, dtype):
    p = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    n = p - torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)
    dead = torch.rand(*shape, generator=g) < 0.2
    p[dead], n[dead] = NEG, POS
    return p, n


def _weights(g, shape, dtype):
    w = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    w[torch.rand(*shape, generator=g) < 0.3] = 0.0           # missing edges
    return w


SHAPES = [  # (lead of the value, lead of the weight, I, J, K)
    ((), (), 9, 70, 13),
    ((2, 3), (), 5, 33, 7),             # a shared weight: lead dims folded into the rows
    ((2, 3), (2, 3), 4, 17, 6),         # batched (attention)
    ((2, 1), (1, 3), 4, 17, 6),         # broadcast lead dims
    ((), (), 1, 40, 1),                 # size-1 dims
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lead_v,lead_w,I,J,K", SHAPES)
def test_contractions_equal_the_reference(compile_mode, dtype, lead_v, lead_w, I, J, K):
    """A max of sums or of products is exact in any order: the compiled
    kernels give the reference's values bit for bit, with no-path values
    (-inf), missing edges (w = 0), a NaN and subnormal products."""
    g = torch.Generator().manual_seed(I * 1000 + J)
    l = _log_values(g, (*lead_v, I, J), dtype)
    l.view(-1)[0] = float("nan")
    lw = _log_values(g, (*lead_w, J, K), dtype)
    p, n = _signed_values(g, (*lead_v, I, J), dtype)
    p.view(-1)[1] = torch.finfo(dtype).tiny / 4                # subnormal
    w = _weights(g, (*lead_w, J, K), dtype)
    with compile_mode("0"):
        ref = tropical_matmul(l, lw), signed_max_matmul(p, n, w)
    with compile_mode("1"):
        assert _cpu_compiled.wanted("max-plus", l, I * J * K)
        got = tropical_matmul(l, lw), signed_max_matmul(p, n, w)
    _equal(got[0], ref[0])
    _equal(got[1][0], ref[1][0])
    _equal(got[1][1], ref[1][1])


def _norm_inputs(g, R, n, centered, dtype):
    x = torch.randn(R, n, generator=g, dtype=torch.float64)
    x[0, 0] = 40.0                                             # a dominant element
    if centered:
        x = x - x.mean(-1, keepdim=True)
    rs = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    gamma = torch.randn(n, generator=g, dtype=torch.float64)
    gamma[1] = 0.0                                             # an output with no edges
    return (x * rs).to(dtype), rs.to(dtype), gamma.to(dtype)


def _norm_value(name, g, R, n, dtype):
    if name == "max":
        return _signed_values(g, (R, n), dtype)
    l = _log_values(g, (R, n), dtype)
    if name == "maxabs":
        return (l,)
    mu = torch.rand(R, n, generator=g, dtype=torch.float64).to(dtype)
    return l, torch.where(l == NEG, 0.0, mu)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("centered", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("name", ["max", "maxabs", "entropy"])
def test_norm_rows_match_the_reference(compile_mode, name, centered, dtype):
    """The dense per-row norm Jacobian formed inside the compiled loop gives
    the chunked reference's values (max exactly; maxabs and entropy to
    rounding: the sums and logs are ordered differently), with and without γ."""
    g = torch.Generator().manual_seed(7)
    sr = get(name)
    xh, rs, gamma = _norm_inputs(g, 6, 37, centered, dtype)
    v = _norm_value(name, g, 6, 37, dtype)
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    for weight in (gamma, None):
        with compile_mode("0"):
            ref = sr._norm(v, xh, rs, weight, centered)
        with compile_mode("1"):
            assert _cpu_compiled.norm_rows(name, v, xh, rs, weight, centered) is not None
            got = sr._norm(v, xh, rs, weight, centered)
        for a, b in zip(got, ref):
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            fin = torch.isfinite(b)
            if name == "max":
                _equal(a, b)
            else:
                torch.testing.assert_close(a[fin], b[fin], rtol=rtol, atol=rtol)


COMPILED_SEMIRINGS = ["max", "maxabs", "entropy"]
PROGRAMS = [p for p in all_programs() if p.name in ("residual_mlp", "mha_causal_sdpa", "llama_block_sdpa")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("semiring", COMPILED_SEMIRINGS)
@pytest.mark.parametrize("prog", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_compiled_walk_matches_oracle(compile_mode, prog, semiring, dtype):
    """Whole programs (a layer norm MLP, causal attention, a LLaMA block)
    walked with every CPU contraction compiled, against the float64 oracle."""
    expected = oracle(prog, semiring, token=True)
    inputs = {k: v.to(dtype).clone().requires_grad_() for k, v in prog.inputs.items()}
    out = prog.engine(**inputs)
    with compile_mode("1"):
        vals = semitriton.grad_values(out, list(inputs.values()), semiring=semiring, backend="torch")
    sr = get(semiring)
    for name, v in zip(inputs, vals):
        assert_semiring_close(sr.readout(v), expected[name], semiring, 1e-9 if dtype == torch.float64 else 1e-4,
                              f"{prog.name}/{name}")


def test_modes(compile_mode, monkeypatch):
    """``auto`` counts the reference's work on contractions of at least
    MIN_MACS (weighted by kind) and compiles once it reaches AUTO_UNITS; ``0``
    never compiles, ``1`` always; CUDA and integer tensors never take this path."""
    t = torch.zeros(2)
    big = _cpu_compiled.MIN_MACS
    monkeypatch.setattr(_cpu_compiled, "AUTO_UNITS", 10 * big)
    monkeypatch.setattr(_cpu_compiled, "_units_done", 0)
    with compile_mode("auto"):
        assert not _cpu_compiled.wanted("max-plus", t, big - 1)             # too small: not counted
        assert _cpu_compiled._units_done == 0
        assert not _cpu_compiled.wanted("max-plus", t, 2 * big)
        assert _cpu_compiled._units_done == 2 * big
        assert not _cpu_compiled.wanted("signed max-times", t, big)            # 2 + 7 units: still below
        assert _cpu_compiled._units_done == 9 * big
    monkeypatch.setattr(_cpu_compiled, "_units_done", 0)
    with compile_mode("auto"):
        assert not _cpu_compiled.wanted("norm-rows maxabs", t, big)        # 8
        assert _cpu_compiled.wanted("norm-rows maxabs", t, big)            # 16: over
        assert _cpu_compiled.wanted("max-plus", t, big)                    # from then on
        assert not _cpu_compiled.wanted("max-plus", t, big - 1)
    with compile_mode("0"):
        assert not _cpu_compiled.wanted("max-plus", t, 1 << 40)
    with compile_mode("1"):
        assert _cpu_compiled.wanted("max-plus", t, 1)
        assert not _cpu_compiled.wanted("max-plus", torch.zeros(2, dtype=torch.int64), 1)


def _falls_back(compile_mode, seed: int, match: str):
    """A max-plus contraction run chunked, then with compiling on while it
    fails: (the reference's value, the value that came with a warning
    matching ``match``, the operands)."""
    g = torch.Generator().manual_seed(seed)
    l, lw = _log_values(g, (5, 9), torch.float64), _log_values(g, (9, 4), torch.float64)
    with compile_mode("0"):
        ref = tropical_matmul(l, lw)
    with compile_mode("1"):
        with pytest.warns(RuntimeWarning, match=match):
            got = tropical_matmul(l, lw)
    return ref, got, (l, lw)


def test_compile_failure_falls_back_with_one_warning(compile_mode, monkeypatch):
    """A platform where torch.compile fails (no C++ compiler) gets one
    warning naming the setting, the reference's values, and no further tries."""
    def broken(fn, **kw):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(_cpu_compiled, "_compiled", {})
    monkeypatch.setattr(_cpu_compiled, "_failed", None)
    monkeypatch.setattr(torch, "compile", broken)
    ref, got, (l, lw) = _falls_back(compile_mode, 3, "SEMITRITON_CPU_COMPILE=0")
    with compile_mode("1"):
        assert _cpu_compiled._failed is not None and "no C++ compiler" in _cpu_compiled._failed
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            again = tropical_matmul(l, lw)
        assert not _cpu_compiled.wanted("max-plus", l, 5 * 9 * 4)
    _equal(got, ref)
    _equal(again, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_maxabs_rows_in_linear_and_log_space(compile_mode, dtype):
    """maxabs norm rows run in linear space with one shift per row; rows
    whose values span more than the exponent range, or whose result is below
    it (a tiny γ), are redone in log space: every row agrees with the
    reference, the dead rows read -inf, and both kernels ran."""
    g = torch.Generator().manual_seed(11)
    R, n = 8, 23
    xh, rs, gamma = _norm_inputs(g, R, n, True, dtype)
    span = 100.0 if dtype == torch.float32 else 800.0
    l = torch.randn(R, n, generator=g, dtype=torch.float64).to(dtype)
    l[1, 5] -= span                                      # a row spanning more than exp's range
    l[2] = NEG                                           # a dead row
    l[3, ::2] = NEG                                      # a row with missing values
    gamma = gamma.clone()
    scale = torch.ones(n, dtype=dtype)
    scale[:] = 1e-36 if dtype == torch.float32 else 1e-300   # every result underflows in linear space
    sr = get("maxabs")
    with compile_mode("0"):
        ref = sr._norm((l,), xh, rs, gamma, True)[0]
        ref_tiny = sr._norm((l,), xh, rs, gamma * scale, True)[0]
    before = dict(_cpu_compiled.calls)
    with compile_mode("1"):
        got = sr._norm((l,), xh, rs, gamma, True)[0]
        got_tiny = sr._norm((l,), xh, rs, gamma * scale, True)[0]
    ran = {k: _cpu_compiled.calls[k] - before.get(k, 0) for k in _cpu_compiled.calls}
    assert ran.get("norm-rows maxabs", 0) == 2 and ran.get("norm-rows maxabs (log space)", 0) == 2
    rtol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in ((got, ref), (got_tiny, ref_tiny)):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        assert bool(torch.isneginf(a[2]).all())
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin], b[fin], rtol=rtol, atol=rtol)


def test_signed_contractions_keep_the_value_dtype(compile_mode):
    """The -inf penalties take the values' dtype, not torch's default: float32
    values under a float64 default dtype give the reference's dtype and
    values, for the contraction and the norm rows. (Half-precision values
    take the reference: compiled code would not round each intermediate to
    half as it does.)"""
    dtype = torch.float32
    assert not _cpu_compiled.wanted("max-plus", torch.zeros(2, dtype=torch.bfloat16), 1 << 40)
    g = torch.Generator().manual_seed(5)
    p, n = _signed_values(g, (6, 19), dtype)
    w = _weights(g, (19, 7), dtype)
    xh, rs, gamma = _norm_inputs(g, 4, 9, True, dtype)
    v = _signed_values(g, (4, 9), dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with compile_mode("0"):
            ref = signed_max_matmul(p, n, w), get("max")._norm(v, xh, rs, gamma, True)
        with compile_mode("1"):
            got = signed_max_matmul(p, n, w), get("max")._norm(v, xh, rs, gamma, True)
    finally:
        torch.set_default_dtype(old)
    for a, b in zip((*got[0], *got[1]), (*ref[0], *ref[1])):
        assert a.dtype == dtype
        _equal(a, b)


def test_maxabs_rows_with_an_infinite_value(compile_mode):
    """A +inf log value (an infinite edge upstream) sends its row to the log
    space kernel: the reference's inf/NaN pattern, not NaN everywhere."""
    xh = torch.tensor([[1.0, -1.0, 0.5, -0.5], [0.3, -0.2, 0.1, -0.2]])
    rs = torch.ones(2, 1)
    gamma = torch.tensor([1.0, 0.0, 1.0, 1.0])
    l = torch.tensor([[POS, 100.0, 0.0, 1.0], [0.5, 1.0, -1.0, 2.0]])
    sr = get("maxabs")
    with compile_mode("0"):
        ref = sr._norm((l,), xh, rs, gamma, True)[0]
    with compile_mode("1"):
        got = sr._norm((l,), xh, rs, gamma, True)[0]
    _equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1], rtol=2e-5, atol=0)


def test_recompile_limit_switches_off_one_function(compile_mode, monkeypatch):
    """A contraction met in more shape/dtype variants than dynamo keeps runs
    the reference from then on, with its own warning; the others stay
    compiled and nothing is marked as failed."""
    def max_plus_copy(l, lt):                           # a fresh code object: its own dynamo cache
        return torch.amax(l.unsqueeze(-2) + lt.unsqueeze(-3), dim=-1)

    monkeypatch.setattr(_cpu_compiled, "_max_plus", max_plus_copy)
    monkeypatch.setattr(_cpu_compiled, "_exhausted", set())
    monkeypatch.setattr(_cpu_compiled, "RECOMPILE_LIMIT", 1)
    g = torch.Generator().manual_seed(2)
    l2, lw2 = _log_values(g, (5, 9), torch.float64), _log_values(g, (9, 4), torch.float64)
    l3, lw3 = _log_values(g, (2, 5, 9), torch.float64), _log_values(g, (2, 9, 4), torch.float64)
    p, n = _signed_values(g, (5, 9), torch.float64)
    w = _weights(g, (9, 4), torch.float64)
    with compile_mode("0"):
        ref = tropical_matmul(l2, lw2), tropical_matmul(l3, lw3)
    with compile_mode("1"):
        first = tropical_matmul(l2, lw2)
        with pytest.warns(RuntimeWarning, match="recompile limit"):
            second = tropical_matmul(l3, lw3)               # a second variant: over the limit of 1
        assert max_plus_copy in _cpu_compiled._exhausted and _cpu_compiled._failed is None
        before = _cpu_compiled.calls["signed max-times"]
        signed_max_matmul(p, n, w)
        assert _cpu_compiled.calls["signed max-times"] == before + 1
    _equal(first, ref[0])
    _equal(second, ref[1])


def test_an_older_torch_without_the_settings_falls_back(compile_mode, monkeypatch):
    """A torch without dynamo's recompile-limit setting and exception (before
    2.6): the settings patch fails, which counts as a compile failure (one
    warning, the reference's values), not an error."""
    import torch._dynamo

    def no_such_setting(*args, **kwargs):
        raise AttributeError("torch._dynamo.config has no attribute 'recompile_limit'")

    monkeypatch.delattr(torch._dynamo.exc, "FailOnRecompileLimitHit")
    monkeypatch.setattr(type(torch._dynamo.config), "patch", no_such_setting)
    monkeypatch.setattr(_cpu_compiled, "_failed", None)
    ref, got, _ = _falls_back(compile_mode, 4, "recompile_limit")
    assert _cpu_compiled._failed is not None
    _equal(got, ref)
