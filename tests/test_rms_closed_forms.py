"""The O(n) closed forms of the RMS-norm rule equal the dense per-row
Jacobian contraction (the generic definition) for every built-in semiring."""

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
