"""Attention as one fused node: O = softmax(q kᵀ·scale + mask) v.

The forward is ``F.scaled_dot_product_attention`` (grouped-query attention
through ``enable_gqa``, or with k/v repeated to q's heads where CUDA would
otherwise fall back to its math kernel); the semiring rule is
``Semiring.attention``, which the Triton backend replaces with a fused
flash-style kernel that recomputes P blockwise."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..rules.attention import attention_args
from ._saved import pad


def gqa_falls_back_to_math(q, mask) -> bool:
    """Would CUDA's SDPA run grouped-query attention (``enable_gqa``) in its
    math kernel, which stores the T×T probabilities for the backward? Its
    flash and cuDNN kernels take fp16/bf16 only and no attention mask, and the
    memory-efficient kernel (fp32 included) needs as many k/v heads as q heads
    (torch's sdp_utils: ``check_batch_size_and_num_heads_dense<false>``)."""
    return q.is_cuda and (q.dtype == torch.float32 or mask is not None)


def _repeat_heads(t, group: int):
    """[..., Hk, T, D] -> [..., Hk·group, T, D], k/v head h // group for q head h
    (what ``enable_gqa`` and transformers' repeat_kv mean)."""
    shape = t.shape
    return t.unsqueeze(-3).expand(*shape[:-2], group, *shape[-2:]).reshape(*shape[:-3], shape[-3] * group,
                                                                          *shape[-2:])


def sdpa(q, k, v, mask, causal: bool, scale: Optional[float]):
    """``F.scaled_dot_product_attention`` with grouped-query attention: through
    ``enable_gqa``, or, where that would fall back to the math kernel
    (:func:`gqa_falls_back_to_math`), with k and v repeated to q's heads so that
    the memory-efficient kernel runs (same values; the repeat's backward sums
    over each group)."""
    H, Hk = q.shape[-3], k.shape[-3]
    kw = {}
    if H != Hk:
        if gqa_falls_back_to_math(q, mask):
            k, v = _repeat_heads(k, H // Hk), _repeat_heads(v, H // Hk)
        else:
            kw["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, **kw)


class FusedAttention(torch.autograd.Function):
    """q [B, H, Tq, D]; k, v [B, Hk, Tk, D] (Hk | H); mask: bool (True = attend) or
    additive float, broadcastable to [B, H, Tq, Tk]; causal: top-left tril."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal: bool, scale: Optional[float]):
        if ctx.needs_input_grad[3]:
            raise ValueError("FusedAttention: the mask requires grad, and the fused node has no edges from "
                             "the mask; call fused_attention(), which runs SDPA for a learned mask")
        if any(ctx.needs_input_grad[:3]):
            # keep SDPA's own graph for the ordinary backward (no recomputation)
            with torch.enable_grad():
                inner = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad)]
                out = sdpa(*inner, mask, causal, scale)
            ctx.inner = (inner, out)
            out = out.detach()
        else:
            out = sdpa(q, k, v, mask, causal, scale)
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
    """Scaled dot-product attention recorded as one canonical semiring node.
    A mask that requires grad (a learned bias) is an input with edges of its
    own, which the fused node does not have: then SDPA runs as it is (its
    own node and ordinary backward)."""
    if isinstance(mask, torch.Tensor) and mask.requires_grad and torch.is_grad_enabled():
        return sdpa(q, k, v, mask, causal, scale)
    return FusedAttention.apply(q, k, v, mask, causal, scale)
