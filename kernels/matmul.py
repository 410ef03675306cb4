"""Semiring matmul kernels (op ``"matmul"``):
``out[..., i, k] = ⊕_j v[..., i, j] ⊗ edge(w[..., j, k])``.

- abs      (value log Z):   out = log( exp(l - rowmax) @ |W| ) + rowmax        (tensor cores)
- entropy  (log z, μ):      z = a@|W|, s = (a·μ)@|W| + a@E, E = -|W|log|W|,
                            a = exp(l - rowmax); l' = log z + rowmax, μ' = s/z     (tensor cores)
- maxabs   (log m):         out = max_j l[i,j] + log|W[j,k]|                   (SIMT max-plus)
- max      (M+, M-):        M+ = max_j max(w·p, w·n), M- = min_j min(w·p, w·n) over live
                            edges (w ≠ 0) and live values (p ≠ -inf)           (SIMT)

The SIMT kernels can split the contraction index over several programs
(split-J: partial results per slice, combined with the semiring's ⊕, i.e.
max / min), which the autotuner is offered where the output grid alone is too
small to fill the GPU (model shapes, a language-model head's few live rows).
With a cached log|W| (2-D weights) the max-plus product has two forms, timed
against each other per shape: rank-1 updates over j with each thread owning
one output column (``_maxplus_mm_kernel``; the a column is broadcast through
shared memory), and register-blocked quarters where each thread owns an 8×4
block of each (``_maxplus_blocked_kernel``; operands loaded straight into
registers, no barrier in the loop).

``v`` components are fp32 ``[..., I, J]`` (any strides: rmatmul passes
transposed views); ``w`` is 2-D ``[J, K]`` (any leading dims of v: rows are
flattened, or a batch grid axis with a stride-0 weight when the rows of a
strided view cannot be flattened) or batched ``[..., J, K]`` with exactly v's
leading dims. Anything else (broadcast batch patterns, float64 values,
empty sizes, offsets beyond int32) returns ``NotImplemented`` and the torch
reference runs. ``real`` stays with cuBLAS (not registered).

Precision: fp32 weights contract with ``input_precision="tf32x3"`` (three
TF32 tensor-core products per tile, ~1e-6 relative error; never plain TF32;
``SEMITRITON_FP32_DOT=ieee`` gives fp32 FMA code instead). bf16 weights
contract in that dtype on the tensor cores with fp32 accumulation;
the fp32 exp tile (and a·μ, and E = -|W|log|W|) is split into a hi and a lo
part in the weight dtype, so the result keeps fp32 accuracy
(SEMITRITON_LOWP_SPLIT=0: one rounded product, ~3e-3 relative). fp16
weights are declined: fp16's 5-bit exponent cannot hold that split for terms
more than ~10 nats below a row's maximum (the cuBLAS path takes them as an
fp32 copy, ``logspace_gemm``). Two forms
of that GEMM are timed against each other: the exp and the split per tile
inside the loop (``_logsum_mm_kernel``), or once per element in a prologue
(``_lowp_split_kernel``) followed by a loop of loads and dots that the
compiler pipelines (``_lowp_gemm_kernel``, ``PRE`` candidates).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import aot_entry, bucket, choose, env, finite_row_max, fits_int32, interpreting, sm_count
from .registry import register


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
def _weight_cache():
    from semitriton import weight_cache  # torch-only module; imported at call time
    return weight_cache


@triton.jit
def _tile_ids(pid, I, K, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped (L2-friendly) ordering of the output tiles."""
    num_m = tl.cdiv(I, BM)
    num_n = tl.cdiv(K, BN)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % size_m)
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _dot_tile(I, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile of a batched GEMM (grid: tiles, batch): the
    batch index, the row / column / contraction aranges and the row and column
    masks."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), I, K, BM, BN, GROUP_M)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    return tl.program_id(1).to(tl.int64), offs_m, offs_n, tl.arange(0, BK), offs_m < I, offs_n < K


@triton.jit
def _split_products(acc_z, acc_s, a_hi, a_lo, am_hi, am_lo, w, e, elo,
                    ENTROPY: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One k-step of the abs / entropy GEMM: z += a_hi·w (+ a_lo·w); entropy also
    s += am_hi·w + a_hi·e (+ am_lo·w + a_lo·e + a_hi·elo), the products of the
    hi/lo split (SPLIT; the lo·lo terms dropped) or one product each. Unused
    operands may be placeholders. UPCAST (interpreter): the operands go to fp32
    first (its low-precision tl.dot is unreliable; the values are the same)."""
    if UPCAST:
        a_hi = a_hi.to(tl.float32)
        a_lo = a_lo.to(tl.float32)
        am_hi = am_hi.to(tl.float32)
        am_lo = am_lo.to(tl.float32)
        w = w.to(tl.float32)
        e = e.to(tl.float32)
        elo = elo.to(tl.float32)
    acc_z = tl.dot(a_hi, w, acc_z, input_precision=PREC)
    if SPLIT:
        acc_z = tl.dot(a_lo, w, acc_z, input_precision=PREC)
    if ENTROPY:
        acc_s = tl.dot(am_hi, w, acc_s, input_precision=PREC)
        acc_s = tl.dot(a_hi, e, acc_s, input_precision=PREC)
        if SPLIT:
            acc_s = tl.dot(am_lo, w, acc_s, input_precision=PREC)
            acc_s = tl.dot(a_lo, e, acc_s, input_precision=PREC)
            acc_s = tl.dot(a_hi, elo, acc_s, input_precision=PREC)
    return acc_z, acc_s


@triton.jit
def _logsum_store(acc_z, acc_s, m, ol_ptr, omu_ptr, o_off, omask, ENTROPY: tl.constexpr):
    """ol = log z + m (m: the row shift, [BM]); entropy: omu = s / z, 0 where z = 0
    or ol = -inf."""
    out_l = tl.log(acc_z) + m[:, None]
    tl.store(ol_ptr + o_off, out_l, mask=omask)
    if ENTROPY:
        nz = acc_z != 0.0
        mu_o = tl.where(nz, acc_s / tl.where(nz, acc_z, 1.0), 0.0)
        mu_o = tl.where(out_l == float("-inf"), 0.0, mu_o)
        tl.store(omu_ptr + o_off, mu_o, mask=omask)


@triton.jit
def _logsum_mm_kernel(
        l_ptr, mu_ptr, m_ptr, w_ptr, e_ptr, elo_ptr, ol_ptr, omu_ptr,
        I, J, K,
        s_lb, s_li, s_lj, s_ub, s_ui, s_uj,
        s_wb, s_wj, s_wk, s_eb, s_ej, s_ek,
        ENTROPY: tl.constexpr, LOWP: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
        PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """abs:     ol[b,i,k] = log( Σ_j exp(l[b,i,j] - m[b,i]) · |w[b,j,k]| ) + m[b,i]
    entropy: with a = exp(l - m):  z = Σ_j a·|w|,  s = Σ_j a·μ·|w| + Σ_j a·e
             (e = -|w| log|w| precomputed), ol = log z + m, omu = s/z (0 where z = 0
             or ol = -inf).
    m[b,i] is the row max of l (0 for rows that are all -inf), so a ∈ [0, 1].
    LOWP (bf16/fp16 weights): the a and a·μ tiles are cast to the weight dtype for
    the tensor cores (fp32 accumulation); with SPLIT they are split into hi + lo
    parts (and e into e + elo, elo = e - e_hi precomputed), which brings the
    contraction to fp32 accuracy for 2 (abs) or 7 (entropy) dots instead of 1 or 3."""
    bid, offs_m, offs_n, offs_k, mask_m, mask_n = _dot_tile(I, K, BM, BN, BK, GROUP_M)

    m = tl.load(m_ptr + bid * I + offs_m, mask=mask_m, other=0.0)
    l_ptrs = l_ptr + bid * s_lb + offs_m[:, None] * s_li + offs_k[None, :] * s_lj
    w_ptrs = w_ptr + bid * s_wb + offs_k[:, None] * s_wj + offs_n[None, :] * s_wk
    if ENTROPY:
        mu_ptrs = mu_ptr + bid * s_ub + offs_m[:, None] * s_ui + offs_k[None, :] * s_uj
        e_off = bid * s_eb + offs_k[:, None] * s_ej + offs_n[None, :] * s_ek
    acc_z = tl.zeros((BM, BN), dtype=tl.float32)
    acc_s = tl.zeros((BM, BN), dtype=tl.float32) if ENTROPY else acc_z
    for k0 in range(0, J, BK):
        kmask = (k0 + offs_k) < J
        amask = mask_m[:, None] & kmask[None, :]
        bmask = kmask[:, None] & mask_n[None, :]
        lt = tl.load(l_ptrs, mask=amask, other=float("-inf"))
        a = tl.exp(lt - m[:, None])
        wt = tl.abs(tl.load(w_ptrs, mask=bmask, other=0.0))
        am = a
        et = wt
        elo = wt
        if ENTROPY:
            am = a * tl.load(mu_ptrs, mask=amask, other=0.0)
            et = tl.load(e_ptr + e_off, mask=bmask, other=0.0)
            if LOWP and SPLIT:
                elo = tl.load(elo_ptr + e_off, mask=bmask, other=0.0)
        a_hi = a
        a_lo = a
        am_hi = am
        am_lo = am
        if LOWP:
            a_hi = a.to(wt.dtype)
            a_lo = (a - a_hi.to(tl.float32)).to(wt.dtype)
            am_hi = am.to(wt.dtype)
            am_lo = (am - am_hi.to(tl.float32)).to(wt.dtype)
        acc_z, acc_s = _split_products(acc_z, acc_s, a_hi, a_lo, am_hi, am_lo, wt, et, elo,
                                       ENTROPY, LOWP and SPLIT, UPCAST, PREC)
        if ENTROPY:
            mu_ptrs += BK * s_uj
            e_off += BK * s_ej
        l_ptrs += BK * s_lj
        w_ptrs += BK * s_wj
    o_off = bid * I * K + offs_m[:, None] * K + offs_n[None, :]
    _logsum_store(acc_z, acc_s, m, ol_ptr, omu_ptr, o_off, mask_m[:, None] & mask_n[None, :], ENTROPY)


@triton.jit
def _lowp_split_kernel(l_ptr, mu_ptr, m_ptr, x_ptr, I, J, s_lb, s_li, s_lj, s_ub, s_ui, s_uj, s_xr,
                       ENTROPY: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    """Left operands of the pre-split low-precision GEMM (``_lowp_gemm_kernel``), row
    r = b·I + i, a block of j: a = exp(l − m_r) ∈ [0, 1], hi = a rounded to x's dtype,
    lo = (a − hi) rounded; x_r = [a_hi | a_lo | (aμ)_hi | (aμ)_lo] in blocks of J
    (abs: the first two; without SPLIT: [a | aμ])."""
    r = tl.program_id(0).to(tl.int64)
    b = r // I
    i = r % I
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = o < J
    lt = tl.load(l_ptr + b * s_lb + i * s_li + o * s_lj, mask=msk, other=float("-inf"))
    a = tl.exp(lt - tl.load(m_ptr + r))
    dt = x_ptr.dtype.element_ty
    x_row = x_ptr + r * s_xr
    P: tl.constexpr = 2 if SPLIT else 1
    a_hi = a.to(dt)
    tl.store(x_row + o, a_hi, mask=msk)
    if SPLIT:
        tl.store(x_row + J + o, (a - a_hi.to(tl.float32)).to(dt), mask=msk)
    if ENTROPY:
        am = a * tl.load(mu_ptr + b * s_ub + i * s_ui + o * s_uj, mask=msk, other=0.0)
        am_hi = am.to(dt)
        tl.store(x_row + P * J + o, am_hi, mask=msk)
        if SPLIT:
            tl.store(x_row + (P + 1) * J + o, (am - am_hi.to(tl.float32)).to(dt), mask=msk)


@triton.jit
def _lowp_gemm_kernel(x_ptr, wa_ptr, eh_ptr, el_ptr, m_ptr, ol_ptr, omu_ptr, I, J, K,
                      s_xb, s_xi, s_yb, s_yj, s_yk,
                      ENTROPY: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """The abs / entropy matmul of a low-precision (bf16/fp16) weight on pre-split
    operands: x from ``_lowp_split_kernel``, the cached |W|, E_hi = E and
    E_lo = E − E_hi in the weight dtype (E = −|W| log|W|), fp32 accumulation:
    z = (a_hi + a_lo) @ |W|                                  → ol = log z + m
    s = ((aμ)_hi + (aμ)_lo) @ |W| + (a_hi + a_lo) @ E_hi + a_hi @ E_lo
                                                             → omu = s / z
    (0 where z = 0 or ol = −inf); without SPLIT one product each. The same
    products as ``_logsum_mm_kernel``'s LOWP path, but the loop only loads and
    dots (no exp and no rounding per tile), so the compiler can pipeline it."""
    bid, offs_m, offs_n, offs_k, mask_m, mask_n = _dot_tile(I, K, BM, BN, BK, GROUP_M)
    P: tl.constexpr = 2 if SPLIT else 1
    x_base = x_ptr + bid * s_xb + offs_m[:, None] * s_xi
    y_base = bid * s_yb + offs_n[None, :] * s_yk
    acc_z = tl.zeros((BM, BN), dtype=tl.float32)
    acc_s = tl.zeros((BM, BN), dtype=tl.float32) if ENTROPY else acc_z
    for k0 in range(0, J, BK):
        kk = k0 + offs_k
        km = kk < J
        xm = mask_m[:, None] & km[None, :]
        y_off = y_base + kk[:, None] * s_yj
        ym = km[:, None] & mask_n[None, :]
        x0 = tl.load(x_base + kk[None, :], mask=xm, other=0.0)
        wa = tl.load(wa_ptr + y_off, mask=ym, other=0.0)
        x1 = x0
        u0 = x0
        u1 = x0
        eh = wa
        el = wa
        if SPLIT:
            x1 = tl.load(x_base + (J + kk)[None, :], mask=xm, other=0.0)
        if ENTROPY:
            u0 = tl.load(x_base + (P * J + kk)[None, :], mask=xm, other=0.0)
            eh = tl.load(eh_ptr + y_off, mask=ym, other=0.0)
            if SPLIT:
                u1 = tl.load(x_base + ((P + 1) * J + kk)[None, :], mask=xm, other=0.0)
                el = tl.load(el_ptr + y_off, mask=ym, other=0.0)
        acc_z, acc_s = _split_products(acc_z, acc_s, x0, x1, u0, u1, wa, eh, el, ENTROPY, SPLIT, UPCAST, PREC)
    m = tl.load(m_ptr + bid * I + offs_m, mask=mask_m, other=0.0)
    o_off = bid * I * K + offs_m[:, None] * K + offs_n[None, :]
    _logsum_store(acc_z, acc_s, m, ol_ptr, omu_ptr, o_off, mask_m[:, None] & mask_n[None, :], ENTROPY)


@triton.jit
def _j_range(J, J_PER):
    """The slice [j0, j1) of the contraction index that program_id(2) covers
    (split-J: several programs share one output tile, each writing a partial
    result that the launcher combines with the semiring's ⊕)."""
    j0 = tl.program_id(2) * J_PER
    return j0, min(J, j0 + J_PER)


@triton.jit
def _partial_offset(bid, I, K):
    """Element offset of output tile row 0 of batch ``bid`` in split slice program_id(2)."""
    return (tl.program_id(2).to(tl.int64) * tl.num_programs(1) + bid) * I * K


@triton.jit
def _maxplus_mm_kernel(
        l_ptr, w_ptr, o_ptr,
        I, J, K, J_PER,
        s_lb, s_li, s_lj, s_wb, s_wj, s_wk,
        W_LOG: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr,
        PIPE: tl.constexpr):
    """Max-plus (tropical) product: o[s,b,i,k] = max_{j in slice s} ( l[b,i,j] + lw[b,j,k] ),
    with lw = w when W_LOG (a cached log|W|) else lw = log|w| computed on the fly;
    slice s = program_id(2) covers j in [s·J_PER, (s+1)·J_PER) (one slice: the whole
    product). Rank-1 updates over j; the left operand should be i-contiguous
    (K-major) so that each column load is coalesced. PIPE: load step j + 1
    while step j computes."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = _tile_ids(pid, I, K, BM, BN, GROUP_M)
    j0, j1 = _j_range(J, J_PER)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < I
    mask_n = offs_n < K
    l_ptrs = l_ptr + bid * s_lb + offs_m * s_li + j0 * s_lj
    w_ptrs = w_ptr + bid * s_wb + offs_n * s_wk + j0 * s_wj
    acc = tl.full((BM, BN), float("-inf"), dtype=tl.float32)
    b_other: tl.constexpr = float("-inf") if W_LOG else 0.0
    if PIPE:
        # software pipelining by hand: the loads of step j + 1 are issued before
        # the rank-1 update of step j, so their latency hides behind its max/adds
        # (slices are never empty; the last step re-reads its own row, discarded)
        a_nx = tl.load(l_ptrs, mask=mask_m, other=float("-inf"))
        b_nx = tl.load(w_ptrs, mask=mask_n, other=b_other)
    for j in range(j0, j1):
        if PIPE:
            a = a_nx
            b = b_nx
            more = j + 1 < j1
            l_ptrs += tl.where(more, s_lj, 0)
            w_ptrs += tl.where(more, s_wj, 0)
            a_nx = tl.load(l_ptrs, mask=mask_m, other=float("-inf"))
            b_nx = tl.load(w_ptrs, mask=mask_n, other=b_other)
        else:
            a = tl.load(l_ptrs, mask=mask_m, other=float("-inf"))
            b = tl.load(w_ptrs, mask=mask_n, other=b_other)
            l_ptrs += s_lj
            w_ptrs += s_wj
        if not W_LOG:
            b = tl.log(tl.abs(b.to(tl.float32)))
        acc = tl.maximum(acc, a[:, None] + b[None, :])
    o_off = _partial_offset(bid, I, K) + offs_m[:, None] * K + offs_n[None, :]
    tl.store(o_ptr + o_off, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _half_rows(pid_m, h: tl.constexpr, BM: tl.constexpr, RM: tl.constexpr):
    """Rows of the tile's half ``h`` as [RM, 1, TM, 1]: pid_m·BM + h·BM/2 + tm·RM + rm."""
    TM: tl.constexpr = BM // 2 // RM
    rm = tl.arange(0, RM)
    tm = tl.arange(0, TM)
    return pid_m * BM + h * (BM // 2) + rm[:, None, None, None] + tm[None, None, :, None] * RM


@triton.jit
def _half_cols(pid_n, h: tl.constexpr, BN: tl.constexpr, RN: tl.constexpr):
    """Columns of the tile's half ``h`` as [1, RN, 1, TN]: pid_n·BN + h·BN/2 + tn·RN + rn."""
    TN: tl.constexpr = BN // 2 // RN
    rn = tl.arange(0, RN)
    tn = tl.arange(0, TN)
    return pid_n * BN + h * (BN // 2) + rn[None, :, None, None] + tn[None, None, None, :] * RN


@triton.jit
def _blocked_maxplus_loop(la0, la1, wb0, wb1, ma0, ma1, mb0, mb1, j0, j1, s_lj, s_wj,
                          RM: tl.constexpr, RN: tl.constexpr, TM: tl.constexpr, TN: tl.constexpr,
                          MASKED: tl.constexpr):
    """acc_hg = max_j a_h[j] + b_g[j] over [j0, j1) for the four quarter tiles
    (h, g: halves of the rows and of the columns). MASKED: rows/columns past the
    matrix load -inf (edge tiles); interior tiles load without masks."""
    acc00 = tl.full((RM, RN, TM, TN), float("-inf"), dtype=tl.float32)
    acc01 = acc00
    acc10 = acc00
    acc11 = acc00
    for j in range(j0, j1):
        d = j - j0             # a scalar step offset: the per-element offsets stay immediates
        if MASKED:
            a0 = tl.load(la0 + d * s_lj, mask=ma0, other=float("-inf"))
            a1 = tl.load(la1 + d * s_lj, mask=ma1, other=float("-inf"))
            b0 = tl.load(wb0 + d * s_wj, mask=mb0, other=float("-inf"))
            b1 = tl.load(wb1 + d * s_wj, mask=mb1, other=float("-inf"))
        else:
            a0 = tl.load(la0 + d * s_lj)
            a1 = tl.load(la1 + d * s_lj)
            b0 = tl.load(wb0 + d * s_wj)
            b1 = tl.load(wb1 + d * s_wj)
        acc00 = tl.maximum(acc00, a0 + b0)
        acc01 = tl.maximum(acc01, a0 + b1)
        acc10 = tl.maximum(acc10, a1 + b0)
        acc11 = tl.maximum(acc11, a1 + b1)
    return acc00, acc01, acc10, acc11


@triton.jit
def _maxplus_blocked_kernel(
        l_ptr, w_ptr, o_ptr,
        I, J, K, J_PER,
        s_lb, s_li, s_lj, s_wb, s_wj, s_wk,
        BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, RM: tl.constexpr, RN: tl.constexpr):
    """The max-plus product of ``_maxplus_mm_kernel`` with a cached log|W|
    (o[s,b,i,k] = max_{j in slice s} l[b,i,j] + lw[b,j,k]; same grid, split-J
    and -inf handling), register-blocked. The BM×BN tile is four quarters,
    each a 4-D accumulator [RM, RN, TM, TN] (TM = BM/2/RM, TN = BN/2/RN, TM·TN
    = the CTA's threads) whose default layout gives every thread an RM×RN block
    (lanes on TN, warps on TM): a step loads RM + RN values per quarter
    straight into the layout they are used in (each vector has fewer elements
    than the CTA has threads), with no shared-memory broadcast or barrier.
    SASS (sm_90, 128x128, RM=8, RN=4, 4 warps): 272 instructions per 128
    MACs in the interior loop against 313 for the rank-1 kernel, 168
    registers, no spills; not timed yet, so the autotuner times it against
    the rank-1 kernel."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = _tile_ids(pid, I, K, BM, BN, GROUP_M)
    j0, j1 = _j_range(J, J_PER)
    TM: tl.constexpr = BM // 2 // RM
    TN: tl.constexpr = BN // 2 // RN
    r0 = _half_rows(pid_m, 0, BM, RM)
    r1 = _half_rows(pid_m, 1, BM, RM)
    c0 = _half_cols(pid_n, 0, BN, RN)
    c1 = _half_cols(pid_n, 1, BN, RN)
    l_base = l_ptr + bid * s_lb + j0 * s_lj
    w_base = w_ptr + bid * s_wb + j0 * s_wj
    la0 = l_base + r0 * s_li
    la1 = l_base + r1 * s_li
    wb0 = w_base + c0 * s_wk
    wb1 = w_base + c1 * s_wk
    interior = ((pid_m + 1) * BM <= I) & ((pid_n + 1) * BN <= K)
    if interior:
        acc00, acc01, acc10, acc11 = _blocked_maxplus_loop(la0, la1, wb0, wb1, r0 < I, r1 < I, c0 < K, c1 < K,
                                                           j0, j1, s_lj, s_wj, RM, RN, TM, TN, False)
    else:
        acc00, acc01, acc10, acc11 = _blocked_maxplus_loop(la0, la1, wb0, wb1, r0 < I, r1 < I, c0 < K, c1 < K,
                                                           j0, j1, s_lj, s_wj, RM, RN, TM, TN, True)
    base = o_ptr + _partial_offset(bid, I, K)
    tl.store(base + r0 * K + c0, acc00, mask=(r0 < I) & (c0 < K))
    tl.store(base + r0 * K + c1, acc01, mask=(r0 < I) & (c1 < K))
    tl.store(base + r1 * K + c0, acc10, mask=(r1 < I) & (c0 < K))
    tl.store(base + r1 * K + c1, acc11, mask=(r1 < I) & (c1 < K))


@triton.jit
def _signed_max_mm_kernel(
        p_ptr, n_ptr, w_ptr, op_ptr, on_ptr,
        I, J, K, J_PER,
        s_pb, s_pi, s_pj, s_nb, s_ni, s_nj, s_wb, s_wj, s_wk,
        BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr, PIPE: tl.constexpr):
    """Signed extreme products: op[s,b,i,k] = max_j max(w·p, w·n), on[s,b,i,k] =
    min_j min(w·p, w·n) over j in slice s (as in the max-plus kernel, PIPE too), edges
    w[b,j,k] ≠ 0 and live values p[b,i,j] ≠ -inf (p ≥ n, so these pick w·M+ / w·M-
    by the sign of w). Excluded terms are turned into NaN, which
    tl.maximum/tl.minimum (maxnum/minnum: NaN-ignoring) drop; the accumulators
    start at (-inf, +inf), so a NaN never reaches the output."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = _tile_ids(pid, I, K, BM, BN, GROUP_M)
    j0, j1 = _j_range(J, J_PER)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < I
    mask_n = offs_n < K
    p_ptrs = p_ptr + bid * s_pb + offs_m * s_pi + j0 * s_pj
    n_ptrs = n_ptr + bid * s_nb + offs_m * s_ni + j0 * s_nj
    w_ptrs = w_ptr + bid * s_wb + offs_n * s_wk + j0 * s_wj
    acc_p = tl.full((BM, BN), float("-inf"), dtype=tl.float32)
    acc_n = tl.full((BM, BN), float("inf"), dtype=tl.float32)
    if PIPE:
        p_nx = tl.load(p_ptrs, mask=mask_m, other=float("-inf"))
        n_nx = tl.load(n_ptrs, mask=mask_m, other=float("inf"))
        w_nx = tl.load(w_ptrs, mask=mask_n, other=0.0)
    for j in range(j0, j1):
        if PIPE:
            p = p_nx
            n = n_nx
            w = w_nx.to(tl.float32)
            more = j + 1 < j1
            p_ptrs += tl.where(more, s_pj, 0)
            n_ptrs += tl.where(more, s_nj, 0)
            w_ptrs += tl.where(more, s_wj, 0)
            p_nx = tl.load(p_ptrs, mask=mask_m, other=float("-inf"))
            n_nx = tl.load(n_ptrs, mask=mask_m, other=float("inf"))
            w_nx = tl.load(w_ptrs, mask=mask_n, other=0.0)
        else:
            p = tl.load(p_ptrs, mask=mask_m, other=float("-inf"))
            n = tl.load(n_ptrs, mask=mask_m, other=float("inf"))
            w = tl.load(w_ptrs, mask=mask_n, other=0.0).to(tl.float32)
            p_ptrs += s_pj
            n_ptrs += s_nj
            w_ptrs += s_wj
        live = p != float("-inf")
        p = tl.where(live, p, float("nan"))
        n = tl.where(live, n, float("nan"))
        w = tl.where(w != 0.0, w, float("nan"))
        x = p[:, None] * w[None, :]
        y = n[:, None] * w[None, :]
        acc_p = tl.maximum(acc_p, tl.maximum(x, y))
        acc_n = tl.minimum(acc_n, tl.minimum(x, y))
    o_off = _partial_offset(bid, I, K) + offs_m[:, None] * K + offs_n[None, :]
    omask = mask_m[:, None] & mask_n[None, :]
    tl.store(op_ptr + o_off, acc_p, mask=omask)
    tl.store(on_ptr + o_off, acc_n, mask=omask)


# ---------------------------------------------------------------------------------------------
# launch configurations
# ---------------------------------------------------------------------------------------------
def _cfg(BM, BN, BK=None, warps=4, stages=3):
    c = {"BM": BM, "BN": BN, "num_warps": warps, "num_stages": stages}
    if BK is not None:
        c["BK"] = BK
    return c


def _dot_configs(entropy: bool, lowp: bool, I: int, gpu: bool = False, split: bool = False,
                 prec: str = "tf32x3"):
    """Candidates, best guess first (the first two are in ``aot_specs``). ptxas
    (sm_90, 16-divisible shapes, triton 3.6 and 3.9): no spills. fp32 weights
    with "tf32x3" (tensor cores): abs 128x128x32/8 warps 230 registers, entropy
    128x64x32/8 warps 255; with "ieee" (FMA code): the second entropy candidate
    spills 72 bytes."""
    if interpreting() and not gpu:
        return [_cfg(16, 16, 16, 1, 1)]
    if entropy and lowp and split:
        cs = [_cfg(128, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 3)]
    elif entropy and lowp:
        cs = [_cfg(64, 128, 32, 8, 3), _cfg(64, 64, 64, 4, 3)]
    elif entropy:
        cs = ([_cfg(128, 64, 32, 8, 3), _cfg(128, 64, 16, 8, 3), _cfg(64, 64, 16, 4, 3)] if prec == "tf32x3" else
              [_cfg(64, 128, 16, 8, 2), _cfg(64, 128, 16, 8, 3)])
    elif lowp:
        cs = [_cfg(128, 128, 64, 8, 3), _cfg(128, 128, 32, 8, 3), _cfg(64, 128, 64, 4, 3)]
    else:
        cs = ([_cfg(128, 128, 32, 8, 3), _cfg(128, 128, 16, 8, 3), _cfg(128, 64, 32, 4, 3)] if prec == "tf32x3" else
              [_cfg(128, 128, 32, 8, 3), _cfg(128, 128, 16, 8, 3), _cfg(64, 128, 32, 4, 3)])
    if I <= 32:
        bk = 32 if lowp else 16
        cs = [_cfg(32, 128, bk, 4, 3), _cfg(16, 128, bk, 4, 3)] + cs[:1]
    if lowp:
        cs = cs + _pre_configs(entropy, I)
    return cs


def _pre_configs(entropy: bool, I: int):
    """Candidates of the pre-split low-precision GEMM (``PRE``: a prologue writes
    the rounded operands, ``_lowp_gemm_kernel`` only loads and dots, pipelined
    over ``num_stages``). Shared memory per stage (bf16): abs 128x128x64 48 KB,
    entropy 128x64x32 44 KB (four left tiles, three weight tiles)."""
    if I <= 32:
        cs = [_cfg(32, 128, 64, 4, 3)]
    elif entropy:
        cs = [_cfg(128, 64, 32, 8, 3), _cfg(64, 64, 64, 4, 3)]
    else:
        cs = [_cfg(128, 128, 64, 8, 4), _cfg(128, 64, 64, 4, 4)]
    return [dict(c, PRE=True) for c in cs]


def _simt_configs(two_acc: bool, I: int, gpu: bool = False):
    """Rank-1-update kernels, every one with PIPE (the loads of step j + 1
    issued before step j computes). ptxas (sm_90): maxplus 128x128/4 warps 165
    regs, no spill; signed max 128x64/4 warps (8 bytes spill) and 256x64/8
    warps 255 regs; 128x128/4 warps spills heavily (two accumulators).
    Timed on an H100 (fifth session, BERT and SmolLM2 linears): PIPE won or
    tied everywhere (1.0-1.4x); signed max 128x64/4w beat 256x64/8w at every
    unsplit shape; 64x128 tiles were 2x (maxabs) to 300x (signed max, spills)
    slower and are no longer offered."""
    if interpreting() and not gpu:
        return [dict(_cfg(16, 16, None, 1, 1), PIPE=True)]
    if I <= 32:
        bm = max(16, 1 << (max(1, I) - 1).bit_length())
        cs = [_cfg(bm, 128, None, 4, 3), _cfg(bm, 256, None, 8, 3)]
    elif two_acc:
        cs = [_cfg(128, 64, None, 4, 1), _cfg(256, 64, None, 8, 1)]
    else:
        cs = [_cfg(128, 128, None, 4, 3), _cfg(256, 64, None, 4, 3)]
    return [dict(c, PIPE=True) for c in cs]


def _blocked_configs(I: int, gpu: bool = False):
    """Candidates of the register-blocked max-plus kernel (cached log|W| only):
    offered on the GPU next to the rank-1 kernel's (the autotuner keeps the
    faster); under the interpreter only where a test asks (``gpu``)."""
    if interpreting() and not gpu:
        return []
    if I <= 32:
        return []
    return [dict(_cfg(128, 128, None, 4, 1), BLOCKED=True, RM=8, RN=4)]


GROUP_M = 8

#: split-J candidates: at most this many programs per SM in all, at least this
#: many rank-1 steps per slice, and this many bytes of partial results
SPLIT_MAX_PROGRAMS_PER_SM = 6
SPLIT_MIN_STEPS = 64
SPLIT_MAX_BYTES = 256 * 2**20


def _with_splits(cfgs, B: int, I: int, J: int, K: int, n_acc: int, device, bases: int = 2):
    """Add split-J variants (``SPLIT_J`` = number of j slices, combined with ⊕
    afterwards) of the first ``bases`` candidates where a grid is too small to
    fill the GPU: model shapes such as 4096 rows x 768 outputs give 192 tiles of
    128x128 for 132 SMs, and a language-model head's few live rows give a
    handful of programs with tens of thousands of steps each. The autotuner
    keeps a split only where it measures faster (H100, fifth session: 1.1-1.5x
    on the models' linears, up to 93x on an LM head's live rows)."""
    if not cfgs or device.type != "cuda" or interpreting():
        return cfgs
    n_sm = sm_count(device.index if device.index is not None else 0)
    extra = []
    for base in cfgs[:bases]:
        tiles = B * triton.cdiv(I, base["BM"]) * triton.cdiv(K, base["BN"])
        s = 2
        while (tiles * s <= SPLIT_MAX_PROGRAMS_PER_SM * n_sm and J // s >= SPLIT_MIN_STEPS
               and n_acc * s * B * I * K * 4 <= SPLIT_MAX_BYTES):
            extra.append(dict(base, SPLIT_J=s))
            s *= 2
    return cfgs + extra


def _split_of(cfg: dict, J: int, cells: int = 0) -> tuple:
    """(number of j slices, slice length) of a launch config; with ``cells``
    (the fp32 partial results one slice writes, n_acc·B·I·K) at most as many
    slices as fit ``SPLIT_MAX_BYTES``: a split chosen for one shape bucket is
    reused for every batch size (the key holds only B > 1), and a batch of 512
    would otherwise allocate gigabytes of partials."""
    s = max(1, min(int(cfg.get("SPLIT_J", 1)), J))
    if cells and s > 1:
        s = max(1, min(s, SPLIT_MAX_BYTES // (4 * cells)))
    per = triton.cdiv(J, s)
    return triton.cdiv(J, per), per


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def _batched(v, w):
    """Views of the components as [B, I, J] and of w as [B, J, K] (2-D w: batch
    stride 0). None when the pattern is not supported."""
    import torch

    c0 = v[0]
    if c0.dtype != torch.float32 or c0.dim() < 2 or any(c.shape != c0.shape or c.dtype != c0.dtype
                                                         for c in v):
        return None
    if w.device != c0.device or w.dtype not in (torch.float32, torch.float64, torch.bfloat16,
                                                torch.float16):
        return None
    I, J = c0.shape[-2:]
    if w.dim() < 2 or w.shape[-2] != J:
        return None
    K = w.shape[-1]
    lead = tuple(c0.shape[:-2])
    if w.dim() == 2:
        try:
            comps = [c.view(1, -1, J) for c in v]
        except RuntimeError:
            comps = [c.reshape(-1, I, J) for c in v]
        w3 = w.unsqueeze(0)
        wstride0 = True
    elif tuple(w.shape[:-2]) == lead:
        comps = [c.reshape(-1, I, J) for c in v]
        w3 = w.reshape(-1, J, K)
        wstride0 = False
    else:
        return None
    B, Ib = comps[0].shape[0], comps[0].shape[1]
    if B == 0 or Ib == 0 or J == 0 or K == 0 or B > 65535:
        return None
    return comps, w3, wstride0, B, Ib, J, K, lead, I


def _wstrides(w3, wstride0):
    return (0 if wstride0 else w3.stride(0)), w3.stride(1), w3.stride(2)


def _finish(outs, lead, I, K):
    return tuple(o.reshape(*lead, I, K) for o in outs)


def _neg_xlogx_f32(w):
    import torch
    a = w.float().abs()
    return torch.where(a > 0, -a * torch.log(torch.where(a > 0, a, torch.ones_like(a))), torch.zeros_like(a))


def _neg_xlogx(w):
    """E = -|w| log|w| (0 where w = 0), in fp32 math, stored in the contraction dtype."""
    import torch
    return _neg_xlogx_f32(w).to(w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.float32)


def _neg_xlogx_lo(w):
    """The low part E - E_hi of E in the weight's low-precision dtype (SPLIT)."""
    e = _neg_xlogx_f32(w)
    return (e - e.to(w.dtype).float()).to(w.dtype)


def lowp_split() -> bool:
    """bf16/fp16 weights: split the fp32 a and a·μ tiles (and E) into hi + lo parts
    in the weight dtype, so the tensor-core contraction keeps fp32-level accuracy
    (~1e-5 vs float64, instead of ~3e-3 with one rounded product) for 2x (abs) /
    2x (entropy) the tensor-core work. On by default; SEMITRITON_LOWP_SPLIT=0
    gives the single low-precision product."""
    return env("SEMITRITON_LOWP_SPLIT", "1") not in ("", "0")


def fp32_dot_precision() -> str:
    """input_precision of the abs/entropy GEMM with fp32 weights: "tf32x3" (the
    default: three TF32 tensor-core products per tile, a = a_hi + a_lo and
    w = w_hi + w_lo with the lo·lo term dropped, ~1e-6 relative error, far
    below the 1e-4 bar; plain TF32 is never used) or "ieee" (fp32 FMA code,
    SEMITRITON_FP32_DOT=ieee). The interpreter computes both exactly."""
    p = env("SEMITRITON_FP32_DOT", "tf32x3").strip().lower()
    if p not in ("tf32x3", "ieee"):
        raise ValueError(f"SEMITRITON_FP32_DOT={p!r}: use tf32x3 or ieee")
    return p


def _log_abs(w):
    import torch
    return torch.log(torch.abs(w.float())).contiguous()


def _logsum_matmul(v, w, entropy: bool):
    import torch

    prep = _batched(v, w)
    if prep is None:
        return NotImplemented
    comps, w3, wstride0, B, I, J, K, lead, I_out = prep
    if w3.dtype == torch.float16:
        # the hi/lo split of a = exp(l − rowmax) in fp16 (5-bit exponent) quantises terms
        # ~10 nats below the row max and drops those ~17 below: the cuBLAS path (fp32 copy
        # of the weight) or the torch reference serves fp16 weights
        return NotImplemented
    if w3.dtype == torch.float64:
        w3 = w3.float()
    lowp = w3.dtype == torch.bfloat16
    l3 = comps[0]
    mu3 = comps[1] if entropy else l3
    split = lowp and lowp_split()
    e3 = elo3 = w3
    if entropy:
        if wstride0:
            e3 = _weight_cache().transform(w, "neg_xlogx", _neg_xlogx).unsqueeze(0)
            if split:
                elo3 = _weight_cache().transform(w, "neg_xlogx_lo", _neg_xlogx_lo).unsqueeze(0)
        else:
            e3 = _neg_xlogx(w3)
            if split:
                elo3 = _neg_xlogx_lo(w3)
        if split:
            assert elo3.stride() == e3.stride()
    if not fits_int32(l3, mu3, w3, e3, per_batch=True) or I * K > 2**31 - 1:
        return NotImplemented
    m = finite_row_max(l3)                # the row shift
    out_l = torch.empty((B, I, K), dtype=torch.float32, device=l3.device)
    out_mu = torch.empty_like(out_l) if entropy else out_l
    s_wb, s_wj, s_wk = _wstrides(w3, wstride0)
    s_eb, s_ej, s_ek = _wstrides(e3, wstride0)
    upcast = lowp and interpreting()
    prec = "tf32" if lowp and not upcast else ("ieee" if lowp else fp32_dot_precision())

    def launch(cfg):
        meta = dict(cfg)
        if meta.pop("PRE", False):
            return launch_pre(meta)
        grid = (triton.cdiv(I, meta["BM"]) * triton.cdiv(K, meta["BN"]), B)
        _logsum_mm_kernel[grid](
            l3, mu3, m, w3, e3, elo3, out_l, out_mu, I, J, K,
            l3.stride(0), l3.stride(1), l3.stride(2), mu3.stride(0), mu3.stride(1), mu3.stride(2),
            s_wb, s_wj, s_wk, s_eb, s_ej, s_ek,
            ENTROPY=entropy, LOWP=lowp, SPLIT=split, UPCAST=upcast, PREC=prec, GROUP_M=GROUP_M, **meta)

    def launch_pre(meta):
        wa = _weight_cache().transform(w, "abs", torch.abs).unsqueeze(0) if wstride0 else w3.abs()   # as logspace_gemm
        ys = [wa, e3, elo3 if split else e3] if entropy else [wa, wa, wa]
        if any(y.stride()[1:] != wa.stride()[1:] for y in ys):
            ys = [y.contiguous() for y in ys]
        s_yb, s_yj, s_yk = _wstrides(ys[0], wstride0)
        parts = (2 if split else 1) * (2 if entropy else 1)
        x = torch.empty((B * I, parts * J), dtype=w3.dtype, device=l3.device)
        blk = min(1024, max(16, triton.next_power_of_2(J)))
        _lowp_split_kernel[(B * I, triton.cdiv(J, blk))](
            l3, mu3, m, x, I, J, l3.stride(0), l3.stride(1), l3.stride(2),
            mu3.stride(0), mu3.stride(1), mu3.stride(2), x.stride(0),
            ENTROPY=entropy, SPLIT=split, BLOCK=blk)
        grid = (triton.cdiv(I, meta["BM"]) * triton.cdiv(K, meta["BN"]), B)
        _lowp_gemm_kernel[grid](x, *ys, m, out_l, out_mu, I, J, K, I * x.stride(0), x.stride(0),
                                s_yb, s_yj, s_yk, ENTROPY=entropy, SPLIT=split, UPCAST=upcast, PREC=prec,
                                GROUP_M=GROUP_M, **meta)

    pre_fits = I * 4 * J <= 2**31 - 1           # the pre-split operands' offsets must fit int32
    key = ("logsum_mm", entropy, split, prec, str(w3.dtype), bucket(I), bucket(J), bucket(K), B > 1,
           pre_fits, str(l3.device))          # (shapes of one bucket may differ in pre_fits)
    cfgs = _dot_configs(entropy, lowp, I, split=split, prec=prec)
    if not pre_fits:
        cfgs = [c for c in cfgs if not c.get("PRE")]
    launch(choose(key, cfgs, launch))
    outs = (out_l, out_mu) if entropy else (out_l,)
    return _finish(outs, lead, I_out, K)


def _k_major(c):
    """The same values with the i index contiguous (coalesced column loads)."""
    if c.shape[1] > 1 and c.stride(1) != 1:
        c = c.transpose(1, 2).contiguous().transpose(1, 2)
    return c


def _n_major(w3):
    if w3.shape[2] > 1 and w3.stride(2) != 1:
        w3 = w3.contiguous()
    return w3


@register("matmul", "abs")
def abs_matmul(v, w):
    """abs: out = log( exp(l - rowmax) @ |W| ) + rowmax."""
    return _logsum_matmul(v, w, entropy=False)


@register("matmul", "entropy")
def entropy_matmul(v, w):
    """entropy: z = a@|W|, s = (a·μ)@|W| - a@(|W|log|W|), a = exp(l - rowmax);
    (log z + rowmax, s/z)."""
    return _logsum_matmul(v, w, entropy=True)


@register("matmul", "maxabs")
def maxabs_matmul(v, w):
    """maxabs: out = max_j l[i,j] + log|W[j,k]| (log|W| cached for 2-D weights)."""
    import torch

    prep = _batched(v, w)
    if prep is None:
        return NotImplemented
    comps, w3, wstride0, B, I, J, K, lead, I_out = prep
    l3 = _k_major(comps[0])
    if wstride0:
        lw3 = _weight_cache().transform(w, "log_abs", _log_abs).unsqueeze(0)
        w_log = True
    else:
        lw3 = _n_major(w3)
        w_log = False
    if not fits_int32(l3, lw3, per_batch=True) or I * K > 2**31 - 1:
        return NotImplemented
    s_wb, s_wj, s_wk = _wstrides(lw3, wstride0)

    def launch(cfg):
        meta = dict(cfg)
        S, per = _split_of(meta, J, B * I * K)
        meta.pop("SPLIT_J", None)
        out = torch.empty((S, B, I, K), dtype=torch.float32, device=l3.device)
        grid = (triton.cdiv(I, meta["BM"]) * triton.cdiv(K, meta["BN"]), B, S)
        args = (l3, lw3, out, I, J, K, per, l3.stride(0), l3.stride(1), l3.stride(2), s_wb, s_wj, s_wk)
        if meta.pop("BLOCKED", False):
            _maxplus_blocked_kernel[grid](*args, GROUP_M=GROUP_M, **meta)
        else:
            _maxplus_mm_kernel[grid](*args, W_LOG=w_log, GROUP_M=GROUP_M, **meta)
        return out[0] if S == 1 else torch.amax(out, 0)

    key = ("maxplus_mm", w_log, str(lw3.dtype), bucket(I), bucket(J), bucket(K), B > 1, str(l3.device))
    cfgs = _with_splits(_simt_configs(False, I), B, I, J, K, 1, l3.device, bases=1 if I <= 32 else 2)
    if w_log:
        cfgs += _with_splits(_blocked_configs(I), B, I, J, K, 1, l3.device, bases=1)
    out = launch(choose(key, cfgs, launch))
    return _finish((out,), lead, I_out, K)


@register("matmul", "max")
def max_matmul(v, w):
    """max: (max_j max(w·M+, w·M-), min_j min(w·M+, w·M-)) over live edges and values."""
    import torch

    prep = _batched(v, w)
    if prep is None:
        return NotImplemented
    comps, w3, wstride0, B, I, J, K, lead, I_out = prep
    p3, n3 = _k_major(comps[0]), _k_major(comps[1])
    if w3.dtype == torch.float64:
        w3 = w3.float()
    w3 = _n_major(w3)
    if not fits_int32(p3, n3, w3, per_batch=True) or I * K > 2**31 - 1:
        return NotImplemented
    s_wb, s_wj, s_wk = _wstrides(w3, wstride0)

    def launch(cfg):
        meta = dict(cfg)
        S, per = _split_of(meta, J, 2 * B * I * K)
        meta.pop("SPLIT_J", None)
        out_p = torch.empty((S, B, I, K), dtype=torch.float32, device=p3.device)
        out_n = torch.empty_like(out_p)
        grid = (triton.cdiv(I, meta["BM"]) * triton.cdiv(K, meta["BN"]), B, S)
        _signed_max_mm_kernel[grid](p3, n3, w3, out_p, out_n, I, J, K, per,
                                    p3.stride(0), p3.stride(1), p3.stride(2),
                                    n3.stride(0), n3.stride(1), n3.stride(2), s_wb, s_wj, s_wk,
                                    GROUP_M=GROUP_M, **meta)
        if S == 1:
            return out_p[0], out_n[0]
        return torch.amax(out_p, 0), torch.amin(out_n, 0)

    key = ("signed_max_mm", str(w3.dtype), bucket(I), bucket(J), bucket(K), B > 1, str(p3.device))
    cfgs = _with_splits(_simt_configs(True, I), B, I, J, K, 2, p3.device, bases=1 if I <= 32 else 2)
    out_p, out_n = launch(choose(key, cfgs, launch))
    return _finish((out_p, out_n), lead, I_out, K)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specs (no torch needed)
# ---------------------------------------------------------------------------------------------
def aot_specs():
    """(kernel, signature, constexprs, options) for representative Hopper builds:
    the first launch candidates, with the unit strides and 16-divisibility that
    Triton's runtime specialisation gives transformer shapes."""
    specs = []
    ptrs = ("l_ptr", "mu_ptr", "m_ptr", "ol_ptr", "omu_ptr")
    variants = [(e, "fp32", False) for e in (False, True)]
    variants += [(e, "bf16", sp) for e in (False, True) for sp in (False, True)]
    variants += [(e, "fp32-ieee", False) for e in (False, True)]
    for entropy, wdt, split in variants:
        lowp = not wdt.startswith("fp32")
        prec = "tf32" if lowp else ("ieee" if wdt == "fp32-ieee" else "tf32x3")
        wdt = wdt.split("-")[0]
        cfgs = _dot_configs(entropy, lowp, 4096, gpu=True, split=split, prec=prec)[:2]
        cfgs += _dot_configs(entropy, lowp, 8, gpu=True, split=split, prec=prec)[:1]        # few live rows
        for c in cfgs:
            for unit in (("s_lj", "s_uj"), ("s_li", "s_ui")):     # row-major v / transposed view
                const = dict(ENTROPY=entropy, LOWP=lowp, SPLIT=split, UPCAST=False,
                             PREC=prec, GROUP_M=GROUP_M,
                             BM=c["BM"], BN=c["BN"], BK=c["BK"], s_wk=1, s_ek=1)
                const.update({u: 1 for u in unit})
                types = {p: "*fp32" for p in ptrs}
                types.update({"w_ptr": "*" + wdt, "e_ptr": "*" + wdt, "elo_ptr": "*" + wdt})
                specs.append(aot_entry(_logsum_mm_kernel, types, const, c["num_warps"], c["num_stages"]))
    for entropy in (False, True):                 # the pre-split low-precision GEMM and its prologue
        for split in (True, False):
            for c in _pre_configs(entropy, 4096) + _pre_configs(entropy, 8):
                const = dict(ENTROPY=entropy, SPLIT=split, UPCAST=False, PREC="tf32", GROUP_M=GROUP_M,
                             BM=c["BM"], BN=c["BN"], BK=c["BK"], s_yk=1)
                types = {p: "*fp32" for p in ("m_ptr", "ol_ptr", "omu_ptr")}
                types.update({p: "*bf16" for p in ("x_ptr", "wa_ptr", "eh_ptr", "el_ptr")})
                specs.append(aot_entry(_lowp_gemm_kernel, types, const, c["num_warps"], c["num_stages"]))
            types = {"l_ptr": "*fp32", "mu_ptr": "*fp32", "m_ptr": "*fp32", "x_ptr": "*bf16"}
            specs.append(aot_entry(_lowp_split_kernel, types, dict(ENTROPY=entropy, SPLIT=split, BLOCK=1024,
                                                                   s_lj=1, s_uj=1), 4, 1))
    for w_log, wdt in ((True, "fp32"), (False, "fp32"), (False, "bf16")):
        cs = _simt_configs(False, 4096, gpu=True)
        for c in cs + [dict(cs[0], PIPE=False)] + _simt_configs(False, 8, gpu=True)[:1]:
            const = dict(W_LOG=w_log, BM=c["BM"], BN=c["BN"], GROUP_M=GROUP_M, PIPE=c["PIPE"], s_li=1, s_wk=1)
            types = {"l_ptr": "*fp32", "w_ptr": "*" + wdt, "o_ptr": "*fp32"}
            specs.append(aot_entry(_maxplus_mm_kernel, types, const, c["num_warps"], c["num_stages"]))
    for c in _blocked_configs(4096, gpu=True):
        const = dict(BM=c["BM"], BN=c["BN"], GROUP_M=GROUP_M, RM=c["RM"], RN=c["RN"], s_li=1, s_wk=1)
        types = {"l_ptr": "*fp32", "w_ptr": "*fp32", "o_ptr": "*fp32"}
        specs.append(aot_entry(_maxplus_blocked_kernel, types, const, c["num_warps"], c["num_stages"]))
    for wdt in ("fp32", "bf16"):
        cs = _simt_configs(True, 4096, gpu=True)
        for c in cs + [dict(cs[0], PIPE=False)] + _simt_configs(True, 8, gpu=True)[:1]:
            const = dict(BM=c["BM"], BN=c["BN"], GROUP_M=GROUP_M, PIPE=c["PIPE"], s_pi=1, s_ni=1, s_wk=1)
            types = {"p_ptr": "*fp32", "n_ptr": "*fp32", "w_ptr": "*" + wdt, "op_ptr": "*fp32",
                     "on_ptr": "*fp32"}
            specs.append(aot_entry(_signed_max_mm_kernel, types, const, c["num_warps"], c["num_stages"]))
    return specs
