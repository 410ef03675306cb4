"""The |w| path-sum semiring: Z = Σ_paths Π|w| ("gradient flow"), kept in log
space (value = log Z) so that 12- and 30-layer models neither overflow nor
underflow."""

from __future__ import annotations

import torch

from ..dispatch import kernel_op, rmatmul_via_matmul
from ._util import (exclusive_sum, finite_amax, log_abs, log_matmul,
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
        diag = ly + torch.log1p(-y) + l
        return (torch.logaddexp(off, diag),)

    @kernel_op("log_softmax")
    def log_softmax(self, v, p, dim):
        """Z_i = p_i Σ_{j≠i} Z_j + (1 - p_i) Z_i."""
        l = v[0]
        p = p.to(l.dtype)
        m = finite_amax(l, dim)
        off = torch.log(p) + torch.log(exclusive_sum(torch.exp(l - m), dim)) + m
        diag = torch.log1p(-p) + l
        return (torch.logaddexp(off, diag),)

    @kernel_op("rms_norm")
    def rms_norm(self, v, xhat, rstd, weight):
        """Z_i = |d_i| Z_i + |a_i| Σ_{j≠i} |b_j| Z_j (see Semiring.rms_factors)."""
        l = v[0]
        d, a, b = self.rms_factors(xhat, rstd, weight, l.dtype)
        t = log_abs(b) + l
        m = finite_amax(t, -1)
        off = log_abs(a) + torch.log(exclusive_sum(torch.exp(t - m), -1)) + m
        return (torch.logaddexp(off, log_abs(d) + l),)
