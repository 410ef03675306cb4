"""Aten-level rules on ops a user's own module may use, against
torch.autograd.grad (real through the walk) and the |grad| / max-|grad|
readouts of one-edge-per-element programs. Each case was wrong or failed
before its fix (a fuzz of the rules against the float64 oracle)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import semitriton
from semitriton.errors import GraphError
from semitriton.rules import RULES

#: rule names that are no node class of this torch: aliases kept for other
#: torch versions and the names of Python-defined nodes
NOT_TORCH_NODES = {"<custom>", "ContiguousBackward0", "PositiveBackward0", "_ReshapeAliasBackward0",
                   "NumpyTBackward0", "_ToCopyBackward0", "SplitBackward1", "SplitWithSizesBackward1",
                   "BackwardHookFunctionBackward", "_SafeSoftmaxBackward0"}


def test_rule_names_are_torch_node_names():
    """A misspelt name registers a rule that never runs (log1p's was
    "Log1pBackward0"; torch's node is Log1PBackward0)."""
    unknown = sorted(n for n in RULES if not hasattr(torch._C._functions, n) and n not in NOT_TORCH_NODES)
    assert not unknown, f"rules registered under names torch has no node for: {unknown}"


def _walk(out, inputs, semiring):
    kw = {"fast_real": False} if semiring == "real" else {}
    return semitriton.grad(out, inputs, semiring=semiring, **kw)


def _check_elementwise(out, inputs):
    """Each input element reaches ``out`` (a sum) by one path: real equals
    autograd, abs and maxabs read |grad|."""
    ref = torch.autograd.grad(out, inputs, retain_graph=True)
    for s in ("real", "abs", "maxabs"):
        got = _walk(out, inputs, s)
        for g, r in zip(got, ref):
            want = r if s == "real" else r.abs()
            torch.testing.assert_close(g, want, rtol=1e-14, atol=0, msg=f"{s}")


def test_division_by_a_python_float_in_float64():
    """x / 3.0: torch saves 3.0 as a float64 "wrapped number"; 1 / it was a
    float32 division (relative error 3e-8 in a float64 graph)."""
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    _check_elementwise((x / 3.0).sum(), (x,))
    _check_elementwise((x / 0.1).sum(), (x,))


def test_tensor_power_at_a_zero_base():
    """x ** e with tensors: torch's limits at x = 0 (0 where e = 0 for ∂x, and
    where e ≥ 0 for ∂e), not 0·inf or 0·log 0 = NaN."""
    x = torch.tensor([0.0, 0.0, 2.0, 1.5], dtype=torch.float64, requires_grad=True)
    e = torch.tensor([2.0, 0.0, 1.0, -1.0], dtype=torch.float64, requires_grad=True)
    _check_elementwise((x ** e).sum(), (x, e))


def test_log1p():
    x = torch.tensor([0.5, -0.25, 3.0], dtype=torch.float64, requires_grad=True)
    _check_elementwise(torch.log1p(x).sum(), (x,))


@pytest.mark.parametrize("p", [0.4, 1.0])
def test_training_mode_dropout_node(p):
    """NativeDropoutBackward0 (training-mode dropout on CUDA, and SDPA's) saves
    p and the keep mask, no scale; the edge is mask / (1 − p), 0 at p = 1."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y, _ = torch.native_dropout(x, p, True)
    assert type(y.grad_fn).__name__ == "NativeDropoutBackward0"
    out = (y * torch.arange(1.0, 5.0, dtype=torch.float64)).sum()
    (real,) = _walk(out, x, "real")
    torch.testing.assert_close(real, torch.autograd.grad(out, x, retain_graph=True)[0], rtol=1e-14, atol=0)
    (absv,) = _walk(out, x, "abs")
    torch.testing.assert_close(absv, real.abs(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("semiring", ["real", "abs", "maxabs", "entropy", "max"])
def test_eval_mode_native_dropout_node(semiring):
    """native_dropout(x, p, train=False) records the training node (p and an
    all-keep mask, no train flag); torch's edge is 1 there, not 1/(1 − p): a
    mask keeping every one of many elements is read as train=False."""
    torch.manual_seed(0)
    x = torch.randn(8, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 32, dtype=torch.float64)
    y, keep = torch.native_dropout(x, 0.3, False)
    assert bool(keep.all()) and type(y.grad_fn).__name__ == "NativeDropoutBackward0"
    got = _walk((y * w).sum(), x, semiring)
    want = _walk((x * w).sum(), x, semiring)          # the same program without the dropout
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)
    if semiring == "real":
        torch.testing.assert_close(got[0], torch.autograd.grad((y * w).sum(), x)[0], rtol=1e-14, atol=0)
    y1, keep1 = torch.native_dropout(x[:1, :2], 1.0, False)           # p = 1: training keeps nothing
    assert bool(keep1.all())
    (g1,) = _walk((y1 * w[:1, :2]).sum(), x, semiring)
    (want1,) = _walk((x[:1, :2] * w[:1, :2]).sum(), x, semiring)
    for a, b in zip(g1 if isinstance(g1, tuple) else (g1,), want1 if isinstance(want1, tuple) else (want1,)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0)


@pytest.mark.parametrize("semiring", ["real", "abs", "maxabs", "entropy", "max"])
def test_degenerate_inputs_do_not_crash_the_rules(semiring):
    """The mean of an empty tensor (or over an empty dim) has no edges, as
    torch's empty gradient; a negative number raised to a tensor power has
    NaN edges, as torch's gradient (it raised a bare math-domain error)."""
    x = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    for out in (x.mean(), x.mean(0).sum()):
        (g,) = _walk(out, x, semiring)
        assert (g if torch.is_tensor(g) else g[0]).shape == (0, 4)
    e = torch.tensor([0.5, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    out = torch.pow(-2.0, e).sum()
    (g,) = _walk(out, e, semiring)
    if semiring == "real":
        torch.testing.assert_close(g, torch.autograd.grad(out, e)[0], equal_nan=True)


@pytest.mark.parametrize("semiring", ["real", "abs", "maxabs", "entropy", "max"])
def test_zero_size_tensors_on_a_path(semiring):
    """A node whose outputs have no elements passes no path; its rule was
    called anyway and reduced over an empty dim (max/maxabs: amax's
    IndexError; a softmax over an empty dim: argmax/topk errors). Each gives
    the empty gradient, and a non-empty input that only reaches empty
    outputs reads "no path", as torch's zero gradient."""
    cases = [((0, 3), lambda x: (x * x.sum()).sum()),
             ((2, 0, 2), lambda x: (x * x.sum()).sum()),
             ((3, 0), lambda x: (torch.softmax(x, -1) * 2).sum()),
             ((3, 4), lambda x: (torch.softmax(x[:, :0], -1) * 2).sum() + x[0, 1] * 3)]
    for shape, f in cases:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        out = f(x)
        (g,) = _walk(out, x, semiring)
        g = g if isinstance(g, tuple) else (g,)
        assert g[0].shape == shape
        if semiring == "real":
            torch.testing.assert_close(g[0], torch.autograd.grad(out, x)[0])
        elif g[0].numel():
            (want,) = _walk(x[0, 1] * 3, x, semiring)
            for a, b in zip(g, want if isinstance(want, tuple) else (want,)):
                torch.testing.assert_close(a, b)


def test_in_place_op_mixing_a_views_elements_is_named():
    """cumsum_ on a view: one CopySlices node whose input elements each reach
    several outputs; the error names that case, not only a broadcast source."""
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = x * 1.0
    b[:, :3].cumsum_(1)
    with pytest.raises(GraphError, match=r"CopySlices: .*mixes the view's elements \(x\[:, :3\]\.cumsum_"):
        _walk(b.sum(), x, "abs")


def test_in_place_op_mixing_a_views_elements_with_cancelling_weights_is_named():
    """addmm_ on a view with weights that sum to 0 per element: the ones probe
    reads 0 there, which looked like "no edge" and dropped the element's
    paths silently; the u, u² probes see them, and the mix is refused."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    h = x * 1.0
    h[:, :2].addmm_(x[:, 2:] * 1.0, torch.tensor([[1.0, -1.0], [2.0, -2.0]], dtype=torch.float64))
    for sr in ("abs", "maxabs", "entropy"):
        with pytest.raises(GraphError, match="CopySlices: an element of input 1.*mixes the view's elements"):
            _walk((h * torch.arange(12.0, dtype=torch.float64).reshape(3, 4)).sum(), x, sr)


def test_in_place_op_with_an_infinite_edge_is_named():
    """sqrt_ on a view at 0: the edge is inf (torch's gradient too), which the
    probes cannot route; the error says so (it said "reaches several places")."""
    x = torch.tensor([0.0, 4.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    h = x * 1.0
    h[:2].sqrt_()
    with pytest.raises(GraphError, match="CopySlices: an edge of the in-place write into input 0 is not finite"):
        _walk(h.sum(), x, "abs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("semiring", ["real", "abs", "max", "maxabs", "entropy"])
def test_index_write_into_a_view_in_half_precision(dtype, semiring):
    """An index_put into a view refuses float32 probes in a half-precision
    graph (it failed with torch's dtype message): probed in the graph's own
    dtype, its edges are those of the float32 graph."""
    torch.manual_seed(0)
    x32 = torch.randn(3, 4)
    v32 = torch.randn(3, 2)
    w = torch.arange(1.0, 13.0).reshape(3, 4)

    def walk(dt):
        x, v = x32.to(dt).requires_grad_(), v32.to(dt).requires_grad_()
        h = x * 1.0
        h[:, ::2][torch.tensor([0, 2])] = v[torch.tensor([0, 2])] * 2.0
        return semitriton.grad_values((h * w.to(dt)).sum(), [x, v], semiring=semiring)

    for got, want in zip(walk(dtype), walk(torch.float32)):
        for g, e in zip(got, want):
            torch.testing.assert_close(g.float(), e.float(), rtol=2e-2, atol=2e-2, equal_nan=True)


def test_as_strided_over_shared_storage_is_an_error():
    """as_strided of an expanded tensor: two of its elements share storage, so
    which one an output reads cannot be told; the error names the node."""
    x = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    out = (x.expand(3, 6).as_strided((2, 2), (1, 1)) * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum()
    with pytest.raises(GraphError, match="AsStridedBackward0: two elements"):
        _walk(out, x, "abs")


def test_a_broadcast_write_into_a_slice_is_an_error():
    """x[:, 1] = v with a scalar v on a path: one element of v is written to
    several places, which the CopySlices rule cannot tell apart; the error
    names the node and a rewrite."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = x * 1.0
    b[:, 1] = x[0, 0]
    with pytest.raises(GraphError, match="CopySlices: an element of input 1.*several places"):
        _walk((b * torch.arange(12.0, dtype=torch.float64).reshape(3, 4)).sum(), x, "abs")


def test_block_diag_of_several_constants():
    """block_diag with two constant blocks: the node records no sizes; the
    error names the node and the fix, and the fix works."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    eye, ones = torch.eye(2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    w = torch.arange(1.0, 36.0, dtype=torch.float64).reshape(5, 7)
    with pytest.raises(GraphError, match="BlockDiagBackward0.*requires_grad_"):
        _walk((torch.block_diag(eye, x, ones) * w).sum(), x, "abs")
    eye.requires_grad_()
    ones.requires_grad_()
    _check_elementwise((torch.block_diag(eye, x, ones) * w).sum(), (x,))


def test_cat_of_several_constants():
    """cat([BOS, x, EOS]) with constant ends: the node does not record their
    sizes; the error names the node and the fix, and the fix works."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    bos = torch.zeros(1, 3, dtype=torch.float64)
    eos = torch.ones(2, 3, dtype=torch.float64)
    w = torch.arange(1.0, 6.0, dtype=torch.float64)[:, None]
    with pytest.raises(GraphError, match="CatBackward0.*requires_grad_"):
        _walk((torch.cat([bos, x, eos]) * w).sum(), x, "abs")
    bos.requires_grad_()
    eos.requires_grad_()
    _check_elementwise((torch.cat([bos, x, eos]) * w).sum(), (x,))


# ---- one-step programs against the oracle, grouped matmuls, mixture-of-experts models ------------
from conftest import SEMIRINGS, assert_semiring_close, check_each_operand_alone, triton_ok  # noqa: E402
from oracle import Program, Step, oracle  # noqa: E402

_G = torch.Generator().manual_seed(5)
_X = torch.randn(3, 5, generator=_G, dtype=torch.float64)
_Y = torch.randn(4, 5, generator=_G, dtype=torch.float64)
_IDX = torch.tensor([0, 2, 0, 1])                        # repeated: two sources add into row 0
_SIDX = torch.tensor([[0, 1, 1], [2, 2, 0], [4, 3, 1]])  # scatter positions per row (repeats)

def _written(x, y, kind):
    b = x * 1.0
    if kind == "copy":
        b[:, 1:3] = y[:3, :2] * 2
    elif kind == "index_put":                   # an index_put inside the view write (float32: its dtype)
        b[torch.tensor([0, 2]), 1:3] = y[:2, :2] * 2
    elif kind == "broadcast_operand":           # y's column broadcast over the slice
        b[:, 0:2] *= y[:3, :1]
    else:
        b[:, 0] *= 3
        b[1:, 2:] += y[1:3, 2:]
    return b


#: name -> (inputs used, one primitive of them)
ONE_STEP_OPS = {
    "topk": (("x",), lambda x: x.topk(2, dim=1)[0]),
    "sort": (("x",), lambda x: x.sort(dim=0, descending=True)[0]),
    "sort_stable": (("x",), lambda x: torch.sort(x, dim=1, stable=True)[0]),
    "max_dim": (("x",), lambda x: x.max(dim=1)[0]),
    "min_dim_keepdim": (("x",), lambda x: x.min(dim=0, keepdim=True)[0]),
    "kthvalue": (("x",), lambda x: x.kthvalue(2, dim=1)[0]),
    "median_dim": (("x",), lambda x: x.median(dim=1)[0]),
    "cummax": (("x",), lambda x: x.cummax(dim=1)[0]),
    "index_add": (("x", "y"), lambda x, y: x.index_add(0, _IDX, y, alpha=-1.5)),
    "scatter_add": (("x",), lambda x: torch.ones(3, 5, dtype=x.dtype).scatter_add(1, _SIDX, x[:, 1:4])),
}


_XT = _X.clone()
_XT[0, 1] = _XT[0, 3] = _XT[0].max() + 1.0           # a tie at row 0's maximum
_XT[1, 2] = _Y[1, 2]                                  # a tie with y for maximum/minimum
_XP = _X.abs() + 0.5                                  # positive, for logs
ONE_STEP_OPS.update({
    "logsumexp": (("x",), lambda x: x.logsumexp(1)),
    "amax_ties": (("t",), lambda t: t.amax(1)),
    "amin_all": (("x",), lambda x: x.amin((0, 1))),
    "max_all_ties": (("t",), lambda t: t.max()),
    "median_all": (("x",), lambda x: x.median()),
    "maximum_ties": (("t", "y"), lambda t, y: torch.maximum(t, y[:3])),
    "minimum": (("x", "y"), lambda x, y: torch.minimum(x, y[:3])),
    "fmax": (("t", "y"), lambda t, y: torch.fmax(t, y[:3])),
    "norm3": (("x",), lambda x: torch.linalg.vector_norm(x, 3, dim=1)),
    "norm2_keepdim": (("x",), lambda x: x.norm(dim=0, keepdim=True)),
    "norm_inf_ties": (("t",), lambda t: torch.linalg.vector_norm(t, math.inf, dim=1)),
    "norm_inf_sign_tie": (("st",), lambda t: torch.linalg.vector_norm(t, math.inf, dim=1)),
    "norm_neg_inf": (("x",), lambda x: torch.linalg.vector_norm(x, -math.inf, dim=0)),
    "norm_inf_all": (("st",), lambda t: torch.linalg.vector_norm(t, math.inf)),
    "diag_of_matrix": (("x",), lambda x: torch.diag(x, 1)),          # DiagonalBackward0_copy
    "var": (("x",), lambda x: x.var(1)),
    "std_all": (("x",), lambda x: x.std()),
    "expm1": (("x",), lambda x: x.expm1()),
    "exp2": (("x",), lambda x: x.exp2()),
    "log2": (("p",), lambda p: p.log2()),
    "log10": (("p",), lambda p: p.log10()),
    "atan": (("x",), lambda x: x.atan()),
    "erfc": (("x",), lambda x: x.erfc()),
    "logsigmoid": (("x",), lambda x: F.logsigmoid(x)),
    "hardswish": (("x",), lambda x: F.hardswish(x)),
    "mish": (("x",), lambda x: F.mish(x)),
    "elu": (("x",), lambda x: F.elu(x, alpha=0.7)),
    "celu": (("x",), lambda x: F.celu(x, alpha=0.6)),
    "elu_inplace": (("x",), lambda x: F.elu_(x * 1.0, alpha=0.7)),
    "selu_inplace": (("x",), lambda x: torch.selu_(x * 1.0)),
    "var_mean": (("x",), lambda x: torch.stack(torch.var_mean(x, 1))),
    "std_mean_keepdim": (("x",), lambda x: torch.cat(torch.std_mean(x, 0, keepdim=True))),
    "var_mean_one_output": (("x",), lambda x: torch.var_mean(x, 1, correction=0)[0]),
    "hardswish_kinks": (("k",), lambda k: F.hardswish(k)),
    "norm_half_zeros": (("xz",), lambda xz: torch.linalg.vector_norm(xz, 0.5, dim=1)),
    "norm0": (("x",), lambda x: torch.linalg.vector_norm(x, 0, dim=1)),
    "maximum_nan": (("n", "y"), lambda n, y: torch.maximum(n, y[:3])),
    "scatter_add_0d": (("s",), lambda s: torch.ones((), dtype=s.dtype).scatter_add(0, torch.tensor([0, 0]), s)),
    "selu": (("x",), lambda x: F.selu(x)),
    "glu": (("x",), lambda x: F.glu(x[:, :4], -1)),
    "sign": (("x",), lambda x: x.sign()),
    "nan_to_num": (("x",), lambda x: x.nan_to_num()),
    "flip": (("x",), lambda x: x.flip(1)),
    "roll": (("x",), lambda x: x.roll((1, -2), (0, 1))),
    "roll_flat": (("x",), lambda x: x.roll(3)),
    "tril": (("x",), lambda x: x.tril()),
    "triu": (("x",), lambda x: x.triu(1)),
    "pad": (("x",), lambda x: F.pad(x, (1, 2, 0, 1))),
    "pad_crop": (("x",), lambda x: F.pad(x, (-2, 1, -1, 0))),
    "cumsum": (("x",), lambda x: x.cumsum(1)),
    "cumsum_dim0": (("x",), lambda x: x.cumsum(-2)),
})
_XK = torch.tensor([[-3.0, 3.0, 0.5, -4.0, 4.0], [-3.0, 1.0, 3.0, -2.5, 2.0], [0.0, -1.0, 3.0, 2.9, -3.0]],
                   dtype=torch.float64)                  # hardswish's kinks at ±3
_XZ = _X.clone()
_XZ[0, 2] = _XZ[1, 0] = 0.0                           # zero entries in non-zero rows
_XN = _X.clone()
_XN[1, 1] = float("nan")                              # maximum/minimum with a NaN operand
_INPUTS = {"x": _X, "y": _Y, "t": _XT, "p": _XP, "k": _XK, "xz": _XZ, "n": _XN, "s": torch.tensor([0.5, -2.0],
                                                                                           dtype=torch.float64)}
_INPUTS.update({"u": _X.tanh() * 0.9, "q": _XP + 1.0, "s01": torch.sigmoid(_X * 2),
                "r7": torch.tensor([0.5, -1.5, 2.0, 0.25, 0.0, -0.75, 1.0], dtype=torch.float64)})
# clamp(x, lo, hi) regions: lo < hi (below, at lo, inside, at hi, above), lo = hi (below, at,
# above), lo > hi (at lo, at hi, between)
_INPUTS.update({
    "cx": torch.tensor([[0.0, 1.0, 1.5, 2.0, 3.0], [0.0, 1.0, 2.0, 2.0, 1.0], [1.5, 0.5, 1.0, 2.5, 2.0]],
                       dtype=torch.float64),
    "clo": torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 2.0, 2.0], [2.0, 0.0, 0.0, 0.0, 1.0]],
                        dtype=torch.float64),
    "chi": torch.tensor([[2.0, 2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 1.0, 2.5, 1.0]],
                        dtype=torch.float64),
})
_GL = torch.Generator().manual_seed(13)
_INPUTS.update({
    "sq": torch.eye(3, dtype=torch.float64) + 0.4 * torch.randn(2, 3, 3, generator=_GL, dtype=torch.float64),
    "rhs": torch.randn(2, 3, 2, generator=_GL, dtype=torch.float64),
    "vec": torch.randn(3, generator=_GL, dtype=torch.float64),
    # rank 2 (row 3 = row 1 + row 2): det 0, cofactors n mᵀ with no zero entry (n = (5, -4, 1), m = (1, 1, -1))
    "sing": torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 4.0], [1.0, 3.0, 7.0]], dtype=torch.float64),
})

