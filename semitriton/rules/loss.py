"""Losses, each ONE primitive with its exact Jacobian (not the sub-graph of
the ops a loss could be written with).

An elementwise loss ℓ_i = f(x_i, y_i) has one edge x_i -> out per element
(and y_i -> out where the target requires grad): with reduction "none" the
edge x_i -> ℓ_i of weight ∂f/∂x_i, with "sum" x_i -> L of the same weight,
with "mean" x_i -> L of weight ∂f/∂x_i / N. The weights are formed as torch's
backward forms them (its own ``*_backward`` ops with a unit gradient where
aten has one, its formulas otherwise), so the subgradients at kinks are
torch's. ``F.nll_loss`` (and ``F.cross_entropy``, which torch records as
log-softmax then NLL) has one edge per sample (and position): the logit of
the target class, weight −w[t] (÷ Σ w[t] over the non-ignored samples for
"mean"); ignored samples have no edge. The target of an NLL loss is an
index (no value).
"""

from __future__ import annotations

import torch

from ..errors import GraphError
from . import rule

#: torch's reduction enum (at::Reduction)
_NONE, _MEAN, _SUM = 0, 1, 2


def _expanded(ctx, shape):
    """The output's value broadcast to the per-element ``shape`` (a reduced
    loss's one value reaches every element's edge)."""
    return ctx.sr.map(ctx.grad(), lambda c: c.expand(shape))


def _elementwise_loss(ctx, weight_of):
    """Values of the loss's inputs (self, target): ``weight_of(i)`` gives the
    per-element edge weights ∂ℓ/∂input_i (already ÷ N for "mean") in the
    loss's element shape; broadcast inputs ⊕ over their copies."""
    out = [None] * ctx.n_inputs
    if not any(ctx.needs):
        return out
    shape = tuple(ctx.saved("self").shape)
    v = _expanded(ctx, shape)
    for i in range(ctx.n_inputs):
        if ctx.needs[i]:
            w = weight_of(i).to(ctx.dtype)
            out[i] = ctx.sr.sum_to_shape(ctx.sr.scale(v, w), ctx.input_shape(i))
    return out


def _unit(ctx):
    """A unit output gradient: one per element for reduction "none", else one number."""
    x = ctx.saved("self")
    red = int(ctx.saved("reduction"))
    return torch.ones(x.shape if red == _NONE else (), dtype=x.dtype, device=x.device), red


@rule("MseLossBackward0")
def mse_loss(ctx):
    """ℓ = (x − y)²: x edge 2(x − y), y edge 2(y − x) (÷ N for mean)."""
    x, y = ctx.saved("self"), ctx.saved("target")
    g, red = _unit(ctx)
    pair = (x, y)
    return _elementwise_loss(ctx, lambda i: torch.ops.aten.mse_loss_backward(g, pair[i], pair[1 - i], red))


@rule("SoftMarginLossBackward0")
def soft_margin_loss(ctx):
    """ℓ = log(1 + exp(−y·x)): x edge −y·σ(−y·x) (÷ N for mean), as torch's
    backward (torch has no derivative for the target y)."""
    x, y = ctx.saved("self"), ctx.saved("target")
    g, red = _unit(ctx)
    return _elementwise_loss(ctx, lambda i: torch.ops.aten.soft_margin_loss_backward(g, x, y, red))


@rule("SmoothL1LossBackward0")
def smooth_l1_loss(ctx):
    """ℓ = ½d²/β for |d| < β, |d| − ½β else (d = x − y): x edge d/β inside,
    sign(d) outside (|d| = β counts as outside, as torch); y edge the
    same with d = y − x (÷ N for mean)."""
    x, y = ctx.saved("self"), ctx.saved("target")
    beta = float(ctx.saved("beta"))
    g, red = _unit(ctx)
    pair = (x, y)
    return _elementwise_loss(ctx, lambda i: torch.ops.aten.smooth_l1_loss_backward(g, pair[i], pair[1 - i], red,
                                                                                    beta))


@rule("HuberLossBackward0")
def huber_loss(ctx):
    """ℓ = ½d² for |d| < δ, δ(|d| − ½δ) else (d = x − y): x edge d inside,
    δ·sign(d) outside; y edge the same with d = y − x (÷ N for mean)."""
    x, y = ctx.saved("self"), ctx.saved("target")
    delta = float(ctx.saved("delta"))
    g, red = _unit(ctx)
    pair = (x, y)
    return _elementwise_loss(ctx, lambda i: torch.ops.aten.huber_loss_backward(g, pair[i], pair[1 - i], red, delta))


