"""CUDA-graph replay of semiring passes (``semitriton.grad(..., cuda_graph=True)``).

A pass over a CUDA model launches one to a few kernels per autograd node, and
on small or medium models the host (the walk, the rules, the launchers) takes
longer than the device. Repeated passes over graphs of the same structure
(the same model on same-shaped batches) can skip that host work: the pass is
captured once into a CUDA graph and replayed.

What a captured pass reads: everything the rules read from the autograd
nodes is noted during recording (the rules see each node through a proxy).
Saved activations are new tensors every forward, at addresses the caching
allocator does not keep (measured on an H100, 2026-11-27: consecutive
BERT/SmolLM2 forwards rarely matched), so the graph reads them from static
buffers, and each replay first copies the new forward's tensors into them
(one ``_foreach_copy_``). Parameters (and views of them) are read in place
and checked by address. Every other attribute (indices, dims, scales, flags,
shapes, strides, dtypes) must equal the captured one, else the call runs
eagerly. The check is complete by construction: a capture is refused if any
kernel reads a tensor that is neither produced inside the pass, nor a static
buffer, nor a noted parameter (torch ops and Triton launches are watched),
or if an op would wait for the device (a device value read into Python,
``nonzero``, boolean-mask indexing: stopped before it runs).
Weights are read as saved (no cached |W| inside a graph), so a weight changed
in place between calls is seen by the next replay. The static buffers cost
memory, about one more copy of the activations the rules read, per kept graph,
and each graph holds a private memory pool for what the pass allocates: at
most ``MAX_GRAPHS`` graphs are kept, within ``MAX_GRAPH_BYTES`` of buffers and
pools (a quarter of the device's memory by default), the least recently
replayed freed first.

Policy per graph signature (structure, shapes, semiring, dtype, backend,
``SEMITRITON_*`` settings, the rules in use, torch's matmul-precision, TF32,
determinism and autocast settings): the first call runs eagerly and records what the
rules read; the next call with the same reads is captured (the eager call
compiled and autotuned every kernel it needs) and later ones replay it; a
mismatch (or a replay the live-row check invalidates) runs eagerly and records
anew; after ``MAX_MISSES`` of them in a row the signature stays eager. Replays end with one synchronisation (the
live-row check of language-model heads, below) and return copies of the
results. A capture that fails leaves that signature eager, with a warning
naming the reason. Only the built-in semirings are captured (a user's
semiring may hold state no signature can compare). Passes with
``cuda_graph=True`` from several threads run one at a time; recording and
capturing set process-wide state (the kernels' autotuner is frozen during a
capture), so other semiring passes must not run in other threads meanwhile.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from .errors import user_stacklevel

#: mismatches (or invalidated replays) in a row after which a signature is left to the eager walk
MAX_MISSES = 3

_ABSENT = ("absent",)


class NotCapturable(RuntimeError):
    """A pass that cannot be captured (the message says why)."""


# ---- what the rules read --------------------------------------------------------------------
def fingerprint(v):
    """A comparable summary of a node attribute: tensors by shape, strides,
    dtype and device (their contents are read at replay time; a CPU scalar by
    value); containers element-wise; plain values by value; methods by name,
    functions and classes by identity; input metadata by shape, dtype, device."""
    if isinstance(v, Tensor):
        if v.device.type == "cpu" and v.dim() == 0:   # wrapped scalars: used by value
            return ("C", v.item(), v.dtype)
        return ("T", v.shape, v.stride(), v.dtype, v.device)
    if isinstance(v, (tuple, list)):
        return ("S", tuple(fingerprint(e) for e in v))
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device, torch.Size)):
        return ("V", v)
    if isinstance(v, (types.MethodType, types.BuiltinMethodType)):     # bound to this node: a new object each read
        return ("F", getattr(v, "__qualname__", getattr(v, "__name__", "?")))
    if isinstance(v, functools.partial):      # e.g. a patched activation's function: a new partial each forward
        return ("P", fingerprint(v.func), fingerprint(v.args), fingerprint(sorted(v.keywords.items())))
    if isinstance(v, type) or callable(v):
        return ("I", id(v))
    if hasattr(v, "shape") and hasattr(v, "dtype") and hasattr(v, "device"):   # autograd _InputMetadata
        return ("M", tuple(v.shape), v.dtype, v.device)
    raise NotCapturable(f"a rule read a node attribute of type {type(v).__name__}, which the replay check "
                        "cannot compare")


def _tensors(v, out: list) -> list:
    if isinstance(v, Tensor):
        out.append(v)
    elif isinstance(v, (tuple, list)):
        for e in v:
            _tensors(e, out)
    return out


def _storage_ptr(t: Tensor) -> int:
    """Address of ``t``'s storage (without building the storage object): the
    one identity of a storage in this module."""
    return t.data_ptr() - t.storage_offset() * t.element_size()


def _device_tensors(v) -> list:
    """The tensors of ``v`` that a kernel reads (not the CPU scalars compared by value)."""
    return [t for t in _tensors(v, []) if not (t.device.type == "cpu" and t.dim() == 0)]


def _is_parameter(t: Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


def _substitute(v, it):
    """``v`` with its device tensors replaced, in order, by the items of ``it``."""
    if isinstance(v, Tensor):
        return v if v.device.type == "cpu" and v.dim() == 0 else next(it)
    if isinstance(v, (tuple, list)):
        return type(v)(_substitute(e, it) for e in v)
    return v


_PROXY_TYPES: dict = {}


class _NodeProxy:
    """An autograd node as the rules see it while a pass is recorded: every
    attribute read is forwarded to the node and noted (inside a capture,
    saved activations are replaced by the static buffers)."""

    __slots__ = ("_node", "_pos", "_rec")

    def __getattr__(self, attr):
        node = object.__getattribute__(self, "_node")
        rec = object.__getattribute__(self, "_rec")
        pos = object.__getattribute__(self, "_pos")
        v = rec.substitute.get((pos, attr))
        if v is None:
            try:
                with _disable_current_modes():     # unpacking a saved output may detach: not a kernel read
                    v = getattr(node, attr)
            except AttributeError:
                rec.note(pos, attr, None, absent=True)
                raise
        rec.note(pos, attr, v)
        return v


def _proxy_type(cls) -> type:
    """A proxy class with the node class's name (rules dispatch on ``type(node).__name__``)."""
    t = _PROXY_TYPES.get(cls)
    if t is None:
        t = _PROXY_TYPES[cls] = type(cls.__name__, (_NodeProxy,), {"__slots__": ()})
    return t


