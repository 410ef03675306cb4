"""RMS-norm rule in closed form, one row per program (op ``"rms_norm"``,
``fn(v, xhat, rstd, weight)``; v, xhat ``[..., n]``, rstd ``[..., 1]``,
weight γ ``[n]`` or None).

The Jacobian w_ij = γ_j r (δ_ij − x̂_i x̂_j / n) (i input, j output) splits
into a diagonal d_i = γ_i r (1 − x̂_i²/n) and a rank-one part a_i b_j with
a_i = −r x̂_i / n, b_j = γ_j x̂_j (``Semiring.rms_factors``), so every semiring
needs only row reductions that exclude the own index:

- abs:     Z_i = |a_i| Σ_{j≠i} |b_j| Z_j ⊕ |d_i| Z_i                (log space, row shift)
- maxabs:  m_i = max(|a_i| max_{j≠i} |b_j| m_j, |d_i| m_i)          (row top-2)
- entropy: z_i as abs; z_i μ_i = |a_i| (A_i − log|a_i| B_i) + |d_i| z_i (μ_i − log|d_i|),
           B_i = Σ_{j≠i} |b_j| z_j, A_i = Σ_{j≠i} |b_j| z_j (μ_j − log|b_j|)
- max:     M±_i from a_i·(exclusive max/min of b_j M±_j) and d_i M±_i, signs swapping.

Exclusive sums drop the row's largest term exactly (no S − t_i cancellation
where one term dominates). This replaces the ~50–110 small torch ops of the
reference per call with one launch; the math and its edge cases (zero values,
zero γ or x̂, one-element rows) are those of the torch reference it is tested
against.

Op ``"rms_norm_from_input"`` (``fn(v, x, eps, weight, offset)``, what the
canonical RMS-norm node calls) takes the norm's input x instead, and forms
r, x̂ and γ = weight + offset in the same launch; for ``real`` it is the
ordinary input-gradient kernel ``_rms_grad_kernel``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import aot_entry, next_pow2, row_warps
from ._fastmath import finite_or_zero, logaddexp
from .norm import row_inputs
from .registry import register

SR_ABS, SR_MAXABS, SR_MAX, SR_ENTROPY = 1, 2, 3, 4
_CODES = {"abs": SR_ABS, "maxabs": SR_MAXABS, "max": SR_MAX, "entropy": SR_ENTROPY}
MAX_BLOCK = 16384


@triton.jit
def _excl_max(c, offs):
    """max_{j≠i} c_j for every i (row top-2)."""
    v1 = tl.max(c, 0)
    i1 = tl.argmax(c, 0)
    v2 = tl.max(tl.where(offs == i1, float("-inf"), c), 0)
    return tl.where(offs == i1, v2, v1)


@triton.jit
def _excl_sum(u, key, offs):
    """Σ_{j≠i} u_j, the largest-``key`` term excluded exactly."""
    imax = tl.argmax(key, 0)
    rest = tl.sum(tl.where(offs == imax, 0.0, u), 0)
    return tl.where(offs == imax, rest, tl.sum(u, 0) - u)


@triton.jit
def _rms_closed_kernel(c0_ptr, c1_ptr, x_ptr, rstd_ptr, g_ptr, o0_ptr, o1_ptr,
                       N, s_c0, s_c1, s_x, s_o, eps, offset,
                       SR: tl.constexpr, HAS_G: tl.constexpr, FROM_X: tl.constexpr, EXACT_D: tl.constexpr,
                       BLOCK: tl.constexpr):
    """One row: out_i = ⊕_j edge(w_ij) ⊗ v_j in closed form (module docstring;
    SR: 1 abs, 2 maxabs, 3 max, 4 entropy). FROM_X: ``x_ptr`` holds the norm's
    input x and r = (Σx²/n + eps)^-½, x̂ = x·r, γ = g + offset are formed here
    (``rstd_ptr`` unused); else ``x_ptr`` holds x̂, ``rstd_ptr`` r and g is γ.
    EXACT_D (eps known): the diagonal's 1 − x̂_i²/n is formed as
    (Σ_{j≠i} x̂_j² + n·eps·r²)/n, without cancellation where x_i dominates."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    xh = tl.load(x_ptr + row * s_x + offs, mask=m, other=0.0).to(tl.float32)
    if FROM_X:
        r = 1.0 / tl.sqrt_rn(tl.sum(xh * xh, 0) / N + eps)
        xh = xh * r
    else:
        r = tl.load(rstd_ptr + row).to(tl.float32)
    if HAS_G:
        gam = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if FROM_X:
            gam = tl.where(m, gam + offset, 0.0)
    else:
        gam = tl.where(m, 1.0, 0.0)
    if EXACT_D:
        q = xh * xh
        d = gam * r * ((_excl_sum(q, q, offs) + N * eps * r * r) / N)
    else:
        d = gam * r * (1.0 - xh * xh / N)
    a = -r * xh / N
    b = gam * xh
    c0_row = c0_ptr + row * s_c0
    c1_row = c1_ptr + row * s_c1
    o_row = row * s_o
    if SR == 3:
        mp = tl.load(c0_row + offs, mask=m, other=float("-inf"))
        mn = tl.load(c1_row + offs, mask=m, other=float("inf"))
        live = m & (mp != float("-inf")) & (b != 0.0)
        bp = tl.where(live, b * mp, 0.0)
        bn = tl.where(live, b * mn, 0.0)
        P = tl.where(live, tl.maximum(bp, bn), float("-inf"))
        Q = tl.where(live, tl.minimum(bp, bn), float("inf"))
        hi = _excl_max(P, offs)
        lo = -_excl_max(-Q, offs)
        has = (a != 0.0) & (hi != float("-inf"))
        hi0 = tl.where(has, hi, 0.0)
        lo0 = tl.where(has, lo, 0.0)
        off_p = tl.where(has, tl.where(a > 0, a * hi0, a * lo0), float("-inf"))
        off_n = tl.where(has, tl.where(a > 0, a * lo0, a * hi0), float("inf"))
        dp = tl.where(d > 0, d * mp, tl.where(d < 0, d * mn, float("-inf")))
        dn = tl.where(d > 0, d * mn, tl.where(d < 0, d * mp, float("inf")))
        tl.store(o0_ptr + o_row + offs, tl.maximum(off_p, dp), mask=m)
        tl.store(o1_ptr + o_row + offs, tl.minimum(off_n, dn), mask=m)
    else:
        l = tl.load(c0_row + offs, mask=m, other=float("-inf"))
        lb = tl.log(tl.abs(b))
        la = tl.log(tl.abs(a))
        ld = tl.log(tl.abs(d))
        t_log = l + lb
        if SR == 2:
            off = la + _excl_max(t_log, offs)
            tl.store(o0_ptr + o_row + offs, tl.maximum(off, ld + l), mask=m)
        else:
            mx = finite_or_zero(tl.max(t_log, 0))
            t = tl.exp(t_log - mx)
            B = tl.maximum(_excl_sum(t, t, offs), 0.0)
            l_off = la + tl.log(B) + mx
            l_diag = ld + l
            L = logaddexp(l_off, l_diag)
            tl.store(o0_ptr + o_row + offs, L, mask=m)
            if SR == 4:
                mu = tl.load(c1_row + offs, mask=m, other=0.0)
                A = _excl_sum(t * (mu - finite_or_zero(lb)), t, offs)
                mu_off = tl.where(B != 0.0, A / tl.where(B != 0.0, B, 1.0), 0.0) - finite_or_zero(la)
                mu_diag = mu - finite_or_zero(ld)
                shift = tl.where(L == float("-inf"), 0.0, L)
                mu_out = tl.exp(l_off - shift) * mu_off + tl.exp(l_diag - shift) * mu_diag
                tl.store(o1_ptr + o_row + offs, tl.where(L == float("-inf"), 0.0, mu_out), mask=m)


