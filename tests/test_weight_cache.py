"""The per-weight transform cache: hits, the entry bound, and freed weights."""

import os

import pytest
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


def test_the_triton_matmuls_transform_each_weight_once(monkeypatch):
    """On the Triton backend, the per-weight transforms the matmul kernels ask
    for (|W|, −|W|log|W|, log|W|) are computed once per weight over several
    passes and served from the cache after that (a kernel that bypassed the
    cache, or a key that changed per call, would compute them every pass)."""
    import collections
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("needs TRITON_INTERPRET=1 (the CPU kernel tests)")
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    import semitriton
    from hf_models import build, embeds_and_output
    computed, served = collections.Counter(), collections.Counter()
    real_transform = weight_cache.transform

    def counting(t, name, fn):
        key = (t.data_ptr(), tuple(t.shape), name)
        served[key] += 1

        def counted(x):
            computed[key] += 1
            return fn(x)
        return real_transform(t, name, counted)
    monkeypatch.setattr(weight_cache, "transform", counting)
    model = semitriton.patch(build("bert"))
    params = {p.data_ptr() for p in model.parameters()}
    ids = torch.tensor([[3, 5, 7, 9, 11, 2]])
    for semiring in ("entropy", "maxabs"):
        weight_cache.clear()
        computed.clear()
        served.clear()
        for _ in range(3):
            emb, score = embeds_and_output(model, "bert", ids)
            semitriton.grad(score, emb, semiring=semiring, backend="triton")
        keys = [k for k in served if k[0] in params]
        assert keys, f"{semiring}: no weight transform was asked for"
        assert all(computed[k] == 1 for k in keys), {k: computed[k] for k in keys if computed[k] != 1}
        assert all(served[k] >= 3 for k in keys)                     # asked for in every pass


def test_writes_through_data_are_caught_by_the_fingerprint():
    """w.data[...] = 0 bumps no version counter: the entry's fingerprint sees
    the change once a pass checks its hits; an unchanged weight passes."""
    weight_cache.clear()
    w = torch.randn(6, 5)

    def fn(t):                                       # a signed transform (max's copy of W is one)
        return t * 2 + 1
    with weight_cache.checking() as hits:
        weight_cache.transform(w, "t", fn)           # a miss: not a hit to check
        weight_cache.transform(w, "t", fn)
    assert len(hits) == 1 and not weight_cache.drop_stale(hits)
    edits = (lambda d: d[:, 2].zero_(), lambda d: d.copy_(d.flip(0)), lambda d: d[3].neg_(),
             lambda d: d[1, 1].mul_(1.001))
    for edit in edits:
        edit(w.data)
        with weight_cache.checking() as hits:
            stale = weight_cache.transform(w, "t", fn)
        assert not torch.equal(stale, fn(w))         # served from the cache, as before the fix
        assert weight_cache.drop_stale(hits) and weight_cache.stats()["entries"] == 0
        assert torch.equal(weight_cache.transform(w, "t", fn), fn(w))
    weight_cache.clear()