class Recorder:
    """Notes the node attributes a pass reads: {(position in ``graph.order``,
    attribute): fingerprint}, and per read the addresses of
    its device tensors and which are parameters; also the live-row decisions
    of language-model heads. ``substitute``: {(position, attribute): value}
    the rules get instead (a capture's static buffers)."""

    def __init__(self, graph, capturing: bool = False):
        self.pos = {n: i for i, n in enumerate(graph.order)}
        self.reads: dict = {}
        self.tensors: dict = {}        # (pos, attr) -> ((data_ptr, is parameter), ...)
        self.read_storages: set = set()
        self.capturing = capturing
        self.substitute: dict = {}
        self.hints: list = []          # live_rows_matmul decisions (row counts or None), in call order
        self.hint_i = 0
        self.flag: Optional[Tensor] = None     # set while capturing: more live rows than recorded
        self.current = "(engine)"              # the node type whose rule runs
        self.quiet = False                     # an eager-only synchronisation (live rows) is running

    def proxy(self, node):
        self.current = type(node).__name__
        p = object.__new__(_proxy_type(type(node)))
        object.__setattr__(p, "_node", node)
        object.__setattr__(p, "_pos", self.pos[node])
        object.__setattr__(p, "_rec", self)
        return p

    def note(self, pos: int, attr: str, value, absent: bool = False) -> None:
        for t in _tensors(value, []):
            self.read_storages.add(_storage_ptr(t))
        if (pos, attr) not in self.reads:
            with _disable_current_modes():            # not through the closure check's mode
                try:
                    fp = _ABSENT if absent else fingerprint(value)
                except NotCapturable as exc:          # the eager pass goes on; no replay will match
                    fp = ("X", str(exc))
                self.reads[(pos, attr)] = fp
                self.tensors[(pos, attr)] = tuple((t.data_ptr(), _is_parameter(t))
                                                  for t in _device_tensors(value))


class _Mismatch(Exception):
    """A read differs from the recorded one."""


def _read_values(graph, reads: dict):
    """Yields ((position, attribute), value) for each recorded read of
    ``graph``'s nodes (absent ones skipped); raises ``_Mismatch`` at the first
    whose fingerprint differs from the recorded one."""
    order = graph.order
    try:
        for key, fp in reads.items():
            try:
                v = getattr(order[key[0]], key[1])
            except AttributeError:
                if fp is not _ABSENT:
                    raise _Mismatch() from None
                continue
            if fp is _ABSENT or fp[0] == "X" or fingerprint(v) != fp:
                raise _Mismatch()
            yield key, v
    except (NotCapturable, RuntimeError):   # uncomparable, or freed: the eager pass says what is wrong
        raise _Mismatch() from None


