"""The generalised backward pass.

Walks the autograd graph that PyTorch recorded during an ordinary forward
pass, once, in reverse topological order; at each node a rule (``rules/``)
maps the semiring values of the node's forward outputs to values of its
forward inputs; values reaching a node from several consumers (fan-out) are
combined with the semiring's ⊕. Only nodes that lie on a path from ``output``
to one of ``inputs`` are visited. Nothing is freed or modified in the graph,
so one forward can be queried with several semirings.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections import deque
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import backend as _backend
from .embedded import accumulate, materialize
from .errors import GraphError, UnsupportedNodeError, user_stacklevel
from .modes import autocast_off, outside_inference_mode, recording, walk_mode
from .rules import RULES, RuleContext, rule_for
from .rules.shape import VIEW_NODES
from .rules.shape import view as view_rule
from .semirings import Max, Real, Semiring, Value, get
from .tracking import ModuleLabels

TensorOrTensors = Union[Tensor, Sequence[Tensor]]


def _as_tuple(inputs: TensorOrTensors) -> tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    inputs = tuple(inputs)
    if not inputs:
        raise ValueError("inputs is empty: pass the tensor(s) to read the statistics at")
    for i, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise TypeError(f"inputs[{i}] is a {type(t).__name__}, not a tensor")
        if not t.is_floating_point():
            raise TypeError(f"inputs[{i}] has dtype {t.dtype}: semiring statistics are defined for "
                            "floating-point tensors (complex and integer ones have no such graph here)")
    return inputs


def compute_dtype(output: Tensor, inputs: Sequence[Tensor]) -> torch.dtype:
    """float32 for half/bfloat16/float32 graphs, float64 when anything is float64."""
    dts = [output.dtype] + [t.dtype for t in inputs]
    return torch.float64 if torch.float64 in dts else torch.float32


def _edge_tables(relevant: set, nexts: dict) -> tuple[dict, dict, dict]:
    """For the relevant nodes (``nexts``: node -> its next_functions): edges[n] =
    (next_functions, needs) with needs[i] = input i is relevant, the in-degree
    of each node within the set, and consumers[(node, slot)] = [(consumer, input index)]."""
    edges: dict = {}
    indeg: dict = {}
    consumers: dict = {}
    for n in relevant:
        nf = nexts[n]
        needs = [f is not None and f in relevant for f, _ in nf]
        edges[n] = (nf, needs)
        for i, (f, nr) in enumerate(nf):
            if needs[i]:
                indeg[f] = indeg.get(f, 0) + 1
                consumers.setdefault((f, nr), []).append((n, i))
    return edges, indeg, consumers


#: nodes at the border of complex arithmetic (view_as_complex/view_as_real, polar, complex, real/imag)
_COMPLEX_NODES = frozenset(("ViewAsComplexBackward0", "ViewAsRealBackward0", "PolarBackward0", "ComplexBackward0",
                            "RealBackward0", "ImagBackward0"))


#: why an output has no graph to walk
_NO_GRAPH = ("does not require grad: it was computed without a gradient graph (torch.no_grad, "
             "torch.inference_mode, detached, or from inputs that do not require grad)")


class GradientGraph:
    """The part of the autograd graph between ``output`` and ``inputs``."""

    def __init__(self, output: Tensor, inputs: Sequence[Tensor], allow_unused: Optional[bool] = None):
        """``allow_unused``: True records inputs the output does not depend
        on in ``unused`` instead of raising; None (callers without that
        option) raises without mentioning it."""
        if not isinstance(output, Tensor):
            raise TypeError(f"output must be a tensor, got {type(output).__name__}")
        if not output.requires_grad:
            raise GraphError(f"output {_NO_GRAPH}")
        for i, t in enumerate(inputs):
            if not t.requires_grad:
                raise GraphError(f"inputs[{i}] (shape {tuple(t.shape)}) does not require grad, so it "
                                 "cannot be in the gradient graph; call .requires_grad_() on it before "
                                 "the forward pass")
        self.output = output
        self.inputs = tuple(inputs)
        self.allow_unused = allow_unused
        #: indices of inputs the output does not depend on (only with ``allow_unused``)
        self.unused: set = set()
        self.root = output.grad_fn
        self.labels = ModuleLabels(self.root)
        #: node -> number of forward outputs, view node -> its input's shape (filled by the walks)
        self.n_outputs: dict = {}
        self.view_shapes: dict = {}
        self._discover()

    def _discover(self):
        leaf_ids: dict = {}           # id(leaf) -> its input indices (a leaf may be passed twice)
        for i, t in enumerate(self.inputs):
            if t.grad_fn is None:
                leaf_ids.setdefault(id(t), []).append(i)
        targets: dict = {}            # node -> list of (slot, input index)
        # one depth-first pass: every node's next_functions (each access builds a new
        # tuple, so they are read once) and a post-order (inputs before consumers)
        nexts: dict = {}
        order = []
        stack = [(self.root, False)] if self.root is not None else []
        while stack:
            n, done = stack.pop()
            if done:
                order.append(n)
                continue
            if n in nexts:
                continue
            nf = nexts[n] = n.next_functions
            if leaf_ids and type(n).__name__ == "AccumulateGrad":
                for i in leaf_ids.get(id(n.variable), ()):
                    targets.setdefault(n, []).append((0, i))
            stack.append((n, True))
            stack.extend((f, False) for f, _ in nf if f is not None and f not in nexts)
        for i, t in enumerate(self.inputs):
            if t.grad_fn is not None and t.grad_fn in nexts:
                targets.setdefault(t.grad_fn, []).append((t.output_nr, i))
        found = {i for lst in targets.values() for _, i in lst}
        for i, t in enumerate(self.inputs):
            if i not in found and not (t is self.output):
                if self.allow_unused:
                    self.unused.add(i)
                    continue
                raise GraphError(f"inputs[{i}] (shape {tuple(t.shape)}) is not part of the gradient "
                                 "graph of output: output does not depend on it (or it was replaced "
                                 "by a copy, e.g. .to()/.detach(), before use)"
                                 + ("; allow_unused=True gives None for it" if self.allow_unused is False
                                    else ""))
        self.targets = targets
        # Relevance: a node matters iff it is a target or reaches one.
        relevant = set(targets)
        for n in order:
            if n not in relevant and any(f in relevant for f, _ in nexts[n] if f is not None):
                relevant.add(n)
        self.relevant = relevant
        #: the relevant nodes, inputs before consumers (a deterministic order: CUDA-graph signatures)
        self.order = [n for n in order if n in relevant]
        self._refuse_complex()
        #: relevant node -> (next_functions, needs), node -> in-degree, and
        #: (node, forward-output slot) -> [(consumer node, input index)]: the forward adjacency
        self.edges, self.indegree, self.consumers = _edge_tables(relevant, nexts)
        self.n_nodes = len(relevant)

    def _refuse_complex(self):
        """Complex values on a path (view_as_complex, polar, complex inputs:
        e.g. a rotary embedding written as a complex product) have no edges in
        the semirings, which are defined on real local derivatives: refused
        here, naming where, rather than walked into a wrong value or a
        reshape error."""
        for i, t in enumerate(self.inputs):
            if t.is_complex():
                raise GraphError(f"inputs[{i}] is complex ({t.dtype}); the semirings take real tensors: pass "
                                 "torch.view_as_real(...) of it instead")
        for n in self.order:
            name = type(n).__name__
            if name in _COMPLEX_NODES:
                where = self.module_of(n)
                raise GraphError(
                    f"autograd node {name}{f' (in module {where})' if where else ''} turns real values into "
                    "complex ones or back: complex values on a path have no semiring edges (the semirings are "
                    "defined on real local derivatives); write the computation in real arithmetic (a rotary "
                    "embedding as x·cos + rotate_half(x)·sin, as transformers' LLaMA does), or, for the complex "
                    "rotary embedding of LLaMA 4 or DeepSeek-V2, call semitriton.patch(model) before the forward")

    def target_of(self, i: int):
        """(node, slot) that holds input ``i``'s value."""
        for node, lst in self.targets.items():
            for slot, j in lst:
                if j == i:
                    return node, slot
        return None

    def module_of(self, node) -> str:
        return self.labels.describe(node)


