"""The |w| path-sum semiring: Z = Σ_paths Π|w| ("gradient flow"), kept in log
space (value = log Z) so that 12- and 30-layer models neither overflow nor
underflow."""

from __future__ import annotations

import torch

from ..dispatch import kernel_op, rmatmul_via_matmul
from ._util import (complement, exclusive_sum, finite_amax, log_abs, log_matmul,
                    log_rmatmul, weight)
from .logspace import LogSpaceSemiring


class Abs(LogSpaceSemiring):
    """Value = log Z. ⊕ = logaddexp, ⊗ = +, edge(w) = log|w|, readout = Z."""

    name = "abs"
    components = ("log_z",)

    def plus(self, a, b):
        return (torch.logaddexp(a[0], b[0]),)

    def sum(self, v, dims, keepdim=False):
        return (torch.logsumexp(v[0], dims, keepdim=keepdim),)

    @kernel_op("matmul")
    def matmul(self, v, w):
        return (log_matmul(v[0], weight(w, "abs", v[0].dtype)),)

    @rmatmul_via_matmul
    def rmatmul(self, w, v):
        return (log_rmatmul(torch.abs(w.to(v[0].dtype)), v[0]),)

    def rowwise(self, jac, v):
        out = log_rmatmul(torch.abs(jac), v[0].unsqueeze(-1))
        return (out.squeeze(-1),)

    @kernel_op("softmax")
    def softmax(self, v, y, dim):
        """Z_i = y_i (Σ_{j≠i} y_j Z_j) + y_i (1 - y_i) Z_i (|J| of softmax)."""
        l = v[0]
        y = y.to(l.dtype)
        ly = torch.log(y)
        lt = l + ly                                   # log(y_j Z_j)
        m = finite_amax(lt, dim)
        excl = exclusive_sum(torch.exp(lt - m), dim)  # Σ_{j≠i} y_j Z_j / e^m
        off = ly + torch.log(excl) + m
        diag = ly + torch.log(complement(y, dim)) + l
        return (torch.logaddexp(off, diag),)

    @kernel_op("log_softmax")
    def log_softmax(self, v, p, dim):
        """Z_i = p_i Σ_{j≠i} Z_j + (1 - p_i) Z_i."""
        l = v[0]
        p = p.to(l.dtype)
        m = finite_amax(l, dim)
        off = torch.log(p) + torch.log(exclusive_sum(torch.exp(l - m), dim)) + m
        diag = torch.log(complement(p, dim)) + l
        return (torch.logaddexp(off, diag),)

    @kernel_op("layer_norm")
    def layer_norm(self, v, xhat, rstd, weight):
        """Z_i = r [ Σ_{j≠i} e_j |1 + x̂_i x̂_j| / n + e_i |1 − (1 + x̂_i²)/n| ],
        e_j = |γ_j| Z_j, in O(n log n) per row instead of the dense O(n²):
        with the row sorted by x̂, S(t) = Σ_j e_j |1 + x̂_j t| splits at the
        sign change x̂_j = −1/t into two prefix sums of e and e·x̂
        (searchsorted), and the off-diagonal part is S(x̂_i) − e_i (1 + x̂_i²).
        Computed in float64: the prefix sums and the removal of the own term
        cancel, with errors of order 1e-16 × the row total in float64."""
        l = v[0]
        n = xhat.shape[-1]
        f64 = torch.float64
        s = xhat.to(f64)
        lg = l.to(f64) if weight is None else l.to(f64) + log_abs(weight.to(f64))
        shift = finite_amax(lg, -1)
        e = torch.exp(lg - shift)
        s_sorted, order = torch.sort(s, dim=-1)
        e_sorted = torch.gather(e, -1, order)
        zero = torch.zeros_like(e_sorted[..., :1])
        cum_e = torch.cat([zero, e_sorted.cumsum(-1)], -1)                   # Σ_{m<k} e
        cum_es = torch.cat([zero, (e_sorted * s_sorted).cumsum(-1)], -1)     # Σ_{m<k} e x̂
        tot_e, tot_es = cum_e[..., -1:], cum_es[..., -1:]
        # 1 + x̂_j t ≥ 0  ⟺  x̂_j ≥ −1/t (t > 0) or x̂_j ≤ −1/t (t < 0); t = 0: every j
        tau = torch.where(s != 0, -1.0 / torch.where(s != 0, s, 1.0), float("-inf"))
        k = torch.searchsorted(s_sorted.contiguous(), tau.contiguous())
        below_e, below_es = cum_e.gather(-1, k), cum_es.gather(-1, k)
        above = (tot_e - below_e) + s * (tot_es - below_es)                  # Σ_{x̂_j ≥ −1/t} e (1 + x̂_j t)
        below = below_e + s * below_es
        S = torch.where(s >= 0, above - below, below - above)
        q = 1 + s * s
        total = (S - e * q).clamp_min(0) / n + e * (1 - q / n).abs()
        out = torch.log(total) + torch.log(rstd.to(f64)) + shift
        return (out.to(l.dtype),)

    @kernel_op("rms_norm")
    def rms_norm(self, v, xhat, rstd, weight, eps=None):
        """Z_i = |d_i| Z_i + |a_i| Σ_{j≠i} |b_j| Z_j (see Semiring.rms_factors)."""
        l = v[0]
        d, a, b = self.rms_factors(xhat, rstd, weight, l.dtype, eps)
        t = log_abs(b) + l
        m = finite_amax(t, -1)
        off = log_abs(a) + torch.log(exclusive_sum(torch.exp(t - m), -1)) + m
        return (torch.logaddexp(off, log_abs(d) + l),)