# convolutions (input, weight and bias values; one tap reads one input position per output) and prod
_GC = torch.Generator().manual_seed(11)
_INPUTS.update({
    "c1": torch.randn(2, 2, 7, generator=_GC, dtype=torch.float64),          # conv1d input [N, C, L]
    "cw1": torch.randn(3, 2, 3, generator=_GC, dtype=torch.float64),         # its weight [O, C, K]
    "c2": torch.randn(1, 4, 5, 5, generator=_GC, dtype=torch.float64),       # conv2d input
    "cw2": torch.randn(4, 2, 3, 3, generator=_GC, dtype=torch.float64),      # weight for groups=2
    "cb2": torch.randn(4, generator=_GC, dtype=torch.float64),
    "c3": torch.randn(1, 2, 3, 4, 3, generator=_GC, dtype=torch.float64),    # conv3d input
    "ct": torch.randn(1, 4, 3, 3, generator=_GC, dtype=torch.float64),       # conv_transpose2d input
    "cwt": torch.randn(4, 3, 3, 3, generator=_GC, dtype=torch.float64),      # its weight [C, O, K, K]
})
_XZ2 = _X.clone()
_XZ2[0, 3] = 0.0                                      # one zero in row 0
_XZ2[2, 0] = _XZ2[2, 4] = 0.0                         # two zeros in row 2
_INPUTS["zp"] = _XZ2
_XZ1 = _X.clone()
_XZ1[1, 2] = 0.0                                      # a single zero in the whole tensor
_INPUTS["zp1"] = _XZ1
_XS = _X.clone()
_XS[0, 4] = -_XS[0].abs().max()                       # |x| ties with opposite signs at row 0's maximum
_XS[0, 2] = -_XS[0, 4]
_INPUTS["st"] = _XS
_CWD = torch.randn(8, 1, 2, 2, generator=_GC, dtype=torch.float64)          # depthwise, channel multiplier 2
_CWS = torch.randn(3, 4, 2, 2, generator=_GC, dtype=torch.float64)          # even kernel for padding='same'
_CW3 = torch.randn(2, 2, 2, 3, 2, generator=_GC, dtype=torch.float64)
_CBT = torch.randn(3, generator=_GC, dtype=torch.float64)


