"""Helpers shared by the kernel modules: interpreter detection, launch-config
choice (a tiny on-device autotuner), and Triton signature strings for the
ahead-of-time compile specs.

Importable without torch (the triton-3.6 compile check runs in an environment
that has triton but no torch): torch is imported inside the functions that
need it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading

INT32_MAX = 2**31 - 1

#: the environment variables read so far in the running semiring pass (None outside one)
_pass_env: contextvars.ContextVar = contextvars.ContextVar("semitriton_pass_env", default=None)


def env(name: str, default: str) -> str:
    """``os.environ.get(name, default)``; inside :func:`env_snapshot` each name is
    read once per pass (a semiring pass asks for the same few settings at every
    op: ~1000 environment reads per pass of a 30-layer model otherwise)."""
    seen = _pass_env.get()
    if seen is None:
        return os.environ.get(name, default)
    value = seen.get(name, seen)                 # the dict itself marks "not read yet"
    if value is seen:
        value = seen[name] = os.environ.get(name)
    return default if value is None else value


@contextlib.contextmanager
def env_snapshot():
    """Settings read through :func:`env` keep their first value until the block ends."""
    token = _pass_env.set({})
    try:
        yield
    finally:
        _pass_env.reset(token)


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on the CPU through numpy)."""
    return env("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def row_warps(block: int) -> int:
    """num_warps of the one-row-per-program kernels for a row block of ``block``."""
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def finite_row_max(t):
    """max over the last dim with non-finite results (all -inf rows) read as 0:
    the neutral row shift, one op after the amax (torch tensor in, [R] out)."""
    import torch
    return torch.nan_to_num(torch.amax(t, dim=-1), nan=0.0, posinf=0.0, neginf=0.0).contiguous()


def broadcasts_to(shape, target) -> bool:
    """``shape`` broadcasts to ``target`` (every trailing-aligned dim is 1 or
    equal; plain ints, far cheaper than ``torch.broadcast_shapes``)."""
    return len(shape) <= len(target) and all(a == 1 or a == b for a, b in zip(reversed(shape), reversed(target)))


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index`` (cached)."""
    import torch
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def bucket(n: int) -> int:
    """Shape bucket for the config cache (powers of two)."""
    return next_pow2(max(1, int(n)))


def fits_int32(*tensors, per_batch: bool = False) -> bool:
    """Every element offset of every tensor fits int32 (the kernels use 32-bit
    in-tile offsets; the batch offset is 64-bit). ``per_batch``: of every
    ``t[b]`` (dim 0 is the batch, offset in 64 bits)."""
    skip = 1 if per_batch else 0
    for t in tensors:
        if t is None:
            continue
        if t.numel() <= INT32_MAX and t.is_contiguous():
            continue                      # span = numel - 1 (or less per batch)
        span = sum((s - 1) * abs(st) for s, st in zip(t.shape[skip:], t.stride()[skip:]) if s > 0)
        if span > INT32_MAX:
            return False
    return True


# ---- launch-config choice --------------------------------------------------------------
_best: dict = {}
#: key -> [(candidate config, measured ms or None if it failed)], for benchmarks
#: and reports (which candidate won, by how much)
timings: dict = {}
_lock = threading.Lock()
#: set while a CUDA graph is captured: timing candidates then would synchronise (not allowed)
frozen = False


def autotune_enabled() -> bool:
    return env("SEMITRITON_AUTOTUNE", "1") not in ("", "0") and not interpreting()


def choose(key, candidates, launch):
    """Pick a launch config for ``key`` among ``candidates`` (a list of dicts).

    Under the interpreter, with one candidate, or with SEMITRITON_AUTOTUNE=0 the
    first candidate is used. Otherwise each candidate is timed once per key
    (``launch(cfg)`` runs the kernel; outputs are overwritten, so repeated
    launches are harmless) and the fastest is remembered. Candidates that fail
    to compile or launch (e.g. out of shared memory) are skipped."""
    if len(candidates) == 1 or not autotune_enabled():
        return candidates[0]
    with _lock:
        if key in _best:
            return _best[key]
    if frozen:
        raise RuntimeError(f"autotuning {key[0]} inside a CUDA-graph capture (the eager pass before it "
                           "should have chosen its launch config)")
    import triton.testing
    best, best_ms = None, float("inf")
    measured = []
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda: launch(cfg), warmup=5, rep=20, return_mode="median")
        except Exception:  # noqa: BLE001 - e.g. OutOfResources for one config
            measured.append((dict(cfg), None))
            continue
        measured.append((dict(cfg), ms))
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        best = candidates[0]
    with _lock:
        _best[key] = best
        timings[key] = measured
    return best


# ---- dtypes ------------------------------------------------------------------------------
def sig_dtype(dtype) -> str:
    """Triton signature string of a torch dtype (``torch.float32 -> 'fp32'``)."""
    name = str(dtype).replace("torch.", "")
    return {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16",
            "int32": "i32", "int64": "i64"}[name]


def signature(arg_names, types: dict, constexprs: dict) -> dict:
    """A full ASTSource signature: every argument typed, constexpr ones as
    'constexpr' (the form triton 3.2+ expects; 3.6 and 3.9 agree)."""
    sig = {}
    for a in arg_names:
        if a in constexprs:
            sig[a] = "constexpr"
        else:
            sig[a] = types[a]
    return sig


def aot_entry(kernel, types: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3,
              divisible=None):
    """One ahead-of-time compile spec ``(kernel, signature, constexprs, options)``.

    ``types`` maps non-constexpr argument names to Triton types (unlisted ones are
    ``i32``); unit strides belong in ``constexprs`` (value 1), as Triton's runtime
    specialisation makes them. ``options`` holds num_warps/num_stages and
    ``_divisible_by_16``: the arguments assumed 16-divisible (by default all
    non-constexpr ones, the common case for transformer shapes), which the
    compile check turns into ``tt.divisibility`` attributes."""
    names = list(kernel.arg_names)
    full = {n: "i32" for n in names}
    full.update(types)
    sig = signature(names, full, constexprs)
    if divisible is None:
        divisible = [n for n in names if n not in constexprs]
    opts = {"num_warps": num_warps, "num_stages": num_stages, "_divisible_by_16": list(divisible)}
    return (kernel, sig, dict(constexprs), opts)
