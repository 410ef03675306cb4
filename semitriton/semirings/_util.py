"""Numerical helpers shared by the built-in semirings (log space, exclusive
row reductions, chunked broadcast contractions)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from . import _cpu_compiled

NEG_INF = float("-inf")
POS_INF = float("inf")

_CHUNK_ELEMS = 1 << 22
_CPU_CHUNK_ELEMS = 1 << 19


def log_abs(w: Tensor) -> Tensor:
    """log|w| with log 0 = -inf (no edge)."""
    return torch.log(torch.abs(w))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def activation_derivative(x: Tensor, kind: str) -> Tensor:
    """f'(x) for the activations with a fused rule, in forms that keep their
    relative accuracy in the tails (where f' is tiny but not zero):

    - ``gelu`` (erf form): Φ(x) + x φ(x), Φ(x) = ½ erfc(-x/√2);
    - ``gelu_tanh``: ½(1 + t) + ½ x (1 - t²) c (1 + 3·0.044715 x²), t = tanh u,
      u = c (x + 0.044715 x³), c = √(2/π), with e = exp(-2|u|):
      1 + t = 2/(1 + e) (u ≥ 0) or 2e/(1 + e) (u < 0), 1 - t² = 4e/(1 + e)²;
    - ``silu``: σ(x) (1 + x σ(-x))."""
    if kind == "gelu":
        cdf = 0.5 * torch.special.erfc(-x / math.sqrt(2.0))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return cdf + x * pdf
    if kind == "gelu_tanh":
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)
        e = torch.exp(-2 * u.abs())
        half_one_plus_t = torch.where(u >= 0, 1.0, e) / (1 + e)
        return half_one_plus_t + 2 * x * e / (1 + e) ** 2 * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
    if kind == "silu":
        # σ(x) for x < -80 from log σ(x): torch's sigmoid is 1/(1 + e^-x), 0 once
        # e^-x overflows (x < -88.7 in float32), where σ(x) is still a subnormal
        s = torch.where(x < -80.0, torch.exp(torch.nn.functional.logsigmoid(x)), torch.sigmoid(x))
        return s * (1 + x * torch.sigmoid(-x))
    raise ValueError(f"unknown activation {kind!r} (gelu, gelu_tanh, silu)")


def weight(w: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    """A per-weight transform in ``dtype``, cached across passes for parameters:
    "abs" |w|, "log_abs" log|w|, "xlogx" |w| log|w|, "same" w; the ``_t``
    kinds ("log_abs_t", "same_t") are transposed to a contiguous [K, J]."""
    from .. import weight_cache
    if kind == "same" and w.dtype == dtype:
        return w
    name, fn = _transform(kind, dtype)
    return weight_cache.transform(w, name, fn)


@functools.lru_cache(maxsize=None)
def _transform(kind: str, dtype: torch.dtype):
    fns = {"abs": lambda t: torch.abs(t.to(dtype)), "log_abs": lambda t: log_abs(t.to(dtype)),
           "xlogx": lambda t: xlogx(torch.abs(t.to(dtype))), "same": lambda t: t.to(dtype),
           "log_abs_t": lambda t: log_abs(t.to(dtype)).transpose(-1, -2).contiguous(),
           "same_t": lambda t: t.to(dtype).transpose(-1, -2).contiguous()}
    return f"ref:{kind}:{dtype}", fns[kind]


def finite_or_zero(t: Tensor) -> Tensor:
    """t where finite, 0 where ±inf or NaN (one kernel)."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def finite_amax(x: Tensor, dim, keepdim: bool = True) -> Tensor:
    """Max over ``dim``; rows that are all -inf get 0 (a neutral shift), and so
    does a reduction over nothing (an empty operand of a product)."""
    if x.numel() == 0:
        return torch.zeros_like(x.sum(dim=dim, keepdim=keepdim))
    return finite_or_zero(torch.amax(x, dim=dim, keepdim=keepdim))


def xlogx(a: Tensor) -> Tensor:
    """a·log a with 0·log 0 = 0."""
    return torch.where(a > 0, a * torch.log(torch.where(a > 0, a, torch.ones_like(a))), torch.zeros_like(a))


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num/den, 0 where den == 0."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def exclusive_sum(t: Tensor, dim: int = -1) -> Tensor:
    """``out_i = Σ_{j≠i} t_j`` for non-negative ``t`` without cancellation: the
    row's largest term is excluded exactly, every other i uses S - t_i (which is
    then at least half of S)."""
    s = t.sum(dim, keepdim=True)
    imax = t.argmax(dim, keepdim=True)
    masked = t.scatter(dim, imax, torch.zeros_like(imax, dtype=t.dtype))
    rest = masked.sum(dim, keepdim=True)
    out = (s - t).clamp_min(0)
    is_max = torch.zeros_like(t, dtype=torch.bool).scatter(dim, imax, True)
    return torch.where(is_max, rest.expand_as(t), out)


def complement(y: Tensor, dim: int = -1) -> Tensor:
    """``1 - y_i`` for probability rows ``y`` (Σ_j y_j = 1 along ``dim``) without
    cancellation: the entry above 3/4 (a row has at most one) reads
    Σ_{j≠i} y_j, which float32 keeps where y_i itself rounds to nearly 1 (a
    saturated softmax: 1 - y_i formed from y_i = 1 - 1e-7 is off by ~50%, and
    0 once y_i rounds to 1); the others read 1 - y_i (at least 1/4, exact to
    rounding)."""
    big = y > 0.75
    rest = torch.where(big, torch.zeros_like(y), y).sum(dim, keepdim=True)
    return torch.where(big, rest.expand_as(y), 1 - y)


def exclusive_sum_signed(u: Tensor, key: Tensor, dim: int = -1) -> Tensor:
    """``out_i = Σ_{j≠i} u_j`` where ``key`` (non-negative) marks the dominant
    term: the row's largest-``key`` term is excluded exactly."""
    s = u.sum(dim, keepdim=True)
    imax = key.argmax(dim, keepdim=True)
    masked = u.scatter(dim, imax, torch.zeros_like(imax, dtype=u.dtype))
    rest = masked.sum(dim, keepdim=True)
    is_max = torch.zeros_like(u, dtype=torch.bool).scatter(dim, imax, True)
    return torch.where(is_max, rest.expand_as(u), s - u)


def exclusive_max(c: Tensor, dim: int = -1) -> Tensor:
    """``out_i = max_{j≠i} c_j`` (row top-2); -inf for rows of one element."""
    n = c.shape[dim]
    if n == 1:
        return torch.full_like(c, NEG_INF)
    top = torch.topk(c, 2, dim=dim)
    v1 = top.values.narrow(dim, 0, 1)
    v2 = top.values.narrow(dim, 1, 1)
    i1 = top.indices.narrow(dim, 0, 1)
    idx = torch.arange(n, device=c.device).view([-1 if d == (dim % c.dim()) else 1 for d in range(c.dim())])
    return torch.where(idx == i1, v2, v1)


def exclusive_min(c: Tensor, dim: int = -1) -> Tensor:
    return -exclusive_max(-c, dim)


def log_matmul(l: Tensor, w_abs: Tensor) -> Tensor:
    """``out[..., i, k] = log Σ_j exp(l[..., i, j]) · w_abs[..., j, k]``, computed
    with a per-row shift (so only one operand lives in log space)."""
    m = finite_amax(l, -1)
    z = torch.matmul(torch.exp(l - m), w_abs)
    return torch.log(z) + m


def log_rmatmul(w_abs: Tensor, l: Tensor) -> Tensor:
    """``out[..., i, k] = log Σ_j w_abs[..., i, j] · exp(l[..., j, k])`` (per-column shift)."""
    m = finite_amax(l, -2)
    z = torch.matmul(w_abs, torch.exp(l - m))
    return torch.log(z) + m


def _k_chunks(I: int, J: int, K: int, lead, budget: int = _CHUNK_ELEMS) -> list[tuple[int, int]]:
    per_k = max(1, math.prod(lead) * I * J)
    step = max(1, budget // per_k)
    return [(k0, min(K, k0 + step)) for k0 in range(0, K, step)]


def _kj(w: Tensor, w_t) -> Tensor:
    """``w`` [..., J, K] as a contiguous [..., K, J] tensor (``w_t`` when given)."""
    if w_t is not None:
        return w_t
    t = w.transpose(-1, -2)
    return t if t.is_contiguous() else t.contiguous()


def _budget(t: Tensor) -> int:
    """Elements per chunk of a broadcast contraction: large on GPUs, cache-sized on CPUs."""
    return _CHUNK_ELEMS if t.is_cuda else _CPU_CHUNK_ELEMS


def tropical_matmul(l: Tensor, lw: Tensor, lw_t: Tensor | None = None) -> Tensor:
    """Max-plus product ``out[..., i, k] = max_j l[..., i, j] + lw[..., j, k]``
    (reference: chunked broadcast, reduced over the contiguous last dim;
    ``lw_t``: ``lw`` already transposed to a contiguous [..., K, J]). On CPUs
    the compiled kernel of ``_cpu_compiled`` runs where it is chosen."""
    lead = torch.broadcast_shapes(l.shape[:-2], lw.shape[:-2])
    I, J = l.shape[-2:]
    K = lw.shape[-1]
    if J == 0 or I == 0 or K == 0:
        return l.new_full((*lead, I, K), NEG_INF)
    lt = _kj(lw, lw_t)
    if not l.is_cuda:
        out = _cpu_compiled.max_plus(l, lt, lead)
        if out is not None:
            return out
    lt = lt.expand(*lead, K, J)
    l = l.expand(*lead, I, J).unsqueeze(-2)                       # [..., I, 1, J]
    outs = [torch.amax(l + lt[..., k0:k1, :].unsqueeze(-3), dim=-1)
            for k0, k1 in _k_chunks(I, J, K, lead, _budget(l))]
    return torch.cat(outs, -1)


def signed_max_matmul(p: Tensor, n: Tensor, w: Tensor, w_t: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Signed extreme products through a matrix of edges:
    ``P[i,k] = max_j (w_jk>0 ? w_jk p_ij : w_jk<0 ? w_jk n_ij : -inf)`` and
    ``N[i,k] = min_j (w_jk>0 ? w_jk n_ij : w_jk<0 ? w_jk p_ij : +inf)``.

    Since p ≥ n, the right candidate is max(w p, w n) (min for N) whenever the
    edge and the value exist; missing edges (w = 0) and zero values (p = -inf)
    are excluded by an additive -inf penalty (reference: chunked broadcast,
    reduced over the contiguous last dim; ``w_t``: ``w`` as a contiguous
    [..., K, J]; on CPUs the compiled kernel of ``_cpu_compiled`` where it is
    chosen)."""
    lead = torch.broadcast_shapes(p.shape[:-2], w.shape[:-2])
    I, J = p.shape[-2:]
    K = w.shape[-1]
    if J == 0 or I == 0 or K == 0:
        return (p.new_full((*lead, I, K), NEG_INF), p.new_full((*lead, I, K), POS_INF))
    wt = _kj(w, w_t)
    if not p.is_cuda:
        out = _cpu_compiled.signed_max_times(p, n, wt, lead)
        if out is not None:
            return out
    live = p != NEG_INF
    pen_v = torch.where(live, 0.0, NEG_INF).to(p.dtype).expand(*lead, I, J).unsqueeze(-2)   # [..., I, 1, J]
    pe = torch.where(live, p, 0.0).expand(*lead, I, J).unsqueeze(-2)
    ne = torch.where(live, n, 0.0).expand(*lead, I, J).unsqueeze(-2)
    wt = wt.expand(*lead, K, J)
    pen_w = torch.where(wt != 0, 0.0, NEG_INF).to(p.dtype)
    ps, ns = [], []
    for k0, k1 in _k_chunks(I, J, K, lead, _budget(p)):
        wc = wt[..., k0:k1, :].unsqueeze(-3)                      # [..., 1, kc, J]
        pen = pen_v + pen_w[..., k0:k1, :].unsqueeze(-3)
        a, b = wc * pe, wc * ne
        ps.append(torch.amax(torch.maximum(a, b) + pen, dim=-1))
        ns.append(torch.amin(torch.minimum(a, b) - pen, dim=-1))
    return torch.cat(ps, -1), torch.cat(ns, -1)


def rope_partner(t: Tensor) -> Tensor:
    """t[..., (j + D/2) mod D]: the value each input element of a rotary
    embedding meets through its sin edge."""
    h = t.shape[-1] // 2
    return torch.cat((t[..., h:], t[..., :h]), dim=-1)


def rope_partner_weight(sin: Tensor) -> Tensor:
    """Weight of the rotary edge x[j] -> y[(j + D/2) mod D]: +sin for j < D/2, -sin for j ≥ D/2."""
    h = sin.shape[-1] // 2
    return torch.cat((sin[..., h:], -sin[..., :h]), dim=-1)
