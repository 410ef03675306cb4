"""Rules for losses (nll_loss / cross_entropy, mse, smooth L1, Huber, binary
cross entropy with and without logits, kl_div through xlogy), sgn, erfinv,
unsafe_split (nn.GRU, nn.LSTMCell), torch.dist, torch.linalg.cross and
scatter_reduce.

Each case is a program for the float64 oracle (tests/oracle.py), whose
steps are the primitives the walk sees: a loss is ONE step written out from
its scalar definition (so the oracle's edges are that primitive's Jacobian,
not the sub-graph of its ops); the other ops are one step of the op itself
(its Jacobian as torch differentiates it: ties, zeros and kinks as torch's
backward). Broadcast operands get an explicit expand step (broadcasting is
fan-out). Checked: the real walk (fast_real=False) against
torch.autograd.grad, every semiring against the oracle (torch backend in
float64; the Triton one in float32, interpreted on the CPU), and that the
case records the node it is about."""

import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import semitriton
from conftest import SEMIRINGS, assert_semiring_close, check_each_operand_alone, node_types, triton_ok
from oracle import Program, Step, oracle

_G = torch.Generator().manual_seed(31)


def _randn(*shape):
    return torch.randn(*shape, generator=_G, dtype=torch.float64)


def _halves(*shape):
    return torch.randint(-3, 4, shape, generator=_G).double() / 2


# ---- data ---------------------------------------------------------------------------------------
_CW = torch.rand(5, generator=_G, dtype=torch.float64) + 0.5           # class weights
_T2 = torch.tensor([1, 0, 4, 2, 4, 3])                                  # [N] targets, C = 5
_T2I = torch.tensor([1, 0, 4, 2, 4, 2])                                 # with ignore_index = 2 twice
_T4 = torch.randint(0, 3, (2, 2, 3), generator=_G)                       # [N, d1, d2], C = 3
_T4[0, 0, 0] = _T4[1, 1, 2] = -100                                       # the default ignore_index
_T5 = torch.randint(0, 3, (2, 2, 2, 2), generator=_G)                    # [N, d1, d2, d3]
_T3 = torch.randint(0, 3, (2, 4), generator=_G)                          # [N, d1]

_Y = _randn(4, 5)
_D = _Y.clone()
_D[0, :4] = _Y[0, :4] + torch.tensor([0.5, -0.5, 0.0, 2.0], dtype=torch.float64)   # |d| = β / δ, d = 0
_P = torch.sigmoid(_randn(4, 5))                                         # probabilities
_Q = torch.sigmoid(_randn(4, 5))
_PW = torch.rand(5, generator=_G, dtype=torch.float64) + 0.5
_BW = torch.rand(4, 5, generator=_G, dtype=torch.float64) + 0.5

_XL = _randn(4, 5)
_XL[0, 0] = _XL[1, 3] = 0.0                                             # x = 0 (with y ≤ 0 below)
_YL = _randn(4, 5).abs() + 0.25
_YL[0, 0] = -0.5                                                         # x = 0, y < 0: no x edge
_YL[2, 1] = 1.0                                                          # log 1 = 0: no x edge

_U = torch.tanh(_randn(3, 4)) * 0.95                                     # erfinv's domain

_DA = _halves(3, 4)
_DB = _halves(3, 4)
_DB[0] = _DA[0]                                                          # zero differences
_DB[1, 0] = _DA[1, 0] + 1.5                                              # max-norm ties (|d| = 1.5)
_DB[2, 2] = _DA[2, 2] - 1.5
_DA[1, 1], _DB[1, 1] = 1.0, -0.5
_DB[:, 3] = _DA[:, 3] + 0.5

_CA = _randn(4, 3)
_CB = _randn(4, 3)
_CB[1, 2] = 0.0                                                          # a zero factor: no edge
_CA3 = _randn(2, 1, 3)