#: what to do about nodes that hide a whole region of the forward behind one opaque backward
_OPAQUE_HINTS = {
    "CompiledFunctionBackward": (
        "it is a torch.compile'd region, whose backward is one compiled function with no per-op "
        "derivatives to read; run the model uncompiled (the module itself, not torch.compile(model))"),
    "CheckpointFunctionBackward": (
        "it is reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True), "
        "whose region keeps no graph until its own backward runs (torch.autograd.grad refuses it too); "
        "use use_reentrant=False (model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
        "{'use_reentrant': False})), which semitriton walks, or turn checkpointing off"),
    "MkldnnRnnLayerBackward0": (
        "the recurrent layer (nn.LSTM/nn.GRU/nn.RNN) ran as one fused oneDNN kernel, with no per-op "
        "derivatives to read; run the forward under torch.backends.mkldnn.flags(enabled=False), which "
        "records the cells as ordinary ops that semitriton walks"),
    "CudnnRnnBackward0": (
        "the recurrent layer (nn.LSTM/nn.GRU/nn.RNN) ran as one fused cuDNN kernel, with no per-op "
        "derivatives to read; run the recurrent part on the CPU under torch.backends.mkldnn.flags("
        "enabled=False), which records the cells as ordinary ops that semitriton walks"),
}


