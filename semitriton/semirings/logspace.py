"""The common part of the one-component log-space semirings (abs, maxabs):
value = log of a non-negative path quantity, ⊗ = +, edge(w) = log|w|,
zero = -inf (no path), readout = exp in float64."""

from __future__ import annotations

import torch

from ..dispatch import kernel_op
from ._util import NEG_INF, log_abs
from .base import Semiring, Value


class LogSpaceSemiring(Semiring):
    components = ("log_value",)

    def zero(self, shape, dtype, device) -> Value:
        return (torch.full(shape, NEG_INF, dtype=dtype, device=device),)

    def one(self, shape, dtype, device) -> Value:
        return (torch.zeros(shape, dtype=dtype, device=device),)

    def times(self, a, b):
        return (a[0] + b[0],)

    def is_zero(self, v):
        return v[0] == NEG_INF

    def edge(self, w):
        return (log_abs(w),)

    def readout(self, v):
        """exp of the log value, in float64: path sums of deep models span far
        beyond float32's range (log Z ≈ 171 on BERT-base, ≈ 350 on a 30-layer
        LLaMA)."""
        return torch.exp(v[0].double())

    def log_readout(self, v):
        return v[0]

    @kernel_op("scale")
    def scale(self, v, w):
        if not isinstance(w, torch.Tensor):
            w = torch.full((), float(w), dtype=v[0].dtype, device=v[0].device)
        return (v[0] + log_abs(w.to(v[0].dtype)),)
