"""Reductions: sum and mean (edges x[i] -> y with weight 1 or 1/n), and the
ones whose edge weights depend on x: logsumexp (softmax weights), amax/amin
and the full max/min/median (1/count to each tied extreme, as torch's
backward), vector norms and var/std (their exact partial derivatives),
prod (each element's edge is the product of the others), and the scans cumsum,
cumprod and logcumsumexp."""

from __future__ import annotations

import math

import torch

from ..errors import GraphError
from . import rule, zero_where
from .linalg import matmul_rows


def _dims_list(dim, ndim):
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    dims = [d % ndim for d in dim] if ndim else []
    return dims or list(range(ndim))


def _restore(t, shape, dims, keepdim):
    """A reduced tensor broadcast back to ``shape`` (the reduced dims re-inserted)."""
    if not keepdim:
        for d in sorted(dims):
            t = t.unsqueeze(d)
    return t.expand(shape)


def _expand_back(ctx, shape, dims, keepdim, i: int = 0):
    """Value of output ``i`` broadcast back to the reduced input's shape."""
    return ctx.sr.map(ctx.grad(i), lambda c: _restore(c, shape, dims, keepdim))


@rule("SumBackward0")
def sum_all(ctx):
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    v = ctx.grad()
    return [ctx.sr.map(v, lambda c: c.reshape([1] * len(shape)).expand(shape))]


@rule("SumBackward1")
def sum_dim(ctx):
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    dims = _dims_list(ctx.saved("dim"), len(shape))
    return [_expand_back(ctx, shape, dims, ctx.saved("keepdim"))]


@rule("NansumBackward0")
def nansum(ctx):
    """nansum over dims: weight 1 from each non-NaN element, no edge from a NaN."""
    if not ctx.needs[0]:
        return [None]
    x = ctx.saved("self")
    dims = _dims_list(ctx.saved("dim"), x.dim())
    return [zero_where(ctx.sr, _expand_back(ctx, tuple(x.shape), dims, ctx.saved("keepdim")), torch.isnan(x))]


@rule("TraceBackward0")
def trace(ctx):
    """trace of a matrix: each diagonal element with weight 1."""
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    v = ctx.grad()
    z = ctx.sr.zero(shape, ctx.dtype, v[0].device)
    eye = torch.eye(*shape, dtype=torch.bool, device=v[0].device)
    return [tuple(torch.where(eye, c.expand(shape), zc) for c, zc in zip(v, z))]


@rule("MeanBackward0")
def mean_all(ctx):
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    n = math.prod(shape)
    v = ctx.sr.map(ctx.grad(), lambda c: c.reshape([1] * len(shape)).expand(shape))
    return [ctx.sr.scale(v, ctx.tensor(1.0 / max(n, 1)))]        # n = 0: no element, no edge


@rule("MeanBackward1")
def mean_dim(ctx):
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    dims = _dims_list(ctx.saved("dim"), len(shape))
    n = math.prod(shape[d] for d in dims)
    v = _expand_back(ctx, shape, dims, ctx.saved("keepdim"))
    return [ctx.sr.scale(v, ctx.tensor(1.0 / max(n, 1)))]        # n = 0: no element, no edge


def _weighted(ctx, weight_of):
    """Value of x for y = reduce(x, dims): v[y] broadcast back, ⊗ the edge
    weights ``weight_of(x, result restored to x's shape, dims)``."""
    if not ctx.needs[0]:
        return [None]
    x = ctx.saved("self")
    shape = tuple(x.shape)
    dims = _dims_list(ctx.saved("dim") if ctx.has_saved("dim") else None, len(shape))
    keepdim = bool(ctx.saved("keepdim")) if ctx.has_saved("keepdim") else False
    if not ctx.has_saved("dim"):                        # a full reduction to a 0-dim result
        dims, keepdim = list(range(len(shape))), False
    r = _restore(ctx.saved("result"), shape, dims, keepdim) if ctx.has_saved("result") else None
    return [ctx.sr.scale(_expand_back(ctx, shape, dims, keepdim), weight_of(x, r, dims))]


@rule("LogsumexpBackward0")
def logsumexp(ctx):
    """y = log Σ exp x: edge weights softmax(x) = exp(x − y)."""
    return _weighted(ctx, lambda x, r, dims: torch.exp(x - r))


def _tie_share(hit, dims, dtype):
    """1/count to each element ``hit`` marks over ``dims`` (ties share, as torch's backward)."""
    return hit.to(dtype) / hit.sum(dim=dims, keepdim=True).clamp_min(1)


