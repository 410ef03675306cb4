"""CUDA-graph replay of semiring passes (semitriton/cuda_graph.py).

On the CPU: a recorded pass reads nothing from outside the nodes it notes
(every rule, aten and patched models, both backends), the notes catch a
changed saved index, tensors from outside are caught through torch ops and
Triton launches, the live-row decisions of language-model heads are replayed
and checked, and grad(cuda_graph=True) on CPU tensors is the eager pass.
On a GPU: replays equal the eager pass on new inputs, with weights changed
in place and with another scored position."""

import os

import pytest
import torch

import semitriton
from conftest import SEMIRINGS, assert_semiring_close
from semitriton import cuda_graph, engine
from semitriton.semirings import get

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[3, 5, 7, 9, 11, 2, 4, 6], [4, 6, 8, 10, 12, 14, 16, 18]])
CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def _forward(kind, patched, device="cpu", position=-1, model=None, ids=IDS):
    from hf_models import build
    if model is None:
        model = build(kind).to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        if patched:
            semitriton.patch(model)
    emb = model.get_input_embeddings()(ids.to(device)).detach().clone().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    return model, emb, (logits[:, position, 7] - logits[:, position, 3]).sum()


def _record(score, emb, semiring, backend):
    sr = get(semiring)
    graph = engine.GradientGraph(score, (emb,))

    def seeds():
        seed = [None] * len(graph.root._input_metadata)
        seed[score.output_nr] = sr.one(tuple(score.shape), torch.float32, score.device)
        return {graph.root: seed}

    with semitriton.backend.use(backend), torch.no_grad():
        return graph, cuda_graph.check_capturable(graph, seeds, sr, torch.float32, engine._walk)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("patched", [False, True], ids=["aten", "patched"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_recorded_pass_reads_nothing_from_outside(kind, patched, backend):
    """What a capture would freeze in: nothing; and recording changes no value."""
    _, emb, score = _forward(kind, patched)
    for s in SEMIRINGS if backend == "torch" else ("abs", "maxabs", "entropy"):
        graph, rec = _record(score, emb, s, backend)
        assert rec["outside"] == [], (kind, s, rec["outside"])
        assert rec["reads"], "the rules read saved tensors through the proxy"
        (want,) = engine.run(score, emb, s, backend=backend, graph=graph)
        (got,) = [v for (node, slot), v in rec["values"].items()]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_reads_catch_another_scored_position():
    """Same structure and shapes (one signature), another saved index: no replay."""
    model, emb, score = _forward("llama", True)
    graph, rec = _record(score, emb, "abs", "torch")
    assert cuda_graph.reads_match(graph, rec["reads"])
    _, emb2, score2 = _forward("llama", True, model=model, position=-2)
    graph2 = engine.GradientGraph(score2, (emb2,))
    sr = get("abs")
    assert cuda_graph.signature(graph, score, sr, torch.float32, "torch") == \
        cuda_graph.signature(graph2, score2, sr, torch.float32, "torch")
    assert not cuda_graph.reads_match(graph2, rec["reads"])


def test_proxy_keeps_the_node_type_name_and_notes_absent_attributes():
    _, emb, score = _forward("llama", True)
    graph = engine.GradientGraph(score, (emb,))
    rec = cuda_graph.Recorder(graph)
    node = graph.order[-1]
    p = rec.proxy(node)
    assert type(p).__name__ == type(node).__name__
    assert not hasattr(p, "_saved_no_such_attribute")
    assert rec.reads[(len(graph.order) - 1, "_saved_no_such_attribute")] == ("absent",)
    assert cuda_graph.reads_match(graph, rec.reads)


def test_fingerprints():
    assert cuda_graph.fingerprint(torch.tensor(2.0)) == ("C", 2.0, torch.float32)
    assert cuda_graph.fingerprint((1, None, 0.5)) == ("S", (("V", 1), ("V", None), ("V", 0.5)))
    big = torch.zeros(100)
    assert cuda_graph.fingerprint(big) == ("T", (100,), (1,), torch.float32, big.device)
    assert cuda_graph.fingerprint(big[::2]) != cuda_graph.fingerprint(big[:50])      # strides count
    node = torch.ones(2, requires_grad=True).exp().grad_fn
    assert cuda_graph.fingerprint(node.name) == cuda_graph.fingerprint(node.name)    # a new bound method each read
    with pytest.raises(cuda_graph.NotCapturable, match="object"):
        cuda_graph.fingerprint(object())
    import functools                                  # a new partial each forward (patched activations)
    assert cuda_graph.fingerprint(functools.partial(torch.tanh, out=None)) == \
        cuda_graph.fingerprint(functools.partial(torch.tanh, out=None))
    assert cuda_graph.fingerprint(functools.partial(max, 1.0)) != cuda_graph.fingerprint(functools.partial(max, 2.0))


def test_host_to_device_copies_are_refused():
    """A saved CPU tensor moved to the device inside a capture (a copy from
    pageable memory) is caught before it runs; CPU scalars and CPU-to-CPU copies
    are not."""
    idx = torch.tensor([3, 1])
    assert cuda_graph._host_to_device("_to_copy", (idx,), {"device": torch.device("cuda", 0)})
    assert cuda_graph._host_to_device("_to_copy", (idx,), {"device": "cuda"})
    assert not cuda_graph._host_to_device("_to_copy", (idx,), {"device": torch.device("cpu")})
    assert not cuda_graph._host_to_device("_to_copy", (idx,), {"dtype": torch.int32})
    assert not cuda_graph._host_to_device("_to_copy", (torch.tensor(2.0),), {"device": "cuda"})
    assert not cuda_graph._host_to_device("copy_", (torch.empty(2, dtype=torch.long), idx), {})


def test_pass_code_makes_no_device_tensor_from_host_data():
    """``torch.tensor(data, device=...)`` copies host data below the dispatcher,
    where the capture's check cannot see it (the leaky-ReLU rule did this: a
    capture then failed with a CUDA error and the pass stayed eager). Code that
    runs inside a pass builds device constants with ``torch.full``."""
    import ast
    import pathlib
    import semitriton.kernels
    root = pathlib.Path(semitriton.__file__).parent
    found = []
    for path in [root / sub for sub in ("rules", "semirings", "fused", "engine.py", "embedded.py", "dispatch.py")] \
            + [pathlib.Path(semitriton.kernels.__file__).parent]:
        for f in sorted(path.rglob("*.py") if path.is_dir() else [path]):
            for node in ast.walk(ast.parse(f.read_text())):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("tensor", "as_tensor")
                        and any(k.arg == "device" for k in node.keywords)):
                    found.append(f"{f}:{node.lineno}")
    assert not found, found


def test_signature_covers_the_semiring_and_global_settings():
    """A captured pass freezes in the semiring's class and torch's matmul
    precision settings: a change gives another signature. Custom semirings
    are never captured (their state cannot be compared)."""
    _, emb, score = _forward("bert", True)
    graph = engine.GradientGraph(score, (emb,))
    sr = get("abs")
    sig = cuda_graph.signature(graph, score, sr, torch.float32, "torch")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high" if before != "high" else "highest")
        assert cuda_graph.signature(graph, score, sr, torch.float32, "torch") != sig
    finally:
        torch.set_float32_matmul_precision(before)
    assert cuda_graph.signature(graph, score, sr, torch.float32, "torch") == sig

    class Renamed(type(sr)):
        pass

    assert cuda_graph.signature(graph, score, Renamed(), torch.float32, "torch") != sig


def test_custom_semiring_runs_eagerly(emulated):
    from semitriton.semirings.abs import Abs

    class MyAbs(Abs):
        pass

    model, emb, score = _forward("gpt2", True)
    before = _counts(emulated)
    for _ in range(3):
        (a,) = semitriton.grad(score, emb, semiring=MyAbs(), cuda_graph=True)
    assert _counts(emulated) == before and not cuda_graph._CACHE
    (b,) = semitriton.grad(score, emb, semiring="abs")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_capture_branch_with_stubbed_cuda(monkeypatch):
    """The GPU branch of the capture (not the CPU emulation) with torch.cuda's
    streams and graphs stubbed: the captured pass is run once as a warm-up on
    the capture stream, then inside begin/end of the capture, and the capturing
    call returns the eager result, the memory the capture reserved is counted
    against the graphs' budget; an error inside the capture ends the capture
    and is the one reported."""
    import contextlib

    events, invalid = [], []

    class Graph:
        def capture_begin(self, capture_error_mode=None):
            events.append("begin")

        def capture_end(self):
            events.append("end")
            if invalid:                               # as CUDA: an invalidated capture fails to end
                raise RuntimeError("operation not permitted when stream is capturing")

        def replay(self):
            events.append("replay")

        def reset(self):
            pass

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 4096 * events.count("begin"))
    monkeypatch.setattr(cuda_graph, "_on_cuda", lambda t: True)
    monkeypatch.setattr(cuda_graph, "EMULATE", False)
    cuda_graph.clear()
    walks = []
    inner = engine._walk

    def counted(*a, **k):
        walks.append(1)
        return inner(*a, **k)

    monkeypatch.setattr(engine, "_walk", counted)
    try:
        model, emb, score = _forward("llama", True)
        (want,) = semitriton.grad(score, emb, semiring="maxabs")
        del walks[:]
        got = [semitriton.grad(score, emb, semiring="maxabs", cuda_graph=True)[0] for _ in range(2)]
        assert len(walks) == 1 + 2 and events == ["begin", "end", "replay"]   # eager; warm-up + capture
        (entry,) = cuda_graph._CACHE.values()
        assert entry.pool_bytes == 4096               # the pool the capture reserved counts as held
        for g in got:
            torch.testing.assert_close(g, want, rtol=0, atol=0)

        def broken(*a, **k):                          # a failure inside the capture
            if events and events[-1] == "begin":
                invalid.append(1)
                raise RuntimeError("inside the capture")
            return inner(*a, **k)

        monkeypatch.setattr(engine, "_walk", broken)
        cuda_graph.clear()
        events.clear()
        _, emb, score = _forward("llama", True, model=model, ids=IDS[:1])
        semitriton.grad(score, emb, semiring="maxabs", cuda_graph=True)
        with pytest.warns(RuntimeWarning, match="inside the capture"):
            (a,) = semitriton.grad(score, emb, semiring="maxabs", cuda_graph=True)
        assert events == ["begin", "end"]
        (b,) = semitriton.grad(score, emb, semiring="maxabs")
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        cuda_graph.clear()


