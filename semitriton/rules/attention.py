"""Scaled dot-product attention: one canonical composite primitive,
S = q kᵀ·scale (+ mask) -> P = softmax(S) -> O = P v, whichever SDPA backend
(CPU flash, CUDA flash / memory-efficient / cuDNN) recorded the node. Eager
attention built from matmul/softmax/matmul gives the same statistics."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

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


class AttentionArgs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: Optional[torch.Tensor]
    causal: bool
    scale: float


def is_attention_node(node) -> bool:
    name = type(node).__name__
    return name in SDPA_NODES or (name == "FusedAttentionBackward" and hasattr(node, "causal"))


def attention_args(node, dtype) -> AttentionArgs:
    """q, k, v (as saved), additive bias (-inf where masked), causal flag and scale
    of an SDPA node or a fused attention node."""
    from ..fused._saved import saved_tensors
    name = type(node).__name__
    if name in SDPA_NODES:
        try:
            q, k, v = node._saved_query, node._saved_key, node._saved_value
            mask = None
            for attr in ("_saved_attn_mask", "_saved_attn_bias"):
                if hasattr(node, attr):
                    mask = getattr(node, attr)
                    break
            scale, causal = node._saved_scale, bool(node._saved_is_causal)
        except RuntimeError as exc:
            from . import _freed
            raise _freed(node, exc) from exc
    else:
        q, k, v, mask = saved_tensors(node)
        scale, causal = node.scale, node.causal
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return AttentionArgs(q, k, v, sdpa_bias(mask, q.shape[-2], k.shape[-2], dtype), causal, float(scale))


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
    a = attention_args(ctx.node, ctx.dtype)
    vq, vk, vv = ctx.sr.attention(ctx.grad(), a.q, a.k, a.v, a.bias, a.causal, a.scale, needs)
    out[0], out[1], out[2] = vq, vk, vv
    return out
