"""Softmax and log-softmax kernels (ops ``"softmax"`` ``fn(v, y, dim)`` and
``"log_softmax"`` ``fn(v, p, dim)``): the per-row closed forms of the
reference methods in ``semitriton/semirings/*.py``.

Jacobians: softmax edge x_i -> y_j has weight y_j(δ_ij - y_i) (off-diagonal
|w| = y_i y_j, diagonal y_i(1 - y_i)); log-softmax edge x_i -> y_j has
weight δ_ij - p_i (off-diagonal |w| = p_i, diagonal 1 - p_i). Let f = y
(softmax) or p (log-softmax):

- real:    softmax  g_i = y_i (g_i - Σ_j g_j y_j);  log-softmax  g_i = g_i - p_i Σ_j g_j
- abs:     Z_i = f_i Σ_{j≠i} t_j·e^m + d_i Z_i, t_j = exp(k_j - m), k_j = l_j + log y_j
           (softmax) or l_j (log-softmax), m = finite row max of k; d_i = y_i(1-y_i)
           or 1-p_i. The exclusive sums leave the row's largest t out exactly
           (no S - t cancellation), as ``_util.exclusive_sum``; 1 - y_i is
           Σ_{j≠i} y_j for an entry above 3/4 (``_util.complement``: a
           saturated row's top entry rounds towards 1 in float32).
- entropy: the same sums plus A_i = Σ_{j≠i} t_j u_j (u_j = μ_j - log y_j or μ_j):
           off-diagonal (log f_i + log B_i + m, A_i/B_i - log f_i), diagonal
           (log d_i + l_i, μ_i - log d_i), combined with ⊕.
- maxabs:  m_i = max(log f_i + max_{j≠i} k_j, log d_i + l_i) (row top-2).
- max:     signed: off-diagonal edges are ≤ 0, the diagonal ≥ 0; row top-2 of
           -y_j M-_j and y_j M+_j (softmax) or of M+_j and -M-_j (log-softmax).

One program handles ``BR`` rows; rows up to ``BN`` long live in registers
(``SINGLE``), longer rows are streamed in blocks (2 or 3 passes). Per-element
logs use the SFU's lg2.approx (``_fastmath.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import aot_entry, interpreting, next_pow2
from ._fastmath import fast_log, fast_log_normal, finite_or_zero, logaddexp
from .registry import register

BIG = 2**30


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _top2(c, cols, BIG: tl.constexpr):
    """Per row of c [BR, BN]: largest value, its first column, second largest."""
    v1 = tl.max(c, 1)
    i1 = tl.min(tl.where(c == v1[:, None], cols[None, :], BIG), 1)
    v2 = tl.max(tl.where(cols[None, :] == i1[:, None], float("-inf"), c), 1)
    return v1, i1, v2


@triton.jit
def _top2_merge(V1, I1, V2, b1, bi1, b2):
    upd = b1 > V1
    V2n = tl.where(upd, tl.maximum(V1, b2), tl.maximum(V2, b1))
    return tl.where(upd, b1, V1), tl.where(upd, bi1, I1), V2n


@triton.jit
def _rest(y):
    """Per row: Σ_j y_j over the entries at most 3/4, i.e. Σ_{j≠i} y_j for the
    row's one entry above 3/4 (if any)."""
    return tl.sum(tl.where(y > 0.75, 0.0, y), 1)


@triton.jit
def _log_complement(y, RY):
    """log(1 - y), with ``_complement``'s 1 - y (the row's log RY for an entry
    above 3/4)."""
    return tl.where(y > 0.75, fast_log_normal(RY)[:, None], fast_log_normal(1.0 - y))


@triton.jit
def _complement(y, RY):
    """1 - y without cancellation (``_util.complement``): RY for an entry above
    3/4, which float32 rounds towards 1 (a saturated row), else 1 - y. (Its
    log is taken with ``fast_log_normal``: an RY below 2^-126, a row saturated
    beyond e^-87, reads as no diagonal edge.)"""
    return tl.where(y > 0.75, RY[:, None], 1.0 - y)


