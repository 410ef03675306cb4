"""Model-level benchmark: forward + semitriton.grad per semiring against
forward + torch.autograd.grad to the input embeddings (parameters frozen), in
the same run, on random-weight BERT-base (batch 32, seq 128) and a
SmolLM2-135M-config LLaMA (batch 8, seq 512), fp32 and bf16.

    python bench/bench_models.py --out bench/out/models.json --md bench/out/models.md
    python bench/bench_models.py --quick          # smaller shapes (a CPU dry run)

Per configuration and semiring it records the median time of forward +
backward and of the backward alone (each iteration times its forward and
its backward separately, synchronised), the backward's ratio to the native
input backward of the unpatched model (the issue's target) and to
``torch.autograd.grad`` on the patched model (the same forward: on SmolLM2
fp32 the unpatched model's GQA runs SDPA's math kernel), peak memory
(including the weight caches the semiring pass builds) and its ratio to
native, a correctness check of the Triton backend against the torch reference
rules on the same graph (relative error of the readouts), and where the time
goes: device time per rule type and the Python overhead (the backward's
wall time minus GPU busy time from the torch profiler).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import autotune_table, finish, save_json  # noqa: E402

SEMIRINGS = ("real", "real-walk", "abs", "entropy", "maxabs", "max")
TARGETS = {"real": 1.05, "real-walk": 1.05, "abs": 1.2, "entropy": 1.5, "maxabs": 1.6, "max": 3.0}


def _grad(score, emb, s, **kw):
    """``real-walk``: the real semiring through the semiring walk instead of
    PyTorch's autograd engine (what every other semiring pays)."""
    import semitriton
    if s == "real-walk":
        return semitriton.grad(score, emb, semiring="real", fast_real=False, **kw)
    return semitriton.grad(score, emb, semiring=s, **kw)


def build(name: str, quick: bool):
    import transformers as t
    torch.manual_seed(0)
    if name == "bert-base":
        cfg = t.BertConfig() if not quick else t.BertConfig(num_hidden_layers=2, hidden_size=128,
                                                             num_attention_heads=2, intermediate_size=256)
        cfg._attn_implementation = "sdpa"
        return t.BertForMaskedLM(cfg), (32, 128) if not quick else (2, 16)
    cfg = t.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                        tie_word_embeddings=True, max_position_embeddings=2048)
    if quick:
        cfg.num_hidden_layers, cfg.vocab_size = 2, 1000
    cfg._attn_implementation = "sdpa"
    return t.LlamaForCausalLM(cfg), (8, 512) if not quick else (2, 16)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def timed_split(fwd, bwd, dev, warmup=2, reps=5):
    """Medians (ms) of forward + backward, of the forward and of the backward:
    each iteration runs ``state = fwd()``, synchronises, then ``bwd(state)``,
    so the backward is timed in the same iteration as its own forward instead
    of as a difference of two separately timed medians."""
    for _ in range(warmup):
        bwd(fwd())
    _sync(dev)
    tot, fw, back = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        state = fwd()
        _sync(dev)
        t1 = time.perf_counter()
        bwd(state)
        _sync(dev)
        t2 = time.perf_counter()
        tot.append((t2 - t0) * 1e3)
        fw.append((t1 - t0) * 1e3)
        back.append((t2 - t1) * 1e3)
    return statistics.median(tot), statistics.median(fw), statistics.median(back)


def peak(fn, dev):
    if dev.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    _sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20


def _device_us(e) -> float:
    """An event's own device time in µs (the attribute's name depends on the
    torch version; the older one warns when read)."""
    if hasattr(e, "self_device_time_total"):
        return e.self_device_time_total
    return getattr(e, "self_cuda_time_total", 0.0)


def gpu_busy_ms(fn, dev):
    """Sum of device kernel time of one call (torch profiler)."""
    if dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    _sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(dev)
    total = 0.0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total += _device_us(e)
    return total / 1e3


