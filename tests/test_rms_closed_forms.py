"""The closed forms of the norm rules equal the dense per-row Jacobian
contraction (the generic definition): O(n) RMS norm for every built-in
semiring, and the O(n log n) sorted layer norm of the abs semiring."""

import pytest
import torch

from conftest import SEMIRINGS, assert_semiring_close
from semitriton.semirings import BUILTIN, Semiring


def _value(sr, shape, g, dead):
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if sr.name == "real":
        v = (x,)
    elif sr.name in ("abs", "maxabs"):
        v = (x,)
    elif sr.name == "max":
        y = torch.randn(*shape, generator=g, dtype=torch.float64)
        v = (torch.maximum(x, y), torch.minimum(x, y))
    else:
        v = (x, torch.randn(*shape, generator=g, dtype=torch.float64))
    z = sr.zero(shape, torch.float64, "cpu")
    return tuple(torch.where(dead, zc, c) for c, zc in zip(v, z))


@pytest.mark.parametrize("zeros", [0.0, 0.3])
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_rms_closed_form_equals_dense(semiring, zeros):
    sr = BUILTIN[semiring]
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 7)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x[0, 0, 2] = 0.0
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    xhat = x * rstd
    w = torch.randn(7, generator=g, dtype=torch.float64)
    w = w * (torch.rand(7, generator=g, dtype=torch.float64) >= zeros)
    dead = torch.rand(*shape, generator=g) < 0.2
    dead[1, 2] = True                                    # a whole row without paths
    v = _value(sr, shape, g, dead)
    for weight in (w, None):
        fast = sr.rms_norm(v, xhat, rstd, weight)
        dense = Semiring._norm(sr, v, xhat, rstd, weight, centered=False)
        mode = "real" if semiring in ("real", "entropy") else "abs"   # normwise vs elementwise
        for a, b in zip(fast, dense):
            assert_semiring_close(a, b, mode, 1e-10, semiring)


def _layer_norm_rows(g, shape):
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x[0, 1] = x[0, 2] = x[0, 3]                           # ties in x̂
    x[1, :] = torch.arange(shape[-1], dtype=torch.float64)  # evenly spaced: pairs near 1 + x̂_i x̂_j = 0
    x[2, 0] = 50.0                                        # one element carries the variance
    mean = x.mean(-1, keepdim=True)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    xhat = (x - mean) * rstd
    xhat[3, 4] = 0.0                                      # x̂ exactly 0: every off-diagonal term is e_j
    return xhat, rstd


@pytest.mark.parametrize("n", [1, 2, 3, 9, 200])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_abs_layer_norm_sorted_closed_form_equals_dense(n, dtype):
    sr = BUILTIN["abs"]
    g = torch.Generator().manual_seed(n)
    shape = (6, n)
    if n >= 5:
        xhat, rstd = _layer_norm_rows(g, shape)
    else:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        xhat = (x - x.mean(-1, keepdim=True)) * rstd
    w = torch.randn(n, generator=g, dtype=torch.float64)
    w[:: 3] = 0.0
    l = 4 * torch.randn(*shape, generator=g, dtype=torch.float64)
    l[torch.rand(*shape, generator=g) < 0.2] = float("-inf")
    l[4] = float("-inf")                                  # a row without paths
    l[5, 0] = 80.0                                        # one term dominates its row
    for weight in (w, None):
        args = ((l.to(dtype),), xhat.to(dtype), rstd.to(dtype), None if weight is None else weight.to(dtype))
        got = sr.layer_norm(*args)
        # dense, in float64, on the same (rounded) inputs: x̂ = ±1 rows (n = 2) make
        # 1 + x̂_i x̂_j ill-conditioned in x̂ itself, whatever computes the rule
        args64 = ((args[0][0].double(),),) + tuple(None if t is None else t.double() for t in args[1:])
        want = Semiring.layer_norm(sr, *args64)
        a, b = got[0].double(), want[0]
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        fin = torch.isfinite(b)
        if not fin.any():
            continue
        err = ((a - b).abs()[fin] / b.abs()[fin].clamp_min(1.0)).max().item()
        assert err <= (1e-12 if dtype == torch.float64 else 1e-6), (n, dtype, weight is None, err)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("semiring", ["abs", "maxabs", "max", "entropy"])
def test_rms_norm_with_a_dominant_element_in_float32(semiring, backend):
    """A row where one element carries nearly all of Σx² (a massive
    activation: x = 30 among entries of 1e-2): the diagonal edge
    γ r (1 − x̂_i²/n) cancels in float32 (5% off when formed as written);
    the patched norm, which knows eps, forms it as (Σ_{j≠i} x̂_j² + n·eps·r²)/n.
    Against the float64 oracle of F.rms_norm as one step; the dominant
    element's own output is scored alone in row 0, so its diagonal edge is
    the whole value there."""
    import torch.nn.functional as F

    import semitriton
    from oracle import Program, Step, oracle
    from semitriton import backend as backend_mod
    if backend == "triton" and not (backend_mod.triton_available() and backend_mod.interpreting()):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    eps = 1e-5
    x = torch.tensor([[30.0, 1e-2, -2e-2, 5e-3], [0.5, -0.25, 1.0, 0.75], [0.0, 3e-3, 0.0, 0.0]],
                     dtype=torch.float64)
    w = torch.tensor([1.2, 0.8, -1.1, 0.9], dtype=torch.float64)
    ws = torch.zeros(3, 4, dtype=torch.float64)
    ws[0, 0], ws[2, 1] = 1.0, 1.0
    ws[1] = torch.tensor([0.3, -1.0, 2.0, 0.5])
    steps = [Step("y", lambda x: F.rms_norm(x, (4,), w, eps), ("x",)), Step("out", lambda y: (y * ws).sum(), ("y",))]
    want = oracle(Program("dominant", {"x": x}, steps, engine=None), semiring)["x"]
    model = torch.nn.Sequential(torch.nn.RMSNorm(4, eps=eps))
    model[0].weight.data = w.float()
    semitriton.patch(model)
    xl = x.float().requires_grad_()
    (got,) = semitriton.grad((model(xl) * ws.float()).sum(), xl, semiring=semiring, backend=backend)
    assert_semiring_close(got, want, semiring, 1e-4, f"{semiring}/{backend}")
