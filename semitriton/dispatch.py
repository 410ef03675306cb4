"""Where the Triton kernels plug in.

Each built-in semiring method asks ``kernel(op, semiring, tensor)`` first; it
returns the Triton implementation registered in ``semitriton.kernels`` for
(op, semiring) when the backend switch says the tensor should use Triton
(CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 with
SEMITRITON_BACKEND=triton), else ``None`` and the torch reference runs. A
kernel takes the same arguments as the semiring method and returns the same
value (or ``NotImplemented`` to decline a case, e.g. an unsupported dtype).

Ops: ``matmul(v, w)``, ``softmax(v, y, dim)``, ``log_softmax(v, p, dim)``,
``layer_norm(v, xhat, rstd, weight)``, ``rms_norm(v, xhat, rstd, weight)``
(the O(n) closed forms, one row per program; the dense O(n²) kernel is kept
as ``rms_norm_dense``), ``rms_norm_from_input(v, x, eps, weight, offset)``
(the same with r, x̂ and γ formed in the kernel; ``real`` included),
``attention(vo, q, k, v, bias, causal, scale, needs)``,
and ``matmul_cublas(v, w)`` (abs/entropy with fp32 or fp16 weights: exp/log
fused around cuBLAS; the default for those on CUDA, see ``REFERENCE_ALTERNATIVE``).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Callable, Optional

import torch

from . import backend
from .errors import KernelFallbackWarning, user_stacklevel


def _fp32_gemm_prefers_cublas(v, w, *rest) -> bool:
    """abs/entropy matmuls are exp-shift + GEMM + log: with float32 operands
    cuBLAS fp32 beat the fused Triton kernel on an H100 (4096³: 2.9 vs 3.6 ms
    for abs, 8.8 vs 11.4 ms for entropy; bench/RESULTS.md), unless the user
    let cuBLAS use TF32 (~1e-3 relative error: the kernel's "tf32x3" keeps
    fp32 accuracy); with bf16 weights the kernel wins (0.23 vs 0.55 ms on
    BERT's FFN). fp16 weights go to cuBLAS as their fp32 copy: the kernel
    declines them (its fp16 hi/lo split of exp(l − rowmax) loses terms ~10
    nats below a row's maximum)."""
    if w.dtype == torch.float16:
        return True
    from .modes import tf32_matmul_on
    return w.dtype in (torch.float32, torch.float64) and not tf32_matmul_on()


#: (op, semiring) -> predicate on the call's arguments; True = the Triton kernel
#: for (op, semiring) is not used: ``REFERENCE_ALTERNATIVE`` runs if it has an
#: entry (and accepts the call), else the torch reference
PREFER_REFERENCE = {("matmul", "abs"): _fp32_gemm_prefers_cublas,
                    ("matmul", "entropy"): _fp32_gemm_prefers_cublas}
#: the same math as the torch reference with fewer launches: exp-shift and log
#: fused around cuBLAS (kernels/logspace_gemm.py; fp32 and fp16 weights). Measured
#: on BERT-base fp32 (H200, 2026-11-26): backward ratio abs 2.53 vs 2.69 for the
#: torch reference and 2.95 for the Triton GEMM (then fp32 FMA code); entropy
#: 6.90 vs 7.51 and 7.54. ``SEMITRITON_FORCE_REFERENCE=matmul_cublas:abs``
#: (etc.) selects the torch reference.
REFERENCE_ALTERNATIVE = {("matmul", "abs"): "matmul_cublas", ("matmul", "entropy"): "matmul_cublas"}
#: pairs whose kernel is timed against the alternative at the first call per
#: shape (the faster is kept, like a launch config): the Triton GEMM now runs
#: fp32 weights on the tensor cores ("tf32x3"), which has not been measured
#: against cuBLAS fp32 at the models' shapes. SEMITRITON_AUTOTUNE=0 keeps the
#: alternative (the measured default).
RACE = {("matmul", "abs"), ("matmul", "entropy")}


@functools.lru_cache(maxsize=8)
def _pairs(spec: str) -> frozenset:
    return frozenset(tuple(p.strip().split(":", 1)) for p in spec.split(",") if ":" in p)


def _overridden(var: str, op: str, semiring: str) -> bool:
    """``op:semiring`` listed in the environment variable ``var`` (comma-separated)."""
    spec = backend.env(var, "")
    return bool(spec) and (op, semiring) in _pairs(spec)


def kernel(op: str, semiring: str, t: torch.Tensor) -> Optional[Callable]:
    if not backend.use_triton(t):
        return None
    try:
        from .kernels import registry
    except ImportError:  # triton missing or broken
        return None
    return registry.KERNELS.get((op, semiring))


@functools.lru_cache(maxsize=None)
def _fallback_errors() -> tuple:
    """Triton's errors for a kernel that cannot be built or launched on this
    GPU: out of shared memory or registers, a ptxas or compile failure."""
    import importlib
    errors = []
    for module, name in (("triton.runtime.errors", "OutOfResources"), ("triton.runtime.errors", "PTXASError"),
                         ("triton.compiler.errors", "CompilationError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):        # an older triton without that class
            pass
    return tuple(errors)


_warned: set = set()
#: (op, semiring, shape key) of kernels that could not be built or launched -> (op, semiring,
#: error name, first line of the error): not tried again
_failed: dict = {}


def _failure_key(op: str, semiring: str, args) -> tuple:
    v = args[0] if isinstance(args[0], tuple) else (args[0],)
    try:
        return (op, semiring) + _shape_key(v, args[1:])
    except Exception:  # noqa: BLE001 - arguments _shape_key does not know
        return (op, semiring)


def guarded(op: str, semiring: str, fn: Callable, *args):
    """``fn(*args)`` (a kernel launcher; ``args[0]`` a value tuple or tensor)
    on its tensors' GPU, made current for the launch (Triton launches on the
    current device: a model spread over several GPUs), or ``NotImplemented``
    where the kernel cannot be built or launched there: the caller's torch
    reference then computes the op, with a :class:`KernelFallbackWarning`
    once per (op, semiring, error), and that shape bucket is not tried
    again (a failed build would otherwise be retried at every call)."""
    if _failed:                        # the shape key only once some kernel has failed (a hot path)
        known = _failed.get(_failure_key(op, semiring, args))
        if known is not None:
            _warn_fallback(*known)
            return NotImplemented
    t = args[0][0] if isinstance(args[0], tuple) else args[0]
    ctx = contextlib.nullcontext()
    if (isinstance(t, torch.Tensor) and t.is_cuda and torch.cuda.device_count() > 1
            and t.device.index != torch.cuda.current_device()):
        ctx = torch.cuda.device(t.device)
    try:
        with ctx:
            return fn(*args)
    except _fallback_errors() as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        known = _failed[_failure_key(op, semiring, args)] = (op, semiring, type(exc).__name__, first[:200])
        _warn_fallback(*known)
        return NotImplemented


def _warn_fallback(op: str, semiring: str, error: str, first: str) -> None:
    """The fallback's warning, once per (op, semiring, error); marked as given
    only once it returns, so where warnings are errors (pytest) every
    fallback raises."""
    what = (op, semiring, error)
    if what not in _warned:
        warnings.warn(f"semitriton: the Triton kernel for {op}/{semiring} cannot run on this GPU "
                      f"({error}: {first}); the torch reference computes it instead (same statistics, "
                      "slower)", KernelFallbackWarning, stacklevel=user_stacklevel())
        _warned.add(what)


def call(op: str, semiring: str, v, *args):
    """Run the kernel for (op, semiring) on value ``v`` if one applies and the
    measured policy (``PREFER_REFERENCE``) does not prefer the torch reference;
    ``NotImplemented`` otherwise (the kernel may also decline a case).
    For A/B measurements, ``SEMITRITON_FORCE_REFERENCE`` and
    ``SEMITRITON_FORCE_KERNEL`` (e.g. ``"layer_norm:abs,matmul:entropy"``)
    override the policy per (op, semiring)."""
    k = kernel(op, semiring, v[0])
    if k is None:
        return NotImplemented
    if _overridden("SEMITRITON_FORCE_REFERENCE", op, semiring):
        return NotImplemented
    pref = PREFER_REFERENCE.get((op, semiring))
    if (pref is not None and v[0].is_cuda and pref(v, *args)
            and not _overridden("SEMITRITON_FORCE_KERNEL", op, semiring)):
        alt = REFERENCE_ALTERNATIVE.get((op, semiring))
        if alt is not None and not _overridden("SEMITRITON_FORCE_REFERENCE", alt, semiring):
            ka = kernel(alt, semiring, v[0])
            if ka is not None:
                if (op, semiring) in RACE:
                    return _race(op, semiring, (ka, k), v, args)
                return guarded(alt, semiring, ka, v, *args)
        return NotImplemented
    return guarded(op, semiring, k, v, *args)


def _shape_key(v, args) -> tuple:
    """Power-of-two buckets of the operands' sizes (rows flattened), dtypes and device."""
    from .kernels._common import bucket

    def dims(t):
        shape = getattr(t, "shape", None)
        if shape is None:
            return (type(t).__name__,)
        if len(shape) == 0:
            return (str(t.dtype),)
        rows = 1
        for d in shape[:-1]:
            rows *= int(d)
        return (bucket(rows), bucket(shape[-1]), str(t.dtype))

    return tuple(dims(c) for c in v) + tuple(dims(a) for a in args) + (str(v[0].device),)


class _Declined(Exception):
    pass


def _race(op: str, semiring: str, impls, v, args):
    """Run the faster of ``impls`` (first = the default) for this call's shape
    bucket: both are timed once per bucket by the kernels' autotuner (their
    outputs are discarded; an implementation that declines is skipped)."""
    from .kernels._common import autotune_enabled, choose

    if not autotune_enabled():
        return guarded(op, semiring, impls[0], v, *args)

    def launch(cfg):
        r = guarded(op, semiring, impls[cfg["impl"]], v, *args)
        if r is NotImplemented:
            raise _Declined
        return r

    key = ("dispatch", op, semiring) + _shape_key(v, args)
    cands = [{"impl": i, "name": getattr(f, "__name__", str(i))} for i, f in enumerate(impls)]
    best = choose(key, cands, launch)
    for c in [best] + [c for c in cands if c != best]:       # the chosen one may decline this exact shape
        try:
            return launch(c)
        except _Declined:
            pass
    return NotImplemented


_builtin_check = None


def is_builtin(sr) -> bool:
    """The kernels compute the built-in semirings' algebra: a user's semiring
    (even one named "real" or "abs", or subclassing a built-in one) runs its
    own methods (``semirings.is_builtin``, bound at the first call: the
    semiring modules import this one)."""
    global _builtin_check
    if _builtin_check is None:
        from .semirings import is_builtin as check
        _builtin_check = check
    return _builtin_check(sr)


def kernel_op(op: str):
    """Decorate a semiring method ``method(self, value, ...)``: try the Triton
    kernel for (op, self.name) first (built-in semirings only)."""

    def deco(method):
        @functools.wraps(method)
        def wrapper(self, v, *args):
            r = call(op, self.name, v, *args) if is_builtin(self) else NotImplemented
            return method(self, v, *args) if r is NotImplemented else r

        return wrapper

    return deco


def rmatmul_via_matmul(method):
    """``rmatmul(w, v) = matmul(vᵀ, wᵀ)ᵀ``: let the matmul kernel serve it."""

    @functools.wraps(method)
    def wrapper(self, w, v):
        if not is_builtin(self):
            return method(self, w, v)
        r = call("matmul", self.name, tuple(c.transpose(-1, -2) for c in v), w.transpose(-1, -2))
        if r is NotImplemented:
            return method(self, w, v)
        return tuple(c.transpose(-1, -2) for c in r)

    return wrapper
