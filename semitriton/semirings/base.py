"""The semiring interface and the generic (any-semiring) implementations of the
contractions the rules need.

A semiring *value* is a tuple of tensors of one shape (its components); a real
semiring has one component, the max semiring two (M+, M-), the entropy
semiring two (log z, e/z). Every backward rule is written against the methods
below, so a user-defined semiring only has to provide ``zero``, ``one``,
``plus``, ``times``, ``edge`` and ``readout``; the generic contractions build
on those (slowly, by broadcasting). Built-in semirings override the
contractions with closed forms, and the Triton backend replaces some of those
with fused kernels.

Notation used in the docstrings: a value ``v`` of an op's *output* is pulled
back to the op's *input* through the local derivatives ``w = dy/dx``:
``x = ⊕_u  edge(w[x -> u]) ⊗ v[u]``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..dispatch import is_builtin, kernel_op
from . import _cpu_compiled
from ._util import (activation_derivative, complement, exclusive_sum, finite_amax, rope_partner,
                    rope_partner_weight)

Value = tuple  # tuple[Tensor, ...]: the components of a semiring value

# Elements per chunk of the generic broadcast-and-reduce contractions.
_CHUNK_ELEMS = 1 << 22
_CPU_CHUNK_ELEMS = 1 << 20          # smaller per-row Jacobian chunks on CPUs (10–30 % faster at n = 768)


def _norm_dims(dims: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(dims, int):
        dims = (dims,)
    return tuple(sorted(d % ndim for d in dims))


def layer_norm_rows(x: Tensor, normalized_shape: tuple, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """x̂ = (x − mean)·rstd as rows [..., n] over the normalized dims, and rstd
    as [..., 1], from a layer norm's input and the mean and rstd aten saved."""
    n = math.prod(normalized_shape)
    lead = x.shape[: x.dim() - len(normalized_shape)]
    rs = rstd.reshape(*lead, 1)
    return (x.reshape(*lead, n) - mean.reshape(*lead, 1)) * rs, rs