def _mean_div(ctx, w, red):
    return w / ctx.saved("self").numel() if red == _MEAN else w


@rule("BinaryCrossEntropyBackward0")
def binary_cross_entropy(ctx):
    """ℓ = −w[y log x + (1 − y) log(1 − x)] (logs clamped at −100): x edge
    w(x − y)/max(x(1 − x), 1e-12) (torch's ``binary_cross_entropy_backward``),
    y edge −w·logit(x) (÷ N for mean)."""
    x, y = ctx.saved("self"), ctx.saved("target")
    weight = ctx.saved("weight")
    g, red = _unit(ctx)

    def weight_of(i):
        if i == 0:
            return torch.ops.aten.binary_cross_entropy_backward(g, x, y, weight, red)
        w = -torch.logit(x)
        if weight is not None:
            w = w * weight
        return _mean_div(ctx, w, red)
    return _elementwise_loss(ctx, weight_of)


@rule("BinaryCrossEntropyWithLogitsBackward0")
def binary_cross_entropy_with_logits(ctx):
    """ℓ = −w[p·y log σ(x) + (1 − y) log(1 − σ(x))] (w the weight, p the
    pos_weight, both broadcast): x edge w[(p·y + 1 − y)σ(x) − p·y] (w[σ(x) − y]
    without p), y edge w[log σ(−x) − p log σ(x)] (−w·x without p); ÷ N for
    mean. Written as torch's backward writes them."""
    x, y = ctx.saved("self"), ctx.saved("target")
    weight, pos_weight = ctx.saved("weight"), ctx.saved("pos_weight")
    red = int(ctx.saved("reduction"))

    def weight_of(i):
        if i == 0:
            if pos_weight is not None:
                t = pos_weight * y
                w = (t + 1 - y) * torch.sigmoid(x) - t
            else:
                w = torch.sigmoid(x) - y
        elif pos_weight is not None:
            w = torch.nn.functional.logsigmoid(-x) - torch.nn.functional.logsigmoid(x) * pos_weight
        else:
            w = -x
        if weight is not None:
            w = w * weight
        return _mean_div(ctx, w.expand(x.shape), red)
    return _elementwise_loss(ctx, weight_of)


@rule("NllLossBackward0", "NllLoss2DBackward0")
def nll_loss(ctx):
    """``F.nll_loss(x, t, weight, ignore_index, reduction)`` (x [C], [N, C] or
    [N, C, d1, ...]; torch records [N, C, d1, d2, ...] inputs as a 4-D
    NllLoss2D of a view): ℓ_n = −w[t_n]·x[n, t_n] (w = 1 without a weight):
    one edge x[n, t_n] -> out of weight −w[t_n] (÷ the total weight
    Σ_{n not ignored} w[t_n] for "mean"), none from the other classes or
    from a sample whose target is ``ignore_index``."""
    out = [None] * ctx.n_inputs
    if not ctx.needs[0]:
        return out
    x = ctx.saved("self")
    t = ctx.saved("target").to(x.device)
    weight = ctx.saved("weight")
    red = int(ctx.saved("reduction"))
    ignore = int(ctx.saved("ignore_index"))
    cdim = 0 if x.dim() == 1 else 1
    if tuple(t.shape) != tuple(x.shape[:cdim] + x.shape[cdim + 1:]):
        raise GraphError(f"{ctx.name}: input {tuple(x.shape)} and target {tuple(t.shape)} are not [N, C, ...] "
                         "and [N, ...]")
    valid = t != ignore
    tc = torch.where(valid, t, 0)
    w = torch.ones(t.shape, dtype=x.dtype, device=x.device) if weight is None else weight[tc]
    if red == _MEAN:                                   # torch: w[t]·(−1/total_weight)
        w = w * -(1.0 / ctx.tensor(ctx.saved("total_weight")))
    else:
        w = -w
    w = torch.where(valid, w, 0.0)
    jac = torch.zeros(x.shape, dtype=ctx.dtype, device=x.device).scatter(cdim, tc.unsqueeze(cdim),
                                                                         w.unsqueeze(cdim))
    v = ctx.grad()
    if red == _NONE:
        v = ctx.sr.map(v, lambda c: c.unsqueeze(cdim))
    v = ctx.sr.map(v, lambda c: c.expand(x.shape))
    out[0] = ctx.sr.scale(v, jac)
    return out
