"""The expectation (entropy) semiring over p(path) ∝ Π|w|.

The pair <z, e> of the README's semiring table (edge -> <|w|, -|w| log|w|>, ⊕ componentwise +,
⊗ <z1 z2, z1 e2 + z2 e1>) is stored as (log z, μ = e/z): μ is the mean of
-log Π|w| under the path distribution, so it stays O(depth) while z may span
hundreds of orders of magnitude. In this form

    edge ⊗:  (l, μ) -> (l + log|w|, μ - log|w|)
    ⊗:       (l1 + l2, μ1 + μ2)
    ⊕:       (logaddexp(l1, l2), softmax-weighted mean of μ1, μ2)
    H = e/z + log z = μ + l.
"""

from __future__ import annotations

import torch

from ..dispatch import kernel_op, rmatmul_via_matmul
from ._util import (NEG_INF, complement, exclusive_sum, exclusive_sum_signed, finite_amax, finite_or_zero,
                    log_abs, safe_div, weight, xlogx)
from .base import Semiring, Value


def _clean(l, mu):
    """The zero is (-inf, 0): keep μ finite where there is no path."""
    return l, torch.where(l == NEG_INF, torch.zeros_like(mu), mu)


class Entropy(Semiring):
    """Value = (log z, μ). Readout H = μ + log z (nats); 0 where no path."""

    name = "entropy"
    components = ("log_z", "mean_neg_log_w")

    def zero(self, shape, dtype, device) -> Value:
        return (torch.full(shape, NEG_INF, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device))

    def one(self, shape, dtype, device) -> Value:
        return (torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device))

    @kernel_op("plus")
    def plus(self, a, b):
        # where l = -inf both weights are exp(-inf) = 0 and μ (0 there, finite
        # everywhere: every rule's output is clean) gives μ = 0 without a mask
        l = torch.logaddexp(a[0], b[0])
        shift = finite_or_zero(l)
        return l, torch.exp(a[0] - shift) * a[1] + torch.exp(b[0] - shift) * b[1]

    def times(self, a, b):
        return _clean(a[0] + b[0], a[1] + b[1])

    def is_zero(self, v):
        return v[0] == NEG_INF                 # μ is 0 wherever log z = -inf

    def edge(self, w):
        lw = log_abs(w)
        return _clean(lw, -lw)

    def readout(self, v):
        """H = μ + log z (0 without a path), at least 0: at |log z| of a few
        hundred the sum of two large terms of opposite sign leaves ~1e-5 of
        rounding, which must not read as a negative entropy."""
        return torch.where(v[0] == NEG_INF, torch.zeros_like(v[1]), (v[1] + v[0]).clamp_min(0.0))

    def log_z(self, v):
        return v[0]

    def sum(self, v, dims, keepdim=False):
        l, mu = v
        L = torch.logsumexp(l, dims, keepdim=True)
        shift = torch.where(L == NEG_INF, torch.zeros_like(L), L)
        wmu = (torch.exp(l - shift) * mu).sum(dims, keepdim=True)
        if not keepdim:
            L = L.squeeze(dims) if isinstance(dims, int) else L.squeeze(tuple(dims))
            wmu = wmu.squeeze(dims) if isinstance(dims, int) else wmu.squeeze(tuple(dims))
        return _clean(L, wmu)

    @kernel_op("scale")
    def scale(self, v, w):
        if not isinstance(w, torch.Tensor):
            w = torch.full((), float(w), dtype=v[0].dtype, device=v[0].device)
        lw = log_abs(w.to(v[0].dtype))
        l = v[0] + lw
        return _clean(l, torch.where(l == NEG_INF, 0.0, v[1] - lw))

    # z = Σ_j |w| z_j ;  z μ = Σ_j |w| z_j μ_j - Σ_j |w| log|w| z_j
    def _contract(self, v, a_abs, a_xlogx, matmul, shift_dim):
        l, mu = v
        m = finite_amax(l, shift_dim)
        a = torch.exp(l - m)
        z = matmul(a, a_abs)
        s = matmul(a * mu, a_abs) - matmul(a, a_xlogx)
        return z, s, m

    @kernel_op("matmul")
    def matmul(self, v, w):
        dt = v[0].dtype
        A, B = weight(w, "abs", dt), weight(w, "xlogx", dt)
        z, s, m = self._contract(v, A, B, lambda x, y: torch.matmul(x, y), -1)
        return _clean(torch.log(z) + m, safe_div(s, z))

    @rmatmul_via_matmul
    def rmatmul(self, w, v):
        w = w.to(v[0].dtype)
        A = torch.abs(w)
        z, s, m = self._contract(v, A, xlogx(A), lambda x, y: torch.matmul(y, x), -2)
        return _clean(torch.log(z) + m, safe_div(s, z))

    def rowwise(self, jac, v):
        A = torch.abs(jac)
        vv = (v[0].unsqueeze(-1), v[1].unsqueeze(-1))
        z, s, m = self._contract(vv, A, xlogx(A), lambda x, y: torch.matmul(y, x), -2)
        return _clean((torch.log(z) + m).squeeze(-1), safe_div(s, z).squeeze(-1))

    @kernel_op("softmax")
    def softmax(self, v, y, dim):
        """Off-diagonal |w| = y_i y_j, diagonal d_i = y_i (1 - y_i):
        z_i = y_i B_i + d_i z_i,  with B_i = Σ_{j≠i} y_j z_j, and
        z_i μ_i = y_i (A_i - log y_i · B_i) + d_i z_i (μ_i - log d_i),
        with A_i = Σ_{j≠i} y_j z_j (μ_j - log y_j)."""
        l, mu = v
        y = y.to(l.dtype)
        ly = torch.log(y)
        lt = l + ly
        m = finite_amax(lt, dim)
        t = torch.exp(lt - m)                                     # y_j z_j / e^m
        ly0 = torch.where(y > 0, ly, torch.zeros_like(ly))        # log y, 0 where y = 0
        B = exclusive_sum(t, dim)
        A = exclusive_sum_signed(t * (mu - ly0), t, dim)
        l_off = ly + torch.log(B) + m
        mu_off = safe_div(A, B) - ly0
        ld = ly + torch.log(complement(y, dim))
        l_diag = ld + l
        mu_diag = mu - finite_or_zero(ld)
        L = torch.logaddexp(l_off, l_diag)
        shift = torch.where(L == NEG_INF, torch.zeros_like(L), L)
        w_off = torch.exp(l_off - shift)
        w_diag = torch.exp(l_diag - shift)
        return _clean(L, w_off * mu_off + w_diag * mu_diag)

    @kernel_op("log_softmax")
    def log_softmax(self, v, p, dim):
        """Off-diagonal |w| = p_i, diagonal 1 - p_i."""
        l, mu = v
        p = p.to(l.dtype)
        m = finite_amax(l, dim)
        a = torch.exp(l - m)
        B = exclusive_sum(a, dim)
        A = exclusive_sum_signed(a * mu, a, dim)
        lp = torch.log(p)
        l_off = lp + torch.log(B) + m
        mu_off = safe_div(A, B) - torch.where(p > 0, lp, torch.zeros_like(lp))
        ld = torch.log(complement(p, dim))
        l_diag = ld + l
        mu_diag = mu - finite_or_zero(ld)
        L = torch.logaddexp(l_off, l_diag)
        shift = torch.where(L == NEG_INF, torch.zeros_like(L), L)
        return _clean(L, torch.exp(l_off - shift) * mu_off + torch.exp(l_diag - shift) * mu_diag)

    @kernel_op("rms_norm")
    def rms_norm(self, v, xhat, rstd, weight, eps=None):
        """Off-diagonal |w| = |a_i||b_j|, diagonal |d_i| (Semiring.rms_factors):
        z_i = |a_i| B_i + |d_i| z_i, B_i = Σ_{j≠i} |b_j| z_j;
        z_i μ_i = |a_i| (A_i - log|a_i| B_i) + |d_i| z_i (μ_i - log|d_i|),
        A_i = Σ_{j≠i} |b_j| z_j (μ_j - log|b_j|)."""
        l, mu = v
        d, a, b = self.rms_factors(xhat, rstd, weight, l.dtype, eps)
        lb, la, ld = log_abs(b), log_abs(a), log_abs(d)
        t_log = l + lb
        m = finite_amax(t_log, -1)
        t = torch.exp(t_log - m)
        lb0 = finite_or_zero(lb)
        la0 = finite_or_zero(la)
        ld0 = finite_or_zero(ld)
        B = exclusive_sum(t, -1)
        A = exclusive_sum_signed(t * (mu - lb0), t, -1)
        l_off = la + torch.log(B) + m
        mu_off = safe_div(A, B) - la0
        l_diag = ld + l
        mu_diag = mu - ld0
        L = torch.logaddexp(l_off, l_diag)
        shift = torch.where(L == NEG_INF, torch.zeros_like(L), L)
        return _clean(L, torch.exp(l_off - shift) * mu_off + torch.exp(l_diag - shift) * mu_diag)
