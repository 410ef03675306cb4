"""Pooling and upsampling.

Max pools (fixed, adaptive, fractional) read one input element per output,
the one at the index the forward saved: a weight-1 edge, scattered back with
⊕ (overlapping windows that pick the same element are fan-out).

Average pools, adaptive average pools and every interpolation mode (nearest,
nearest-exact, (bi/tri)linear, bicubic, the antialiased ones) are separable
linear maps: output o = (o_1, .., o_k) reads input i with weight
Π_d W_d[o_d, i_d], one 1-D map per spatial dim. They are walked one dim at
a time, which is exact in every semiring: a pair (i, o) is joined by one
path through the intermediate values (i_1, .., i_d, o_{d+1}, .., o_k), with
the product of the 1-D weights, and edge(a) ⊗ edge(b) = edge(ab). (Where two
taps of the forward read the same clamped index, e.g. a border in bilinear
interpolation, their weights are summed into one edge, as the op's Jacobian
has one entry there.) Each W_d is read off torch's own 1-D op applied to
unit vectors (the identity, in chunks; nearest modes: to the index vector),
so indices and weights are torch's own, including its float32 scale
arithmetic; they are cached per (op, parameters, sizes, dtype, device).
"""

from __future__ import annotations

import functools
import math

import torch

from ..errors import GraphError
from ..semirings.base import _occurrence_rank, scatter_plus
from . import rule
from .shape import _gather_back

aten = torch.ops.aten

#: elements of one chunk of the identity pushed through a 1-D op
_PROBE_ELEMS = 1 << 22


def _n_spatial(name: str) -> int:
    for k in (1, 2, 3):
        if f"{k}D" in name:
            return k
    raise GraphError(f"{name}: cannot tell how many spatial dims it pools")


def _per_dim(vals, k: int, default=None) -> tuple:
    """A saved int list as one entry per spatial dim (torch lets a single
    entry stand for all dims and an empty stride mean "= kernel_size")."""
    vals = tuple(vals) if vals is not None else ()
    if not vals:
        return default
    return vals * k if len(vals) == 1 else vals


# ---- max pools: one input element per output --------------------------------------------
@rule("MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0",
      "AdaptiveMaxPool3DBackward0", "FractionalMaxPool2DBackward0", "FractionalMaxPool3DBackward0")
def max_pool(ctx):
    """``F.max_pool1d/2d/3d`` (1-D pools record the 2-D node), adaptive and
    fractional max pools: output o reads the input element at the saved
    index (flat within its H·W or D·H·W plane) with weight 1, as torch's
    backward routes the gradient (also where windows overlap or tie)."""
    out = [None] * ctx.n_inputs
    if not ctx.needs[0]:
        return out
    k = _n_spatial(ctx.name)
    shape = ctx.input_shape(0)
    idx = ctx.saved("result1")
    dev = ctx.grad()[0].device
    lead, plane = shape[: len(shape) - k], math.prod(shape[len(shape) - k:])
    base = (torch.arange(math.prod(lead), device=dev) * plane).reshape(*lead, *([1] * k))
    out[0] = _gather_back(ctx, shape, base + idx.to(dev))
    return out


# ---- separable linear maps ---------------------------------------------------------------------
def _avg_probe(x, n_out, k, s, p, ceil_mode, count_include_pad, divisor_override):
    return aten.avg_pool2d(x[:, None, None, :], [1, k], [1, s], [0, p], ceil_mode, count_include_pad,
                           divisor_override)


def _adaptive_avg_probe(x, n_out):
    return torch.nn.functional.adaptive_avg_pool1d(x[:, None, :], n_out)


def _interp2d_probe(op):
    def probe(x, n_out, align_corners, scale):
        return op(x[:, None, None, :], [1, n_out], align_corners, None, scale)
    return probe


#: kind -> fn(x [B, n_in], n_out, *params) -> [B, ..., n_out]: the 1-D op of one spatial dim
_PROBES = {
    "avg": _avg_probe,
    "adaptive_avg": _adaptive_avg_probe,
    "linear": lambda x, n_out, ac, scale: aten.upsample_linear1d(x[:, None, :], [n_out], ac, scale),
    "bicubic": _interp2d_probe(aten.upsample_bicubic2d),
    "bilinear_aa": _interp2d_probe(aten._upsample_bilinear2d_aa),
    "bicubic_aa": _interp2d_probe(aten._upsample_bicubic2d_aa),
    "lanczos_aa": _interp2d_probe(getattr(aten, "_upsample_lanczos2d_aa", None)),
}
#: kind -> fn(index vector [1, 1, n_in] float64, n_out, scale) -> source index of each output
_INDEX_PROBES = {
    "nearest": lambda x, n_out, scale: aten.upsample_nearest1d(x, [n_out], scale),
    "nearest_exact": lambda x, n_out, scale: aten._upsample_nearest_exact1d(x, [n_out], scale),
}