def test_static_buffers_keep_the_alignment_of_the_views():
    """A buffer holds the span of a storage that the pass reads; a view in it
    sits at the address alignment (mod 512 bytes) of the tensor it stands for,
    so Triton specialises a captured launch as it did the eager one."""
    base = torch.randn(300)
    values = {(0, "a"): base[3:40], (1, "b"): base[77:150].view(73, 1)}
    entry = cuda_graph._Entry(reads={}, tensors={}, hints=[])
    plan, statics, subs = cuda_graph._plan(entry, values)
    assert len(statics) == 1
    for key, t in values.items():
        v = subs[key]
        assert torch.equal(v, t) and v.stride() == t.stride()
        assert (v.data_ptr() - statics[0].data_ptr()) % 512 == (t.data_ptr() - base.data_ptr()) % 512


def test_an_uncomparable_read_keeps_the_eager_pass_and_never_replays():
    class G:
        order = []

    rec = cuda_graph.Recorder(G())
    rec.note(0, "odd", object())
    assert rec.reads[(0, "odd")][0] == "X"

    class G2:
        order = [type("Node", (), {"odd": object()})()]

    assert not cuda_graph.reads_match(G2(), rec.reads)


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)
except ImportError:  # pragma: no cover
    _copy = None


@pytest.mark.skipif(_copy is None, reason="needs triton")
def test_closure_catches_outside_tensors_in_torch_ops_and_triton_launches():
    class G:
        order = []

    rec = cuda_graph.Recorder(G())
    outside = torch.arange(8.0)
    with cuda_graph._Closure(rec) as closure:
        inside = torch.ones(8)
        (inside * 2).sum()
    assert closure.bad == []
    with cuda_graph._Closure(rec) as closure:
        (outside * 2).sum()
    assert closure.bad and "torch op mul" in closure.bad[0]
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        return
    dev = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
    src = torch.arange(8.0, device=dev)
    with cuda_graph._Closure(rec) as closure:
        dst = torch.empty(8, device=dev)
        _copy[(1,)](src, dst, 8, BLOCK=8)
    assert any("Triton kernel _copy" in b for b in closure.bad), closure.bad
    rec.note(0, "_saved_x", src)                                     # read from a node: allowed
    with cuda_graph._Closure(rec) as closure:
        dst = torch.empty(8, device=dev)
        _copy[(1,)](src, dst, 8, BLOCK=8)
    assert closure.bad == []


