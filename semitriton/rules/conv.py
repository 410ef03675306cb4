"""Convolutions (conv1d/2d/3d, transposed, grouped, depthwise, strided,
dilated, zero-padded): y[n, o, l] = b[o] + Σ_{c, t} W[o, c, t] x[n, c, l·s − p + t·d]
(per spatial dim; c within o's group). Every (output, tap) pair reads at most
one input position, so the edges are x[n, c, q] -> y[n, o, l] with weight
W[o, c, t] (t the tap with q = l·s − p + t·d), W[o, c, t] -> y[n, o, l] with
weight x[n, c, q] (none where q falls in the zero padding) and b[o] -> y[n, o, l]
with weight 1.

The rules use only the semiring's matmul, rmatmul, plus and sum: one
contraction over the output channels for every (output position, tap), then
the taps are ⊕-ed into the input positions they read (strided slices of the
padded input). A transposed convolution is the adjoint: the value of its
input at l is ⊕ over taps and output channels of W ⊗ v at l·s − p + t·d, a
gather of strided slices of the (zero-padded) output value and one
contraction. Padding modes other than zeros run as a separate padding op
before the convolution (reflection/replication padding nodes have no rule)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import GraphError
from . import rule


@dataclass(frozen=True)
class _Spec:
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    transposed: bool


def _per_dim(val, nd: int, what: str, name: str) -> tuple:
    t = (val,) if isinstance(val, int) else tuple(int(e) for e in val)
    if len(t) == 1 and nd > 1:
        t = t * nd
    if len(t) != nd:
        raise GraphError(f"{name}: {what} {t} does not match the {nd} spatial dims of the convolution")
    return t


def _spec(ctx, x_shape: tuple, w_shape: tuple, v_shape: tuple) -> _Spec:
    name = ctx.name
    nd = len(x_shape) - 2
    if nd < 1 or len(w_shape) != nd + 2:
        raise GraphError(f"{name}: input {x_shape} and weight {w_shape} are not a batched "
                         "convolution's [N, C, *spatial] and [O, C/groups, *kernel]")

    def get(attr, default):
        return ctx.saved(attr) if ctx.has_saved(attr) else default

    transposed = bool(get("transposed", "Transpose" in name))
    stride = _per_dim(get("stride", 1), nd, "stride", name)
    padding = _per_dim(get("padding", 0), nd, "padding", name)
    dilation = _per_dim(get("dilation", 1), nd, "dilation", name)
    groups = int(get("groups", 1))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0 or groups < 1:
        raise GraphError(f"{name}: stride {stride}, padding {padding}, dilation {dilation}, groups {groups} "
                         "are outside what the rule covers (stride, dilation ≥ 1, padding ≥ 0)")
    c_in, c_out = x_shape[1], v_shape[1]
    if transposed:
        ok = c_in == w_shape[0] and c_out == w_shape[1] * groups
    else:
        ok = c_in == w_shape[1] * groups and c_out == w_shape[0]
    if not ok or c_in % groups or c_out % groups or len(v_shape) != len(x_shape) or v_shape[0] != x_shape[0]:
        raise GraphError(f"{name}: input {x_shape}, weight {w_shape}, output {v_shape} and groups={groups} "
                         "do not fit together")
    return _Spec(stride, padding, dilation, groups, transposed)


def _taps(kernel: tuple):
    return list(itertools.product(*(range(k) for k in kernel)))


def _tap_slices(tap: tuple, count: tuple, spec: _Spec) -> tuple:
    """Index of the positions l·s + t·d (l < count) in padded coordinates, per spatial dim."""
    return (slice(None), slice(None)) + tuple(
        slice(t * d, t * d + (n - 1) * s + 1, s) for t, d, n, s in zip(tap, spec.dilation, count, spec.stride))


def _pad_value(sr, v, padding):
    """v [N, C, *L] with ``padding`` semiring zeros on both sides of every spatial dim."""
    if not any(padding):
        return v
    shape = tuple(v[0].shape[:2]) + tuple(n + 2 * p for n, p in zip(v[0].shape[2:], padding))
    inner = (slice(None), slice(None)) + tuple(slice(p, p + n) for p, n in zip(padding, v[0].shape[2:]))
    out = tuple(c.clone() for c in sr.zero(shape, v[0].dtype, v[0].device))
    for o, c in zip(out, v):
        o[inner] = c
    return out


def _rows(c, groups: int, inner_first: bool):
    """[N, G·k, *L] -> [G, N·P, k] (inner_first=False: the rows are (n, l))
    or [G, k, N·P] (inner_first=True); P = prod(L); no G dim for one group."""
    N, k, P = c.shape[0], c.shape[1] // groups, math.prod(c.shape[2:])
    c = c.reshape(N, groups, k, P)
    if inner_first:
        c = c.permute(1, 2, 0, 3).reshape(groups, k, N * P)
    else:
        c = c.permute(1, 0, 3, 2).reshape(groups, N * P, k)
    return c[0] if groups == 1 else c


def _stack_taps(parts, groups: int):
    """Per-tap [N, G·k, *L] tensors -> [G, N·P, k·T] (rows (n, l), columns (channel, tap))."""
    s = torch.stack(parts, -1)                                   # [N, G·k, *L, T]
    N, k, P, T = s.shape[0], s.shape[1] // groups, math.prod(s.shape[2:-1]), s.shape[-1]
    s = s.reshape(N, groups, k, P, T).permute(1, 0, 3, 2, 4).reshape(groups, N * P, k * T)
    return s[0] if groups == 1 else s


def _ungroup(c, groups: int, n: int, spatial: tuple):
    """[G, N·P, k] (or [N·P, k] for one group) -> [N, G·k, *spatial]."""
    k, P = c.shape[-1], math.prod(spatial)
    return c.reshape(groups, n, P, k).permute(1, 0, 3, 2).reshape(n, groups * k, *spatial)


def _grouped_weight(w, groups: int):
    """[G·a, b, *K] -> [G, a, b·T] (a 2-D view [a, b·T] for one group)."""
    a, bt = w.shape[0] // groups, math.prod(w.shape[1:])
    return w.reshape(a, bt) if groups == 1 else w.reshape(groups, a, bt)


def conv_values(sr, v, x, w, spec: _Spec, x_shape: tuple, needs, name: str) -> list:
    """Values of (input, weight, bias) of convolution node ``name`` from its output value v."""
    N = x_shape[0]
    K = tuple(w.shape[2:])
    S, L = tuple(x_shape[2:]), tuple(v[0].shape[2:])
    g = spec.groups
    taps = _taps(K)
    # the strided tap slices must lie inside the padded input (output, when transposed)
    inner, outer = (S, L) if spec.transposed else (L, S)
    for n, m, k, s, p, d in zip(inner, outer, K, spec.stride, spec.padding, spec.dilation):
        if n and (n - 1) * s + (k - 1) * d + 1 > m + 2 * p:
            raise GraphError(f"{name}: input {x_shape}, output {tuple(v[0].shape)} and kernel {K} do not "
                             f"fit stride {spec.stride}, padding {spec.padding}, dilation {spec.dilation}")
    out = [None, None, None]
    if needs[2]:
        out[2] = sr.sum(v, [0] + list(range(2, v[0].dim())))
    if not (needs[0] or needs[1]):
        return out
    if spec.transposed:
        # y[n, o, l·s − p + t·d] += x[n, c, l] W[c, o, t]: gather v at those positions per tap
        vp = _pad_value(sr, v, spec.padding)
        cols = tuple(_stack_taps([c[_tap_slices(t, S, spec)] for t in taps], g) for c in vp)  # [G, N·Q, Og·T]
        if needs[0]:
            wm = _grouped_weight(w, g).transpose(-1, -2)                                   # [G, Og·T, Cg]
            r = sr.matmul(cols, wm)
            out[0] = sr.map(r, lambda c: _ungroup(c, g, N, S))
        if needs[1]:
            xr = _rows(x.to(v[0].dtype), g, inner_first=True)                              # [G, Cg, N·Q]
            r = sr.rmatmul(xr, cols)                                                       # [G, Cg, Og·T]
            out[1] = sr.map(r, lambda c: c.reshape(w.shape))
        return out
    if needs[0]:
        rows = sr.map(v, lambda c: _rows(c, g, inner_first=False))                        # [G, N·P, Og]
        r = sr.matmul(rows, _grouped_weight(w, g))                                         # [G, N·P, Cg·T]
        T = len(taps)
        per_tap = sr.map(r, lambda c: _ungroup(c, g, N, L).reshape(N, x_shape[1], T, *L))  # [N, C, T, *L]
        padded = tuple(n + 2 * p for n, p in zip(S, spec.padding))
        acc = tuple(c.clone() for c in sr.zero((N, x_shape[1], *padded), v[0].dtype, v[0].device))
        for i, t in enumerate(taps):
            idx = _tap_slices(t, L, spec)
            new = sr.plus(tuple(a[idx] for a in acc), tuple(c[:, :, i] for c in per_tap))
            for a, n_ in zip(acc, new):
                a[idx] = n_
        crop = (slice(None), slice(None)) + tuple(slice(p, p + n) for p, n in zip(spec.padding, S))
        out[0] = tuple(a[crop] for a in acc)
    if needs[1]:
        pad = [p for p in reversed(spec.padding) for _ in range(2)]
        xp = F.pad(x.to(v[0].dtype), pad) if any(spec.padding) else x.to(v[0].dtype)
        cols = _stack_taps([xp[_tap_slices(t, L, spec)] for t in taps], g)              # [G, N·P, Cg·T]
        rows = sr.map(v, lambda c: _rows(c, g, inner_first=True))                          # [G, Og, N·P]
        r = sr.matmul(rows, cols)                                                          # [G, Og, Cg·T]
        out[1] = sr.map(r, lambda c: c.reshape(w.shape))
    return out


#: nodes of aten's convolution ops that a CPU forward records: F.conv*/nn.Conv*
#: and conv_transpose* record ConvolutionBackward0 (torch._convolution:
#: ConvolutionBackward1); the others come from calling the backend ops directly
CONV_NODES = ("ConvolutionBackward0", "ConvolutionBackward1", "SlowConv2DBackward0", "SlowConv3DBackward0",
              "SlowConvDilated2DBackward0", "SlowConvDilated3DBackward0", "SlowConvTranspose2DBackward0",
              "SlowConvTranspose3DBackward0", "MkldnnConvolutionBackward0")


@rule(*CONV_NODES)
def convolution(ctx):
    """Input, weight and bias of a convolution. Only the zero padding that the
    node itself applies is read; padding='same' with an even kernel and other
    padding modes record a padding op first."""
    x = ctx.saved("input" if ctx.has_saved("input") else "self")
    w = ctx.saved("weight", cast=False)
    if x is None or w is None:
        raise GraphError(f"{ctx.name}: the node saved no input or weight")
    v = ctx.grad()
    x_shape = tuple(x.shape)
    spec = _spec(ctx, x_shape, tuple(w.shape), tuple(v[0].shape))
    needs = [ctx.needs[i] if i < ctx.n_inputs else False for i in range(3)]
    out = conv_values(ctx.sr, v, x, w, spec, x_shape, needs, ctx.name)
    if needs[2]:
        out[2] = ctx.sr.map(out[2], lambda c: c.reshape(ctx.input_shape(2)))
    return out[:ctx.n_inputs] + [None] * max(0, ctx.n_inputs - 3)


@rule("ConvTbcBackward0")
def conv_tbc(ctx):
    """torch.conv_tbc(x [T, B, C], W [K, C, O], b [O], pad): conv1d of
    x.permute(1, 2, 0) with W.permute(2, 1, 0), output permuted back to [T', B, O]."""
    x = ctx.saved("self").permute(1, 2, 0)
    w = ctx.saved("weight", cast=False).permute(2, 1, 0)
    pad = int(ctx.saved("pad"))
    spec = _Spec((1,), (pad,), (1,), 1, False)
    v = ctx.sr.map(ctx.grad(), lambda c: c.permute(1, 2, 0))
    needs = [ctx.needs[i] if i < ctx.n_inputs else False for i in range(3)]
    out = conv_values(ctx.sr, v, x, w, spec, tuple(x.shape), needs, ctx.name)
    if out[0] is not None:
        out[0] = ctx.sr.map(out[0], lambda c: c.permute(2, 0, 1))
    if out[1] is not None:
        out[1] = ctx.sr.map(out[1], lambda c: c.permute(2, 1, 0))
    return out[:ctx.n_inputs]
