"""Layer norm and torch's fused RMS norm: one dense per-row Jacobian each, not
the mean/var sub-graph."""

from __future__ import annotations

import math

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


@rule("FusedRmsNormBackward0")
def fused_rms_norm(ctx):
    """``F.rms_norm`` / ``nn.RMSNorm`` as torch records them on CUDA
    (``aten._fused_rms_norm``; on the CPU they are composite and walk op by
    op): y = γ ⊙ x̂, x̂ = x·r, r = (mean(x²) + eps)^-½ over the normalized dims,
    one primitive with the canonical Jacobian, as the patched RMS norm. The
    second output r (rarely used) has the edges ∂r/∂x_i = −x̂_i r²/n."""
    out = [None] * ctx.n_inputs
    if not any(ctx.needs):
        return out
    x = ctx.saved("input")
    nshape = tuple(ctx.saved("normalized_shape"))
    n = math.prod(nshape)
    lead = tuple(x.shape[: x.dim() - len(nshape)])
    rstd = ctx.saved("result1").to(ctx.dtype).reshape(*lead, 1)
    xhat = x.to(ctx.dtype).reshape(*lead, n) * rstd
    v_y, v_r = ctx.grads[0], ctx.grads[1] if len(ctx.grads) > 1 else None
    sr = ctx.sr
    if ctx.needs[0] and (v_y is not None or v_r is not None):
        parts = []
        if v_y is not None:
            weight = ctx.saved("weight")
            g = None if weight is None else weight.reshape(n)
            parts.append(sr.rms_norm(sr.map(v_y, lambda c: c.reshape(*lead, n)), xhat, rstd, g))
        if v_r is not None:
            parts.append(sr.scale(sr.map(v_r, lambda c: c.reshape(*lead, 1)), -xhat * (rstd * rstd / n)))
        val = parts[0] if len(parts) == 1 else sr.plus(*parts)
        out[0] = sr.map(val, lambda c: c.reshape(x.shape))
    if ctx.n_inputs > 1 and ctx.needs[1] and v_y is not None:      # y_j = γ_j x̂_j: edge γ_j <- x̂_j
        out[1] = sr.sum_to_shape(sr.scale(v_y, xhat.reshape(x.shape)), ctx.input_shape(1))
    return out