def test_closure_catches_host_synchronisations():
    """What a CUDA capture cannot hold (the device's data read by the host) is
    caught on the CPU too; a wrapped CPU scalar read from a node, and the eager
    live-row count, are not synchronisations of a capture."""
    class G:
        order = []

    rec = cuda_graph.Recorder(G())
    for op in (lambda x: x.sum().item(), lambda x: bool(x.sum() > 0), lambda x: x.nonzero(),
               lambda x: x[x > 0], lambda x: torch.masked_select(x, x > 0), lambda x: torch.unique(x),
               lambda x: x.repeat_interleave((x > 0).long())):
        with cuda_graph._Closure(rec, cpu_is_device=True) as closure:     # CPU tensors stand for device ones
            op(torch.arange(8.0) - 3)
        assert closure.bad and ("synchronisation" in closure.bad[0] or "waits for the device" in closure.bad[0]), \
            closure.bad
        with cuda_graph._Closure(rec) as closure:                        # a GPU pass: CPU tensors do not wait
            op(torch.arange(8.0) - 3)
        assert closure.bad == []
    with pytest.raises(cuda_graph.NotCapturable, match="host synchronisation"):
        with cuda_graph._Closure(rec, cpu_is_device=True, fail_fast=True):   # a capture: stop before the op
            torch.arange(8.0).sum().item()
    saved = torch.tensor([4.0])                       # a saved activation (device data), read from a node
    rec.note(0, "_saved_self", saved)
    with cuda_graph._Closure(rec, cpu_is_device=True) as closure:
        saved.item()
    assert closure.bad and "synchronisation" in closure.bad[0]
    scalar = torch.tensor(2.5, dtype=torch.float64)
    rec.note(0, "_saved_alpha", scalar)
    with cuda_graph._Closure(rec, cpu_is_device=True) as closure:
        assert scalar.item() == 2.5
        x = torch.arange(8.0)
        torch.where(x > 3, x, 0.0).sum()
        torch.nonzero_static(x > 3, size=4)
        x.repeat_interleave(2)                                      # int repeats: an expand
        x.repeat_interleave((x > 3).long(), output_size=4)          # the size given: no wait
        cuda_graph._ACTIVE = rec
        try:
            assert cuda_graph.live_rows(x > 3, 0.9)[0] == 4
        finally:
            cuda_graph._ACTIVE = None
    assert closure.bad == []