def _unsupported(graph: GradientGraph, node) -> UnsupportedNodeError:
    name = type(node).__name__
    where = graph.module_of(node)
    if where:
        loc = f" produced in module {where}"
    else:
        loc = (" (module unknown: call semitriton.track(model) or semitriton.patch(model) before the "
               "forward pass to have modules named)")
    hint = _OPAQUE_HINTS.get(name)
    if hint is not None:
        return UnsupportedNodeError(f"no semiring rule for autograd node {name}{loc}: {hint}")
    return UnsupportedNodeError(
        f"no semiring rule for autograd node {name}{loc}. semitriton does not skip nodes silently; "
        "replace the op, or register a rule with semitriton.rules.rule('" + name + "')")


class RuleProfile:
    """Per-rule time of semiring passes run inside ``with RuleProfile() as prof``:
    device time per autograd node type (CUDA events, no synchronisation inside
    the pass) and the wall time of each pass; ``python_overhead_ms`` is the
    part of the wall time when the device had no rule work to do."""

    _active: Optional["RuleProfile"] = None

    def __init__(self):
        self.events: list = []          # (node type, start event, end event) or (node type, seconds)
        self.walls: list = []
        self.calls: dict = {}

    def __enter__(self):
        RuleProfile._active = self
        return self

    def __exit__(self, *exc):
        RuleProfile._active = None
        return False

    def start(self, device):
        if device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, name, t0, device):
        self.calls[name] = self.calls.get(name, 0) + 1
        if device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append((name, t0, e))
        else:
            self.events.append((name, time.perf_counter() - t0))

    def summary(self) -> dict:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        per: dict = {}
        for ev in self.events:
            ms = ev[1].elapsed_time(ev[2]) if len(ev) == 3 else ev[1] * 1e3
            per[ev[0]] = per.get(ev[0], 0.0) + ms
        rules = sum(per.values())
        wall = sum(self.walls) * 1e3
        return {"wall_ms": wall, "rule_ms": rules, "python_overhead_ms": max(0.0, wall - rules),
                "per_rule_ms": dict(sorted(per.items(), key=lambda kv: -kv[1])), "calls": dict(self.calls)}


def _device_scope(t: Optional[Tensor]):
    """The CUDA device of ``t`` as the current device for a pass: Triton
    launches, CUDA-graph capture streams and synchronisations use the current
    device, which need not be the model's."""
    return torch.cuda.device(t.device) if isinstance(t, Tensor) and t.is_cuda else contextlib.nullcontext()


def _passes_nothing(grads) -> bool:
    """Whether no path passes through a node whose output values are
    ``grads``: every output is unreached or has no elements (a zero-size
    output has no scalar; its rule would reduce over an empty dim)."""
    return all(g is None or not g[0].numel() for g in grads)