def top_kernels(fn, dev, k: int = 8) -> list:
    """The k device kernels with the most total time in one call of ``fn``
    (torch profiler): [[name, ms, calls], ...]."""
    if dev.type != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile
    _sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync(dev)
    tot: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = _device_us(e)
            ms, n = tot.get(e.name, (0.0, 0))
            tot[e.name] = (ms + t / 1e3, n + 1)
    top = sorted(tot.items(), key=lambda kv: -kv[1][0])[:k]
    return [[name[:90], round(ms, 3), n] for name, (ms, n) in top]


def setup(name, dtype, dev, quick):
    """The model in eval mode with frozen parameters, and the input embeddings of
    a fixed random batch."""
    model, (B, T) = build(name, quick)
    model = model.to(dev, dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(5, min(1000, model.config.vocab_size), (B, T), generator=gen).to(dev)
    with torch.no_grad():
        emb0 = model.get_input_embeddings()(ids)
    return model, emb0


def forward_score(model, emb0):
    """(embeddings requiring grad, [B] per-example logit differences)."""
    emb = emb0.detach().clone().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    return emb, logits[:, -1, 7].float() - logits[:, -1, 3].float()


def rel_err(a, b, s):
    """(largest relative difference of readouts ``a`` from ``b`` where ``b`` is
    finite, whether both are infinite at the same places); real and entropy
    relative to the largest |b| (they cross zero), the others elementwise."""
    fin = torch.isfinite(b)
    same_inf = bool(torch.equal(fin, torch.isfinite(a)))
    a, b = a[fin].double(), b[fin].double()
    den = b.abs().max().clamp_min(1e-300) if s in ("real-walk", "entropy") else b.abs().clamp_min(1e-300)
    return (float(((a - b).abs() / den).max()) if a.numel() else 0.0), same_inf


def run_config(name, dtype, dev, quick, semirings, log, linear=False, reps=5, on_row=None, check=None,
               cuda_graph=False):
    """Rows for one model/dtype; ``on_row(row)`` is called as each one is done
    (so a time limit loses at most the row in progress). ``check``: the
    semirings whose Triton result is compared with the torch reference on the
    same graph (None: all). ``cuda_graph``: also a row per semiring (but
    ``real``, which runs PyTorch's engine) with ``semitriton.grad(...,
    cuda_graph=True)``, checked against the eager pass on the same graph."""
    import semitriton
    from semitriton import weight_cache
    from semitriton.engine import RuleProfile
    model, emb0 = setup(name, dtype, dev, quick)
    B, T = emb0.shape[:2]

    def forward(m):
        return forward_score(m, emb0)

    def autograd(state):
        emb, score = state
        torch.autograd.grad(score.sum(), emb)

    def native():
        autograd(forward(model))

    def fwd_only():
        with torch.no_grad():
            forward(model)

    rows = []
    fwd_ms = timed(fwd_only, dev)
    # the backward is timed after its own forward (which records the graph), in
    # the same iteration, for the native model as for the patched one
    nat_ms, fwd_graph_ms, nat_bwd = timed_split(lambda: forward(model), autograd, dev)
    nat_peak = peak(native, dev)
    log(f"{name} {dtype}: forward {fwd_ms:.2f} ms ({fwd_graph_ms:.2f} recording the graph), "
        f"forward+input backward {nat_ms:.2f} ms (backward {nat_bwd:.2f})")
    base = {"model": name, "dtype": str(dtype).replace("torch.", ""), "batch": B, "seq": T,
            "native_forward_ms": fwd_ms, "native_forward_graph_ms": fwd_graph_ms, "native_ms": nat_ms,
            "native_backward_ms": nat_bwd, "native_peak_mb": nat_peak}
    if "real" in semirings:        # where the native backward's device time goes (vs the patched model's)
        emb, score = forward(model)
        native_top = top_kernels(lambda: torch.autograd.grad(score.sum(), emb), dev)
    semitriton.patch(model, linear=linear)
    base["variant"] = "patch(linear=True)" if linear else "patch()"
    # torch.autograd.grad on the patched model: the same forward as the
    # semiring rows (the unpatched model's attention may run another kernel)
    _, pf_ms, pnat_bwd = timed_split(lambda: forward(model), autograd, dev)
    base["patched_native_backward_ms"] = pnat_bwd
    log(f"  patched: forward {pf_ms:.2f} ms, torch.autograd.grad backward {pnat_bwd:.2f} ms")
    for s in semirings:
        row = dict(base, semiring=s, patched_forward_ms=pf_ms)
        try:
            def ours():
                emb, score = forward(model)
                _grad(score, emb, s)

            ms, _, bwd = timed_split(lambda: forward(model), lambda st: _grad(st[1], st[0], s), dev, reps=reps)
            row.update(ms=ms, backward_ms=bwd, ratio=bwd / nat_bwd if nat_bwd > 0 else None,
                       ratio_patched_native=bwd / pnat_bwd if pnat_bwd > 0 else None, target=TARGETS[s])
            # the peak includes building the weight caches (|W|, log|W|, ...), which stay allocated
            weight_cache.clear()
            row["peak_mb"] = peak(ours, dev)
            row["weight_cache_mb"] = weight_cache.stats()["bytes"] / 2**20
            if nat_peak and row["peak_mb"]:
                row["peak_ratio"] = row["peak_mb"] / nat_peak
            emb, score = forward(model)
            _sync(dev)
            with RuleProfile() as prof:
                _grad(score, emb, s)
            summ = prof.summary()
            busy = gpu_busy_ms(lambda: _grad(score, emb, s), dev)
            # Python overhead: the backward's wall time (synchronised, graph
            # building included) when the device had no kernel to run
            row.update(walk_wall_ms=summ["wall_ms"], gpu_busy_ms=busy,
                       python_overhead_ms=None if busy is None else max(0.0, bwd - busy),
                       nodes=sum(summ["calls"].values()),
                       top_rules={k: round(v, 3) for k, v in list(summ["per_rule_ms"].items())[:8]})
            if s == "real":
                row["native_top_kernels"] = native_top
                row["top_kernels"] = top_kernels(lambda: _grad(score, emb, s), dev)
                for label, top in (("native", native_top), ("patched", row["top_kernels"])):
                    log(f"  real, {label} backward, top device kernels (ms, calls): "
                        + "; ".join(f"{n} {ms:.2f} x{c}" for n, ms, c in top))
            # the Triton backend against the torch reference on this very graph
            if dev.type == "cuda" and s != "real" and (check is None or s in check):
                (a,) = _grad(score, emb, s, backend="triton")
                (b,) = _grad(score, emb, s, backend="torch")
                row["triton_vs_torch_rel_err"], row["triton_vs_torch_same_infinities"] = rel_err(a, b, s)
            pk, po = row.get("peak_ratio"), row.get("python_overhead_ms")
            log(f"  {s:8s} fwd+bwd {ms:8.2f} ms  backward ratio {row['ratio']:.2f} (target {TARGETS[s]})  "
                f"peak {'-' if pk is None else f'{pk:.2f}x'}  "
                f"python overhead {'-' if po is None else f'{po:.1f} ms'}"
                f"  triton-vs-torch {row.get('triton_vs_torch_rel_err', float('nan')):.1e}")
        except Exception as exc:                      # record and go on
            _failed(row, exc, f"  {s:8s}", log)
        rows.append(row)
        if on_row is not None:
            on_row(row)
        if cuda_graph and s != "real":
            row = graph_row(base, s, pf_ms, nat_bwd, pnat_bwd, nat_peak, forward, model, dev, reps, log)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    semitriton.unpatch(model)
    return rows


def graph_row(base, s, pf_ms, nat_bwd, pnat_bwd, nat_peak, forward, model, dev, reps, log):
    """The semiring pass replayed from a CUDA graph: timed like the eager row
    (the warm-ups record and capture), with the replay counters and the
    largest relative difference to the eager pass on the same graph."""
    from semitriton import cuda_graph, weight_cache
    row = dict(base, semiring=s, patched_forward_ms=pf_ms, variant=base["variant"] + " + cuda_graph")
    try:
        before = (cuda_graph.stats().replays, cuda_graph.stats().captures, cuda_graph.stats().eager)

        def ours():
            emb, score = forward(model)
            _grad(score, emb, s, cuda_graph=True)

        ms, _, bwd = timed_split(lambda: forward(model), lambda st: _grad(st[1], st[0], s, cuda_graph=True),
                                 dev, reps=reps)
        st = cuda_graph.stats()
        row.update(ms=ms, backward_ms=bwd, ratio=bwd / nat_bwd if nat_bwd > 0 else None,
                   ratio_patched_native=bwd / pnat_bwd if pnat_bwd > 0 else None,
                   target=TARGETS[s], graph_replays=st.replays - before[0], graph_captures=st.captures - before[1],
                   graph_eager=st.eager - before[2], graph_failures=list(st.failures[-2:]),
                   graph_prologue_ms=(statistics.median(st.prologue_ms[-(st.replays - before[0]):])
                                      if st.replays > before[0] else None),
                   graph_static_mb=sum(b.numel() * b.element_size() for e in cuda_graph._CACHE.values()
                                       for b in e.statics) / 2**20)
        cuda_graph.clear()
        weight_cache.clear()
        # record, capture, replay: the peak includes the static buffers, the graph's pool and the weight caches
        row["peak_mb"] = peak(lambda: [ours() for _ in range(3)], dev)
        if nat_peak and row["peak_mb"]:
            row["peak_ratio"] = row["peak_mb"] / nat_peak
        emb, score = forward(model)
        (a,) = _grad(score, emb, s, cuda_graph=True)
        (b,) = _grad(score, emb, s)
        row["graph_vs_eager_rel_err"], _ = rel_err(a, b, s)
        cuda_graph.clear()                          # its buffers and pools are not the next row's
        log(f"  {s:8s} cuda_graph fwd+bwd {ms:8.2f} ms  backward ratio {row['ratio']:.2f}  "
            f"replays {row['graph_replays']} captures {row['graph_captures']} eager {row['graph_eager']}  "
            f"static buffers {row['graph_static_mb']:.0f} MiB  host before replay {row['graph_prologue_ms'] or float('nan'):.1f} ms  "
            f"vs eager {row['graph_vs_eager_rel_err']:.1e} {row['graph_failures']}")
    except Exception as exc:                      # record and go on
        _failed(row, exc, f"  {s:8s} cuda_graph", log)
    return row


def _failed(row, exc, label, log):
    """A row that raised: the error recorded in it and logged, the traceback printed."""
    row["error"] = f"{type(exc).__name__}: {exc}"
    log(f"{label} ERROR {row['error'][:300]}")
    traceback.print_exc()


def warm(name, dtype, dev, quick, semirings, log):
    """One untimed forward + semitriton.grad per semiring on the patched model
    (compiles the Triton kernels these shapes need into Triton's disk cache)."""
    import semitriton
    model, emb0 = setup(name, dtype, dev, quick)
    semitriton.patch(model)
    for s in semirings:
        t0 = time.perf_counter()
        try:
            emb, score = forward_score(model, emb0)
            _grad(score, emb, s)
            _sync(dev)
            log(f"warm {name} {dtype} {s}: {time.perf_counter() - t0:.1f} s")
        except Exception as exc:
            log(f"warm {name} {dtype} {s}: ERROR {type(exc).__name__}: {exc}")
            traceback.print_exc()


def markdown(rows, device_name, date, reps: int = 5) -> str:
    out = [f"Card: {device_name}; date {date}; times are medians of {reps} (native and forward: 5) after 2 "
           "warm-ups, each backward timed after its own forward in the same iteration. Ratios: the backward "
           "against the unpatched model's torch.autograd.grad (the target's) and against torch.autograd.grad "
           "on the patched model (same forward). Peak: the weight caches included.", "",
           "| model | dtype | variant | semiring | native fwd+bwd ms | ours fwd+bwd ms | backward ratio (target) | "
           "ratio to autograd, patched | peak MiB (ratio) | walk: Python overhead / backward ms | "
           "Triton vs torch rel. err. |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['dtype']} | {r.get('variant', '')} | {r['semiring']} | "
                       f"{r['native_ms']:.1f} | error: {r['error'][:80]} | | | | | |")
            continue
        pk = f"{r['peak_mb']:.0f} ({r.get('peak_ratio', float('nan')):.2f}x)" if r.get("peak_mb") else "-"
        po = (f"{r['python_overhead_ms']:.1f} / {r['backward_ms']:.1f}"
              if r.get("python_overhead_ms") is not None else "-")
        te = f"{r['triton_vs_torch_rel_err']:.1e}" if "triton_vs_torch_rel_err" in r else "-"
        rp = f"{r['ratio_patched_native']:.2f}" if r.get("ratio_patched_native") is not None else "-"
        if "graph_replays" in r:
            if r.get("graph_prologue_ms") is not None:
                po = f"host before replay {r['graph_prologue_ms']:.1f}"
            te = (f"replays {r['graph_replays']}/{r['graph_replays'] + r['graph_eager']}; "
                  f"vs eager {r.get('graph_vs_eager_rel_err', float('nan')):.1e}")
        out.append(f"| {r['model']} | {r['dtype']} | {r.get('variant', '')} | {r['semiring']} | "
                   f"{r['native_ms']:.1f} | {r['ms']:.1f} | "
                   f"{r['ratio']:.2f} ({r['target']}) | {rp} | {pk} | {po} | {te} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (dry run)")
    ap.add_argument("--models", default="bert-base,smollm2-135m")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--semirings", default=",".join(SEMIRINGS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--check", default=None,
                    help="semirings to check against the torch reference (default: all; the torch "
                         "references of max and entropy take tens of seconds per model)")
    ap.add_argument("--warm-only", action="store_true",
                    help="one untimed pass per semiring and exit (fills the Triton kernel cache; run several "
                         "of these in parallel before the timed run so that compiling is not timed)")
    ap.add_argument("--linear-variant", action="store_true",
                    help="also time BERT-base fp32 with patch(linear=True) (one node per Linear)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also a row per semiring with semitriton.grad(..., cuda_graph=True)")
    ap.add_argument("--linear-only", action="store_true",
                    help="only patch(linear=True) rows, for every model and dtype given (fewer, larger "
                         "nodes: what it does to a host-bound walk such as SmolLM2's abs)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"

    t_start = time.perf_counter()

    def log(m):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {m}", flush=True)

    rows = []

    def save(row=None):
        """JSON and markdown after every row: a run cut off by a time limit keeps both."""
        if row is not None:
            rows.append(row)
        save_json(args.out, name, time.strftime("%Y-%m-%d"), rows, _autotune_timings())
        if args.md:
            with open(args.md, "w") as f:
                f.write(markdown(rows, name, time.strftime("%Y-%m-%d"), args.reps)
                        + autotune_table(_autotune_timings()))

    if args.warm_only:
        for mname in args.models.split(","):
            for dt in args.dtypes.split(","):
                warm(mname, getattr(torch, dt), dev, args.quick, args.semirings.split(","), log)
        return 0
    plan = [(m, dt, args.linear_only) for dt in args.dtypes.split(",") for m in args.models.split(",")]
    if args.linear_variant and not args.linear_only:
        plan.insert(1, (args.models.split(",")[0], args.dtypes.split(",")[0], True))
    for mname, dt, linear in plan:
        try:
            run_config(mname, getattr(torch, dt), dev, args.quick, args.semirings.split(","), log,
                       linear=linear, reps=args.reps, on_row=save,
                       check=None if args.check is None else args.check.split(","), cuda_graph=args.cuda_graph)
        except Exception as exc:
            log(f"{mname} {dt}: ERROR {type(exc).__name__}: {exc}")
            traceback.print_exc()
    return finish(markdown(rows, name, time.strftime("%Y-%m-%d"), args.reps) + autotune_table(_autotune_timings()),
                  args.md)


def _autotune_timings() -> dict:
    """What the kernels' autotuner measured in this process (which launch
    configs, e.g. split-J matmuls, won at the models' shapes)."""
    try:
        from semitriton.kernels import _common
    except Exception:  # noqa: BLE001 - no triton
        return {}
    return dict(_common.timings)


if __name__ == "__main__":
    sys.exit(main())