def test_live_row_decisions_are_replayed_and_checked():
    class G:
        order = []

    live = torch.tensor([True, False, False, True, False, False, False, False])
    rec = cuda_graph.Recorder(G())
    cuda_graph._ACTIVE = rec
    try:
        n, idx = cuda_graph.live_rows(live, 0.5)
        n_full, idx_full = cuda_graph.live_rows(torch.ones(8, dtype=torch.bool), 0.5)
    finally:
        cuda_graph._ACTIVE = None
    assert n == 2 and idx.tolist() == [0, 3] and idx_full is None and n_full == 8
    assert rec.hints == [2, None], "only counts are kept (no device tensor outlives the eager pass)"

    cap = cuda_graph.Recorder(G(), capturing=True)
    cap.hints, cap.flag = rec.hints, torch.zeros((), dtype=torch.bool)
    cuda_graph._ACTIVE = cap
    try:
        n2, idx2 = cuda_graph.live_rows(torch.tensor([False, False, True, False, False, False, True, False]), 0.5)
        assert n2 == 2 and idx2.tolist() == [2, 6] and not bool(cap.flag)   # other rows, as many: exact
        assert cuda_graph.live_rows(torch.ones(8, dtype=torch.bool), 0.5) == (8, None)
        with pytest.raises(cuda_graph.NotCapturable):
            cuda_graph.live_rows(live, 0.5)
        cap.hint_i = 0
        n3, idx3 = cuda_graph.live_rows(torch.tensor([False, False, False, True, False, False, False, False]), 0.5)
        assert idx3.tolist() == [3, 0] and not bool(cap.flag)    # fewer: padded with row 0, still exact
        cap.hint_i = 0
        cuda_graph.live_rows(torch.tensor([True, True, False, True, False, False, False, False]), 0.5)
        assert bool(cap.flag), "more live rows than recorded invalidate the replay"
    finally:
        cuda_graph._ACTIVE = None


