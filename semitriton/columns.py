"""Jacobian columns read off a node's saved attributes.

The path search needs, for one input element x of a node, the output
elements u it feeds and the edge weights J[u, x]. ``PathGraph._column``
gets them generically (the node's real rule applied to ones, then one
autograd pass over it: a pass over the node's whole tensors per element).
For the nodes a top path crosses most, the column is known in closed form:

- index maps (view, reshape, clone, squeeze/unsqueeze, transpose, permute,
  select, slice): x feeds at most one u, with weight 1;
- ``Y = A @ B`` (mm, addmm): A[i, j] feeds Y[i, :] with weights α·B[j, :],
  B[j, k] feeds Y[:, k] with weights α·A[:, j];
- ``a + α·b`` / ``a − α·b`` of same-shaped tensors: one edge (1, ±α);
- layer norm: x_i feeds its row's y_j with γ_j r (δ_ij − (1 + x̂_i x̂_j)/n);
- the canonical RMS norm (``patch``'s one-node norm): x_i feeds its row's
  y_j with γ_j r (δ_ij − x̂_i x̂_j / n), the diagonal formed without
  cancellation as the semirings form it (``Semiring.rms_factors``).

:func:`structural_column` returns those in ``_column``'s format, or None
where the node is not one of them (or does not carry what is needed), and
the generic path runs. The entries equal the generic ones exactly (the real
rule on ones multiplies each weight by 1), except the norms', which are the
same Jacobian rounded once per entry (the RMS norm's diagonal without the
cancellation the real rule has where one element dominates its row).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .rules import _signed

Column = list            # [(output slot, LongTensor of flat output indices, float64 weights)]

#: False: every column takes the generic path (benchmarks compare the two)
ENABLED = True

_IDENTITY = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0",
                       "CloneBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
                       "SqueezeBackward2"})


def _unravel(flat: int, shape: tuple) -> list:
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat //= s
    return out[::-1]


def _ravel(idx, shape: tuple) -> int:
    f = 0
    for i, s in zip(idx, shape):
        f = f * s + i
    return f


def _one(u: Optional[int]) -> Column:
    if u is None:
        return []
    return [(0, torch.tensor([u], dtype=torch.long), torch.ones(1, dtype=torch.float64))]


def _nonzero(o: int, flat: torch.Tensor, w: torch.Tensor) -> Column:
    w = w.detach().double().cpu()
    keep = torch.nonzero(w, as_tuple=True)[0]
    return [(o, flat[keep], w[keep])]


def _index_map(name: str, node, in_shape: tuple, out_shape: tuple, flat: int) -> Optional[int]:
    """The output element input element ``flat`` is copied to (None: none)."""
    if name in _IDENTITY:
        return flat
    x = _unravel(flat, in_shape)
    if name == "TBackward0":
        return _ravel(x[::-1], out_shape)
    if name == "TransposeBackward0":
        a, b = (int(d) % len(in_shape) for d in _signed((node._saved_dim0, node._saved_dim1)))
        x[a], x[b] = x[b], x[a]
        return _ravel(x, out_shape)
    if name == "PermuteBackward0":
        dims = [int(d) % len(in_shape) for d in _signed(tuple(node._saved_dims))]
        return _ravel([x[d] for d in dims], out_shape)
    if name == "SelectBackward0":
        d = int(_signed(node._saved_dim)) % len(in_shape)
        if x[d] != int(_signed(node._saved_index)) % in_shape[d]:
            return None
        return _ravel(x[:d] + x[d + 1:], out_shape)
    if name == "SliceBackward0":
        d = int(_signed(node._saved_dim)) % len(in_shape)
        start, stop, step = slice(*_signed((node._saved_start, node._saved_end, node._saved_step))
                                  ).indices(in_shape[d])
        r = range(start, stop, step)
        if x[d] not in r:
            return None
        x[d] = r.index(x[d])
        return _ravel(x, out_shape)
    raise KeyError(name)


def _matmul(node, name: str, slot: int, flat: int) -> Optional[Column]:
    """Y = α·A @ B (+ β·bias): the column of A (slot ``a``) or B (slot ``b``)."""
    a_slot, b_slot = (0, 1) if name == "MmBackward0" else (1, 2)
    alpha = 1.0 if name == "MmBackward0" else _signed(node._saved_alpha)
    A = node._saved_self if name == "MmBackward0" else node._saved_mat1
    B = node._saved_mat2
    if slot == a_slot and isinstance(B, torch.Tensor) and B.dim() == 2:
        J, K = B.shape
        i, j = divmod(flat, J)
        w = B[j]
        u = i * K + torch.arange(K)
    elif slot == b_slot and isinstance(A, torch.Tensor) and A.dim() == 2:
        I, J = A.shape
        K = node._input_metadata[0].shape[-1]
        j, k = divmod(flat, K)
        w = A[:, j]
        u = torch.arange(I) * K + k
    else:
        return None
    if alpha != 1:
        w = w * alpha
    return _nonzero(0, u, w)


_INDEX_MAPS = _IDENTITY | {"TBackward0", "TransposeBackward0", "PermuteBackward0", "SelectBackward0",
                           "SliceBackward0"}


def _input_meta_shape(node, slot: int) -> Optional[tuple]:
    fn, nr = node.next_functions[slot]
    if fn is None:
        return None
    if hasattr(fn, "variable"):
        return tuple(fn.variable.shape)
    return tuple(fn._input_metadata[nr].shape)


def _add(node, name: str, slot: int, flat: int) -> Optional[Column]:
    """a ± α·b: one edge per element where the input has the output's shape."""
    out_shape = tuple(node._input_metadata[0].shape)
    if _input_meta_shape(node, slot) != out_shape:
        return None                                      # broadcast: the generic column
    if slot == 0:
        w = 1.0
    else:
        alpha = _signed(getattr(node, "_saved_alpha", 1))
        if not isinstance(alpha, (int, float)):
            return None
        w = float(alpha) * (-1.0 if name == "SubBackward0" else 1.0)
    if w == 0:
        return []
    return [(0, torch.tensor([flat], dtype=torch.long), torch.tensor([w], dtype=torch.float64))]


