"""Fused elementwise rules.

Op ``"activation"``, ``fn(v, x, kind)``: the edge x_i -> y_i of y = f(x) has
weight w_i = f'(x_i); one pass reads x and the value, forms w in registers
and writes v ⊗ edge(w) (the torch reference computes w with ~8 ops and
applies ⊗ with 3 to 8 more, each a pass over memory). ``kind``:

- ``gelu``:      w = Φ(x) + x φ(x) = ½ erfc(-x/√2) + x e^{-x²/2}/√(2π)
- ``gelu_tanh``: w = ½(1 + t) + ½ x (1 - t²) √(2/π) (1 + 3·0.044715 x²),
                 t = tanh(√(2/π)(x + 0.044715 x³))
- ``silu``:      w = σ(x) (1 + x σ(-x))

(written so that they keep their relative accuracy where f' is tiny; see
``semitriton.semirings._util.activation_derivative``), and ``identity``,
w = x: op ``"scale"``, ``fn(v, w)``, v ⊗ edge(w) for a weight of v's shape
(e.g. the other factor of a product).

⊗ edge(w) per semiring: real g·w; abs, maxabs l + log|w| (log 0 = -inf: no
edge); entropy (l + log|w|, μ - log|w|), μ = 0 where l = -inf; max (w·M+,
w·M-) for w > 0, (w·M-, w·M+) for w < 0, the zero (-inf, +inf) for w = 0.
Values fp32, contiguous (x any float dtype, cast to fp32 here).

Also here: op ``"rope"`` (the rotary-embedding rule, both edges and ⊕ in one
pass) and op ``"plus"`` for entropy (⊕ of two values of one shape).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import aot_entry, broadcasts_to, interpreting
from ._fastmath import finite_or_zero, logaddexp
from .registry import register

KINDS = {"identity": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
#: semiring codes of the kernels here (abs and maxabs share ⊗ edge, not ⊕)
_CODES = {"real": 0, "abs": 1, "entropy": 2, "max": 3, "maxabs": 4}
#: below this many elements a CUDA call stays with the torch reference (a Triton
#: launch costs more host time than the few small torch ops it would replace)
MIN_NUMEL_CUDA = 1 << 16


def _block() -> int:
    return 128 if interpreting() else 1024


def _register_per_semiring(op: str, impl, semirings, doc: str) -> None:
    """Register ``impl(*args, semiring)`` as ``op`` for each semiring, as
    functions named ``<semiring>_<op>``."""
    for semiring in semirings:
        def fn(*args, _sr=semiring):
            return impl(*args, _sr)

        fn.__name__ = f"{semiring}_{op}"
        fn.__doc__ = f"{semiring}: {doc}"
        register(op, semiring)(fn)


@triton.jit
def _half_erfc(z):
    """½ erfc(z) for z ≥ 0 (relative error < 1.2e-7: the Chebyshev fit of
    Numerical Recipes, erfc(z) = t exp(-z² + P(t)), t = 1/(1 + z/2))."""
    t = 1.0 / (1.0 + 0.5 * z)
    p = -0.82215223 + t * 0.17087277
    p = 1.48851587 + t * p
    p = -1.13520398 + t * p
    p = 0.27886807 + t * p
    p = -0.18628806 + t * p
    p = 0.09678418 + t * p
    p = 0.37409196 + t * p
    p = 1.00002368 + t * p
    p = -1.26551223 + t * p
    return 0.5 * t * tl.exp(p - z * z)


@triton.jit
def _derivative(x, KIND: tl.constexpr):
    """f'(x) in fp32 for the activation KIND (1 gelu, 2 gelu_tanh, 3 silu), in
    the tail-accurate forms of ``semitriton.semirings._util.activation_derivative``;
    KIND 0: x itself (the edge weight is given: op ``scale``)."""
    if KIND == 0:
        w = x
    elif KIND == 1:
        h = _half_erfc(tl.abs(x) * 0.7071067811865476)
        cdf = tl.where(x < 0, h, 1.0 - h)
        w = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    elif KIND == 2:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        e = tl.exp(-2.0 * tl.abs(u))
        r = 1.0 / (1.0 + e)
        w = tl.where(u >= 0, r, e * r) + 2.0 * x * e * r * r * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    else:
        e = tl.exp(-tl.abs(x))
        r = 1.0 / (1.0 + e)
        s = tl.where(x >= 0, r, e * r)               # σ(x)
        sm = tl.where(x >= 0, e * r, r)              # σ(-x)
        w = s * (1.0 + x * sm)
    return w


@triton.jit
def _times_edge(c0, c1, w, SR: tl.constexpr):
    """v ⊗ edge(w) for SR 0 real, 1 abs / 4 maxabs (log space), 2 entropy, 3 max."""
    if SR == 0:
        o0 = c0 * w
        o1 = c1
    elif SR == 2:
        lw = tl.log(tl.abs(w))
        o0 = c0 + lw
        o1 = tl.where(o0 == float("-inf"), 0.0, c1 - lw)
    elif SR == 3:
        pos = w > 0
        neg = w < 0
        o0 = tl.where(pos, w * c0, tl.where(neg, w * c1, float("-inf")))
        o1 = tl.where(pos, w * c1, tl.where(neg, w * c0, float("inf")))
    else:
        o0 = c0 + tl.log(tl.abs(w))
        o1 = c1
    return o0, o1


@triton.jit
def _activation_kernel(x_ptr, c0_ptr, c1_ptr, o0_ptr, o1_ptr, N,
                       SR: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """out = v ⊗ edge(f'(x)) elementwise over N entries (see the module docstring)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    w = _derivative(x, KIND)
    c0 = tl.load(c0_ptr + offs, mask=m, other=0.0)
    if SR == 2 or SR == 3:                                 # two components
        c1 = tl.load(c1_ptr + offs, mask=m, other=0.0)
    else:
        c1 = c0
    o0, o1 = _times_edge(c0, c1, w, SR)
    tl.store(o0_ptr + offs, o0, mask=m)
    if SR == 2 or SR == 3:
        tl.store(o1_ptr + offs, o1, mask=m)


# ---- rotary embedding rule (op "rope"), entropy ⊕ (op "plus") -------------------------
@triton.jit
def _plus(a0, a1, b0, b1, SR: tl.constexpr):
    """a ⊕ b (SR as in ``_times_edge``); entropy: (logaddexp, softmax-weighted μ)."""
    if SR == 0:
        o0 = a0 + b0
        o1 = a1
    elif SR == 1:
        o0 = logaddexp(a0, b0)
        o1 = a1
    elif SR == 2:
        o0 = logaddexp(a0, b0)
        sh = finite_or_zero(o0)
        o1 = tl.exp(a0 - sh) * a1 + tl.exp(b0 - sh) * b1
    elif SR == 3:
        o0 = tl.maximum(a0, b0)
        o1 = tl.minimum(a1, b1)
    else:
        o0 = tl.maximum(a0, b0)
        o1 = a1
    return o0, o1


@triton.jit
def _rope_kernel(c0_ptr, c1_ptr, cos_ptr, sin_ptr, o0_ptr, o1_ptr, N, H, T, D,
                 sc_b, sc_h, sc_t, sc_d, ss_b, ss_h, ss_t, ss_d,
                 SR: tl.constexpr, TWO: tl.constexpr, BLOCK: tl.constexpr):
    """Rotary embedding rule over v [B, H, T, D] (contiguous; cos/sin by
    strides, 0 where broadcast): out[j] = v[j] ⊗ edge(cos[j]) ⊕
    v[p] ⊗ edge(±sin[p]), p = (j + D/2) mod D, + for j < D/2. TWO: two components."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    d = offs % D
    r = offs // D
    t = r % T
    r = r // T
    hh = r % H
    b = r // H
    half = D // 2
    lo = d < half
    pd = tl.where(lo, d + half, d - half)
    cs = tl.load(cos_ptr + b * sc_b + hh * sc_h + t * sc_t + d * sc_d, mask=m, other=1.0).to(tl.float32)
    sn = tl.load(sin_ptr + b * ss_b + hh * ss_h + t * ss_t + pd * ss_d, mask=m, other=0.0).to(tl.float32)
    pw = tl.where(lo, sn, -sn)
    poffs = offs - d + pd
    a0 = tl.load(c0_ptr + offs, mask=m, other=0.0)
    b0 = tl.load(c0_ptr + poffs, mask=m, other=0.0)
    if TWO:
        a1 = tl.load(c1_ptr + offs, mask=m, other=0.0)
        b1 = tl.load(c1_ptr + poffs, mask=m, other=0.0)
    else:
        a1 = a0
        b1 = b0
    x0, x1 = _times_edge(a0, a1, cs, SR)
    y0, y1 = _times_edge(b0, b1, pw, SR)
    o0, o1 = _plus(x0, x1, y0, y1, SR)
    tl.store(o0_ptr + offs, o0, mask=m)
    if TWO:
        tl.store(o1_ptr + offs, o1, mask=m)


@triton.jit
def _plus_kernel(a0_ptr, a1_ptr, b0_ptr, b1_ptr, o0_ptr, o1_ptr, N, SR: tl.constexpr, BLOCK: tl.constexpr):
    """out = a ⊕ b elementwise (SR as in ``_times_edge``)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    a0 = tl.load(a0_ptr + offs, mask=m, other=0.0)
    a1 = tl.load(a1_ptr + offs, mask=m, other=0.0)
    b0 = tl.load(b0_ptr + offs, mask=m, other=0.0)
    b1 = tl.load(b1_ptr + offs, mask=m, other=0.0)
    o0, o1 = _plus(a0, a1, b0, b1, SR)
    tl.store(o0_ptr + offs, o0, mask=m)
    tl.store(o1_ptr + offs, o1, mask=m)


def entropy_plus(a, b):
    """entropy ⊕ of two values of one shape in one pass (the torch form is ~9
    launches: logaddexp, the shift, two exps, two products, a sum)."""
    import torch

    if (len(a) != 2 or len(b) != 2 or any(not isinstance(c, torch.Tensor) for c in (*a, *b))
            or any(c.dtype != torch.float32 or c.shape != a[0].shape or c.device != a[0].device
                   for c in (*a, *b))):
        return NotImplemented
    n = a[0].numel()
    if n == 0 or (a[0].is_cuda and n < MIN_NUMEL_CUDA):
        return NotImplemented
    ins = [c.contiguous() for c in (*a, *b)]
    outs = [torch.empty_like(ins[0]), torch.empty_like(ins[0])]
    block = _block()
    _plus_kernel[(triton.cdiv(n, block),)](*ins, *outs, n, SR=_CODES["entropy"], BLOCK=block, num_warps=4)
    return tuple(outs)


register("plus", "entropy")(entropy_plus)


def _rope(v, cos, sin, semiring: str):
    import torch

    c0 = v[0]
    ok = (torch.float32, torch.bfloat16, torch.float16)
    if (c0.dtype != torch.float32 or c0.dim() != 4 or any(c.shape != c0.shape or c.dtype != c0.dtype for c in v)
            or not isinstance(cos, torch.Tensor) or not isinstance(sin, torch.Tensor)
            or cos.dtype not in ok or sin.dtype not in ok or c0.shape[-1] % 2
            or cos.device != c0.device or sin.device != c0.device):
        return NotImplemented
    n = c0.numel()
    if n == 0 or (c0.is_cuda and n < MIN_NUMEL_CUDA):
        return NotImplemented
    if not (broadcasts_to(cos.shape, c0.shape) and broadcasts_to(sin.shape, c0.shape)):
        return NotImplemented
    cs = cos.expand(c0.shape)
    sn = sin.expand(c0.shape)
    comps = [c.contiguous() for c in v]
    outs = [torch.empty_like(c) for c in comps]
    B, H, T, D = c0.shape
    two = len(comps) > 1
    block = _block()
    _rope_kernel[(triton.cdiv(n, block),)](comps[0], comps[1] if two else comps[0], cs, sn, outs[0],
                                           outs[1] if two else outs[0], n, H, T, D, *cs.stride(), *sn.stride(),
                                           SR=_CODES[semiring], TWO=two, BLOCK=block, num_warps=4)
    return tuple(outs)


_register_per_semiring("rope", _rope, _CODES,
                       "the rotary-embedding rule v[j] ⊗ edge(cos) ⊕ v[partner] ⊗ edge(±sin), one pass.")


def _activation(v, x, kind: str, semiring: str):
    import torch

    c0 = v[0]
    if (kind not in KINDS or not isinstance(x, torch.Tensor) or c0.dtype != torch.float32
            or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.device != c0.device
            or any(c.shape != c0.shape or c.dtype != c0.dtype for c in v) or x.shape != c0.shape):
        return NotImplemented
    n = c0.numel()
    if n == 0 or (c0.is_cuda and n < MIN_NUMEL_CUDA):
        return NotImplemented
    comps = [c.contiguous() for c in v]
    xc = x.contiguous()
    outs = [torch.empty_like(c) for c in comps]
    c1 = comps[1] if len(comps) > 1 else comps[0]
    o1 = outs[1] if len(outs) > 1 else outs[0]
    block = _block()
    _activation_kernel[(triton.cdiv(n, block),)](xc, comps[0], c1, outs[0], o1, n, SR=_CODES[semiring],
                                                 KIND=KINDS[kind], BLOCK=block, num_warps=4)
    return tuple(outs)


def _scale(v, w, semiring: str):
    """``v ⊗ edge(w)`` for a weight of exactly v's shape (broadcast weights and
    scalars stay with the torch reference)."""
    import torch
    if not isinstance(w, torch.Tensor) or w.shape != v[0].shape:
        return NotImplemented
    return _activation(v, w, "identity", semiring)


_register_per_semiring("activation", _activation, _CODES,
                       "v ⊗ edge(f'(x)) for f = gelu / gelu_tanh / silu, one pass.")
_register_per_semiring("scale", _scale, ("abs", "maxabs", "entropy", "max"),   # real: one torch multiply
                       "v ⊗ edge(w) elementwise, w of v's shape, one pass.")


def aot_specs():
    """(kernel, signature, constexprs, options): every semiring code × kind with
    fp32 x, plus bf16 x."""
    specs = []
    for sr in range(4):                                       # maxabs (4) compiles as abs (1)
        for kind in KINDS.values():
            for dt in ("fp32", "bf16") if kind in (0, 1) else ("fp32",):
                types = {"x_ptr": "*" + dt, "c0_ptr": "*fp32", "c1_ptr": "*fp32", "o0_ptr": "*fp32",
                         "o1_ptr": "*fp32"}
                specs.append(aot_entry(_activation_kernel, types, dict(SR=sr, KIND=kind, BLOCK=1024), 4, 1))
    types = {p: "*fp32" for p in ("a0_ptr", "a1_ptr", "b0_ptr", "b1_ptr", "o0_ptr", "o1_ptr")}
    specs.append(aot_entry(_plus_kernel, types, dict(SR=_CODES["entropy"], BLOCK=1024), 4, 1))
    for name, code in _CODES.items():
        for dt in ("fp32", "bf16") if code == 2 else ("fp32",):
            types = {"c0_ptr": "*fp32", "c1_ptr": "*fp32", "cos_ptr": "*" + dt, "sin_ptr": "*" + dt,
                     "o0_ptr": "*fp32", "o1_ptr": "*fp32"}
            const = dict(SR=code, TWO=name in ("entropy", "max"), BLOCK=1024)
            specs.append(aot_entry(_rope_kernel, types, const, 4, 1,
                                   divisible=["c0_ptr", "c1_ptr", "cos_ptr", "sin_ptr", "o0_ptr", "o1_ptr", "N",
                                              "D", "sc_t", "ss_t"]))
    return specs