def _conv_same(x, w):
    """padding='same' with an even kernel: torch pads (asymmetrically) first, with a warning about the copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return F.conv2d(x, w, padding="same")


ONE_STEP_OPS.update({
    "conv1d_stride_dilation": (("c1", "cw1"), lambda c1, cw1: F.conv1d(c1, cw1, stride=2, padding=1, dilation=2)),
    "conv2d_groups_bias": (("c2", "cw2", "cb2"), lambda c2, cw2, cb2: F.conv2d(c2, cw2, cb2, padding=1, groups=2)),
    "conv2d_depthwise": (("c2",), lambda c2: F.conv2d(c2, _CWD.to(c2.dtype), stride=2, padding="valid", groups=4)),
    "conv2d_same_even": (("c2",), lambda c2: _conv_same(c2, _CWS.to(c2.dtype))),      # asymmetric: pad + conv
    "conv3d": (("c3",), lambda c3: F.conv3d(c3, _CW3.to(c3.dtype), stride=(1, 2, 1), padding=(1, 0, 1))),
    "conv_transpose2d": (("ct", "cwt"), lambda ct, cwt: F.conv_transpose2d(ct, cwt, _CBT.to(ct.dtype), stride=2,
                                                                           padding=1, output_padding=1)),
    # a weight (and bias) computed from another input, as a hypernetwork's
    "conv1d_weight_from_input": (("c1", "y"), lambda c1, y: F.conv1d(c1, y[:3, :4].reshape(3, 2, 2), y[3, :3],
                                                                     padding=1)),
    "prod_dim_zeros": (("zp",), lambda zp: zp.prod(1)),
    "prod_all": (("x",), lambda x: x.prod()),
    "prod_all_one_zero": (("zp1",), lambda zp1: zp1.prod()),
    "prod_keepdim": (("zp",), lambda zp: zp.prod(0, keepdim=True)),
    "cumprod": (("x",), lambda x: x.cumprod(1)),
    "cumprod_zeros": (("zp",), lambda zp: zp.cumprod(-1)),
    "cumprod_dim0": (("zp",), lambda zp: zp.cumprod(0)),
    "logcumsumexp": (("x",), lambda x: x.logcumsumexp(1)),
    "logcumsumexp_dim0": (("x",), lambda x: torch.logcumsumexp(x, 0)),
    # elementwise functions and small contractions (torch's own derivative formulas)
    "asin": (("u",), lambda u: u.asin()),
    "acos": (("u",), lambda u: u.acos()),
    "asinh": (("x",), lambda x: x.asinh()),
    "acosh": (("q",), lambda q: q.acosh()),
    "atanh": (("u",), lambda u: u.atanh()),
    "sinh": (("x",), lambda x: x.sinh()),
    "cosh": (("x",), lambda x: x.cosh()),
    "tan": (("u",), lambda u: u.tan()),
    "sinc_zeros": (("xz",), lambda xz: xz.sinc()),
    "logit": (("s01",), lambda s01: s01.logit()),
    "logit_eps": (("s01",), lambda s01: s01.logit(0.3)),
    "deg2rad": (("x",), lambda x: x.deg2rad()),
    "rad2deg": (("x",), lambda x: x.rad2deg()),
    "hardsigmoid_kinks": (("k",), lambda k: F.hardsigmoid(k)),
    "hardshrink": (("x",), lambda x: F.hardshrink(x, 0.5)),
    "softshrink": (("x",), lambda x: F.softshrink(x, 0.5)),
    "leaky_relu": (("x",), lambda x: F.leaky_relu(x, 0.1)),        # the slope in float64 (was rounded to float32)
    "leaky_relu_inplace": (("x",), lambda x: F.leaky_relu_(x * 1.0, 0.1)),
    "copysign": (("xz", "y"), lambda xz, y: torch.copysign(xz, y[:3])),
    "copysign_scalar": (("xz",), lambda xz: torch.copysign(xz, -1.0)),
    "floor_ceil_round_trunc": (("x",), lambda x: x.floor() + x.ceil() * 2 + x.round() + x.trunc() + x * 0.5),
    "frac": (("x",), lambda x: x.frac()),
    "fmod": (("x",), lambda x: torch.fmod(x, 0.7)),
    "fmod_tensor": (("x", "y"), lambda x, y: torch.fmod(x, y[:3].abs() + 0.5)),
    "remainder_tensor": (("x", "y"), lambda x, y: torch.remainder(x, y[:3].abs() + 0.5)),
    "div_floor": (("x", "p"), lambda x, p: torch.div(x, p, rounding_mode="floor") + x * p),
    "pow_scalar_base": (("x",), lambda x: torch.pow(2.5, x)),
    "logaddexp": (("x", "y"), lambda x, y: torch.logaddexp(x, y[:3])),
    "logaddexp2": (("x", "y"), lambda x, y: torch.logaddexp2(x, y[:3])),
    "clamp_min_tensor": (("t", "y"), lambda t, y: torch.clamp_min(t, y[:3])),
    "clamp_max_tensor": (("x", "y"), lambda x, y: torch.clamp_max(x, y[:3])),
    "masked_fill_tensor": (("x", "y"), lambda x, y: x.masked_fill(x > 0, y[0, 0])),
    "prelu": (("x", "y"), lambda x, y: F.prelu(x, y[0])),
    "prelu_shared": (("x", "y"), lambda x, y: F.prelu(x, y[0, :1])),
    "nansum": (("n",), lambda n: n.nansum(1)),
    "nansum_all": (("n",), lambda n: n.nansum()),
    "trace": (("x",), lambda x: x[:, :3].trace()),
    "mv": (("x", "y"), lambda x, y: torch.mv(x, y[1])),
    "addmv": (("x", "y"), lambda x, y: torch.addmv(y[0, :3], x, y[1], beta=0.5, alpha=2.0)),
    "addr": (("x", "y"), lambda x, y: torch.addr(x[:, :4], y[0, :3], y[1, :4], beta=0.5, alpha=1.5)),
    # ops that copy elements (each output element is one input element or a fill)
    "diagonal": (("x",), lambda x: x.diagonal(1)),
    "diag_embed": (("x",), lambda x: torch.diag_embed(x, -1)),
    "rot90": (("x",), lambda x: x.rot90(1, (0, 1))),
    "pixel_shuffle": (("c2",), lambda c2: F.pixel_shuffle(c2, 2)),
    "pixel_unshuffle": (("c2",), lambda c2: F.pixel_unshuffle(c2[..., :4, :4], 2)),
    "channel_shuffle": (("c2",), lambda c2: F.channel_shuffle(c2, 2)),
    "unfold_windows": (("x",), lambda x: x.unfold(1, 3, 1)),
    "im2col": (("c2",), lambda c2: F.unfold(c2, 2, dilation=1, padding=1, stride=2)),
    "col2im": (("c2",), lambda c2: F.fold(c2.reshape(1, 4, 25), (4, 4), 2, padding=1, stride=1)),
    "take": (("x",), lambda x: x.take(torch.tensor([0, 7, 7, 14]))),
    "masked_select": (("x",), lambda x: x.masked_select(_X > 0)),
    "narrow_copy": (("x",), lambda x: x.narrow_copy(1, 1, 3)),
    "slice_scatter": (("x", "y"), lambda x, y: torch.slice_scatter(x, y[:3, :2] * 2, 1, 1, 5, 2)),
    "select_scatter": (("x", "y"), lambda x, y: torch.select_scatter(x, y[0], 0, 1)),
    "unsafe_index": (("x",), lambda x: torch.ops.aten._unsafe_index(x, [torch.tensor([0, 2, 2])])),
    "unsafe_masked_index": (("x",), lambda x: torch.ops.aten._unsafe_masked_index(
        x, _X[:, :4] > 0, [torch.tensor([0, 2, 2])[:, None], torch.tensor([0, 1, 1, 4])], 0.0)),
    "pad_reflect": (("x",), lambda x: F.pad(x, (2, 1), mode="reflect")),
    "pad_replicate_2d": (("x",), lambda x: F.pad(x[None], (1, 2, 2, 0), mode="replicate")),
    # as_strided: overlapping windows (fan-out), a transposed view, and the in-place
    # as_strided_ an adaptive pool applies to a channels-last-looking input (Swin's pooler)
    "as_strided_windows": (("x",), lambda x: x.as_strided((4, 4), (3, 1))),
    "as_strided_of_a_view": (("x",), lambda x: x.t().as_strided((3, 3), (1, 4), 2)),
    "adaptive_avg_pool1d_strided": (("x",), lambda x: F.adaptive_avg_pool1d(x[None].transpose(1, 2), 1)),
    # in-place writes into a view (CopySlices): a copy, in-place ops on slices, circular padding
    "copy_into_slice": (("x", "y"), lambda x, y: _written(x, y, "copy")),
    "inplace_ops_on_slices": (("x", "y"), lambda x, y: _written(x, y, "ops")),
    "index_put_into_slice": (("x", "y"), lambda x, y: _written(x, y, "index_put")),
    "inplace_op_broadcast_operand": (("x", "y"), lambda x, y: _written(x, y, "broadcast_operand")),
    # a broadcast value written twice to one row: one edge of weight 2 per element (the Jacobian's)
    "index_put_broadcast_repeated": (("x", "y"), lambda x, y: x.index_put((torch.tensor([0, 2, 2]),), y[0])),
    "index_put_broadcast_repeated_acc": (("x", "y"), lambda x, y: x.index_put((torch.tensor([0, 2, 2]),), y[0],
                                                                           accumulate=True)),
    "pad_circular": (("x",), lambda x: F.pad(x[None], (1, 2), mode="circular")),
    # determinants, inverses and solves of (batched) square matrices: one primitive each
    "det": (("sq",), lambda a: torch.linalg.det(a)),
    "det_singular": (("sing",), lambda a: torch.linalg.det(a)),
    "slogdet": (("sq",), lambda a: torch.linalg.slogdet(a)[1]),
    "inv": (("sq",), lambda a: torch.linalg.inv(a)),
    "solve": (("sq", "rhs"), lambda a, b: torch.linalg.solve(a, b)),
    "solve_vector_broadcast": (("sq", "vec"), lambda a, b: torch.linalg.solve(a, b)),
    # triangular solves (the chunked gated delta rule of Qwen3.5/Qwen3-Next/OLMo-hybrid): only the
    # triangle the solve reads has edges; its inverse's zeros are no edges
    "solve_triangular_lower_unit": (("sq", "rhs"), lambda a, b: torch.linalg.solve_triangular(
        a, b, upper=False, unitriangular=True)),
    "solve_triangular_upper": (("sq", "rhs"), lambda a, b: torch.linalg.solve_triangular(a, b, upper=True)),
    "solve_triangular_right_lower": (("sq", "rhs"), lambda a, b: torch.linalg.solve_triangular(
        a, b.transpose(-1, -2), upper=False, left=False)),
    "solve_triangular_right_upper_unit_broadcast": (("sq", "rhs"), lambda a, b: torch.linalg.solve_triangular(
        a[0], b.transpose(-1, -2), upper=True, left=False, unitriangular=True)),
})


# rules that the oracle tests above never reached (an audit counted the rules each test walks)
def _set_all(h, v):
    h[:] = v
    return h


def _rrelu_train(x, inplace=False):
    with torch.random.fork_rng():              # the same drawn slopes in the walk and the oracle
        torch.manual_seed(5)
        return F.rrelu(x, 0.1, 0.4, training=True, inplace=inplace)


# gamma/Bessel/normal special functions, ldexp, rrelu
ONE_STEP_OPS.update({
    "digamma": (("p",), torch.digamma),
    "lgamma": (("p",), torch.lgamma),
    "polygamma": (("p",), lambda p: torch.polygamma(2, p)),
    "mvlgamma": (("p",), lambda p: torch.mvlgamma(p + 1.5, 3)),
    "i0": (("x",), torch.i0),
    "i0e": (("x",), torch.special.i0e),
    "i1": (("xz",), torch.special.i1),
    "i1e": (("xz",), torch.special.i1e),
    "erfcx": (("x",), torch.special.erfcx),
    "ndtri": (("s01",), torch.special.ndtri),
    "log_ndtr": (("x",), torch.special.log_ndtr),
    "entr": (("p",), torch.special.entr),
    "ldexp": (("x",), lambda x: torch.ldexp(x, torch.tensor([[1], [-2], [3]]))),
    "ldexp_float_exponent": (("x", "t"), torch.ldexp),                # the exponent has edges too
    "rrelu_eval": (("x",), lambda x: F.rrelu(x, 0.1, 0.4, training=False)),
    "rrelu_train": (("x",), _rrelu_train),
    "rrelu_inplace_eval": (("x",), lambda x: F.rrelu(x * 1.0, 0.1, 0.4, training=False, inplace=True)),
    "rrelu_inplace_train": (("x",), lambda x: _rrelu_train(x * 1.0, inplace=True)),
    "aminmax_dim": (("x",), lambda x: (lambda r: torch.stack([r.min, r.max * 2.0]))(torch.aminmax(x, dim=1))),
    "aminmax_keepdim_ties": (("k",), lambda k: (lambda r: r.min - r.max)(torch.aminmax(k, dim=0, keepdim=True))),
    "aminmax_all_max_only": (("x",), lambda x: torch.aminmax(x).max * 3.0),
    "aminmax_all_keepdim": (("k",), lambda k: (lambda r: r.min - 2.0 * r.max)(torch.aminmax(k, keepdim=True))),
})

# whole-tensor in-place writes on an intermediate: CopyBackwards, ZeroBackward0, FillBackward2/3
ONE_STEP_OPS.update({
    "copy_whole": (("x", "t"), lambda x, t: (x * 2.0).copy_(t * 3.0)),
    "copy_whole_broadcast": (("x", "y"), lambda x, y: (x * 2.0).copy_(y[0] - 1.0)),
    "copy_into_empty": (("t",), lambda t: torch.empty(3, 5, dtype=t.dtype).copy_(t.tanh())),
    "setitem_whole_slice": (("x", "t"), lambda x, t: _set_all(x * 2.0, t * 3.0)),
    "zero_then_add": (("x",), lambda x: (x * 2.0).zero_() + x),
    "fill_number_then_mul": (("x",), lambda x: (x * 2.0).fill_(0.5) * x),
    "fill_tensor": (("x", "s"), lambda x, s: (x * 2.0).fill_(s[1] * 1.5) * x),
    "diagonal_scatter": (("x", "vec"), lambda x, v: torch.diagonal_scatter(x, v, 1)),
    "diagonal_scatter_offset": (("x", "s"), lambda x, s: torch.diagonal_scatter(x.t(), s, -3)),
    "put_accumulate": (("x", "vec"), lambda x, v: x.put(torch.tensor([0, 7, 7]), v, accumulate=True)),
    "put_overwrite": (("x", "vec"), lambda x, v: x.put(torch.tensor([0, 7, -1]), v)),
})

# embedding_bag: weight [3, 5] ("x"), 7 positions in 4 bags (one empty, one all padding with padding_idx=2)
_EB_IDX, _EB_OFF = torch.tensor([1, 2, 0, 1, 2, 0, 2]), torch.tensor([0, 2, 2, 6])
ONE_STEP_OPS.update({
    "embedding_bag_sum": (("x",), lambda w: F.embedding_bag(_EB_IDX, w, _EB_OFF, mode="sum")),
    "embedding_bag_mean_padding": (("x",), lambda w: F.embedding_bag(_EB_IDX, w, _EB_OFF, mode="mean",
                                                                     padding_idx=2)),
    "embedding_bag_max": (("k",), lambda w: F.embedding_bag(_EB_IDX, w, _EB_OFF, mode="max")),
    "embedding_bag_weighted": (("x", "r7"), lambda w, p: F.embedding_bag(
        _EB_IDX, w, _EB_OFF, mode="sum", per_sample_weights=p, padding_idx=0)),
    "embedding_bag_last_offset": (("x",), lambda w: F.embedding_bag(_EB_IDX, w, torch.tensor([0, 3, 7]),
                                                                    mode="mean", include_last_offset=True)),
    "embedding_bag_fixed_bags": (("x",), lambda w: F.embedding_bag(torch.tensor([[0, 2, 0], [1, 1, 2]]), w,
                                                                   mode="sum")),
    "embedding_bag_max_padding": (("k",), lambda w: F.embedding_bag(_EB_IDX, w, _EB_OFF, mode="max",
                                                                    padding_idx=1)),
})

ONE_STEP_OPS.update({
    "exp": (("x",), lambda x: x.exp()),
    "log": (("p",), lambda p: p.log()),
    "sqrt": (("p",), lambda p: p.sqrt()),
    "reciprocal": (("p",), lambda p: p.reciprocal()),
    "sin": (("x",), lambda x: x.sin()),
    "cos": (("x",), lambda x: x.cos()),
    "erf": (("x",), lambda x: x.erf()),
    "hardtanh": (("x",), lambda x: F.hardtanh(x, -0.5, 0.8)),
    "softplus_threshold": (("x",), lambda x: F.softplus(x, beta=2.0, threshold=1.0)),
    "rsub_scalar": (("x",), lambda x: 1.0 - x),
    "rsub_alpha": (("x", "y"), lambda x, y: torch.rsub(x, y[:3], alpha=2.0)),
    "sub_scalar_alpha": (("x",), lambda x: torch.sub(x, 2.0, alpha=3.0) * 0.5),
    "where_broadcast": (("x", "y"), lambda x, y: torch.where(_X > 0, x, y[:1])),
    "fmin": (("t", "y"), lambda t, y: torch.fmin(t, y[:3])),
    "clamp_tensor_bounds": (("x", "y"), lambda x, y: torch.clamp(x, y[:3] - 0.5, y[:3] + 0.5)),
    "clamp_min_max_scalar": (("x",), lambda x: x.clamp_min(0.1) + x.clamp_max(-0.2)),
    # exact ties with the bounds in every region (torch 2.13 and 2.14 differ there)
    "clamp_tensor_bound_ties": (("cx", "clo", "chi"), lambda x, lo, hi: torch.clamp(x, lo, hi)),
    "clamp_tensor_min_ties": (("cx", "clo"), lambda x, lo: torch.clamp(x, lo, None)),
    "clamp_tensor_max_ties": (("cx", "chi"), lambda x, hi: torch.clamp(x, None, hi)),
    "clamp_min_tensor_ties": (("cx", "clo"), lambda x, lo: torch.clamp_min(x, lo)),
    "clamp_number_ties": (("cx",), lambda x: torch.clamp(x, 1.0, 2.0)),
    "clamp_number_equal_ties": (("cx",), lambda x: torch.clamp(x, 1.0, 1.0)),
    "clamp_number_min_ties": (("cx",), lambda x: torch.clamp(x, min=1.0)),
    "clamp_number_max_ties": (("cx",), lambda x: torch.clamp(x, max=2.0)),
    "clamp_min_number_ties": (("cx",), lambda x: x.clamp_min(1.0)),
    "clamp_max_number_ties": (("cx",), lambda x: x.clamp_max(1.0)),
    "remainder_scalar": (("x",), lambda x: torch.remainder(x, 0.7)),
    "round_decimals": (("x",), lambda x: x.round(decimals=1) + x),
    "linear_bias": (("x", "y", "p"), lambda x, y, p: F.linear(x, y, p[0, :4])),
    "baddbmm": (("x", "y", "p"), lambda x, y, p: torch.baddbmm(p[:2, :3].reshape(2, 1, 3), x[:2].reshape(2, 1, 5),
                                                                y.t()[:, :3].expand(2, 5, 3), beta=0.5, alpha=1.5)),
    "addbmm": (("x", "y", "p"), lambda x, y, p: torch.addbmm(p[0, :4].reshape(2, 2), x[:, :4].reshape(3, 2, 2),
                                                              y[:3, :4].reshape(3, 2, 2), beta=0.3)),
    "permute": (("x",), lambda x: x.reshape(3, 5, 1).permute(2, 1, 0)),
    "numpy_T": (("x",), lambda x: x.T),
    "squeeze_all": (("x",), lambda x: x[None, :, None].squeeze()),
    "squeeze_dim": (("x",), lambda x: x[None].squeeze(0)),
    "squeeze_dims": (("x",), lambda x: x[None, :, None].squeeze((0, 2))),
    "index_select_repeats": (("x",), lambda x: x.index_select(1, torch.tensor([4, 0, 4]))),
    "gather_repeats": (("x",), lambda x: x.gather(1, torch.tensor([[0, 0], [4, 1], [2, 2]]))),
    "mode": (("m",), lambda m: m.mode(1)[0]),
    "cummin": (("x",), lambda x: x.cummin(1)[0]),
    "nanmedian_dim": (("x",), lambda x: x.nanmedian(1)[0]),
    "nanmedian_all": (("x",), lambda x: x.nanmedian()),
    "mean_all": (("x",), lambda x: x.mean()),
    "min_all_ties": (("t",), lambda t: (-t).min()),
    "reflection_pad3d": (("x",), lambda x: F.pad(x.reshape(1, 1, 1, 3, 5), (1, 2, 1, 1, 0, 0), mode="reflect")),
    "replication_pad1d": (("x",), lambda x: F.pad(x[None], (2, 1), mode="replicate")),
    "replication_pad3d": (("x",), lambda x: F.pad(x.reshape(1, 1, 1, 3, 5), (1, 0, 0, 2, 1, 1), mode="replicate")),
})
_INPUTS["m"] = torch.tensor([[1.0, 2.0, 2.0, 3.0, 1.0], [0.5, 0.5, 0.5, -1.0, 4.0], [2.0, -2.0, 3.0, 3.0, 2.0]],
                            dtype=torch.float64)      # repeated values: mode's ties


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12), ("triton", torch.float32, 2e-4)],
                         ids=["torch-f64", "triton-f32"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", list(ONE_STEP_OPS))
def test_aten_ops_against_the_oracle(name, semiring, backend, dtype, tol):
    """Each op is one step of a float64 oracle program (its Jacobian's non-zero
    entries are the edges): topk/sort/max/min/kthvalue/median/cummax over a
    dim read one element per output; index_add and scatter_add add sources at
    indices (repeated indices fan in); logsumexp, amax/amin and the full
    max/min/median (ties share 1/count), maximum/minimum (ties 1/2 each),
    vector norms, var/std; unary functions; flip, roll, tril/triu, pad."""
    used, fn = ONE_STEP_OPS[name]
    inputs = {k: _INPUTS[k] for k in used}
    w = torch.randn(fn(*inputs.values()).shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    steps = [Step("z", fn, used), Step("out", lambda z: (z * w).sum(), ("z",))]
    prog = Program(name, inputs, steps, engine=None)
    if backend == "triton" and not triton_ok():
        pytest.skip("triton unavailable (or no GPU and TRITON_INTERPRET unset)")
    want = oracle(prog, semiring)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    leaves = [t.to(dev, dtype).requires_grad_() for t in inputs.values()]
    out = (fn(*leaves) * w.to(dev, dtype)).sum()
    got = semitriton.grad(out, leaves, semiring=semiring, backend=backend,
                          **({"fast_real": False} if semiring == "real" else {}))
    for k, g in zip(used, got):
        assert_semiring_close(g, want[k], semiring, tol, f"{name}/{k}/{semiring}/{backend}")


def _grouped_inputs():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(9, 8, generator=g)
    b = torch.randn(4, 8, 4, generator=g)
    offs = torch.tensor([2, 2, 6, 8], dtype=torch.int32)          # an empty group; row 8 in no group
    w = torch.randn(9, 4, generator=g)
    return a, b, offs, w


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_grouped_mm_equals_its_per_group_matmuls(semiring):
    """torch._grouped_mm (transformers' grouped experts) against the same
    product written as one mm per group (walked through the mm and cat rules),
    for both operands; rows past the last offset have no path."""
    a, b, offs, w = _grouped_inputs()
    kw = {"fast_real": False} if semiring == "real" else {}
    la, lb = a.clone().requires_grad_(), b.clone().requires_grad_()
    y = torch._grouped_mm(la, lb, offs=offs)
    got = semitriton.grad((y[:8] * w[:8]).sum(), [la, lb], semiring=semiring, **kw)
    ra, rb = a.clone().requires_grad_(), b.clone().requires_grad_()
    parts, start = [], 0
    for gi, end in enumerate(offs.tolist()):
        parts.append(ra[start:end] @ rb[gi])
        start = end
    yr = torch.cat(parts)
    want = semitriton.grad((yr * w[:8]).sum(), [ra, rb], semiring=semiring, **kw)
    for gv, wv, what in zip(got, want, ("A", "B")):      # A's row 8 lies in no group: the zero in both
        assert_semiring_close(gv, wv.detach().numpy(), semiring, 1e-5, f"grouped_mm {what} {semiring}")
    if semiring == "real":           # torch leaves A's rows past the last offset uninitialised
        ag = torch.autograd.grad((y[:8] * w[:8]).sum(), [la, lb])
        torch.testing.assert_close(got[0][:8], ag[0][:8], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], ag[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_models_walk(kind):
    """A tiny Mixtral / Qwen2-MoE with each experts implementation transformers
    offers (grouped_mm, eager with index_add, batched_mm; the router's topk in
    all): every semiring runs, real equals autograd, and the statistics agree
    across the implementations."""
    import transformers as t
    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=32)
    if kind == "mixtral":
        model = t.MixtralForCausalLM(t.MixtralConfig(**common, num_local_experts=4))
    else:
        model = t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=12,
                                                       shared_expert_intermediate_size=20))
    model = semitriton.patch(model.eval())
    ids = torch.tensor([[3, 17, 41, 9, 23, 11]])
    stats: dict = {}
    for impl in ("grouped_mm", "eager", "batched_mm"):
        model.set_experts_implementation(impl)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb).logits
        score = logits[0, -1, 7] - logits[0, -1, 3]
        (ag,) = torch.autograd.grad(score, emb, retain_graph=True)
        for s in SEMIRINGS:
            (v,) = semitriton.grad(score, emb, semiring=s, **({"fast_real": False} if s == "real" else {}))
            assert not torch.isnan(v).any(), f"{impl}/{s}"
            if s == "real":
                torch.testing.assert_close(v, ag, rtol=1e-4, atol=1e-6 * float(ag.abs().max()))
            if s in stats:
                assert_semiring_close(v, stats[s], s, 1e-4, f"{impl} vs grouped_mm, {s}")
            else:
                stats[s] = v.detach().double().numpy()
    semitriton.unpatch(model)


@pytest.mark.skipif(not hasattr(__import__("transformers"), "Qwen3_5ForCausalLM"), reason="transformers without Qwen3.5")
def test_gated_delta_net_model_walks():
    """Qwen3.5's linear-attention layers (the chunked gated delta rule: causal
    conv1d, a unit lower-triangular solve per chunk, a scan over chunks) walk
    in every semiring, over two chunks of 64 and the padding: real equals
    autograd, and the float32 statistics equal the float64 model's."""
    import transformers as t
    cfg = t.Qwen3_5TextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, linear_num_value_heads=2,
                              linear_num_key_heads=1, linear_key_head_dim=8, linear_value_head_dim=8,
                              layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    model = semitriton.patch(t.Qwen3_5ForCausalLM(cfg).eval())
    with torch.no_grad():       # a slow decay (the initial one is about e^-10 per step): the solve's A edges count
        model.model.layers[0].linear_attn.A_log.fill_(-3.0)
    ids = torch.randint(0, 50, (1, 70), generator=torch.Generator().manual_seed(1))
    stats = {}
    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        score = model(inputs_embeds=emb, use_cache=False).logits[0, -1, 7]
        (ag,) = torch.autograd.grad(score, emb, retain_graph=True)
        for s in SEMIRINGS:
            (v,) = semitriton.grad(score, emb, semiring=s, **({"fast_real": False} if s == "real" else {}))
            assert torch.isfinite(v).all(), f"{dtype}/{s}"
            if s == "real":
                torch.testing.assert_close(v, ag, rtol=1e-4, atol=1e-6 * float(ag.abs().max()))
            if dtype == torch.float64:
                stats[s] = v.detach().numpy()
            else:
                assert_semiring_close(v, stats[s], s, 1e-3, f"float32 vs float64, {s}")
    semitriton.unpatch(model)