_SX = _halves(3, 5)
_SRC = _halves(4, 5)
_SIDX = torch.tensor([[0, 1, 2, 0, 1], [0, 2, 2, 1, 1], [2, 1, 0, 0, 1], [0, 1, 2, 0, 0]])
_SX[0, 0] = 2.0
_SRC[0, 0] = _SRC[3, 0] = 2.0                                            # a three-way tie at out[0, 0]
_SRC[1, 2] = _SRC[0, 2] = _SX[2, 2] - 3.0                                # a tie between sources
_SX[1, 4] = 0.0                                                          # a zero in x (prod)
_SRC[2, 4] = 0.0                                                         # one zero among sources (prod)
_SRC[0, 3] = _SRC[2, 3] = 0.0                                            # two zeros at one position

INPUTS = {
    "x2": _randn(6, 5), "x1": _randn(5), "x4": _randn(2, 3, 2, 3), "x5": _randn(2, 3, 2, 2, 2),
    "x3": _randn(2, 3, 4),
    "a": _randn(4, 5), "y": _Y, "d": _D, "yrow": _randn(5),
    "p": _P, "q": _Q, "xl": _XL, "yl": _YL, "u": _U,
    "da": _DA, "db": _DB, "dbrow": _halves(4),
    "ca": _CA, "cb": _CB, "ca3": _CA3,
    "sx": _SX, "src": _SRC,
}


# ---- the losses written from their definitions (the oracle's one primitive) ----------------------
def _nll_def(x, t, weight=None, ignore_index=-100, reduction="mean"):
    cdim = 0 if x.dim() == 1 else 1
    valid = t != ignore_index
    tc = torch.where(valid, t, 0)
    w = (torch.ones(5, dtype=x.dtype) if weight is None else weight)[tc] * valid
    picked = x.gather(cdim, tc.unsqueeze(cdim)).squeeze(cdim)
    loss = -w * picked
    if reduction == "none":
        return loss
    return loss.sum() / w.sum() if reduction == "mean" else loss.sum()


def _reduce(loss, reduction):
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def _mse_def(x, y, reduction):
    return _reduce((x - y) * (x - y), reduction)


def _smooth_l1_def(x, y, beta, reduction):
    d = x - y
    return _reduce(torch.where(d.abs() < beta, 0.5 * d * d / beta, d.abs() - 0.5 * beta), reduction)


def _huber_def(x, y, delta, reduction):
    d = x - y
    return _reduce(torch.where(d.abs() < delta, 0.5 * d * d, delta * (d.abs() - 0.5 * delta)), reduction)


def _bce_def(x, y, weight, reduction):
    loss = -(y * torch.log(x) + (1 - y) * torch.log(1 - x))
    return _reduce(loss if weight is None else loss * weight, reduction)


def _bce_logits_def(x, y, weight, pos_weight, reduction):
    p = 1.0 if pos_weight is None else pos_weight
    loss = -(p * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x))
    return _reduce(loss if weight is None else loss * weight, reduction)


# ---- cases: name -> (inputs used, torch forward, oracle steps or None (the forward as one step), node) ----
CASES = {}


def _case(name, used, fn, node, steps=None):
    CASES[name] = (used, fn, steps, node)


_T1 = torch.tensor(3)
_case("nll_mean", ("x2",), lambda x: F.nll_loss(x, _T2), "NllLossBackward0",
      [Step("z", lambda x: _nll_def(x, _T2), ("x2",))])
_case("nll_sum_weight", ("x2",), lambda x: F.nll_loss(x, _T2, weight=_CW.to(x.dtype), reduction="sum"),
      "NllLossBackward0", [Step("z", lambda x: _nll_def(x, _T2, _CW, reduction="sum"), ("x2",))])
_case("nll_none_weight_ignore", ("x2",),
      lambda x: F.nll_loss(x, _T2I, weight=_CW.to(x.dtype), ignore_index=2, reduction="none"),
      "NllLossBackward0", [Step("z", lambda x: _nll_def(x, _T2I, _CW, 2, "none"), ("x2",))])
_case("nll_mean_weight_ignore", ("x2",), lambda x: F.nll_loss(x, _T2I, weight=_CW.to(x.dtype), ignore_index=2),
      "NllLossBackward0", [Step("z", lambda x: _nll_def(x, _T2I, _CW, 2), ("x2",))])
