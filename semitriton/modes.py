"""The grad and autocast modes semitriton's own computations run in,
whatever block the user calls it from.

- :func:`walk_mode`: a semiring pass (or a readout's arithmetic) records no
  autograd graph, runs outside inference mode (a graph recorded outside
  ``torch.inference_mode()`` can be walked inside one) and with autocast off
  (the pass computes in its own compute dtype, not the block's bf16).
- :func:`recording`: the few places that differentiate on purpose (an
  edge column read through autograd, an activation's derivative) record a
  graph even inside ``torch.no_grad()`` or ``torch.inference_mode()``.
- :func:`outside_inference_mode`: the readouts (paths, branches, reports)
  make no inference tensors, which autograd could not record later.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch


def _autocast_off(device_type: str):
    try:
        available = torch.amp.is_autocast_available(device_type)
    except Exception:                # an older torch, or a device type it does not know
        available = device_type in ("cpu", "cuda")
    return torch.autocast(device_type, enabled=False) if available else contextlib.nullcontext()


def _types(devices) -> list:
    return sorted({"cpu"} | {d if isinstance(d, str) else d.type for d in devices if d is not None})


@contextlib.contextmanager
def autocast_off(*devices):
    """Autocast off on the CPU and on each given device."""
    with contextlib.ExitStack() as stack:
        for t in _types(devices):
            stack.enter_context(_autocast_off(t))
        yield


def _read(getter, fallback):
    """A torch precision flag: ``getter()``, or ``fallback()`` where torch
    refuses the legacy read (a user who set the ``fp32_precision`` API; the
    two APIs may not be mixed)."""
    try:
        return getter()
    except RuntimeError:
        return fallback()


def _new_api(obj) -> str:
    value = getattr(obj, "fp32_precision", "none")
    return getattr(torch.backends, "fp32_precision", "none") if value == "none" else value


def tf32_settings() -> tuple:
    """(cuBLAS matmuls may use TF32, cuDNN convolutions may), read without
    tripping torch's check against mixing its two precision APIs."""
    mm = torch.backends.cuda.matmul
    conv = getattr(torch.backends.cudnn, "conv", torch.backends.cudnn)
    return (_read(lambda: mm.allow_tf32 or torch.get_float32_matmul_precision() != "highest",
                  lambda: _new_api(mm) == "tf32"),
            _read(lambda: torch.backends.cudnn.allow_tf32, lambda: _new_api(conv) == "tf32"))


_pass = threading.local()            # .tf32: outside a walk absent; inside None until read, then the value


def tf32_matmul_on() -> bool:
    """Whether cuBLAS may round fp32 matmul operands to TF32 (the user's
    ``allow_tf32`` or ``set_float32_matmul_precision``): the abs/entropy
    linears then take the Triton GEMM, whose "tf32x3" keeps fp32 accuracy,
    instead of the exp/cuBLAS/log path. semitriton leaves the flags alone
    (changing them inside a pass would trip torch's check against mixing its
    two precision APIs). Read once per pass (:func:`walk_mode`)."""
    cached = getattr(_pass, "tf32", _OUTSIDE)
    if cached is not None and cached is not _OUTSIDE:
        return cached
    value = tf32_settings()[0]
    if cached is None:
        _pass.tf32 = value
    return value


_OUTSIDE = object()


@contextlib.contextmanager
def walk_mode(*devices):
    """No autograd recording, no inference mode, autocast off on the CPU and
    on each given device (a ``torch.device``, a device type string, or None)."""
    prev = getattr(_pass, "tf32", _OUTSIDE)
    _pass.tf32 = None if prev is _OUTSIDE else prev
    try:
        with torch.inference_mode(False), torch.no_grad(), autocast_off(*devices):
            yield
    finally:
        if prev is _OUTSIDE:
            del _pass.tf32
        else:
            _pass.tf32 = prev


@contextlib.contextmanager
def recording(*devices):
    """Autograd records, also inside ``torch.no_grad()`` or
    ``torch.inference_mode()``; with ``devices``, autocast is off as in
    :func:`walk_mode` (without, it is left as it is)."""
    with torch.inference_mode(False), torch.enable_grad(), \
            (autocast_off(*devices) if devices else contextlib.nullcontext()):
        yield


def outside_inference_mode(fn):
    """Decorate a readout: it runs with inference mode off, so the tensors
    it makes (and caches) are ordinary ones that autograd may record, also
    when it is called inside ``torch.inference_mode()``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper
