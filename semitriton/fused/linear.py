"""A linear layer as one node: y = x Wᵀ + b for inputs of any rank (the aten
graph is view -> addmm -> view, three nodes, for 3-D inputs). Same forward
numerics (it calls F.linear); fewer nodes for the semiring walk."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rules.linalg import live_rows_matmul
from ._saved import pad, saved_tensors


class CanonicalLinear(torch.autograd.Function):
    """``forward(x, weight, bias, transposed)``: ``weight`` is [out, in]
    (nn.Linear) or [in, out] when ``transposed`` (GPT-2's Conv1D)."""

    @staticmethod
    def forward(ctx, x, weight, bias, transposed: bool):
        w = weight.t() if transposed else weight
        ctx.save_for_backward(x, weight)
        ctx.transposed = transposed
        ctx.has_bias = bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        w = weight.t() if ctx.transposed else weight              # [out, in]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ w
        if ctx.needs_input_grad[1]:
            gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])   # [out, in]
            if ctx.transposed:
                gw = gw.t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(0)
        return gx, gw, gb, None

    @staticmethod
    def semiring_backward(rc):
        node = rc.node
        x, weight = saved_tensors(node)
        w = weight.t() if node.transposed else weight             # [out, in]: x = v @ w
        v = rc.grad(0)
        out = [None] * len(rc.needs)
        if rc.needs[0]:
            out[0] = live_rows_matmul(rc.sr, v, w)
        if len(rc.needs) > 1 and rc.needs[1]:                     # weight[o, i] <- x[.., i] ⊗ v[.., o]
            x2 = x.reshape(-1, x.shape[-1])
            v2 = rc.sr.map(v, lambda c: c.reshape(-1, c.shape[-1]))
            r = rc.sr.rmatmul(x2.transpose(0, 1), v2)              # [in, out]
            out[1] = r if node.transposed else rc.sr.map(r, lambda c: c.transpose(0, 1))
        if len(rc.needs) > 2 and rc.needs[2]:
            out[2] = rc.sr.sum_to_shape(v, (v[0].shape[-1],))
        return pad(out, len(rc.needs))