_case("nll_1d", ("x1",), lambda x: F.nll_loss(x, _T1), "NllLossBackward0",
      [Step("z", lambda x: _nll_def(x, _T1), ("x1",))])
_case("nll_1d_none_weight", ("x1",), lambda x: F.nll_loss(x, _T1, weight=_CW.to(x.dtype), reduction="none"),
      "NllLossBackward0", [Step("z", lambda x: _nll_def(x, _T1, _CW, reduction="none"), ("x1",))])
_case("nll_4d_mean_ignore", ("x4",), lambda x: F.nll_loss(x, _T4), "NllLoss2DBackward0",
      [Step("z", lambda x: _nll_def(x, _T4), ("x4",))])
_case("nll_4d_none_weight", ("x4",), lambda x: F.nll_loss(x, _T4, weight=_CW[:3].to(x.dtype), reduction="none"),
      "NllLoss2DBackward0", [Step("z", lambda x: _nll_def(x, _T4, _CW[:3], reduction="none"), ("x4",))])
_case("nll_5d_sum", ("x5",), lambda x: F.nll_loss(x, _T5, reduction="sum"), "NllLoss2DBackward0",
      [Step("z", lambda x: _nll_def(x, _T5, reduction="sum"), ("x5",))])
_case("nll_3d_none", ("x3",), lambda x: F.nll_loss(x, _T3, reduction="none"), "NllLoss2DBackward0",
      [Step("z", lambda x: _nll_def(x, _T3, reduction="none"), ("x3",))])
# cross entropy = log-softmax (one primitive) then NLL
_case("cross_entropy", ("x2",), lambda x: F.cross_entropy(x, _T2I, weight=_CW.to(x.dtype), ignore_index=2),
      "NllLossBackward0",
      [Step("ls", lambda x: F.log_softmax(x, 1), ("x2",)), Step("z", lambda s: _nll_def(s, _T2I, _CW, 2), ("ls",))])
_case("cross_entropy_4d_none", ("x4",), lambda x: F.cross_entropy(x, _T4, reduction="none"), "NllLoss2DBackward0",
      [Step("ls", lambda x: F.log_softmax(x, 1), ("x4",)), Step("z", lambda s: _nll_def(s, _T4, reduction="none"),
                                                                   ("ls",))])

for _red in ("mean", "sum", "none"):
    _case(f"mse_{_red}", ("a", "y"), lambda x, y, r=_red: F.mse_loss(x, y, reduction=r), "MseLossBackward0",
          [Step("z", lambda x, y, r=_red: _mse_def(x, y, r), ("a", "y"))])
    _case(f"smooth_l1_{_red}", ("d", "y"), lambda x, y, r=_red: F.smooth_l1_loss(x, y, reduction=r, beta=0.5),
          "SmoothL1LossBackward0", [Step("z", lambda x, y, r=_red: _smooth_l1_def(x, y, 0.5, r), ("d", "y"))])
    _case(f"huber_{_red}", ("d", "y"), lambda x, y, r=_red: F.huber_loss(x, y, reduction=r, delta=0.5),
          "HuberLossBackward0", [Step("z", lambda x, y, r=_red: _huber_def(x, y, 0.5, r), ("d", "y"))])
    _case(f"bce_{_red}", ("p", "q"), lambda x, y, r=_red: F.binary_cross_entropy(x, y, reduction=r),
          "BinaryCrossEntropyBackward0", [Step("z", lambda x, y, r=_red: _bce_def(x, y, None, r), ("p", "q"))])
    _case(f"bce_logits_{_red}", ("a", "q"), lambda x, y, r=_red: F.binary_cross_entropy_with_logits(x, y, reduction=r),
          "BinaryCrossEntropyWithLogitsBackward0",
          [Step("z", lambda x, y, r=_red: _bce_logits_def(x, y, None, None, r), ("a", "q"))])
_case("smooth_l1_beta1", ("d", "y"), lambda x, y: F.smooth_l1_loss(x, y), "SmoothL1LossBackward0",
      [Step("z", lambda x, y: _smooth_l1_def(x, y, 1.0, "mean"), ("d", "y"))])
