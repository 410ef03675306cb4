"""Layer norm and torch's fused RMS norm: one dense per-row Jacobian each, not
the mean/var sub-graph; group norm and batch norm as the layer-norm Jacobian
over their own rows (a sample's group; a channel's batch in training mode)."""

from __future__ import annotations

import math

import torch

from ..errors import GraphError
from ..semirings.base import layer_norm_rows
from . import rule


@rule("NativeLayerNormBackward0")
def layer_norm(ctx):
    out = [None] * ctx.n_inputs
    if not any(ctx.needs):
        return out
    x = ctx.saved("input")
    nshape = tuple(ctx.saved("normalized_shape"))
    mean, rstd = ctx.saved("result1"), ctx.saved("result2")
    weight = ctx.saved("weight")
    v = ctx.grad()
    if ctx.needs[0]:
        out[0] = ctx.sr.layer_norm_from_input(v, x, nshape, mean, rstd, weight)
    if ctx.n_inputs > 1 and ctx.needs[1]:        # y = x̂ γ + β: edge γ_j <- weight x̂_j
        xhat, _ = layer_norm_rows(x, nshape, mean, rstd)
        out[1] = ctx.sr.sum_to_shape(ctx.sr.scale(v, xhat.reshape(x.shape)), ctx.input_shape(1))
    if ctx.n_inputs > 2 and ctx.needs[2]:
        out[2] = ctx.sr.sum_to_shape(v, ctx.input_shape(2))
    return out


@rule("FusedRmsNormBackward0")
def fused_rms_norm(ctx):
    """``F.rms_norm`` / ``nn.RMSNorm`` as torch records them on CUDA
    (``aten._fused_rms_norm``; on the CPU they are composite and walk op by
    op): y = γ ⊙ x̂, x̂ = x·r, r = (mean(x²) + eps)^-½ over the normalized dims,
    one primitive with the canonical Jacobian, as the patched RMS norm. The
    second output r (rarely used) has the edges ∂r/∂x_i = −x̂_i r²/n."""
    out = [None] * ctx.n_inputs
    if not any(ctx.needs):
        return out
    x = ctx.saved("input")
    nshape = tuple(ctx.saved("normalized_shape"))
    n = math.prod(nshape)
    lead = tuple(x.shape[: x.dim() - len(nshape)])
    rstd = ctx.saved("result1").to(ctx.dtype).reshape(*lead, 1)
    xhat = x.to(ctx.dtype).reshape(*lead, n) * rstd
    v_y, v_r = ctx.grads[0], ctx.grads[1] if len(ctx.grads) > 1 else None
    sr = ctx.sr
    if ctx.needs[0] and (v_y is not None or v_r is not None):
        parts = []
        if v_y is not None:
            weight = ctx.saved("weight")
            g = None if weight is None else weight.reshape(n)
            parts.append(sr.rms_norm(sr.map(v_y, lambda c: c.reshape(*lead, n)), xhat, rstd, g))
        if v_r is not None:
            parts.append(sr.scale(sr.map(v_r, lambda c: c.reshape(*lead, 1)), -xhat * (rstd * rstd / n)))
        val = parts[0] if len(parts) == 1 else sr.plus(*parts)
        out[0] = sr.map(val, lambda c: c.reshape(x.shape))
    if ctx.n_inputs > 1 and ctx.needs[1] and v_y is not None:      # y_j = γ_j x̂_j: edge γ_j <- x̂_j
        out[1] = sr.sum_to_shape(sr.scale(v_y, xhat.reshape(x.shape)), ctx.input_shape(1))
    return out


# ---- group norm and batch norm: the layer-norm Jacobian over other rows --------------------------
def _unused_stats(ctx):
    """The mean/rstd outputs of a norm node (outputs 1, 2) carry no rule."""
    if any(g is not None for g in ctx.grads[1:]):
        raise GraphError(f"{ctx.name}: a value reached the saved mean/rstd outputs of the norm "
                         "(used downstream of the forward); only the normalized output has a rule")


