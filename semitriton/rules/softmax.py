"""Softmax and log-softmax: one canonical primitive each, with its exact
Jacobian (softmax: dy_j/dx_i = y_j(δ_ij - y_i); log-softmax: δ_ij - p_i)."""

from __future__ import annotations

import torch

from . import rule


@rule("SoftmaxBackward0", "SafeSoftmaxBackward0", "_SafeSoftmaxBackward0")
def softmax(ctx):
    if not ctx.needs[0]:
        return [None]
    y = ctx.saved("result")
    return [ctx.sr.softmax(ctx.grad(), y, ctx.saved("dim"))]


@rule("LogSoftmaxBackward0")
def log_softmax(ctx):
    if not ctx.needs[0]:
        return [None]
    p = torch.exp(ctx.saved("result"))
    return [ctx.sr.log_softmax(ctx.grad(), p, ctx.saved("dim"))]