@rule("AmaxBackward0", "AminBackward0", "MaxBackward1", "MinBackward1", "MedianBackward0", "NanmedianBackward0")
def extreme(ctx):
    """amax/amin over dims and the full max/min/median: weight 1/count to
    each element equal to the result (ties share, as torch's backward)."""
    return _weighted(ctx, lambda x, r, dims: _tie_share((x == r) | (torch.isnan(x) & torch.isnan(r)), dims,
                                                        x.dtype))


@rule("AminmaxBackward0")
def aminmax(ctx):
    """torch.aminmax: the min output's edges go to the elements equal to the
    min, the max output's to those equal to the max, 1/count each (ties
    share, as torch's backward); ⊕ of the two where an element is both."""
    if not ctx.needs[0]:
        return [None]
    x = ctx.saved("self")
    shape = tuple(x.shape)
    dim = ctx.saved("dim")
    keepdim = bool(ctx.saved("keepdim"))
    dims = _dims_list(dim, len(shape))                  # dim None: all (results 0-dim, or all 1s with keepdim)
    out = None
    for i, name in enumerate(("min", "max")):
        if ctx.grads[i] is None:
            continue
        r = _restore(ctx.saved(name), shape, dims, keepdim)
        hit = (x == r) | (torch.isnan(x) & torch.isnan(r))
        part = ctx.sr.scale(_expand_back(ctx, shape, dims, keepdim, i), _tie_share(hit, dims, x.dtype))
        out = part if out is None else ctx.sr.plus(out, part)
    return [out]


@rule("LinalgVectorNormBackward0", "NormBackward1")
def vector_norm(ctx):
    """y = (Σ|x|^p)^(1/p), finite p > 0: weight sign(x)|x|^(p−1) / y^(p−1)
    (0 where y = 0, and where x = 0 for p < 1, as torch's subgradient); the
    "norm" of order 0 (a count) has no edges; orders ±inf (max/min |x|):
    weight sign(x)/count to each element whose |x| is the result (ties
    share, as torch's backward)."""
    p = ctx.saved("ord") if ctx.has_saved("ord") else ctx.saved("p")
    p = 2.0 if p is None else float(p)
    if not (0 <= p or p == -math.inf):
        raise GraphError(f"{type(ctx.node).__name__}: only orders ≥ 0 and ±inf have a rule (ord={p})")

    def w(x, r, dims):
        if p == 0:
            return torch.zeros_like(x)
        if math.isinf(p):
            return torch.sign(x) * _tie_share(x.abs() == r, dims, x.dtype)
        safe = torch.where(r > 0, r, torch.ones_like(r))
        g = torch.sign(x) * x.abs() ** (p - 1) / safe ** (p - 1)
        return torch.where((r > 0) & (x != 0), g, torch.zeros_like(g))
    return _weighted(ctx, w)


def _var_weight(x, r, dims, correction: float, is_std: bool):
    """∂var/∂x_i = 2(x_i − μ)/(N − c); ∂std/∂x_i = (x_i − μ)/((N − c)·std), 0 where std = 0."""
    n = math.prod(x.shape[d] for d in dims)
    d = x - x.mean(dim=dims, keepdim=True)
    if not is_std:
        return 2 * d / (n - correction)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    return torch.where(r > 0, d / ((n - correction) * safe), torch.zeros_like(d))


@rule("VarBackward0", "StdBackward0", "VarMeanBackward0", "StdMeanBackward0")
def var(ctx):
    """var = Σ (x − μ)² / (N − c) and std = √var (weights: ``_var_weight``).
    var_mean/std_mean: the same for their first output, ⊕ the mean's 1/n
    edges for the second."""
    name = type(ctx.node).__name__
    is_std = name.startswith("Std")
    corr = ctx.saved("correction")
    corr = 1.0 if corr is None else float(corr)
    if not name.endswith("MeanBackward0"):
        return _weighted(ctx, lambda x, r, dims: _var_weight(x, r, dims, corr, is_std))
    if not ctx.needs[0]:
        return [None]
    x = ctx.saved("self")
    shape = tuple(x.shape)
    dims = _dims_list(ctx.saved("dim"), len(shape))
    keepdim = bool(ctx.saved("keepdim"))
    r = _restore(ctx.saved("result0"), shape, dims, keepdim) if is_std else None
    sr = ctx.sr
    v0 = sr.scale(_expand_back(ctx, shape, dims, keepdim, 0), _var_weight(x, r, dims, corr, is_std))
    n = math.prod(shape[d] for d in dims)
    v1 = sr.scale(_expand_back(ctx, shape, dims, keepdim, 1), ctx.tensor(1.0 / n))
    return [sr.plus(v0, v1)]