@functools.lru_cache(maxsize=256)
def _taps(kind: str, params: tuple, n_in: int, n_out: int, dtype: torch.dtype, probe_dtype: torch.dtype,
          device: torch.device) -> tuple:
    """The 1-D map W [n_out, n_in] of one spatial dim as taps: a tuple of
    (outputs or None for all, input index per output, weight per output or
    None for weight 1); tap t holds each output's t-th non-zero entry."""
    if kind in _INDEX_PROBES:
        src = _INDEX_PROBES[kind](torch.arange(n_in, dtype=torch.float64, device=device).reshape(1, 1, n_in),
                                  n_out, *params).reshape(-1)
        if src.numel() != n_out:
            raise GraphError(f"upsampling ({kind}): torch's 1-D op gives {src.numel()} outputs, the node {n_out}")
        return ((None, src.round().long(), None),)
    outs, ins, ws = [], [], []
    step = max(1, _PROBE_ELEMS // max(1, n_in + n_out))
    for b0 in range(0, n_in, step):
        b = min(n_in, b0 + step) - b0
        rows = torch.arange(b, device=device)
        eye = torch.zeros(b, n_in, dtype=probe_dtype, device=device)
        eye[rows, rows + b0] = 1
        y = _PROBES[kind](eye, n_out, *params).reshape(b, -1)        # y[b, o] = W[o, b0 + b]
        if y.shape[1] != n_out:
            raise GraphError(f"pooling/upsampling ({kind}): torch's 1-D op gives {y.shape[1]} outputs, "
                             f"the node {n_out}")
        nz = (y != 0).nonzero()
        ins.append(nz[:, 0] + b0)
        outs.append(nz[:, 1])
        ws.append(y[nz[:, 0], nz[:, 1]])
    o, i, w = torch.cat(outs), torch.cat(ins), torch.cat(ws).to(dtype)
    if o.numel() == 0:
        return ()
    order, rank = _occurrence_rank(o)
    o, i, w = o[order], i[order], w[order]
    taps = []
    for t in range(int(rank.max()) + 1):
        sel = rank == t
        ot = o[sel]
        taps.append((None if ot.numel() == n_out else ot, i[sel], None if bool((w[sel] == 1).all()) else w[sel]))
    return tuple(taps)


def _pull_dim(sr, v, dim: int, taps: tuple, n_in: int):
    """Value of the input along ``dim`` (size n_in) from the value ``v`` of
    the output: ``x[i] = ⊕_{t, o: index_t[o] = i} edge(w_t[o]) ⊗ v[o]``."""
    v = sr.map(v, lambda c: c.movedim(dim, 0))
    rest = tuple(v[0].shape[1:])
    acc = None
    for outs, index, w in taps:
        part = v if outs is None else sr.map(v, lambda c: c.index_select(0, outs))
        if w is not None:
            part = sr.scale(part, w.reshape(-1, *([1] * len(rest))))
        s = scatter_plus(sr, part, index, n_in)
        acc = s if acc is None else sr.plus(acc, s)
    if acc is None:
        acc = sr.zero((n_in, *rest), v[0].dtype, v[0].device)
    return sr.map(acc, lambda c: c.movedim(0, dim))


def _probe_dtype(ctx):
    """The graph's own float dtype (torch's weights as the forward had them)."""
    dt = ctx.node._input_metadata[0].dtype
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def _separable(ctx, in_shape, maps, pre_scale=None):
    """Value of the input (``in_shape``) of a separable map whose last
    ``len(maps)`` dims are spatial; ``maps[d] = (kind, params)`` names the
    1-D op of spatial dim d; ``pre_scale`` an extra weight on every edge."""
    sr = ctx.sr
    v = ctx.grad()
    if pre_scale is not None:
        v = sr.scale(v, ctx.tensor(pre_scale))
    nd, k = len(in_shape), len(maps)
    dev, pdt = v[0].device, _probe_dtype(ctx)
    for d, (kind, params) in enumerate(maps):
        dim = nd - k + d
        n_in, n_out = in_shape[dim], v[0].shape[dim]
        try:
            taps = _taps(kind, tuple(params), int(n_in), int(n_out), ctx.dtype, pdt, dev)
        except (RuntimeError, TypeError) as exc:
            if isinstance(exc, GraphError):
                raise
            raise GraphError(f"{ctx.name}: could not read the 1-D map of spatial dim {d} off torch's "
                             f"op ({kind}): {exc}") from exc
        v = _pull_dim(sr, v, dim, taps, int(n_in))
    return v


@rule("AvgPool2DBackward0", "AvgPool3DBackward0")
def avg_pool(ctx):
    """``F.avg_pool1d/2d/3d`` (1-D pools record the 2-D node): input i ->
    output o with weight 1/divisor(o) for each i in o's window (padding,
    ceil_mode, count_include_pad and divisor_override as torch: the divisor
    is the product of the per-dim window lengths, or divisor_override)."""
    out = [None] * ctx.n_inputs
    if not ctx.needs[0]:
        return out
    k = _n_spatial(ctx.name)
    shape = ctx.input_shape(0)
    ks = _per_dim(ctx.saved("kernel_size"), k)
    st = _per_dim(ctx.saved("stride"), k, ks)
    pad = _per_dim(ctx.saved("padding"), k, (0,) * k)
    ceil_mode, cip = bool(ctx.saved("ceil_mode")), bool(ctx.saved("count_include_pad"))
    dov = ctx.saved("divisor_override")
    maps = [("avg", (int(ks[d]), int(st[d]), int(pad[d]), ceil_mode, cip, None if dov is None else 1))
            for d in range(k)]
    out[0] = _separable(ctx, shape, maps, None if dov is None else 1.0 / float(dov))
    return out


@rule("AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0")
def adaptive_avg_pool(ctx):
    """``F.adaptive_avg_pool1d/2d/3d``: output o averages the window
    [floor(o·In/Out), ceil((o+1)·In/Out)) of each dim, weight 1/len per dim.
    (An output of size 1 everywhere records a mean instead.)"""
    out = [None] * ctx.n_inputs
    if not ctx.needs[0]:
        return out
    k = _n_spatial(ctx.name)
    out[0] = _separable(ctx, ctx.input_shape(0), [("adaptive_avg", ())] * k)
    return out


_SCALE_NAMES = {1: ("scales",), 2: ("scales_h", "scales_w"), 3: ("scales_d", "scales_h", "scales_w")}
_UPSAMPLE = {"UpsampleNearest": "nearest", "UpsampleNearestExact": "nearest_exact", "UpsampleLinear": "linear",
             "UpsampleBilinear": "linear", "UpsampleTrilinear": "linear", "UpsampleBicubic": "bicubic"}


def _upsample_kind(name: str) -> str:
    base = name[: name.index("D")].rstrip("0123456789")
    kind = _UPSAMPLE[base]
    if "DAa" in name:
        kind = {"linear": "bilinear_aa", "bicubic": "bicubic_aa"}[kind]
    return kind


@rule(*[f"UpsampleNearest{k}DBackward0" for k in (1, 2, 3)],
      *[f"UpsampleNearestExact{k}DBackward0" for k in (1, 2, 3)],
      "UpsampleLinear1DBackward0", "UpsampleBilinear2DBackward0", "UpsampleTrilinear3DBackward0",
      "UpsampleBicubic2DBackward0", "UpsampleBilinear2DAaBackward0", "UpsampleBicubic2DAaBackward0",
      "UpsampleLanczos2DAaBackward0")
def upsample(ctx):
    """``F.interpolate`` in every mode (and ``nn.Upsample``): nearest and
    nearest-exact read one input element per output (weight 1); linear,
    bilinear, trilinear and bicubic (align_corners either way, sizes or
    scale factors, antialiased too) read up to 2 (4; more antialiased) per
    dim with torch's interpolation weights, their product over the dims."""
    out = [None] * ctx.n_inputs
    if not ctx.needs[0]:
        return out
    name = ctx.name
    k = _n_spatial(name)
    kind = "lanczos_aa" if name.startswith("UpsampleLanczos") else _upsample_kind(name)
    scales = [ctx.saved(s) for s in _SCALE_NAMES[k]]
    if kind.startswith("nearest"):
        maps = [(kind, (scales[d],)) for d in range(k)]
    else:
        ac = bool(ctx.saved("align_corners"))
        maps = [(kind, (ac, scales[d])) for d in range(k)]
    out[0] = _separable(ctx, tuple(ctx.saved("self_sym_sizes")), maps)
    return out