@triton.jit
def _rms_grad_kernel(x_ptr, g_ptr, w_ptr, dx_ptr, N, s_x, s_g, s_dx, eps, offset,
                     HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """The ordinary input gradient of y = γ ⊙ x̂, x̂ = x·r, r = (mean(x²) + eps)^-1/2,
    γ = w + offset, one row per program in fp32:
    g' = g·γ, dx = r·(g' − x̂·mean(g'·x̂)), stored in dx's dtype."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + row * s_x + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * s_g + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_W:
        g = g * (tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32) + offset)
    r = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    xh = x * r
    dx = r * (g - xh * (tl.sum(g * xh, 0) / N))
    tl.store(dx_ptr + row * s_dx + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


def _accepts_input(x, weight, *values) -> bool:
    """x, γ and the value tensors are a shape the row kernels take: rows of
    n ≤ MAX_BLOCK, fp32/bf16/fp16 x and γ ([n]), values shaped like x, one device."""
    import torch

    ok = (torch.float32, torch.bfloat16, torch.float16)
    n = x.shape[-1] if x.dim() else 0
    return not (x.dim() == 0 or n == 0 or n > MAX_BLOCK or x.dtype not in ok
                or any(t.shape != x.shape or t.dtype not in ok or t.device != x.device for t in values)
                or (weight is not None and (weight.numel() != n or weight.dtype not in ok
                                            or weight.device != x.device)))


def rms_norm_input_grad(x, grad_out, weight, eps: float, offset: float, out_dtype=None):
    """dx of the RMS norm (``_rms_grad_kernel``): one launch instead of the ~12
    torch ops of the closed form, stored in ``out_dtype`` (default x's dtype);
    None where it declines (rows longer than MAX_BLOCK, shapes or devices that
    differ, unsupported dtypes)."""
    import torch

    if not _accepts_input(x, weight, grad_out):
        return None
    n = x.shape[-1]
    R = x.numel() // n
    xc = x.reshape(R, n).contiguous()
    gc = grad_out.reshape(R, n).contiguous()
    dx = torch.empty((R, n), dtype=out_dtype or x.dtype, device=x.device)
    if R:
        wc = weight.reshape(n).contiguous() if weight is not None else xc
        block = next_pow2(n)
        _rms_grad_kernel[(R,)](xc, gc, wc, dx, n, xc.stride(0), gc.stride(0), dx.stride(0), float(eps),
                               float(offset), HAS_W=weight is not None, BLOCK=block, num_warps=row_warps(block))
    return dx.reshape(x.shape)


def _rms_norm(v, xhat, rstd, weight, kind: str, eps=None):
    rows = row_inputs(v, xhat, rstd, weight, max_n=MAX_BLOCK)
    if rows is None:
        return NotImplemented
    R, n, comps, x, rs, g, outs = rows
    a = comps[0]
    b = comps[1] if len(comps) > 1 else a
    o0 = outs[0]
    o1 = outs[1] if len(outs) > 1 else o0
    block = next_pow2(n)
    _rms_closed_kernel[(R,)](a, b, x, rs, g if g is not None else x, o0, o1, n,
                             a.stride(0), b.stride(0), x.stride(0), o0.stride(0),
                             0.0 if eps is None else float(eps), 0.0,
                             SR=_CODES[kind], HAS_G=g is not None, FROM_X=False, EXACT_D=eps is not None,
                             BLOCK=block, num_warps=row_warps(block))
    return tuple(o.reshape(v[0].shape) for o in outs)


def _rms_norm_from_input(v, x, eps: float, weight, offset: float, kind: str):
    """The closed form with r, x̂ and γ = weight + offset formed in the kernel
    from the norm's input x (one launch and the outputs' allocation, instead
    of the ~6 torch ops that precompute them)."""
    import torch

    c0 = v[0]
    if c0.dtype != torch.float32 or any(c.dtype != c0.dtype for c in v) or not _accepts_input(x, weight, *v):
        return NotImplemented
    n = x.shape[-1]
    R = x.numel() // n
    comps = [c.reshape(R, n).contiguous() for c in v]
    xc = x.reshape(R, n).contiguous()
    g = weight.reshape(n).contiguous() if weight is not None else xc
    outs = [torch.empty_like(c) for c in comps]
    a, b = comps[0], comps[-1]
    o0, o1 = outs[0], outs[-1]
    if R:
        block = next_pow2(n)
        _rms_closed_kernel[(R,)](a, b, xc, xc, g, o0, o1, n, a.stride(0), b.stride(0), xc.stride(0),
                                 o0.stride(0), float(eps), float(offset),
                                 SR=_CODES[kind], HAS_G=weight is not None, FROM_X=True, EXACT_D=True,
                                 BLOCK=block, num_warps=row_warps(block))
    return tuple(o.reshape(c0.shape) for o in outs)


def _make(kind: str):
    def fn(v, xhat, rstd, weight, eps=None):
        return _rms_norm(v, xhat, rstd, weight, kind, eps)

    def from_input(v, x, eps, weight, offset):
        return _rms_norm_from_input(v, x, eps, weight, offset, kind)

    fn.__name__ = f"{kind}_rms_norm"
    fn.__doc__ = f"{kind} RMS norm in closed form: out_i = ⊕_j edge(γ_j r (δ_ij − x̂_i x̂_j/n)) ⊗ v_j."
    from_input.__name__ = f"{kind}_rms_norm_from_input"
    from_input.__doc__ = fn.__doc__ + " r, x̂ and γ = weight + offset formed in the kernel from x."
    return fn, from_input


for _kind in _CODES:
    _fn, _from_input = _make(_kind)
    register("rms_norm", _kind)(_fn)
    register("rms_norm_from_input", _kind)(_from_input)


@register("rms_norm_from_input", "real")
def real_rms_norm_from_input(v, x, eps, weight, offset):
    """real: the gradient r·(g' − x̂·mean(g'·x̂)), g' = v·γ (``_rms_grad_kernel``)."""
    import torch

    if v[0].dtype != torch.float32:
        return NotImplemented
    dx = rms_norm_input_grad(x, v[0], weight, eps, offset, out_dtype=torch.float32)
    return NotImplemented if dx is None else (dx,)


