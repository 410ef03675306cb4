"""Scaled dot-product attention: one canonical composite primitive,
S = q kᵀ·scale (+ mask) -> P = softmax(S) -> O = P v, whichever SDPA backend
(CPU flash, CUDA flash / memory-efficient / cuDNN) recorded the node. Eager
attention built from matmul/softmax/matmul gives the same statistics."""

from __future__ import annotations

import math

import torch

from ..errors import UnsupportedNodeError
from . import rule

SDPA_NODES = (
    "ScaledDotProductFlashAttentionForCpuBackward0",
    "ScaledDotProductFlashAttentionBackward0",
    "ScaledDotProductEfficientAttentionBackward0",
    "ScaledDotProductCudnnAttentionBackward0",
    "ScaledDotProductFusedAttentionOverrideableBackward0",
)


def sdpa_bias(mask, tq: int, tk: int, dtype):
    """SDPA's attn_mask/attn_bias as an additive bias (-inf where masked)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    else:
        mask = mask.to(dtype)
    if mask.shape[-1] > tk or (mask.dim() >= 2 and mask.shape[-2] > tq):
        mask = mask[..., :tq, :tk]          # memory-efficient attention pads its bias
    return mask


@rule(*SDPA_NODES)
def sdpa(ctx):
    out = [None] * ctx.n_inputs
    needs = tuple(ctx.needs[:3])
    if ctx.n_inputs > 3 and ctx.needs[3]:
        raise UnsupportedNodeError(
            f"{ctx.name}: the attention mask/bias requires grad and has a path to the inputs; "
            "semitriton has no rule for values of an attention mask (detach it)")
    if not any(needs):
        return out
    p_drop = ctx.saved("dropout_p") if ctx.has_saved("dropout_p") else 0.0
    if p_drop:
        raise UnsupportedNodeError(
            f"{ctx.name}: attention dropout is active (dropout_p={p_drop}); put the model in "
            "eval() mode, dropout edges are not recoverable from the fused kernel")
    q, k, v = (ctx.saved(n, cast=False) for n in ("query", "key", "value"))
    scale = ctx.saved("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    mask = None
    for name in ("attn_mask", "attn_bias"):
        if ctx.has_saved(name):
            mask = ctx.saved(name)
            break
    bias = sdpa_bias(mask, q.shape[-2], k.shape[-2], ctx.dtype)
    causal = bool(ctx.saved("is_causal"))
    vq, vk, vv = ctx.sr.attention(ctx.grad(), q, k, v, bias, causal, scale, needs)
    out[0], out[1], out[2] = vq, vk, vv
    return out