def test_padded_live_rows_give_the_exact_product():
    """The capture's fixed-size row list (padding repeats row 0) gives the eager result."""
    from semitriton.rules.linalg import live_rows_matmul

    class G:
        order = []

    sr = get("maxabs")
    w = torch.randn(9000, 8)
    v = (torch.full((5, 9000), float("-inf")),)
    v[0][1] = torch.randn(9000)
    v[0][3] = torch.randn(9000)
    want = live_rows_matmul(sr, v, w)
    cap = cuda_graph.Recorder(G(), capturing=True)
    cap.hints, cap.flag = [3], torch.zeros((), dtype=torch.bool)       # recorded with one more live row
    cuda_graph._ACTIVE = cap
    try:
        got = live_rows_matmul(sr, v, w)
    finally:
        cuda_graph._ACTIVE = None
    assert cap.hint_i == 1 and not bool(cap.flag)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert torch.isfinite(got[0][1]).all() and torch.isinf(got[0][0]).all()


def test_autotuning_is_refused_inside_a_capture(monkeypatch):
    from semitriton.kernels import _common
    monkeypatch.setattr(_common, "autotune_enabled", lambda: True)
    monkeypatch.setattr(_common, "frozen", True)
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
        _common.choose(("test-frozen", object()), [{"a": 1}, {"a": 2}], lambda cfg: None)


def test_cuda_graph_on_cpu_tensors_is_the_eager_pass():
    _, emb, score = _forward("gpt2", True)
    before = (cuda_graph.stats().eager, cuda_graph.stats().replays)
    for s in ("abs", "max"):
        (a,) = semitriton.grad(score, emb, semiring=s, cuda_graph=True)
        (b,) = semitriton.grad(score, emb, semiring=s)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (cuda_graph.stats().eager, cuda_graph.stats().replays) == before


@pytest.fixture
def emulated(monkeypatch):
    """The CUDA-graph path on CPU tensors, with replays emulated by re-running
    the captured pass on the same static buffers (what a graph replays)."""
    monkeypatch.setattr(cuda_graph, "_on_cuda", lambda t: True)
    monkeypatch.setattr(cuda_graph, "EMULATE", True)
    cuda_graph.clear()
    yield cuda_graph.stats()
    cuda_graph.clear()


def _counts(st):
    return (st.eager, st.captures, st.replays, st.mismatches)