def _values(graph, reads: dict) -> Optional[dict]:
    """{(position, attribute): value} read from ``graph``'s nodes when every
    fingerprint equals the recorded one, else None."""
    try:
        return dict(_read_values(graph, reads))
    except _Mismatch:
        return None


def reads_match(graph, reads: dict) -> bool:
    """The nodes of ``graph`` give the recorded fingerprints."""
    return _values(graph, reads) is not None


#: the recorder of the pass being recorded or captured (live_rows reads it), else None
_ACTIVE: Optional[Recorder] = None


# ---- live rows of language-model heads --------------------------------------------------------
def live_rows(live: Tensor, max_live: float):
    """(n_live, idx) for ``live_rows_matmul``: in an eager pass counts the live
    rows (a synchronisation) and notes the count; inside a capture takes the
    count noted by the eager pass (nothing of that pass stays on the device,
    which would move the next forward's tensors), finds the rows with a
    fixed-size ``nonzero_static``, and sets the pass's check flag on the
    device where more rows are live now."""
    rec = _ACTIVE
    R = live.shape[0]
    if rec is None or not rec.capturing:
        if rec is not None:
            rec.quiet = True                  # a capture takes the branch below instead
        try:
            n_live = int(live.sum())
            idx = None if n_live > max_live * R else live.nonzero().squeeze(-1)
        finally:
            if rec is not None:
                rec.quiet = False
        if rec is not None:
            rec.hints.append(None if idx is None else n_live)
        return n_live, idx
    if rec.hint_i >= len(rec.hints):
        raise NotCapturable("the pass made more live-row decisions than the recorded one")
    n = rec.hints[rec.hint_i]
    rec.hint_i += 1
    if n is None:
        return R, None                                # recorded: the full product
    torch.logical_or(rec.flag, live.sum() > n, out=rec.flag)
    # fewer live rows than n: the padding repeats row 0, computed and written identically
    return n, torch.nonzero_static(live, size=n, fill_value=0).squeeze(-1)


def host_values(t: Tensor, what: str = "the group sizes of a grouped matmul"):
    """``t.tolist()`` for a rule whose work depends on a tensor's values (the
    group ends of a grouped matmul): a replay could not change what a capture
    read, so a pass that reads them is refused at capture (it runs eagerly on
    every call)."""
    refuse_capture(what)
    return t.tolist()


def refuse_capture(what: str) -> None:
    """Called first by a rule that reads tensor values on the host (``what``
    it reads): inside a capture, the pass is refused before the rule issues
    any device work, and runs eagerly on every call."""
    rec = _ACTIVE
    if rec is not None and rec.capturing:
        raise NotCapturable(f"the rule of {rec.current} reads tensor values on the host ({what}), which a "
                            "replay could not follow")


def real_node(node):
    """The autograd node behind a recorder's proxy (itself otherwise): for a
    rule that calls the node's own backward."""
    return object.__getattribute__(node, "_node") if isinstance(node, _NodeProxy) else node


# ---- the closure check ------------------------------------------------------------------------
#: torch ops that wait for the device (their result sizes or values go to the host): a
#: capture cannot hold them (on a GPU the capture fails; on the CPU tests they are caught here)
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                      "unique_consecutive", "equal", "repeat_interleave"})


def _bool_masks(args) -> list:
    """The boolean masks of an ``aten.index`` / ``index_put`` call (each a hidden ``nonzero``)."""
    if len(args) > 1 and isinstance(args[1], (tuple, list)):
        return [i for i in args[1] if isinstance(i, Tensor) and i.dtype == torch.bool]
    return []


def _host_to_device(name: str, args, kwargs) -> bool:
    """A copy of a CPU tensor with elements (not a 0-dim scalar) to a CUDA device:
    ``t.to("cuda")`` (aten ``_to_copy``) or ``dst.copy_(t)``, e.g. a saved CPU
    index moved next to the values it indexes."""
    src = args[0] if name == "_to_copy" else (args[1] if len(args) > 1 else None)
    if not isinstance(src, Tensor) or src.device.type != "cpu" or src.dim() == 0:
        return False
    if name == "copy_":
        return isinstance(args[0], Tensor) and args[0].is_cuda
    dev = kwargs.get("device")
    return dev is not None and torch.device(dev).type == "cuda"


