"""A user-defined semiring (only zero/one/plus/times/edge/readout) runs through
the generic contractions of the torch backend: path counting and the smallest
|path product|, against brute-force path enumeration."""

import math

import pytest
import torch

import semitriton
from oracle import enumerate_paths
from programs import residual_mlp
from test_paths import _tiny_attention


class PathCount(semitriton.Semiring):
    """Number of paths: edge(w) = 1 for w ≠ 0, ⊕ = +, ⊗ = ×."""

    name = "paths"

    def zero(self, shape, dtype, device):
        return (torch.zeros(shape, dtype=dtype, device=device),)

    def one(self, shape, dtype, device):
        return (torch.ones(shape, dtype=dtype, device=device),)

    def plus(self, a, b):
        return (a[0] + b[0],)

    def times(self, a, b):
        return (a[0] * b[0],)

    def edge(self, w):
        return ((w != 0).to(w.dtype),)

    def readout(self, v):
        return v[0]


class MinAbs(semitriton.Semiring):
    """Smallest |path product| (zero = +inf: no path)."""

    name = "minabs"

    def zero(self, shape, dtype, device):
        return (torch.full(shape, math.inf, dtype=dtype, device=device),)

    def one(self, shape, dtype, device):
        return (torch.ones(shape, dtype=dtype, device=device),)

    def plus(self, a, b):
        return (torch.minimum(a[0], b[0]),)

    def times(self, a, b):
        return (a[0] * b[0],)

    def edge(self, w):
        return (torch.where(w != 0, w.abs(), torch.full_like(w, math.inf)),)

    def readout(self, v):
        return v[0]


@pytest.mark.parametrize("budget", [None, 12], ids=["whole_rows", "column_blocks"])
@pytest.mark.parametrize("make", [residual_mlp, lambda: _tiny_attention("causal", 2)],
                         ids=["residual_mlp", "gqa_causal_attention"])
def test_user_semirings_equal_path_enumeration(make, budget, monkeypatch):
    """(column_blocks: a chunk budget below one row's n×n Jacobian, so the
    generic softmax and layer norm contract rows in column blocks, as they do
    for a group norm's long rows.)"""
    if budget is not None:
        from semitriton.semirings import base
        monkeypatch.setattr(base, "_CPU_CHUNK_ELEMS", budget)
    prog = make()
    paths = enumerate_paths(prog, "x")
    x = prog.inputs["x"].clone().requires_grad_()
    out = prog.engine(x)
    (count,) = semitriton.grad(out, x, semiring=PathCount(), backend="torch")
    (least,) = semitriton.grad(out, x, semiring=MinAbs(), backend="torch")
    for i, ps in paths.items():
        assert count.reshape(-1)[i].item() == len(ps)
        expected = min((abs(math.prod(p)) for p in ps), default=math.inf)
        assert least.reshape(-1)[i].item() == pytest.approx(expected, rel=1e-10)


def test_a_registered_rule_replaces_the_inline_view_rule(monkeypatch):
    """The walk runs the built-in reshape rule of view nodes inline; a rule the
    user registers for ViewBackward0 still replaces it (and is called)."""
    from semitriton import rules
    from semitriton.rules import shape

    calls = []

    def doubled(ctx):
        calls.append(ctx.name)
        out = shape.view(ctx)
        return [None if o is None else ctx.sr.map(o, lambda c: 2 * c) for o in out]

    x = torch.randn(3, 4, requires_grad=True)
    y = (x * 3).view(12).sum()
    (before,) = semitriton.grad(y, x, "real", fast_real=False)
    assert torch.allclose(before, torch.full((3, 4), 3.0))
    monkeypatch.setitem(rules.RULES, "ViewBackward0", doubled)
    (after,) = semitriton.grad(y, x, "real", fast_real=False)
    assert calls == ["ViewBackward0"]
    assert torch.allclose(after, torch.full((3, 4), 6.0))


