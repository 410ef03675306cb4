"""Semirings: small classes with zero/one/plus/times/edge/readout.

Built-in, by name: ``real``, ``abs``, ``max``, ``maxabs``, ``entropy`` (the
definitions are in DESIGN.md section 1). A user-defined semiring subclasses
:class:`Semiring`, implements the algebra on tuples of tensors, and runs on the
torch backend through the generic contractions of the base class.
"""

from __future__ import annotations

from .abs import Abs
from .base import Semiring, Value, attention_probs
from .entropy import Entropy
from .max import Max
from .maxabs import MaxAbs
from .real import Real

BUILTIN: dict[str, Semiring] = {s.name: s for s in (Real(), Abs(), Max(), MaxAbs(), Entropy())}
NAMES: tuple[str, ...] = tuple(BUILTIN)


def get(semiring: str | Semiring) -> Semiring:
    """Resolve a semiring name or object."""
    if isinstance(semiring, Semiring):
        return semiring
    if isinstance(semiring, str) and semiring.lower() in BUILTIN:
        return BUILTIN[semiring.lower()]
    raise ValueError(f"unknown semiring {semiring!r}; choose one of {', '.join(NAMES)} "
                     "or pass a semitriton.semirings.Semiring instance")


__all__ = ["Semiring", "Value", "Real", "Abs", "Max", "MaxAbs", "Entropy", "BUILTIN", "NAMES",
           "get", "attention_probs"]
