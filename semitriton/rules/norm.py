"""Layer norm (one dense per-row Jacobian, not the mean/var sub-graph)."""

from __future__ import annotations

from ..semirings.base import layer_norm_rows
from . import rule


@rule("NativeLayerNormBackward0")
def layer_norm(ctx):
    out = [None] * ctx.n_inputs
    if not any(ctx.needs):
        return out
    x = ctx.saved("input")
    nshape = tuple(ctx.saved("normalized_shape"))
    mean, rstd = ctx.saved("result1"), ctx.saved("result2")
    weight = ctx.saved("weight")
    v = ctx.grad()
    if ctx.needs[0]:
        out[0] = ctx.sr.layer_norm_from_input(v, x, nshape, mean, rstd, weight)
    if ctx.n_inputs > 1 and ctx.needs[1]:        # y = x̂ γ + β: edge γ_j <- weight x̂_j
        xhat, _ = layer_norm_rows(x, nshape, mean, rstd)
        out[1] = ctx.sr.sum_to_shape(ctx.sr.scale(v, xhat.reshape(x.shape)), ctx.input_shape(1))
    if ctx.n_inputs > 2 and ctx.needs[2]:
        out[2] = ctx.sr.sum_to_shape(v, ctx.input_shape(2))
    return out
