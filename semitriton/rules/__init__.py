"""Backward rules: one function per autograd node type.

A rule receives a :class:`RuleContext` (the node, the semiring values of the
node's forward outputs, which inputs need a value) and returns one semiring
value per entry of ``node.next_functions`` (``None`` = no edges / not needed).
Rules only call the semiring's methods (``scale``, ``matmul``, ``softmax``,
``layer_norm``, ``attention`` ...), so every semiring and backend goes through
the same rule; the backend picks a Triton kernel or the torch reference inside
those methods.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..errors import GraphError, GraphFreedError
from ..semirings import Semiring, Value

RULES: dict[str, Callable[["RuleContext"], list]] = {}
#: rules for third-party custom autograd Functions, keyed by the Function
#: class's (module, name): a node name such as "GeLUFunctionBackward" alone
#: could belong to any library
FUNCTION_RULES: dict[tuple[str, str], Callable[["RuleContext"], list]] = {}


def rule(*names: str):
    """Register a rule for the named autograd node types."""

    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn

    return deco


def _freed(node, exc: Exception) -> GraphError:
    """The error for a saved tensor torch will not give back: freed by an
    earlier backward, or changed in place since the forward."""
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "inplace" in str(exc) or "in-place" in str(exc):
        return GraphError(
            f"a tensor that autograd node {type(node).__name__} saved was modified in place after the "
            "forward pass (e.g. a weight updated under torch.no_grad()), so its local derivatives are "
            f"gone; run the forward again after the change (torch said: {said})")
    return GraphFreedError(
        f"the saved tensors of autograd node {type(node).__name__} were already freed by an "
        "earlier backward pass; run the forward again, or pass retain_graph=True to the earlier "
        f"backward/torch.autograd.grad call (torch said: {said})")


class RuleContext:
    """What a rule sees of one node."""

    __slots__ = ("node", "grads", "needs", "sr", "dtype", "name", "lazy", "nexts")

    def __init__(self, node, grads: list[Optional[Value]], needs: list[bool], sr: Semiring,
                 dtype: torch.dtype, lazy: bool = False, nexts: Optional[tuple] = None):
        #: the walk accepts an EmbeddedValue from select/slice rules (semitriton.embedded)
        self.lazy = lazy
        self.node = node
        #: ``node.next_functions`` (the walk passes the graph's copy: each access builds a new tuple)
        self.nexts = node.next_functions if nexts is None else nexts
        self.grads = grads
        self.needs = needs
        self.sr = sr
        self.dtype = dtype
        self.name = type(node).__name__

    # -- values of the node's forward outputs ------------------------------------------
    def grad(self, i: int = 0) -> Value:
        """Value of forward output ``i`` (the semiring zero if nothing reached it)."""
        g = self.grads[i]
        if g is None:
            meta = self.node._input_metadata[i]
            g = self.sr.zero(tuple(meta.shape), self.dtype, meta.device)
        return g

    # -- saved tensors and shapes ------------------------------------------------------------
    def saved(self, attr: str, cast: bool = True):
        """``node._saved_<attr>``; floating tensors are cast to the compute dtype."""
        try:
            t = getattr(self.node, "_saved_" + attr)
        except RuntimeError as exc:
            raise _freed(self.node, exc) from exc
        if cast and isinstance(t, Tensor) and t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return _signed(t)

    def has_saved(self, attr: str) -> bool:
        return hasattr(self.node, "_saved_" + attr)

    def input_shape(self, i: int) -> Optional[tuple]:
        """Shape of the node's i-th forward input (from the next node's metadata)."""
        fn, nr = self.nexts[i]
        if fn is None:
            return None
        return tuple(fn._input_metadata[nr].shape)

    def input_device(self, i: int):
        fn, nr = self.nexts[i]
        return fn._input_metadata[nr].device

    def output_shape(self, i: int = 0) -> tuple:
        return tuple(self.node._input_metadata[i].shape)

    @property
    def n_inputs(self) -> int:
        return len(self.nexts)

    def tensor(self, x) -> Tensor:
        """A python scalar or tensor as a compute-dtype tensor on the values' device."""
        dev = self.node._input_metadata[0].device
        if isinstance(x, Tensor):
            if x.dim() == 0 and x.device != dev:    # a wrapped CPU scalar
                x = x.item()
            else:
                y = x.to(device=dev, dtype=self.dtype)
                # a Python number torch saved as a "wrapped number" stays one through
                # a .to() that changes nothing, and makes ``1.0 / y`` a float32
                # division in a float64 graph: a copy is an ordinary tensor
                return y.clone() if y is x and y.dim() == 0 else y
        return torch.full((), x, dtype=self.dtype, device=dev)   # a fill, not a host copy (CUDA graphs)


def zero_where(sr: Semiring, v: Value, mask: Tensor) -> Value:
    """``v`` with the semiring zero where ``mask`` (broadcast to v): no edge there."""
    z = sr.zero((), v[0].dtype, v[0].device)
    return tuple(torch.where(mask, zc, c) for c, zc in zip(v, z))


def _signed(x):
    """Saved int64 attributes such as dim=-1 come back as unsigned 2**64-1."""
    if isinstance(x, int) and not isinstance(x, bool) and x >= 2 ** 63:
        return x - 2 ** 64
    if isinstance(x, tuple):
        return tuple(_signed(e) for e in x)
    if isinstance(x, list):
        return [_signed(e) for e in x]
    return x


def rule_for(node) -> Optional[Callable]:
    name = type(node).__name__
    fn = RULES.get(name)
    if fn is not None:
        return fn
    fwd = getattr(node, "_forward_cls", None)
    if fwd is not None and hasattr(fwd, "semiring_backward"):
        return RULES["<custom>"]
    if fwd is not None:
        return FUNCTION_RULES.get((getattr(fwd, "__module__", ""), getattr(fwd, "__name__", "")))
    return None


# Register all rules.
from . import (attention, conv, custom, distance, elementwise, indexing, linalg, loss, norm,  # noqa: E402,F401
               pooling, reduction, sampling, shape, softmax)