def test_a_user_semiring_named_like_a_builtin_runs_its_own_algebra(monkeypatch):
    """Kernels compute the built-in algebras: a user's class named "maxabs" (or
    subclassing nothing built in) never reaches them, the built-in one does."""
    import semitriton.dispatch as dispatch

    class Named(PathCount):
        name = "maxabs"

    calls = []
    real_call = dispatch.call
    monkeypatch.setattr(dispatch, "call", lambda op, sr, *a: calls.append((op, sr)) or real_call(op, sr, *a))
    prog = residual_mlp()
    x = prog.inputs["x"].clone().requires_grad_()
    out = prog.engine(x)
    (got,) = semitriton.grad(out, x, semiring=Named())
    (want,) = semitriton.grad(out, x, semiring=PathCount())
    assert calls == [] and torch.equal(got, want)
    semitriton.grad(out, x, semiring="maxabs")
    assert calls                                       # the built-in one asks for its kernels


def test_incomplete_user_semirings_are_named_in_the_error():
    x = torch.randn(3, requires_grad=True)
    out = (x * 2).sum()

    class NoTimes(semitriton.Semiring):
        name = "no_times"
        zero, one, plus, edge, readout = (PathCount.zero, PathCount.one, PathCount.plus, PathCount.edge,
                                          PathCount.readout)

    class BareEdge(PathCount):
        name = "bare_edge"

        def edge(self, w):
            return (w != 0).to(w.dtype)

    with pytest.raises(TypeError, match="NoTimes does not define times"):
        semitriton.grad(out, x, semiring=NoTimes())
    with pytest.raises(TypeError, match="BareEdge.edge must return a tuple of tensors"):
        semitriton.grad(out, x, semiring=BareEdge())
    with pytest.raises(TypeError, match="pass an instance, PathCount()"):
        semitriton.grad(out, x, semiring=PathCount)

    class BarePlus(PathCount):
        name = "bare_plus"

        def plus(self, a, b):
            return a[0] + b[0]

    class BareTimes(PathCount):
        name = "bare_times"

        def times(self, a, b):
            return a[0] * b[0]

    class TupleReadout(PathCount):         # a readout of several statistics is the user's choice
        name = "tuple_readout"

        def readout(self, v):
            return v

    assert len(semitriton.grad_values(out, x, semiring=TupleReadout())) == 1
    for cls, what in ((BarePlus, "plus must return a tuple of tensors"),
                      (BareTimes, "times must return a tuple of tensors")):
        with pytest.raises(TypeError, match=f"{cls.__name__}.{what}"):
            semitriton.grad(out, x, semiring=cls())


def test_path_readouts_refuse_a_user_semiring_named_like_a_builtin():
    """The path search reads the built-in algebras: a user's class named
    "maxabs" or "max" is refused by name, not answered with the built-in's paths."""
    prog = residual_mlp()
    x = prog.inputs["x"].clone().requires_grad_()
    out = prog.engine(x)
    for name in ("maxabs", "max"):
        named = type("Named", (PathCount,), {"name": name})()
        for call in (lambda: semitriton.top_paths(out, x, semiring=named),
                     lambda: semitriton.branch_attribution(out, x, semiring=named),
                     lambda: semitriton.PathGraph(out, x, named)):
            with pytest.raises(ValueError, match="custom semiring Named"):
                call()


class _CountAndSum(PathCount):
    """Two components, (number of paths, sum of |products|), and no
    ``components`` declared (the README does not ask for it)."""

    name = "count_sum"

    def zero(self, shape, dtype, device):
        return (torch.zeros(shape, dtype=dtype, device=device),) * 2

    def one(self, shape, dtype, device):
        return (torch.ones(shape, dtype=dtype, device=device),) * 2

    def plus(self, a, b):
        return (a[0] + b[0], a[1] + b[1])

    def times(self, a, b):
        return (a[0] * b[0], a[1] * b[1])

    def edge(self, w):
        return ((w != 0).to(w.dtype), w.abs())

    def readout(self, v):
        return v[1] / v[0].clamp_min(1)


def test_token_readout_of_a_user_semiring_with_several_components():
    """The component check of token_readout applies where a semiring
    declares its components: a user semiring that does not is read as
    before (the check made it an error)."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = (x.tanh() * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum()
    sr = _CountAndSum()
    (v,) = semitriton.grad_values(y, x, semiring=sr)
    torch.testing.assert_close(semitriton.token_readout(v, sr), (v[1].sum(-1) / v[0].sum(-1).clamp_min(1)))
