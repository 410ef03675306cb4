"""A small cache of per-weight transforms (|W|·log|W|, log|W|, ...).

A weight is used by every semiring backward pass through its layer; its
elementwise transforms are computed once and kept. The cache is keyed on
(data_ptr, storage offset, shape, stride, dtype, device, transform) and every
hit is validated:

- a weak reference to the tensor's storage must still be alive (so the memory
  cannot have been freed and reused by another tensor), and it must be the
  same storage;
- the tensor's version counter (``_version``) must be the one recorded, so an
  in-place update (``w.mul_()``, ``optimizer.step()``, ``w.copy_()`` under
  no_grad) invalidates the entry;
- writes through ``w.data`` (an ablation such as ``w.data[:, h] = 0``)
  bypass the version counter, so each weight view also has a fingerprint of
  its values (its product with a fixed random vector, :func:`fingerprint`).
  A semiring pass records the weights it took transforms of
  (:func:`checking`); after the pass, :func:`drop_stale` prints each once
  and compares them all at once (one synchronisation), drops every
  transform of a weight that changed, and the engine reruns the pass. An
  edit smaller than the rounding of a row's product with the random vector
  goes unseen, and a direct call of :func:`transform` outside a pass is not
  checked: call :func:`clear` after such writes.

Only 2-D tensors without an autograd history are cached (parameters, buffers,
constants): activations are new tensors on every forward pass and are
transformed on the fly instead. Bounded by entry count and bytes (LRU):
``SEMITRITON_WEIGHT_CACHE_ENTRIES`` (default 4096) and
``SEMITRITON_WEIGHT_CACHE_MB`` (default 4096). Entries whose weight has been
freed are swept after semiring passes (:func:`sweep`: a deleted model's
transforms go at the next pass while the cache holds at most 1024 entries, within
⌈entries/1024⌉ passes beyond), after every full garbage collection
(``gc.collect()``) and when the cache fills.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections import OrderedDict

_lock = threading.Lock()
_cache: "OrderedDict[tuple, _Entry]" = OrderedDict()
_bytes = 0
_inserts_since_sweep = 0
_passes_since_sweep = 0
_SWEEP_BATCH = 1024                 # entries a pass's sweep looks at, on average (about 0.6 ms of Python)


class _Entry:
    __slots__ = ("ref", "cdata", "version", "value", "nbytes")

    def __init__(self, ref, cdata, version, value, nbytes):
        self.ref, self.cdata, self.version, self.value, self.nbytes = ref, cdata, version, value, nbytes


class _Print:
    """A weight view's fingerprint, the version it was taken at, and a weak
    reference to its storage (swept with the dead entries)."""
    __slots__ = ("fp", "version", "ref")

    def __init__(self, fp, version, ref):
        self.fp, self.version, self.ref = fp, version, ref


_prints: dict = {}                  # view key (the cache key without the transform) -> _Print
_local = threading.local()          # the weights the pass running on this thread took from the cache
_probes: dict = {}                  # (columns, dtype, device) -> the fingerprint's random vector u


def fingerprint(t):
    """W·u for a fixed random u, in float32 (float64 for float64 weights),
    autocast off: a vector on the weight's device that changes with any edit
    of a row (zeroed, scaled, negated or permuted entries) larger than the
    rounding of the row's product; one matrix-vector product in the weight's
    own layout, no host sync. Compared bit for bit (a NaN matches itself)."""
    import torch

    dt = torch.float64 if t.dtype == torch.float64 else torch.float32
    key = (t.shape[1], dt, t.device)
    u = _probes.get(key)
    if u is None:
        u = _probes[key] = torch.randn(t.shape[1], generator=torch.Generator().manual_seed(0), dtype=dt).to(t.device)
    with torch.no_grad(), torch.autocast(t.device.type, enabled=False):
        return torch.mv(t.to(dt), u)


def _same(a, b) -> bool:
    """Bitwise equality of two fingerprints (or their concatenations)."""
    import torch

    ints = torch.int64 if a.dtype == torch.float64 else torch.int32
    return a.shape == b.shape and torch.equal(a.view(ints), b.view(ints))


@contextlib.contextmanager
def checking():
    """Inside (one semiring pass): the weights served from the cache are
    recorded, as {view key: weight}, for :func:`drop_stale` after the pass."""
    prev = getattr(_local, "hits", None)
    _local.hits = hits = {}
    try:
        yield hits
    finally:
        _local.hits = prev


def drop_stale(hits: dict) -> bool:
    """Compare the recorded weights with their fingerprints (one comparison
    and synchronisation per device and dtype); drop every cached transform of each
    weight that changed and say whether there was one (the pass that used
    them must be rerun)."""
    import torch

    groups: dict = {}
    for vkey, t in hits.items():
        p = _prints.get(vkey)
        if p is not None:
            groups.setdefault((p.fp.device, p.fp.dtype), []).append((vkey, t, p))
    stale = []
    for items in groups.values():
        now = [fingerprint(t) for _, t, _ in items]
        if _same(torch.cat(now), torch.cat([p.fp for _, _, p in items])):
            continue                                    # the usual case
        stale += [vkey for (vkey, _, p), f in zip(items, now) if not _same(f, p.fp)]
    if stale:
        with _lock:
            gone = set(stale)
            for key in [k for k in _cache if k[:-1] in gone]:
                _drop(key)
            for vkey in gone:               # the next transform prints the weight afresh
                _prints.pop(vkey, None)
    return bool(stale)


def sweep() -> None:
    """Drop the transforms (and prints) of weights that have been freed: run
    after every semiring pass, so a deleted model's transforms go at the next
    pass, not only when the cache fills (:func:`clear` drops everything now).
    A cache of n > 1024 entries is swept every ⌈n/1024⌉-th call, so a pass
    spends on it what a sweep of 1024 entries costs, on average."""
    global _passes_since_sweep
    if not (_cache or _prints):
        return
    _passes_since_sweep += 1
    if _passes_since_sweep * _SWEEP_BATCH < len(_cache):
        return
    with _lock:
        _sweep_dead()


def _after_full_collection(phase: str, info: dict) -> None:
    """A ``gc.callbacks`` hook: after a full collection (``gc.collect()``, or
    the interpreter's own generation-2 runs) sweep the dead weights too. It
    skips a sweep when a thread holds the lock (the collection may run
    inside a cache operation)."""
    if phase != "stop" or info.get("generation") != 2 or not (_cache or _prints):
        return
    if _lock.acquire(blocking=False):
        try:
            _sweep_dead()
        finally:
            _lock.release()


gc.callbacks[:] = [cb for cb in gc.callbacks              # once, also if this module is reloaded
                   if getattr(cb, "__qualname__", None) != "_after_full_collection"
                   or getattr(cb, "__module__", None) != __name__]
gc.callbacks.append(_after_full_collection)


def _limits():
    n = int(os.environ.get("SEMITRITON_WEIGHT_CACHE_ENTRIES", "4096"))
    mb = float(os.environ.get("SEMITRITON_WEIGHT_CACHE_MB", "4096"))
    return n, int(mb * 2**20)


def clear() -> None:
    """Drop every cached transform."""
    global _bytes, _inserts_since_sweep, _passes_since_sweep
    with _lock:
        _cache.clear()
        _prints.clear()
        _bytes = 0
        _inserts_since_sweep = _passes_since_sweep = 0


def stats() -> dict:
    with _lock:
        return {"entries": len(_cache), "bytes": _bytes}


def cacheable(t) -> bool:
    if t.dim() != 2 or t.numel() == 0:
        return False
    base = t._base if t._base is not None else t
    if base.grad_fn is not None:         # an activation: new every forward pass
        return False
    try:
        t._version                       # inference tensors have no version counter
    except RuntimeError:
        return False
    return True


def _weak(storage):
    from torch.multiprocessing.reductions import StorageWeakRef
    return StorageWeakRef(storage)


def _drop(key):
    global _bytes
    e = _cache.pop(key, None)
    if e is not None:
        _bytes -= e.nbytes


def _sweep_dead():
    """Drop the entries whose weight storage has been freed (caller holds the lock)."""
    global _inserts_since_sweep, _passes_since_sweep
    for k in [k for k, v in _cache.items() if v.ref.expired()]:
        _drop(k)
    for k in [k for k, p in _prints.items() if p.ref.expired()]:
        del _prints[k]
    _inserts_since_sweep = _passes_since_sweep = 0


_bypass = 0


@contextlib.contextmanager
def bypass():
    """Inside: :func:`transform` neither reads nor fills the cache (a CUDA-graph
    capture computes |W| from the weight it reads, so a weight changed in place
    between replays is seen)."""
    global _bypass
    _bypass += 1
    try:
        yield
    finally:
        _bypass -= 1


def transform(t, name: str, fn):
    """``fn(t)`` for the transform called ``name``, cached when ``t`` is a weight."""
    global _bytes, _inserts_since_sweep
    import torch

    if _bypass or not cacheable(t):
        with torch.no_grad():
            return fn(t)
    key = (t.data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, t.device, name)
    version = t._version
    with _lock:
        e = _cache.get(key)
        if e is not None:
            if e.version == version and not e.ref.expired() and e.cdata == t.untyped_storage()._cdata:
                _cache.move_to_end(key)
                hits = getattr(_local, "hits", None)
                if hits is not None:
                    hits[key[:-1]] = t
                return e.value
            _drop(key)
    storage = t.untyped_storage()
    with torch.no_grad():
        value = fn(t)
    nbytes = value.numel() * value.element_size()
    max_n, max_bytes = _limits()
    if nbytes > max_bytes or max_n <= 0:
        return value
    ref = _weak(storage)
    entry = _Entry(ref, storage._cdata, version, value, nbytes)
    vkey = key[:-1]
    p = _prints.get(vkey)
    if p is None or p.version != version or p.ref.expired():
        # a new weight view, or one updated in place since its print: print it now. (A print of the
        # same version is kept: if the weight was written through .data since, the pass's check
        # finds that and drops this transform with the others.)
        p = _Print(fingerprint(t), version, ref)
    with _lock:
        _prints[vkey] = p
        _inserts_since_sweep += 1
        if _inserts_since_sweep >= max(64, len(_cache)):
            _sweep_dead()
        _drop(key)
        _cache[key] = entry
        _bytes += nbytes
        if len(_cache) > max_n or _bytes > max_bytes:
            _sweep_dead()                  # dead weights go before live ones are evicted
        while _cache and (len(_cache) > max_n or _bytes > max_bytes):
            _drop(next(iter(_cache)))
    return value
