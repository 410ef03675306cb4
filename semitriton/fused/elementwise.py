"""A composed elementwise activation (e.g. GPT-2's tanh-GELU written with
pow/tanh/mul/add) as one canonical primitive: one edge x[i] -> y[i] with
weight f'(x[i]), computed exactly by autograd of the original formula."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..modes import recording
from ._saved import pad, saved_tensors


def _derivative(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    with recording():
        xx = x.detach().requires_grad_()
        (d,) = torch.autograd.grad(fn(xx).sum(), xx)
    return d


class CanonicalElementwise(torch.autograd.Function):
    """``forward(x, fn, kind=None)``: y = fn(x), fn elementwise (the original
    module's forward). ``kind`` names fn when it is one of the activations with
    a fused rule (``"gelu_tanh"``, ...: ``Semiring.activation``); otherwise the
    edge weight f'(x) comes from autograd of fn."""

    @staticmethod
    def forward(ctx, x, fn: Callable, kind: Optional[str] = None):
        ctx.save_for_backward(x)
        ctx.fn = fn
        ctx.kind = kind
        return fn(x)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        with recording():
            xx = x.detach().requires_grad_()
            (g,) = torch.autograd.grad(ctx.fn(xx), xx, grad_out)
        return g, None, None

    @staticmethod
    def semiring_backward(rc):
        (x,) = saved_tensors(rc.node)
        if not rc.needs[0]:
            return pad([], len(rc.needs))
        kind = getattr(rc.node, "kind", None)
        if kind is not None:
            return pad([rc.sr.activation(rc.grad(0), x, kind)], len(rc.needs))
        d = _derivative(rc.node.fn, x).to(rc.dtype)
        return pad([rc.sr.scale(rc.grad(0), d)], len(rc.needs))
