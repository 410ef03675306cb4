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
  bypass the version counter, so each entry also keeps a fingerprint of the
  weight's values (its product with a fixed random vector,
  :func:`fingerprint`). A semiring pass records its hits (:func:`checking`);
  after the pass, :func:`drop_stale` compares them all at once (one
  synchronisation), drops a changed weight's entries, and the engine reruns
  the pass. A direct call of :func:`transform` outside a pass is not
  checked: call :func:`clear` after modifying weights through ``.data``
  there.

Only 2-D tensors without an autograd history are cached (parameters, buffers,
constants): activations are new tensors on every forward pass and are
transformed on the fly instead. Bounded by entry count and bytes (LRU):
``SEMITRITON_WEIGHT_CACHE_ENTRIES`` (default 4096) and
``SEMITRITON_WEIGHT_CACHE_MB`` (default 4096). Entries whose weight has been
freed are swept in amortised O(1) per insertion (a full sweep after as many
insertions as the cache holds entries), not on every insertion.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict

_lock = threading.Lock()
_cache: "OrderedDict[tuple, _Entry]" = OrderedDict()
_bytes = 0
_inserts_since_sweep = 0


class _Entry:
    __slots__ = ("ref", "cdata", "version", "value", "nbytes", "fp")

    def __init__(self, ref, cdata, version, value, nbytes, fp):
        self.ref, self.cdata, self.version, self.value, self.nbytes = ref, cdata, version, value, nbytes
        self.fp = fp


_local = threading.local()          # the hits of the pass running on this thread
_probes: dict = {}                  # (cols, dtype, device) -> the fingerprint's vector u


def fingerprint(t):
    """W·u for a fixed random u (float32; float64 for float64 weights): a
    vector on the weight's device that changes with any edit of a row's
    values (zeroed columns, scaled, negated or permuted entries) except one
    exactly in the null space of u; one matrix-vector product, no host sync."""
    import torch

    dt = torch.float64 if t.dtype == torch.float64 else torch.float32
    key = (t.shape[1], dt, t.device)
    u = _probes.get(key)
    if u is None:
        u = _probes[key] = torch.randn(t.shape[1], generator=torch.Generator().manual_seed(0), dtype=dt).to(t.device)
    with torch.no_grad():
        return torch.mv(t.to(dt), u)


@contextlib.contextmanager
def checking():
    """Inside (one semiring pass): the cache hits are recorded, as
    {key: (weight, entry)}, for :func:`drop_stale` after the pass."""
    prev = getattr(_local, "hits", None)
    _local.hits = hits = {}
    try:
        yield hits
    finally:
        _local.hits = prev


def drop_stale(hits: dict) -> bool:
    """Compare the recorded hits' weights with their fingerprints (one
    synchronisation per device and fingerprint dtype); drop the entries of every weight that changed
    and say whether there was one (the pass that used them must be rerun)."""
    import torch

    groups: dict = {}
    for key, (t, e) in hits.items():
        groups.setdefault((e.fp.device, e.fp.dtype), []).append((key, t, e))
    stale = []
    for items in groups.values():
        now = [fingerprint(t) for _, t, _ in items]
        if torch.equal(torch.cat(now), torch.cat([e.fp for _, _, e in items])):
            continue                                    # the usual case: one comparison, one sync
        stale += [(key, e) for (key, _, e), f in zip(items, now) if not torch.equal(f, e.fp)]
    with _lock:
        for key, e in stale:
            if _cache.get(key) is e:
                _drop(key)
    return bool(stale)


def _limits():
    n = int(os.environ.get("SEMITRITON_WEIGHT_CACHE_ENTRIES", "4096"))
    mb = float(os.environ.get("SEMITRITON_WEIGHT_CACHE_MB", "4096"))
    return n, int(mb * 2**20)


def clear() -> None:
    """Drop every cached transform."""
    global _bytes, _inserts_since_sweep
    with _lock:
        _cache.clear()
        _bytes = 0
        _inserts_since_sweep = 0


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
    global _inserts_since_sweep
    for k in [k for k, v in _cache.items() if v.ref.expired()]:
        _drop(k)
    _inserts_since_sweep = 0


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
                    hits[key] = (t, e)
                return e.value
            _drop(key)
    storage = t.untyped_storage()
    with torch.no_grad():
        value = fn(t)
    nbytes = value.numel() * value.element_size()
    max_n, max_bytes = _limits()
    if nbytes > max_bytes or max_n <= 0:
        return value
    entry = _Entry(_weak(storage), storage._cdata, version, value, nbytes, fingerprint(t))
    with _lock:
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
