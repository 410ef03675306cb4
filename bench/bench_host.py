"""Host (Python) time of the semiring walk on the GPU code path, measured on
the CPU: the Triton backend under the interpreter with every kernel launch
stubbed out (outputs stay uninitialised, so the numbers are meaningless and
only the time counts), on a model with a real model's graph but tiny widths,
so that torch's CPU ops cost little. Reports µs per node and per rule type.

    python bench/bench_host.py                     # SmolLM2 graph (30 layers), all semirings
    python bench/bench_host.py --model bert-base --semirings abs,entropy
    python bench/bench_host.py --ops               # also: ops issued per pass, by node type

What it leaves out: the launch cost of the real Triton and CUDA launchers, the
device itself, and the dispatch choices made only for CUDA tensors (fp32
abs/entropy linears take the Triton GEMM's launcher here, not
exp/log-around-cuBLAS); what it keeps: the engine loop, the rules, the
dispatch and the kernel launchers' own Python, which is what a host-bound
pass pays per node. The reshape (view) nodes run inline in the walk, without
a rule call: their time is in "engine ms".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"
os.environ["SEMITRITON_BACKEND"] = "triton"

SEMIRINGS = ("real", "abs", "entropy", "maxabs", "max")


def build(name: str):
    import torch
    import transformers as t
    torch.manual_seed(0)
    if name == "bert-base":
        cfg = t.BertConfig(vocab_size=100, hidden_size=48, num_attention_heads=12, intermediate_size=32)
        cfg._attn_implementation = "sdpa"
        return t.BertForMaskedLM(cfg).eval()
    cfg = t.LlamaConfig(vocab_size=100, hidden_size=72, intermediate_size=32, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return t.LlamaForCausalLM(cfg).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", choices=("smollm2-135m", "bert-base"))
    ap.add_argument("--semirings", default=",".join(SEMIRINGS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--linear", action="store_true", help="patch(linear=True): one node per Linear")
    ap.add_argument("--ops", action="store_true",
                    help="count the ops one pass issues (torch ops other than views, Triton launches)")
    args = ap.parse_args(argv)

    import torch
    from triton.runtime import interpreter

    import semitriton
    import semitriton.engine as engine

    torch.set_num_threads(1)
    interpreter.InterpretedFunction.run = lambda self, *a, **k: None       # stub every launch
    model = build(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    semitriton.patch(model, linear=args.linear)
    ids = torch.randint(5, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    score = (logits[:, -1, 7] - logits[:, -1, 3]).sum()
    graph = engine.GradientGraph(score, (emb,))

    per_rule: dict = {}
    calls: dict = {}
    rule_for = engine.rule_for

    def timed_rule_for(node):
        fn = rule_for(node)
        if fn is None:
            return None
        name = type(node).__name__

        def timed(ctx):
            t0 = time.perf_counter()
            try:
                return fn(ctx)
            finally:
                per_rule[name] = per_rule.get(name, 0.0) + time.perf_counter() - t0
                calls[name] = calls.get(name, 0) + 1
        return timed

    print(f"{args.model} graph{' (patch(linear=True))' if args.linear else ''}: {graph.n_nodes} nodes; "
          "Triton launches stubbed; "
          f"min of {args.reps} passes\n")
    print("| semiring | walk ms | µs per node | rules ms | engine ms | top rules (µs per call) |")
    print("|---|---|---|---|---|---|")
    for sr in args.semirings.split(","):
        engine.rule_for = rule_for
        engine.run(score, (emb,), sr, graph=graph)                          # warm caches
        walls = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            engine.run(score, (emb,), sr, graph=graph)
            walls.append(time.perf_counter() - t0)
        engine.rule_for = timed_rule_for
        per_rule.clear()
        calls.clear()
        t0 = time.perf_counter()
        engine.run(score, (emb,), sr, graph=graph)
        wall_i = time.perf_counter() - t0
        engine.rule_for = rule_for
        rules = sum(per_rule.values())
        top = sorted(per_rule.items(), key=lambda kv: -kv[1])[:4]
        tops = ", ".join(f"{k} {v / calls[k] * 1e6:.0f}" for k, v in top)
        wall = min(walls)
        print(f"| {sr} | {wall * 1e3:.1f} | {wall / graph.n_nodes * 1e6:.0f} | {rules * 1e3:.1f} | "
              f"{(wall_i - rules) * 1e3:.1f} | {tops} |")
    if args.ops:
        count_ops(engine, score, emb, graph, args.semirings.split(","))
    return 0


#: torch ops that only make a view (no kernel on CUDA)
VIEW_OPS = frozenset(("view", "_unsafe_view", "reshape", "transpose", "t", "permute", "expand", "unsqueeze",
                      "squeeze", "select", "slice", "as_strided", "alias", "detach", "_reshape_alias", "split",
                      "unbind", "narrow", "diagonal", "split_with_sizes", "chunk", "unflatten", "view_as"))
#: torch ops that only allocate (host work for the caching allocator, no kernel)
ALLOC_OPS = frozenset(("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"))


def count_ops(engine, score, emb, graph, semirings) -> None:
    """Ops one pass issues: torch ops that launch a kernel on CUDA (not views,
    not allocations), allocations, and Triton launches, per pass and per node
    type (kernels + launches per node). On the CPU the fp32 abs/entropy
    linears take the Triton GEMM, not CUDA's exp/log-around-cuBLAS path, so
    their counts differ from a GPU's."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter

    state = {"rule": "(engine)"}
    counts: Counter = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ALLOC_OPS:
                counts[(state["rule"], "alloc")] += 1
            elif name not in VIEW_OPS:
                counts[(state["rule"], "torch")] += 1
            return func(*args, **(kwargs or {}))

    stub = interpreter.InterpretedFunction.run

    def counted(self, *a, **k):
        counts[(state["rule"], "triton")] += 1

    rule_for = engine.rule_for

    def named_rule_for(node):
        fn = rule_for(node)
        if fn is None:
            return None

        def named(ctx):
            state["rule"] = type(node).__name__
            try:
                return fn(ctx)
            finally:
                state["rule"] = "(engine)"
        return named

    nodes = Counter(type(n).__name__ for n in graph.relevant)
    print("\nOps issued per pass (torch kernels: torch ops other than views and allocations; the engine's own "
          "are its ⊕, zero values and the copies of inline reshapes):\n")
    print("| semiring | torch kernels | allocations | Triton launches | kernels + launches per node | "
          "top node types (kernels + launches per node) |")
    print("|---|---|---|---|---|---|")
    interpreter.InterpretedFunction.run = counted
    engine.rule_for = named_rule_for
    try:
        for sr in semirings:
            counts.clear()
            with Count():
                engine.run(score, (emb,), sr, graph=graph)
            total = {k: sum(c for (_, kind), c in counts.items() if kind == k) for k in ("torch", "alloc", "triton")}
            per: Counter = Counter()
            for (r, kind), c in counts.items():
                if kind != "alloc":
                    per[r] += c
            top = ", ".join(f"{r} {c / max(1, nodes.get(r, 1)):.1f}" if r != "(engine)" else f"{r} {c}"
                            for r, c in per.most_common(4))
            print(f"| {sr} | {total['torch']} | {total['alloc']} | {total['triton']} | "
                  f"{(total['torch'] + total['triton']) / graph.n_nodes:.2f} | {top} |")
    finally:
        interpreter.InterpretedFunction.run = stub
        engine.rule_for = rule_for


if __name__ == "__main__":
    sys.exit(main())
