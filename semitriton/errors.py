"""Exceptions raised by semitriton; each message names the problem."""

from __future__ import annotations


class SemitritonError(RuntimeError):
    """Base class of semitriton's errors."""


class UnsupportedNodeError(SemitritonError):
    """An autograd node type has no semiring rule."""


class GraphError(SemitritonError):
    """The output/inputs do not form a usable gradient graph."""


class GraphFreedError(GraphError):
    """The graph's saved tensors were freed by an earlier backward."""
