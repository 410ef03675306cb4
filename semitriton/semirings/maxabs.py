"""The max-|product| semiring: the largest |path product| (tropical, log space)."""

from __future__ import annotations

import torch

from ..dispatch import kernel_op, rmatmul_via_matmul
from ._util import complement, exclusive_max, log_abs, tropical_matmul, weight
from .logspace import LogSpaceSemiring


class MaxAbs(LogSpaceSemiring):
    """Value = log max_paths Π|w|. ⊕ = max, ⊗ = +, edge(w) = log|w|,
    readout = the largest |path product|."""

    name = "maxabs"
    components = ("log_m",)
    idempotent = True

    def plus(self, a, b):
        return (torch.maximum(a[0], b[0]),)

    def sum(self, v, dims, keepdim=False):
        return (torch.amax(v[0], dims, keepdim=keepdim),)

    @kernel_op("matmul")
    def matmul(self, v, w):
        dt = v[0].dtype
        return (tropical_matmul(v[0], w, lw_t=weight(w, "log_abs_t", dt)),)

    @rmatmul_via_matmul
    def rmatmul(self, w, v):
        out = tropical_matmul(v[0].transpose(-1, -2), log_abs(w.to(v[0].dtype)).transpose(-1, -2))
        return (out.transpose(-1, -2),)

    def rowwise(self, jac, v):
        return (torch.amax(log_abs(jac) + v[0].unsqueeze(-2), dim=-1),)

    @kernel_op("softmax")
    def softmax(self, v, y, dim):
        """m_i = max(y_i (1-y_i) m_i, y_i max_{j≠i} y_j m_j): a row top-2."""
        l = v[0]
        y = y.to(l.dtype)
        ly = torch.log(y)
        off = ly + exclusive_max(ly + l, dim)
        diag = ly + torch.log(complement(y, dim)) + l
        return (torch.maximum(off, diag),)

    @kernel_op("log_softmax")
    def log_softmax(self, v, p, dim):
        """m_i = max(p_i max_{j≠i} m_j, (1 - p_i) m_i)."""
        l = v[0]
        p = p.to(l.dtype)
        return (torch.maximum(torch.log(p) + exclusive_max(l, dim), torch.log(complement(p, dim)) + l),)

    @kernel_op("rms_norm")
    def rms_norm(self, v, xhat, rstd, weight, eps=None):
        """m_i = max(|d_i| m_i, |a_i| max_{j≠i} |b_j| m_j): a row top-2."""
        l = v[0]
        d, a, b = self.rms_factors(xhat, rstd, weight, l.dtype, eps)
        off = log_abs(a) + exclusive_max(log_abs(b) + l, -1)
        return (torch.maximum(off, log_abs(d) + l),)
