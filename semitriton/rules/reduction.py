"""Reductions: sum and mean (edges x[i] -> y with weight 1 or 1/n)."""

from __future__ import annotations

import math

from . import rule


def _dims_list(dim, ndim):
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    dims = [d % ndim for d in dim] if ndim else []
    return dims or list(range(ndim))


def _expand_back(ctx, shape, dims, keepdim):
    v = ctx.grad()
    if not keepdim:
        for d in sorted(dims):
            v = ctx.sr.map(v, lambda c: c.unsqueeze(d))
    return ctx.sr.map(v, lambda c: c.expand(shape))


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


@rule("MeanBackward0")
def mean_all(ctx):
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    n = math.prod(shape)
    v = ctx.sr.map(ctx.grad(), lambda c: c.reshape([1] * len(shape)).expand(shape))
    return [ctx.sr.scale(v, ctx.tensor(1.0 / n))]


@rule("MeanBackward1")
def mean_dim(ctx):
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    dims = _dims_list(ctx.saved("dim"), len(shape))
    n = math.prod(shape[d] for d in dims)
    v = _expand_back(ctx, shape, dims, ctx.saved("keepdim"))
    return [ctx.sr.scale(v, ctx.tensor(1.0 / n))]