def test_a_stale_weight_loses_every_transform_and_nan_weights_are_not_stale():
    """A .data write found through one transform drops the weight's other
    transforms too (each would have cost its own rerun, and a direct call
    got the old value); a weight holding NaN matches its own fingerprint."""
    weight_cache.clear()
    w = torch.randn(4, 3)
    weight_cache.transform(w, "a", lambda t: t + 1)
    weight_cache.transform(w, "b", lambda t: t * 3)
    w.data[0, 0] = 5.0
    with weight_cache.checking() as hits:
        weight_cache.transform(w, "a", lambda t: t + 1)
    assert weight_cache.drop_stale(hits)
    assert torch.equal(weight_cache.transform(w, "b", lambda t: t * 3), w * 3)
    weight_cache.clear()
    w[1, 1] = float("nan")
    weight_cache.transform(w, "a", lambda t: t + 1)
    with weight_cache.checking() as hits:
        weight_cache.transform(w, "a", lambda t: t + 1)
    assert len(hits) == 1 and not weight_cache.drop_stale(hits)
    weight_cache.clear()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_ablation_through_data_changes_the_next_pass(device, monkeypatch):
    """An interpretability ablation written through .data between two passes:
    the second pass's statistics are the ablated model's in every semiring
    (they were the cached transforms of the weight before the ablation). On
    CUDA the Triton kernels' own transforms (|W|, log|W|, the entropy stack)
    are checked too."""
    import semitriton
    from semitriton import engine
    if device == "cuda" and not (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")):
        pytest.skip("needs a CUDA GPU and TRITON_INTERPRET=0")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(device)
    x = torch.randn(4, 5, device=device, requires_grad=True)
    walks = []
    real_walk = engine._walk
    monkeypatch.setattr(engine, "_walk", lambda *a, **k: walks.append(1) or real_walk(*a, **k))
    for s in ("abs", "maxabs", "entropy", "max"):                   # (real uses no cached transform)
        weight_cache.clear()
        kw = {}
        semitriton.grad(model(x).sum(), x, semiring=s, **kw)             # fills the cache
        saved = model[0].weight.detach().clone()
        model[0].weight.data[:, 1] = 0
        (got,) = semitriton.grad(model(x).sum(), x, semiring=s, **kw)
        (again,) = semitriton.grad(model(x).sum(), x, semiring=s, **kw)       # fresh entries: no rerun
        assert torch.equal(again, got) and len(walks) == 4, s
        weight_cache.clear()
        (want,) = semitriton.grad(model(x).sum(), x, semiring=s, **kw)
        assert torch.equal(got, want), s
        assert (got[:, 1] == (float("-inf") if s == "max" else 0)).all(), s
        assert len(walks) == 5, s              # + the pass after a clear()
        walks.clear()
        with torch.no_grad():
            model[0].weight.copy_(saved)
    weight_cache.clear()


def test_the_check_can_be_switched_off(monkeypatch):
    """SEMITRITON_CHECK_WEIGHTS=0: no fingerprint is compared (the README's
    way out for code that never writes through .data), so the stale cache
    is what a pass reads."""
    import semitriton
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(2, 4, requires_grad=True)
    weight_cache.clear()
    semitriton.grad(lin(x).sum(), x, semiring="abs")
    lin.weight.data[:, 0] = 0
    monkeypatch.setenv("SEMITRITON_CHECK_WEIGHTS", "0")
    (stale,) = semitriton.grad(lin(x).sum(), x, semiring="abs")
    monkeypatch.setenv("SEMITRITON_CHECK_WEIGHTS", "1")
    (fresh,) = semitriton.grad(lin(x).sum(), x, semiring="abs")
    assert (stale[:, 0] > 0).all() and (fresh[:, 0] == 0).all()
    weight_cache.clear()


def test_a_deleted_models_transforms_go_at_the_next_pass_or_collection():
    """The transforms of a deleted model's weights were kept until the cache
    filled (178 MiB for a 52 MiB model): now the next semiring pass, or the
    next full garbage collection, drops them."""
    import gc

    import semitriton
    weight_cache.clear()
    for release in ("collection", "pass"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        x = torch.randn(3, 8, requires_grad=True)
        for sr in ("abs", "maxabs", "entropy"):
            semitriton.grad(model(x).sum(), x, semiring=sr)
        assert weight_cache.stats()["entries"] > 0
        del model
        if release == "collection":
            gc.collect()
        else:
            gc.disable()                   # no full collection runs in between: the pass sweeps
            try:
                y = torch.randn(3, 8, requires_grad=True)
                semitriton.grad((y * 2).sum(), y, semiring="abs")
            finally:
                gc.enable()
        assert weight_cache.stats() == {"entries": 0, "bytes": 0}, release
        assert not weight_cache._prints


def test_a_large_cache_is_swept_within_entries_over_1024_passes(monkeypatch):
    """Past 1024 entries a pass's sweep runs every ⌈n/1024⌉-th pass (its cost
    per pass stays that of 1024 entries); the dead entries still go."""
    import math
    weight_cache.clear()
    monkeypatch.setattr(weight_cache, "_SWEEP_BATCH", 16)
    keep = [torch.randn(2, 2) for _ in range(24)]
    drop = [torch.randn(2, 2) for _ in range(24)]
    for w in keep + drop:
        weight_cache.transform(w, "abs", torch.abs)
    n = weight_cache.stats()["entries"]
    assert n == 48
    del drop, w
    passes = math.ceil(n / 16)
    for k in range(passes - 1):
        weight_cache.sweep()
        assert weight_cache.stats()["entries"] == n            # not yet: the sweep is amortised
    weight_cache.sweep()
    assert weight_cache.stats()["entries"] == 24 and len(weight_cache._prints) == 24
    monkeypatch.setattr(weight_cache, "_SWEEP_BATCH", 1024)
    del keep
    weight_cache.sweep()                                          # a small cache: every pass sweeps
    assert weight_cache.stats() == {"entries": 0, "bytes": 0} and not weight_cache._prints
