"""Fused flash-style semiring attention backward (op ``attention``).

For every built-in semiring, ``attention(vo, q, k, v, bias, causal, scale,
needs) -> (vq, vk, vv)`` pulls the value ``vo`` of ``O = softmax(q kᵀ·scale +
bias) v`` back to q, k and v through the canonical graph S -> P -> O of
the README's "Semirings" (masked scores and P = 0 are not edges), like
``semitriton.semirings.*.attention`` (the torch reference, which is the spec).

Layout of the computation, for every semiring (FlashAttention-2 style, memory
linear in T, no Tq×Tk matrix in global memory):

1. ``_attn_lse_kernel`` (program = query block): row max ``RM_i`` and row sum
   ``RL_i = Σ_j exp(S_ij - RM_i)`` of the scores, so that every later sweep
   recomputes ``P_ij = exp(S_ij - RM_i) / RL_i`` exactly as the reference does
   (fully masked rows: RL = 0, P = 0). For ``real`` it also returns
   ``Δ_i = Σ_j P_ij dP_ij``.
2. a row-statistics sweep (program = query block) of the softmax rule:
   ``_attn_stats_sum_kernel`` (abs, entropy: the row max of
   ``log(P_ij Z_P,ij)``, its argmax and the exclusive sums with the dominant
   term excluded exactly), ``_attn_stats_maxabs_kernel`` and
   ``_attn_stats_max_kernel`` (row top-2 with argmax).
3. a backward sweep (program = key block of one k/v head, looping over the
   query heads of its group and over query blocks) that recomputes S, P, the
   value of P and of S per tile, accumulates the k and v values in registers
   (⊕ over the group's query heads) and ⊕-accumulates the q values into a
   global buffer with atomics (add for the log-space sums, which share one
   per-row scale fixed by the statistics; max/min for the tropical semirings).

Log-space semirings keep linear accumulators with running per-row / per-column
shifts (online rescaling) chosen like the reference's per-row / per-column
shifts, so nothing underflows where the reference does not (one exception:
the S node's z is formed in linear space as P·B + (1-P)·t, relative to the
row's largest P·Z_P, where the reference adds logs; it differs only for
P < ~1e-36). The tropical
semirings (maxabs, max) run their max-plus / signed max-times contractions as
rank-1 updates on CUDA cores, or CHUNK-wide broadcast-and-reduce steps
([CHUNK, X, Y] reduced over the chunk, which the compiler keeps inside each
thread); a tile that must be read along its other axis goes through a small
per-program scratch buffer (BM×BN floats per tile).

Precision: S = q kᵀ is exact for bf16/fp16 inputs (native tensor-core dot,
fp32 accumulation) and an fp32 dot for fp32 inputs; every other dot has fp32
operands. fp32 dots use ``input_precision`` "tf32x3" on the GPU (the first
launch plan of every semiring; the tropical kernels' earlier "ieee" score dot
is still a candidate, see ``_plans``; ``DOT_PRECISION`` overrides); the
interpreter computes them exactly. Logs taken per score use
the SFU's lg2.approx (``_fastmath.py``: ~1e-7 relative in the number a log
stands for); logs per row / per output stay accurate.

Declined (``NotImplemented``, the torch reference runs): values not float32;
q/k/v not float32/bfloat16/float16 or of different dtypes; fewer than 3 dims;
differing batch dims; H not a multiple of Hk; empty sequences; head dims over
256; batch × heads over 65535; a bias that does not broadcast to
[..., H, Tq, Tk].
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from ._common import bucket, choose, interpreting
from ._fastmath import fast_log, finite_or_zero, logaddexp
from .registry import register

_NEG = float("-inf")
_POS = float("inf")


# ------------------------------------------------------------------ helpers
@triton.jit
def _score(q, k, offs_m, offs_n, Tq, Tk, scale, bias_ptr, sbm, sbn,
           HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr, PREC: tl.constexpr):
    """S = q kᵀ·scale + bias, -inf outside the sequences and above the causal
    diagonal (top-left aligned: key j visible from query i iff j <= i).
    IEEE: fp32 operands, exact fp32 dot; else the native (bf16/fp16) dot."""
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PREC)
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    ok = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    if HAS_BIAS:
        s = s + tl.load(bias_ptr + offs_m[:, None] * sbm + offs_n[None, :] * sbn, mask=ok, other=0.0)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _probs(s, rm, rl):
    """P = exp(S - RM) / RL (0 on fully masked rows) and log P (-inf where P = 0)."""
    inv = tl.where(rl > 0, 1.0 / rl, 0.0)
    p = tl.exp(s - rm[:, None]) * inv[:, None]
    logl = tl.log(tl.where(rl > 0, rl, 1.0))
    logp = tl.where(p > 0, s - rm[:, None] - logl[:, None], float("-inf"))
    return p, logp


@triton.jit
def _complement(p, rl, rest_ptr, row, mm):
    """1 - P without cancellation: an entry above 3/4 is its row's top, which
    float32 rounds towards 1 in a saturated row (an attention sink); there
    1 - P_ij = Σ_{j'≠j} P_ij' = REST_i / RL_i (REST from the LSE pass, at
    ``rest_ptr`` = its row of the statistics buffer)."""
    rest = tl.load(rest_ptr + row, mask=mm, other=0.0)
    return tl.where(p > 0.75, (rest / tl.where(rl > 0, rl, 1.0))[:, None], 1.0 - p)


@triton.jit
def _top2_merge(t1, t2, idx, x, n0, BN: tl.constexpr):
    """Fold a block x [BM, BN] (columns n0 + 0..BN-1) into the running row
    top-2 (t1 >= t2) with the first-index argmax idx of t1."""
    b1 = tl.max(x, 1)
    bj = tl.argmax(x, 1)
    isj = tl.arange(0, BN)[None, :] == bj[:, None]
    b2 = tl.max(tl.where(isj, float("-inf"), x), 1)
    win = b1 > t1
    t2 = tl.where(win, tl.maximum(t1, b2), tl.maximum(t2, b1))
    t1 = tl.where(win, b1, t1)
    idx = tl.where(win, n0 + bj, idx)
    return t1, t2, idx


@triton.jit
def _mp_rank1(acc, a_ptr, a_step, a_offs, a_mask, b_ptr, b_step, b_offs, b_mask, n, PIPE: tl.constexpr):
    """acc[x, y] = max(acc[x, y], max_{t<n} a_t[x] + b_t[y]): rank-1 max-plus
    updates with a_t = a_ptr[t·a_step + a_offs], b_t = b_ptr[t·b_step + b_offs]
    (masked entries read -inf). PIPE: step t+1's loads are issued before step
    t's update, so their latency hides behind it (the step bound enters the
    masks as ``t + 1 + 0·offs < n``: a tensor under the interpreter too, where
    t is a Python int)."""
    if PIPE:
        a = tl.load(a_ptr + a_offs, mask=a_mask & (0 * a_offs < n), other=float("-inf"))
        b = tl.load(b_ptr + b_offs, mask=b_mask & (0 * b_offs < n), other=float("-inf"))
        for t in range(0, n):
            a_next = tl.load(a_ptr + (t + 1) * a_step + a_offs,
                             mask=a_mask & (t + 1 + 0 * a_offs < n), other=float("-inf"))
            b_next = tl.load(b_ptr + (t + 1) * b_step + b_offs,
                             mask=b_mask & (t + 1 + 0 * b_offs < n), other=float("-inf"))
            acc = tl.maximum(acc, a[:, None] + b[None, :])
            a, b = a_next, b_next
    else:
        for t in range(0, n):
            a = tl.load(a_ptr + t * a_step + a_offs, mask=a_mask, other=float("-inf"))
            b = tl.load(b_ptr + t * b_step + b_offs, mask=b_mask, other=float("-inf"))
            acc = tl.maximum(acc, a[:, None] + b[None, :])
    return acc


@triton.jit
def _smax_rank1(accp, accn, ap_ptr, an_ptr, a_step, a_offs, a_mask, w_ptr, w_step, w_offs, w_mask, n,
                PIPE: tl.constexpr):
    """Signed max-times rank-1 updates: for t < n, values (ap_t, an_t)[x] (at
    t·a_step + a_offs) and edges w_t[y] (at t·w_step + w_offs), accp = max(accp,
    cand_p), accn = min(accn, cand_n) (``_smax_cand``); PIPE as in ``_mp_rank1``."""
    if PIPE:
        ap = tl.load(ap_ptr + a_offs, mask=a_mask & (0 * a_offs < n), other=float("-inf"))
        an = tl.load(an_ptr + a_offs, mask=a_mask & (0 * a_offs < n), other=float("inf"))
        w = tl.load(w_ptr + w_offs, mask=w_mask & (0 * w_offs < n), other=0.0)
        for t in range(0, n):
            ap_next = tl.load(ap_ptr + (t + 1) * a_step + a_offs,
                              mask=a_mask & (t + 1 + 0 * a_offs < n), other=float("-inf"))
            an_next = tl.load(an_ptr + (t + 1) * a_step + a_offs,
                              mask=a_mask & (t + 1 + 0 * a_offs < n), other=float("inf"))
            w_next = tl.load(w_ptr + (t + 1) * w_step + w_offs, mask=w_mask & (t + 1 + 0 * w_offs < n), other=0.0)
            cp, cn = _smax_cand(w[None, :], ap[:, None], an[:, None])
            accp = tl.maximum(accp, cp)
            accn = tl.minimum(accn, cn)
            ap, an, w = ap_next, an_next, w_next
    else:
        for t in range(0, n):
            ap = tl.load(ap_ptr + t * a_step + a_offs, mask=a_mask, other=float("-inf"))
            an = tl.load(an_ptr + t * a_step + a_offs, mask=a_mask, other=float("inf"))
            w = tl.load(w_ptr + t * w_step + w_offs, mask=w_mask, other=0.0)
            cp, cn = _smax_cand(w[None, :], ap[:, None], an[:, None])
            accp = tl.maximum(accp, cp)
            accn = tl.minimum(accn, cn)
    return accp, accn


@triton.jit
def _pmax_rank1(accp, accn, p_ptr, p_step, p_offs, p_mask, vp_ptr, vn_ptr, v_step, v_offs, v_mask, n,
                PIPE: tl.constexpr):
    """Edges p_t[x] ≥ 0 (at t·p_step + p_offs; p = 0: no edge) times values
    (vp_t, vn_t)[y]: accp = max(accp, p vp), accn = min(accn, p vn) over t < n;
    PIPE as in ``_mp_rank1``."""
    if PIPE:
        p = tl.load(p_ptr + p_offs, mask=p_mask & (0 * p_offs < n), other=0.0)
        vp = tl.load(vp_ptr + v_offs, mask=v_mask & (0 * v_offs < n), other=float("-inf"))
        vn = tl.load(vn_ptr + v_offs, mask=v_mask & (0 * v_offs < n), other=float("inf"))
        for t in range(0, n):
            p_next = tl.load(p_ptr + (t + 1) * p_step + p_offs, mask=p_mask & (t + 1 + 0 * p_offs < n), other=0.0)
            vp_next = tl.load(vp_ptr + (t + 1) * v_step + v_offs,
                              mask=v_mask & (t + 1 + 0 * v_offs < n), other=float("-inf"))
            vn_next = tl.load(vn_ptr + (t + 1) * v_step + v_offs,
                              mask=v_mask & (t + 1 + 0 * v_offs < n), other=float("inf"))
            pl = p[:, None] > 0
            accp = tl.maximum(accp, tl.where(pl, p[:, None] * vp[None, :], float("-inf")))
            accn = tl.minimum(accn, tl.where(pl, p[:, None] * vn[None, :], float("inf")))
            p, vp, vn = p_next, vp_next, vn_next
    else:
        for t in range(0, n):
            p = tl.load(p_ptr + t * p_step + p_offs, mask=p_mask, other=0.0)
            vp = tl.load(vp_ptr + t * v_step + v_offs, mask=v_mask, other=float("-inf"))
            vn = tl.load(vn_ptr + t * v_step + v_offs, mask=v_mask, other=float("inf"))
            pl = p[:, None] > 0
            accp = tl.maximum(accp, tl.where(pl, p[:, None] * vp[None, :], float("-inf")))
            accn = tl.minimum(accn, tl.where(pl, p[:, None] * vn[None, :], float("inf")))
    return accp, accn


@triton.jit
def _maxplus_outer(a_ptr, b_ptr, offs_m, offs_n, Tq, Tk, K, BM: tl.constexpr, BN: tl.constexpr,
                   CHUNK: tl.constexpr, PIPE: tl.constexpr):
    """out[i, j] = max_d a[d, i] + b[d, j] (a: [K, Tq], b: [K, Tk], -inf = zero):
    K rank-1 updates (CHUNK = 1; PIPE: loads one step ahead) or CHUNK-wide
    broadcast-and-reduce steps over [CHUNK, BM, BN], reduced over axis 0 (kept
    in-thread; reducing over the last axis compiles to shuffles)."""
    acc = tl.full([BM, BN], float("-inf"), tl.float32)
    mm = offs_m < Tq
    nm = offs_n < Tk
    if CHUNK == 1:
        acc = _mp_rank1(acc, a_ptr, Tq, offs_m, mm, b_ptr, Tk, offs_n, nm, K, PIPE)
    else:
        for d0 in range(0, K, CHUNK):
            dd = d0 + tl.arange(0, CHUNK)
            dk = dd < K
            a = tl.load(a_ptr + dd[:, None] * Tq + offs_m[None, :], mask=dk[:, None] & mm[None, :],
                        other=float("-inf"))
            b = tl.load(b_ptr + dd[:, None] * Tk + offs_n[None, :], mask=dk[:, None] & nm[None, :],
                        other=float("-inf"))
            acc = tl.maximum(acc, tl.max(a[:, :, None] + b[:, None, :], 0))
    return acc


@triton.jit
def _smax_cand(w, p, n):
    """Candidates of edge w ⊗ value (p, n) in the signed max semiring:
    (w p, w n), swapped when w < 0; w = 0 is no edge (-inf, +inf)."""
    pos = w > 0
    neg = w < 0
    wp = w * p
    wn = w * n
    cp = tl.where(pos, wp, tl.where(neg, wn, float("-inf")))
    cn = tl.where(pos, wn, tl.where(neg, wp, float("inf")))
    return cp, cn


@triton.jit
def _nan_dead(p, n):
    """A signed value (p, n) with the zero (p = -inf) turned into (NaN, NaN):
    tl.maximum / tl.minimum and the tl.max / tl.min reductions ignore NaN
    (maxnum / minnum), so such a term drops out of ⊕ without a select per
    product (an accumulator starts at (-inf, +inf), so no NaN reaches it)."""
    live = p != float("-inf")
    return tl.where(live, p, float("nan")), tl.where(live, n, float("nan"))


@triton.jit
def _nan_no_edge(w):
    """An edge weight with w = 0 (no edge) turned into NaN (see ``_nan_dead``)."""
    return tl.where(w != 0.0, w, float("nan"))


@triton.jit
def _smax_chunk(accp, accn, w, p, n):
    """Broadcast-and-reduce step of the signed max-times product over axis 0
    (the chunk): accp = max(accp, max_c max(w p, w n)), accn = min(accn,
    min_c min(w p, w n)), with w, p, n broadcastable to [C, X, Y] and excluded
    terms already NaN (``_nan_dead``, ``_nan_no_edge``). Since p ≥ n, max(w p,
    w n) is w·M+ for w > 0 and w·M- for w < 0 (``_smax_cand`` without
    selects)."""
    x = w * p
    y = w * n
    accp = tl.maximum(accp, tl.max(tl.maximum(x, y), 0))
    accn = tl.minimum(accn, tl.min(tl.minimum(x, y), 0))
    return accp, accn


@triton.jit
def _smax_outer(ap_ptr, an_ptr, w_ptr, offs_m, offs_n, Tq, Tk, K, BM: tl.constexpr, BN: tl.constexpr,
                CHUNK: tl.constexpr, PIPE: tl.constexpr):
    """Signed max-times product over d of values (ap, an)[d, i] ([K, Tq]) and
    edges w[d, j] ([K, Tk]): (max_d cand_p, min_d cand_n); rank-1 updates
    (CHUNK = 1; PIPE: loads one step ahead) or CHUNK-wide broadcast-and-reduce
    steps over axis 0 (``_smax_chunk``)."""
    accp = tl.full([BM, BN], float("-inf"), tl.float32)
    accn = tl.full([BM, BN], float("inf"), tl.float32)
    mm = offs_m < Tq
    nm = offs_n < Tk
    if CHUNK == 1:
        accp, accn = _smax_rank1(accp, accn, ap_ptr, an_ptr, Tq, offs_m, mm, w_ptr, Tk, offs_n, nm, K, PIPE)
    else:
        for d0 in range(0, K, CHUNK):
            dd = d0 + tl.arange(0, CHUNK)
            dk = dd < K
            am = dk[:, None] & mm[None, :]
            ap, an = _nan_dead(tl.load(ap_ptr + dd[:, None] * Tq + offs_m[None, :], mask=am, other=float("-inf")),
                               tl.load(an_ptr + dd[:, None] * Tq + offs_m[None, :], mask=am, other=float("inf")))
            w = _nan_no_edge(tl.load(w_ptr + dd[:, None] * Tk + offs_n[None, :], mask=dk[:, None] & nm[None, :],
                                     other=0.0))
            accp, accn = _smax_chunk(accp, accn, w[:, None, :], ap[:, :, None], an[:, :, None])
    return accp, accn


# ------------------------------------------------------------------ pass 1: softmax normaliser
@triton.jit
def _attn_lse_kernel(q_ptr, k_ptr, v_ptr, do_ptr, bias_ptr, st_ptr,
                     H, HK, Tq, Tk, D, DV, scale, sbb, sbh, sbm, sbn, s_st, rest_row,
                     G: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
                     PREC: tl.constexpr,
                     DELTA: tl.constexpr, REST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BD: tl.constexpr, BDV: tl.constexpr):
    """Per query row: RM_i = max_j S_ij (0 if none), RL_i = Σ_j exp(S_ij - RM_i)
    (online over key blocks); with DELTA also Δ_i = Σ_j P_ij (dO_i · v_j) for
    the real semiring; with REST also REST_i = Σ_{j: S_ij < RM_i} exp(S_ij - RM_i)
    (RL_i - 1 without the cancellation where the top is unique, the only case
    ``_complement`` reads it: a tie at the top gives P ≤ 1/2).
    Writes st[0] = RM, st[1] = RL, st[2] = Δ, st[rest_row] = REST."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    bhk = b * HK + h // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mm = offs_m < Tq
    q = tl.load(q_ptr + (bh * Tq + offs_m[:, None]) * D + offs_d[None, :],
                mask=mm[:, None] & (offs_d[None, :] < D), other=0.0)
    bias_base = bias_ptr + b * sbb + h * sbh
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    r_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM], tl.float32)
    if DELTA:
        do = tl.load(do_ptr + (bh * Tq + offs_m[:, None]) * DV + offs_dv[None, :],
                     mask=mm[:, None] & (offs_dv[None, :] < DV), other=0.0)
    n_end = Tk
    if CAUSAL:
        n_end = tl.minimum(Tk, (pid_m + 1) * BM)
    for n0 in range(0, n_end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nm = offs_n < Tk
        k = tl.load(k_ptr + (bhk * Tk + offs_n[:, None]) * D + offs_d[None, :],
                    mask=nm[:, None] & (offs_d[None, :] < D), other=0.0)
        s = _score(q, k, offs_m, offs_n, Tq, Tk, scale, bias_base, sbm, sbn, HAS_BIAS, CAUSAL, IEEE, PREC)
        bmax = tl.max(s, 1)
        m_new = tl.maximum(m_i, bmax)
        sh = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - sh)
        e = tl.exp(s - sh[:, None])
        if REST:
            # the terms below the running max; a block that raises the max
            # puts every earlier term (the old top included) below it
            below = tl.sum(tl.where(e < 1.0, e, 0.0), 1)          # the top term is exp(0) = 1
            r_i = tl.where(bmax > m_i, l_i * alpha, r_i) + below
        l_i = l_i * alpha + tl.sum(e, 1)
        if DELTA:
            v = tl.load(v_ptr + (bhk * Tk + offs_n[:, None]) * DV + offs_dv[None, :],
                        mask=nm[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            acc = acc * alpha + tl.sum(e * dp, 1)
        m_i = m_new
    row = bh * Tq + offs_m
    tl.store(st_ptr + row, tl.where(m_i == float("-inf"), 0.0, m_i), mask=mm)
    tl.store(st_ptr + s_st + row, l_i, mask=mm)
    if REST:
        tl.store(st_ptr + rest_row * s_st + row, r_i, mask=mm)
    if DELTA:
        tl.store(st_ptr + 2 * s_st + row, tl.where(l_i > 0, acc / l_i, 0.0), mask=mm)


# ------------------------------------------------------------------ real
@triton.jit
def _attn_bwd_real_kernel(q_ptr, k_ptr, v_ptr, do_ptr, bias_ptr, st_ptr, dq_ptr, dk_ptr, dv_ptr,
                          H, HK, Tq, Tk, D, DV, scale, sbb, sbh, sbm, sbn, s_st,
                          G: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                          IEEE: tl.constexpr, PREC: tl.constexpr, NEED_Q: tl.constexpr, NEED_K: tl.constexpr,
                          NEED_V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BD: tl.constexpr, BDV: tl.constexpr):
    """Ordinary gradient (FlashAttention-2 backward). Per tile:
    dP = dO vᵀ, dS = P ∘ (dP - Δ); dV += Pᵀ dO, dK += dSᵀ q·scale (summed over
    the group's query heads); dQ += dS k·scale (atomic add, fp32)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HK
    hk = bhk % HK
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    nm = offs_n < Tk
    dmask = offs_d < D
    dvmask = offs_dv < DV
    k = tl.load(k_ptr + (bhk * Tk + offs_n[:, None]) * D + offs_d[None, :],
                mask=nm[:, None] & dmask[None, :], other=0.0)
    kf = k.to(tl.float32)
    vf = tl.load(v_ptr + (bhk * Tk + offs_n[:, None]) * DV + offs_dv[None, :],
                 mask=nm[:, None] & dvmask[None, :], other=0.0).to(tl.float32)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    m_start = 0
    if CAUSAL:
        m_start = (pid_n * BN // BM) * BM
    for g in range(G):
        h = hk * G + g
        bh = b * H + h
        bias_base = bias_ptr + b * sbb + h * sbh
        for m0 in range(m_start, Tq, BM):
            offs_m = m0 + tl.arange(0, BM)
            mm = offs_m < Tq
            row = bh * Tq + offs_m
            q = tl.load(q_ptr + row[:, None] * D + offs_d[None, :], mask=mm[:, None] & dmask[None, :], other=0.0)
            rm = tl.load(st_ptr + row, mask=mm, other=0.0)
            rl = tl.load(st_ptr + s_st + row, mask=mm, other=0.0)
            s = _score(q, k, offs_m, offs_n, Tq, Tk, scale, bias_base, sbm, sbn, HAS_BIAS, CAUSAL, IEEE, PREC)
            p, logp = _probs(s, rm, rl)
            do = tl.load(do_ptr + row[:, None] * DV + offs_dv[None, :], mask=mm[:, None] & dvmask[None, :],
                         other=0.0)
            if NEED_V:
                dv += tl.dot(tl.trans(p), do, input_precision=PREC)
            if NEED_Q or NEED_K:
                delta = tl.load(st_ptr + 2 * s_st + row, mask=mm, other=0.0)
                dp = tl.dot(do, tl.trans(vf), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                if NEED_K:
                    dk += tl.dot(tl.trans(ds), q.to(tl.float32), input_precision=PREC)
                if NEED_Q:
                    dq = tl.dot(ds, kf, input_precision=PREC) * scale
                    tl.atomic_add(dq_ptr + row[:, None] * D + offs_d[None, :], dq,
                                  mask=mm[:, None] & dmask[None, :], sem="relaxed")
    if NEED_K:
        tl.store(dk_ptr + (bhk * Tk + offs_n[:, None]) * D + offs_d[None, :], dk * scale,
                 mask=nm[:, None] & dmask[None, :])
    if NEED_V:
        tl.store(dv_ptr + (bhk * Tk + offs_n[:, None]) * DV + offs_dv[None, :], dv,
                 mask=nm[:, None] & dvmask[None, :])


# ------------------------------------------------------------------ abs / entropy
@triton.jit
def _attn_stats_sum_kernel(q_ptr, k_ptr, va_ptr, vx_ptr, ar_ptr, amr_ptr, mo_ptr, bias_ptr, st_ptr, ji_ptr,
                           H, HK, Tq, Tk, D, DV, scale, sbb, sbh, sbm, sbn, s_st,
                           G: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                           IEEE: tl.constexpr, PREC: tl.constexpr, ENTROPY: tl.constexpr, BM: tl.constexpr,
                           BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """Row statistics of the softmax rule for the log-space sums. With the row
    shift mo_i = max_d log Z_O,id and a_id = exp(log Z_O,id - mo_i):
    Z_P,ij = e^{mo_i}·zp_ij, zp = a |v|ᵀ. With lt_ij = log P_ij + log zp_ij:
    TM_i = max_j lt_ij, J_i = its first argmax, t_ij = exp(lt_ij - TM_i),
    R_i = Σ_{j≠J} t_ij, MI_i = TM_i + mo_i (the reference's row shift m).
    Entropy adds, with c_ij = μ_P,ij - log P_ij (μ_P = e/z of the P node,
    e-part sp = (a μ_O)|v|ᵀ - a (|v| log|v|)ᵀ): RA_i = Σ_{j≠J} t_ij c_ij and
    AJ_i = c_iJ. Online merge over key blocks (running max, exact exclusion of
    the dominant term). Writes st[2..6] = TM, MI, R, RA, AJ and ji = J."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    bhk = b * HK + h // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mm = offs_m < Tq
    dvmask = offs_dv < DV
    row = bh * Tq + offs_m
    q = tl.load(q_ptr + row[:, None] * D + offs_d[None, :], mask=mm[:, None] & (offs_d[None, :] < D), other=0.0)
    a = tl.load(ar_ptr + row[:, None] * DV + offs_dv[None, :], mask=mm[:, None] & dvmask[None, :], other=0.0)
    if ENTROPY:
        am = tl.load(amr_ptr + row[:, None] * DV + offs_dv[None, :], mask=mm[:, None] & dvmask[None, :],
                     other=0.0)
    rm = tl.load(st_ptr + row, mask=mm, other=0.0)
    rl = tl.load(st_ptr + s_st + row, mask=mm, other=0.0)
    bias_base = bias_ptr + b * sbb + h * sbh
    tm = tl.full([BM], float("-inf"), tl.float32)
    jj = tl.full([BM], -1, tl.int32)
    r = tl.zeros([BM], tl.float32)
    ra = tl.zeros([BM], tl.float32)
    aj = tl.zeros([BM], tl.float32)
    n_end = Tk
    if CAUSAL:
        n_end = tl.minimum(Tk, (pid_m + 1) * BM)
    for n0 in range(0, n_end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nm = offs_n < Tk
        k = tl.load(k_ptr + (bhk * Tk + offs_n[:, None]) * D + offs_d[None, :],
                    mask=nm[:, None] & (offs_d[None, :] < D), other=0.0)
        s = _score(q, k, offs_m, offs_n, Tq, Tk, scale, bias_base, sbm, sbn, HAS_BIAS, CAUSAL, IEEE, PREC)
        p, logp = _probs(s, rm, rl)
        va = tl.load(va_ptr + (bhk * Tk + offs_n[:, None]) * DV + offs_dv[None, :],
                     mask=nm[:, None] & dvmask[None, :], other=0.0)
        zp = tl.dot(a, tl.trans(va), input_precision=PREC)
        lt = logp + fast_log(zp)
        bm = tl.max(lt, 1)
        bj = tl.argmax(lt, 1)
        isj = tl.arange(0, BN)[None, :] == bj[:, None]
        tb = tl.exp(lt - tl.where(bm == float("-inf"), 0.0, bm)[:, None])
        br = tl.sum(tl.where(isj, 0.0, tb), 1)
        mnew = tl.maximum(tm, bm)
        win = bm > tm
        msafe = tl.where(mnew == float("-inf"), 0.0, mnew)
        alpha = tl.exp(tm - msafe)
        beta = tl.exp(bm - msafe)
        if ENTROPY:
            vx = tl.load(vx_ptr + (bhk * Tk + offs_n[:, None]) * DV + offs_dv[None, :],
                         mask=nm[:, None] & dvmask[None, :], other=0.0)
            sp = tl.dot(am, tl.trans(va), input_precision=PREC) - tl.dot(a, tl.trans(vx), input_precision=PREC)
            mup = tl.where(zp > 0, sp / tl.where(zp > 0, zp, 1.0), 0.0)
            c = mup - tl.where(p > 0, logp, 0.0)
            u = tb * c
            bra = tl.sum(tl.where(isj, 0.0, u), 1)
            baj = tl.sum(tl.where(isj, c, 0.0), 1)
            ra = tl.where(win, (ra + aj) * alpha + bra, ra * alpha + (bra + baj) * beta)
            aj = tl.where(win, baj, aj)
        r = tl.where(win, (r + 1.0) * alpha + br, r * alpha + (br + 1.0) * beta)
        jj = tl.where(win, n0 + bj, jj)
        tm = mnew
    mo = tl.load(mo_ptr + row, mask=mm, other=0.0)
    tl.store(st_ptr + 2 * s_st + row, tm, mask=mm)
    tl.store(st_ptr + 3 * s_st + row, tl.where(tm == float("-inf"), float("-inf"), tm + mo), mask=mm)
    tl.store(st_ptr + 4 * s_st + row, r, mask=mm)
    if ENTROPY:
        tl.store(st_ptr + 5 * s_st + row, ra, mask=mm)
        tl.store(st_ptr + 6 * s_st + row, aj, mask=mm)
    tl.store(ji_ptr + row, jj, mask=mm)


@triton.jit
def _attn_bwd_sum_kernel(q_ptr, k_ptr, va_ptr, vx_ptr, ar_ptr, amr_ptr, ac_ptr, amc_ptr, mvo_ptr,
                         qa_ptr, qx_ptr, ka_ptr, kx_ptr, bias_ptr, st_ptr, ji_ptr,
                         zq_ptr, sq_ptr, lk_ptr, muk_ptr, lv_ptr, muv_ptr,
                         H, HK, Tq, Tk, D, DV, scale, sbb, sbh, sbm, sbn, s_st, rest_row,
                         G: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                         IEEE: tl.constexpr, PREC: tl.constexpr, ENTROPY: tl.constexpr, NEED_Q: tl.constexpr,
                         NEED_K: tl.constexpr, NEED_V: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    """abs (log Z) and entropy ((log z, μ)) backward. Per tile, in units of the
    row scale e^{MI_i}: the S node's z is X_ij = P_ij B_ij + (1 - P_ij) t_ij
    (B = Σ_{j'≠j} t_ij', the dominant term excluded exactly via J), for entropy
    its e is Y_ij = P_ij (A_ij - log P_ij B_ij) + (1 - P_ij) t_ij (μ_P,ij -
    log P_ij - log(1 - P_ij)), A = Σ_{j'≠j} t c. Then
    q:  zq_i += X |k s|, sq_i += Y |k s| - X (|k s| log|k s|)  (atomic add;
        log z_q = log zq + MI, μ_q = sq/zq, finished by the launcher);
    k:  log S = MI + log X with a running per-key max shift (online), zk +=
        wᵀ|q s|, sk += (w μ_S)ᵀ|q s| - wᵀ(|q s| log|q s|);
    v:  zv += Pᵀ a_col, sv += Pᵀ (a_col μ_O) - (P log P)ᵀ a_col with the
        per-(head, d) shift mvo of a_col = exp(log Z_O - mvo).
    k and v values are finished per query head and ⊕-combined (logaddexp /
    entropy ⊕) into the outputs, which the launcher fills with the zero."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HK
    hk = bhk % HK
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    nm = offs_n < Tk
    dmask = offs_d < D
    dvmask = offs_dv < DV
    kv_row = bhk * Tk + offs_n
    k = tl.load(k_ptr + kv_row[:, None] * D + offs_d[None, :], mask=nm[:, None] & dmask[None, :], other=0.0)
    if NEED_Q or NEED_K:
        va = tl.load(va_ptr + kv_row[:, None] * DV + offs_dv[None, :], mask=nm[:, None] & dvmask[None, :],
                     other=0.0)
        if ENTROPY:
            vx = tl.load(vx_ptr + kv_row[:, None] * DV + offs_dv[None, :], mask=nm[:, None] & dvmask[None, :],
                         other=0.0)
    if NEED_Q:
        ka = tl.load(ka_ptr + kv_row[:, None] * D + offs_d[None, :], mask=nm[:, None] & dmask[None, :], other=0.0)
        if ENTROPY:
            kx = tl.load(kx_ptr + kv_row[:, None] * D + offs_d[None, :], mask=nm[:, None] & dmask[None, :],
                         other=0.0)
    m_start = 0
    if CAUSAL:
        m_start = (pid_n * BN // BM) * BM
    for g in range(G):
        h = hk * G + g
        bh = b * H + h
        bias_base = bias_ptr + b * sbb + h * sbh
        zk = tl.zeros([BN, BD], tl.float32)
        sk = tl.zeros([BN, BD], tl.float32)
        shk = tl.full([BN], float("-inf"), tl.float32)
        zv = tl.zeros([BN, BDV], tl.float32)
        sv = tl.zeros([BN, BDV], tl.float32)
        for m0 in range(m_start, Tq, BM):
            offs_m = m0 + tl.arange(0, BM)
            mm = offs_m < Tq
            row = bh * Tq + offs_m
            q = tl.load(q_ptr + row[:, None] * D + offs_d[None, :], mask=mm[:, None] & dmask[None, :], other=0.0)
            rm = tl.load(st_ptr + row, mask=mm, other=0.0)
            rl = tl.load(st_ptr + s_st + row, mask=mm, other=0.0)
            s = _score(q, k, offs_m, offs_n, Tq, Tk, scale, bias_base, sbm, sbn, HAS_BIAS, CAUSAL, IEEE, PREC)
            p, logp = _probs(s, rm, rl)
            logp0 = tl.where(p > 0, logp, 0.0)
            if NEED_V:
                ac = tl.load(ac_ptr + row[:, None] * DV + offs_dv[None, :], mask=mm[:, None] & dvmask[None, :],
                             other=0.0)
                zv += tl.dot(tl.trans(p), ac, input_precision=PREC)
                if ENTROPY:
                    amc = tl.load(amc_ptr + row[:, None] * DV + offs_dv[None, :],
                                  mask=mm[:, None] & dvmask[None, :], other=0.0)
                    sv += tl.dot(tl.trans(p), amc, input_precision=PREC) \
                        - tl.dot(tl.trans(p * logp0), ac, input_precision=PREC)
            if NEED_Q or NEED_K:
                ar = tl.load(ar_ptr + row[:, None] * DV + offs_dv[None, :], mask=mm[:, None] & dvmask[None, :],
                             other=0.0)
                zp = tl.dot(ar, tl.trans(va), input_precision=PREC)
                tm = tl.load(st_ptr + 2 * s_st + row, mask=mm, other=float("-inf"))
                mi = tl.load(st_ptr + 3 * s_st + row, mask=mm, other=float("-inf"))
                rr = tl.load(st_ptr + 4 * s_st + row, mask=mm, other=0.0)
                jrow = tl.load(ji_ptr + row, mask=mm, other=-1)
                live = tm > float("-inf")
                t = tl.exp(logp + fast_log(zp) - tl.where(live, tm, 0.0)[:, None])
                isj = offs_n[None, :] == jrow[:, None]
                tot = tl.where(live, 1.0 + rr, 0.0)
                bb = tl.where(isj, rr[:, None], tl.maximum(tot[:, None] - t, 0.0))
                om = _complement(p, rl, st_ptr + rest_row * s_st, row, mm)
                x = p * bb + om * t
                if ENTROPY:
                    amr = tl.load(amr_ptr + row[:, None] * DV + offs_dv[None, :],
                                  mask=mm[:, None] & dvmask[None, :], other=0.0)
                    sp = tl.dot(amr, tl.trans(va), input_precision=PREC) \
                        - tl.dot(ar, tl.trans(vx), input_precision=PREC)
                    mup = tl.where(zp > 0, sp / tl.where(zp > 0, zp, 1.0), 0.0)
                    ra = tl.load(st_ptr + 5 * s_st + row, mask=mm, other=0.0)
                    aj = tl.load(st_ptr + 6 * s_st + row, mask=mm, other=0.0)
                    sa = tl.where(live, ra + aj, 0.0)
                    aa = tl.where(isj, ra[:, None], sa[:, None] - t * (mup - logp0))
                    ld = tl.where((p > 0) & (om > 0), logp0 + fast_log(tl.where(om > 0, om, 1.0)), 0.0)
                    y = p * (aa - logp0 * bb) + om * t * (mup - ld)
                if NEED_Q:
                    qmask = mm[:, None] & dmask[None, :]
                    tl.atomic_add(zq_ptr + row[:, None] * D + offs_d[None, :],
                                  tl.dot(x, ka, input_precision=PREC), mask=qmask, sem="relaxed")
                    if ENTROPY:
                        tl.atomic_add(sq_ptr + row[:, None] * D + offs_d[None, :],
                                      tl.dot(y, ka, input_precision=PREC)
                                      - tl.dot(x, kx, input_precision=PREC), mask=qmask, sem="relaxed")
                if NEED_K:
                    qa = tl.load(qa_ptr + row[:, None] * D + offs_d[None, :], mask=mm[:, None] & dmask[None, :],
                                 other=0.0)
                    xpos = x > 0
                    lvs = tl.where(xpos, mi[:, None] + fast_log(tl.where(xpos, x, 1.0)), float("-inf"))
                    new = tl.maximum(shk, tl.max(lvs, 0))
                    ss = tl.where(new == float("-inf"), 0.0, new)
                    alpha = tl.exp(shk - ss)
                    w = tl.exp(lvs - ss[None, :])
                    zk = zk * alpha[:, None] + tl.dot(tl.trans(w), qa, input_precision=PREC)
                    if ENTROPY:
                        qx = tl.load(qx_ptr + row[:, None] * D + offs_d[None, :],
                                     mask=mm[:, None] & dmask[None, :], other=0.0)
                        wmu = tl.where(xpos, w * (y / tl.where(xpos, x, 1.0)), 0.0)
                        sk = sk * alpha[:, None] + tl.dot(tl.trans(wmu), qa, input_precision=PREC) \
                            - tl.dot(tl.trans(w), qx, input_precision=PREC)
                    shk = new
        # finish this query head and ⊕ it into the outputs (zero-initialised)
        if NEED_K:
            kofs = kv_row[:, None] * D + offs_d[None, :]
            kmask = nm[:, None] & dmask[None, :]
            lk_h = tl.where(zk > 0, tl.log(tl.where(zk > 0, zk, 1.0)) + shk[:, None], float("-inf"))
            tl.debug_barrier()
            lk_o = tl.load(lk_ptr + kofs, mask=kmask, other=float("-inf"))
            lk_n = logaddexp(lk_o, lk_h)
            if ENTROPY:
                mu_h = tl.where(zk > 0, sk / tl.where(zk > 0, zk, 1.0), 0.0)
                mu_o = tl.load(muk_ptr + kofs, mask=kmask, other=0.0)
                lsafe = tl.where(lk_n == float("-inf"), 0.0, lk_n)
                mu_n = tl.exp(lk_o - lsafe) * mu_o + tl.exp(lk_h - lsafe) * mu_h
                tl.store(muk_ptr + kofs, tl.where(lk_n == float("-inf"), 0.0, mu_n), mask=kmask)
            tl.store(lk_ptr + kofs, lk_n, mask=kmask)
        if NEED_V:
            vofs = kv_row[:, None] * DV + offs_dv[None, :]
            vmask = nm[:, None] & dvmask[None, :]
            mvo = tl.load(mvo_ptr + bh * DV + offs_dv, mask=dvmask, other=0.0)
            lv_h = tl.where(zv > 0, tl.log(tl.where(zv > 0, zv, 1.0)) + mvo[None, :], float("-inf"))
            tl.debug_barrier()
            lv_o = tl.load(lv_ptr + vofs, mask=vmask, other=float("-inf"))
            lv_n = logaddexp(lv_o, lv_h)
            if ENTROPY:
                mu_h = tl.where(zv > 0, sv / tl.where(zv > 0, zv, 1.0), 0.0)
                mu_o = tl.load(muv_ptr + vofs, mask=vmask, other=0.0)
                lsafe = tl.where(lv_n == float("-inf"), 0.0, lv_n)
                mu_n = tl.exp(lv_o - lsafe) * mu_o + tl.exp(lv_h - lsafe) * mu_h
                tl.store(muv_ptr + vofs, tl.where(lv_n == float("-inf"), 0.0, mu_n), mask=vmask)
            tl.store(lv_ptr + vofs, lv_n, mask=vmask)


# ------------------------------------------------------------------ abs / entropy pre- and post-passes
@triton.jit
def _attn_prep_vo_kernel(lvo_ptr, muo_ptr, mo_ptr, ar_ptr, amr_ptr, mvo_ptr, ac_ptr, amc_ptr, Tq, DV,
                         ROWS: tl.constexpr, COLS: tl.constexpr, ENTROPY: tl.constexpr,
                         BT: tl.constexpr, BDV: tl.constexpr):
    """One (batch, head): the row- and column-shifted exps of O's log value l
    [Tq, DV] (μ = O's entropy mean): ROWS: mo_t = finite max_d l_td,
    ar = exp(l - mo), amr = ar·μ; COLS: mvo_d = finite max_t l_td,
    ac = exp(l - mvo), amc = ac·μ (finite max: 0 where the max is ±inf)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BDV)
    dm = offs_d < DV
    base = bh * Tq * DV
    cmax = tl.full([BDV], float("-inf"), tl.float32)
    if COLS:
        for t0 in range(0, Tq, BT):
            offs_t = t0 + tl.arange(0, BT)
            msk = (offs_t < Tq)[:, None] & dm[None, :]
            l = tl.load(lvo_ptr + base + offs_t[:, None] * DV + offs_d[None, :], mask=msk, other=float("-inf"))
            cmax = tl.maximum(cmax, tl.max(l, 0))
        cmax = finite_or_zero(cmax)
        tl.store(mvo_ptr + bh * DV + offs_d, cmax, mask=dm)
    for t0 in range(0, Tq, BT):
        offs_t = t0 + tl.arange(0, BT)
        tm = offs_t < Tq
        msk = tm[:, None] & dm[None, :]
        off = base + offs_t[:, None] * DV + offs_d[None, :]
        l = tl.load(lvo_ptr + off, mask=msk, other=float("-inf"))
        if ENTROPY:
            mu = tl.load(muo_ptr + off, mask=msk, other=0.0)
        if ROWS:
            rmax = finite_or_zero(tl.max(l, 1))
            tl.store(mo_ptr + bh * Tq + offs_t, rmax, mask=tm)
            ar = tl.exp(l - rmax[:, None])
            tl.store(ar_ptr + off, ar, mask=msk)
            if ENTROPY:
                tl.store(amr_ptr + off, ar * mu, mask=msk)
        if COLS:
            ac = tl.exp(l - cmax[None, :])
            tl.store(ac_ptr + off, ac, mask=msk)
            if ENTROPY:
                tl.store(amc_ptr + off, ac * mu, mask=msk)


@triton.jit
def _abs_scaled_block(x_ptr, a_ptr, ax_ptr, blk, n, scale, XLOGX: tl.constexpr, LOG: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Block ``blk`` of a = |x·scale| in fp32 (log a with LOG, -inf at 0) and,
    with XLOGX, ax = a·log a (0 where a = 0)."""
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    a = tl.abs(tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) * scale)
    if LOG:
        tl.store(a_ptr + offs, tl.log(a), mask=m)
    else:
        tl.store(a_ptr + offs, a, mask=m)
    if XLOGX:
        pos = a > 0
        tl.store(ax_ptr + offs, tl.where(pos, a * tl.log(tl.where(pos, a, 1.0)), 0.0), mask=m)


@triton.jit
def _abs_scaled_kernel(x0_ptr, x1_ptr, x2_ptr, a_ptr, ax_ptr, n0, n1, n2, o1, o2, scale0, scale1, scale2,
                       XLOGX: tl.constexpr, LOG: tl.constexpr, BLOCK: tl.constexpr):
    """|x·scale| (its log with LOG; and a·log a with XLOGX) of up to three flat
    tensors in one launch, into one buffer: a[0:n0] from x0, a[o1:o1+n1] from
    x1, a[o2:o2+n2] from x2."""
    pid = tl.program_id(0)
    nb0 = tl.cdiv(n0, BLOCK)
    nb1 = tl.cdiv(n1, BLOCK)
    if pid < nb0:
        _abs_scaled_block(x0_ptr, a_ptr, ax_ptr, pid, n0, scale0, XLOGX, LOG, BLOCK)
    elif pid < nb0 + nb1:
        base = o1.to(tl.int64)
        _abs_scaled_block(x1_ptr, a_ptr + base, ax_ptr + base, pid - nb0, n1, scale1, XLOGX, LOG, BLOCK)
    else:
        base = o2.to(tl.int64)
        _abs_scaled_block(x2_ptr, a_ptr + base, ax_ptr + base, pid - nb0 - nb1, n2, scale2, XLOGX, LOG, BLOCK)


@triton.jit
def _attn_finish_q_kernel(z_ptr, s_ptr, mi_ptr, l_ptr, mu_ptr, n, D, ENTROPY: tl.constexpr, BLOCK: tl.constexpr):
    """q's value from the accumulated sums: log z + MI_row (-inf where z = 0)
    and, for entropy, μ = s / z (0 where z = 0)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    z = tl.load(z_ptr + offs, mask=m, other=0.0)
    mi = tl.load(mi_ptr + offs // D, mask=m, other=0.0)
    pos = z > 0
    tl.store(l_ptr + offs, tl.where(pos, tl.log(tl.where(pos, z, 1.0)) + mi, float("-inf")), mask=m)
    if ENTROPY:
        sq = tl.load(s_ptr + offs, mask=m, other=0.0)
        tl.store(mu_ptr + offs, tl.where(pos, sq / tl.where(pos, z, 1.0), 0.0), mask=m)


# ------------------------------------------------------------------ maxabs
@triton.jit
def _group_range(pid_h, n_h, G: tl.constexpr, Tk, SPLIT_G: tl.constexpr):
    """(k/v head bhk, q heads g_lo..g_hi of its group, first output row) of a
    program along grid axis 1: per k/v head (all G q heads, outputs at row 0
    of [B·HK·Tk]) or, SPLIT_G, per q head (one head, outputs in its [G] slice
    of [G, B·HK·Tk] partials)."""
    z = pid_h * 0                     # int64 zero: both branches return one type (triton 3.6)
    if SPLIT_G:
        g = pid_h % G
        return pid_h // G, g, g + 1, g * (n_h // G) * Tk + z
    return pid_h, z, z + G, z


@triton.jit
def _attn_stats_maxabs_kernel(q_ptr, k_ptr, lvoT_ptr, lvT_ptr, bias_ptr, st_ptr, ji_ptr,
                              H, HK, Tq, Tk, D, DV, scale, sbb, sbh, sbm, sbn, s_st,
                              G: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                              IEEE: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                              BD: tl.constexpr, CHUNK: tl.constexpr, PIPE: tl.constexpr):
    """Row top-2 of u_ij = log P_ij + log m_P,ij, where log m_P,ij =
    max_d log m_O,id + log|v_jd| (max-plus, rank-1 updates over d), with the
    first argmax J. Writes st[2] = top1, st[3] = top2, ji = J."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    bhk = b * HK + h // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    mm = offs_m < Tq
    row = bh * Tq + offs_m
    q = tl.load(q_ptr + row[:, None] * D + offs_d[None, :], mask=mm[:, None] & (offs_d[None, :] < D), other=0.0)
    rm = tl.load(st_ptr + row, mask=mm, other=0.0)
    rl = tl.load(st_ptr + s_st + row, mask=mm, other=0.0)
    bias_base = bias_ptr + b * sbb + h * sbh
    t1 = tl.full([BM], float("-inf"), tl.float32)
    t2 = tl.full([BM], float("-inf"), tl.float32)
    jj = tl.full([BM], -1, tl.int32)
    n_end = Tk
    if CAUSAL:
        n_end = tl.minimum(Tk, (pid_m + 1) * BM)
    for n0 in range(0, n_end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nm = offs_n < Tk
        k = tl.load(k_ptr + (bhk * Tk + offs_n[:, None]) * D + offs_d[None, :],
                    mask=nm[:, None] & (offs_d[None, :] < D), other=0.0)
        s = _score(q, k, offs_m, offs_n, Tq, Tk, scale, bias_base, sbm, sbn, HAS_BIAS, CAUSAL, IEEE, PREC)
        p, logp = _probs(s, rm, rl)
        lvp = _maxplus_outer(lvoT_ptr + bh * DV * Tq, lvT_ptr + bhk * DV * Tk, offs_m, offs_n, Tq, Tk, DV,
                             BM, BN, CHUNK, PIPE)
        t1, t2, jj = _top2_merge(t1, t2, jj, logp + lvp, n0, BN)
    tl.store(st_ptr + 2 * s_st + row, t1, mask=mm)
    tl.store(st_ptr + 3 * s_st + row, t2, mask=mm)
    tl.store(ji_ptr + row, jj, mask=mm)


@triton.jit
def _attn_bwd_maxabs_kernel(q_ptr, k_ptr, lvoT_ptr, lvT_ptr, lvo_ptr, lq_ptr, lk_ptr, bias_ptr, st_ptr, ji_ptr,
                            scr_ptr, dq_ptr, dk_ptr, dv_ptr,
                            H, HK, Tq, Tk, D, DV, scale, sbb, sbh, sbm, sbn, s_st, rest_row,
                            G: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                            IEEE: tl.constexpr, PREC: tl.constexpr, NEED_Q: tl.constexpr, NEED_K: tl.constexpr,
                            NEED_V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            BD: tl.constexpr, BDV: tl.constexpr, CHUNK: tl.constexpr, PIPE: tl.constexpr,
                            SPLIT_G: tl.constexpr):
    """Largest |path product| (max-plus in log space). Per tile: log m_P
    (max-plus over d), log m_S,ij = max(log P_ij + top_{j'≠j}, log P_ij +
    log(1 - P_ij) + log m_P,ij) from the row top-2; then
    v: max_i log P_ij + log m_O,id; k: max_i log m_S,ij + log|q_id s|
    (rank-1 updates over the rows of the tile, max over the group's heads);
    q: max_j log m_S,ij + log|k_jd s| (rank-1 over the columns, atomic max).
    The P and S tiles pass through a per-program scratch buffer. SPLIT_G: one
    program per (k/v tile, q head) instead of per (k/v tile, k/v head), dk and
    dv written per q head of the group into [G, ...] partials that the
    launcher reduces (more programs when B·HK is small)."""
    pid_n = tl.program_id(0)
    bhk, g_lo, g_hi, out_row0 = _group_range(tl.program_id(1).to(tl.int64), tl.num_programs(1), G, Tk, SPLIT_G)
    b = bhk // HK
    hk = bhk % HK
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    nm = offs_n < Tk
    dmask = offs_d < D
    dvmask = offs_dv < DV
    kv_row = bhk * Tk + offs_n
    k = tl.load(k_ptr + kv_row[:, None] * D + offs_d[None, :], mask=nm[:, None] & dmask[None, :], other=0.0)
    ar_m = tl.arange(0, BM)
    ar_n = tl.arange(0, BN)
    scr = scr_ptr + (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + pid_n) * (2 * BM * BN)
    tile = ar_m[:, None] * BN + ar_n[None, :]
    acc_k = tl.full([BN, BD], float("-inf"), tl.float32)
    acc_v = tl.full([BN, BDV], float("-inf"), tl.float32)
    m_start = 0
    if CAUSAL:
        m_start = (pid_n * BN // BM) * BM
    for g in range(g_lo, g_hi):
        h = hk * G + g
        bh = b * H + h
        bias_base = bias_ptr + b * sbb + h * sbh
        for m0 in range(m_start, Tq, BM):
            offs_m = m0 + ar_m
            mm = offs_m < Tq
            row = bh * Tq + offs_m
            q = tl.load(q_ptr + row[:, None] * D + offs_d[None, :], mask=mm[:, None] & dmask[None, :], other=0.0)
            rm = tl.load(st_ptr + row, mask=mm, other=0.0)
            rl = tl.load(st_ptr + s_st + row, mask=mm, other=0.0)
            s = _score(q, k, offs_m, offs_n, Tq, Tk, scale, bias_base, sbm, sbn, HAS_BIAS, CAUSAL, IEEE, PREC)
            p, logp = _probs(s, rm, rl)
            tl.debug_barrier()
            if NEED_V:
                tl.store(scr + tile, logp)
            if NEED_Q or NEED_K:
                lvp = _maxplus_outer(lvoT_ptr + bh * DV * Tq, lvT_ptr + bhk * DV * Tk, offs_m, offs_n,
                                     Tq, Tk, DV, BM, BN, CHUNK, PIPE)
                t1 = tl.load(st_ptr + 2 * s_st + row, mask=mm, other=float("-inf"))
                t2 = tl.load(st_ptr + 3 * s_st + row, mask=mm, other=float("-inf"))
                jrow = tl.load(ji_ptr + row, mask=mm, other=-1)
                isj = offs_n[None, :] == jrow[:, None]
                off = logp + tl.where(isj, t2[:, None], t1[:, None])
                om = _complement(p, rl, st_ptr + rest_row * s_st, row, mm)
                diag = logp + fast_log(om) + lvp
                tl.store(scr + BM * BN + tile, tl.maximum(off, diag))
            tl.debug_barrier()
            n_rows = tl.minimum(BM, Tq - m0)
            if NEED_V or NEED_K:
                if CHUNK == 1:          # rank-1 updates over the tile's rows r
                    q0 = bh * Tq + m0
                    if NEED_V:          # acc_v[j, e] ⊕= log P_rj + log m_O,re
                        acc_v = _mp_rank1(acc_v, scr, BN, ar_n, ar_n < BN, lvo_ptr + q0 * DV, DV, offs_dv,
                                          dvmask, n_rows, PIPE)
                    if NEED_K:          # acc_k[j, d] ⊕= log m_S,rj + log|q_rd s|
                        acc_k = _mp_rank1(acc_k, scr + BM * BN, BN, ar_n, ar_n < BN, lq_ptr + q0 * D, D, offs_d,
                                          dmask, n_rows, PIPE)
                else:
                    for r0 in range(0, n_rows, CHUNK):
                        rr = r0 + tl.arange(0, CHUNK)
                        rk = rr < n_rows
                        qrows = bh * Tq + m0 + rr
                        if NEED_V:
                            lp_r = tl.load(scr + rr[:, None] * BN + ar_n[None, :], mask=rk[:, None],
                                           other=float("-inf"))
                            lo_r = tl.load(lvo_ptr + qrows[:, None] * DV + offs_dv[None, :],
                                           mask=rk[:, None] & dvmask[None, :], other=float("-inf"))
                            acc_v = tl.maximum(acc_v, tl.max(lp_r[:, :, None] + lo_r[:, None, :], 0))
                        if NEED_K:
                            ls_r = tl.load(scr + BM * BN + rr[:, None] * BN + ar_n[None, :], mask=rk[:, None],
                                           other=float("-inf"))
                            lq_r = tl.load(lq_ptr + qrows[:, None] * D + offs_d[None, :],
                                           mask=rk[:, None] & dmask[None, :], other=float("-inf"))
                            acc_k = tl.maximum(acc_k, tl.max(ls_r[:, :, None] + lq_r[:, None, :], 0))
            if NEED_Q:
                acc_q = tl.full([BM, BD], float("-inf"), tl.float32)
                n_cols = tl.minimum(BN, Tk - pid_n * BN)
                if CHUNK == 1:          # acc_q[i, d] ⊕= log m_S,ic + log|k_cd s| over the tile's columns c
                    acc_q = _mp_rank1(acc_q, scr + BM * BN, 1, ar_m * BN, ar_m < BM,
                                      lk_ptr + (bhk * Tk + pid_n * BN) * D, D, offs_d, dmask, n_cols, PIPE)
                else:
                    for c0 in range(0, n_cols, CHUNK):
                        cc = c0 + tl.arange(0, CHUNK)
                        ck = cc < n_cols
                        ls_c = tl.load(scr + BM * BN + ar_m[None, :] * BN + cc[:, None], mask=ck[:, None],
                                       other=float("-inf"))
                        lk_c = tl.load(lk_ptr + (bhk * Tk + pid_n * BN + cc)[:, None] * D + offs_d[None, :],
                                       mask=ck[:, None] & dmask[None, :], other=float("-inf"))
                        acc_q = tl.maximum(acc_q, tl.max(ls_c[:, :, None] + lk_c[:, None, :], 0))
                tl.atomic_max(dq_ptr + row[:, None] * D + offs_d[None, :], acc_q,
                              mask=mm[:, None] & dmask[None, :], sem="relaxed")
    out_row = out_row0 + kv_row
    if NEED_K:
        tl.store(dk_ptr + out_row[:, None] * D + offs_d[None, :], acc_k, mask=nm[:, None] & dmask[None, :])
    if NEED_V:
        tl.store(dv_ptr + out_row[:, None] * DV + offs_dv[None, :], acc_v, mask=nm[:, None] & dvmask[None, :])


# ------------------------------------------------------------------ max (signed pair)
@triton.jit
def _attn_stats_max_kernel(q_ptr, k_ptr, voTp_ptr, voTn_ptr, vT_ptr, bias_ptr, st_ptr, ji_ptr,
                           H, HK, Tq, Tk, D, DV, scale, sbb, sbh, sbm, sbn, s_st,
                           G: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                           IEEE: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                           CHUNK: tl.constexpr, PIPE: tl.constexpr):
    """Row statistics of the signed max softmax rule: with the P node's value
    (M+, M-)_ij = signed max-times over d of (v_jd, value of O_id),
    cp_ij = -P_ij M-_ij and cn_ij = -P_ij M+_ij (P > 0 only): row top-2 of cp
    (st[2], st[3], argmax ji[0]) and bottom-2 of cn (st[4], st[5], ji[1])."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    bhk = b * HK + h // G
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    mm = offs_m < Tq
    row = bh * Tq + offs_m
    q = tl.load(q_ptr + row[:, None] * D + offs_d[None, :], mask=mm[:, None] & (offs_d[None, :] < D), other=0.0)
    rm = tl.load(st_ptr + row, mask=mm, other=0.0)
    rl = tl.load(st_ptr + s_st + row, mask=mm, other=0.0)
    bias_base = bias_ptr + b * sbb + h * sbh
    p1 = tl.full([BM], float("-inf"), tl.float32)
    p2 = tl.full([BM], float("-inf"), tl.float32)
    jp = tl.full([BM], -1, tl.int32)
    n1 = tl.full([BM], float("-inf"), tl.float32)   # top-2 of -cn
    n2 = tl.full([BM], float("-inf"), tl.float32)
    jn = tl.full([BM], -1, tl.int32)
    n_end = Tk
    if CAUSAL:
        n_end = tl.minimum(Tk, (pid_m + 1) * BM)
    for n0 in range(0, n_end, BN):
        offs_n = n0 + tl.arange(0, BN)
        nm = offs_n < Tk
        k = tl.load(k_ptr + (bhk * Tk + offs_n[:, None]) * D + offs_d[None, :],
                    mask=nm[:, None] & (offs_d[None, :] < D), other=0.0)
        s = _score(q, k, offs_m, offs_n, Tq, Tk, scale, bias_base, sbm, sbn, HAS_BIAS, CAUSAL, IEEE, PREC)
        p, logp = _probs(s, rm, rl)
        vpp, vpn = _smax_outer(voTp_ptr + bh * DV * Tq, voTn_ptr + bh * DV * Tq, vT_ptr + bhk * DV * Tk,
                               offs_m, offs_n, Tq, Tk, DV, BM, BN, CHUNK, PIPE)
        live = p > 0
        cp = tl.where(live, -p * vpn, float("-inf"))
        ncn = tl.where(live, p * vpp, float("-inf"))      # -cn
        p1, p2, jp = _top2_merge(p1, p2, jp, cp, n0, BN)
        n1, n2, jn = _top2_merge(n1, n2, jn, ncn, n0, BN)
    tl.store(st_ptr + 2 * s_st + row, p1, mask=mm)
    tl.store(st_ptr + 3 * s_st + row, p2, mask=mm)
    tl.store(st_ptr + 4 * s_st + row, -n1, mask=mm)
    tl.store(st_ptr + 5 * s_st + row, -n2, mask=mm)
    tl.store(ji_ptr + row, jp, mask=mm)
    tl.store(ji_ptr + s_st + row, jn, mask=mm)


@triton.jit
def _attn_bwd_max_kernel(q_ptr, k_ptr, voTp_ptr, voTn_ptr, vT_ptr, vop_ptr, von_ptr, qs_ptr, ks_ptr,
                         bias_ptr, st_ptr, ji_ptr, scr_ptr,
                         dqp_ptr, dqn_ptr, dkp_ptr, dkn_ptr, dvp_ptr, dvn_ptr,
                         H, HK, Tq, Tk, D, DV, scale, sbb, sbh, sbm, sbn, s_st, rest_row,
                         G: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                         IEEE: tl.constexpr, PREC: tl.constexpr, NEED_Q: tl.constexpr, NEED_K: tl.constexpr,
                         NEED_V: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         BD: tl.constexpr, BDV: tl.constexpr, CHUNK: tl.constexpr, PIPE: tl.constexpr,
                         SPLIT_G: tl.constexpr):
    """Signed max semiring (M+, M-). Per tile: the P node's pair (signed
    max-times over d), the S node's pair M+_ij = max(P_ij top_{j'≠j} cp,
    P(1-P) M+_P,ij), M-_ij = min(P_ij bottom_{j'≠j} cn, P(1-P) M-_P,ij)
    (P > 0 only); then v: edges P_ij >= 0 to the O values; k: edges q_id·s;
    q: edges k_jd·s (w ⊗ (M+, M-) = (w M+, w M-) swapped for w < 0, w = 0 no
    edge); rank-1 updates through a per-program scratch of the P and S tiles;
    (max, min) over the group's heads; q by atomic max / min. SPLIT_G as in
    the maxabs kernel."""
    pid_n = tl.program_id(0)
    bhk, g_lo, g_hi, out_row0 = _group_range(tl.program_id(1).to(tl.int64), tl.num_programs(1), G, Tk, SPLIT_G)
    b = bhk // HK
    hk = bhk % HK
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    nm = offs_n < Tk
    dmask = offs_d < D
    dvmask = offs_dv < DV
    kv_row = bhk * Tk + offs_n
    k = tl.load(k_ptr + kv_row[:, None] * D + offs_d[None, :], mask=nm[:, None] & dmask[None, :], other=0.0)
    ar_m = tl.arange(0, BM)
    ar_n = tl.arange(0, BN)
    scr = scr_ptr + (tl.program_id(1).to(tl.int64) * tl.num_programs(0) + pid_n) * (3 * BM * BN)
    tile = ar_m[:, None] * BN + ar_n[None, :]
    acc_kp = tl.full([BN, BD], float("-inf"), tl.float32)
    acc_kn = tl.full([BN, BD], float("inf"), tl.float32)
    acc_vp = tl.full([BN, BDV], float("-inf"), tl.float32)
    acc_vn = tl.full([BN, BDV], float("inf"), tl.float32)
    m_start = 0
    if CAUSAL:
        m_start = (pid_n * BN // BM) * BM
    for g in range(g_lo, g_hi):
        h = hk * G + g
        bh = b * H + h
        bias_base = bias_ptr + b * sbb + h * sbh
        for m0 in range(m_start, Tq, BM):
            offs_m = m0 + ar_m
            mm = offs_m < Tq
            row = bh * Tq + offs_m
            q = tl.load(q_ptr + row[:, None] * D + offs_d[None, :], mask=mm[:, None] & dmask[None, :], other=0.0)
            rm = tl.load(st_ptr + row, mask=mm, other=0.0)
            rl = tl.load(st_ptr + s_st + row, mask=mm, other=0.0)
            s = _score(q, k, offs_m, offs_n, Tq, Tk, scale, bias_base, sbm, sbn, HAS_BIAS, CAUSAL, IEEE, PREC)
            p, logp = _probs(s, rm, rl)
            live = p > 0
            tl.debug_barrier()
            if NEED_V:
                tl.store(scr + tile, p)
            if NEED_Q or NEED_K:
                vpp, vpn = _smax_outer(voTp_ptr + bh * DV * Tq, voTn_ptr + bh * DV * Tq, vT_ptr + bhk * DV * Tk,
                                       offs_m, offs_n, Tq, Tk, DV, BM, BN, CHUNK, PIPE)
                tp1 = tl.load(st_ptr + 2 * s_st + row, mask=mm, other=float("-inf"))
                tp2 = tl.load(st_ptr + 3 * s_st + row, mask=mm, other=float("-inf"))
                bn1 = tl.load(st_ptr + 4 * s_st + row, mask=mm, other=float("inf"))
                bn2 = tl.load(st_ptr + 5 * s_st + row, mask=mm, other=float("inf"))
                jp = tl.load(ji_ptr + row, mask=mm, other=-1)
                jn = tl.load(ji_ptr + s_st + row, mask=mm, other=-1)
                offp = p * tl.where(offs_n[None, :] == jp[:, None], tp2[:, None], tp1[:, None])
                offn = p * tl.where(offs_n[None, :] == jn[:, None], bn2[:, None], bn1[:, None])
                dd = p * _complement(p, rl, st_ptr + rest_row * s_st, row, mm)
                hasd = dd > 0
                sp = tl.where(live, tl.maximum(offp, tl.where(hasd, dd * vpp, float("-inf"))), float("-inf"))
                sn = tl.where(live, tl.minimum(offn, tl.where(hasd, dd * vpn, float("inf"))), float("inf"))
                tl.store(scr + BM * BN + tile, sp)
                tl.store(scr + 2 * BM * BN + tile, sn)
            tl.debug_barrier()
            n_rows = tl.minimum(BM, Tq - m0)
            if NEED_V or NEED_K:
                if CHUNK == 1:          # rank-1 updates over the tile's rows r
                    q0 = bh * Tq + m0
                    if NEED_V:          # edges P_rj to the O values (vop, von)_re
                        acc_vp, acc_vn = _pmax_rank1(acc_vp, acc_vn, scr, BN, ar_n, ar_n < BN,
                                                     vop_ptr + q0 * DV, von_ptr + q0 * DV, DV, offs_dv, dvmask,
                                                     n_rows, PIPE)
                    if NEED_K:          # S values (sp, sn)_rj over edges q_rd·s
                        acc_kp, acc_kn = _smax_rank1(acc_kp, acc_kn, scr + BM * BN, scr + 2 * BM * BN, BN, ar_n,
                                                     ar_n < BN, qs_ptr + q0 * D, D, offs_d, dmask, n_rows, PIPE)
                else:
                    for r0 in range(0, n_rows, CHUNK):
                        rr = r0 + tl.arange(0, CHUNK)
                        rk = rr < n_rows
                        qrows = bh * Tq + m0 + rr
                        if NEED_V:      # edges P ≥ 0 (P = 0: none, NaN) times the O values
                            p_r = _nan_no_edge(tl.load(scr + rr[:, None] * BN + ar_n[None, :], mask=rk[:, None],
                                                       other=0.0))
                            vmk = rk[:, None] & dvmask[None, :]
                            vop = tl.load(vop_ptr + qrows[:, None] * DV + offs_dv[None, :], mask=vmk,
                                          other=float("-inf"))
                            von = tl.load(von_ptr + qrows[:, None] * DV + offs_dv[None, :], mask=vmk,
                                          other=float("inf"))
                            acc_vp = tl.maximum(acc_vp, tl.max(p_r[:, :, None] * vop[:, None, :], 0))
                            acc_vn = tl.minimum(acc_vn, tl.min(p_r[:, :, None] * von[:, None, :], 0))
                        if NEED_K:
                            sp_r, sn_r = _nan_dead(
                                tl.load(scr + BM * BN + rr[:, None] * BN + ar_n[None, :], mask=rk[:, None],
                                        other=float("-inf")),
                                tl.load(scr + 2 * BM * BN + rr[:, None] * BN + ar_n[None, :], mask=rk[:, None],
                                        other=float("inf")))
                            w = _nan_no_edge(tl.load(qs_ptr + qrows[:, None] * D + offs_d[None, :],
                                                     mask=rk[:, None] & dmask[None, :], other=0.0))
                            acc_kp, acc_kn = _smax_chunk(acc_kp, acc_kn, w[:, None, :], sp_r[:, :, None],
                                                         sn_r[:, :, None])
            if NEED_Q:
                acc_qp = tl.full([BM, BD], float("-inf"), tl.float32)
                acc_qn = tl.full([BM, BD], float("inf"), tl.float32)
                n_cols = tl.minimum(BN, Tk - pid_n * BN)
                if CHUNK == 1:          # S values (sp, sn)_ic over edges k_cd·s, over the tile's columns c
                    acc_qp, acc_qn = _smax_rank1(acc_qp, acc_qn, scr + BM * BN, scr + 2 * BM * BN, 1, ar_m * BN,
                                                 ar_m < BM, ks_ptr + (bhk * Tk + pid_n * BN) * D, D, offs_d, dmask,
                                                 n_cols, PIPE)
                else:
                    for c0 in range(0, n_cols, CHUNK):
                        cc = c0 + tl.arange(0, CHUNK)
                        ck = cc < n_cols
                        sp_c, sn_c = _nan_dead(
                            tl.load(scr + BM * BN + ar_m[None, :] * BN + cc[:, None], mask=ck[:, None],
                                    other=float("-inf")),
                            tl.load(scr + 2 * BM * BN + ar_m[None, :] * BN + cc[:, None], mask=ck[:, None],
                                    other=float("inf")))
                        w = _nan_no_edge(tl.load(ks_ptr + (bhk * Tk + pid_n * BN + cc)[:, None] * D + offs_d[None, :],
                                                 mask=ck[:, None] & dmask[None, :], other=0.0))
                        acc_qp, acc_qn = _smax_chunk(acc_qp, acc_qn, w[:, None, :], sp_c[:, :, None],
                                                     sn_c[:, :, None])
                qofs = row[:, None] * D + offs_d[None, :]
                qmask = mm[:, None] & dmask[None, :]
                tl.atomic_max(dqp_ptr + qofs, acc_qp, mask=qmask, sem="relaxed")
                tl.atomic_min(dqn_ptr + qofs, acc_qn, mask=qmask, sem="relaxed")
    out_row = out_row0 + kv_row
    if NEED_K:
        kofs = out_row[:, None] * D + offs_d[None, :]
        tl.store(dkp_ptr + kofs, acc_kp, mask=nm[:, None] & dmask[None, :])
        tl.store(dkn_ptr + kofs, acc_kn, mask=nm[:, None] & dmask[None, :])
    if NEED_V:
        vofs = out_row[:, None] * DV + offs_dv[None, :]
        tl.store(dvp_ptr + vofs, acc_vp, mask=nm[:, None] & dvmask[None, :])
        tl.store(dvn_ptr + vofs, acc_vn, mask=nm[:, None] & dvmask[None, :])


# ------------------------------------------------------------------ launcher
def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


#: Width of the broadcast-and-reduce steps of the tropical contractions; 1 =
#: rank-1 updates (the GPU default), None = 1 on GPU and 16 under the
#: interpreter (where the per-step overhead dominates). Tests set it to run
#: the GPU code path under the interpreter.
TROPICAL_CHUNK = None


#: Override of the input_precision of the fp32 tl.dot calls on the GPU
#: ("ieee" or "tf32x3"); None = the per-plan default of ``_plans``.
#: Ignored by the interpreter (numpy dots are exact fp32).
DOT_PRECISION = None


def _chunk(plan: dict | None = None) -> int:
    """CHUNK of a tropical launch: ``TROPICAL_CHUNK`` if set, else the plan's
    ``"chunk"``, else 16 under the interpreter and 1 (rank-1 updates) on the GPU."""
    if TROPICAL_CHUNK is not None:
        return int(TROPICAL_CHUNK)
    if plan is not None and "chunk" in plan:
        return int(plan["chunk"])
    return 16 if interpreting() else 1


def _plans(semiring: str, bd: int, bdv: int, gpu: bool | None = None, groups: int = 1) -> list:
    """Launch plans, best guess first; on the GPU the launcher times each once
    per shape (``_common.choose``) and keeps the fastest. A plan is
    ``{"cfg": (BM, BN, num_warps, num_stages, precision), "split": bool}``
    (split: entropy's q/k and v outputs in two launches of the backward kernel,
    which recompute the scores but hold fewer tiles), plus ``"pipe": True``
    for the tropical kernels' software-pipelined rank-1 loops.

    Chosen from ptxas reports of sm_90 compiles with triton 3.6 (the GPU image)
    and 3.9, head dim 64 (registers / spill bytes per thread of the backward
    kernel, triton 3.6): fp32 dots are "tf32x3" everywhere (three TF32 tensor-
    core products, ~1e-6 relative error, far below the 1e-4 bar; plain TF32 is
    never used; "ieee" FMA dots keep whole operand rows in registers and spill).

    - real, abs: 16x64, 8 warps (spills 20 / 12 bytes) first; the earlier
      64x64 (2316 / 2872 bytes of spills) stays a candidate;
    - entropy: q/k and v in two launches, 16x32 and 16x64, 8 warps (56 and 0
      bytes) first, then both at 16x64 (276 and 0); the earlier single 32x64
      launch (2452 bytes) stays a candidate;
    - maxabs, max: 64x64 "ieee" with rank-1 updates first (the measured
      winner on BERT maxabs), then "chunk" C with a tf32x3 score dot (each
      step a [C, BM, BN] broadcast reduced over the chunk inside each thread;
      C = 8 for maxabs, 4 for max, whose loops spill at 8 on triton 3.6; an
      "ieee" score dot costs 4-11% more instructions), then "pipe" (rank-1
      updates that issue step t+1's loads before step t's update) with
      tf32x3 and "ieee".

    Timed on an H100 (fifth and seventh sessions, RESULTS.md): the 16-row
    real/abs plans and the split entropy plan won (1.15-1.5x); for maxabs/max
    64x64 beat 64x32 by 1.15-1.6x (the tropical contractions, not the score
    dot, set their time); "ieee" rank-1 won BERT maxabs, tf32x3 "pipe" BERT
    max, split-G SmolLM2. The rank-1 loops spend one global load per
    accumulator row and step (SASS, triton 3.6, 8 warps: 17 LDG, 16 FADD,
    16 FMNMX and 12-60 other instructions a step); a chunk loads [C, n] tiles
    once and reads them from shared memory: 1.8x (maxabs) and 1.7x (max)
    fewer instructions per tile pair, 4 LDS instead of 17 LDG a step (the
    max kernels also drop their selects: NaN marks an excluded term); not
    yet timed. With grouped-query attention (``groups``
    q heads per k/v head) the tropical kernels also get "split_g" plans: one
    program per q head, dk/dv reduced over the group afterwards (SmolLM2: 192
    programs of 3 heads each for 132 SMs otherwise)."""
    if gpu is None:
        gpu = not interpreting()
    if not gpu:
        return [{"cfg": (16, 16, 4, 1, "ieee"), "split": False}]
    wide = max(bd, bdv) > 64
    widest = max(bd, bdv) > 128
    # wide heads (head dim 65-128, 129-256): the plans whose sm_90 builds fit the 227 KiB of
    # shared memory a block may have (triton 3.6: 32x64 needed 240 KiB for real/abs at 128, and
    # 368 KiB at 256; tests/aot_compile_check.py checks every plan at 64, 128 and 256)
    if semiring in ("real", "abs"):
        cfgs = ([(16, 32, 4, 1, "tf32x3")] if widest else
                [(16, 64, 8, 1, "tf32x3"), (16, 32, 4, 1, "tf32x3")] if wide else
                [(16, 64, 8, 1, "tf32x3"), (64, 64, 8, 1, "tf32x3")])
        plans = [{"cfg": c, "split": False} for c in cfgs]
    elif semiring == "entropy":
        plans = ([{"cfg": (16, 16, 4, 1, "tf32x3"), "split": True}] if widest else
                 [{"cfg": (16, 32, 4, 1, "tf32x3"), "split": True},
                  {"cfg": (16, 32, 8, 1, "tf32x3"), "split": False}] if wide else
                 [{"cfg": (16, 64, 8, 1, "tf32x3"), "split": True, "qk_cfg": (16, 32, 8, 1, "tf32x3")},
                  {"cfg": (16, 64, 8, 1, "tf32x3"), "split": True},
                  {"cfg": (32, 64, 8, 1, "tf32x3"), "split": False}])
    else:
        # tropical: SIMT contractions, scratch round trips (num_stages=1: no
        # software pipelining across the scratch barriers)
        ch = 8 if semiring == "maxabs" else 4        # the signed pair spills in its loops at 8 (triton 3.6)
        plans = ([{"cfg": (32, 32, 4, 1, "ieee"), "split": False}] if wide else
                 [{"cfg": (64, 64, 8, 1, "ieee"), "split": False},
                  {"cfg": (64, 64, 8, 1, "tf32x3"), "split": False, "chunk": ch},
                  {"cfg": (64, 64, 8, 1, "tf32x3"), "split": False, "pipe": True},
                  {"cfg": (64, 64, 8, 1, "ieee"), "split": False, "pipe": True}])
        if groups > 1 and not wide:       # GQA: also one program per q head (see _split_g)
            plans += [dict(plans[i], split_g=True) for i in (0, 1, 3)]
    if DOT_PRECISION is not None:
        plans = [dict(p, cfg=p["cfg"][:4] + (DOT_PRECISION,)) for p in plans]
    return plans


def _split_g(plan: dict, P) -> bool:
    """A plan's split_g (one program per q head, not per k/v head) applies to
    grouped-query attention only."""
    return bool(plan.get("split_g", False)) and P.G > 1


def _choose_plan(semiring: str, P, needs, run):
    """The plan for this call: timed once per shape key on the GPU (each run
    allocates and fills its own outputs, so timing runs are harmless)."""
    plans = _plans(semiring, P.BD, P.BDV, groups=P.G)
    key = ("attention", semiring, bucket(P.Tq), bucket(P.Tk), P.D, P.DV, P.G, P.causal, P.bias is not P.q,
           P.ieee, tuple(needs), str(P.device))
    return choose(key, plans, run)


class _Prep:
    """Flattened, contiguous operands and the launch constants shared by all semirings."""

    def __init__(self, vo, q, k, v, bias, causal, scale):
        import torch
        lead = tuple(q.shape[:-3])
        self.lead = lead
        self.B = math.prod(lead) if lead else 1
        self.H, self.Tq, self.D = (int(x) for x in q.shape[-3:])
        self.HK, self.Tk, _ = (int(x) for x in k.shape[-3:])
        self.DV = int(v.shape[-1])
        self.G = self.H // self.HK
        self.scale = float(scale)
        self.causal = bool(causal)
        B, H, HK = self.B, self.H, self.HK
        self.q = q.reshape(B * H, self.Tq, self.D).contiguous()
        self.k = k.reshape(B * HK, self.Tk, self.D).contiguous()
        self.v = v.reshape(B * HK, self.Tk, self.DV).contiguous()
        self.vo = tuple(c.reshape(B * H, self.Tq, self.DV).contiguous() for c in vo)
        # fp32 q/k: exact fp32 dot; bf16/fp16: native tensor-core dot with fp32
        # accumulation (exact products), but fp32 under the interpreter, whose
        # bf16 dot is broken in triton 3.9
        self.ieee = q.dtype == torch.float32 or interpreting()
        self.device = q.device
        if bias is None:
            self.bias = self.q
            self.bstrides = (0, 0, 0, 0)
        else:
            bb = bias.to(torch.float32).expand(*lead, H, self.Tq, self.Tk)
            try:
                bb = bb.view(B, H, self.Tq, self.Tk)
            except RuntimeError:
                bb = bb.reshape(B, H, self.Tq, self.Tk)
            self.bias = bb
            self.bstrides = tuple(int(s) for s in bb.stride())
        self.BD = _pow2(self.D)
        self.BDV = _pow2(self.DV)
        self.s_st = B * H * self.Tq

    def common(self):
        sb = self.bstrides
        return (self.H, self.HK, self.Tq, self.Tk, self.D, self.DV, self.scale, sb[0], sb[1], sb[2], sb[3],
                self.s_st)

    def out_q(self, t):
        return t.reshape(*self.lead, self.H, self.Tq, self.D)

    def out_k(self, t):
        return t.reshape(*self.lead, self.HK, self.Tk, self.D)

    def out_v(self, t):
        return t.reshape(*self.lead, self.HK, self.Tk, self.DV)


def _check(vo, q, k, v, bias, needs):
    """The cases the kernels decline (NotImplemented -> torch reference)."""
    import torch
    ok_dt = (torch.float32, torch.bfloat16, torch.float16)
    if not isinstance(vo, (tuple, list)) or not vo or any(c.dtype != torch.float32 for c in vo):
        return False
    if q.dtype not in ok_dt or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        return False
    if q.shape[:-3] != k.shape[:-3] or q.shape[:-3] != v.shape[:-3]:
        return False
    H, Tq, D = q.shape[-3:]
    HK, Tk, Dk = k.shape[-3:]
    if Dk != D or tuple(v.shape[-3:-1]) != (HK, Tk) or HK == 0 or H % HK:
        return False
    DV = v.shape[-1]
    if min(Tq, Tk, D, DV, H) == 0 or max(D, DV) > 256:
        return False
    if math.prod(q.shape[:-3]) * H > 65535:          # grid y-dimension limit
        return False
    if any(tuple(c.shape) != (*q.shape[:-3], H, Tq, DV) for c in vo):
        return False
    devs = {q.device, k.device, v.device, vo[0].device}
    if bias is not None:
        devs.add(bias.device)
        if not (bias.is_floating_point() or bias.dtype == torch.bool):
            return False
        try:
            torch.broadcast_shapes(bias.shape, (*q.shape[:-3], H, Tq, Tk))
        except RuntimeError:
            return False
        if torch.broadcast_shapes(bias.shape, (*q.shape[:-3], H, Tq, Tk)) != (*q.shape[:-3], H, Tq, Tk):
            return False
    if len(devs) != 1:
        return False
    return any(needs[:3])


#: rows per step of the O pre-pass; elements per program of the flat passes
_PREP_ROWS = 32
_FLAT_BLOCK = 1024


def _abs_scaled(items, xlogx: bool, log: bool = False):
    """For each (x, scale) of ``items`` (at most three tensors of one dtype):
    (a = |x·scale|, a·log a) as contiguous fp32 views of one buffer, all in one
    launch (without ``xlogx`` the second is the first; with ``log``, log a
    (-inf at 0) instead of a)."""
    import torch
    if not items:
        return []
    xs = [x.contiguous() for x, _ in items]
    ns = [x.numel() for x in xs]
    starts = [0]                                  # segments start 64-element (256-byte) aligned
    for n in ns[:-1]:
        starts.append(starts[-1] + triton.cdiv(n, 64) * 64)
    total = starts[-1] + ns[-1]
    a = torch.empty(total, dtype=torch.float32, device=xs[0].device)
    ax = torch.empty_like(a) if xlogx else a
    if total:
        pad = 3 - len(xs)
        x3, n3, o3 = xs + [xs[0]] * pad, ns + [0] * pad, starts + [0] * pad
        s3 = [float(sc) for _, sc in items] + [0.0] * pad
        nblocks = sum(triton.cdiv(n, _FLAT_BLOCK) for n in n3)
        _abs_scaled_kernel[(nblocks,)](*x3, a, ax, *n3, o3[1], o3[2], *s3, XLOGX=xlogx, LOG=log,
                                       BLOCK=_FLAT_BLOCK, num_warps=4)
    return [(a[o:o + n].view(x.shape), ax[o:o + n].view(x.shape)) for x, n, o in zip(xs, ns, starts)]


def _scaled_operands(P, v: bool, k: bool, q: bool, xlogx: bool, log: bool = False) -> dict:
    """{"v": (|v|, ...), "k": (|k·scale|, ...), "q": (|q·scale|, ...)} for the
    operands asked for, from one :func:`_abs_scaled` launch."""
    wanted = [(name, x, sc) for name, x, sc, on in (("v", P.v, 1.0, v), ("k", P.k, P.scale, k),
                                                    ("q", P.q, P.scale, q)) if on]
    out = _abs_scaled([(x, sc) for _, x, sc in wanted], xlogx, log=log)
    return {name: val for (name, _, _), val in zip(wanted, out)}


def _launch_lse(P, cfg, delta: bool, do=None, rows: int = 0, rest: bool = False):
    """The softmax statistics pass; returns st [max(rows, 2 or 3) (+ 1 with
    ``rest``), B·H·Tq] with rows 0, 1 (and 2 with ``delta``; REST in the last row
    with ``rest``) filled, the rest for the caller's later passes."""
    import torch
    BM, BN, nw, ns, prec = cfg
    st_rows = max(rows, 3 if delta else 2) + int(rest)
    st = torch.empty((st_rows, P.s_st), dtype=torch.float32, device=P.device)
    grid = (triton.cdiv(P.Tq, BM), P.B * P.H)
    _attn_lse_kernel[grid](P.q, P.k, P.v, do if do is not None else P.q, P.bias, st, *P.common(), st_rows - 1,
                           G=P.G, HAS_BIAS=P.bias is not P.q, CAUSAL=P.causal, IEEE=P.ieee, PREC=prec,
                           DELTA=delta, REST=rest,
                           BM=BM, BN=BN, BD=P.BD, BDV=P.BDV, num_warps=nw, num_stages=ns)
    return st


def _needs(needs):
    n = tuple(bool(x) for x in needs[:3])
    return n + (False,) * (3 - len(n))


@register("attention", "real")
def attention_real(vo, q, k, v, bias, causal, scale, needs=(True, True, True)):
    """Real semiring (the gradient): FlashAttention-2 backward, fp32 math."""
    import torch
    needs = _needs(needs)
    if not _check(vo, q, k, v, bias, needs):
        return NotImplemented
    P = _Prep(vo, q, k, v, bias, causal, scale)
    dev, f32 = P.device, torch.float32
    do = P.vo[0]

    def run(plan):
        cfg = plan["cfg"]
        BM, BN, nw, ns, prec = cfg
        st = _launch_lse(P, cfg, delta=needs[0] or needs[1], do=do)
        dq = torch.zeros((P.B * P.H, P.Tq, P.D), dtype=f32, device=dev) if needs[0] else P.q
        dk = torch.empty((P.B * P.HK, P.Tk, P.D), dtype=f32, device=dev) if needs[1] else P.q
        dv = torch.empty((P.B * P.HK, P.Tk, P.DV), dtype=f32, device=dev) if needs[2] else P.q
        grid = (triton.cdiv(P.Tk, BN), P.B * P.HK)
        _attn_bwd_real_kernel[grid](P.q, P.k, P.v, do, P.bias, st, dq, dk, dv, *P.common(),
                                    G=P.G, HAS_BIAS=P.bias is not P.q, CAUSAL=P.causal, IEEE=P.ieee, PREC=prec,
                                    NEED_Q=needs[0], NEED_K=needs[1], NEED_V=needs[2],
                                    BM=BM, BN=BN, BD=P.BD, BDV=P.BDV, num_warps=nw, num_stages=ns)
        return dq, dk, dv

    dq, dk, dv = run(_choose_plan("real", P, needs, run))
    return ((P.out_q(dq),) if needs[0] else None,
            (P.out_k(dk),) if needs[1] else None,
            (P.out_v(dv),) if needs[2] else None)


def _attention_sum(vo, q, k, v, bias, causal, scale, needs, entropy: bool):
    import torch
    needs = _needs(needs)
    if not _check(vo, q, k, v, bias, needs):
        return NotImplemented
    if entropy and len(vo) != 2:
        return NotImplemented
    P = _Prep(vo, q, k, v, bias, causal, scale)
    dev, f32 = P.device, torch.float32
    need_sm = needs[0] or needs[1]
    lvo = P.vo[0]
    muo = P.vo[1] if entropy else None
    dummy = P.q
    # per-call operands (independent of the launch plan), in four launches
    mo = ar = amr = ac = amc = mvo = va = vx = qa = qx = ka = kx = dummy
    BH = P.B * P.H
    if need_sm:
        mo = torch.empty((BH, P.Tq), dtype=f32, device=dev)
        ar = torch.empty_like(lvo)
        amr = torch.empty_like(lvo) if entropy else dummy
    if needs[2]:
        mvo = torch.empty((BH, P.DV), dtype=f32, device=dev)
        ac = torch.empty_like(lvo)
        amc = torch.empty_like(lvo) if entropy else dummy
    if need_sm or needs[2]:
        _attn_prep_vo_kernel[(BH,)](lvo, muo if entropy else lvo, mo, ar, amr, mvo, ac, amc, P.Tq, P.DV,
                                    ROWS=need_sm, COLS=needs[2], ENTROPY=entropy,
                                    BT=_PREP_ROWS, BDV=P.BDV, num_warps=4)
    scaled = _scaled_operands(P, need_sm, needs[0], needs[1], entropy)
    va, vx = scaled.get("v", (dummy, dummy))
    ka, kx = scaled.get("k", (dummy, dummy))
    qa, qx = scaled.get("q", (dummy, dummy))

    def run(plan):
        cfg = plan["cfg"]
        BM, BN, nw, ns, prec = cfg
        st = _launch_lse(P, cfg, delta=False, rows=7 if entropy else 5, rest=True)
        ji = torch.empty((P.s_st,), dtype=torch.int32, device=dev)
        if need_sm:
            grid = (triton.cdiv(P.Tq, BM), P.B * P.H)
            _attn_stats_sum_kernel[grid](P.q, P.k, va, vx, ar, amr, mo, P.bias, st, ji, *P.common(),
                                         G=P.G, HAS_BIAS=P.bias is not P.q, CAUSAL=P.causal, IEEE=P.ieee,
                                         PREC=prec, ENTROPY=entropy, BM=BM, BN=BN, BD=P.BD, BDV=P.BDV,
                                         num_warps=nw, num_stages=ns)
        zq = torch.zeros((P.B * P.H, P.Tq, P.D), dtype=f32, device=dev) if needs[0] else dummy
        sq = torch.zeros_like(zq) if (needs[0] and entropy) else dummy
        lk = torch.full((P.B * P.HK, P.Tk, P.D), _NEG, dtype=f32, device=dev) if needs[1] else dummy
        muk = torch.zeros_like(lk) if (needs[1] and entropy) else dummy
        lv = torch.full((P.B * P.HK, P.Tk, P.DV), _NEG, dtype=f32, device=dev) if needs[2] else dummy
        muv = torch.zeros_like(lv) if (needs[2] and entropy) else dummy
        # one launch, or (split) the q/k outputs and the v output in two, the
        # q/k one with its own tile (``qk_cfg``) where the plan gives one
        if plan["split"]:
            parts = [((needs[0], needs[1], False), plan.get("qk_cfg", cfg)), ((False, False, needs[2]), cfg)]
        else:
            parts = [(needs, cfg)]
        for (nq, nk, nv), (bm, bn, w, stg, pr) in parts:
            if not (nq or nk or nv):
                continue
            grid = (triton.cdiv(P.Tk, bn), P.B * P.HK)
            _attn_bwd_sum_kernel[grid](P.q, P.k, va, vx, ar, amr, ac, amc, mvo, qa, qx, ka, kx, P.bias, st, ji,
                                       zq, sq, lk, muk, lv, muv, *P.common(), st.shape[0] - 1,
                                       G=P.G, HAS_BIAS=P.bias is not P.q, CAUSAL=P.causal, IEEE=P.ieee, PREC=pr,
                                       ENTROPY=entropy, NEED_Q=nq, NEED_K=nk, NEED_V=nv,
                                       BM=bm, BN=bn, BD=P.BD, BDV=P.BDV, num_warps=w, num_stages=stg)
        return st, zq, sq, lk, muk, lv, muv

    st, zq, sq, lk, muk, lv, muv = run(_choose_plan("entropy" if entropy else "abs", P, needs, run))
    vq = vk = vv = None
    if needs[0]:
        lq = torch.empty_like(zq)
        mq = torch.empty_like(zq) if entropy else lq
        n = zq.numel()
        _attn_finish_q_kernel[(triton.cdiv(n, _FLAT_BLOCK),)](zq, sq if entropy else zq, st[3], lq, mq, n, P.D,
                                                             ENTROPY=entropy, BLOCK=_FLAT_BLOCK, num_warps=4)
        vq = (P.out_q(lq), P.out_q(mq)) if entropy else (P.out_q(lq),)
    if needs[1]:
        vk = (P.out_k(lk), P.out_k(muk)) if entropy else (P.out_k(lk),)
    if needs[2]:
        vv = (P.out_v(lv), P.out_v(muv)) if entropy else (P.out_v(lv),)
    return vq, vk, vv


@register("attention", "abs")
def attention_abs(vo, q, k, v, bias, causal, scale, needs=(True, True, True)):
    """abs semiring (log Z, |w| path sums)."""
    return _attention_sum(vo, q, k, v, bias, causal, scale, needs, entropy=False)


@register("attention", "entropy")
def attention_entropy(vo, q, k, v, bias, causal, scale, needs=(True, True, True)):
    """entropy semiring ((log z, μ) pairs)."""
    return _attention_sum(vo, q, k, v, bias, causal, scale, needs, entropy=True)


@register("attention", "maxabs")
def attention_maxabs(vo, q, k, v, bias, causal, scale, needs=(True, True, True)):
    """maxabs semiring (log of the largest |path product|)."""
    import torch
    needs = _needs(needs)
    if not _check(vo, q, k, v, bias, needs):
        return NotImplemented
    P = _Prep(vo, q, k, v, bias, causal, scale)
    dev, f32 = P.device, torch.float32
    need_sm = needs[0] or needs[1]
    lvo = P.vo[0]
    dummy = P.q
    lvoT = lvT = lq = lk = dummy
    logs = _scaled_operands(P, need_sm, needs[0], needs[1], False, log=True)
    lk = logs.get("k", (dummy,))[0]                                         # log|k·scale|
    lq = logs.get("q", (dummy,))[0]
    if need_sm:
        lvoT = lvo.transpose(-1, -2).contiguous()                            # [BH, DV, Tq]
        lvT = logs["v"][0].transpose(-1, -2).contiguous()                    # log|v|: [BHk, DV, Tk]

    def run(plan):
        cfg = plan["cfg"]
        BM, BN, nw, ns, prec = cfg
        pipe = bool(plan.get("pipe", False))
        st = _launch_lse(P, cfg, delta=False, rows=4, rest=True)
        ji = torch.empty((P.s_st,), dtype=torch.int32, device=dev)
        if need_sm:
            grid = (triton.cdiv(P.Tq, BM), P.B * P.H)
            _attn_stats_maxabs_kernel[grid](P.q, P.k, lvoT, lvT, P.bias, st, ji, *P.common(),
                                            G=P.G, HAS_BIAS=P.bias is not P.q, CAUSAL=P.causal, IEEE=P.ieee,
                                            PREC=prec, BM=BM, BN=BN, BD=P.BD, CHUNK=_chunk(plan), PIPE=pipe, num_warps=nw,
                                            num_stages=ns)
        split_g = _split_g(plan, P)
        parts = P.G if split_g else 1                        # dk / dv per q head of the group, reduced below
        dq = torch.full((P.B * P.H, P.Tq, P.D), _NEG, dtype=f32, device=dev) if needs[0] else dummy
        dk = torch.empty((parts, P.B * P.HK, P.Tk, P.D), dtype=f32, device=dev) if needs[1] else dummy
        dv = torch.empty((parts, P.B * P.HK, P.Tk, P.DV), dtype=f32, device=dev) if needs[2] else dummy
        grid = (triton.cdiv(P.Tk, BN), P.B * P.HK * parts)
        scr = torch.empty((grid[0] * grid[1] * 2 * BM * BN,), dtype=f32, device=dev)
        _attn_bwd_maxabs_kernel[grid](P.q, P.k, lvoT, lvT, lvo, lq, lk, P.bias, st, ji, scr, dq, dk, dv,
                                      *P.common(), st.shape[0] - 1, G=P.G, HAS_BIAS=P.bias is not P.q, CAUSAL=P.causal,
                                      IEEE=P.ieee, PREC=prec, NEED_Q=needs[0], NEED_K=needs[1], NEED_V=needs[2],
                                      BM=BM, BN=BN, BD=P.BD, BDV=P.BDV, CHUNK=_chunk(plan), PIPE=pipe,
                                      SPLIT_G=split_g, num_warps=nw, num_stages=ns)
        return dq, (dk.amax(0) if needs[1] else dk), (dv.amax(0) if needs[2] else dv)

    dq, dk, dv = run(_choose_plan("maxabs", P, needs, run))
    return ((P.out_q(dq),) if needs[0] else None,
            (P.out_k(dk),) if needs[1] else None,
            (P.out_v(dv),) if needs[2] else None)


@register("attention", "max")
def attention_max(vo, q, k, v, bias, causal, scale, needs=(True, True, True)):
    """max semiring ((M+, M-) signed extreme path products)."""
    import torch
    needs = _needs(needs)
    if not _check(vo, q, k, v, bias, needs) or len(vo) != 2:
        return NotImplemented
    P = _Prep(vo, q, k, v, bias, causal, scale)
    dev, f32 = P.device, torch.float32
    need_sm = needs[0] or needs[1]
    vop, von = P.vo
    dummy = P.q
    voTp = voTn = vT = qs = ks = dummy
    if need_sm:
        voTp = vop.transpose(-1, -2).contiguous()
        voTn = von.transpose(-1, -2).contiguous()
        vT = P.v.to(f32).transpose(-1, -2).contiguous()
    if needs[0]:
        ks = (P.k.to(f32) * P.scale).contiguous()
    if needs[1]:
        qs = (P.q.to(f32) * P.scale).contiguous()

    def pair(shape, on):
        if not on:
            return dummy, dummy
        return (torch.full(shape, _NEG, dtype=f32, device=dev), torch.full(shape, _POS, dtype=f32, device=dev))

    def run(plan):
        cfg = plan["cfg"]
        BM, BN, nw, ns, prec = cfg
        pipe = bool(plan.get("pipe", False))
        st = _launch_lse(P, cfg, delta=False, rows=6, rest=True)
        ji = torch.empty((2, P.s_st), dtype=torch.int32, device=dev)
        if need_sm:
            grid = (triton.cdiv(P.Tq, BM), P.B * P.H)
            _attn_stats_max_kernel[grid](P.q, P.k, voTp, voTn, vT, P.bias, st, ji, *P.common(),
                                         G=P.G, HAS_BIAS=P.bias is not P.q, CAUSAL=P.causal, IEEE=P.ieee,
                                         PREC=prec, BM=BM, BN=BN, BD=P.BD, CHUNK=_chunk(plan), PIPE=pipe, num_warps=nw,
                                         num_stages=ns)
        split_g = _split_g(plan, P)
        parts = P.G if split_g else 1                        # dk / dv per q head of the group, reduced below
        dqp, dqn = pair((P.B * P.H, P.Tq, P.D), needs[0])
        dkp, dkn = pair((parts, P.B * P.HK, P.Tk, P.D), needs[1])
        dvp, dvn = pair((parts, P.B * P.HK, P.Tk, P.DV), needs[2])
        grid = (triton.cdiv(P.Tk, BN), P.B * P.HK * parts)
        scr = torch.empty((grid[0] * grid[1] * 3 * BM * BN,), dtype=f32, device=dev)
        _attn_bwd_max_kernel[grid](P.q, P.k, voTp, voTn, vT, vop, von, qs, ks, P.bias, st, ji, scr,
                                   dqp, dqn, dkp, dkn, dvp, dvn, *P.common(), st.shape[0] - 1,
                                   G=P.G, HAS_BIAS=P.bias is not P.q, CAUSAL=P.causal, IEEE=P.ieee, PREC=prec,
                                   NEED_Q=needs[0], NEED_K=needs[1], NEED_V=needs[2],
                                   BM=BM, BN=BN, BD=P.BD, BDV=P.BDV, CHUNK=_chunk(plan), PIPE=pipe,
                                   SPLIT_G=split_g, num_warps=nw, num_stages=ns)
        if needs[1]:
            dkp, dkn = dkp.amax(0), dkn.amin(0)
        if needs[2]:
            dvp, dvn = dvp.amax(0), dvn.amin(0)
        return dqp, dqn, dkp, dkn, dvp, dvn

    dqp, dqn, dkp, dkn, dvp, dvn = run(_choose_plan("max", P, needs, run))
    return ((P.out_q(dqp), P.out_q(dqn)) if needs[0] else None,
            (P.out_k(dkp), P.out_k(dkn)) if needs[1] else None,
            (P.out_v(dvp), P.out_v(dvn)) if needs[2] else None)


# ------------------------------------------------------------------ ahead-of-time compile specs
_INT_ARGS = {"H", "HK", "Tq", "Tk", "D", "DV", "sbb", "sbh", "sbm", "sbn", "s_st", "rest_row", "n", "n0", "n1", "n2", "o1", "o2"}
_NATIVE_PTRS = {"q_ptr", "k_ptr"}          # q/k in their input dtype; v too for real / lse


def _constexpr_names(fn) -> set:
    """Names of the constexpr parameters (JITFunction or, under
    TRITON_INTERPRET=1, InterpretedFunction)."""
    import inspect
    params = inspect.signature(fn.fn).parameters
    return {n for n, p in params.items() if "constexpr" in str(p.annotation)}


def _signature(fn, dtype: str, constexprs: dict, native=()) -> dict:
    """Triton signature dict (same format for triton 3.6 and 3.9: pointer
    types '*fp32', scalars 'i32' / 'fp32', 'constexpr' for constexpr params)."""
    sig = {}
    cx = _constexpr_names(fn)
    for name in fn.arg_names:
        if name in cx:
            assert name in constexprs, (fn.__name__, name)
            sig[name] = "constexpr"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        elif name.startswith("scale"):
            sig[name] = "fp32"
        elif name == "ji_ptr":
            sig[name] = "*i32"
        elif name in _NATIVE_PTRS or name in native:
            sig[name] = "*" + dtype
        else:
            sig[name] = "*fp32"
    return sig


def aot_specs(options: bool = False, head_dims=(64, 128, 256)):
    """(kernel, signature, constexprs) triples for ahead-of-time compilation
    checks, ``triton.compile(ASTSource(fn, signature, constexprs),
    target=GPUTarget("cuda", 90, 32))``: every kernel of every semiring, for
    fp32 and bf16 q/k/v, with the launcher's GPU block sizes at head dims
    64, 128 (80, 96, 128 round to it) and 256 (the LSE pre-pass once per
    dtype, with the Δ branch of ``real``), for every launch plan of
    :func:`_plans`.
    ``options=True`` appends a 4th element, the launcher's
    ``{"num_warps", "num_stages"}`` for ``triton.compile(..., options=)``.
    Needs triton only (no torch); compile with TRITON_INTERPRET unset or 0."""
    specs = []
    for bd, dtype in [(d, t) for d in head_dims for t in ("fp32", "bf16")]:
        bdv = bd
        ieee = dtype == "fp32"
        base = dict(HAS_BIAS=True, CAUSAL=dtype == "bf16", IEEE=ieee)
        needs = dict(NEED_Q=True, NEED_K=True, NEED_V=True)

        def add(fn, semiring, c0, native=()):
            seen = set()
            for plan in _plans(semiring, bd, bdv, gpu=True, groups=2):      # every candidate the GPU may time
                launches = [(plan["cfg"], {})]
                if plan["split"] and "NEED_V" in c0:            # the q/k launch and the v launch
                    launches = [(plan.get("qk_cfg", plan["cfg"]), dict(NEED_V=False)),
                                (plan["cfg"], dict(NEED_Q=False, NEED_K=False))]
                for (bm, bn, nw, ns, prec), extra in launches:
                    c = dict(c0, BM=bm, BN=bn, BD=bd, PREC=prec, **extra)
                    if "PIPE" in fn.arg_names:
                        c["PIPE"] = bool(plan.get("pipe", False))
                    if "CHUNK" in fn.arg_names:
                        c["CHUNK"] = int(plan.get("chunk", 1))
                    if "SPLIT_G" in fn.arg_names:
                        c["SPLIT_G"] = bool(plan.get("split_g", False))
                    if "BDV" in fn.arg_names:
                        c["BDV"] = bdv
                    key = (tuple(sorted(c.items())), nw, ns)
                    if key in seen:
                        continue
                    seen.add(key)
                    spec = (fn, _signature(fn, dtype, c, native=native), c)
                    specs.append(spec + ({"num_warps": nw, "num_stages": ns},) if options else spec)

        add(_attn_lse_kernel, "real", dict(base, G=2, DELTA=True, REST=False), native=("v_ptr",))
        add(_attn_lse_kernel, "maxabs", dict(base, G=2, DELTA=False, REST=True))
        add(_attn_bwd_real_kernel, "real", dict(base, G=2, **needs), native=("v_ptr",))
        for sr, ent in (("abs", False), ("entropy", True)):
            add(_attn_stats_sum_kernel, sr, dict(base, G=1, ENTROPY=ent))
            add(_attn_bwd_sum_kernel, sr, dict(base, G=2 if ent else 1, ENTROPY=ent, **needs))
        add(_attn_stats_maxabs_kernel, "maxabs", dict(base, G=2, CHUNK=1))
        add(_attn_bwd_maxabs_kernel, "maxabs", dict(base, G=2, CHUNK=1, **needs))
        add(_attn_stats_max_kernel, "max", dict(base, G=1, CHUNK=1))
        add(_attn_bwd_max_kernel, "max", dict(base, G=1, CHUNK=1, **needs))
        # the abs / entropy pre- and post-passes (fixed launch shapes)
        flat = {"num_warps": 4, "num_stages": 1}
        first = bd == head_dims[0]            # the flat passes do not depend on the head dim
        extra = [(_abs_scaled_kernel, dict(XLOGX=xl, LOG=lg, BLOCK=_FLAT_BLOCK), ("x0_ptr", "x1_ptr", "x2_ptr"))
                 for xl, lg in ((False, False), (True, False), (False, True)) if first]
        if dtype == "fp32":
            extra += [(_attn_prep_vo_kernel, dict(ROWS=r, COLS=c, ENTROPY=e, BT=_PREP_ROWS, BDV=bdv), ())
                      for e in (False, True) for r, c in ((True, True), (True, False), (False, True))]
            extra += [(_attn_finish_q_kernel, dict(ENTROPY=e, BLOCK=_FLAT_BLOCK), ()) for e in (False, True) if first]
        for fn, c, native in extra:
            spec = (fn, _signature(fn, dtype, c, native=native), c)
            specs.append(spec + (flat,) if options else spec)
    return specs