def rms_norm_rows(x: Tensor, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x̂ = x·r and r = (mean(x²) + eps)^-½ over the last dim, in ``dtype``."""
    xf = x.to(dtype)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * rstd, rstd


def _diagonal(n: int, c0: int, c1: int, device) -> Tensor:
    """[n, c1 - c0] booleans: True where i = j (rows i of 0..n, columns j of c0..c1)."""
    return torch.arange(n, device=device).unsqueeze(-1) == torch.arange(c0, c1, device=device)


class Semiring:
    """Base class. Subclasses define the algebra; the contractions have generic
    defaults written with ``plus``/``times``/``edge`` only.

    Required: ``name``, ``components``, ``zero``, ``one``, ``plus``, ``times``,
    ``edge``, ``readout``. Optional: ``sum`` (⊕-reduction) and every
    contraction below, for speed.
    """

    name: str = "semiring"
    components: tuple[str, ...] = ("value",)
    #: True when ⊕ is idempotent (max-like); used by readouts.
    idempotent: bool = False

    # ---- the algebra (required) -------------------------------------------------
    def zero(self, shape, dtype, device) -> Value:
        raise NotImplementedError

    def one(self, shape, dtype, device) -> Value:
        raise NotImplementedError

    def plus(self, a: Value, b: Value) -> Value:
        raise NotImplementedError

    def times(self, a: Value, b: Value) -> Value:
        raise NotImplementedError

    def edge(self, w: Tensor) -> Value:
        """Map real local derivatives to semiring values; an exact 0 is the zero."""
        raise NotImplementedError

    def readout(self, v: Value) -> Tensor:
        raise NotImplementedError

    # ---- helpers --------------------------------------------------------------
    def __repr__(self) -> str:
        return f"<semiring {self.name}>"

    def zeros_like(self, v: Value) -> Value:
        return self.zero(v[0].shape, v[0].dtype, v[0].device)

    @staticmethod
    def map(v: Value, fn) -> Value:
        """Apply a structural (index-only) op to every component."""
        return tuple(fn(c) for c in v)

    def is_zero(self, v: Value) -> Tensor:
        z = self.zero((), v[0].dtype, v[0].device)
        out = torch.ones(v[0].shape, dtype=torch.bool, device=v[0].device)
        for c, zc in zip(v, z):
            out = out & (c == zc)
        return out

    def where(self, cond: Tensor, a: Value, b: Value) -> Value:
        return tuple(torch.where(cond, x, y) for x, y in zip(a, b))

    # ---- reductions -------------------------------------------------------------
    def sum(self, v: Value, dims, keepdim: bool = False) -> Value:
        """⊕ over ``dims`` (generic: pairwise tree of ``plus``)."""
        dims = _norm_dims(dims, v[0].dim())
        for d in reversed(dims):
            v = self._fold(v, d)
            if not keepdim:
                v = self.map(v, lambda c: c.squeeze(d))
        return v

    def _fold(self, v: Value, d: int) -> Value:
        n = v[0].shape[d]
        if n == 0:
            shape = list(v[0].shape)
            shape[d] = 1
            return self.zero(tuple(shape), v[0].dtype, v[0].device)
        while n > 1:
            half = n // 2
            a = self.map(v, lambda c: c.narrow(d, 0, half))
            b = self.map(v, lambda c: c.narrow(d, half, half))
            s = self.plus(a, b)
            if n % 2:
                rest = self.map(v, lambda c: c.narrow(d, 2 * half, 1))
                s = tuple(torch.cat([x, y], d) for x, y in zip(s, rest))
            v, n = s, s[0].shape[d]
        return v

    def sum_to_shape(self, v: Value, shape) -> Value:
        """⊕ over the dimensions that broadcasting expanded (fan-out)."""
        shape = tuple(shape)
        if tuple(v[0].shape) == shape:
            return v
        lead = v[0].dim() - len(shape)
        dims = list(range(lead))
        for i, s in enumerate(shape):
            if s == 1 and v[0].shape[lead + i] != 1:
                dims.append(lead + i)
        if dims:
            v = self.sum(v, dims, keepdim=True)
        return self.map(v, lambda c: c.reshape(shape))

    # ---- elementwise edges ------------------------------------------------------
    def scale(self, v: Value, w) -> Value:
        """``v ⊗ edge(w)`` elementwise, ``w`` a real tensor broadcastable to v."""
        if not isinstance(w, Tensor):
            w = torch.full((), w, dtype=v[0].dtype, device=v[0].device)
        shape = torch.broadcast_shapes(v[0].shape, w.shape)
        v = self.map(v, lambda c: c.expand(shape))
        return self.times(v, self.edge(w.to(v[0].dtype).expand(shape)))

    @kernel_op("activation")
    def activation(self, v: Value, x: Tensor, kind: str) -> Value:
        """``v ⊗ edge(f'(x))`` elementwise for y = f(x), f = ``gelu``, ``gelu_tanh``
        or ``silu`` (one fused pass on the GPU; here: the derivative, then ``scale``)."""
        return self.scale(v, activation_derivative(x.to(v[0].dtype), kind))

    @kernel_op("rope")
    def rope(self, v: Value, cos: Tensor, sin: Tensor) -> Value:
        """Value of x for a rotary embedding y = x·cos + rotate_half(x)·sin
        (rotate_half(x) = cat(-x[h:], x[:h]), h = D/2), from the value ``v`` of y:
        x[j] = v[j] ⊗ edge(cos[j]) ⊕ v[(j+h) mod D] ⊗ edge(±sin[(j+h) mod D])
        (+ for j < h); in v's shape (one fused pass on the GPU)."""
        dt = v[0].dtype
        direct = self.scale(v, cos.to(dt))
        crossed = self.scale(self.map(v, rope_partner), rope_partner_weight(sin.to(dt)))
        return self.plus(direct, crossed)

    def scale_to(self, v: Value, w, shape) -> Value:
        """Pull ``v`` back through an elementwise edge to an input of ``shape``
        (which broadcasting may have expanded): ⊕ over the expanded dims."""
        return self.sum_to_shape(self.scale(v, w), shape)

    # ---- contractions -------------------------------------------------------------
    @kernel_op("matmul")
    def matmul(self, v: Value, w: Tensor) -> Value:
        """``out[..., i, k] = ⊕_j v[..., i, j] ⊗ edge(w[..., j, k])`` (batch dims broadcast)."""
        lead = torch.broadcast_shapes(v[0].shape[:-2], w.shape[:-2])
        I, J = v[0].shape[-2:]
        K = w.shape[-1]
        v = self.map(v, lambda c: c.expand(*lead, I, J))
        w = w.to(v[0].dtype).expand(*lead, J, K)
        per_k = max(1, math.prod(lead) * I * J)
        step = max(1, _CHUNK_ELEMS // per_k)
        outs = []
        for k0 in range(0, K, step):
            e = self.edge(w[..., k0:k0 + step])                      # [..., J, k]
            prod = self.times(self.map(v, lambda c: c.unsqueeze(-1)),  # [..., I, J, 1]
                              self.map(e, lambda c: c.unsqueeze(-3)))  # [..., 1, J, k]
            outs.append(self.sum(prod, -2))
        if not outs:
            return self.zero((*lead, I, K), v[0].dtype, v[0].device)
        return tuple(torch.cat(cs, -1) for cs in zip(*outs))

    def rmatmul(self, w: Tensor, v: Value) -> Value:
        """``out[..., i, k] = ⊕_j edge(w[..., i, j]) ⊗ v[..., j, k]``."""
        vt = self.map(v, lambda c: c.transpose(-1, -2))
        out = self.matmul(vt, w.transpose(-1, -2))
        return self.map(out, lambda c: c.transpose(-1, -2))

    def rowwise(self, jac: Tensor, v: Value) -> Value:
        """Per-row dense Jacobian: ``x[..., i] = ⊕_j edge(jac[..., i, j]) ⊗ v[..., j]``."""
        out = self.rmatmul(jac, self.map(v, lambda c: c.unsqueeze(-1)))
        return self.map(out, lambda c: c.squeeze(-1))

    # ---- canonical composite primitives -------------------------------------------
    @kernel_op("softmax")
    def softmax(self, v: Value, y: Tensor, dim: int) -> Value:
        """Softmax over ``dim`` with output ``y``: edge x_i -> y_j has weight
        ``y_j (δ_ij - y_i)``."""
        y = y.to(v[0].dtype).movedim(dim, -1)
        v = self.map(v, lambda c: c.movedim(dim, -1))
        n = y.shape[-1]
        yf = y.reshape(-1, n)

        def jac_fn(r0, r1, c0, c1):                                # [r, i, j] = y_j (δ_ij - y_i)
            yr = yf[r0:r1]
            yj = yr[:, c0:c1]
            return torch.where(_diagonal(n, c0, c1, yr.device), (yj * complement(yj)).unsqueeze(-2),
                               -yr.unsqueeze(-1) * yj.unsqueeze(-2))

        out = self._rowwise_chunked(v, jac_fn)
        return self.map(out, lambda c: c.movedim(-1, dim))

    @kernel_op("log_softmax")
    def log_softmax(self, v: Value, p: Tensor, dim: int) -> Value:
        """Log-softmax over ``dim`` (``p`` = softmax probabilities): edge x_i -> y_j
        has weight ``δ_ij - p_i``."""
        p = p.to(v[0].dtype).movedim(dim, -1)
        v = self.map(v, lambda c: c.movedim(dim, -1))
        n = p.shape[-1]
        pf = p.reshape(-1, n)

        def jac_fn(r0, r1, c0, c1):                                # [r, i, j] = δ_ij - p_i
            pr = pf[r0:r1].unsqueeze(-1)
            return torch.where(_diagonal(n, c0, c1, pr.device), complement(pr), -pr).expand(-1, n, c1 - c0)

        out = self._rowwise_chunked(v, jac_fn)
        return self.map(out, lambda c: c.movedim(-1, dim))

    def _rowwise_chunked(self, v: Value, jac_fn) -> Value:
        """``rowwise`` over the rows of ``v`` [..., n] in chunks; ``jac_fn(r0, r1, c0, c1)``
        builds the per-row Jacobian entries [r1 - r0, n, c1 - c0] of rows r0..r1
        (flattened) for the outputs j in c0..c1. A row whose n×n Jacobian is
        over the chunk budget (a group norm's rows) is done in column blocks,
        ⊕-ed, so memory stays within the budget for any n."""
        rows = v[0].shape[:-1]
        n = v[0].shape[-1]
        flat_v = self.map(v, lambda c: c.reshape(-1, n))
        R = flat_v[0].shape[0]
        budget = _CHUNK_ELEMS if flat_v[0].is_cuda else _CPU_CHUNK_ELEMS
        if n * n <= budget:
            step = max(1, budget // max(1, n * n))
            outs = [self.rowwise(jac_fn(r0, min(R, r0 + step), 0, n), self.map(flat_v, lambda c: c[r0:r0 + step]))
                    for r0 in range(0, R, step)]
        else:
            cols = max(1, budget // n)
            outs = []
            for r0 in range(R):
                acc = None
                for c0 in range(0, n, cols):
                    c1 = min(n, c0 + cols)
                    part = self.rowwise(jac_fn(r0, r0 + 1, c0, c1), self.map(flat_v, lambda c: c[r0:r0 + 1, c0:c1]))
                    acc = part if acc is None else self.plus(acc, part)
                outs.append(acc)
        if not outs:
            return self.map(v, lambda c: c.clone())
        out = tuple(torch.cat(cs, 0) for cs in zip(*outs))
        return self.map(out, lambda c: c.reshape(*rows, c.shape[-1]))

    @kernel_op("layer_norm")
    def layer_norm(self, v: Value, xhat: Tensor, rstd: Tensor, weight: Tensor | None) -> Value:
        """Layer norm over the last dim. ``xhat = (x-mean)*rstd`` ([..., n]),
        ``rstd`` ([..., 1]). Edge x_i -> y_j: ``γ_j rstd (δ_ij - (1 + x̂_i x̂_j)/n)``."""
        return self._norm(v, xhat, rstd, weight, centered=True)

    def layer_norm_from_input(self, v: Value, x: Tensor, normalized_shape: tuple, mean: Tensor, rstd: Tensor,
                              weight: Tensor | None) -> Value:
        """:meth:`layer_norm` of ``F.layer_norm(x, normalized_shape, weight)``
        from its input and the mean and rstd aten saved (``[..., 1, ...]``);
        the value ``v`` and the result have x's shape."""
        xhat, rs = layer_norm_rows(x, normalized_shape, mean, rstd)
        lead, n = xhat.shape[:-1], xhat.shape[-1]
        vf = self.map(v, lambda c: c.reshape(*lead, n))
        g = None if weight is None else weight.reshape(n)
        r = self.layer_norm(vf, xhat, rs, g)
        return self.map(r, lambda c: c.reshape(x.shape))

    def rms_norm(self, v: Value, xhat: Tensor, rstd: Tensor, weight: Tensor | None,
                 eps: float | None = None) -> Value:
        """RMS norm over the last dim, ``xhat = x*rstd``. Edge x_i -> y_j:
        ``γ_j rstd (δ_ij - x̂_i x̂_j / n)``. ``eps`` (when the norm's eps is
        known) lets the closed forms of the built-in semirings keep the
        diagonal accurate where one element dominates its row
        (:meth:`rms_factors`)."""
        return self._norm(v, xhat, rstd, weight, centered=False)

    @kernel_op("rms_norm_from_input")
    def rms_norm_from_input(self, v: Value, x: Tensor, eps: float, weight: Tensor | None,
                            offset: float = 0.0) -> Value:
        """:meth:`rms_norm` from the norm's input: r = (mean(x²) + eps)^-½,
        x̂ = x·r, γ = weight + offset (the Triton backend forms them in the
        kernel that applies the rule)."""
        dt = v[0].dtype
        xhat, rstd = rms_norm_rows(x, eps, dt)
        gamma = None if weight is None else weight.to(dt) + offset
        if is_builtin(self):                      # a user's override may not take eps
            return self.rms_norm(v, xhat, rstd, gamma, float(eps))
        return self.rms_norm(v, xhat, rstd, gamma)

    @staticmethod
    def rms_factors(xhat: Tensor, rstd: Tensor, weight, dtype, eps: float | None = None) -> tuple:
        """RMS norm's Jacobian w_ij = γ_j r (δ_ij - x̂_i x̂_j / n) written as
        d_i on the diagonal and a_i b_j off it: d = γ r (1 - x̂²/n),
        a = -r x̂ / n, b = γ x̂ (so closed forms are O(n) per row). With the
        norm's ``eps``, 1 - x̂_i²/n is formed as (Σ_{j≠i} x̂_j² + n·eps·r²)/n,
        a sum of non-negative terms: 1 - x̂_i²/n cancels where one element
        carries nearly all of its row's Σx² (a massive activation; float32
        keeps no digit of it once the other elements' share is below 1e-7)."""
        xh = xhat.to(dtype)
        r = rstd.to(dtype)
        n = xh.shape[-1]
        g = torch.ones((), dtype=dtype, device=xh.device) if weight is None else weight.to(dtype)
        if eps is None:
            c = 1 - xh * xh / n
        else:
            c = (exclusive_sum(xh * xh, -1) + n * eps * r * r) / n
        return g * r * c, -r * xh / n, g * xh

    def _norm(self, v, xhat, rstd, weight, centered):
        dt = v[0].dtype
        n = xhat.shape[-1]
        xh = xhat.to(dt).reshape(-1, n)
        rs = rstd.to(dt).reshape(-1, 1)
        g = None if weight is None else weight.to(dt).reshape(n)
        if is_builtin(self):
            out = _cpu_compiled.norm_rows(self.name, self.map(v, lambda c: c.reshape(-1, n)), xh, rs, g, centered)
            if out is not None:
                return self.map(out, lambda c: c.reshape(v[0].shape))

        def jac_fn(r0, r1, c0, c1):
            x = xh[r0:r1]
            j = _diagonal(n, c0, c1, x.device).to(dt) - (x.unsqueeze(-1) * x[:, c0:c1].unsqueeze(-2)
                                                         + (1.0 if centered else 0.0)) / n
            j = j * rs[r0:r1].unsqueeze(-1)
            if g is not None:
                j = j * g[c0:c1]
            return j

        return self._rowwise_chunked(v, jac_fn)

    @kernel_op("attention")
    def attention(self, vo: Value, q: Tensor, k: Tensor, vv: Tensor, bias: Tensor | None,
                  causal: bool, scale: float, needs=(True, True, True)):
        """Attention ``O = softmax(q kᵀ·scale + bias) v`` (``bias`` additive, -inf
        where masked; ``causal`` top-left aligned) pulled back to (q, k, v).
        q: [..., H, Tq, D]; k, v: [..., Hk, Tk, D] with Hk dividing H (grouped
        query attention: each k/v head fans out to H/Hk query heads, ⊕ over them).
        The canonical graph: S = q kᵀ·scale (+ mask) -> P = softmax(S) -> O = P v;
        masked scores are not edges."""
        dt = vo[0].dtype
        H, Hk = q.shape[-3], k.shape[-3]
        group = H // Hk
        k = k.to(dt)
        vv = vv.to(dt)
        if group > 1:
            k = k.repeat_interleave(group, dim=-3)
            vv = vv.repeat_interleave(group, dim=-3)
        p = attention_probs(q.to(dt), k, bias, causal, scale)
        vq = vk = vval = None
        if needs[2]:
            vval = self.rmatmul(p.transpose(-1, -2), vo)            # v[j,d] = ⊕_i P_ij ⊗ vo[i,d]
        if needs[0] or needs[1]:
            vp = self.matmul(vo, vv.transpose(-1, -2))             # P[i,j] = ⊕_d v[j,d] ⊗ vo[i,d]
            vs = self.softmax(vp, p, -1)
            if needs[0]:
                vq = self.matmul(vs, k * scale)                      # q[i,d] = ⊕_j (k_jd s) ⊗ S[i,j]
            if needs[1]:
                vst = self.map(vs, lambda c: c.transpose(-1, -2))
                vk = self.matmul(vst, q.to(dt) * scale)              # k[j,d] = ⊕_i (q_id s) ⊗ S[i,j]
        if group > 1:
            vk = None if vk is None else self._sum_groups(vk, Hk, group)
            vval = None if vval is None else self._sum_groups(vval, Hk, group)
        return vq, vk, vval

    def _sum_groups(self, v: Value, hk: int, group: int) -> Value:
        shp = v[0].shape
        v = self.map(v, lambda c: c.reshape(*shp[:-3], hk, group, *shp[-2:]))
        return self.sum(v, -3)


def attention_probs(q: Tensor, k: Tensor, bias: Tensor | None, causal: bool, scale: float) -> Tensor:
    """P = softmax(q kᵀ·scale + bias) with the top-left causal mask; fully
    masked rows give P = 0 (no edges), as SDPA's output is 0 there."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if causal:
        tq, tk = s.shape[-2:]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    m = finite_amax(s, -1)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    return torch.where(den > 0, e / den.clamp_min(torch.finfo(e.dtype).tiny), torch.zeros_like(e))


def _occurrence_rank(index: Tensor) -> tuple[Tensor, Tensor]:
    """For a flat index tensor: a stable order and, in that order, how many
    earlier entries hit the same position (0 for the first)."""
    order = torch.argsort(index, stable=True)
    s = index[order]
    _, counts = torch.unique_consecutive(s, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank = torch.arange(s.numel(), device=index.device) - starts
    return order, rank


def scatter_plus(sr: "Semiring", v: Value, index: Tensor, size: int) -> Value:
    """``out[p] = ⊕_{n: index[n] = p} v[n]`` over dim 0 (duplicates combined with
    ⊕ in rounds of distinct positions; positions never hit read the zero)."""
    rest = tuple(v[0].shape[1:])
    out = sr.zero((size, *rest), v[0].dtype, v[0].device)
    if index.numel() == 0:
        return out
    index = index.reshape(-1)
    order, rank = _occurrence_rank(index)
    out = tuple(c.clone() for c in out)
    for r in range(int(rank.max()) + 1):
        sel = order[rank == r]
        pos = index[sel]
        cur = tuple(c[pos] for c in out)
        new = sr.plus(cur, tuple(c[sel] for c in v))
        for c, n in zip(out, new):
            c[pos] = n
    return out
