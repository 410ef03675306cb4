"""Attention as one fused node: O = softmax(q kᵀ·scale + mask) v.

The forward is ``F.scaled_dot_product_attention`` (grouped-query attention
without materialising repeated k/v); the semiring rule is
``Semiring.attention``, which the Triton backend replaces with a fused
flash-style kernel that recomputes P blockwise."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..rules.attention import attention_args
from ._saved import pad


class FusedAttention(torch.autograd.Function):
    """q [B, H, Tq, D]; k, v [B, Hk, Tk, D] (Hk | H); mask: bool (True = attend) or
    additive float, broadcastable to [B, H, Tq, Tk]; causal: top-left tril."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal: bool, scale: Optional[float]):
        gqa = q.shape[-3] != k.shape[-3]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                             **({"enable_gqa": True} if gqa else {}))
        ctx.save_for_backward(q, k, v, mask)
        ctx.causal = bool(causal)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask = ctx.saved_tensors
        gqa = q.shape[-3] != k.shape[-3]
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=ctx.causal,
                                                 scale=ctx.scale, **({"enable_gqa": True} if gqa else {}))
            gq, gk, gv = torch.autograd.grad(out, (qq, kk, vv), grad_out)
        return gq, gk, gv, None, None, None

    @staticmethod
    def semiring_backward(rc):
        a = attention_args(rc.node, rc.dtype)
        needs = tuple(rc.needs[:3])
        vq, vk, vv = rc.sr.attention(rc.grad(0), a.q, a.k, a.v, a.bias, a.causal, a.scale, needs)
        return pad([vq, vk, vv], len(rc.needs))


def fused_attention(q, k, v, mask=None, causal: bool = False, scale: Optional[float] = None):
    """Scaled dot-product attention recorded as one canonical semiring node."""
    return FusedAttention.apply(q, k, v, mask, causal, scale)
