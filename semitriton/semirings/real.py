"""The real semiring (+, ×): the ordinary gradient."""

from __future__ import annotations

import torch

from ..dispatch import kernel_op, rmatmul_via_matmul
from .base import Semiring, Value, attention_probs


class Real(Semiring):
    """Value = gradient. ⊕ = +, ⊗ = ×, edge(w) = w, readout = the gradient."""

    name = "real"
    components = ("grad",)

    def zero(self, shape, dtype, device) -> Value:
        return (torch.zeros(shape, dtype=dtype, device=device),)

    def one(self, shape, dtype, device) -> Value:
        return (torch.ones(shape, dtype=dtype, device=device),)

    def plus(self, a, b):
        return (a[0] + b[0],)

    def times(self, a, b):
        return (a[0] * b[0],)

    def edge(self, w):
        return (w,)

    def readout(self, v):
        return v[0]

    def sum(self, v, dims, keepdim=False):
        return (v[0].sum(dims, keepdim=keepdim),)

    def scale(self, v, w):
        return (v[0] * w,)

    @kernel_op("matmul")
    def matmul(self, v, w):
        return (torch.matmul(v[0], w.to(v[0].dtype)),)

    @rmatmul_via_matmul
    def rmatmul(self, w, v):
        return (torch.matmul(w.to(v[0].dtype), v[0]),)

    @kernel_op("softmax")
    def softmax(self, v, y, dim):
        g = v[0]
        y = y.to(g.dtype)
        return (y * (g - (g * y).sum(dim, keepdim=True)),)

    @kernel_op("log_softmax")
    def log_softmax(self, v, p, dim):
        g = v[0]
        return (g - p.to(g.dtype) * g.sum(dim, keepdim=True),)

    @kernel_op("layer_norm")
    def layer_norm(self, v, xhat, rstd, weight):
        g = v[0] if weight is None else v[0] * weight.to(v[0].dtype)
        xh = xhat.to(g.dtype)
        n = g.shape[-1]
        mg = g.sum(-1, keepdim=True) / n
        mgx = (g * xh).sum(-1, keepdim=True) / n
        return (rstd.to(g.dtype) * (g - mg - xh * mgx),)

    def layer_norm_from_input(self, v, x, normalized_shape, mean, rstd, weight):
        """The gradient: aten's own layer-norm backward (one fused kernel)."""
        g = v[0]
        dt = g.dtype
        w = None if weight is None else weight.to(dt)
        dx, _, _ = torch.ops.aten.native_layer_norm_backward(
            g, x.to(dt), list(normalized_shape), mean.to(dt), rstd.to(dt), w, None, [True, False, False])
        return (dx,)

    def rms_norm(self, v, xhat, rstd, weight, eps=None):
        g = v[0] if weight is None else v[0] * weight.to(v[0].dtype)
        xh = xhat.to(g.dtype)
        n = g.shape[-1]
        mgx = (g * xh).sum(-1, keepdim=True) / n
        return (rstd.to(g.dtype) * (g - xh * mgx),)

    @kernel_op("attention")
    def attention(self, vo, q, k, vv, bias, causal, scale, needs=(True, True, True)):
        do = vo[0]
        dt = do.dtype
        H, Hk = q.shape[-3], k.shape[-3]
        group = H // Hk
        q, k, vv = q.to(dt), k.to(dt), vv.to(dt)
        if group > 1:
            k = k.repeat_interleave(group, dim=-3)
            vv = vv.repeat_interleave(group, dim=-3)
        p = attention_probs(q, k, bias, causal, scale)
        dq = dk = dv = None
        if needs[2]:
            dv = p.transpose(-1, -2) @ do
        if needs[0] or needs[1]:
            dp = do @ vv.transpose(-1, -2)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True))
            if needs[0]:
                dq = (ds @ k) * scale
            if needs[1]:
                dk = (ds.transpose(-1, -2) @ q) * scale
        if group > 1:
            def fold(t):
                return t.reshape(*t.shape[:-3], Hk, group, *t.shape[-2:]).sum(-3)
            dk = None if dk is None else fold(dk)
            dv = None if dv is None else fold(dv)
        return (None if dq is None else (dq,),
                None if dk is None else (dk,),
                None if dv is None else (dv,))