@rule("CumsumBackward0")
def cumsum(ctx):
    """y_i = Σ_{j≤i} x_j along dim: x_j -> y_i (i ≥ j) with weight 1, i.e.
    x_j = ⊕_{i≥j} v_i, a semiring product with the triangular 0/1 matrix
    (O(n²) per row; zero entries are no edge)."""
    if not ctx.needs[0]:
        return [None]
    v = ctx.grad()
    nd = v[0].dim()
    if nd == 0:
        return [v]
    dim = ctx.saved("dim") % nd
    n = v[0].shape[dim]
    tri = torch.ones(n, n, dtype=v[0].dtype, device=v[0].device).tril()      # tri[i, j] = [i ≥ j]
    moved = ctx.sr.map(v, lambda c: c.movedim(dim, -1))
    out = matmul_rows(ctx.sr, moved, tri)
    return [ctx.sr.map(out, lambda c: c.movedim(-1, dim))]


def _along_rows(ctx, jac_of):
    """Value of x for a scan y = f(x) along ``dim`` whose edges x_i -> y_k
    (k ≥ i) have weights that differ per row: ``jac_of(xr, yr)`` gives
    ``jac(r0, r1, c0, c1)`` -> [r, n (i), c1 − c0 (k)] from the rows of x and
    y; contracted row by row (O(n²) per row, in blocks)."""
    if not ctx.needs[0]:
        return [None]
    v = ctx.grad()
    nd = v[0].dim()
    if nd == 0:                                       # a 0-dim scan is the identity
        return [v]
    dim = ctx.saved("dim") % nd
    n = v[0].shape[dim]
    xr = ctx.saved("self").movedim(dim, -1).reshape(-1, n)
    yr = ctx.saved("result").movedim(dim, -1).reshape(-1, n)
    moved = ctx.sr.map(v, lambda c: c.movedim(dim, -1))
    out = ctx.sr._rowwise_chunked(moved, jac_of(xr, yr))
    return [ctx.sr.map(out, lambda c: c.movedim(-1, dim))]


def _upper(n: int, c0: int, c1: int, device):
    """[n, c1 − c0]: True where i ≤ k (rows i, columns k of c0..c1)."""
    return torch.arange(n, device=device).unsqueeze(-1) <= torch.arange(c0, c1, device=device)


@rule("CumprodBackward0")
def cumprod(ctx):
    """y_k = ∏_{i≤k} x_i: edge x_i -> y_k (k ≥ i) with weight ∏_{j≤k, j≠i} x_j,
    formed without dividing by x_i: the product before i times the product
    over i < j ≤ k (so zeros in x give exactly torch's edges)."""
    def jac_of(xr, yr):
        n = xr.shape[-1]
        idx = torch.arange(n, device=xr.device)
        before = torch.cat([torch.ones_like(xr[:, :1]), xr[:, :-1].cumprod(-1)], -1)      # ∏_{j<i}

        def jac(r0, r1, c0, c1):
            xs = xr[r0:r1, :c1].unsqueeze(-2)                                             # x_j, j < c1
            after = torch.where(idx[:, None] < idx[None, :c1], xs, 1.0).cumprod(-1)[..., c0:c1]
            return torch.where(_upper(n, c0, c1, xr.device), before[r0:r1, :, None] * after, 0.0)
        return jac
    return _along_rows(ctx, jac_of)


@rule("LogcumsumexpBackward0")
def logcumsumexp(ctx):
    """y_k = log Σ_{i≤k} exp(x_i): edge x_i -> y_k (k ≥ i) with weight
    exp(x_i − y_k) (the softmax of the prefix)."""
    def jac_of(xr, yr):
        n = xr.shape[-1]

        def jac(r0, r1, c0, c1):
            w = torch.exp(xr[r0:r1, :, None] - yr[r0:r1, None, c0:c1])
            return torch.where(_upper(n, c0, c1, xr.device), w, 0.0)
        return jac
    return _along_rows(ctx, jac_of)


def _exclusive_prod(x, d: int):
    """∏_{j≠i} x_j along ``d``, from the products before and after i (no
    division: one zero leaves only its own entry non-zero, two zero all)."""
    n = x.shape[d]
    if n <= 1:
        return torch.ones_like(x)
    one = torch.ones_like(x.narrow(d, 0, 1))
    before = torch.cat([one, x.narrow(d, 0, n - 1).cumprod(d)], d)
    after = torch.cat([x.narrow(d, 1, n - 1).flip(d).cumprod(d).flip(d), one], d)
    return before * after


@rule("ProdBackward0", "ProdBackward1")
def prod(ctx):
    """y = ∏ x over all elements or one dim: edge x_i -> y with weight ∏_{j≠i} x_j."""
    def w(x, r, dims):
        if len(dims) == 1:
            return _exclusive_prod(x, dims[0])
        return _exclusive_prod(x.reshape(-1), 0).reshape(x.shape)
    return _weighted(ctx, w)
