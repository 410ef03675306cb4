"""Which module produced which autograd node.

``track(model)`` registers one forward hook per submodule that tags the
``grad_fn`` of each module output with (qualified name, class, call number,
the grad_fns of the module's inputs). Labels are resolved lazily, only when an
error message or a readout asks: the nodes between a module call's outputs and
its inputs belong to it, the innermost call winning. The forward cost is one
small dict update per module call.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

_TAG = "semitriton_modules"
_HANDLES = "_semitriton_track_handles"
_counter = itertools.count()


def _grad_fns(obj, acc: list, depth: int = 0) -> list:
    """Append the grad_fn of every tensor in ``obj`` (tensors, lists, tuples,
    dicts and transformers ModelOutputs, nested up to 4 levels) to ``acc``."""
    if isinstance(obj, torch.Tensor):
        g = obj.grad_fn
        if g is not None:
            acc.append(g)
    elif depth <= 4:
        if isinstance(obj, (list, tuple)):
            for o in obj:
                _grad_fns(o, acc, depth + 1)
        elif isinstance(obj, dict):
            for o in obj.values():
                _grad_fns(o, acc, depth + 1)
        elif hasattr(obj, "to_tuple"):          # transformers ModelOutput
            _grad_fns(obj.to_tuple(), acc, depth + 1)
    return acc


class _NameHook:
    """The forward hook of one tracked module: tags the grad_fns of its outputs
    (a class, not a closure, so that a tracked model pickles)."""

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __call__(self, module, args, kwargs, output):
        if not torch.is_grad_enabled():          # no graph is being recorded
            return None
        outs = _grad_fns(output, [])
        if not outs:
            return None
        ins = tuple(dict.fromkeys(_grad_fns(kwargs, _grad_fns(args, []))))
        in_ids = {id(g) for g in ins}
        seq = next(_counter)
        for k, gf in enumerate(dict.fromkeys(outs)):
            # A module that returns one of its inputs (dropout in eval, a pass-through)
            # would make the node reference itself through its metadata: a reference
            # cycle that keeps the whole graph alive until the cyclic GC runs.
            if id(gf) in in_ids:
                continue
            try:
                # k: which of the call's output nodes (a MoE block's (out, router logits))
                gf.metadata.setdefault(_TAG, []).append((self.qualname, type(module).__name__, seq, ins, k))
            except (AttributeError, RuntimeError):
                pass
        return None


def track(model: nn.Module, prefix: str = "") -> nn.Module:
    """Record module names for the autograd nodes of later forward passes
    (used by error messages and path readouts). Idempotent."""
    if getattr(model, _HANDLES, None):
        return model
    handles = []
    for name, mod in model.named_modules():
        qual = (prefix + "." + name if prefix and name else prefix or name) or type(model).__name__
        handles.append(mod.register_forward_hook(_NameHook(qual), with_kwargs=True))
    object.__setattr__(model, _HANDLES, handles)
    return model


def untrack(model: nn.Module) -> nn.Module:
    for h in getattr(model, _HANDLES, None) or []:
        h.remove()
    if hasattr(model, _HANDLES):
        object.__delattr__(model, _HANDLES)
    return model


def is_tracked(model: nn.Module) -> bool:
    return bool(getattr(model, _HANDLES, None))


class ModuleLabels:
    """Lazily computed node -> (qualified name, class name) map for one graph."""

    def __init__(self, root):
        self.root = root
        self._labels: dict | None = None

    def _compute(self) -> dict:
        # Collect the tagged calls in the graph.
        calls, seen, stack = [], set(), [self.root]
        while stack:
            n = stack.pop()
            if n is None or n in seen:
                continue
            seen.add(n)
            try:
                tags = n.metadata.get(_TAG)
            except (AttributeError, RuntimeError):
                tags = None
            if tags:
                for qual, cls, seq, ins, _ in tags:
                    calls.append((seq, qual, cls, n, ins))
            stack.extend(f for f, _ in n.next_functions)
        labels: dict = {}
        # Innermost calls finish first, so ascending call order labels inner modules first.
        for seq, qual, cls, out_node, ins in sorted(calls, key=lambda c: c[0]):
            stop = set(ins)
            todo = [out_node]
            visited = set()
            while todo:
                n = todo.pop()
                if n is None or n in visited or n in stop:
                    continue
                visited.add(n)
                labels.setdefault(n, (qual, cls))
                todo.extend(f for f, _ in n.next_functions)
        return labels

    def of(self, node):
        if self._labels is None:
            self._labels = self._compute()
        return self._labels.get(node)

    def describe(self, node) -> str:
        lab = self.of(node)
        if lab is None:
            return ""
        return f"{lab[0]} ({lab[1]})"