# a broadcast target (F.mse_loss expands both first: the expand is a step of its own)
_case("mse_broadcast_target", ("a", "yrow"), lambda x, y: F.mse_loss(x, y.expand(4, 5), reduction="sum"),
      "MseLossBackward0", [Step("ye", lambda y: y.expand(4, 5), ("yrow",)),
                           Step("z", lambda x, y: _mse_def(x, y, "sum"), ("a", "ye"))])
_case("bce_weight", ("p", "q"), lambda x, y: F.binary_cross_entropy(x, y, weight=_BW.to(x.dtype)),
      "BinaryCrossEntropyBackward0", [Step("z", lambda x, y: _bce_def(x, y, _BW, "mean"), ("p", "q"))])
_case("bce_logits_weight_pos_weight", ("a", "q"),
      lambda x, y: F.binary_cross_entropy_with_logits(x, y, weight=_BW[0].to(x.dtype), pos_weight=_PW.to(x.dtype)),
      "BinaryCrossEntropyWithLogitsBackward0", [Step("z", lambda x, y: _bce_logits_def(x, y, _BW[0], _PW, "mean"),
                                                     ("a", "q"))])
_case("bce_logits_pos_weight_none", ("a", "q"),
      lambda x, y: F.binary_cross_entropy_with_logits(x, y, pos_weight=_PW.to(x.dtype), reduction="none"),
      "BinaryCrossEntropyWithLogitsBackward0", [Step("z", lambda x, y: _bce_logits_def(x, y, None, _PW, "none"),
                                                     ("a", "q"))])
_case("bce_logits_weight_sum", ("a", "q"),
      lambda x, y: F.binary_cross_entropy_with_logits(x, y, weight=_BW.to(x.dtype), reduction="sum"),
      "BinaryCrossEntropyWithLogitsBackward0", [Step("z", lambda x, y: _bce_logits_def(x, y, _BW, None, "sum"),
                                                     ("a", "q"))])

# xlogy (kl_div records it) and xlog1py: ops, one step of the op itself
_case("xlogy", ("xl", "yl"), torch.xlogy, "XlogyBackward0")
_case("xlogy_scalar_other", ("xl",), lambda x: torch.xlogy(x, 2.5), "XlogyBackward2")
_case("xlogy_scalar_self", ("yl",), lambda y: torch.xlogy(1.5, y), "XlogyBackward1")
_case("xlogy_broadcast", ("xl", "yrow"), lambda x, y: torch.xlogy(x, y.abs() + 0.5), "XlogyBackward0",
      [Step("ye", lambda y: (y.abs() + 0.5), ("yrow",)), Step("yb", lambda y: y.expand(4, 5), ("ye",)),
       Step("z", torch.xlogy, ("xl", "yb"))])
_case("xlog1py", ("xl", "yl"), torch.special.xlog1py, "SpecialXlog1PyBackward0")
_case("xlog1py_scalar_self", ("yl",), lambda y: torch.special.xlog1py(1.5, y), "SpecialXlog1PyBackward1")
_case("xlog1py_scalar_other", ("xl",), lambda x: torch.special.xlog1py(x, 2.0), "SpecialXlog1PyBackward2")
# kl_div(input, target) = xlogy(t, t) − t·input, reduced (target requires grad too)
_case("kl_div_batchmean", ("a", "p"), lambda x, t: F.kl_div(x, t, reduction="batchmean"), "XlogyBackward0",
      [Step("tt", torch.xlogy, ("p", "p")), Step("ti", torch.mul, ("p", "a")), Step("e", torch.sub, ("tt", "ti")),
       Step("s", torch.sum, ("e",)), Step("z", lambda s: s / 4, ("s",))])