def _walk(graph, seeds: dict, sr: Semiring, dtype: torch.dtype, keep=None, route=None,
          progress: bool = False, wrap=None) -> dict:
    """The generalised backward over ``graph`` (relevant nodes, in-degrees,
    targets) from ``seeds`` = {node: [value per forward-output slot]}. Returns
    {(node, slot): value} for the graph's targets. ``wrap(node)``: what the
    rules see as ``ctx.node`` (the CUDA-graph recorder's proxy)."""
    captured: dict = {}
    pending = {n: list(v) for n, v in seeds.items()}
    edges, n_outputs = graph.edges, graph.n_outputs
    view_shapes = graph.view_shapes
    indeg = dict(graph.indegree)
    queue = deque(n for n in seeds if indeg.get(n, 0) == 0)
    bar = _progress(graph.n_nodes) if progress else None
    while queue:
        node = queue.popleft()
        grads = [materialize(sr, g) for g in pending.pop(node)]
        if bar is not None:
            bar.update(1)
        if keep is not None:
            keep[node] = grads
        for slot, _ in graph.targets.get(node, ()):
            g = grads[slot]
            if g is None:
                meta = node._input_metadata[slot]
                g = sr.zero(tuple(meta.shape), dtype, meta.device)
            captured[(node, slot)] = g
        e = edges.get(node)
        if e is None:                     # a seed outside the relevant set (SubGraph starts)
            nf = node.next_functions
            e = (nf, [f is not None and f in graph.relevant for f, _ in nf])
        nexts, needs = e
        if not any(needs):
            continue
        prof = RuleProfile._active
        if prof is not None:
            dev = node._input_metadata[0].device if node._input_metadata else torch.device("cpu")
            t0 = prof.start(dev)
        name = type(node).__name__
        if name in VIEW_NODES and len(nexts) == 1 and grads[0] is not None and RULES.get(name) is view_rule:
            # the built-in view rule without its context (about half of a transformer graph's nodes)
            shape = view_shapes.get(node)
            if shape is None:
                f, nr = nexts[0]
                shape = view_shapes[node] = tuple(f._input_metadata[nr].shape)
            outs = (tuple(c.reshape(shape) for c in grads[0]),)
        elif (grads[0] is None or not grads[0][0].numel()) and _passes_nothing(grads):
            outs = [None] * len(nexts)
        else:
            fn = rule_for(node)
            if fn is None:
                raise _unsupported(graph, node)
            ctx = RuleContext(node if wrap is None else wrap(node), grads, needs, sr, dtype, lazy=True,
                              nexts=nexts)
            try:
                outs = fn(ctx)
            except UnsupportedNodeError as exc:
                where = graph.module_of(node)
                if where and "module" not in str(exc):
                    raise UnsupportedNodeError(f"{exc} (in module {where})") from None
                raise
            del ctx
            if len(outs) != len(nexts):
                raise RuntimeError(f"rule for {name} returned {len(outs)} values for {len(nexts)} inputs")
        if prof is not None:
            prof.stop(name, t0, dev)
        del grads
        for i, ((f, nr), need, val) in enumerate(zip(nexts, needs, outs)):
            if not need:
                continue
            if route is not None and val is not None:
                val = route(node, i, materialize(sr, val))
            slots = pending.get(f)
            if slots is None:
                n_out = n_outputs.get(f)
                if n_out is None:
                    n_out = n_outputs[f] = len(f._input_metadata)
                slots = pending[f] = [None] * n_out
            if val is not None:
                slots[nr] = accumulate(sr, slots[nr], val)
            indeg[f] -= 1
            if indeg[f] == 0:
                queue.append(f)
    if bar is not None:
        bar.close()
    return captured


def run(output: Tensor, inputs: TensorOrTensors, semiring: Union[str, Semiring] = "real",
        backend: Optional[str] = None, keep: Optional[dict] = None,
        progress: bool = False, route=None, graph: Optional[GradientGraph] = None,
        cuda_graph: bool = False, seed_weight: Optional[Tensor] = None) -> tuple[Optional[Value], ...]:
    """One semiring backward pass; returns the raw semiring value of each input.

    ``keep``: if a dict is given, every visited node's output values are stored
    in it as ``keep[node] = [value per forward-output slot]`` (path readouts use
    them as potentials). ``route(consumer, index, value) -> value``: a hook
    applied to each rule output before it is ⊕-accumulated. ``graph``: a
    prebuilt :class:`GradientGraph`. ``cuda_graph``: replay repeated passes
    from CUDA graphs (:mod:`semitriton.cuda_graph`; not with keep, route,
    progress or a RuleProfile). ``seed_weight``: an edge of that weight from
    each output element into the sink (``grad_outputs``; default 1). Inputs
    the graph was built to allow as unused (``GradientGraph(...,
    allow_unused=True)``) get None."""
    inputs = _as_tuple(inputs)
    sr = get(semiring)
    if graph is None:
        graph = GradientGraph(output, inputs)
    dtype = compute_dtype(output, inputs)
    results: list[Optional[Value]] = [None] * len(inputs)
    with _backend.use(backend), _backend.pass_settings(), walk_mode(output.device), _device_scope(output):
        def sink_value():
            if seed_weight is None:
                return sr.one(tuple(output.shape), dtype, output.device)
            return sr.edge(seed_weight.to(device=output.device, dtype=dtype))

        for i, t in enumerate(inputs):
            if t is output:
                results[i] = sink_value()
        if graph.root is not None:
            def seeds():
                seed = [None] * len(graph.root._input_metadata)
                seed[output.output_nr] = sink_value()
                return {graph.root: seed}

            t0 = time.perf_counter()
            if cuda_graph and keep is None and route is None and not progress and RuleProfile._active is None \
                    and seed_weight is None:
                from . import cuda_graph as _cuda_graph
                captured = _checked(lambda: _cuda_graph.walk(graph, seeds, sr, dtype, _walk, _backend.resolve()))
            else:
                captured = _checked(lambda: _walk(graph, seeds(), sr, dtype, keep, route, progress))
            if RuleProfile._active is not None:
                if output.is_cuda:
                    torch.cuda.synchronize(output.device)
                RuleProfile._active.walls.append(time.perf_counter() - t0)
            for node, lst in graph.targets.items():
                for slot, i in lst:
                    results[i] = captured.get((node, slot))
    _warn_if_nan(output)
    _warn_if_out_of_range(sr, results, dtype)
    return tuple(None if i in graph.unused else r if r is not None else sr.zero(tuple(t.shape), dtype, t.device)
                 for i, (r, t) in enumerate(zip(results, inputs)))


