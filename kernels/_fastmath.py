"""Hardware logarithms for hot loops, and the small log-space helpers the
kernel modules share (``logaddexp``, ``finite_or_zero``).

``tl.log`` / ``tl.log2`` compile to libdevice's accurate software logarithm
(~20 FMA-pipe instructions each); ``fast_log2`` / ``fast_log`` use the SFU's
``lg2.approx.f32`` instead (one MUFU instruction; absolute error about 2^-22
in log2, i.e. a relative error of ~1e-7 in the number the log stands for;
subnormal inputs are kept, unlike libdevice's ``fast_log2f``, which flushes
them to zero).
Use them where a log is taken per pair / per score inside an O(n²) loop;
keep ``tl.log`` for per-row results. The interpreter has no inline PTX, so
under ``TRITON_INTERPRET=1`` they fall back to ``tl.log2`` / ``tl.log``, as
they do with ``SEMITRITON_ACCURATE_LOG=1`` (read at import; for comparisons).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ._common import interpreting

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def logaddexp(a, b):
    """log(e^a + e^b), -inf when both are -inf (no NaN on the way)."""
    mx = tl.maximum(a, b)
    mn = tl.minimum(a, b)
    none = mx == float("-inf")
    safe = tl.where(none, 0.0, mx)
    r = safe + tl.log(1.0 + tl.exp(mn - safe))
    return tl.where(none, float("-inf"), r)


@triton.jit
def finite_or_zero(t):
    """t where it is finite, else 0 (a row shift for rows without a finite term)."""
    return tl.where(tl.abs(t) < float("inf"), t, 0.0)


if interpreting() or os.environ.get("SEMITRITON_ACCURATE_LOG", "0") not in ("", "0"):
    @triton.jit
    def fast_log2(x):
        """log2(x) (interpreter: the accurate tl.log2)."""
        return tl.log2(x)

    @triton.jit
    def fast_log(x):
        """ln(x) (interpreter: the accurate tl.log)."""
        return tl.log(x)

    fast_log2_normal, fast_log_normal = fast_log2, fast_log
else:
    @triton.jit
    def fast_log2(x):
        """log2(x) via lg2.approx.f32 (x fp32)."""
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def fast_log(x):
        """ln(x) = ln2 · log2(x) via lg2.approx.f32 (x fp32)."""
        return fast_log2(x) * LN2

    @triton.jit
    def fast_log2_normal(x):
        """log2(x) via lg2.approx.ftz.f32: for inputs known to be 0 or normal
        (>= 2^-126; a subnormal would read as 0), which saves the subnormal
        rescaling around the SFU instruction."""
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def fast_log_normal(x):
        """ln(x) via lg2.approx.ftz.f32 (inputs 0 or >= 2^-126)."""
        return fast_log2_normal(x) * LN2
