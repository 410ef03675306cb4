"""Exceptions raised by semitriton; each message names the problem."""

from __future__ import annotations

import os
import sys


class SemitritonError(RuntimeError):
    """Base class of semitriton's errors."""


class UnsupportedNodeError(SemitritonError):
    """An autograd node type has no semiring rule."""


class GraphError(SemitritonError):
    """The output/inputs do not form a usable gradient graph."""


class GraphFreedError(GraphError):
    """The graph's saved tensors were freed by an earlier backward."""


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel could not be built or launched on this GPU (out of
    shared memory or registers, a ptxas or compile failure): the torch
    reference computed that op instead (same numbers, slower)."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` call that points the warning
    at the user's line: the first frame outside semitriton, however many of
    its own frames (decorators included) lie between."""
    frame, level = sys._getframe(1), 1          # the frame that warns is stacklevel 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
