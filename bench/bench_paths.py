"""Top-path readout benchmark: the maxabs pass that builds the path graph and
the k-best search per example, against the native input backward of the
same patched model, in the same run; the search with the Jacobian columns
read off the nodes (``semitriton.columns``) and with every column taken
generically (the node's real rule and an autograd pass).

    python bench/bench_paths.py --out bench/out/paths.json --md bench/out/paths.md
    python bench/bench_paths.py --models bert-base --batch 4 --seq 16 --k 4

Models: a SmolLM2-135M-config LLaMA (30 layers) and BERT-base, random
weights, float32, a batch of ``--batch`` sequences of ``--seq`` tokens; one
scalar per example (a logit difference at the last position), so the pass
serves every example and each example's top paths
are searched on it (as ``semitriton sva`` does). Reports the median over
``--reps`` repetitions and checks that both column variants return the
same paths.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import cpu_device, finish, save_json  # noqa: E402
from bench_cpu import build  # noqa: E402


def _median_s(fn, reps: int) -> tuple:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _signature(paths) -> list:
    return [[(p.source_index, [(s.node, s.index) for s in p.steps]) for p in ps] for ps in paths]


def run_model(name: str, batch: int, seq: int, k: int, reps: int) -> dict:
    import semitriton
    from semitriton import columns
    from semitriton.paths import PathGraph
    model, _ = build(name, seq)
    semitriton.patch(model)
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (batch, seq), generator=g)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    score = logits[:, -1, 1] - logits[:, -1, 2]
    native, _ = _median_s(lambda: torch.autograd.grad(score.sum(), emb, retain_graph=True), reps)
    build_s, pg = _median_s(lambda: PathGraph(score, emb, "maxabs"), reps)

    def search():
        pg._columns.clear()
        pg._flat.clear()
        return [semitriton.top_paths(score, emb, k=k, graph=pg, batch=b) for b in range(batch)]
    row = {"model": name, "batch": batch, "seq": seq, "k": k, "native_ms": native * 1e3,
           "pass_ms": build_s * 1e3, "pass_ratio": build_s / native}
    for enabled in (True, False):
        columns.ENABLED = enabled
        try:
            t, paths = _median_s(search, reps)
        finally:
            columns.ENABLED = True
        key = "read_off" if enabled else "generic"
        row[f"search_{key}_ms_per_example"] = t * 1e3 / batch
        row[f"_{key}"] = _signature(paths)
    row["same_paths"] = row.pop("_read_off") == row.pop("_generic")
    row["speedup"] = row["search_generic_ms_per_example"] / row["search_read_off_ms_per_example"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,bert-base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=12)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    device = cpu_device()
    date = time.strftime("%Y-%m-%d")
    rows = []
    for name in args.models.split(","):
        row = run_model(name, args.batch, args.seq, args.k, args.reps)
        rows.append(row)
        print(row, flush=True)
        save_json(args.out, device, date, rows)
    md = [f"CPU: {device}; {date}; float32, random weights; maxabs top paths to the input embeddings.", "",
          "| model | batch×seq | k | native backward ms | maxabs pass ms (×native) | search ms/example, "
          "columns read off | generic columns | speed-up | same paths |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['model']} | {r['batch']}×{r['seq']} | {r['k']} | {r['native_ms']:.0f} "
                  f"| {r['pass_ms']:.0f} ({r['pass_ratio']:.1f}) | {r['search_read_off_ms_per_example']:.0f} "
                  f"| {r['search_generic_ms_per_example']:.0f} | {r['speedup']:.1f} | {r['same_paths']} |")
    return finish("\n".join(md), args.md)


if __name__ == "__main__":
    sys.exit(main())
