"""Rotary position embedding as one canonical node.

``y = x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = cat(-x[h:], x[:h])``
(h = D/2, the LLaMA/Mistral/Qwen/Gemma form). RoPE is linear in x; its edges
(the README's "Semirings": one edge per non-zero Jacobian entry) are

    x[j] -> y[j]      weight cos[j]
    x[j] -> y[j + h]  weight  sin[j + h]   (j < h)
    x[j] -> y[j - h]  weight -sin[j - h]   (j ≥ h)

The aten graph of the same formula is seven nodes (two slices, neg, cat, two
muls, add) with the same paths and products; this node has the same forward
numerics and statistics and is one step of the walk.
"""

from __future__ import annotations

import torch

from ._saved import pad, saved_tensors


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x[..., h:], x[..., :h]) (as transformers writes it)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _grad_kernel(g, cos, sin):
    """The ordinary gradient from the Triton RoPE rule of the real semiring
    (one launch instead of five torch ops), or None (torch) where the backend
    switch keeps torch (CPU tensors by default), the kernel declines (e.g. a
    half-precision gradient), or the backward is differentiated itself
    (create_graph=True: the kernel's output would carry no graph)."""
    from ..dispatch import guarded, kernel
    if torch.is_grad_enabled() or g.dtype != torch.float32:
        return None
    fn = kernel("rope", "real", g)
    r = NotImplemented if fn is None else guarded("rope", "real", fn, (g,), cos, sin)
    return None if r is NotImplemented else r[0]


#: how a modeling file's function handles half-precision q/k (the edges are the
#: same; only the forward's rounding differs): "plain" computes in
#: result_type(q, cos) and returns that (LLaMA); "cast_back" computes the same
#: and casts to q's dtype (OLMo); "float" computes in float32 and casts to q's
#: dtype (ModernBERT)
CONVENTIONS = ("plain", "cast_back", "float")


class RotaryEmbedding(torch.autograd.Function):
    """``forward(x, cos, sin, convention="plain")``: x·cos + rotate_half(x)·sin
    (dtypes per :data:`CONVENTIONS`); ``cos``/``sin`` broadcast to x and carry
    no gradient (they are functions of positions)."""

    @staticmethod
    def forward(ctx, x, cos, sin, convention="plain"):
        ctx.save_for_backward(cos, sin)
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        xc = x.float() if convention == "float" else x
        a, b = xc * cos, rotate_half(xc) * sin
        # the same sum written into a contiguous tensor: q/k come in as transposed
        # views of their projection, and the fused attention's rule reads them
        # flattened to [B·H, T, D], which would cost a copy per pass
        out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.result_type(a, b), device=a.device)
        out = torch.add(a, b, out=out)
        return out if convention == "plain" else out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        """gx[j] = g[j]·cos[j] + g[p]·(±sin[p]) (p the rotation partner): one
        Triton launch where the backend switch picks Triton (CUDA), else torch."""
        cos, sin = ctx.saved_tensors
        gx = _grad_kernel(g, cos, sin)
        if gx is None:
            gs = g * sin
            h = gs.shape[-1] // 2
            gx = g * cos + torch.cat((gs[..., h:], -gs[..., :h]), dim=-1)
        return gx.sum_to_size(ctx.x_shape).to(ctx.x_dtype), None, None, None

    @staticmethod
    def semiring_backward(rc):
        if not rc.needs[0]:
            return pad([], len(rc.needs))
        cos, sin = saved_tensors(rc.node)
        sr = rc.sr
        return pad([sr.sum_to_shape(sr.rope(rc.grad(0), cos, sin), tuple(rc.node.x_shape))], len(rc.needs))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 unsqueeze_dim: int = 1, convention: str = "plain") -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``
    with one :class:`RotaryEmbedding` node per tensor (``convention``: see
    :data:`CONVENTIONS`)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return RotaryEmbedding.apply(q, cos, sin, convention), RotaryEmbedding.apply(k, cos, sin, convention)


def _halves(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): adjacent pairs to halves."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def _pairs(x: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_halves`."""
    return x.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


def _unrotate_pairs(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, shape, dtype) -> torch.Tensor:
    """The gradient of the pair rotation: each pair of g rotated back,
    (g_2i c_i + g_2i+1 s_i, g_2i+1 c_i − g_2i s_i) (g times conj(freqs_cis))."""
    gr, gi = g.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    gx = torch.stack((gr * cos + gi * sin, gi * cos - gr * sin), dim=-1).flatten(-2)
    return gx.sum_to_size(shape).to(dtype)


class RotaryPairs(torch.autograd.Function):
    """``forward(x, cos, sin, (y,)) = y``, where y is the complex form of RoPE
    (LLaMA 4, DeepSeek-V2) of x, each adjacent pair (x_2i, x_2i+1) multiplied
    by freqs_cis_i = c_i + i·s_i, computed by the modeling file's own function
    (its complex product rounds differently on each platform: fused
    multiply-adds or not), so the outputs are the unpatched model's. The
    complex values it uses have no semiring edges; the node's are the real
    Jacobian of the rotation:

        x_2i -> y_2i    c_i      x_2i+1 -> y_2i    −s_i
        x_2i -> y_2i+1  s_i      x_2i+1 -> y_2i+1   c_i

    which, with the pairs gathered into halves, is :class:`RotaryEmbedding`'s
    rule with cos = (c, c) and sin = (s, s). ``cos``/``sin``: [..., D/2],
    broadcast to x. One node per tensor, as for :class:`RotaryEmbedding`."""

    @staticmethod
    def forward(ctx, x, cos, sin, y):
        ctx.save_for_backward(cos, sin)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        # y comes in a 1-tuple, not as an input tensor (an input returned as it is would be a
        # view of it); in float32 the file returns a view of its complex product: a copy.
        # Either way in-place ops on the output work as they do unpatched.
        (y,) = y
        return y.clone() if y._is_view() else y

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _unrotate_pairs(g, cos, sin, ctx.x_shape, ctx.x_dtype), None, None, None

    @staticmethod
    def semiring_backward(rc):
        if not rc.needs[0]:
            return pad([], len(rc.needs))
        cos, sin = (t.to(rc.dtype) for t in saved_tensors(rc.node))     # complex128 freqs: float64
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        sr = rc.sr
        v = sr.rope(sr.map(rc.grad(0), _halves), cos, sin)
        return pad([sr.sum_to_shape(sr.map(v, _pairs), tuple(rc.node.x_shape))], len(rc.needs))


def apply_rotary_pairs(q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor, impl,
                       unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``impl(q, k, freqs_cis)`` (a modeling file's ``apply_rotary_emb``:
    ``view_as_real(view_as_complex(x.float() as pairs) ·
    freqs_cis.unsqueeze(unsqueeze_dim)).flatten(-2).type_as(x)``) with one
    :class:`RotaryPairs` node per tensor that requires grad."""
    f = freqs_cis.unsqueeze(unsqueeze_dim)
    with torch.no_grad():
        ys = impl(q.detach(), k.detach(), freqs_cis)
    return tuple(RotaryPairs.apply(x, f.real, f.imag, (y,)) if x.requires_grad else y for x, y in zip((q, k), ys))