def _channel_rows(t):
    """[N, C, *] -> rows [C, N·prod(*)] (one row per channel)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _from_channel_rows(t, shape):
    """Inverse of :func:`_channel_rows` for a tensor of ``shape``."""
    return t.reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)


def _per_channel(t, ndim):
    """A [C] tensor shaped to broadcast over [N, C, *] (ndim dims)."""
    return t.reshape(1, -1, *([1] * (ndim - 2)))


def _channel_sum(sr, v, ndim):
    """⊕ of a [N, C, *] value over every dim but the channel dim, as [C]."""
    return sr.map(sr.sum(v, [d for d in range(ndim) if d != 1]), lambda c: c.reshape(-1))


def _rows_in_series(sr, v, weight, x_rows, mean, rstd, to_rows, from_rows):
    """Value of x for y = γ_c x̂ (+ β_c), x̂ normalised over rows of x: the edge
    γ_c in series with the layer-norm Jacobian of each row (``to_rows`` /
    ``from_rows`` move a [N, C, *] tensor to the rows ``x_rows`` and back)."""
    vg = v if weight is None else sr.scale(v, _per_channel(weight, v[0].dim()))
    r = sr.layer_norm_from_input(sr.map(vg, to_rows), x_rows, (x_rows.shape[-1],), mean, rstd, None)
    return sr.map(r, from_rows)


def _affine_values(ctx, v, xhat_of, out):
    """Values of the per-channel γ (edges x̂, ``xhat_of()`` built only when
    needed) and β (edges 1) into ``out[1]`` and ``out[2]``."""
    nd = v[0].dim()
    if ctx.n_inputs > 1 and ctx.needs[1]:
        out[1] = _channel_sum(ctx.sr, ctx.sr.scale(v, xhat_of()), nd)
    if ctx.n_inputs > 2 and ctx.needs[2]:
        out[2] = _channel_sum(ctx.sr, v, nd)
    return out


#: the longest channel row (N·prod(spatial)) a training-mode batch norm is walked with
_BATCH_ROW_LIMIT = 1 << 15


@rule("NativeGroupNormBackward0")
def group_norm(ctx):
    """``F.group_norm`` / ``nn.GroupNorm`` (x [N, C, *], G groups): per (sample,
    group) row of n = C/G·prod(*) elements, y_j = γ_c(j) x̂_j + β_c(j) with the
    layer-norm Jacobian ∂x̂_j/∂x_i = rstd (δ_ij − (1 + x̂_i x̂_j)/n); walked as
    the edge γ_c(j) in series with the normalisation (one path per edge, the
    same value in every semiring). γ_c <- y_j by x̂_j and β_c <- y_j by 1 for
    every element j of channel c."""
    out = [None] * ctx.n_inputs
    if not any(ctx.needs):
        return out
    _unused_stats(ctx)
    sr = ctx.sr
    x = ctx.saved("input")
    shape = tuple(x.shape)
    N, G = int(ctx.saved("N")), int(ctx.saved("group"))
    weight = ctx.saved("weight")
    v = ctx.grad()
    xr = x.reshape(N, G, -1)
    mean, rstd = ctx.saved("result1"), ctx.saved("result2")
    if ctx.needs[0]:
        out[0] = _rows_in_series(sr, v, weight, xr, mean, rstd, lambda c: c.reshape(xr.shape),
                                 lambda c: c.reshape(shape))
    return _affine_values(ctx, v, lambda: layer_norm_rows(xr, (xr.shape[-1],), mean, rstd)[0].reshape(shape), out)


@rule("NativeBatchNormBackward0", "NativeBatchNormLegitBackward0", "NativeBatchNormLegitBackward1",
      "NativeBatchNormLegitNoTrainingBackward0", "BatchNormWithUpdateBackward0", "BatchNormNoUpdateBackward0",
      "CudnnBatchNormBackward0", "MiopenBatchNormBackward0")
def batch_norm(ctx):
    """``F.batch_norm`` / ``nn.BatchNorm*d`` (and ``F.instance_norm``, which
    torch records as a training-mode batch norm over [1, N·C, *]); x [N, C, *].

    Eval mode (running statistics): y = γ_c (x − μ_c)·r_c + β_c with
    r_c = (running_var_c + eps)^-½, one edge γ_c r_c per element. Training
    mode (batch statistics): every element of channel c reaches every other
    through the batch mean and variance; the edges are the layer-norm
    Jacobian over the channel's n = N·prod(*) elements, rstd = save_invstd
    (walked as γ_c in series with it, as group norm). The semirings without
    a closed form contract this n×n Jacobian per channel (O(n²) per channel);
    n above ``_BATCH_ROW_LIMIT`` raises a GraphError that says to call
    ``model.eval()``. γ_c <- y by x̂ and β_c <- y by 1 in both modes.

    cuDNN and MIOpen save the
    same tensors (``epsilon`` for eps; torch._decomp runs their backwards as
    ``native_batch_norm_backward``)."""
    out = [None] * ctx.n_inputs
    if not any(ctx.needs):
        return out
    _unused_stats(ctx)
    sr = ctx.sr
    x = ctx.saved("input")
    shape = tuple(x.shape)
    nd = len(shape)
    if nd < 2:
        raise GraphError(f"{ctx.name}: an input of shape {shape} (batch norm needs [N, C, ...])")
    if ctx.has_saved("training"):
        training = bool(ctx.saved("training"))
    else:
        training = ctx.name.startswith("BatchNormWithUpdate")
    eps = float(ctx.saved("eps") if ctx.has_saved("eps") else ctx.saved("epsilon"))
    weight = ctx.saved("weight")
    v = ctx.grad()
    if training:
        n = math.prod(shape) // shape[1]
        if ctx.needs[0] and n > _BATCH_ROW_LIMIT:
            raise GraphError(
                f"{ctx.name}: training-mode batch norm couples all {n} = N·prod(spatial) elements of each "
                f"channel through the batch statistics (a dense {n}×{n} Jacobian per channel, more than "
                f"{_BATCH_ROW_LIMIT} per row is not attempted); call model.eval() to normalise with the "
                "running statistics (one edge per element), or walk a smaller batch")
        mean, invstd = ctx.saved("result1"), ctx.saved("result2")
        xr = _channel_rows(x)
        if ctx.needs[0]:
            out[0] = _rows_in_series(sr, v, weight, xr, mean, invstd, _channel_rows,
                                     lambda c: _from_channel_rows(c, shape))
        return _affine_values(ctx, v, lambda: _from_channel_rows(
            layer_norm_rows(xr, (xr.shape[-1],), mean, invstd)[0], shape), out)
    rm, rv = ctx.saved("running_mean"), ctx.saved("running_var")
    if rm is None or rv is None:
        raise GraphError(f"{ctx.name}: eval-mode batch norm without running statistics")
    r = torch.rsqrt(rv.to(ctx.dtype) + eps)
    if ctx.needs[0]:
        out[0] = sr.scale(v, _per_channel(r if weight is None else weight * r, nd))
    return _affine_values(ctx, v, lambda: (x - _per_channel(rm, nd)) * _per_channel(r, nd), out)