class _Closure:
    """Refuses a capture whose kernels read a tensor that is neither produced
    inside the pass nor read from the recorded nodes (its contents would be
    frozen into the graph), or that waits for the device (``SYNC_OPS``,
    boolean-mask indexing, reading a device value into Python). Watches torch
    ops and Triton launches."""

    def __init__(self, rec: Recorder, cpu_is_device: bool = False, fail_fast: bool = False):
        self.rec = rec
        self.inside: set = set()               # storages produced inside the pass
        self.bad: list = []
        #: the pass runs on CPU tensors that stand for device ones (the CPU tests)
        self.cpu_is_device = cpu_is_device
        #: raise at a synchronisation, before it runs (inside a CUDA capture it would fail the capture)
        self.fail_fast = fail_fast

    def _on_device(self, t) -> bool:
        """``t`` holds device data (not a 0-dim CPU scalar read from a node,
        which the replay check compares by value)."""
        if not isinstance(t, Tensor):
            return False
        if t.is_cuda:
            return True
        return (self.cpu_is_device and t.device.type == "cpu"
                and not (t.dim() == 0 and _storage_ptr(t) in self.rec.read_storages))

    def check_sync(self, func, args, kwargs) -> None:
        if self.rec.quiet or not args:
            return
        name = func.overloadpacket.__name__
        if name == "repeat_interleave" and kwargs.get("output_size") is not None:
            return                                      # its output size is given: no wait
        if name in SYNC_OPS:
            waits = self._on_device(args[0])
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            waits = any(self._on_device(m) for m in _bool_masks(args))
        elif name in ("_to_copy", "copy_"):
            waits = _host_to_device(name, args, kwargs)
        else:
            return
        if not waits:
            return
        what = ("reads a device value into Python (a host synchronisation)" if name == "_local_scalar_dense"
                else "copies a host tensor to the device (from pageable memory: not capturable)"
                if name in ("_to_copy", "copy_")
                else "waits for the device (its result size depends on the data)")   # .item() / bool(), or not
        self.bad.append(f"torch op {name} in the rule of {self.rec.current} {what}")
        if self.fail_fast:
            raise NotCapturable(self.bad[-1])

    def check(self, what: str, tensors) -> None:
        for t in tensors:
            if not isinstance(t, Tensor) or t.numel() == 0:
                continue
            p = _storage_ptr(t)
            if p not in self.inside and p not in self.rec.read_storages:
                self.bad.append(f"{what} in the rule of {self.rec.current} reads a {tuple(t.shape)} {t.dtype} "
                                "tensor from outside the pass")

    def reason(self) -> str:
        """Why the capture is refused (the first few distinct findings)."""
        return "; ".join(sorted(set(self.bad))[:3])

    def produced(self, out) -> None:
        for t in _tensors(out, []):
            self.inside.add(_storage_ptr(t))

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        closure = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                closure.check_sync(func, args, kwargs)
                closure.check(f"torch op {func.overloadpacket.__name__}",
                              _tensors(list(args), []) + _tensors(list(kwargs.values()), []))
                out = func(*args, **kwargs)
                closure.produced(out)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        self._patched = _patch_triton_launch(self)
        return self

    def __exit__(self, *exc):
        for cls, name, orig in self._patched:
            setattr(cls, name, orig)
        self._mode.__exit__(*exc)
        return False


def _patch_triton_launch(closure: _Closure) -> list:
    patched = []
    try:
        from triton.runtime import jit
        classes = [(jit.JITFunction, "run")]
        try:
            from triton.runtime import interpreter
            classes.append((interpreter.InterpretedFunction, "run"))
        except ImportError:  # pragma: no cover
            pass
    except ImportError:  # pragma: no cover - no triton
        return patched
    for cls, name in classes:
        orig = cls.__dict__.get(name)
        if orig is None:  # pragma: no cover
            continue

        def run(self, *args, __orig=orig, **kwargs):
            fn = getattr(self, "fn", self)
            closure.check(f"Triton kernel {getattr(fn, '__name__', '?')}",
                          [a for a in list(args) + list(kwargs.values()) if isinstance(a, Tensor)])
            return __orig(self, *args, **kwargs)

        setattr(cls, name, run)
        patched.append((cls, name, orig))
    return patched


