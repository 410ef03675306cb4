"""The per-weight transform cache: hits, the entry bound, and freed weights."""

import torch

from semitriton import weight_cache
from semitriton.semirings._util import weight


def _calls():
    n = {"calls": 0}

    def fn(t):
        n["calls"] += 1
        return t.abs() + 1
    return n, fn


def test_hit_returns_cached_value_and_follows_in_place_updates():
    weight_cache.clear()
    w = torch.randn(4, 5)
    n, fn = _calls()
    a = weight_cache.transform(w, "t", fn)
    b = weight_cache.transform(w, "t", fn)
    assert a is b and n["calls"] == 1
    w.mul_(2)
    c = weight_cache.transform(w, "t", fn)
    assert n["calls"] == 2 and torch.equal(c, w.abs() + 1)


def test_freed_weights_are_swept_and_entry_bound_holds(monkeypatch):
    weight_cache.clear()
    monkeypatch.setenv("SEMITRITON_WEIGHT_CACHE_ENTRIES", "50")
    n, fn = _calls()
    keep = [torch.randn(3, 3) for _ in range(10)]
    for w in keep:
        weight_cache.transform(w, "t", fn)
    for _ in range(300):                      # temporaries: freed right after use
        weight_cache.transform(torch.randn(3, 3), "t", fn)
    entries = weight_cache.stats()["entries"]
    assert entries <= 50
    # the live weights were used before the temporaries; whatever is left of
    # them is still a correct hit or a recomputation, never a stale value
    for w in keep:
        assert torch.equal(weight_cache.transform(w, "t", fn), w.abs() + 1)
    weight_cache.clear()


def test_dead_entries_do_not_accumulate():
    weight_cache.clear()
    n, fn = _calls()
    for _ in range(1000):
        weight_cache.transform(torch.randn(2, 2), "t", fn)
    # amortised sweep: never more than about twice the live entries plus one sweep period
    assert weight_cache.stats()["entries"] <= 130
    weight_cache.clear()


def test_identity_transform_is_not_copied_or_cached():
    weight_cache.clear()
    w = torch.randn(3, 4)
    assert weight(w, "same", torch.float32) is w
    assert weight_cache.stats()["entries"] == 0
    h = weight(w.to(torch.bfloat16), "same", torch.float32)
    assert h.dtype == torch.float32
    weight_cache.clear()
