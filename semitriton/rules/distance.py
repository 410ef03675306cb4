"""Distances and bilinear forms: ``torch.cdist`` (CdistBackward0),
``torch.pdist`` (PdistBackward0), ``torch.dist`` (DistBackward0),
``torch._trilinear`` (TrilinearBackward0: ``F.bilinear``, ``nn.Bilinear``)
and ``torch.linalg.cross`` (LinalgCrossBackward0).

cdist: d[b, i, j] = ‖x1[b, i] − x2[b, j]‖_p. The edge x1[b, i, k] -> d[b, i, j]
has weight ∂d/∂x1 = g(δ, d), δ = x1[b, i, k] − x2[b, j, k], formed as torch's
backward forms it: p = 1: sign δ; p < 2: sign δ·|δ|^(p−1) / d^(p−1);
p = 2: δ / d; p = ∞: sign δ where |δ| = d (every tied coordinate, as
torch); other p: δ·|δ|^(p−2) / d^(p−1); 0 (no edge) where d = 0, and where
δ = 0 for p < 1; p = 0 has no edges. x2's edges have weight g(−δ, d) = −g(δ, d).
pdist is the same over the pairs i < j of one tensor's rows. cdist with
p = 2 and more than 25 rows (``compute_mode`` left at its default) records
EuclideanDistBackward0, the same edges at p = 2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import GraphError
from ..semirings.base import _CHUNK_ELEMS
from . import rule


def _dist_weight(diff: Tensor, dist: Tensor, p: float) -> Tensor:
    """∂‖δ‖_p/∂δ_k from δ_k and the distance, 0 where torch's backward gives 0."""
    if p == 1:
        return torch.sign(diff)
    if math.isinf(p):
        return torch.where(diff.abs() == dist, torch.sign(diff), 0.0)
    none = dist == 0
    if p == 2:
        w = diff / dist
    elif p < 2:
        w = torch.sign(diff) * diff.abs().pow(p - 1) / dist.pow(p - 1)
        if p < 1:
            none = none | (diff == 0)
    else:
        w = diff * diff.abs().pow(p - 2) / dist.pow(p - 1)
    return torch.where(none, 0.0, w)


