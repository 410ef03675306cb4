"""Kernel benchmarks in one command: the semiring matmul / softmax / norm
kernels (bench/kernels_dense.py) and the fused attention backward
(bench/kernels_attention.py), each against the ordinary op (cuBLAS / SDPA /
torch) on the same shapes in the same run and against the torch reference
rule. Writes JSON and a markdown table.

    python bench/run_kernels.py --quick --out bench/out/kernels.json --md bench/out/kernels.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kernels_attention  # noqa: E402
import kernels_dense  # noqa: E402
from _output import AUTOTUNE_LEGEND, candidates_cell, finish, save_json  # noqa: E402


def _f(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown(rows, device, date) -> str:
    out = [f"Card: {device}; date {date}. Ratios are kernel time / other time (below 1 = the kernel is faster).",
           "", "| kernel | semiring | shape | dtype | ms | throughput | vs baseline | vs torch reference |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r.get('kernel')} | {r.get('semiring')} | {r.get('shape', r.get('label', ''))} | "
                       f"{r.get('dtype')} | error: {r['error'][:60]} | | | |")
            continue
        shape = r.get("label") or r.get("shape")
        out.append(f"| {r['kernel']} | {r['semiring']} | {shape} | {r['dtype']} | {_f(r['ms'])} | "
                   f"{_f(r['throughput'])} {r['unit']} | {_f(r['ratio_to_baseline'], '.2f')} | "
                   f"{_f(r['ratio_to_reference'], '.3f')} |")
    tuned = [r for r in rows if r.get("candidates")]
    if tuned:
        out += ["", AUTOTUNE_LEGEND, "", "| kernel | semiring | shape | candidates |", "|---|---|---|---|"]
        for r in tuned:
            for cands in r["candidates"]:
                cell = candidates_cell([(c["config"], c["ms"]) for c in cands])
                out.append(f"| {r['kernel']} | {r['semiring']} | {r.get('label') or r.get('shape')} | {cell} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="dense,attention")
    ap.add_argument("--attention-shapes", default=None,
                    help="comma-separated attention shapes (bert-base, smollm2-135m, long-4096)")
    ap.add_argument("--dtypes", default=None, help="restrict the cases to these dtypes")
    ap.add_argument("--kernels", default=None,
                    help="restrict the cases to these kernels (matmul, softmax, log_softmax, layer_norm, rms_norm, "
                         "attention)")
    ap.add_argument("--semirings", default=None, help="restrict the cases to these semirings")
    ap.add_argument("--labels", default=None,
                    help="restrict the cases to those whose label contains one of these (comma-separated)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip timing the torch reference rule of max/maxabs matmuls (seconds per case)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    date = time.strftime("%Y-%m-%d")
    rows = []
    mods = [m for name, m in (("dense", kernels_dense), ("attention", kernels_attention))
            if name in args.only.split(",")]
    for mod in mods:
        if mod is kernels_attention and args.attention_shapes:
            todo = mod.cases(args.quick, args.attention_shapes.split(","))
        else:
            todo = mod.cases(args.quick)
        if args.dtypes:
            todo = [c for c in todo if c.get("dtype") in args.dtypes.split(",")]
        if args.kernels:
            todo = [c for c in todo if c.get("kernel") in args.kernels.split(",")]
        if args.semirings:
            todo = [c for c in todo if c.get("semiring") in args.semirings.split(",")]
        if args.labels:
            todo = [c for c in todo if any(p in c.get("label", "") for p in args.labels.split(","))]
        if args.no_reference:
            todo = [dict(c, reference=False) for c in todo]
        for case in todo:
            try:
                r = mod.run(case)
            except Exception as exc:
                r = dict(case, error=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
            rows.append(r)
            print(json.dumps(r), flush=True)
            save_json(args.out, device, date, rows)
    finish(markdown(rows, device, date), args.md)
    if rows and all("error" in r for r in rows):
        print(f"every one of the {len(rows)} cases failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