@triton.jit
def _excl(c, cols, V1, I1, V2):
    """max_{j≠i} c_j from the row top-2."""
    return tl.where(cols[None, :] == I1[:, None], V2[:, None], V1[:, None])


@triton.jit
def _load_rows(ptr, rows64, cols, stride, mask, other):
    return tl.load(ptr + rows64[:, None] * stride + cols[None, :], mask=mask, other=other)


# ---------------------------------------------------------------------------------------------
# real
# ---------------------------------------------------------------------------------------------
@triton.jit
def _softmax_real_kernel(g_ptr, y_ptr, o_ptr, R, N, s_g, s_y, s_o,
                         LOGSM: tl.constexpr, SINGLE: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    """real: softmax o_i = y_i (g_i - Σ_j g_j y_j); log-softmax o_i = g_i - p_i Σ_j g_j."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    cols0 = tl.arange(0, BN)
    if SINGLE:
        mask = rmask[:, None] & (cols0[None, :] < N)
        g = _load_rows(g_ptr, rows64, cols0, s_g, mask, 0.0)
        y = _load_rows(y_ptr, rows64, cols0, s_y, mask, 0.0).to(tl.float32)
        if LOGSM:
            s = tl.sum(g, 1)
            o = g - y * s[:, None]
        else:
            s = tl.sum(g * y, 1)
            o = y * (g - s[:, None])
        tl.store(o_ptr + rows64[:, None] * s_o + cols0[None, :], o, mask=mask)
    else:
        s = tl.zeros((BR,), dtype=tl.float32)
        for c0 in range(0, N, BN):
            cols = c0 + cols0
            mask = rmask[:, None] & (cols[None, :] < N)
            g = _load_rows(g_ptr, rows64, cols, s_g, mask, 0.0)
            if LOGSM:
                s += tl.sum(g, 1)
            else:
                y = _load_rows(y_ptr, rows64, cols, s_y, mask, 0.0).to(tl.float32)
                s += tl.sum(g * y, 1)
        for c0 in range(0, N, BN):
            cols = c0 + cols0
            mask = rmask[:, None] & (cols[None, :] < N)
            g = _load_rows(g_ptr, rows64, cols, s_g, mask, 0.0)
            y = _load_rows(y_ptr, rows64, cols, s_y, mask, 0.0).to(tl.float32)
            if LOGSM:
                o = g - y * s[:, None]
            else:
                o = y * (g - s[:, None])
            tl.store(o_ptr + rows64[:, None] * s_o + cols[None, :], o, mask=mask)


# ---------------------------------------------------------------------------------------------
# abs / entropy (sums)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _sum_terms(l, mu, y, ENTROPY: tl.constexpr, LOGSM: tl.constexpr):
    """key k_j (the log of the summed term before the shift) and u_j."""
    lf = fast_log(y)
    if LOGSM:
        key = l
        uu = mu
    else:
        key = l + lf
        uu = mu - tl.where(y > 0, lf, 0.0)
    return key, uu


@triton.jit
def _sum_out(l, mu, y, t, u, cols, m, S, I1, RT, SU, RU, RY, ENTROPY: tl.constexpr, LOGSM: tl.constexpr):
    is_max = cols[None, :] == I1[:, None]
    excl_t = tl.where(is_max, RT[:, None], tl.maximum(S[:, None] - t, 0.0))
    lf = fast_log(y)
    l_off = lf + fast_log(excl_t) + m[:, None]
    if LOGSM:
        ld = _log_complement(y, RY)
    else:
        ld = lf + _log_complement(y, RY)
    l_diag = ld + l
    L = logaddexp(l_off, l_diag)
    mu_o = L
    if ENTROPY:
        excl_u = tl.where(is_max, RU[:, None], SU[:, None] - u)
        nz = excl_t != 0.0
        mu_off = tl.where(nz, excl_u / tl.where(nz, excl_t, 1.0), 0.0) - tl.where(y > 0, lf, 0.0)
        mu_diag = mu - finite_or_zero(ld)
        dead = L == float("-inf")
        shift = tl.where(dead, 0.0, L)
        mu_o = tl.exp(l_off - shift) * mu_off + tl.exp(l_diag - shift) * mu_diag
        mu_o = tl.where(dead, 0.0, mu_o)
    return L, mu_o


@triton.jit
def _softmax_sum_kernel(l_ptr, mu_ptr, y_ptr, ol_ptr, omu_ptr, R, N, s_l, s_mu, s_y, s_o,
                        ENTROPY: tl.constexpr, LOGSM: tl.constexpr, SINGLE: tl.constexpr,
                        BR: tl.constexpr, BN: tl.constexpr, BIG: tl.constexpr):
    """abs / entropy softmax and log-softmax rows (see the module docstring):
    m = finite max_j k_j, t_j = exp(k_j - m), S = Σ t, RT = Σ_{j≠j*} t (j* = first
    argmax of t), exclusive sums B_i = (i = j*) ? RT : max(S - t_i, 0); entropy
    also SU = Σ t u, RU = Σ_{j≠j*} t u and A_i = (i = j*) ? RU : SU - t_i u_i."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    cols0 = tl.arange(0, BN)
    if SINGLE:
        mask = rmask[:, None] & (cols0[None, :] < N)
        y = _load_rows(y_ptr, rows64, cols0, s_y, mask, 0.0).to(tl.float32)
        RY = _rest(y)
        l = _load_rows(l_ptr, rows64, cols0, s_l, mask, float("-inf"))
        if ENTROPY:
            mu = _load_rows(mu_ptr, rows64, cols0, s_mu, mask, 0.0)
        else:
            mu = l
        key, uu = _sum_terms(l, mu, y, ENTROPY, LOGSM)
        m = tl.max(key, 1)
        m = finite_or_zero(m)
        t = tl.exp(key - m[:, None])
        S = tl.sum(t, 1)
        T1 = tl.max(t, 1)
        I1 = tl.min(tl.where(t == T1[:, None], cols0[None, :], BIG), 1)
        is_max = cols0[None, :] == I1[:, None]
        RT = tl.sum(tl.where(is_max, 0.0, t), 1)
        u = t
        SU = S
        RU = RT
        if ENTROPY:
            u = t * uu
            SU = tl.sum(u, 1)
            RU = tl.sum(tl.where(is_max, 0.0, u), 1)
        L, mu_o = _sum_out(l, mu, y, t, u, cols0, m, S, I1, RT, SU, RU, RY, ENTROPY, LOGSM)
        o_off = rows64[:, None] * s_o + cols0[None, :]
        tl.store(ol_ptr + o_off, L, mask=mask)
        if ENTROPY:
            tl.store(omu_ptr + o_off, mu_o, mask=mask)
    else:
        # pass 1: the shift (elementwise running max, reduced once: keeps the loop
        # free of cross-thread reductions)
        mv = tl.full((BR, BN), float("-inf"), dtype=tl.float32)
        for c0 in range(0, N, BN):
            cols = c0 + cols0
            mask = rmask[:, None] & (cols[None, :] < N)
            l = _load_rows(l_ptr, rows64, cols, s_l, mask, float("-inf"))
            if LOGSM:
                key = l
            else:
                y = _load_rows(y_ptr, rows64, cols, s_y, mask, 0.0).to(tl.float32)
                key = l + fast_log(y)
            mv = tl.maximum(mv, key)
        m = tl.max(mv, 1)
        m = finite_or_zero(m)
        # pass 2: sums, first argmax of t, sums without it (merged block by block)
        S = tl.zeros((BR,), dtype=tl.float32)
        RT = tl.zeros((BR,), dtype=tl.float32)
        T1 = tl.full((BR,), -1.0, dtype=tl.float32)
        I1 = tl.zeros((BR,), dtype=tl.int32)
        SU = tl.zeros((BR,), dtype=tl.float32)
        RU = tl.zeros((BR,), dtype=tl.float32)
        U1 = tl.zeros((BR,), dtype=tl.float32)
        RY = tl.zeros((BR,), dtype=tl.float32)
        for c0 in range(0, N, BN):
            cols = c0 + cols0
            mask = rmask[:, None] & (cols[None, :] < N)
            l = _load_rows(l_ptr, rows64, cols, s_l, mask, float("-inf"))
            y = _load_rows(y_ptr, rows64, cols, s_y, mask, 0.0).to(tl.float32)
            if ENTROPY:
                mu = _load_rows(mu_ptr, rows64, cols, s_mu, mask, 0.0)
            else:
                mu = l
            key, uu = _sum_terms(l, mu, y, ENTROPY, LOGSM)
            t = tl.exp(key - m[:, None])
            bs = tl.sum(t, 1)
            b1 = tl.max(t, 1)
            bi1 = tl.min(tl.where(t == b1[:, None], cols[None, :], BIG), 1)
            bis = cols[None, :] == bi1[:, None]
            brest = tl.sum(tl.where(bis, 0.0, t), 1)
            upd = b1 > T1
            RT = tl.where(upd, RT + tl.maximum(T1, 0.0) + brest, RT + bs)
            if ENTROPY:
                u = t * uu
                bsu = tl.sum(u, 1)
                bu1 = tl.sum(tl.where(bis, u, 0.0), 1)
                brestu = tl.sum(tl.where(bis, 0.0, u), 1)
                RU = tl.where(upd, RU + U1 + brestu, RU + bsu)
                U1 = tl.where(upd, bu1, U1)
                SU += bsu
            I1 = tl.where(upd, bi1, I1)
            T1 = tl.where(upd, b1, T1)
            S += bs
            RY += _rest(y)
        # pass 3: outputs
        for c0 in range(0, N, BN):
            cols = c0 + cols0
            mask = rmask[:, None] & (cols[None, :] < N)
            l = _load_rows(l_ptr, rows64, cols, s_l, mask, float("-inf"))
            y = _load_rows(y_ptr, rows64, cols, s_y, mask, 0.0).to(tl.float32)
            if ENTROPY:
                mu = _load_rows(mu_ptr, rows64, cols, s_mu, mask, 0.0)
            else:
                mu = l
            key, uu = _sum_terms(l, mu, y, ENTROPY, LOGSM)
            t = tl.exp(key - m[:, None])
            u = t * uu
            L, mu_o = _sum_out(l, mu, y, t, u, cols, m, S, I1, RT, SU, RU, RY, ENTROPY, LOGSM)
            o_off = rows64[:, None] * s_o + cols[None, :]
            tl.store(ol_ptr + o_off, L, mask=mask)
            if ENTROPY:
                tl.store(omu_ptr + o_off, mu_o, mask=mask)


# ---------------------------------------------------------------------------------------------
# maxabs / max (row top-2)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _top2_keys(a, b, y, SIGNED: tl.constexpr, LOGSM: tl.constexpr):
    """The two row quantities whose exclusive maxima are needed.
    maxabs: ka = k (= log y + l or l), kb unused.
    max softmax: ka = -y M- (live), kb = y M+ (live)   [exclusive_min(-y M+) = -excl_max(kb)]
    max log-softmax: ka = M+, kb = -M-."""
    if SIGNED:
        if LOGSM:
            ka = a
            kb = -b
        else:
            live = y > 0
            ka = tl.where(live, -y * b, float("-inf"))
            kb = tl.where(live, y * a, float("-inf"))
    else:
        if LOGSM:
            ka = a
        else:
            ka = fast_log(y) + a
        kb = ka
    return ka, kb


@triton.jit
def _top2_out(a, b, y, cols, V1a, I1a, V2a, V1b, I1b, V2b, RY, SIGNED: tl.constexpr, LOGSM: tl.constexpr):
    ea = _excl(a, cols, V1a, I1a, V2a)
    if SIGNED:
        emin = -_excl(a, cols, V1b, I1b, V2b)          # exclusive min of the negated key
        if LOGSM:
            live = y > 0
            d = _complement(y, RY)
            has_d = d > 0
            off_p = tl.where(live, -y * emin, float("-inf"))   # -p · min_{j≠i} M-_j
            off_n = tl.where(live, -y * ea, float("inf"))      # -p · max_{j≠i} M+_j
            off_p = tl.where(off_p != off_p, float("-inf"), off_p)
            off_n = tl.where(off_n != off_n, float("inf"), off_n)
            dp = tl.where(has_d, d * a, float("-inf"))
            dn = tl.where(has_d, d * b, float("inf"))
            op = tl.maximum(off_p, dp)
            on = tl.minimum(off_n, dn)
        else:
            live = y > 0
            d = y * _complement(y, RY)
            has_d = d > 0
            off_p = y * ea
            off_n = y * emin
            dp = tl.where(has_d, d * a, float("-inf"))
            dn = tl.where(has_d, d * b, float("inf"))
            op = tl.where(live, tl.maximum(off_p, dp), float("-inf"))
            on = tl.where(live, tl.minimum(off_n, dn), float("inf"))
    else:
        lf = fast_log(y)
        if LOGSM:
            ld = _log_complement(y, RY)
        else:
            ld = lf + _log_complement(y, RY)
        op = tl.maximum(lf + ea, ld + a)
        on = op
    return op, on


@triton.jit
def _softmax_top2_kernel(a_ptr, b_ptr, y_ptr, oa_ptr, ob_ptr, R, N, s_a, s_b, s_y, s_o,
                         SIGNED: tl.constexpr, LOGSM: tl.constexpr, SINGLE: tl.constexpr,
                         BR: tl.constexpr, BN: tl.constexpr, BIG: tl.constexpr):
    """maxabs (a = log m): softmax  o_i = max(log y_i + max_{j≠i}(log y_j + a_j), log(y_i(1-y_i)) + a_i);
                           log-softmax o_i = max(log p_i + max_{j≠i} a_j, log(1-p_i) + a_i).
    max (a = M+, b = M-):  softmax  M+_i = max(y_i max_{j≠i}(-y_j M-_j), d_i M+_i),
                                    M-_i = min(y_i min_{j≠i}(-y_j M+_j), d_i M-_i), d_i = y_i(1-y_i),
                                    rows with y_i = 0 read the zero;
                           log-softmax M+_i = max(-p_i min_{j≠i} M-_j, (1-p_i) M+_i),
                                    M-_i = min(-p_i max_{j≠i} M+_j, (1-p_i) M-_i);
    diagonal terms only where d > 0, off-diagonal only where y (p) > 0."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < R
    rows64 = rows.to(tl.int64)
    cols0 = tl.arange(0, BN)
    if SINGLE:
        mask = rmask[:, None] & (cols0[None, :] < N)
        a = _load_rows(a_ptr, rows64, cols0, s_a, mask, float("-inf"))
        y = _load_rows(y_ptr, rows64, cols0, s_y, mask, 0.0).to(tl.float32)
        if SIGNED:
            b = _load_rows(b_ptr, rows64, cols0, s_b, mask, float("inf"))
        else:
            b = a
        ka, kb = _top2_keys(a, b, y, SIGNED, LOGSM)
        V1a, I1a, V2a = _top2(ka, cols0, BIG)
        V1b, I1b, V2b = V1a, I1a, V2a
        if SIGNED:
            V1b, I1b, V2b = _top2(kb, cols0, BIG)
        op, on = _top2_out(a, b, y, cols0, V1a, I1a, V2a, V1b, I1b, V2b, _rest(y), SIGNED, LOGSM)
        o_off = rows64[:, None] * s_o + cols0[None, :]
        tl.store(oa_ptr + o_off, op, mask=mask)
        if SIGNED:
            tl.store(ob_ptr + o_off, on, mask=mask)
    else:
        V1a = tl.full((BR,), float("-inf"), dtype=tl.float32)
        V2a = tl.full((BR,), float("-inf"), dtype=tl.float32)
        I1a = tl.zeros((BR,), dtype=tl.int32)
        V1b = tl.full((BR,), float("-inf"), dtype=tl.float32)
        V2b = tl.full((BR,), float("-inf"), dtype=tl.float32)
        I1b = tl.zeros((BR,), dtype=tl.int32)
        RY = tl.zeros((BR,), dtype=tl.float32)
        for c0 in range(0, N, BN):
            cols = c0 + cols0
            mask = rmask[:, None] & (cols[None, :] < N)
            a = _load_rows(a_ptr, rows64, cols, s_a, mask, float("-inf"))
            y = _load_rows(y_ptr, rows64, cols, s_y, mask, 0.0).to(tl.float32)
            if SIGNED:
                b = _load_rows(b_ptr, rows64, cols, s_b, mask, float("inf"))
            else:
                b = a
            ka, kb = _top2_keys(a, b, y, SIGNED, LOGSM)
            RY += _rest(y)
            b1, bi1, b2 = _top2(ka, cols, BIG)
            V1a, I1a, V2a = _top2_merge(V1a, I1a, V2a, b1, bi1, b2)
            if SIGNED:
                b1, bi1, b2 = _top2(kb, cols, BIG)
                V1b, I1b, V2b = _top2_merge(V1b, I1b, V2b, b1, bi1, b2)
        for c0 in range(0, N, BN):
            cols = c0 + cols0
            mask = rmask[:, None] & (cols[None, :] < N)
            a = _load_rows(a_ptr, rows64, cols, s_a, mask, float("-inf"))
            y = _load_rows(y_ptr, rows64, cols, s_y, mask, 0.0).to(tl.float32)
            if SIGNED:
                b = _load_rows(b_ptr, rows64, cols, s_b, mask, float("inf"))
            else:
                b = a
            op, on = _top2_out(a, b, y, cols, V1a, I1a, V2a, V1b, I1b, V2b, RY, SIGNED, LOGSM)
            o_off = rows64[:, None] * s_o + cols[None, :]
            tl.store(oa_ptr + o_off, op, mask=mask)
            if SIGNED:
                tl.store(ob_ptr + o_off, on, mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _limits():
    """(largest row kept in registers, elements per program, streaming block)."""
    if interpreting():
        return 64, 128, 16
    return 4096, 2048, 1024


def _rows(v, y, dim):
    import torch

    c0 = v[0]
    if c0.dtype != torch.float32 or c0.dim() == 0 or any(c.shape != c0.shape or c.dtype != c0.dtype
                                                          for c in v):
        return None
    if y.shape != c0.shape or y.device != c0.device or y.dtype not in (
            torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return None
    if y.dtype == torch.float64:
        y = y.float()
    dim = dim % c0.dim()
    n = c0.shape[dim]
    if c0.numel() == 0:
        return None
    moved = c0.movedim(dim, -1).shape
    comps = [c.movedim(dim, -1).reshape(-1, n).contiguous() for c in v]
    yy = y.movedim(dim, -1).reshape(-1, n).contiguous()
    return comps, yy, comps[0].shape[0], n, moved, dim


def _launch_rows(kernel, comps, yy, R, n, outs, **const):
    single_max, tile, stream = _limits()
    if n <= single_max:
        BN = next_pow2(n)
        BR = max(1, min(tile // BN, next_pow2(R)))
        single = True
    else:
        BN, BR, single = stream, 1, False
    warps = 4 if BR * BN <= 2048 else 8
    if interpreting():
        warps = 1
    a = comps[0]
    b = comps[1] if len(comps) > 1 else a
    oa = outs[0]
    ob = outs[1] if len(outs) > 1 else oa
    grid = (triton.cdiv(R, BR),)
    kernel[grid](a, b, yy, oa, ob, R, n, a.stride(0), b.stride(0), yy.stride(0), oa.stride(0),
                 SINGLE=single, BR=BR, BN=BN, num_warps=warps, **const)


def _finish(outs, moved, dim):
    return tuple(o.reshape(moved).movedim(-1, dim) for o in outs)


def _make(kind: str, logsm: bool):
    def fn(v, y, dim):
        import torch

        prep = _rows(v, y, dim)
        if prep is None:
            return NotImplemented
        comps, yy, R, n, moved, d = prep
        outs = [torch.empty_like(c) for c in comps]
        if kind == "real":
            single_max, tile, stream = _limits()
            if n <= single_max:
                BN = next_pow2(n)
                BR, single = max(1, min(tile // BN, next_pow2(R))), True
            else:
                BN, BR, single = stream, 1, False
            warps = 1 if interpreting() else (4 if BR * BN <= 2048 else 8)
            _softmax_real_kernel[(triton.cdiv(R, BR),)](
                comps[0], yy, outs[0], R, n, comps[0].stride(0), yy.stride(0), outs[0].stride(0),
                LOGSM=logsm, SINGLE=single, BR=BR, BN=BN, num_warps=warps)
        elif kind in ("abs", "entropy"):
            _launch_rows(_softmax_sum_kernel, comps, yy, R, n, outs,
                         ENTROPY=kind == "entropy", LOGSM=logsm, BIG=BIG)
        else:
            _launch_rows(_softmax_top2_kernel, comps, yy, R, n, outs,
                         SIGNED=kind == "max", LOGSM=logsm, BIG=BIG)
        return _finish(outs, moved, d)

    fn.__name__ = f"{kind}_{'log_softmax' if logsm else 'softmax'}"
    fn.__doc__ = f"{kind} {'log-softmax' if logsm else 'softmax'} rows (see the module docstring)."
    return fn


for _kind in ("real", "abs", "entropy", "maxabs", "max"):
    register("softmax", _kind)(_make(_kind, False))
    register("log_softmax", _kind)(_make(_kind, True))


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs (no torch needed)
# ---------------------------------------------------------------------------------------------
def aot_specs():
    """(kernel, signature, constexprs, options): every semiring variant on both
    paths (rows in registers, streamed rows) with fp32 probabilities, plus
    4096-long rows with bf16 probabilities."""
    specs = []
    i32 = ("R", "N", "s_g", "s_y", "s_o", "s_l", "s_mu", "s_a", "s_b")
    variants = [(_softmax_real_kernel, {}, ("g_ptr", "o_ptr"))]
    variants += [(_softmax_sum_kernel, dict(ENTROPY=e, BIG=BIG), ("l_ptr", "mu_ptr", "ol_ptr", "omu_ptr"))
                 for e in (False, True)]
    variants += [(_softmax_top2_kernel, dict(SIGNED=sg, BIG=BIG), ("a_ptr", "b_ptr", "oa_ptr", "ob_ptr"))
                 for sg in (False, True)]
    shapes = [("fp32", logsm, single, BR, BN, nw)
              for logsm in (False, True) for single, BR, BN, nw in ((True, 16, 128, 4), (False, 1, 1024, 4))]
    shapes += [("bf16", False, True, 1, 4096, 8)]
    for kern, extra, ptrs in variants:
        for ydt, logsm, single, BR, BN, nw in shapes:
            const = dict(extra, LOGSM=logsm, SINGLE=single, BR=BR, BN=BN)
            types = {n: "i32" for n in i32}
            types.update({p: "*fp32" for p in ptrs})
            types["y_ptr"] = "*" + ydt
            specs.append(aot_entry(kern, types, const, nw, 3))
    return specs