def _pair_value(sr, x: Tensor, y: Tensor, dist: Tensor, v, p: float):
    """x[..., i, k] = ⊕_j edge(g(x[..., i, k] − y[..., j, k], dist[..., i, j])) ⊗ v[..., i, j],
    in chunks of rows i (the weights are a [.., i, k, j] Jacobian)."""
    *lead, n_i, n_k = x.shape
    per_row = max(1, math.prod(lead) * y.shape[-2] * n_k)
    step = max(1, _CHUNK_ELEMS // per_row)
    outs = []
    for i0 in range(0, n_i, step):
        diff = x[..., i0:i0 + step, :].unsqueeze(-2) - y.unsqueeze(-3)           # [..., i, j, k]
        w = _dist_weight(diff, dist[..., i0:i0 + step, :].unsqueeze(-1), p)
        outs.append(sr.rowwise(w.transpose(-1, -2), sr.map(v, lambda c: c[..., i0:i0 + step, :])))
    if not outs:
        return sr.zero(tuple(x.shape), v[0].dtype, v[0].device)
    return tuple(torch.cat(cs, -2) for cs in zip(*outs))


@rule("CdistBackward0")
def cdist(ctx):
    """``torch.cdist(x1, x2, p)`` (batch dims broadcast: ⊕ over them)."""
    return _cdist_values(ctx, float(ctx.saved("p")))


@rule("EuclideanDistBackward0")
def euclidean_dist(ctx):
    """``torch.cdist(x1, x2)`` at p = 2 with more than 25 rows, which torch
    computes through matmuls (``_euclidean_dist``: the result clamped at
    1e-30 before the root) and records as one node: the edges of p = 2,
    δ / d, 0 where d = 0 (as its backward's masked ratio)."""
    return _cdist_values(ctx, 2.0)


def _cdist_values(ctx, p: float) -> list:
    out = [None, None]
    if p == 0 or not any(ctx.needs):
        return out
    x1, x2, d = ctx.saved("x1"), ctx.saved("x2"), ctx.saved("result")
    lead = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    x1e, x2e = x1.expand(*lead, *x1.shape[-2:]), x2.expand(*lead, *x2.shape[-2:])
    sr, v = ctx.sr, ctx.grad()
    if ctx.needs[0]:
        out[0] = sr.sum_to_shape(_pair_value(sr, x1e, x2e, d, v, p), ctx.input_shape(0))
    if ctx.needs[1]:
        vt = sr.map(v, lambda c: c.transpose(-1, -2))
        out[1] = sr.sum_to_shape(_pair_value(sr, x2e, x1e, d.transpose(-1, -2), vt, p), ctx.input_shape(1))
    return out


@rule("PdistBackward0")
def pdist(ctx):
    """``torch.pdist(x, p)``: d lists ‖x_i − x_j‖_p for i < j row by row; x_i's
    edges go to the pairs it is in."""
    p = float(ctx.saved("p"))
    if p == 0 or not ctx.needs[0]:
        return [None]
    x, d = ctx.saved("self"), ctx.saved("result")
    sr, v = ctx.sr, ctx.grad()
    n = x.shape[0]
    iu, ju = torch.triu_indices(n, n, 1, device=x.device)
    dist = x.new_zeros(n, n)
    dist[iu, ju] = d
    dist[ju, iu] = d
    full = tuple(c.clone() for c in sr.zero((n, n), v[0].dtype, v[0].device))   # the diagonal: no pair
    for f, c in zip(full, v):
        f[iu, ju] = c
        f[ju, iu] = c
    return [_pair_value(sr, x, x, dist, full, p)]


# ---- torch.dist ------------------------------------------------------------------------------------
def _norm_weight(d: Tensor, n: Tensor, p: float) -> Tensor:
    """∂‖d‖_p/∂d_k over all elements of d (norm n), formed as torch's
    ``norm_backward`` with a unit gradient: p = 1 sgn d; p = 2 d/n; p = ±∞
    sgn d / count on the elements with |d| = n (ties share); p < 1
    sgn d·|d|^(p−1)·n^(1−p), none where d = 0; otherwise sgn d·|d|^(p−1)/n^(p−1)
    (d·|d|^(p−2)/n^(p−1) for p ≥ 2); none anywhere where n = 0."""
    if p == 1:
        return torch.sgn(d)
    if p == 2:
        return (d / n).masked_fill(n == 0, 0)
    if math.isinf(p):
        mask = (d.abs() == n) | torch.isnan(d.abs())
        return torch.sgn(d) * ((1.0 / mask.sum().to(d.dtype)) * mask)      # (an integer count: not a float32 1/n)
    if p < 1:
        return torch.sgn(d) * d.abs().pow(p - 1).masked_fill(d == 0, 0) * n.pow(1 - p)
    scaled = torch.sgn(d) * d.abs().pow(p - 1) if p < 2 else d * d.abs().pow(p - 2)
    return scaled * (1.0 / n.pow(p - 1)).masked_fill(n == 0, 0)


@rule("DistBackward0")
def dist(ctx):
    """``torch.dist(x, y, p)`` = ‖x − y‖_p over all elements (x, y broadcast):
    d = x − y, edge x_k -> out of weight ∂‖d‖_p/∂d_k (``_norm_weight``), y_k's
    the negative; broadcast operands ⊕ over their copies; p = 0 (a count)
    has no edges."""
    out = [None, None]
    p = float(ctx.saved("p"))
    if p == 0 or not any(ctx.needs):
        return out
    d = ctx.saved("self") - ctx.saved("other")
    w = _norm_weight(d, ctx.saved("result"), p)
    v = ctx.sr.map(ctx.grad(), lambda c: c.expand(d.shape))
    for i, sign in ((0, 1.0), (1, -1.0)):
        if ctx.needs[i]:
            out[i] = ctx.sr.sum_to_shape(ctx.sr.scale(v, w * sign), ctx.input_shape(i))
    return out


# ---- torch.linalg.cross ------------------------------------------------------------------------------
@rule("LinalgCrossBackward0")
def linalg_cross(ctx):
    """``torch.linalg.cross(a, b, dim)`` (and ``torch.cross``; batch dims
    broadcast): c_i = a_{i+1} b_{i+2} − a_{i+2} b_{i+1} (indices mod 3), so
    a_m -> c_{m+1} has weight −b_{m+2} and a_m -> c_{m+2} weight b_{m+1};
    b_m -> c_{m+1} weight a_{m+2} and b_m -> c_{m+2} weight −a_{m+1} (two
    edges per element, ⊕-ed; a zero factor is no edge)."""
    out = [None, None]
    if not any(ctx.needs):
        return out
    sr, v = ctx.sr, ctx.grad()
    shape = tuple(v[0].shape)             # the broadcast shape
    dim = ctx.saved("dim") % len(shape)

    def ahead(t, k):                      # t_{i+k} at position i
        return t.roll(-k, dim)

    v1, v2 = sr.map(v, lambda c: ahead(c, 1)), sr.map(v, lambda c: ahead(c, 2))
    # torch saves only the operand the other one's edges need (b for a's, a for b's)
    for i, name, sign in ((0, "other", -1.0), (1, "self", 1.0)):
        if ctx.needs[i]:
            other = ctx.saved(name).expand(shape)
            val = sr.plus(sr.scale(v1, sign * ahead(other, 2)), sr.scale(v2, -sign * ahead(other, 1)))
            out[i] = sr.sum_to_shape(val, ctx.input_shape(i))
    return out


# ---- torch._trilinear ---------------------------------------------------------------------------
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _sub(dims) -> str:
    return "".join(_LETTERS[d] for d in dims)


def _contract(sr, v, ops, dims, m: int, sumdim: set, out_dims: list, sizes: dict):
    """Value of operand m of y[O] = Σ_{sumdim} Π_t op_t[dims_t] (O = the dims not
    summed): op_m[r] = ⊕_{o} edge(P[o, r]) ⊗ v[o] with P the Jacobian entry,
    the product of the other two operands summed over the summed dims that
    op_m lacks. Laid out as one semiring matmul v'[B, RV, C] · P'[B, C, RP]:
    B the dims of v, P and op_m, C those of v and P only (fan-out of op_m),
    RV / RP those of op_m and v only / P only; a dim of op_m alone has
    weights constant along it."""
    a, b = [t for t in range(3) if t != m]
    res = dims[m]
    lp = sorted((set(dims[a]) | set(dims[b])) - (sumdim - set(res)))
    batch = [d for d in lp if d in out_dims and d in res]
    contr = [d for d in lp if d in out_dims and d not in res]
    rp = [d for d in lp if d not in out_dims]
    rv = [d for d in out_dims if d not in lp]
    alone = [d for d in res if d not in out_dims and d not in lp]

    def size(ds):
        return math.prod(sizes[d] for d in ds)

    p = torch.einsum(f"{_sub(dims[a])},{_sub(dims[b])}->{_sub(batch + contr + rp)}", ops[a], ops[b])
    p = p.reshape(size(batch), size(contr), size(rp))
    perm = [out_dims.index(d) for d in batch + rv + contr]
    vv = sr.map(v, lambda c: c.permute(perm).reshape(size(batch), size(rv), size(contr)))
    r = sr.matmul(vv, p)                                                  # [B, RV, RP]
    order = batch + rv + rp + alone
    shape = [sizes[d] for d in batch + rv + rp]
    back = [order.index(d) for d in res]
    return sr.map(r, lambda c: c.reshape(*shape, *([1] * len(alone))).expand(*shape, *(sizes[d] for d in alone))
                  .permute(back))


def _trilinear_value(sr, v, ops, dims, m: int, sumdim: set, out_dims: list, sizes: dict):
    """:func:`_contract` with the Jacobian P built in chunks of its largest dim
    (results side by side along a dim of op_m, ⊕-ed along a fan-out dim)."""
    a, b = [t for t in range(3) if t != m]
    lp = sorted((set(dims[a]) | set(dims[b])) - (sumdim - set(dims[m])))
    total = math.prod(sizes[d] for d in lp)
    if total <= _CHUNK_ELEMS or not lp:
        return _contract(sr, v, ops, dims, m, sumdim, out_dims, sizes)
    cd = max(lp, key=lambda d: sizes[d])
    step = max(1, _CHUNK_ELEMS // (total // sizes[cd]))
    acc = []
    for s0 in range(0, sizes[cd], step):
        n = min(step, sizes[cd] - s0)
        part_ops = [t.narrow(ds.index(cd), s0, n) if t is not None and cd in ds else t for t, ds in zip(ops, dims)]
        part_v = sr.map(v, lambda c: c.narrow(out_dims.index(cd), s0, n)) if cd in out_dims else v
        part = _contract(sr, part_v, part_ops, dims, m, sumdim, out_dims, {**sizes, cd: n})
        if cd in dims[m]:
            acc.append(part)
        else:
            acc = [part if not acc else sr.plus(acc[0], part)]
    if cd in dims[m]:
        return tuple(torch.cat(cs, dims[m].index(cd)) for cs in zip(*acc))
    return acc[0]


@rule("TrilinearBackward0")
def trilinear(ctx):
    """``torch._trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim)``:
    each operand unsqueezed at its expand dims, y = Σ_{sumdim} i1·i2·i3 (the
    summed dims dropped). ``F.bilinear`` records it as
    y[b, o] = Σ_{k, l} x1[b, k] W[o, k, l] x2[b, l]: edges x1[b, k] -> y[b, o]
    of weight Σ_l W[o, k, l] x2[b, l], W[o, k, l] -> y[b, o] of weight
    x1[b, k] x2[b, l], x2[b, l] -> y[b, o] of weight Σ_k x1[b, k] W[o, k, l]."""
    # torch saves only the operands some other operand's edges need: an operand
    # that alone requires grad is not saved, and its shape comes from its input
    ops = [ctx.saved(f"i{t}") for t in (1, 2, 3)]
    shapes = [tuple(o.shape) if o is not None else ctx.input_shape(t) for t, o in enumerate(ops)]
    total = len(shapes[0]) + len(ctx.saved("expand1"))
    expand = [{int(d) % total for d in ctx.saved(f"expand{t}")} for t in (1, 2, 3)]
    sumdim = {int(d) % total for d in ctx.saved("sumdim")}
    dims = [[d for d in range(total) if d not in e] for e in expand]
    sizes = {d: s for sh, ds in zip(shapes, dims) for d, s in zip(ds, sh)}
    out_dims = [d for d in range(total) if d not in sumdim]
    v = ctx.grad()
    if (total > len(_LETTERS) or any(sh[i] != sizes[d] for sh, ds in zip(shapes, dims) for i, d in enumerate(ds))
            or tuple(v[0].shape) != tuple(sizes.get(d) for d in out_dims)):
        raise GraphError(f"{ctx.name}: operands {shapes} with expand dims "
                         f"{[sorted(e) for e in expand]} and output {tuple(v[0].shape)} are not a contraction "
                         f"over dims {sorted(sumdim)} that the rule knows")
    return [_trilinear_value(ctx.sr, v, ops, dims, m, sumdim, out_dims, sizes) if ctx.needs[m] else None
            for m in range(3)]