def _warn_if_out_of_range(sr: Semiring, results, dtype: torch.dtype) -> None:
    """The max semiring keeps (M+, M-) in linear space: every edge is non-zero,
    so a path product of exactly 0 is one that underflowed the compute dtype,
    and its M+ readout says 0 where the top path has a tiny non-zero product;
    one of ±inf (M+ = +inf or M- = -inf) overflowed it, or has an infinite
    edge (as torch's gradient would)."""
    if type(sr) is not Max:                 # a subclass may keep other values
        return
    counts = [torch.stack([(r[0] == 0).sum(), ((r[0] == math.inf) | (r[1] == -math.inf)).sum()])
              for r in results if r is not None]
    under, over = torch.stack(counts).sum(0).tolist() if counts else (0, 0)     # one synchronisation
    if under:
        warnings.warn(f"semitriton: {under} max-semiring readout(s) underflowed {dtype} and read 0: their top "
                      "path's product is smaller than the dtype's range; semiring='maxabs' keeps the magnitude in "
                      "log space (or run the model in float64)", RuntimeWarning, stacklevel=user_stacklevel())
    if over:
        warnings.warn(f"semitriton: {over} max-semiring value(s) read ±inf: a signed extreme path product "
                      f"overflowed {dtype} (or a path has an infinite edge); semiring='maxabs' keeps the magnitude "
                      "in log space (or run the model in float64)", RuntimeWarning, stacklevel=user_stacklevel())


def _checked(walk):
    """``walk()``, rerun once if a weight whose cached transforms it used was
    changed without a version bump (written through ``.data``) since they were
    computed: :mod:`semitriton.weight_cache` checks the pass's hits at its end,
    and the rerun computes the changed weights' transforms afresh (a rerun
    repeats the walk's ``route`` calls, progress bar and profile counts).
    ``SEMITRITON_CHECK_WEIGHTS=0`` skips the check (one matrix-vector product
    per cached weight per pass)."""
    from . import weight_cache

    try:
        if _backend.env("SEMITRITON_CHECK_WEIGHTS", "1") in ("", "0"):
            return walk()
        with weight_cache.checking() as hits:
            captured = walk()
        if hits and weight_cache.drop_stale(hits):
            captured = walk()
        return captured
    finally:
        weight_cache.sweep()            # the transforms of weights freed since (a deleted model) go now


def _warn_if_nan(output: Tensor) -> None:
    """A NaN in the output means a broken forward: the statistics of paths
    through it mean nothing, and the Triton kernels (which take max and sums
    over NaN-free terms) may return finite numbers for them where the torch
    reference returns NaN. (±inf is left alone: masked logits are -inf on
    purpose.) Checked after the pass is queued, so the check's
    synchronisation does not hold up the walk."""
    n = int(torch.isnan(output).sum()) if output.is_floating_point() else 0
    if n:
        warnings.warn(f"semitriton: the output holds {n} NaN value(s) of {output.numel()}: statistics of paths "
                      "through them are not meaningful (the forward pass is broken there)",
                      RuntimeWarning, stacklevel=user_stacklevel())