def test_top_paths_through_the_new_rules():
    """Paths are read off each rule's Jacobian columns: through index_add,
    the grouped matmul and a stable sort, the best path's product is the
    maxabs readout, and the two sources index_add joins give two paths."""
    from semitriton.paths import top_paths
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, requires_grad=True)
    w = torch.randn(3, 8, 4, generator=g)
    y = torch.zeros(4, 8).index_add(0, torch.tensor([0, 2, 0]), x)
    z = torch._grouped_mm(y, w, offs=torch.tensor([1, 1, 3], dtype=torch.int32))
    out = (z.sort(dim=1, stable=True)[0] * torch.randn(4, 4, generator=g)).sum()
    (best,) = top_paths(out, x, k=1)
    assert [s.op for s in best.steps][:3] == ["index_add", "grouped_mm", "sort"]
    torch.testing.assert_close(abs(best.product), float(semitriton.grad(out, x, semiring="maxabs")[0].max()),
                               rtol=1e-5, atol=0)
    two = top_paths(out, x, k=2)
    if two[0].steps[0].index == two[1].steps[0].index:      # joined at index_add's row 0
        assert {two[0].source_index[0], two[1].source_index[0]} == {0, 2}


@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", [n for n in ONE_STEP_OPS if len(ONE_STEP_OPS[n][0]) > 1])
def test_one_step_ops_with_each_operand_alone_requiring_grad(name, semiring):
    """torch saves only what the operands that require grad need: each
    operand alone reads what the oracle gives it when all require grad."""
    used, fn = ONE_STEP_OPS[name]
    inputs = {k: _INPUTS[k] for k in used}
    w = torch.randn(fn(*inputs.values()).shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want = oracle(Program(name, inputs, [Step("z", fn, used), Step("out", lambda z: (z * w).sum(), ("z",))],
                          engine=None), semiring)
    check_each_operand_alone(name, fn, inputs, used, w, want, semiring)


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_atan2_at_the_origin_follows_torch(semiring):
    """atan2's edges at (0, 0) are what the running torch's backward gives
    (0 in torch 2.13: no edge), so the other paths through that element keep
    their statistic (the rule's x/(x² + y²) as written gave NaN there)."""
    y = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    x = torch.tensor([0.0, 0.5, 1.5], dtype=torch.float64)
    steps = [Step("a", torch.atan2, ("y", "x")), Step("b", lambda y: 2.0 * y, ("y",)),
             Step("out", lambda a, b: (a + b).sum(), ("a", "b"))]
    want = oracle(Program("atan2_origin", {"y": y, "x": x}, steps, engine=None), semiring)
    ly, lx = y.clone().requires_grad_(), x.clone().requires_grad_()
    out = (torch.atan2(ly, lx) + 2.0 * ly).sum()
    got = semitriton.grad(out, (ly, lx), semiring=semiring, **({"fast_real": False} if semiring == "real" else {}))
    for k, g in zip(("y", "x"), got):
        assert_semiring_close(g, want[k], semiring, 1e-12, f"atan2_origin/{k}/{semiring}")
    if semiring == "real":
        for g, r in zip(got, torch.autograd.grad(out, (ly, lx))):
            torch.testing.assert_close(g, r, rtol=0, atol=0)


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_one_dimensional_values_through_semiring_matmuls(semiring):
    """cumsum of a 1-D tensor (also inside cumulative_trapezoid) and a
    patched Linear on a 1-D activation hand a 1-D value to the semiring
    matmul, whose max and maxabs products took only [..., i, j] values (an
    unpacking error)."""
    lin = torch.nn.Linear(4, 3).double().requires_grad_(False)
    semitriton.patch(lin, linear=True)
    x = torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for name, fn in (("cumsum", lambda x: x.cumsum(0)), ("linear", lin)):
        w = torch.randn(fn(x).shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        want = oracle(Program(name, {"x": x}, [Step("z", fn, ("x",)), Step("out", lambda z: (z * w).sum(), ("z",))],
                              engine=None), semiring)
        leaf = x.clone().requires_grad_()
        (got,) = semitriton.grad((fn(leaf) * w).sum(), leaf, semiring=semiring,
                                 **({"fast_real": False} if semiring == "real" else {}))
        assert_semiring_close(got, want["x"], semiring, 1e-12, f"{name}/{semiring}")


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_aminmax_element_that_is_both_min_and_max(semiring):
    """One element per row: it is the min and the max, two paths (through
    each output of the one node), ⊕-ed."""
    x = _INPUTS["x"][:, :1]
    steps = [Step("lo", lambda x: torch.aminmax(x, dim=1).min, ("x",)),
             Step("hi", lambda x: torch.aminmax(x, dim=1).max, ("x",)),
             Step("out", lambda lo, hi: (lo * 1.5 + hi * -0.5).sum(), ("lo", "hi"))]
    want = oracle(Program("aminmax_both", {"x": x}, steps, engine=None), semiring)
    leaf = x.clone().requires_grad_()
    r = torch.aminmax(leaf, dim=1)
    (got,) = semitriton.grad((r.min * 1.5 + r.max * -0.5).sum(), leaf, semiring=semiring,
                             **({"fast_real": False} if semiring == "real" else {}))
    assert_semiring_close(got, want["x"], semiring, 1e-12, f"aminmax_both/{semiring}")