def _steps(model, kind, semirings, steps, change=None, position=lambda i: -1, seed=1):
    """Forwards on new inputs (same shapes): the cuda_graph result equals the eager one each time."""
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        if change is not None:
            change(model, i)
        ids = torch.randint(3, 19, IDS.shape, generator=g)       # the tiny models' vocabularies
        _, emb, score = _forward(kind, True, model=model, ids=ids, position=position(i))
        for s in semirings:
            kw = dict(fast_real=False) if s == "real" else {}
            (a,) = semitriton.grad(score, emb, semiring=s, cuda_graph=True, **kw)
            (b,) = semitriton.grad(score, emb, semiring=s, **kw)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True, msg=f"{kind}/{s} step {i}")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_emulated_replays_follow_new_inputs(kind, emulated):
    """Replays read every activation from the static buffers the new forward is
    copied into: a read left pointing at the capture's forward would give that
    forward's statistics."""
    model, _, _ = _forward(kind, True)
    before = _counts(emulated)
    emulated.prologue_ms = []
    _steps(model, kind, ("abs", "maxabs", "max", "real"), 4)
    eager, captures, replays, mismatches = (a - b for a, b in zip(_counts(emulated), before))
    assert (eager, captures, replays, mismatches) == (4, 4, 12, 0)
    for ids in (IDS, IDS.flip(1), IDS.roll(1, 1)):                               # raw values the same way
        _, emb, score = _forward(kind, True, model=model, ids=ids)
        (raw,) = semitriton.grad_values(score, emb, "entropy", cuda_graph=True)
        (ref,) = semitriton.grad_values(score, emb, "entropy")
        for a, b in zip(raw, ref):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert _counts(emulated)[2] - before[2] == 12 + 2    # entropy: eager, capture + replay, replay
    assert len(emulated.prologue_ms) == 12 + 2 and all(t > 0 for t in emulated.prologue_ms)   # one per replay


def test_emulated_replay_sees_weights_changed_in_place_and_refuses_moved_ones(emulated):
    model, _, _ = _forward("llama", True)

    def change(m, i):
        if i == 2:
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(1.1)                      # in place: the replay reads the new values
        if i == 4:
            m.lm_head.weight = torch.nn.Parameter(m.lm_head.weight.detach() * 0.9, requires_grad=False)

    before = _counts(emulated)
    _steps(model, "llama", ("abs",), 6, change)
    eager, captures, replays, mismatches = (a - b for a, b in zip(_counts(emulated), before))
    assert captures == 2 and mismatches == 1 and eager == 2 and replays == 4, _counts(emulated)


def test_policy_mismatches_then_eager_for_good(emulated):
    """Another scored position each call (same signature, other saved index):
    eager every time, and after MAX_MISSES in a row not even recorded."""
    model, _, _ = _forward("gpt2", True)
    before = _counts(emulated)
    n = cuda_graph.MAX_MISSES + 2
    _steps(model, "gpt2", ("max",), n, position=lambda i: -1 - (i % 2))
    eager, captures, replays, mismatches = (a - b for a, b in zip(_counts(emulated), before))
    assert (captures, replays, mismatches) == (0, 0, cuda_graph.MAX_MISSES)
    assert eager == 1 + cuda_graph.MAX_MISSES            # the rest ran eagerly without recording
    (entry,) = cuda_graph._CACHE.values()
    assert entry.disabled


def test_invalidated_replays_count_as_misses(emulated, monkeypatch):
    """Replays the live-row check invalidates (more live rows than the recorded
    pass, e.g. a head scored at a varying number of positions) each re-record
    and re-capture: after MAX_MISSES in a row the signature stays eager instead
    of capturing on every other call; results are the eager ones throughout."""
    def invalidated(entry, graph, t0):               # the replay ran, and its flag is set
        entry.graph.replay()
        cuda_graph.STATS.invalidated += 1
        return None

    monkeypatch.setattr(cuda_graph, "_replay", invalidated)
    model, _, _ = _forward("llama", True)
    before = _counts(emulated)
    _steps(model, "llama", ("abs",), 2 * cuda_graph.MAX_MISSES + 2)
    eager, captures, replays, mismatches = (a - b for a, b in zip(_counts(emulated), before))
    assert (captures, replays, mismatches) == (cuda_graph.MAX_MISSES, 0, 0)
    assert eager == 1 + cuda_graph.MAX_MISSES
    (entry,) = cuda_graph._CACHE.values()
    assert "invalidated" in entry.disabled


