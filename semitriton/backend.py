"""Backend switch: the torch reference rules or the Triton kernels.

``SEMITRITON_BACKEND=torch|triton|auto`` (default ``auto``) or the ``backend=``
argument of :func:`semitriton.grad`. ``auto`` uses Triton kernels for CUDA
tensors when Triton is importable, the torch reference otherwise. ``triton``
forces the kernels, also on CPU tensors when ``TRITON_INTERPRET=1`` (that is
how CI tests them). An op without a kernel for the semiring falls back to the
torch reference.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys

import torch

BACKENDS = ("auto", "torch", "triton")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("semitriton_backend", default="")


def resolve(backend: str | None = None) -> str:
    name = (backend or _current.get() or os.environ.get("SEMITRITON_BACKEND") or "auto").lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} "
                         "(argument backend= or environment variable SEMITRITON_BACKEND)")
    return name


@contextlib.contextmanager
def use(backend: str | None):
    """Run the enclosed semiring ops with ``backend``."""
    token = _current.set(resolve(backend))
    try:
        yield
    finally:
        _current.reset(token)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def _kernel_common():
    """The kernels' helper module if the kernels are loaded (never imports them)."""
    return sys.modules.get(__package__ + ".kernels._common")


def env(name: str, default: str) -> str:
    """An environment setting, read once per semiring pass once the kernels are
    loaded (:func:`pass_settings`), else now."""
    common = _kernel_common()
    return common.env(name, default) if common is not None else os.environ.get(name, default)


def pass_settings():
    """Context for one semiring pass: the settings the kernels and the dispatch
    read at every op (SEMITRITON_*, TRITON_INTERPRET) are read once for it.
    Nothing to do before the kernels are loaded."""
    common = _kernel_common()
    return common.env_snapshot() if common is not None else contextlib.nullcontext()


def interpreting() -> bool:
    return env("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    """Should an op on tensor ``t`` run its Triton kernel?"""
    name = resolve()
    if name == "torch" or not triton_available():
        return False
    if t.is_cuda:
        return True
    if name == "triton" and t.device.type == "cpu":
        if not interpreting():
            raise RuntimeError("the triton backend (backend='triton' or SEMITRITON_BACKEND=triton) on CPU "
                               "tensors needs TRITON_INTERPRET=1 (set before importing triton)")
        return True
    return False