class SubGraph:
    """The nodes on paths from some start nodes down to one target (node, slot).

    ``positions``: {node: index} of a topological order of the enclosing
    graph (inputs first, as ``GradientGraph.order``): nodes placed before the
    target, or not in it, cannot lie on such a path and are not searched
    (without it, everything below the starts is)."""

    def __init__(self, starts, target, labels=None, positions: Optional[dict] = None):
        tnode, tslot = target
        self.targets = {tnode: [(tslot, 0)]}
        self.labels = labels
        floor = positions.get(tnode, -1) if positions is not None else None
        order, seen, stack = [], set(), [(n, False) for n in starts]
        while stack:
            n, done = stack.pop()
            if done:
                order.append(n)
                continue
            if n is None or n in seen:
                continue
            seen.add(n)
            stack.append((n, True))
            if floor is not None and n is not tnode and positions.get(n, -1) < floor:
                continue                                  # below the target: nothing here reaches it
            stack.extend((f, False) for f, _ in n.next_functions if f is not None and f not in seen)
        relevant = {tnode} if tnode in seen else set()
        for n in order:
            if n not in relevant and any(f in relevant for f, _ in n.next_functions if f is not None):
                relevant.add(n)
        self.relevant = relevant
        self.edges, self.indegree, _ = _edge_tables(relevant, {n: n.next_functions for n in relevant})
        self.n_outputs = {}
        self.view_shapes = {}
        self.n_nodes = len(relevant)

    def module_of(self, node) -> str:
        return self.labels.describe(node) if self.labels is not None else ""


def propagate(seeds: dict, target, semiring: Union[str, Semiring], dtype: torch.dtype,
              labels=None, backend: Optional[str] = None, positions: Optional[dict] = None) -> Value:
    """Pull semiring values given at some nodes' outputs (``seeds`` =
    {(node, slot): value}) down to the tensor ``target`` = (node, slot), through
    the recorded sub-graph between them. Used to split a value by branch.
    ``positions``: as for :class:`SubGraph` (bounds the search for that sub-graph)."""
    sr = get(semiring)
    by_node: dict = {}
    for (node, slot), v in seeds.items():
        by_node.setdefault(node, [None] * len(node._input_metadata))[slot] = v
    sub = SubGraph(list(by_node), target, labels, positions)
    seeds_in = {n: v for n, v in by_node.items() if n in sub.relevant}
    first = next(iter(seeds.values()), None)
    on = first[0] if isinstance(first, tuple) and first else None
    with _backend.use(backend), _backend.pass_settings(), walk_mode(getattr(on, "device", None)), \
            _device_scope(on):
        # seed nodes that lie below other seed nodes receive contributions too
        # not checked against .data writes: it splits the values of a pass over the same graph, which
        # was checked, and no user code runs in between
        captured = _walk(sub, seeds_in, sr, dtype) if seeds_in else {}
    v = captured.get(target)
    if v is None:
        meta = target[0]._input_metadata[target[1]]
        v = sr.zero(tuple(meta.shape), dtype, meta.device)
    return v


def _progress(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="semiring backward", unit="node", leave=False)


def _one_output(output, grad_outputs) -> tuple[Tensor, Optional[Tensor]]:
    """``output`` (a tensor or a sequence of them, as torch.autograd.grad
    takes) as one tensor and the sink-edge weights of its elements: a
    sequence is joined by weight-1 edges (its elements' sinks ⊕ together, as
    the gradients of several outputs add up)."""
    if not isinstance(output, (list, tuple, Tensor)):
        raise TypeError(f"output must be a tensor (or a sequence of tensors), got {type(output).__name__}")
    outs = list(output) if isinstance(output, (list, tuple)) else [output]
    if not outs:
        raise ValueError("outputs is empty: pass the tensor(s) to take the statistics of")
    for i, o in enumerate(outs):
        if not isinstance(o, Tensor):
            raise TypeError(f"outputs[{i}] is a {type(o).__name__}, not a tensor")
    if grad_outputs is None:
        gos = [None] * len(outs)
    elif isinstance(grad_outputs, Tensor):
        if len(outs) != 1:
            raise TypeError(f"grad_outputs: pass one tensor (or None) per output, {len(outs)} in all")
        gos = [grad_outputs]
    else:
        gos = list(grad_outputs)
        if len(gos) != len(outs):
            raise ValueError(f"grad_outputs has {len(gos)} entries for {len(outs)} output"
                             + ("s" if len(outs) != 1 else ""))
    if len(outs) == 1:
        return outs[0], None if gos[0] is None else _checked_weight(gos[0], outs[0], "grad_outputs")
    for i, o in enumerate(outs):
        if not o.requires_grad:
            raise GraphError(f"outputs[{i}] {_NO_GRAPH}")
    dtype = functools.reduce(torch.promote_types, [o.dtype for o in outs])
    with recording():                   # the join is part of the graph, also inside torch.no_grad()
        joined = torch.cat([o.reshape(-1).to(dtype) for o in outs])
    if all(g is None for g in gos):
        return joined, None
    return joined, torch.cat([torch.ones(o.numel(), dtype=dtype, device=joined.device) if g is None
                              else _checked_weight(g, o, f"grad_outputs[{i}]").reshape(-1).to(joined.device, dtype)
                              for i, (o, g) in enumerate(zip(outs, gos))])