def test_graph_passes_from_two_threads_run_one_at_a_time(emulated, monkeypatch):
    """A cuda_graph pass started in a second thread while the first is inside
    its walk waits for it (the cache and the capture state are process-wide);
    both get the eager result."""
    import threading

    model, emb, score = _forward("gpt2", True)
    (want,) = semitriton.grad(score, emb, semiring="abs")
    first_in, second_in = threading.Event(), threading.Event()
    overlapped, results = [], {}
    inner = engine._walk

    def walk(*a, **k):
        if threading.current_thread().name == "second":
            second_in.set()
        elif not first_in.is_set():
            first_in.set()
            overlapped.append(second_in.wait(1.0))   # the second pass must not get in meanwhile
        return inner(*a, **k)

    monkeypatch.setattr(engine, "_walk", walk)

    def run(name):
        results[name] = semitriton.grad(score, emb, semiring="abs", cuda_graph=True)[0]

    t1 = threading.Thread(target=run, args=("first",), name="first")
    t1.start()
    assert first_in.wait(30)
    t2 = threading.Thread(target=run, args=("second",), name="second")
    t2.start()
    t1.join(60)
    t2.join(60)
    assert overlapped == [False]
    for name in ("first", "second"):
        torch.testing.assert_close(results[name], want, rtol=0, atol=0)


def test_refused_capture_leaves_the_signature_eager(emulated, monkeypatch):
    """A pass that reads a tensor from outside (here: the cached log|W| a
    capture must not freeze in) is not captured: a warning names the read,
    the call and the later ones run eagerly, results unchanged."""
    import contextlib

    from semitriton import weight_cache
    monkeypatch.setattr(weight_cache, "bypass", contextlib.nullcontext)
    model, _, _ = _forward("llama", True)
    before = _counts(emulated)
    with pytest.warns(RuntimeWarning, match="outside the pass"):
        _steps(model, "llama", ("maxabs",), 3)
    eager, captures, replays, mismatches = (a - b for a, b in zip(_counts(emulated), before))
    assert (eager, captures, replays) == (1, 0, 0)
    (entry,) = cuda_graph._CACHE.values()
    assert "NotCapturable" in entry.disabled and entry.graph is None and not entry.statics


def test_a_grouped_matmul_pass_is_never_captured(emulated):
    """A mixture-of-experts layer's grouped matmul splits its rows by group
    sizes read on the host, which change with the routing: the pass is
    refused at capture and every call runs eagerly, following the new groups."""
    a, b = torch.randn(9, 8), torch.randn(3, 8, 4)
    w = torch.randn(9, 4)

    def pass_(offs, cuda_graph):
        la = a.clone().requires_grad_()
        y = torch._grouped_mm(la, b, offs=torch.tensor(offs, dtype=torch.int32))
        return semitriton.grad((y * w).sum(), la, semiring="abs", cuda_graph=cuda_graph)[0]

    _assert_never_captured(emulated, pass_, ([3, 5, 9], [3, 5, 9], [1, 7, 9], [6, 6, 9]), "grouped matmul")


def _assert_never_captured(emulated, pass_, calls, warning):
    """``pass_(arg, cuda_graph)`` for each of ``calls`` with cuda_graph=True
    warns (``warning``), neither captures nor replays, runs eagerly, and
    equals the plain pass bit for bit."""
    before = _counts(emulated)
    with pytest.warns(RuntimeWarning, match=warning):
        got = [pass_(c, True) for c in calls]
    eager, captures, replays, _ = (x - y for x, y in zip(_counts(emulated), before))
    assert captures == 0 and replays == 0 and eager >= 1
    for c, g in zip(calls, got):
        torch.testing.assert_close(g, pass_(c, False), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["write_into_slice", "as_strided"])
def test_probing_rules_are_never_captured(emulated, op):
    """The rules of in-place writes into a view (CopySlices) and of
    as_strided read their edges off the node's backward on the host: the
    pass is refused at capture, before they issue device work, and every
    call runs eagerly."""
    w = torch.randn(3, 4)

    def pass_(x, cuda_graph):
        x = x.clone().requires_grad_()
        if op == "write_into_slice":
            y = x * 2.0
            y[:, 1:3] = x[:, :2].sin()
        else:
            y = (x * 2.0).as_strided((3, 4), (2, 1))
        return semitriton.grad((y * w).sum(), x, semiring="abs", cuda_graph=cuda_graph)[0]

    xs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    _assert_never_captured(emulated, pass_, xs, "in-place write|strided input")


