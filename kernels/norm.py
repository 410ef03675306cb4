"""Layer-norm and RMS-norm kernels (ops ``"layer_norm"`` and ``"rms_norm"``,
``fn(v, xhat, rstd, weight)``; v, xhat ``[..., n]``, rstd ``[..., 1]``,
weight ``[n]`` or None).

The dense per-row Jacobian is w_ij = γ_j·rstd·(δ_ij − (c + x̂_i x̂_j)/n)
(c = 1 layer norm, c = 0 RMS norm), contracted per row:
``out_i = ⊕_j edge(w_ij) ⊗ v_j``. Entries are generated in registers, tile by
tile ([BI, BJ], O(n²) per row, no n×n matrix in memory). With
t'_ij = (c + x̂_i x̂_j)/n − δ_ij we have w_ij = −rstd·γ_j·t'_ij, so

- abs:     out_i = log( Σ_j |t'_ij|·e_j ) + log rstd + m,
           e_j = exp(l_j + log|γ_j| − m), m = finite max_j (l_j + log|γ_j|)
- maxabs:  out_i = log( max_j |t'_ij|·e_j ) + log rstd + m (same e_j; the product
           formed as x̂_i·(x̂_j e_j/n) + c e_j/n − δ_ij e_j, one FMA per pair); blocks
           with a linear-space max below 2^-100 (possible underflow) are redone in
           log space by a second launch: max_j (log|t'_ij| + l_j + log|γ_j|) +
           log rstd (exact)
- entropy: z_i = Σ_j |t'|e_j, s_i = Σ_j |t'|e_j (μ_j − log|γ_j| − log rstd) − Σ_j |t'|e_j log|t'|;
           (log z_i + log rstd + m, s_i/z_i)
- max:     M+_i = max_j max(t'·q_j, t'·r_j), M-_i = min_j min(t'·q_j, t'·r_j) with
           q_j = −rstd·γ_j·M+_j, r_j = −rstd·γ_j·M-_j; edges with t' = 0 or γ_j = 0
           and zero values (M+_j = -inf) excluded (t' = 0 by redoing a block
           whose M+ or M- came out as exactly 0, see ``_max_step``).

PRE (abs, maxabs, entropy): the per-column factors (the row shift m, e_j and
x̂_j e_j / n, or entropy's e_j and μ_j − log|γ_j| − log rstd) are computed once
per row by ``_norm_cols_kernel`` instead of by each of the row's n/BI programs
on every tile, so that the O(n²) loop only loads them.

A row whose values are all zero (m = −inf; for max, max_j M+_j = −inf) runs
no tile. A language-model head scores a few positions, so the last layer
norms of a pass see mostly such rows (BERT-base, batch 32: 3 of 26 calls,
4064 of 4096 rows); the launch candidates are timed on live rows.

abs layer norm also has an O(n log n) closed form (``_ln_abs_sorted_kernel``,
the one of ``Abs.layer_norm``): sort the row by x̂, and Σ_j e_j |1 + x̂_i x̂_j|
splits at x̂_j = −1/x̂_i into prefix sums of e and e·x̂.

``real`` stays in torch (not registered).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import aot_entry, bucket, choose, interpreting, next_pow2, row_warps, sm_count
from ._fastmath import fast_log, fast_log2_normal, finite_or_zero
from .registry import register

SR_ABS, SR_MAXABS, SR_MAX, SR_ENTROPY = 1, 2, 3, 4
_CODES = {"abs": SR_ABS, "maxabs": SR_MAXABS, "max": SR_MAX, "entropy": SR_ENTROPY}
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _col_tile(x_row, c0_row, c1_row, g_ptr, j0, jr, N, SR: tl.constexpr, HAS_G: tl.constexpr):
    """The per-column inputs of the j tile at j0: x̂_j, value components
    (l_j, μ_j for entropy; M+_j, M-_j for max) and γ_j (1 without γ);
    padding columns read as a zero value (l = -inf / M+ = -inf)."""
    offs_j = j0 + jr
    mj = offs_j < N
    xj = tl.load(x_row + offs_j, mask=mj, other=0.0).to(tl.float32)
    c0 = tl.load(c0_row + offs_j, mask=mj, other=float("-inf"))
    if SR == 3:
        c1 = tl.load(c1_row + offs_j, mask=mj, other=float("inf"))
    elif SR == 4:
        c1 = tl.load(c1_row + offs_j, mask=mj, other=0.0)
    else:
        c1 = c0
    if HAS_G:
        g = tl.load(g_ptr + offs_j, mask=mj, other=1.0).to(tl.float32)
    else:
        g = tl.full(jr.shape, 1.0, tl.float32)
    return xj, c0, c1, g


@triton.jit
def _t_tile(a_i, xj, offs_i, offs_j, inv_n, cn, DIAG: tl.constexpr):
    """t'_ij = (c + x̂_i x̂_j)/n − δ_ij for a [BI, BJ] tile; DIAG: the tile may
    hold i = j (without it the δ test is not emitted)."""
    t = a_i[:, None] * (xj * inv_n)[None, :] + cn
    if DIAG:
        t = tl.where(offs_i[:, None] == offs_j[None, :], t - 1.0, t)
    return t


@triton.jit
def _tprime(a_i, xj, offs_i, offs_j, i0, j0, inv_n, cn,
            BI: tl.constexpr, BJ: tl.constexpr):
    """``_t_tile`` with the diagonal decided at run time (tile at i0, j0)."""
    t = _t_tile(a_i, xj, offs_i, offs_j, inv_n, cn, False)
    if (j0 < i0 + BI) & (j0 + BJ > i0):
        t = tl.where(offs_i[:, None] == offs_j[None, :], t - 1.0, t)
    return t


@triton.jit
def _diag_tiles(i0, N, BI: tl.constexpr, BJ: tl.constexpr):
    """[d_lo, d_hi): the j tiles (multiples of BJ) below N that hold a diagonal
    entry of the rows i0 .. i0 + BI − 1; the three-loop kernels test δ_ij only
    there (N = 0, a row that runs no tile: both 0)."""
    hi = tl.minimum(tl.cdiv(i0 + BI, BJ), tl.cdiv(N, BJ)) * BJ
    return tl.minimum((i0 // BJ) * BJ, hi), hi


@triton.jit
def _norm_cols_kernel(c0_ptr, c1_ptr, x_ptr, rstd_ptr, g_ptr, m_ptr, p0_ptr, p1_ptr,
                      N, s_c0, s_c1, s_x, s_p,
                      SR: tl.constexpr, HAS_G: tl.constexpr, BLOCK: tl.constexpr):
    """The column factors of one row (PRE), one row per program:
    lg_j = log|γ_j| (0 without γ), m = finite max_j (l_j + lg_j),
    e_j = exp(l_j + lg_j − m); stores m (−inf for a row without a finite
    term: every value zero) and
    abs / maxabs: p0_j = x̂_j e_j / n, p1_j = e_j;
    entropy:      p0_j = e_j, p1_j = μ_j − lg_j − log rstd (0 where e_j = 0)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mk = offs < N
    l = tl.load(c0_ptr + row * s_c0 + offs, mask=mk, other=float("-inf"))
    if HAS_G:
        lg = tl.log(tl.abs(tl.load(g_ptr + offs, mask=mk, other=1.0).to(tl.float32)))
    else:
        lg = tl.zeros([BLOCK], tl.float32)
    t = l + lg
    mx = tl.max(t, 0) + tl.sum(tl.where(t == t, 0.0, t), 0)     # NaN if any term is (tl.max drops NaN)
    m = finite_or_zero(mx)
    e = tl.exp(t - m)
    tl.store(m_ptr + row, tl.where(mx == float("-inf"), float("-inf"), m))   # -inf: a row of zero values
    if SR == 4:
        mu = tl.load(c1_ptr + row * s_c1 + offs, mask=mk, other=0.0)
        lrs = tl.log(tl.load(rstd_ptr + row).to(tl.float32))
        tl.store(p0_ptr + row * s_p + offs, e, mask=mk)
        tl.store(p1_ptr + row * s_p + offs, tl.where(e > 0, mu - lg - lrs, 0.0), mask=mk)
    else:
        x = tl.load(x_ptr + row * s_x + offs, mask=mk, other=0.0).to(tl.float32)
        tl.store(p0_ptr + row * s_p + offs, x * (e / N), mask=mk)
        tl.store(p1_ptr + row * s_p + offs, e, mask=mk)


