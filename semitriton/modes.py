"""The grad and autocast modes semitriton's own computations run in,
whatever block the user calls it from.

- :func:`walk_mode`: a semiring pass (or a readout's arithmetic) records no
  autograd graph, runs outside inference mode (a graph recorded outside
  ``torch.inference_mode()`` can be walked inside one), with autocast off
  (the pass computes in its own compute dtype, not the block's bf16) and,
  on CUDA, with TF32 off for cuBLAS matmuls and cuDNN convolutions
  (:func:`full_fp32_math`: the statistics keep fp32 accuracy whatever the
  user's training code set).
- :func:`recording`: the few places that differentiate on purpose (an
  edge column read through autograd, an activation's derivative) record a
  graph even inside ``torch.no_grad()`` or ``torch.inference_mode()``.
- :func:`outside_inference_mode`: the readouts (paths, branches, reports)
  make no inference tensors, which autograd could not record later.
"""

from __future__ import annotations

import contextlib
import functools

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


def _tf32_switches() -> list:
    """(object, attribute, its full-fp32 value) of torch's TF32 switches for
    cuBLAS matmuls and cuDNN convolutions: the ``fp32_precision`` API where
    torch has it (reading the legacy ``allow_tf32`` after a user set the new
    one raises), else ``allow_tf32``."""
    backends = torch.backends
    if hasattr(backends.cuda.matmul, "fp32_precision"):
        conv = getattr(backends.cudnn, "conv", None)
        return [(o, "fp32_precision", "ieee") for o in (backends.cuda.matmul, conv)
                if o is not None and hasattr(o, "fp32_precision")]
    return [(backends.cuda.matmul, "allow_tf32", False), (backends.cudnn, "allow_tf32", False)]


def tf32_settings() -> tuple:
    """The current values of :func:`_tf32_switches` (for a signature)."""
    return tuple(getattr(o, a) for o, a, _ in _tf32_switches())


@contextlib.contextmanager
def full_fp32_math(*devices):
    """TF32 off for cuBLAS matmuls and cuDNN convolutions while a pass runs
    on a CUDA device among ``devices`` (a user's ``allow_tf32 = True`` or
    ``set_float32_matmul_precision("high")`` would round fp32 operands to
    10-bit mantissas: ~1e-3 relative error in the statistics); restored
    afterwards."""
    if "cuda" not in _types(devices):
        yield
        return
    changed = []
    try:
        for obj, attr, value in _tf32_switches():
            old = getattr(obj, attr)
            if old != value:
                setattr(obj, attr, value)
                changed.append((obj, attr, old))
        yield
    finally:
        for obj, attr, old in reversed(changed):
            setattr(obj, attr, old)


@contextlib.contextmanager
def walk_mode(*devices):
    """No autograd recording, no inference mode, autocast off on the CPU and
    on each given device (a ``torch.device``, a device type string, or None),
    and TF32 off on CUDA (:func:`full_fp32_math`)."""
    with torch.inference_mode(False), torch.no_grad(), autocast_off(*devices), full_fp32_math(*devices):
        yield


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
