"""The abs and entropy matmuls as exp-shift + cuBLAS + log, with the
elementwise parts fused into two Triton launches (op ``"matmul_cublas"``,
``fn(v, w)``, same contract as the semirings' ``matmul``; fp32 values and
fp32 or fp16 2-D weights, an fp16 one contracted as its cached fp32 copy).

The torch reference of these matmuls (what the engine uses on CUDA for fp32
weights, because cuBLAS fp32 beat the fused Triton GEMM) is

    m_r = finite max_j l_rj,  a_rj = exp(l_rj − m_r)
    abs:      out_rk = log Σ_j a_rj |w_jk| + m_r
    entropy:  z_rk = Σ_j a_rj |w_jk|,  s_rk = Σ_j a_rj μ_rj |w_jk| − Σ_j a_rj |w_jk| log|w_jk|
              out = (log z + m, s / z)

spelled as 7 (abs) and ~18 (entropy) torch launches. Here: one prologue
kernel writes a (and a·μ beside it, so that s is one GEMM against the cached
stack [|W|; −|W| log|W|]), cuBLAS does the products, one epilogue kernel
writes the log-space result: 3 launches for abs, 4 for entropy.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import aot_entry, next_pow2
from .matmul import _neg_xlogx_f32
from .registry import register

BLOCK_ROW = 1024
BLOCK_COL = 1024


@triton.jit
def _shift_exp_kernel(l_ptr, mu_ptr, out_ptr, m_ptr, J, s_l, s_mu, s_out,
                      HAS_MU: tl.constexpr, BLOCK: tl.constexpr):
    """Row r: m_r = finite max_j l_rj; a = exp(l − m_r) into out[r, :J], or, with
    μ, a·μ into out[r, :J] and a into out[r, J:2J]."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mx = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for j0 in range(0, J, BLOCK):
        o = j0 + offs
        mx = tl.maximum(mx, tl.load(l_ptr + row * s_l + o, mask=o < J, other=float("-inf")))
    m = tl.max(mx, 0)
    m = tl.where(tl.abs(m) < float("inf"), m, 0.0)
    tl.store(m_ptr + row, m)
    for j0 in range(0, J, BLOCK):
        o = j0 + offs
        msk = o < J
        a = tl.exp(tl.load(l_ptr + row * s_l + o, mask=msk, other=float("-inf")) - m)
        if HAS_MU:
            mu = tl.load(mu_ptr + row * s_mu + o, mask=msk, other=0.0)
            tl.store(out_ptr + row * s_out + o, a * mu, mask=msk)
            tl.store(out_ptr + row * s_out + J + o, a, mask=msk)
        else:
            tl.store(out_ptr + row * s_out + o, a, mask=msk)


@triton.jit
def _log_epilogue_kernel(z_ptr, s_ptr, m_ptr, ol_ptr, omu_ptr, K, s_z, s_s, s_o,
                         HAS_S: tl.constexpr, BLOCK: tl.constexpr):
    """out_l = log z + m_r; with s: out_μ = s / z (0 where z = 0 or out_l = -inf)."""
    row = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = o < K
    z = tl.load(z_ptr + row * s_z + o, mask=msk, other=1.0)
    lz = tl.log(z) + tl.load(m_ptr + row)
    tl.store(ol_ptr + row * s_o + o, lz, mask=msk)
    if HAS_S:
        s = tl.load(s_ptr + row * s_s + o, mask=msk, other=0.0)
        nz = z != 0.0
        mu = tl.where(nz, s / tl.where(nz, z, 1.0), 0.0)
        tl.store(omu_ptr + row * s_o + o, tl.where(lz == float("-inf"), 0.0, mu), mask=msk)


def _prologue(comps, J: int):
    import torch

    R = comps[0].shape[0]
    has_mu = len(comps) > 1
    buf = torch.empty(R, 2 * J if has_mu else J, dtype=torch.float32, device=comps[0].device)
    m = torch.empty(R, dtype=torch.float32, device=comps[0].device)
    l, mu = comps[0], comps[1] if has_mu else comps[0]
    _shift_exp_kernel[(R,)](l, mu, buf, m, J, l.stride(0), mu.stride(0), buf.stride(0),
                            HAS_MU=has_mu, BLOCK=min(BLOCK_ROW, next_pow2(J)))
    return buf, m


def _epilogue(z, s, m, K: int):
    import torch

    R = z.shape[0]
    out_l = torch.empty(R, K, dtype=torch.float32, device=z.device)
    out_mu = torch.empty_like(out_l) if s is not None else out_l
    blk = min(BLOCK_COL, next_pow2(K))
    _log_epilogue_kernel[(R, triton.cdiv(K, blk))](z, s if s is not None else z, m, out_l, out_mu, K,
                                                  z.stride(0), (s if s is not None else z).stride(0),
                                                  out_l.stride(0), HAS_S=s is not None, BLOCK=blk)
    return (out_l, out_mu) if s is not None else (out_l,)


def _flat(v, J: int):
    import torch

    lead = v[0].shape[:-1]
    R = 1
    for d in lead:
        R *= int(d)
    comps = []
    for c in v:
        c2 = c.reshape(R, J)
        comps.append(c2 if c2.stride(-1) == 1 else c2.contiguous())
    return lead, R, [c if c.dtype == torch.float32 else c.float() for c in comps]


def _accepts(v, w) -> bool:
    """fp32 values and a 2-D fp32 or fp16 weight (fp16: contracted as its exact fp32 copy,
    cached; the Triton GEMM declines fp16, whose 5-bit exponent cannot hold the hi/lo
    split of a = exp(l − m) more than ~10 nats below a row's maximum)."""
    import torch

    return (w.dim() == 2 and w.dtype in (torch.float32, torch.float16) and v[0].dtype == torch.float32
            and v[0].dim() >= 1 and v[0].shape[-1] == w.shape[0] and v[0].numel() > 0 and w.numel() > 0)


def _weight_cache():
    from semitriton import weight_cache  # torch-only module; imported at call time
    return weight_cache


@register("matmul_cublas", "abs")
def abs_matmul_cublas(v, w):
    """abs: out = log((exp(l − m) @ |W|)) + m, elementwise parts in two launches
    (an fp16 W as its fp32 copy)."""
    import torch

    if not _accepts(v, w):
        return NotImplemented
    J, K = w.shape
    lead, R, comps = _flat(v, J)
    a, m = _prologue(comps, J)
    from semitriton.semirings._util import weight               # torch-only; the reference's own |W|
    A = weight(w, "abs", torch.float32)                          # one fp32 |W| per weight, shared with it
    (out,) = _epilogue(torch.matmul(a, A), None, m, K)
    return (out.reshape(*lead, K),)


def _abs_stack(w):
    import torch

    return torch.cat([torch.abs(w.float()), _neg_xlogx_f32(w)], 0)   # [2J, K]: |W| over −|W| log|W|, fp32


@register("matmul_cublas", "entropy")
def entropy_matmul_cublas(v, w):
    """entropy: z = a @ |W|, s = [a·μ, a] @ [|W|; −|W| log|W|] (one GEMM), then
    (log z + m, s / z)."""
    import torch

    if not _accepts(v, w):
        return NotImplemented
    J, K = w.shape
    lead, R, comps = _flat(v, J)
    buf, m = _prologue(comps, J)
    stack = _weight_cache().transform(w, "cublas:entropy_stack", _abs_stack)
    z = torch.matmul(buf[:, J:], stack[:J])
    s = torch.matmul(buf, stack)
    out_l, out_mu = _epilogue(z, s, m, K)
    return out_l.reshape(*lead, K), out_mu.reshape(*lead, K)


def aot_specs():
    """(kernel, signature, constexprs, options): prologue with and without μ,
    epilogue with and without s."""
    specs = []
    for has_mu in (False, True):
        types = {n: "i32" for n in _shift_exp_kernel.arg_names}
        types.update({"l_ptr": "*fp32", "mu_ptr": "*fp32", "out_ptr": "*fp32", "m_ptr": "*fp32"})
        specs.append(aot_entry(_shift_exp_kernel, types, dict(HAS_MU=has_mu, BLOCK=BLOCK_ROW), 4, 1))
    for has_s in (False, True):
        types = {n: "i32" for n in _log_epilogue_kernel.arg_names}
        types.update({"z_ptr": "*fp32", "s_ptr": "*fp32", "m_ptr": "*fp32", "ol_ptr": "*fp32", "omu_ptr": "*fp32"})
        specs.append(aot_entry(_log_epilogue_kernel, types, dict(HAS_S=has_s, BLOCK=BLOCK_COL), 4, 1))
    return specs