def aot_specs():
    """(kernel, signature, constexprs, options): each semiring at n ≤ 1024 with
    fp32 and bf16 γ, without γ, and at n ≤ 8192, from x̂ (eps unknown or
    given) and from x; the
    ordinary input gradient for fp32 and bf16, and for bf16 x with fp32
    values (the real semiring's walk)."""
    specs = []
    kern = _rms_closed_kernel
    for kind, sr in _CODES.items():
        for has_g, dt, block in ((True, "fp32", 1024), (True, "bf16", 1024), (False, "fp32", 1024),
                                 (True, "fp32", 8192)):
            types = {n: "i32" for n in kern.arg_names}
            types.update({"c0_ptr": "*fp32", "c1_ptr": "*fp32", "x_ptr": "*" + dt, "rstd_ptr": "*fp32",
                          "g_ptr": "*" + dt, "o0_ptr": "*fp32", "o1_ptr": "*fp32"})
            types.update({"eps": "fp32", "offset": "fp32"})
            for from_x, exact in ((False, False), (False, True), (True, True)):
                const = dict(SR=sr, HAS_G=has_g, FROM_X=from_x, EXACT_D=exact, BLOCK=block)
                specs.append(aot_entry(kern, types, const, row_warps(block), 1))
    # (x and γ, g, dx): the ordinary backward, and the real semiring's walk (fp32 values and output)
    for dt, has_w, block, g_dt in (("fp32", True, 1024, "fp32"), ("bf16", True, 1024, "bf16"),
                                   ("bf16", True, 1024, "fp32"), ("fp32", False, 8192, "fp32")):
        types = {n: "i32" for n in _rms_grad_kernel.arg_names}
        types.update({"x_ptr": "*" + dt, "g_ptr": "*" + g_dt, "w_ptr": "*" + dt, "dx_ptr": "*" + g_dt,
                      "eps": "fp32", "offset": "fp32"})
        specs.append(aot_entry(_rms_grad_kernel, types, dict(HAS_W=has_w, BLOCK=block), row_warps(block), 1,
                               divisible=["x_ptr", "g_ptr", "w_ptr", "dx_ptr", "N", "s_x", "s_g", "s_dx"]))
    return specs
