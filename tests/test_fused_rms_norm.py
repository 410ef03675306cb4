"""torch's fused RMS-norm node (``FusedRmsNormBackward0``: ``F.rms_norm`` and
``nn.RMSNorm`` on CUDA) is one primitive with the canonical Jacobian, against
the float64 oracle of a one-step program. The CPU records ``F.rms_norm`` as
its composite ops, so on the CPU the rule runs on a stand-in node holding
what torch's node saves (``input``, ``normalized_shape``, ``result1`` = r,
``weight``); the GPU test at the end checks the real node."""

import os

import pytest
import torch
import torch.nn.functional as F

import semitriton
from conftest import SEMIRINGS, assert_semiring_close
from oracle import Program, Step, oracle
from semitriton import backend as backend_mod
from semitriton.rules import RULES, RuleContext
from semitriton.semirings import get

EPS = 1e-5


class _Meta:
    def __init__(self, t):
        self.shape, self.device = t.shape, t.device


class _Leaf:
    def __init__(self, t):
        self._input_metadata = [_Meta(t)]


class FusedRmsNormBackward0:
    """Stand-in for torch's CUDA node: the attributes the rule reads."""

    def __init__(self, x, nshape, weight):
        n = 1
        for s in nshape:
            n *= s
        lead = x.shape[: x.dim() - len(nshape)]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))      # as torch: fp32 at least
        rstd = torch.rsqrt(xf.reshape(*lead, n).pow(2).mean(-1) + EPS).reshape(*lead, *[1] * len(nshape))
        self._saved_input, self._saved_normalized_shape = x, list(nshape)
        self._saved_result1, self._saved_weight = rstd, weight
        self._input_metadata = [_Meta(x), _Meta(rstd)]
        self.next_functions = ((_Leaf(x), 0), (_Leaf(weight) if weight is not None else None, 0))


def _inputs(nshape, zero_row):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, *nshape, generator=g, dtype=torch.float64)
    if zero_row:
        x[1, 2] = 0.0                                   # r = eps^-½, x̂ = 0: only the diagonal edges
    w = 1 + 0.3 * torch.randn(*nshape, generator=g, dtype=torch.float64)
    return x, w


def _rms(x, w, nshape):
    return F.rms_norm(x, nshape, w, EPS)


def _rstd(x, nshape):
    dims = tuple(range(x.dim() - len(nshape), x.dim()))
    return torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + EPS)


CASES = {
    "weighted": ((8,), True, False, False),
    "no_weight_two_dims": ((2, 4), False, False, False),
    "zero_row": ((8,), True, True, False),
    "rstd_output_used": ((8,), True, False, True),
}


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12), ("triton", torch.float32, 2e-4)],
                         ids=["torch-f64", "triton-f32"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_rms_norm_node_against_the_oracle(case, semiring, backend, dtype, tol):
    """Edges x_i -> y_j = γ_j r (δ_ij − x̂_i x̂_j / n), γ_j <- x̂_j, and (when
    the r output is used) x_i -> r = −x̂_i r² / n: the oracle takes F.rms_norm
    (and r) as one step each, its Jacobian's non-zero entries as the edges."""
    nshape, weighted, zero_row, use_r = CASES[case]
    if backend == "triton" and not (backend_mod.triton_available() and backend_mod.interpreting()):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    x, w = _inputs(nshape, zero_row)
    g = torch.Generator().manual_seed(4)
    wy = torch.randn(2, 3, *nshape, generator=g, dtype=torch.float64)
    wr = torch.randn(2, 3, *[1] * len(nshape), generator=g, dtype=torch.float64)
    inputs = {"x": x, "w": w} if weighted else {"x": x}
    steps = [Step("y", (lambda x, w: _rms(x, w, nshape)) if weighted else (lambda x: _rms(x, None, nshape)),
                  tuple(inputs))]
    if use_r:
        steps += [Step("r", lambda x: _rstd(x, nshape), ("x",)),
                  Step("out", lambda y, r: (y * wy).sum() + (r * wr).sum(), ("y", "r"))]
    else:
        steps += [Step("out", lambda y: (y * wy).sum(), ("y",))]
    want = oracle(Program(case, inputs, steps, engine=None), semiring)

    sr = get(semiring)
    xt, wt = x.to(dtype), (w.to(dtype) if weighted else None)
    node = FusedRmsNormBackward0(xt, nshape, wt)
    grads = [sr.edge(wy.to(dtype)), sr.edge(wr.to(dtype)) if use_r else None]
    needs = [True, True] if weighted else [True, False]
    ctx = RuleContext(node, grads, needs, sr, dtype)
    with backend_mod.use(backend), backend_mod.pass_settings():
        got = RULES["FusedRmsNormBackward0"](ctx)
    assert_semiring_close(sr.readout(got[0]), want["x"], semiring, tol, f"{case}/x/{semiring}/{backend}")
    if weighted:
        assert_semiring_close(sr.readout(got[1]), want["w"], semiring, tol, f"{case}/w/{semiring}/{backend}")


CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_unpatched_nn_rmsnorm_on_cuda_equals_the_patched_one(semiring):
    """On CUDA nn.RMSNorm records FusedRmsNormBackward0: walked unpatched it
    gives the statistics of the patched (canonical) RMS norm."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.RMSNorm(32, eps=EPS),
                              torch.nn.Linear(32, 4)).cuda()
    x = torch.randn(3, 5, 16, device="cuda", requires_grad=True)
    y = net(x)
    names = set()
    stack = [y.grad_fn]
    while stack:
        n = stack.pop()
        if n is not None and type(n).__name__ not in names:
            names.add(type(n).__name__)
            stack.extend(f for f, _ in n.next_functions)
    if "FusedRmsNormBackward0" not in names:
        pytest.skip(f"this torch does not record the fused RMS-norm node on CUDA ({sorted(names)})")
    kw = {"fast_real": False} if semiring == "real" else {}
    (a,) = semitriton.grad(y[..., 1].sum(), x, semiring=semiring, **kw)
    semitriton.patch(net)
    y2 = net(x)
    (b,) = semitriton.grad(y2[..., 1].sum(), x, semiring=semiring, **kw)
    assert_semiring_close(a.double().cpu(), b.double().cpu().numpy(), semiring, 1e-4, semiring)
