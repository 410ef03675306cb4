"""RMS norm as one canonical node: y_j = γ_j x_j r, r = (mean(x²) + eps)^-1/2,
with the dense per-row Jacobian dy_j/dx_i = γ_j r (δ_ij - x̂_i x̂_j / n),
instead of the pow/mean/rsqrt/mul sub-graph of the composed implementations."""

from __future__ import annotations

from typing import Callable

import torch

from ..semirings.base import rms_norm_rows
from ._saved import pad, saved_tensors


def _input_grad_kernel(x, grad_out, weight, eps: float, offset: float):
    """dx from the fused Triton kernel, or None (torch closed form) where the
    backend switch keeps torch (CPU tensors by default), the kernel declines,
    or the backward itself is differentiated (create_graph=True: the kernel's
    output would carry no graph)."""
    from .. import backend
    from ..dispatch import guarded
    if torch.is_grad_enabled() or not backend.use_triton(x):
        return None
    try:
        from ..kernels.rms_norm import rms_norm_input_grad
    except ImportError:  # triton missing or broken
        return None
    r = guarded("rms_norm_input_grad", "real", rms_norm_input_grad, x, grad_out, weight, eps, offset)
    return None if r is NotImplemented else r


class CanonicalRMSNorm(torch.autograd.Function):
    """``forward(x, weight, impl, eps, offset)``: ``impl(x)`` is the original
    module's forward (so outputs are bit-identical); γ = weight + offset
    (offset 1 for Gemma's (1 + weight) form)."""

    @staticmethod
    def forward(ctx, x, weight, impl: Callable, eps: float, offset: float):
        out = impl(x)
        ctx.save_for_backward(x, weight)
        ctx.impl, ctx.eps, ctx.offset = impl, float(eps), float(offset)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        """The ordinary gradient in closed form (at least float32 inside, like
        the forward): with g' = g·γ, dx = r (g' - x̂ mean(g' x̂)), dγ = Σ g x̂.
        dx is one Triton launch where the backend switch picks Triton (CUDA)."""
        x, weight = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = _input_grad_kernel(x, grad_out, weight, ctx.eps, ctx.offset)
        if gx is not None and not (weight is not None and ctx.needs_input_grad[1]):
            return gx, None, None, None, None
        dt = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(dt)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
        xhat = xf * r
        g = grad_out.to(dt)
        if ctx.needs_input_grad[0] and gx is None:
            gg = g if weight is None else g * (weight.to(dt) + ctx.offset)
            gx = (r * (gg - xhat * (gg * xhat).mean(-1, keepdim=True))).to(x.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            gw = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        return gx, gw, None, None, None

    @staticmethod
    def semiring_backward(rc):
        node = rc.node
        x, weight = saved_tensors(node)
        out = [None] * len(rc.needs)
        v = rc.grad(0)
        if rc.needs[0]:
            out[0] = rc.sr.rms_norm_from_input(v, x, node.eps, weight, node.offset)
        if len(rc.needs) > 1 and rc.needs[1]:          # y_j = γ_j x̂_j: edge γ_j with weight x̂_j
            xhat, _ = rms_norm_rows(x, node.eps, rc.dtype)
            out[1] = rc.sr.sum_to_shape(rc.sr.scale(v, xhat), tuple(weight.shape))
        return pad(out, len(rc.needs))