@pytest.mark.parametrize("limit", ["count", "bytes"])
def test_only_the_most_recent_graphs_keep_their_buffers(emulated, monkeypatch, limit):
    """Three batch shapes: three signatures captured, but only the most
    recently replayed keep a graph and static buffers: MAX_GRAPHS of them,
    or as many as MAX_GRAPH_BYTES holds (at least one)."""
    if limit == "count":
        monkeypatch.setattr(cuda_graph, "MAX_GRAPHS", 2)
        keep = 2
    else:
        monkeypatch.setattr(cuda_graph, "MAX_GRAPH_BYTES", 1)
        keep = 1
    model, _, _ = _forward("llama", True)
    for rows in (1, 2, 1, 2):
        for ids in (IDS[:rows], IDS[:rows].flip(1)):
            _, emb, score = _forward("llama", True, model=model, ids=ids)
            (a,) = semitriton.grad(score, emb, semiring="abs", cuda_graph=True)
            (b,) = semitriton.grad(score, emb, semiring="abs")
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert sum(e.graph is not None for e in cuda_graph._CACHE.values()) == keep
    _, emb, score = _forward("llama", True, model=model, ids=IDS[:, :5])              # a third shape
    for _ in range(2):
        semitriton.grad(score, emb, semiring="abs", cuda_graph=True)
    kept = [e for e in cuda_graph._CACHE.values() if e.graph is not None]
    assert len(kept) == keep and all(e.statics for e in kept)
    assert sum(bool(e.statics) for e in cuda_graph._CACHE.values()) == keep


def test_static_buffers_only_for_activations(emulated):
    """Parameters are read in place (checked by address); everything else from buffers."""
    model, _, _ = _forward("llama", True)
    _steps(model, "llama", ("abs",), 2)
    (entry,) = cuda_graph._CACHE.values()
    acts = [a for acts in entry.plan.values() for a in acts]
    params = {a[1] for a in acts if a[0] == "param"}
    assert params <= {p.data_ptr() for p in model.parameters()} and params
    assert entry.statics and all(not isinstance(b, torch.nn.Parameter) for b in entry.statics)
    assert len({id(b) for b in entry.statics}) == len(entry.statics)


# ---- on a GPU ------------------------------------------------------------------------------
gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and TRITON_INTERPRET=0")]


def _replays_equal_eager(model, kind, semirings, steps, change=None, position=lambda i: -1):
    g = torch.Generator().manual_seed(1)
    replays0 = cuda_graph.stats().replays
    for i in range(steps):
        if change is not None:
            change(model, i)
        ids = torch.randint(3, 19, IDS.shape, generator=g)        # the tiny models' vocabularies
        _, emb, score = _forward(kind, True, "cuda", model=model, ids=ids, position=position(i))
        for s in semirings:
            kw = dict(fast_real=False) if s == "real" else {}
            (a,) = semitriton.grad(score, emb, semiring=s, cuda_graph=True, **kw)
            (b,) = semitriton.grad(score, emb, semiring=s, **kw)
            assert_semiring_close(a.double().cpu(), b.double().cpu().numpy(), s, 1e-5, f"{kind}/{s} step {i}")
    return cuda_graph.stats().replays - replays0


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_replays_equal_the_eager_pass_gpu(kind):
    from hf_models import build
    cuda_graph.clear()
    model = semitriton.patch(build(kind).cuda().requires_grad_(False))
    replays = _replays_equal_eager(model, kind, SEMIRINGS, 5)
    assert replays >= len(SEMIRINGS), (replays, cuda_graph.stats())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_replay_sees_weights_changed_in_place_gpu():
    from hf_models import build
    cuda_graph.clear()
    model = semitriton.patch(build("llama").cuda().requires_grad_(False))

    def change(m, i):
        if i >= 3:
            with torch.no_grad():
                for p in m.parameters():
                    p.mul_(1.1)

    replays = _replays_equal_eager(model, "llama", ("abs", "maxabs", "entropy"), 6, change)
    assert replays >= 3, cuda_graph.stats()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_replay_follows_the_scored_position_gpu():
    from hf_models import build
    cuda_graph.clear()
    model = semitriton.patch(build("gpt2").cuda().requires_grad_(False))
    _replays_equal_eager(model, "gpt2", ("abs", "max"), 8, position=lambda i: -1 - (i // 4))
