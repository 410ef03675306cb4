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
        kw = {"enable_gqa": True} if gqa else {}
        if any(ctx.needs_input_grad[:3]):
            # keep SDPA's own graph for the ordinary backward (no recomputation)
            with torch.enable_grad():
                inner = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad)]
                out = F.scaled_dot_product_attention(*inner, attn_mask=mask, is_causal=causal, scale=scale, **kw)
            ctx.inner = (inner, out)
            out = out.detach()
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **kw)
        ctx.save_for_backward(q, k, v, mask)
        ctx.causal = bool(causal)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        inner, out = ctx.inner
        wanted = [t for t in inner if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out, retain_graph=True))
        gq, gk, gv = (next(grads) if t.requires_grad else None for t in inner)
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