# ---- signatures and the cache -----------------------------------------------------------------
def signature(graph, output: Tensor, sr, dtype, backend_name: str) -> tuple:
    """What must be equal for a captured pass to apply, besides the reads:
    node types, edges, forward-output shapes, targets, output, semiring,
    dtype, backend and the ``SEMITRITON_*`` settings."""
    order = graph.order
    pos = {n: i for i, n in enumerate(order)}
    edges = graph.edges
    nodes = tuple([(type(n).__name__,                   # list comprehensions: this runs before every replay
                    tuple([(pos[f], nr) if need else -1 for (f, nr), need in zip(*edges[n])]),
                    tuple([tuple(m.shape) for m in n._input_metadata])) for n in order])
    targets = tuple(sorted((pos[n], slot, i) for n, lst in graph.targets.items() for slot, i in lst))
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("SEMITRITON_")))
    from .rules import RULES
    rules = tuple(sorted({(name, id(RULES.get(name))) for name, _, _ in nodes}))   # a rule registered since
    return (type(sr), sr.name, dtype, backend_name, tuple(output.shape), output.dtype, output.device,
            output.output_nr, targets, nodes, env, rules, _torch_settings())


def _torch_settings() -> tuple:
    """Process-wide torch settings a captured pass freezes in (cuBLAS's math
    mode is set per call and captured with it); the precision flags read
    without tripping torch's check against mixing its two APIs."""
    from .modes import _read, tf32_settings
    generic = _read(torch.get_float32_matmul_precision, lambda: getattr(torch.backends, "fp32_precision", None))
    return (generic, tf32_settings(),
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            torch.are_deterministic_algorithms_enabled(), torch.is_autocast_enabled("cuda"))


@dataclass
class _Entry:
    reads: dict                               # (pos, attr) -> fingerprint
    tensors: dict                             # (pos, attr) -> ((data_ptr, is parameter), ...) when recorded
    hints: list
    graph: Optional[object] = None            # torch.cuda.CUDAGraph (or the emulation)
    outputs: Optional[dict] = None            # target (pos, slot) -> value, in the graph's pool
    flag: Optional[Tensor] = None
    #: per read with device tensors: per tensor ("param", data_ptr) or ("static", buffer index)
    plan: dict = field(default_factory=dict)
    statics: list = field(default_factory=list)
    #: device memory the capture reserved for the graph's private pool (what it allocates)
    pool_bytes: int = 0
    misses: int = 0
    disabled: str = ""


@dataclass
class Stats:
    eager: int = 0
    captures: int = 0
    replays: int = 0
    mismatches: int = 0
    invalidated: int = 0
    failures: list = field(default_factory=list)
    #: host ms of each replayed call (the last 64) from its start to the replay's launch:
    #: the signature, the read check and the copies into the static buffers
    prologue_ms: list = field(default_factory=list)


_CACHE: dict = {}
#: signatures whose reads are kept (cheap: no device memory)
MAX_SIGNATURES = 8
#: captured graphs kept (each with its memory pool and static buffers, about the
#: activations' size): at most MAX_GRAPHS, and while there is more than one, at most
#: MAX_GRAPH_BYTES of static buffers and pools together (None: a quarter of the device's
#: memory); the least recently replayed goes first
MAX_GRAPHS = 8
MAX_GRAPH_BYTES: Optional[int] = None
_GRAPHS: dict = {}                 # signature -> None, least recently used first
STATS = Stats()
#: replay by re-running the captured pass (the CPU tests: CUDA graphs need a GPU)
EMULATE = False


def stats() -> Stats:
    """Counters of the CUDA-graph path (eager passes, captures, replays, mismatches)."""
    return STATS


def clear() -> None:
    """Drop every captured graph (and its memory)."""
    for e in _CACHE.values():
        _free(e)
    _CACHE.clear()
    _GRAPHS.clear()


def _used(sig) -> None:
    """``sig``'s graph was just captured or replayed: keep it, free the least
    recently used ones beyond ``MAX_GRAPHS``."""
    _GRAPHS.pop(sig, None)
    _GRAPHS[sig] = None
    for gone in [k for k in _GRAPHS if k not in _CACHE or _CACHE[k].graph is None]:
        del _GRAPHS[gone]                      # re-recorded or dropped since
    budget = MAX_GRAPH_BYTES
    if budget is None:
        dev = _CACHE[sig].statics[0].device if _CACHE[sig].statics else torch.device("cpu")
        budget = torch.cuda.get_device_properties(dev).total_memory // 4 if dev.type == "cuda" else 1 << 62

    def held():
        return sum(_CACHE[k].pool_bytes + sum(b.numel() * b.element_size() for b in _CACHE[k].statics)
                   for k in _GRAPHS)

    while len(_GRAPHS) > MAX_GRAPHS or (len(_GRAPHS) > 1 and held() > budget):
        old = next(iter(_GRAPHS))
        del _GRAPHS[old]
        _free(_CACHE[old])


