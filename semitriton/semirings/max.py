"""The signed max-product semiring: (M+, M-), the largest and smallest signed
path products. M+ is the paper's "top gradient path" value."""

from __future__ import annotations

import torch

from ..dispatch import kernel_op, rmatmul_via_matmul
from ._util import NEG_INF, POS_INF, complement, exclusive_max, exclusive_min, signed_max_matmul, weight
from .base import Semiring, Value


class Max(Semiring):
    """Value = (M+, M-). ⊕ = (max, min); ⊗ by an edge w: (w M+, w M-), swapped
    when w < 0; zero = (-inf, +inf); readout = M+."""

    name = "max"
    components = ("m_pos", "m_neg")
    idempotent = True

    def zero(self, shape, dtype, device) -> Value:
        return (torch.full(shape, NEG_INF, dtype=dtype, device=device),
                torch.full(shape, POS_INF, dtype=dtype, device=device))

    def one(self, shape, dtype, device) -> Value:
        return (torch.ones(shape, dtype=dtype, device=device),
                torch.ones(shape, dtype=dtype, device=device))

    def plus(self, a, b):
        return (torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1]))

    def times(self, a, b):
        za = a[0] == NEG_INF
        zb = b[0] == NEG_INF
        c = torch.stack([a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]])
        c = torch.nan_to_num(c, nan=0.0, posinf=POS_INF, neginf=NEG_INF)
        p = torch.where(za | zb, NEG_INF, c.amax(0))
        n = torch.where(za | zb, POS_INF, c.amin(0))
        return (p, n)

    def is_zero(self, v):
        return v[0] == NEG_INF                 # no path: M+ = -inf (and M- = +inf)

    def edge(self, w):
        nz = w != 0
        return (torch.where(nz, w, NEG_INF), torch.where(nz, w, POS_INF))

    def readout(self, v):
        return v[0]

    def sum(self, v, dims, keepdim=False):
        return (torch.amax(v[0], dims, keepdim=keepdim), torch.amin(v[1], dims, keepdim=keepdim))

    @kernel_op("scale")
    def scale(self, v, w):
        p, n = v
        if not isinstance(w, torch.Tensor):
            w = torch.full((), float(w), dtype=p.dtype, device=p.device)
        w = w.to(p.dtype)
        pos, neg = w > 0, w < 0
        return (torch.where(pos, w * p, torch.where(neg, w * n, NEG_INF)),
                torch.where(pos, w * n, torch.where(neg, w * p, POS_INF)))

    @kernel_op("matmul")
    def matmul(self, v, w):
        return signed_max_matmul(v[0], v[1], w, w_t=weight(w, "same_t", v[0].dtype))

    @rmatmul_via_matmul
    def rmatmul(self, w, v):
        p, n = signed_max_matmul(v[0].transpose(-1, -2), v[1].transpose(-1, -2),
                                 w.to(v[0].dtype).transpose(-1, -2))
        return (p.transpose(-1, -2), n.transpose(-1, -2))

    def rowwise(self, jac, v):
        p, n = signed_max_matmul(v[0].unsqueeze(-2), v[1].unsqueeze(-2), jac.transpose(-1, -2))
        return (p.squeeze(-2), n.squeeze(-2))

    @kernel_op("softmax")
    def softmax(self, v, y, dim):
        """Diagonal edges y_i(1-y_i) ≥ 0, off-diagonal -y_i y_j ≤ 0:
        M+_i = max(d_i M+_i, y_i max_{j≠i} (-y_j M-_j)), M-_i likewise with min."""
        p, n = v
        y = y.to(p.dtype)
        live = y > 0
        cp = torch.where(live, -y * n, NEG_INF)      # -y_j M-_j (edge sign flips)
        cn = torch.where(live, -y * p, POS_INF)
        d = y * complement(y, dim)
        has_d = d > 0
        off_p = y * exclusive_max(cp, dim)
        off_n = y * exclusive_min(cn, dim)
        dp = torch.where(has_d, d * p, NEG_INF)
        dn = torch.where(has_d, d * n, POS_INF)
        out_p = torch.where(live, torch.maximum(off_p, dp), NEG_INF)
        out_n = torch.where(live, torch.minimum(off_n, dn), POS_INF)
        return (out_p, out_n)

    @kernel_op("log_softmax")
    def log_softmax(self, v, p, dim):
        """Diagonal edge 1 - p_i ≥ 0, off-diagonal -p_i ≤ 0."""
        mp, mn = v
        p = p.to(mp.dtype)
        live = p > 0
        d = complement(p, dim)
        has_d = d > 0
        off_p = torch.where(live, -p * exclusive_min(mn, dim), NEG_INF)
        off_n = torch.where(live, -p * exclusive_max(mp, dim), POS_INF)
        off_p = torch.nan_to_num(off_p, nan=NEG_INF, posinf=POS_INF, neginf=NEG_INF)
        off_n = torch.nan_to_num(off_n, nan=POS_INF, posinf=POS_INF, neginf=NEG_INF)
        dp = torch.where(has_d, d * mp, NEG_INF)
        dn = torch.where(has_d, d * mn, POS_INF)
        return (torch.maximum(off_p, dp), torch.minimum(off_n, dn))

    @kernel_op("rms_norm")
    def rms_norm(self, v, xhat, rstd, weight, eps=None):
        """Off-diagonal edges a_i b_j: with P_j = max(b_j M+_j, b_j M-_j) and
        N_j = min(...), M+_i gets a_i max_{j≠i} P_j (a_i > 0) or a_i min_{j≠i} N_j."""
        mp, mn = v
        d, a, b = self.rms_factors(xhat, rstd, weight, mp.dtype, eps)
        live = (mp != NEG_INF) & (b != 0)
        bp, bn = torch.where(live, b * mp, 0.0), torch.where(live, b * mn, 0.0)
        P = torch.where(live, torch.maximum(bp, bn), NEG_INF)
        N = torch.where(live, torch.minimum(bp, bn), POS_INF)
        hi, lo = exclusive_max(P, -1), exclusive_min(N, -1)
        has = (a != 0) & (hi != NEG_INF)
        off_p = torch.where(has, torch.where(a > 0, a * torch.where(has, hi, 0.0), a * torch.where(has, lo, 0.0)),
                            NEG_INF)
        off_n = torch.where(has, torch.where(a > 0, a * torch.where(has, lo, 0.0), a * torch.where(has, hi, 0.0)),
                            POS_INF)
        dp, dn = self.scale(v, d)
        return (torch.maximum(off_p, dp), torch.minimum(off_n, dn))