def _rms_norm(node, slot: int, flat: int, dtype: torch.dtype) -> Optional[Column]:
    """Row of x_i in the canonical RMS norm: weights to y_j of its row."""
    from .fused._saved import saved_tensors
    from .fused.rms_norm import CanonicalRMSNorm
    from .semirings.base import Semiring, rms_norm_rows
    if slot != 0 or getattr(node, "_forward_cls", None) is not CanonicalRMSNorm:
        return None
    x, weight = saved_tensors(node)
    n = x.shape[-1]
    r, i = divmod(flat, n)
    xhat, rstd = rms_norm_rows(x.reshape(-1, n)[r:r + 1], node.eps, dtype)
    gamma = None if weight is None else weight.to(dtype) + node.offset
    d, a, b = Semiring.rms_factors(xhat, rstd, gamma, dtype, node.eps)
    w = (a[0, i] * b[0]).expand(n).clone()
    w[i] = d[0, i]
    return _nonzero(0, r * n + torch.arange(n), w)


def _layer_norm(node, slot: int, flat: int, dtype: torch.dtype) -> Optional[Column]:
    """Row of x_i in ``F.layer_norm``: weights to y_j of its row."""
    if slot != 0:
        return None
    x = node._saved_input
    n = math.prod(int(d) for d in _signed(tuple(node._saved_normalized_shape)))
    r, i = divmod(flat, n)
    rs = node._saved_result2.reshape(-1)[r].to(dtype)
    xh = (x.reshape(-1, n)[r].to(dtype) - node._saved_result1.reshape(-1)[r].to(dtype)) * rs
    weight = node._saved_weight
    g = torch.ones(n, dtype=dtype, device=x.device) if weight is None else weight.reshape(n).to(dtype)
    w = -(g * rs) * (1 + xh[i] * xh) / n
    w[i] = w[i] + g[i] * rs
    return _nonzero(0, r * n + torch.arange(n), w)


def structural_column(node, slot: int, flat: int, dtype: torch.dtype = torch.float64) -> Optional[Column]:
    """Non-zero J[u, x] of input ``slot``'s element ``flat`` of ``node`` for
    the nodes listed in the module docstring, read off the saved attributes
    (``dtype``: the pass's compute dtype, for the RMS norm's weights); None
    where the generic column is needed."""
    if not ENABLED:
        return None
    name = type(node).__name__
    try:
        if name in ("AddBackward0", "SubBackward0"):
            return _add(node, name, slot, flat)
        if name == "CanonicalRMSNormBackward":
            return _rms_norm(node, slot, flat, dtype)
        if name == "NativeLayerNormBackward0":
            return _layer_norm(node, slot, flat, dtype)
        if name in _INDEX_MAPS:
            metas = node._input_metadata
            if slot != 0 or len(metas) != 1:
                return None
            out_shape = tuple(metas[0].shape)
            in_shape = _input_shape(node, name, out_shape)
            if in_shape is None or math.prod(in_shape) <= flat:
                return None
            if name in _IDENTITY and math.prod(in_shape) != math.prod(out_shape):
                return None
            return _one(_index_map(name, node, in_shape, out_shape, flat))
        if name in ("MmBackward0", "AddmmBackward0"):
            return _matmul(node, name, slot, flat)
    except (AttributeError, RuntimeError, TypeError, ValueError, KeyError):
        return None
    return None


def _input_shape(node, name: str, out_shape: tuple) -> Optional[tuple]:
    """The forward input's shape: saved by most index maps, else implied by the output."""
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    if sizes is not None:
        return tuple(int(s) for s in sizes)
    if name == "TBackward0":
        return out_shape[::-1]
    if name == "TransposeBackward0":
        a, b = (int(d) % len(out_shape) for d in _signed((node._saved_dim0, node._saved_dim1)))
        s = list(out_shape)
        s[a], s[b] = s[b], s[a]
        return tuple(s)
    if name == "PermuteBackward0":
        dims = [int(d) % len(out_shape) for d in _signed(tuple(node._saved_dims))]
        s = [0] * len(out_shape)
        for k, d in enumerate(dims):
            s[d] = out_shape[k]
        return tuple(s)
    if name in ("AliasBackward0", "CloneBackward0"):
        return out_shape
    if name == "UnsqueezeBackward0":
        d = int(_signed(node._saved_dim)) % len(out_shape)
        return out_shape[:d] + out_shape[d + 1:]
    return None