def _free(entry: _Entry) -> None:
    if entry.graph is not None:
        entry.graph.reset()
    entry.graph, entry.outputs, entry.flag, entry.plan, entry.statics = None, None, None, {}, []
    entry.pool_bytes = 0


def _eager(graph, make_seeds, sr, dtype, walk, sig, misses: int = 0) -> dict:
    global _ACTIVE
    rec = Recorder(graph)
    _ACTIVE = rec
    try:
        captured = walk(graph, make_seeds(), sr, dtype, wrap=rec.proxy)
    finally:
        _ACTIVE = None
    STATS.eager += 1
    old = _CACHE.pop(sig, None)
    if old is not None:
        _free(old)
    _CACHE[sig] = _Entry(rec.reads, rec.tensors, rec.hints, misses=misses)
    while len(_CACHE) > MAX_SIGNATURES:                 # the least recently recorded goes
        _free(_CACHE.pop(next(iter(_CACHE))))
    return captured


def _extent(t: Tensor) -> int:
    """Elements of its storage that ``t`` spans, from its storage offset."""
    return 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else 0


def _region(t: Tensor, lo: int, n: int) -> Tensor:
    """Elements lo .. lo+n of ``t``'s storage, as a flat tensor of its dtype."""
    return t.as_strided((n,), (1,), lo)


