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
from _output import finish, save_json  # noqa: E402


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
        for case in todo:
            try:
                r = mod.run(case)
            except Exception as exc:
                r = dict(case, error=f"{type(exc).__name__}: {exc}")
                traceback.print_exc()
            rows.append(r)
            print(json.dumps(r), flush=True)
            save_json(args.out, device, date, rows)
    return finish(markdown(rows, device, date), args.md)


if __name__ == "__main__":
    sys.exit(main())