@triton.jit
def _ln_abs_sorted_kernel(l_ptr, x_ptr, rstd_ptr, g_ptr, o_ptr, ys_ptr, ce_ptr, cs_ptr, R, N,
                          s_l, s_x, s_o, HAS_G: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """abs layer norm in O(n log n) per row (rows pid, pid + P, ...; P = grid
    size), the closed form of ``Abs.layer_norm``: with e_j = |γ_j| exp(l_j − m)
    and the row sorted by x̂ (ys, prefix sums F of e and G of e·x̂, float64),
    S(s) = Σ_j e_j |1 + s x̂_j| = ±[(F_tot − F_k) + s (G_tot − G_k) − (F_k + s G_k)],
    k = #{x̂_j < −1/s} (binary search, STEPS halvings; the sign is that of s),
    Z_i = max(S(x̂_i) − e_i q_i, 0)/n + e_i |1 − q_i/n|, q_i = 1 + x̂_i²,
    out_i = log Z_i + log rstd + m. The sorted row and its prefix sums pass
    through this program's scratch rows (ys, ce, cs: [P, n]). A row of zero
    values (every l_j = −inf) is written as −inf without a sort."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    mk = offs < N
    scr = pid.to(tl.int64) * N
    for it in range(0, tl.cdiv(R - pid, n_prog)):
        row = pid + it * n_prog
        r64 = row.to(tl.int64)
        l_row = l_ptr + r64 * s_l
        x_row = x_ptr + r64 * s_x
        lg = tl.load(l_row + offs, mask=mk, other=float("-inf"))
        if HAS_G:
            lg = lg + tl.log(tl.abs(tl.load(g_ptr + offs, mask=mk, other=1.0).to(tl.float32)))
        mx = tl.max(lg, 0)
        if mx == float("-inf"):
            # a row of zero values (an LM head's unscored positions): Z = 0, no sort
            tl.store(o_ptr + r64 * s_o + offs, tl.full([BLOCK], float("-inf"), tl.float32), mask=mk)
        else:
            m = finite_or_zero(mx)
            x = tl.load(x_row + offs, mask=mk, other=0.0).to(tl.float32)
            # sort x̂ ascending, carrying the column: order-preserving int32 key in the
            # high word, the column in the low word (padding sorts last as +inf)
            bits = tl.where(mk, x, float("inf")).to(tl.int32, bitcast=True)
            key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
            packed = tl.sort((key.to(tl.int64) << 32) | offs.to(tl.int64), 0)
            col = (packed & 0xFFFFFFFF).to(tl.int32)
            live = col < N
            ys = tl.load(x_row + col, mask=live, other=float("inf")).to(tl.float32)
            le = tl.load(l_row + col, mask=live, other=float("-inf"))
            if HAS_G:
                le = le + tl.log(tl.abs(tl.load(g_ptr + col, mask=live, other=1.0).to(tl.float32)))
            fe = tl.exp(le - m).to(tl.float64)
            fy = tl.where(live, fe * ys.to(tl.float64), 0.0)
            ce = tl.cumsum(fe, 0)
            cs = tl.cumsum(fy, 0)
            tot_e = tl.sum(fe, 0)
            tot_es = tl.sum(fy, 0)
            tl.debug_barrier()                       # the previous row's searches are done
            tl.store(ys_ptr + scr + offs, ys, mask=mk)
            tl.store(ce_ptr + scr + offs, ce, mask=mk)
            tl.store(cs_ptr + scr + offs, cs, mask=mk)
            tl.debug_barrier()
            # k_i = #{x̂_j < τ_i}, τ_i = −1/x̂_i in float64 (exact sides for terms
            # with 1 + x̂_i x̂_j at fp32 rounding level); x̂_i = 0: τ = −inf, S = F_tot
            s64 = x.to(tl.float64)
            tau = tl.where(s64 != 0.0, -1.0 / tl.where(s64 != 0.0, s64, 1.0), float("-inf"))
            lo = tl.zeros([BLOCK], tl.int32)
            hi = tl.zeros([BLOCK], tl.int32) + N
            for _ in range(STEPS):
                act = lo < hi
                mid = (lo + hi) // 2
                v = tl.load(ys_ptr + scr + mid, mask=act, other=float("inf")).to(tl.float64)
                go = act & (v < tau)
                lo = tl.where(go, mid + 1, lo)
                hi = tl.where(act & (v >= tau), mid, hi)
            has = (lo > 0) & mk
            below_e = tl.load(ce_ptr + scr + lo - 1, mask=has, other=0.0)
            below_es = tl.load(cs_ptr + scr + lo - 1, mask=has, other=0.0)
            above = (tot_e - below_e) + s64 * (tot_es - below_es)
            below = below_e + s64 * below_es
            S = tl.where(s64 >= 0, above - below, below - above)
            q = 1.0 + s64 * s64
            ei = tl.exp(tl.where(mk, lg, float("-inf")) - m).to(tl.float64)
            total = tl.maximum(S - ei * q, 0.0) / N + ei * tl.abs(1.0 - q / N)
            rs = tl.load(rstd_ptr + row).to(tl.float64)
            out = tl.log(total) + tl.log(rs) + m
            # a NaN x̂ would sort past the padding and drop out of the sums: the row
            # reads NaN, as with the O(n²) kernel and the reference
            bad = tl.max(tl.where(mk & (x != x), 1, 0), 0) > 0
            out = tl.where(bad, float("nan"), out)
            tl.store(o_ptr + r64 * s_o + offs, out.to(tl.float32), mask=mk)


@triton.jit
def _pre_tile(x_row, p0_row, p1_row, j0, jr, N, SR: tl.constexpr):
    """The precomputed column factors of the j tile at j0 (PRE): (x̂_j e_j/n,
    e_j, unused) for abs/maxabs, (x̂_j, e_j, μ_j − log|γ_j| − log rstd) for
    entropy; padding columns read e_j = 0 (no contribution)."""
    offs_j = j0 + jr
    mj = offs_j < N
    a = tl.load(p0_row + offs_j, mask=mj, other=0.0)
    b = tl.load(p1_row + offs_j, mask=mj, other=0.0)
    if SR == 4:
        return tl.load(x_row + offs_j, mask=mj, other=0.0).to(tl.float32), a, b
    return a, b, b


@triton.jit
def _max_step(acc_p, acc_n, a_i, xj, pj, nj, gj, rs, offs_i, offs_j, inv_n, cn, DIAG: tl.constexpr,
              EXCL_T0: tl.constexpr):
    """One [BI, BJ] tile of the signed max semiring: with q_j = −rstd γ_j M+_j,
    r_j = −rstd γ_j M-_j and t' = (c + x̂_i x̂_j)/n − δ_ij (DIAG: the tile may
    hold i = j), acc_p = max(acc_p, t'q_j, t'r_j), acc_n = min(acc_n, t'q_j, t'r_j);
    γ_j = 0 and zero values (M+_j = −inf) give NaN, which max/min skip.
    EXCL_T0: edges with t' = 0 as NaN too (a compare and a select per pair);
    without it such an edge adds the candidate 0, which can only show as an
    output M+ = 0 or M- = 0 (the kernel then redoes that block with EXCL_T0)."""
    t = _t_tile(a_i, xj, offs_i, offs_j, inv_n, cn, DIAG)
    sg = rs * gj
    ok = (pj != float("-inf")) & (sg != 0.0)
    q = tl.where(ok, -(sg * pj), float("nan"))
    r = tl.where(ok, -(sg * nj), float("nan"))
    if EXCL_T0:
        t = tl.where(t == 0.0, float("nan"), t)
    x = t * q[None, :]
    y = t * r[None, :]
    return tl.maximum(acc_p, tl.maximum(x, y)), tl.minimum(acc_n, tl.minimum(x, y))


@triton.jit
def _max_row_block(a_i, x_row, c0_row, c1_row, g_ptr, rs, offs_i, i0, jr, N, n_end, inv_n, cn,
                   SR: tl.constexpr, HAS_G: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                   EXCL_T0: tl.constexpr):
    """(M+_i, M-_i) of a block of rows i over j < n_end, in three loops as in the
    PRE path (the δ test only in the tiles that hold the diagonal)."""
    acc_p = tl.full((BI, BJ), float("-inf"), dtype=tl.float32)
    acc_n = tl.full((BI, BJ), float("inf"), dtype=tl.float32)
    d_lo, d_hi = _diag_tiles(i0, n_end, BI, BJ)
    xj, pj, nj, gj = _col_tile(x_row, c0_row, c1_row, g_ptr, 0, jr, N, SR, HAS_G)
    for j0 in range(0, d_lo, BJ):
        xn, pn, nn, gn = _col_tile(x_row, c0_row, c1_row, g_ptr, j0 + BJ, jr, N, SR, HAS_G)
        acc_p, acc_n = _max_step(acc_p, acc_n, a_i, xj, pj, nj, gj, rs, offs_i, j0 + jr, inv_n, cn, False, EXCL_T0)
        xj, pj, nj, gj = xn, pn, nn, gn
    for j0 in range(d_lo, d_hi, BJ):
        xn, pn, nn, gn = _col_tile(x_row, c0_row, c1_row, g_ptr, j0 + BJ, jr, N, SR, HAS_G)
        acc_p, acc_n = _max_step(acc_p, acc_n, a_i, xj, pj, nj, gj, rs, offs_i, j0 + jr, inv_n, cn, True, EXCL_T0)
        xj, pj, nj, gj = xn, pn, nn, gn
    for j0 in range(d_hi, n_end, BJ):
        xn, pn, nn, gn = _col_tile(x_row, c0_row, c1_row, g_ptr, j0 + BJ, jr, N, SR, HAS_G)
        acc_p, acc_n = _max_step(acc_p, acc_n, a_i, xj, pj, nj, gj, rs, offs_i, j0 + jr, inv_n, cn, False, EXCL_T0)
        xj, pj, nj, gj = xn, pn, nn, gn
    return tl.max(acc_p, 1), tl.min(acc_n, 1)


@triton.jit
def _pre_step(acc, acc_s1, acc_s2, a_i, ua, ub, uc, offs_i, offs_j, inv_n, cn,
              SR: tl.constexpr, DIAG: tl.constexpr):
    """One [BI, BJ] tile of the PRE loop (tile factors from ``_pre_tile``);
    DIAG: the tile may hold diagonal pairs (i = j, the −δ_ij term).
    abs / maxabs: acc ⊕= |x̂_i (x̂_j e_j/n) + c e_j/n − δ_ij e_j| (sum / max);
    entropy: with t = |t'_ij|, acc += t e_j, acc_s1 += t e_j c_j,
    acc_s2 += t e_j log2 t."""
    if SR == 4:                                       # ua = x̂_j, ub = e_j, uc = c_j
        at = tl.abs(_t_tile(a_i, ua, offs_i, offs_j, inv_n, cn, DIAG))
        u = at * ub[None, :]
        acc += u
        acc_s1 += u * uc[None, :]
        acc_s2 += u * fast_log2_normal(tl.maximum(at, 1e-30))
    else:                                             # ua = x̂_j e_j / n, ub = e_j
        tt = a_i[:, None] * ua[None, :] + (cn * ub)[None, :]
        if DIAG:
            tt = tl.where(offs_i[:, None] == offs_j[None, :], tt - ub[None, :], tt)
        if SR == 2:
            acc = tl.maximum(acc, tl.abs(tt))
        else:
            acc += tl.abs(tt)
    return acc, acc_s1, acc_s2


@triton.jit
def _row_block(x_ptr, rstd_ptr, row, i0, N, s_x, CENTERED: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """The per-block constants of a norm program (rows i0 .. i0 + BI − 1 of one
    row): the output indices and their mask, the j tile's aranges, 1/n, c/n,
    the row's x̂ pointer, x̂_i and rstd."""
    offs_i = i0 + tl.arange(0, BI)
    mi = offs_i < N
    jr = tl.arange(0, BJ)
    inv_n = 1.0 / N
    if CENTERED:
        cn = inv_n
    else:
        cn = inv_n * 0.0
    x_row = x_ptr + row * s_x
    a_i = tl.load(x_row + offs_i, mask=mi, other=0.0).to(tl.float32)
    rs = tl.load(rstd_ptr + row).to(tl.float32)
    return offs_i, mi, jr, inv_n, cn, x_row, a_i, rs