def _plan(entry: _Entry, values: dict) -> tuple[dict, list, dict]:
    """Static buffers for the activations a capture reads: (plan, buffers,
    substitutes). A parameter read at the address it had in the recorded call
    is read in place. Every other device tensor is read from a buffer holding
    the span of its storage that the pass reads (one buffer per storage, so
    q, k and v sliced from one projection share it), through a view with the
    same shape, strides and relative offset; the buffers are filled now."""
    reads, spans = {}, {}               # key -> [(tensor, its storage or None for a parameter)]
    for key, v in values.items():
        recorded = entry.tensors.get(key, ())
        ts = []
        for i, t in enumerate(_device_tensors(v)):
            g = None
            if not (i < len(recorded) and recorded[i] == (t.data_ptr(), True)):
                g = (_storage_ptr(t), t.dtype, t.device)
                lo, hi = spans.get(g, (t.storage_offset(), t.storage_offset()))
                spans[g] = (min(lo, t.storage_offset()), max(hi, t.storage_offset() + _extent(t)))
            ts.append((t, g))
        if ts:
            reads[key] = ts
    for g, (lo, hi) in spans.items():       # a buffer starts 512-byte aligned, like an allocation: views
        q = max(1, 512 // g[1].itemsize)     # in it keep the address alignment (and so the Triton
        spans[g] = (lo - lo % q, hi)         # specialisation) of the tensors they stand for
    index = {g: j for j, g in enumerate(spans)}
    statics = [torch.empty(hi - lo, dtype=dt, device=dev) for (_, dt, dev), (lo, hi) in spans.items()]
    plan, subs, filled = {}, {}, set()
    for key, ts in reads.items():
        acts, repl = [], []
        for t, g in ts:
            if g is None:
                acts.append(("param", t.data_ptr()))
                repl.append(t)
                continue
            j, lo = index[g], spans[g][0]
            if j not in filled:
                statics[j].copy_(_region(t, lo, statics[j].numel()))
                filled.add(j)
            acts.append(("static", j, t.storage_offset() - lo))
            repl.append(statics[j].as_strided(t.shape, t.stride(), t.storage_offset() - lo))
        plan[key] = tuple(acts)
        subs[key] = _substitute(values[key], iter(repl))
    return plan, statics, subs


def _bind(entry: _Entry, graph) -> bool:
    """Copy this forward's tensors into the static buffers; False (nothing
    copied) where a read differs from the capture's. One pass over the reads:
    each is compared with its fingerprint and, if the capture reads device
    tensors from it, placed in its buffer (the capture's layout kept)."""
    plan = entry.plan
    starts: dict = {}                          # buffer -> (storage address, start element) in this forward
    try:
        for key, v in _read_values(graph, entry.reads):
            acts = plan.get(key)
            if acts is None:
                continue
            ts = _device_tensors(v)
            if len(ts) != len(acts):
                return False
            for t, act in zip(ts, acts):
                if act[0] == "param":
                    if t.data_ptr() != act[1]:
                        return False
                    continue
                _, j, rel = act
                start = (_storage_ptr(t), t.storage_offset() - rel)
                if starts.setdefault(j, (start, t))[0] != start:   # the views keep their relative layout
                    return False
    except (_Mismatch, RuntimeError):
        return False
    dst, src = [], []
    for j, ((_, lo), t) in starts.items():
        n = entry.statics[j].numel()
        if lo < 0 or (lo + n) * t.element_size() > t.untyped_storage().nbytes():
            return False
        dst.append(entry.statics[j])
        src.append(_region(t, lo, n))
    if dst:
        torch._foreach_copy_(dst, src)
    return True


class _EmulatedGraph:
    """The CPU tests' stand-in for a CUDA graph: a replay re-runs the captured
    pass (reading the same static buffers) and writes its results into the
    captured outputs, which is what a replayed graph does."""

    def __init__(self, rerun):
        self.rerun = rerun

    def replay(self):
        self.rerun()

    def reset(self):
        self.rerun = None


def _capture(entry: _Entry, graph, make_seeds, sr, dtype, walk) -> None:
    """Capture the pass into ``entry.graph``: static buffers for the
    activations, reads from anywhere else refused."""
    global _ACTIVE
    from . import weight_cache
    from .kernels import _common as _tuning

    values = _values(graph, entry.reads)
    if values is None:
        raise NotCapturable("the reads changed between the check and the capture")
    plan, statics, subs = _plan(entry, values)
    rec = Recorder(graph, capturing=True)
    rec.hints, rec.substitute = entry.hints, subs

    def run_walk():
        rec.hint_i = 0
        # in the graph's own pool, like everything it allocates
        rec.flag = torch.zeros((), dtype=torch.bool, device=graph.output.device)
        return walk(graph, make_seeds(), sr, dtype, wrap=rec.proxy)

    def checked_walk(**closure_options):
        with weight_cache.bypass(), _Closure(rec, **closure_options) as closure:
            return run_walk(), closure

    _ACTIVE = rec
    _tuning.frozen = True
    g = None
    try:
        if EMULATE:
            captured, closure = checked_walk(cpu_is_device=True)
        else:
            # not torch.cuda.graph(): it empties the allocator's cache first; the
            # capture begins before the closure check (it updates the RNG's offsets)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                # warm-up, as PyTorch's recipe asks: the pass to be captured, run
                # once eagerly on the capture stream (first launches of what only
                # the captured form runs, lazy module loads, the stream's cuBLAS
                # workspace: outside the capture)
                _, closure = checked_walk(fail_fast=True)
                if closure.bad:
                    raise NotCapturable(closure.reason())
                reserved = torch.cuda.memory_reserved(graph.output.device)
                g.capture_begin(capture_error_mode="thread_local")
                try:
                    captured, closure = checked_walk(fail_fast=True)
                except BaseException:
                    try:                  # an invalidated capture fails to end too: report the first error
                        g.capture_end()
                    except Exception:  # noqa: BLE001
                        pass
                    raise
                g.capture_end()
                pool_bytes = max(0, torch.cuda.memory_reserved(graph.output.device) - reserved)
            torch.cuda.current_stream().wait_stream(stream)
    finally:
        _ACTIVE = None
        _tuning.frozen = False
    if closure.bad:
        if g is not None:
            g.reset()
        raise NotCapturable(closure.reason())
    if rec.reads != entry.reads:
        if g is not None:
            g.reset()
        raise NotCapturable("the captured pass read other node attributes than the recorded one")
    pos = rec.pos
    outputs = {(pos[n], slot): v for (n, slot), v in captured.items()}
    if EMULATE:
        def rerun():
            global _ACTIVE
            _ACTIVE = rec
            try:
                with weight_cache.bypass():
                    new = run_walk()
            finally:
                _ACTIVE = None
            for (n, slot), v in new.items():
                for o, c in zip(outputs[(pos[n], slot)], v):
                    o.copy_(c)
            entry.flag = rec.flag
        g = _EmulatedGraph(rerun)
    entry.graph, entry.flag, entry.outputs = g, rec.flag, outputs
    entry.plan, entry.statics = plan, statics
    entry.pool_bytes = 0 if EMULATE else pool_bytes


def _replay(entry: _Entry, graph, t0: float) -> Optional[dict]:
    entry.graph.replay()
    STATS.prologue_ms = STATS.prologue_ms[-63:] + [(time.perf_counter() - t0) * 1e3]
    if bool(entry.flag):                      # a live row outside the recorded ones: not valid
        STATS.invalidated += 1
        return None
    STATS.replays += 1
    order = graph.order
    return {(order[p], slot): tuple(c.clone() for c in v) for (p, slot), v in entry.outputs.items()}


def _on_cuda(t: Tensor) -> bool:
    return t.is_cuda


def walk(graph, make_seeds: Callable[[], dict], sr, dtype, walk_fn, backend_name: str) -> dict:
    """The semiring walk over ``graph`` through the CUDA-graph cache (see the
    module docstring); ``make_seeds()`` builds the seed values (called inside
    a capture). Falls back to ``walk_fn`` for CPU tensors. Such passes from
    several threads run one at a time (the cache and the capture state are
    process-wide)."""
    with _LOCK:
        return _walk_cached(graph, make_seeds, sr, dtype, walk_fn, backend_name)


_LOCK = threading.RLock()


def _walk_cached(graph, make_seeds: Callable[[], dict], sr, dtype, walk_fn, backend_name: str) -> dict:
    output = graph.output
    if not _on_cuda(output):
        return walk_fn(graph, make_seeds(), sr, dtype)
    from .semirings import BUILTIN
    if BUILTIN.get(sr.name) is not sr:
        # a user's semiring may hold state the signature cannot compare: no replay
        return walk_fn(graph, make_seeds(), sr, dtype)
    t0 = time.perf_counter()
    sig = signature(graph, output, sr, dtype, backend_name)
    entry = _CACHE.get(sig)
    if entry is None:
        return _eager(graph, make_seeds, sr, dtype, walk_fn, sig)
    if entry.disabled:
        return walk_fn(graph, make_seeds(), sr, dtype)
    if entry.graph is not None:
        bound = _bind(entry, graph)
    else:
        bound = reads_match(graph, entry.reads)
    if not bound:
        STATS.mismatches += 1
        misses = entry.misses + 1
        captured = _eager(graph, make_seeds, sr, dtype, walk_fn, sig, misses)
        if misses >= MAX_MISSES:
            _CACHE[sig].disabled = f"{misses} calls in a row read other tensors or values than the call before"
        return captured
    if entry.graph is None:
        try:
            _capture(entry, graph, make_seeds, sr, dtype, walk_fn)
            STATS.captures += 1
        except Exception as exc:  # noqa: BLE001 - any capture failure leaves the signature eager
            _free(entry)
            entry.disabled = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            STATS.failures.append(entry.disabled)
            warnings.warn(f"semitriton: this pass is not replayed from a CUDA graph ({entry.disabled}); "
                          "it runs eagerly", RuntimeWarning, stacklevel=user_stacklevel())
            if not EMULATE:
                torch.cuda.synchronize()
            return walk_fn(graph, make_seeds(), sr, dtype)
    out = _replay(entry, graph, t0)
    if out is None:                          # more live rows than recorded: record anew (a miss too)
        misses = entry.misses + 1
        _free(entry)
        captured = _eager(graph, make_seeds, sr, dtype, walk_fn, sig, misses)
        if misses >= MAX_MISSES:
            _CACHE[sig].disabled = (f"{misses} calls in a row read other tensors or values than the call before, "
                                    "or invalidated the replay")
        return captured
    entry.misses = 0
    _used(sig)
    return out


def check_capturable(graph, make_seeds: Callable[[], dict], sr, dtype, walk_fn) -> dict:
    """Record one pass (any device, the CPU included) with the closure check
    on. Returns {"values": the walk's result, "reads": {(position, attribute):
    fingerprint} a replay would compare, "outside": descriptions of the
    tensors a capture would have frozen in (empty when capturable), "hints":
    the live-row decisions}."""
    global _ACTIVE
    from . import weight_cache

    rec = Recorder(graph)
    _ACTIVE = rec
    try:
        with weight_cache.bypass(), _Closure(rec, cpu_is_device=not graph.output.is_cuda) as closure:
            values = walk_fn(graph, make_seeds(), sr, dtype, wrap=rec.proxy)
    finally:
        _ACTIVE = None
    return {"values": values, "reads": rec.reads, "outside": sorted(set(closure.bad)), "hints": rec.hints}