def _checked_weight(g, output: Tensor, what: str) -> Tensor:
    if not isinstance(g, Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(g).__name__}")
    if tuple(g.shape) != tuple(output.shape):
        raise ValueError(f"{what} has shape {tuple(g.shape)}, the output has {tuple(output.shape)}: "
                         "it weights each output element, so the shapes must match")
    if not g.is_floating_point():
        raise TypeError(f"{what} has dtype {g.dtype}; pass a floating-point tensor")
    return g.detach()


@outside_inference_mode
def grad_values(output: Union[Tensor, Sequence[Tensor]], inputs: TensorOrTensors,
                semiring: Union[str, Semiring] = "real", backend: Optional[str] = None, progress: bool = False,
                cuda_graph: bool = False, *, grad_outputs: Optional[TensorOrTensors] = None,
                allow_unused: bool = False) -> tuple[Optional[Value], ...]:
    """Raw semiring values (tuples of component tensors), one per input
    (``cuda_graph``, ``grad_outputs``, ``allow_unused``: as in :func:`grad`)."""
    output, weight = _one_output(output, grad_outputs)
    inputs = _as_tuple(inputs)
    graph = GradientGraph(output, inputs, allow_unused=allow_unused)
    return run(output, inputs, semiring, backend=backend, progress=progress, cuda_graph=cuda_graph,
               graph=graph, seed_weight=weight)


def _native_real(output: Tensor, inputs: tuple, weight: Optional[Tensor] = None,
                 allow_unused: bool = False) -> Optional[tuple]:
    """The real semiring through PyTorch's own autograd engine (it *is* the
    gradient), keeping the graph. None when the walk is needed instead:
    half-precision graphs (statistics are accumulated in float32 here)."""
    dtype = compute_dtype(output, inputs)
    if any(t.dtype != dtype for t in inputs) or output.dtype != dtype:
        return None
    if not output.requires_grad:
        return None                       # let the walk raise its error
    for i, t in enumerate(inputs):
        if not t.requires_grad:
            raise GraphError(f"inputs[{i}] (shape {tuple(t.shape)}) does not require grad, so it cannot be in "
                             "the gradient graph; call .requires_grad_() on it before the forward pass")
    try:
        go = torch.ones_like(output) if weight is None else weight.to(device=output.device, dtype=output.dtype)
        with autocast_off(output.device):          # torch's backward follows an enclosing autocast block
            grads = torch.autograd.grad(output, inputs, grad_outputs=go, retain_graph=True, allow_unused=True)
    except RuntimeError as exc:
        if "second time" in str(exc) or "freed" in str(exc):
            from .errors import GraphFreedError
            raise GraphFreedError("the autograd graph of output was already freed by an earlier backward pass; "
                                  "run the forward again, or pass retain_graph=True to the earlier backward") \
                from None
        if "inplace" in str(exc) or "in-place" in str(exc):
            said = str(exc).strip().splitlines()[0]
            raise GraphError("a tensor saved for the backward pass was modified in place after the forward "
                             "pass (e.g. a weight updated under torch.no_grad()), so its local derivatives are "
                             f"gone; run the forward again after the change (torch said: {said})") from None
        raise
    if allow_unused:
        return grads
    for i, g in enumerate(grads):
        if g is None and inputs[i] is not output:
            raise GraphError(f"inputs[{i}] (shape {tuple(inputs[i].shape)}) is not part of the gradient graph "
                             "of output: output does not depend on it (or it was replaced by a copy, e.g. "
                             ".to()/.detach(), before use); allow_unused=True gives None for it")
    return grads


