"""Semirings: small classes with zero/one/plus/times/edge/readout.

Built-in, by name: ``real``, ``abs``, ``max``, ``maxabs``, ``entropy`` (the
definitions are in the README's "Semirings" table). A user-defined semiring subclasses
:class:`Semiring`, implements the algebra on tuples of tensors, and runs on the
torch backend through the generic contractions of the base class.
"""

from __future__ import annotations

import torch

from .abs import Abs
from .base import Semiring, Value, attention_probs
from .entropy import Entropy
from .max import Max
from .maxabs import MaxAbs
from .real import Real

BUILTIN: dict[str, Semiring] = {s.name: s for s in (Real(), Abs(), Max(), MaxAbs(), Entropy())}
NAMES: tuple[str, ...] = tuple(BUILTIN)
_BUILTIN_TYPES = frozenset(type(s) for s in BUILTIN.values())


def is_builtin(sr: Semiring) -> bool:
    """An instance of a built-in semiring class (the algebra the kernels
    compute); a user's class, whatever its name or base, is not."""
    return type(sr) in _BUILTIN_TYPES


_REQUIRED = ("zero", "one", "plus", "times", "edge", "readout")
_checked: set = set()


def _check_custom(sr: Semiring) -> None:
    """A user's semiring defines the algebra and returns tuples of tensors
    (checked once per class, on a one-element probe; a semiring that cannot
    take the probe is left to the walk)."""
    cls = type(sr)
    if cls in _checked:
        return
    missing = [m for m in _REQUIRED if getattr(cls, m) is getattr(Semiring, m)]
    if missing:
        raise TypeError(f"semiring {cls.__name__} does not define {', '.join(missing)}: a Semiring subclass "
                        f"implements {', '.join(_REQUIRED)} on tuples of tensors")

    def tuple_of_tensors(v) -> bool:
        return isinstance(v, (tuple, list)) and all(isinstance(c, torch.Tensor) for c in v)

    def one():
        return sr.one((1,), torch.float32, torch.device("cpu"))

    for what, make in (("zero", lambda: sr.zero((1,), torch.float32, torch.device("cpu"))), ("one", one),
                       ("edge", lambda: sr.edge(torch.ones(1))), ("plus", lambda: sr.plus(one(), one())),
                       ("times", lambda: sr.times(one(), one()))):
        try:
            v = make()
        except Exception:          # a semiring that cannot take the probe is left to the walk
            continue
        if not tuple_of_tensors(v):
            raise TypeError(f"{cls.__name__}.{what} must return a tuple of tensors (one per value "
                            f"component), got {type(v).__name__}")
    _checked.add(cls)


def get(semiring: str | Semiring) -> Semiring:
    """Resolve a semiring name or object."""
    if isinstance(semiring, Semiring):
        if not is_builtin(semiring):
            _check_custom(semiring)
        return semiring
    if isinstance(semiring, type) and issubclass(semiring, Semiring):
        raise TypeError(f"semiring={semiring.__name__} is a class: pass an instance, {semiring.__name__}()")
    if isinstance(semiring, str) and semiring.lower() in BUILTIN:
        return BUILTIN[semiring.lower()]
    raise ValueError(f"unknown semiring {semiring!r}; choose one of {', '.join(NAMES)} "
                     "or pass a semitriton.semirings.Semiring instance")


__all__ = ["Semiring", "Value", "Real", "Abs", "Max", "MaxAbs", "Entropy", "BUILTIN", "NAMES",
           "get", "is_builtin", "attention_probs"]