# soft margin: labels ±1 (torch has no derivative for the target)
_SM = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0]] * 2 + [[-1.0, -1.0, 1.0, -1.0, 1.0]] * 2, dtype=torch.float64)
_case("soft_margin_mean", ("a",), lambda x: F.soft_margin_loss(x, _SM.to(x.dtype)), "SoftMarginLossBackward0")
_case("soft_margin_sum", ("a",), lambda x: F.soft_margin_loss(x, _SM.to(x.dtype), reduction="sum"),
      "SoftMarginLossBackward0")
_case("soft_margin_none", ("a",), lambda x: F.soft_margin_loss(x, _SM.to(x.dtype), reduction="none"),
      "SoftMarginLossBackward0")
_case("sgn", ("xl",), torch.sgn, "SgnBackward0")
_case("erfinv", ("u",), torch.erfinv, "ErfinvBackward0")
_case("unsafe_split", ("a",), lambda x: torch.cat(torch.unsafe_split(x, 2, 1)[::-1], 1), "UnsafeSplitBackward0")
_case("unsafe_chunk", ("a",), lambda x: torch.unsafe_chunk(x, 2, 0)[1] * 2.0, "UnsafeSplitBackward0")
_case("unsafe_split_with_sizes", ("a",), lambda x: torch.cat(torch.unsafe_split_with_sizes(x, [1, 3, 1], 1)[::2], 1),
      "UnsafeSplitWithSizesBackward0")

for _p in (0.5, 1.0, 1.5, 2.0, 3.0, math.inf, -math.inf):
    _case(f"dist_p{_p:g}", ("da", "db"), lambda a, b, p=_p: torch.dist(a, b, p), "DistBackward0")
_case("dist_zero", ("da",), lambda a: torch.dist(a[0], a[0] * 1.0, 2.0), "DistBackward0",
      [Step("r", lambda a: a[0], ("da",)), Step("m", lambda r: r * 1.0, ("r",)),
       Step("z", lambda r, m: torch.dist(r, m, 2.0), ("r", "m"))])
_case("dist_broadcast_p3", ("da", "dbrow"), lambda a, b: torch.dist(a, b, 3.0), "DistBackward0",
      [Step("be", lambda b: b.expand(3, 4), ("dbrow",)), Step("z", lambda a, b: torch.dist(a, b, 3.0), ("da", "be"))])
_case("dist_broadcast_inf", ("da", "dbrow"), lambda a, b: torch.dist(a, b, math.inf), "DistBackward0",
      [Step("be", lambda b: b.expand(3, 4), ("dbrow",)),
       Step("z", lambda a, b: torch.dist(a, b, math.inf), ("da", "be"))])

_case("cross", ("ca", "cb"), lambda a, b: torch.linalg.cross(a, b), "LinalgCrossBackward0")
_case("cross_dim0", ("ca", "cb"), lambda a, b: torch.cross(a.t(), b.t(), dim=0), "LinalgCrossBackward0",
      [Step("z", lambda a, b: torch.linalg.cross(a.t(), b.t(), dim=0), ("ca", "cb"))])
_case("cross_broadcast", ("ca3", "cb"), lambda a, b: torch.linalg.cross(a, b[None]), "LinalgCrossBackward0",
      [Step("ae", lambda a: a.expand(2, 4, 3), ("ca3",)), Step("be", lambda b: b.expand(2, 4, 3), ("cb",)),
       Step("z", torch.linalg.cross, ("ae", "be"))])
_case("cross_self", ("ca",), lambda a: torch.linalg.cross(a, a.roll(1, 0)), "LinalgCrossBackward0",
      [Step("r", lambda a: a.roll(1, 0), ("ca",)), Step("z", torch.linalg.cross, ("ca", "r"))])

for _reduce_kind in ("sum", "mean", "prod", "amax", "amin"):
    for _incl in (True, False):
        _case(f"scatter_reduce_{_reduce_kind}_{'self' if _incl else 'noself'}", ("sx", "src"),
              lambda x, s, r=_reduce_kind, i=_incl: x.scatter_reduce(0, _SIDX, s, r, include_self=i),
              "ScatterReduceBackward0")
_case("scatter_reduce_amax_dim1", ("sx", "src"),
      lambda x, s: x.scatter_reduce(1, _SIDX[:3, :4] + 1, s[:3, :4] * 1.0, "amax"), "ScatterReduceBackward0")
# block_diag: 2-D, 1-D and 0-dim blocks, and one constant block (its size comes from the output's)
_case("block_diag", ("x2", "x1"), lambda a, b: torch.block_diag(a[:2, :3], b, b[0] * a[5, 0]),
      "BlockDiagBackward0")
_case("block_diag_constant_block", ("x2",), lambda a: torch.block_diag(a[:3], torch.ones(2, 1, dtype=a.dtype), a[3:]),
      "BlockDiagBackward0")
# index_reduce: source rows 0, 2, 3 into row 0 (a three-way tie with x at [0, 0] for amax, two zeros at
# [0, 3] and one at [0, 4] for prod), row 1 into row 2
_IRIDX = torch.tensor([0, 2, 0, 0])
for _reduce_kind in ("mean", "prod", "amax", "amin"):
    for _incl in (True, False):
        _case(f"index_reduce_{_reduce_kind}_{'self' if _incl else 'noself'}", ("sx", "src"),
              lambda x, s, r=_reduce_kind, i=_incl: x.index_reduce(0, _IRIDX, s, r, include_self=i),
              "IndexReduceBackward0")
_case("index_reduce_amax_dim1", ("sx", "src"),
      lambda x, s: x.index_reduce(1, torch.tensor([4, 0, 4, 1]), s[:3, :4] * 1.0, "amax"), "IndexReduceBackward0")
_case("index_reduce_prod_dim_neg1", ("sx", "src"),
      lambda x, s: x.index_reduce(-1, torch.tensor([4, 0, 4, 1]), s[:3, :4] * 1.0, "prod", include_self=False),
      "IndexReduceBackward0")


# ---- the checks ---------------------------------------------------------------------------------
def _weights(name):
    used, fn = CASES[name][:2]
    shape = fn(*[INPUTS[k] for k in used]).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _want(name, semiring):
    used, fn, steps, _ = CASES[name]
    w = _weights(name)
    steps = list(steps) if steps else [Step("z", fn, used)]
    steps.append(Step("out", lambda z: (z * w).sum(), ("z",)))
    return oracle(Program(name, {k: INPUTS[k] for k in used}, steps, engine=None), semiring)


def _walk(name, semiring, backend="torch", dtype=torch.float64, dev="cpu"):
    used, fn = CASES[name][:2]
    leaves = [INPUTS[k].to(dev, dtype).requires_grad_() for k in used]
    out = (fn(*leaves) * _weights(name).to(dev, dtype)).sum()
    got = semitriton.grad(out, leaves, semiring=semiring, backend=backend,
                          **({"fast_real": False} if semiring == "real" else {}))
    return used, leaves, out, got