@outside_inference_mode
def grad(output: Union[Tensor, Sequence[Tensor]], inputs: TensorOrTensors, semiring: Union[str, Semiring] = "real",
         backend: Optional[str] = None, progress: bool = False,
         log_space: bool = False, fast_real: bool = True, cuda_graph: bool = False, *,
         grad_outputs: Optional[TensorOrTensors] = None, allow_unused: bool = False,
         retain_graph: Optional[bool] = None) -> tuple[Optional[Tensor], ...]:
    """Generalised ``torch.autograd.grad``: one semiring backward pass from
    ``output`` to each of ``inputs``; returns the semiring's readout per input
    (same shape as the input).

    * ``real``: the gradient (equals ``torch.autograd.grad`` with ones as grad_outputs);
    * ``abs``: Z = Σ_paths Π|w|;
    * ``max``: M+, the largest signed path product;
    * ``maxabs``: the largest |path product|;
    * ``entropy``: H (nats) of the path distribution p ∝ Π|w|.

    A non-scalar ``output`` is joined to a sink by weight-1 edges (so a batch of
    independent examples gets each example's statistics in one pass). The graph
    is left intact. Nodes with no path to ``output`` read the semiring zero
    (0, 0, -inf, 0; entropy 0).

    Readouts have the compute dtype (float32 for float32/bfloat16/float16
    graphs, float64 for float64 ones), except abs and maxabs, which are kept
    in log space inside and returned in float64 (Z of a 12-layer model is far
    beyond float32's range); ``log_space=True`` returns their logarithms in
    the compute dtype instead. ``backend``: "auto" | "torch" | "triton".

    ``real`` on float32/float64 graphs runs PyTorch's autograd engine (the
    gradient is the real semiring's value; on bfloat16/float16 graphs it is
    the float32 walk, which differs from torch's low-precision backward by
    that dtype's rounding), which runs the tensors' and
    modules' backward hooks as ``torch.autograd.grad`` does; ``fast_real=False``
    forces the semiring walk (the tests compare the two), which, like every
    other semiring, reads the recorded graph and runs no hooks.

    ``cuda_graph=True`` (CUDA models, repeated calls on same-shaped inputs):
    the pass is captured into a CUDA graph on the second call and replayed
    on later ones, skipping the host's per-node work; each replay first
    copies this forward's saved activations into the graph's static buffers,
    and is used only when every other value the rules read (shapes, indices,
    flags, parameter addresses) equals the captured one, else the pass runs
    eagerly (:mod:`semitriton.cuda_graph`). A replay waits for the device
    before returning.

    As in ``torch.autograd.grad``: ``output`` may be a sequence of tensors
    (their sinks ⊕ together, as gradients of several outputs add up);
    ``grad_outputs`` (one tensor per output, its shape) puts an edge of that
    weight between each output element and the sink (a weighted sum of
    outputs: for ``real`` the vector-Jacobian product); ``allow_unused=True``
    returns None for an input the output does not depend on instead of
    raising. ``retain_graph`` is accepted for drop-in use: the graph is
    always kept."""
    sr = get(semiring)
    _backend.resolve(backend)                     # reject an unknown backend name early
    output, weight = _one_output(output, grad_outputs)
    if log_space and not hasattr(sr, "log_readout"):
        raise ValueError(f"log_space=True: the {sr.name} semiring has no log-space readout "
                         "(abs and maxabs have)")
    inputs = _as_tuple(inputs)
    if fast_real and type(sr) is Real:
        fast = _native_real(output, inputs, weight, allow_unused)
        if fast is not None:
            return fast
    graph = GradientGraph(output, inputs, allow_unused=allow_unused)
    vals = run(output, inputs, sr, backend=backend, progress=progress, cuda_graph=cuda_graph, graph=graph,
               seed_weight=weight)
    if log_space:
        return tuple(None if v is None else sr.log_readout(v) for v in vals)
    outs = tuple(None if v is None else sr.readout(v) for v in vals)
    if hasattr(sr, "log_readout"):
        for v, r in zip(vals, outs):
            if v is None:
                continue
            finite = torch.isfinite(v[0])
            over, under = torch.stack([(torch.isinf(r) & finite).any(), ((r == 0) & finite).any()]).tolist()
            if over:
                raise FloatingPointError(
                    f"the {sr.name} readout overflows float64 (log value up to "
                    f"{float(v[0][finite].max()):.1f}); call with log_space=True")
            if under:
                warnings.warn(f"semitriton: the {sr.name} readout underflows float64 and reads 0 where a path "
                              f"exists (log value down to {float(v[0][finite].min()):.1f}); call with "
                              "log_space=True", RuntimeWarning, stacklevel=user_stacklevel())
    return outs