@triton.jit
def _maxabs_logspace(x_row, c0_row, g_ptr, a_i, offs_i, i0, jr, N, inv_n, cn,
                     HAS_G: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr):
    """max_j (log|t'_ij| + l_j + log|γ_j|) for the rows i of a block: the maxabs
    row in log space, exact where the linear-space loop's e_j may underflow
    (accurate logs, one per pair)."""
    accl = tl.full((BI, BJ), float("-inf"), dtype=tl.float32)
    for j0 in range(0, N, BJ):
        offs_j = j0 + jr
        xj, lj, muj, gj = _col_tile(x_row, c0_row, c0_row, g_ptr, j0, jr, N, 2, HAS_G)
        t = _tprime(a_i, xj, offs_i, offs_j, i0, j0, inv_n, cn, BI, BJ)
        if HAS_G:
            lj = lj + tl.log(tl.abs(gj))
        accl = tl.maximum(accl, tl.log(tl.abs(t)) + lj[None, :])
    return tl.max(accl, 1)


@triton.jit
def _norm_redo_kernel(c0_ptr, c1_ptr, x_ptr, rstd_ptr, g_ptr, o0_ptr, o1_ptr, m_ptr, flag_ptr, N,
                      s_c0, s_c1, s_x, s_o, SR: tl.constexpr, CENTERED: tl.constexpr, HAS_G: tl.constexpr,
                      BI: tl.constexpr, BJ: tl.constexpr):
    """The blocks of rows that ``_norm_kernel`` flagged (flag_ptr[row, block] ≠ 0),
    redone exactly; every other program reads its flag and stops. maxabs: a
    linear-space max that may have underflowed, redone in log space
    (``_maxabs_logspace``: out_i = that max + log rstd); max: an output that
    came out as exactly 0, redone with the t' = 0 edges excluded
    (``_max_row_block`` with EXCL_T0). Kept out of the main kernel, whose
    registers (and so its occupancy) the rarely taken path would otherwise set."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    if tl.load(flag_ptr + row * tl.num_programs(1) + blk) != 0:
        i0 = blk * BI
        offs_i, mi, jr, inv_n, cn, x_row, a_i, rs = _row_block(x_ptr, rstd_ptr, row, i0, N, s_x, CENTERED, BI, BJ)
        if SR == 3:
            n_end = tl.where(tl.load(m_ptr + row) == float("-inf"), 0, N)
            mp, mn = _max_row_block(a_i, x_row, c0_ptr + row * s_c0, c1_ptr + row * s_c1, g_ptr, rs, offs_i, i0,
                                    jr, N, n_end, inv_n, cn, SR, HAS_G, BI, BJ, True)
            tl.store(o0_ptr + row * s_o + offs_i, mp, mask=mi)
            tl.store(o1_ptr + row * s_o + offs_i, mn, mask=mi)
        else:
            mx = _maxabs_logspace(x_row, c0_ptr + row * s_c0, g_ptr, a_i, offs_i, i0, jr, N, inv_n, cn,
                                  HAS_G, BI, BJ)
            tl.store(o0_ptr + row * s_o + offs_i, mx + tl.log(rs), mask=mi)


@triton.jit
def _norm_kernel(c0_ptr, c1_ptr, x_ptr, rstd_ptr, g_ptr, o0_ptr, o1_ptr, m_ptr, p0_ptr, p1_ptr, flag_ptr,
                 N, s_c0, s_c1, s_x, s_o, s_p,
                 SR: tl.constexpr, CENTERED: tl.constexpr, HAS_G: tl.constexpr,
                 BI: tl.constexpr, BJ: tl.constexpr, ROW_SHIFT: tl.constexpr, PRE: tl.constexpr):
    """One row, BI outputs: out_i = ⊕_j edge(w_ij) ⊗ v_j with
    w_ij = γ_j·rstd·(δ_ij − (c + x̂_i x̂_j)/n); see the module docstring for the
    per-semiring forms (SR: 1 abs, 2 maxabs, 3 max, 4 entropy). The j loop
    loads the next column tile before computing on the current one (the
    loads' latency hides behind the O(BI·BJ) work), and per-pair / per-column
    logs use the SFU (``_fastmath.py``). ROW_SHIFT: the row shift m is read
    from m_ptr (computed once per row by the launcher) instead of by a pass
    over the row in every one of the row's programs. PRE (not max): m and the
    per-column factors are read from ``_norm_cols_kernel``'s output, so the
    loop does no per-column logs or exps. maxabs and max: a block to be redone
    (see ``_norm_redo_kernel``) is flagged in flag_ptr[row, block]."""
    row = tl.program_id(0).to(tl.int64)
    i0 = tl.program_id(1) * BI
    offs_i, mi, jr, inv_n, cn, x_row, a_i, rs = _row_block(x_ptr, rstd_ptr, row, i0, N, s_x, CENTERED, BI, BJ)
    c0_row = c0_ptr + row * s_c0
    c1_row = c1_ptr + row * s_c1

    if SR == 3:
        # a row of zero values (m_ptr: max_j M+_j = −inf) runs no tile: M± = ∓inf
        n_end = tl.where(tl.load(m_ptr + row) == float("-inf"), 0, N)
        # edges with t' = 0 (1 + x̂_i x̂_j = 0 exactly; RMS norm: x̂_j = 0) are
        # rare: the loops keep their candidate 0, and a block where an output
        # came out as exactly 0 is flagged for ``_norm_redo_kernel``
        mp, mn = _max_row_block(a_i, x_row, c0_row, c1_row, g_ptr, rs, offs_i, i0, jr, N, n_end, inv_n, cn,
                                SR, HAS_G, BI, BJ, False)
        redo = mi & ((mp == 0.0) | (mn == 0.0))
        tl.store(flag_ptr + row * tl.num_programs(1) + tl.program_id(1), tl.sum(redo.to(tl.int32), 0))
        tl.store(o0_ptr + row * s_o + offs_i, mp, mask=mi)
        tl.store(o1_ptr + row * s_o + offs_i, mn, mask=mi)
    else:
        # the shift: m = finite max_j (l_j + log|γ_j|)
        # (−inf for a row of zero values: it runs no tile, and every output is zero)
        if ROW_SHIFT or PRE:
            m = tl.load(m_ptr + row)
        else:
            mv = tl.full((BJ,), float("-inf"), dtype=tl.float32)
            nv = tl.zeros((BJ,), dtype=tl.float32)              # NaN where a term is NaN (tl.maximum drops it)
            for j0 in range(0, N, BJ):
                offs_j = j0 + jr
                mj = offs_j < N
                lj = tl.load(c0_row + offs_j, mask=mj, other=float("-inf"))
                if HAS_G:
                    lj = lj + fast_log(tl.abs(tl.load(g_ptr + offs_j, mask=mj, other=1.0).to(tl.float32)))
                mv = tl.maximum(mv, lj)
                nv += tl.where(lj == lj, 0.0, lj)
            mx = tl.max(mv, 0) + tl.sum(nv, 0)
            m = tl.where(mx == float("-inf"), float("-inf"), finite_or_zero(mx))
        n_end = tl.where(m == float("-inf"), 0, N)
        lrs = tl.log(rs)
        acc = tl.zeros((BI, BJ), dtype=tl.float32)
        if SR == 4:
            acc_s1 = tl.zeros((BI, BJ), dtype=tl.float32)
            acc_s2 = tl.zeros((BI, BJ), dtype=tl.float32)
        else:
            acc_s1 = acc                  # unused outside entropy
            acc_s2 = acc
        if PRE:
            # three loops: the tiles left of the diagonal block, the tiles that
            # hold diagonal entries (δ_ij), the rest; the δ test (an integer
            # compare and a select per pair, which the compiler would otherwise
            # predicate into every tile) runs only in the middle one
            p0_row = p0_ptr + row * s_p
            p1_row = p1_ptr + row * s_p
            d_lo, d_hi = _diag_tiles(i0, n_end, BI, BJ)
            ua, ub, uc = _pre_tile(x_row, p0_row, p1_row, 0, jr, N, SR)
            for j0 in range(0, d_lo, BJ):
                na, nb, nc = _pre_tile(x_row, p0_row, p1_row, j0 + BJ, jr, N, SR)
                acc, acc_s1, acc_s2 = _pre_step(acc, acc_s1, acc_s2, a_i, ua, ub, uc, offs_i, j0 + jr,
                                                inv_n, cn, SR, False)
                ua, ub, uc = na, nb, nc
            for j0 in range(d_lo, d_hi, BJ):
                na, nb, nc = _pre_tile(x_row, p0_row, p1_row, j0 + BJ, jr, N, SR)
                acc, acc_s1, acc_s2 = _pre_step(acc, acc_s1, acc_s2, a_i, ua, ub, uc, offs_i, j0 + jr,
                                                inv_n, cn, SR, True)
                ua, ub, uc = na, nb, nc
            for j0 in range(d_hi, n_end, BJ):
                na, nb, nc = _pre_tile(x_row, p0_row, p1_row, j0 + BJ, jr, N, SR)
                acc, acc_s1, acc_s2 = _pre_step(acc, acc_s1, acc_s2, a_i, ua, ub, uc, offs_i, j0 + jr,
                                                inv_n, cn, SR, False)
                ua, ub, uc = na, nb, nc
        else:
            xj, lj, muj, gj = _col_tile(x_row, c0_row, c1_row, g_ptr, 0, jr, N, SR, HAS_G)
            for j0 in range(0, n_end, BJ):
                offs_j = j0 + jr
                xn, ln, mun, gn = _col_tile(x_row, c0_row, c1_row, g_ptr, j0 + BJ, jr, N, SR, HAS_G)
                if HAS_G:
                    lg = fast_log(tl.abs(gj))
                else:
                    lg = gj * 0.0
                ej = tl.exp(lj + lg - m)
                if SR == 2:
                    # |t'_ij|·e_j = |x̂_i (x̂_j e_j / n) + c e_j / n − δ_ij e_j|: one FMA per pair
                    tt = a_i[:, None] * (xj * inv_n * ej)[None, :] + (cn * ej)[None, :]
                    if (j0 < i0 + BI) & (j0 + BJ > i0):
                        tt = tl.where(offs_i[:, None] == offs_j[None, :], tt - ej[None, :], tt)
                    acc = tl.maximum(acc, tl.abs(tt))
                else:
                    t = _tprime(a_i, xj, offs_i, offs_j, i0, j0, inv_n, cn, BI, BJ)
                    at = tl.abs(t)
                    u = at * ej[None, :]
                if SR == 1:
                    acc += u
                elif SR == 4:
                    cj = tl.where(ej > 0, muj - lg - lrs, 0.0)
                    acc += u
                    acc_s1 += u * cj[None, :]
                    acc_s2 += u * fast_log2_normal(tl.maximum(at, 1e-30))
                xj, lj, muj, gj = xn, ln, mun, gn
        if SR == 2:
            mx = tl.max(acc, 1)
            out = tl.log(mx) + lrs + m
            # 2^-100: exp may have underflowed (not in a row of zero values: its max is exact)
            need = mi & (mx < 7.888609052210118e-31) & (n_end > 0)
            tl.store(flag_ptr + row * tl.num_programs(1) + tl.program_id(1), tl.sum(need.to(tl.int32), 0))
            tl.store(o0_ptr + row * s_o + offs_i, out, mask=mi)
        else:
            z = tl.sum(acc, 1)
            out = tl.log(z) + lrs + m
            tl.store(o0_ptr + row * s_o + offs_i, out, mask=mi)
            if SR == 4:
                s = tl.sum(acc_s1, 1) - LN2 * tl.sum(acc_s2, 1)
                nz = z != 0.0
                mu = tl.where(nz, s / tl.where(nz, z, 1.0), 0.0)
                mu = tl.where(out == float("-inf"), 0.0, mu)
                tl.store(o1_ptr + row * s_o + offs_i, mu, mask=mi)


#: the widest row the column-factor pass (PRE) takes in one program
PRE_MAX_N = 8192

#: register cap of one PRE candidate (ptxas ``.maxnreg``). The 64-row tiles of
#: abs, maxabs and entropy take 147-167 registers at 4 warps, so 3 programs
#: (12 warps) share an SM; at 128 they fit 4 (16 warps), with no spill for
#: entropy and 80 bytes for abs/maxabs, reloaded only in the diagonal tiles'
#: loop (ptxas, sm_90, triton 3.6). These loops run far below their issue
#: limits (H100, seventh session: abs 4.1 and maxabs 2.6 T pairs/s against
#: 16.7 at two instructions a pair), i.e. they wait on latency, which more
#: warps hide.
MAXNREG = 128

#: register caps of the max semiring's candidates by num_warps: without the
#: per-pair t' = 0 select (ninth session) ptxas took 112-148 registers where it
#: had taken 95-128, one program a SM fewer; at these caps, no spill (triton 3.6)
MAX_SR_NREG = {4: 96, 8: 128}


def _configs(sr: int, n: int | None = None, centered: bool = True):
    """Launch candidates, best guess first. ROW_SHIFT: the row shift computed
    once per row by the launcher, not in each of the row's n/BI programs (SASS
    of the abs kernel at 64x64: the per-program shift pass was 12 x 65
    instructions per thread against ~12 x 84 for the O(n²) loop itself); PRE
    (not max; rows up to PRE_MAX_N): the shift and every per-column factor
    computed once per row by ``_norm_cols_kernel``, which takes the per-column
    logs and exps out of the loop; SORTED (abs layer norm): the O(n log n)
    closed form ``_ln_abs_sorted_kernel`` (WARPS_X: its num_warps, a multiple of
    ``row_warps``). On an H100 (seventh session) the sorted kernel with
    row_warps took 0.416 ms at BERT-base's 4096 x 768 against 0.596 for the
    best O(n²) candidate; its 6632 SASS instructions a row (sort of packed
    64-bit keys: ISETP/SEL/SHFL) at 4 warps run at about a quarter of the
    issue rate by count, hence the wider candidates (not yet timed)."""
    pre = sr != SR_MAX and (n is None or n <= PRE_MAX_N)
    if interpreting():
        return [dict(BI=16, BJ=16, num_warps=1, num_stages=1, ROW_SHIFT=True, PRE=pre)]
    # the sorted kernel with 1 and 4 times row_warps (ptxas, sm_90, n = 1024: 4 warps
    # hold 168 registers a thread, 12 warps a SM; 16 warps 128 registers, 16 warps a SM;
    # 8 warps 174 registers, 8 a SM)
    sort = ([dict(SORTED=True, WARPS_X=x) for x in (1, 4)]
            if sr == SR_ABS and centered and (n is None or n <= PRE_MAX_N) else [])
    if sr in (SR_ABS, SR_MAXABS):
        cs = [dict(BI=64, BJ=64, num_warps=4, num_stages=3), dict(BI=128, BJ=64, num_warps=8, num_stages=3),
              dict(BI=64, BJ=128, num_warps=8, num_stages=3)]
    else:
        cs = [dict(BI=64, BJ=32, num_warps=4, num_stages=3), dict(BI=64, BJ=64, num_warps=8, num_stages=3),
              dict(BI=32, BJ=64, num_warps=4, num_stages=3)]
    if sr == SR_MAX:                      # no shift in the signed semiring; registers as before the t' = 0 redo
        return [dict(c, ROW_SHIFT=False, PRE=False, maxnreg=MAX_SR_NREG[c["num_warps"]]) for c in cs]
    plain = ([dict(cs[0], ROW_SHIFT=True, PRE=False), dict(cs[0], ROW_SHIFT=False, PRE=False)]
             + [dict(c, ROW_SHIFT=True, PRE=False) for c in cs[1:]])
    pres = [dict(c, ROW_SHIFT=True, PRE=True) for c in cs[:2]] if pre else []
    if pre:      # the first tile with at most 128 registers (see MAXNREG)
        pres.insert(1, dict(pres[0], maxnreg=MAXNREG))
    return sort + pres + plain


def _row_shift(l, g):
    """m_r = max_j (l_rj + log|γ_j|), [R]: +inf and NaN read as 0, −inf (a row
    of zero values, which the kernel skips) kept."""
    import torch
    t = torch.amax(l if g is None else l + torch.log(torch.abs(g.float())), dim=-1)
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=float("-inf")).contiguous()


def row_inputs(v, xhat, rstd, weight, max_n=None):
    """The per-row arguments of the norm kernels: value components, x̂ and γ as
    contiguous [R, n] / [n] (float64 inputs cast to fp32), rstd as [R], and
    empty outputs; None where the kernel declines (non-fp32 values, mismatched
    shapes, n = 0 or above ``max_n``)."""
    import torch

    c0 = v[0]
    if c0.dtype != torch.float32 or c0.dim() == 0 or any(c.shape != c0.shape or c.dtype != c0.dtype
                                                          for c in v):
        return None
    n = c0.shape[-1]
    if n == 0 or c0.numel() == 0 or xhat.shape != c0.shape or rstd.numel() * n != c0.numel():
        return None
    if (max_n is not None and n > max_n) or (weight is not None and weight.numel() != n):
        return None
    R = c0.numel() // n

    def f32(t):
        return (t.float() if t.dtype == torch.float64 else t).contiguous()

    comps = [c.reshape(R, n).contiguous() for c in v]
    g = None if weight is None else f32(weight.reshape(n))
    return R, n, comps, f32(xhat.reshape(R, n)), f32(rstd.reshape(R)), g, [torch.empty_like(c) for c in comps]


def _sorted_programs(R: int, device) -> int:
    """Programs of the sorted abs kernel (each owns one scratch row and loops
    over rows): 8 per SM on a GPU."""
    if device.type != "cuda":
        return max(1, min(R, 4))
    return max(1, min(R, 8 * sm_count(device.index if device.index is not None else 0)))


def _launch_sorted(l, x, rs, g, out, R: int, n: int, warps_x: int = 1):
    """``_ln_abs_sorted_kernel`` on [R, n] rows (the whole row in one block),
    with ``warps_x`` times ``row_warps`` warps (at most 32)."""
    import torch
    P = _sorted_programs(R, l.device)
    block = max(16, next_pow2(n))
    ys = torch.empty((P, n), dtype=torch.float32, device=l.device)
    ce = torch.empty((P, n), dtype=torch.float64, device=l.device)
    cs = torch.empty_like(ce)
    _ln_abs_sorted_kernel[(P,)](l, x, rs, g if g is not None else x, out, ys, ce, cs, R, n,
                                l.stride(0), x.stride(0), out.stride(0), HAS_G=g is not None,
                                BLOCK=block, STEPS=block.bit_length(),
                                num_warps=1 if interpreting() else min(32, row_warps(block) * warps_x),
                                num_stages=1)


def _norm(v, xhat, rstd, weight, centered: bool, kind: str):
    import torch

    rows = row_inputs(v, xhat, rstd, weight)
    if rows is None:
        return NotImplemented
    R, n, comps, x, rs, g, outs = rows
    sr = _CODES[kind]
    a = comps[0]
    b = comps[1] if len(comps) > 1 else a
    o0 = outs[0]
    o1 = outs[1] if len(outs) > 1 else o0

    gp = g if g is not None else x

    def launch(cfg, a=a, b=b, o0=o0, o1=o1):
        if cfg.get("SORTED"):                   # abs layer norm only (see _configs)
            if not (centered and sr == SR_ABS):
                raise ValueError("the sorted closed form is the abs layer norm's only")
            _launch_sorted(a, x, rs, g, o0, R, n, cfg.get("WARPS_X", 1))
            return
        meta = dict(cfg)
        meta.setdefault("PRE", False)
        grid = (R, triton.cdiv(n, meta["BI"]))
        p0 = p1 = x
        if meta["PRE"]:
            m = torch.empty((R,), dtype=torch.float32, device=a.device)
            p0 = torch.empty((R, n), dtype=torch.float32, device=a.device)
            p1 = torch.empty_like(p0)
            block = max(16, next_pow2(n))
            _norm_cols_kernel[(R,)](a, b, x, rs, gp, m, p0, p1, n, a.stride(0), b.stride(0), x.stride(0),
                                    p0.stride(0), SR=sr, HAS_G=g is not None, BLOCK=block,
                                    num_warps=row_warps(block))
        else:
            # max: m_r = max_j M+_rj, −inf in a row of zero values (which the kernel skips)
            m = torch.amax(a, dim=-1).contiguous() if sr == SR_MAX else _row_shift(a, g) if meta["ROW_SHIFT"] else rs
        redo = sr in (SR_MAXABS, SR_MAX)
        flag = torch.empty(grid, dtype=torch.int32, device=a.device) if redo else x
        _norm_kernel[grid](a, b, x, rs, gp, o0, o1, m, p0, p1, flag, n,
                           a.stride(0), b.stride(0), x.stride(0), o0.stride(0), p0.stride(0),
                           SR=sr, CENTERED=centered, HAS_G=g is not None, **meta)
        if redo:                                # the flagged blocks, exactly (_norm_redo_kernel)
            _norm_redo_kernel[grid](a, b, x, rs, gp, o0, o1, m, flag, n, a.stride(0), b.stride(0), x.stride(0),
                                    o0.stride(0), SR=sr, CENTERED=centered, HAS_G=g is not None, BI=meta["BI"],
                                    BJ=meta["BJ"], num_warps=meta.get("num_warps", 4), num_stages=1)

    dense: list = []

    def timed(cfg):
        """Candidates are timed on every row live (values 1, log 0), into
        scratch outputs: rows of zero values run no tile, so a call with
        mostly dead rows (a language-model head's) would time nothing."""
        if not dense:
            one = torch.ones_like(a) if sr == SR_MAX else torch.zeros_like(a)
            dense.extend([one, -one if sr == SR_MAX else one, torch.empty_like(o0), torch.empty_like(o1)])
        launch(cfg, *dense)

    key = ("norm", sr, centered, g is not None, bucket(R), bucket(n), str(a.device))
    launch(choose(key, _configs(sr, n, centered), timed))
    return tuple(o.reshape(v[0].shape) for o in outs)


def _make(kind: str, centered: bool):
    def fn(v, xhat, rstd, weight):
        return _norm(v, xhat, rstd, weight, centered, kind)

    fn.__name__ = f"{kind}_{'layer_norm' if centered else 'rms_norm'}"
    fn.__doc__ = (f"{kind} {'layer' if centered else 'RMS'} norm: out_i = ⊕_j edge(γ_j rstd "
                  f"(δ_ij − ({1 if centered else 0} + x̂_i x̂_j)/n)) ⊗ v_j.")
    return fn


for _kind in ("abs", "maxabs", "max", "entropy"):
    register("layer_norm", _kind)(_make(_kind, True))
    register("rms_norm_dense", _kind)(_make(_kind, False))   # O(n²); the engine uses the O(n) closed forms


def aot_specs():
    """(kernel, signature, constexprs, options): each semiring × (layer, RMS) with
    fp32 γ, plus bf16 x̂/γ, no γ, a second tile shape per semiring, the variant
    that computes the row shift per program, the PRE variants, the
    column-factor kernel and the sorted abs layer norm (rows up to 1024 and
    4096 wide)."""
    specs = []
    kern = _norm_kernel
    for kind, sr in _CODES.items():
        cfgs = ((64, 64, 4), (128, 64, 8)) if sr in (SR_ABS, SR_MAXABS) else ((64, 32, 4), (64, 64, 8))
        runs = [(True, True, "fp32", cfgs[0]), (False, True, "fp32", cfgs[0]), (True, True, "bf16", cfgs[0]),
                (True, False, "fp32", cfgs[0]), (False, True, "fp32", cfgs[1])]
        runs = [r + (sr != SR_MAX, False) for r in runs]
        runs = [r + (None,) for r in runs]
        if sr != SR_MAX:
            runs.append((True, True, "fp32", cfgs[0], False, False, None))   # the shift computed per program
            runs += [(True, True, "fp32", cfgs[0], True, True, None), (True, True, "bf16", cfgs[0], True, True, None),
                     (False, False, "fp32", cfgs[1], True, True, None),      # PRE
                     (True, True, "fp32", cfgs[0], True, True, MAXNREG)]     # PRE with the register cap
        for centered, has_g, dt, (bi, bj, nw), row_shift, pre, maxnreg in runs:
            const = dict(SR=sr, CENTERED=centered, HAS_G=has_g, BI=bi, BJ=bj, ROW_SHIFT=row_shift, PRE=pre)
            types = {n: "i32" for n in kern.arg_names}
            types.update({"c0_ptr": "*fp32", "c1_ptr": "*fp32", "x_ptr": "*" + dt, "rstd_ptr": "*fp32",
                          "g_ptr": "*" + dt, "o0_ptr": "*fp32", "o1_ptr": "*fp32", "m_ptr": "*fp32",
                          "p0_ptr": "*fp32", "p1_ptr": "*fp32", "flag_ptr": "*i32"})
            spec = aot_entry(kern, types, const, nw, 3)
            if sr == SR_MAX:
                maxnreg = MAX_SR_NREG[nw]
            if maxnreg:
                spec[3]["maxnreg"] = maxnreg
            specs.append(spec)
        if sr in (SR_MAXABS, SR_MAX):     # the exact redo of flagged blocks
            bi, bj, nw = cfgs[0]
            for centered, has_g, dt in ((True, True, "fp32"), (False, False, "fp32"), (True, True, "bf16")):
                types = {n: "i32" for n in _norm_redo_kernel.arg_names}
                types.update({"c0_ptr": "*fp32", "c1_ptr": "*fp32", "x_ptr": "*" + dt, "rstd_ptr": "*fp32",
                              "g_ptr": "*" + dt, "o0_ptr": "*fp32", "o1_ptr": "*fp32", "m_ptr": "*fp32",
                              "flag_ptr": "*i32"})
                specs.append(aot_entry(_norm_redo_kernel, types,
                                       dict(SR=sr, CENTERED=centered, HAS_G=has_g, BI=bi, BJ=bj), nw, 1))
        if sr == SR_MAX:
            continue
        if sr == SR_ABS:                  # the O(n log n) layer norm
            for has_g, dt, block, wx in ((True, "fp32", 1024, 1), (True, "bf16", 1024, 1), (False, "fp32", 4096, 1),
                                         (True, "fp32", 1024, 4)):
                types = {n: "i32" for n in _ln_abs_sorted_kernel.arg_names}
                types.update({"l_ptr": "*fp32", "x_ptr": "*" + dt, "rstd_ptr": "*fp32", "g_ptr": "*" + dt,
                              "o_ptr": "*fp32", "ys_ptr": "*fp32", "ce_ptr": "*fp64", "cs_ptr": "*fp64"})
                specs.append(aot_entry(_ln_abs_sorted_kernel, types,
                                       dict(HAS_G=has_g, BLOCK=block, STEPS=block.bit_length()),
                                       row_warps(block) * wx, 1))
        for has_g, dt, block in ((True, "fp32", 1024), (True, "bf16", 1024), (False, "fp32", 4096)):
            types = {n: "i32" for n in _norm_cols_kernel.arg_names}
            types.update({"c0_ptr": "*fp32", "c1_ptr": "*fp32", "x_ptr": "*" + dt, "rstd_ptr": "*fp32",
                          "g_ptr": "*" + dt, "m_ptr": "*fp32", "p0_ptr": "*fp32", "p1_ptr": "*fp32"})
            specs.append(aot_entry(_norm_cols_kernel, types, dict(SR=sr, HAS_G=has_g, BLOCK=block),
                                   row_warps(block), 1))
    return specs