@pytest.mark.parametrize("name", list(CASES))
def test_real_walk_equals_autograd(name):
    """The real semiring walked rule by rule (fast_real=False) is torch.autograd.grad."""
    used, leaves, out, got = _walk(name, "real")
    assert CASES[name][3] in node_types(out), f"{name} does not record {CASES[name][3]}"
    ref = torch.autograd.grad(out, leaves, allow_unused=True)
    for k, g, r in zip(used, got, ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-13, atol=1e-15,
                                   msg=f"{name}/{k}")


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12), ("triton", torch.float32, 2e-4)],
                         ids=["torch-f64", "triton-f32"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", list(CASES))
def test_against_the_oracle(name, semiring, backend, dtype, tol):
    if backend == "triton" and not triton_ok():
        pytest.skip("triton unavailable (or no GPU and TRITON_INTERPRET unset)")
    want = _want(name, semiring)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    used, _, _, got = _walk(name, semiring, backend, dtype, dev)
    for k, g in zip(used, got):
        assert_semiring_close(g, want[k], semiring, tol, f"{name}/{k}/{semiring}/{backend}")


def test_the_oracle_programs_compute_the_forward():
    """Each oracle program computes what the torch forward computes (so its
    steps are a definition of the same function)."""
    from oracle import run_steps
    for name, (used, fn, steps, _) in CASES.items():
        if not steps:
            continue
        env = run_steps(Program(name, {k: INPUTS[k] for k in used}, list(steps), engine=None))
        torch.testing.assert_close(env["z"], fn(*[INPUTS[k] for k in used]), rtol=1e-13, atol=1e-14, msg=name)


@pytest.mark.parametrize("kind", ["gru", "lstm_cell", "gru_cell"])
@pytest.mark.parametrize("semiring", ["real", "abs"])
def test_recurrent_modules_walk(kind, semiring):
    """nn.GRU, nn.LSTMCell and nn.GRUCell record unsafe_split; the real walk is
    autograd's gradient, abs bounds its magnitude."""
    torch.manual_seed(0)
    if kind == "gru":
        mod = nn.GRU(3, 4, batch_first=True).double()
        x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
        out = mod(x)[0].sum()
    elif kind == "lstm_cell":
        mod = nn.LSTMCell(3, 4).double()
        x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        h, c = mod(x)
        out = (h * 1.5 + c).sum()
    else:
        mod = nn.GRUCell(3, 4).double()
        x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
        out = mod(x).sum()
    assert "UnsafeSplitBackward0" in node_types(out)
    (ref,) = torch.autograd.grad(out, x, retain_graph=True)
    (got,) = semitriton.grad(out, x, semiring=semiring, **({"fast_real": False} if semiring == "real" else {}))
    if semiring == "real":
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-15)
    else:
        assert bool((got >= ref.abs() * (1 - 1e-12)).all())


def test_cross_entropy_of_a_classifier():
    """A tiny classifier trained with cross entropy: the loss walked to the
    inputs and to an intermediate activation in every semiring (finite), real
    equal to autograd."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    h = net[1](net[0](x))
    loss = F.cross_entropy(net[2](h), torch.tensor([0, 2, 1, 1, 0]), label_smoothing=0.0)
    ref = torch.autograd.grad(loss, (x, h), retain_graph=True)
    got = semitriton.grad(loss, (x, h), semiring="real", fast_real=False)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-13, atol=1e-15)
    for s in SEMIRINGS[1:]:
        for g in semitriton.grad(loss, (x, h), semiring=s):
            assert bool(torch.isfinite(g).all()), s


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_dist_of_order_zero_has_no_edges(semiring):
    """torch.dist(x, y, 0) counts the non-zero differences: piecewise constant,
    no edges (torch's own backward fails on it with an undefined gradient)."""
    a, b = (INPUTS[k].clone().requires_grad_() for k in ("da", "db"))
    out = torch.dist(a, b, 0) + (a * b).sum()
    (ga, gb) = semitriton.grad(out, (a, b), semiring=semiring, **({"fast_real": False} if semiring == "real" else {}))
    (wa, wb) = semitriton.grad((a * b).sum(), (a, b), semiring=semiring,
                               **({"fast_real": False} if semiring == "real" else {}))
    torch.testing.assert_close(ga, wa, rtol=0, atol=0)
    torch.testing.assert_close(gb, wb, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["cross_entropy", "bce_logits_weight_pos_weight", "cross", "dist_pinf",
                                  "scatter_reduce_amax_self", "xlogy"])
def test_top_paths_through_the_new_rules(name):
    """Top paths read the rules' Jacobian columns: the best path's product is
    the maxabs readout."""
    from semitriton.paths import top_paths
    used, leaves, out, _ = _walk(name, "real")
    (best,) = top_paths(out, leaves[0], k=1)
    (m,) = semitriton.grad(out, leaves[0], semiring="maxabs")
    torch.testing.assert_close(abs(best.product), float(m.max()), rtol=1e-9, atol=0)


@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", [n for n in CASES if len(CASES[n][0]) > 1])
def test_each_operand_alone_requiring_grad(name, semiring):
    """A cross product with a constant vector (only one operand requires
    grad, so torch saves only the other) reads what the oracle does."""
    used, fn = CASES[name][:2]
    check_each_operand_alone(name, fn, INPUTS, used, _weights(name), _want(name, semiring), semiring)
