"""CPU benchmark: a semiring pass on the torch reference rules with the
max-plus / signed max-times / norm-row contractions chunked
(``SEMITRITON_CPU_COMPILE=0``) and compiled (``=1``), against the native
input backward of the same patched model, in the same run.

    python bench/bench_cpu.py --out bench/out/cpu.json --md bench/out/cpu.md
    python bench/bench_cpu.py --models smollm2-135m --seq 32 --semirings maxabs

Models: a SmolLM2-135M-config LLaMA (30 layers, batch 1) and BERT-base
(batch 2), random weights, float32, ``--seq`` tokens. Per model and semiring:
the median backward time of each variant over ``--reps`` forwards, its
ratio to native, the speed-up of compiling, and the largest relative
difference between the two variants' readouts (0 where the compiled kernels
are exact: max-plus and max-times; rounding where the norm rows sum or take
logs in another order). The first compiled pass's time (compiling, with
whatever inductor cache the machine has) is reported separately.
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

SEMIRINGS = ("abs", "entropy", "maxabs", "max")


def build(name: str, seq: int):
    import transformers as t
    torch.manual_seed(0)
    if name == "bert-base":
        cfg = t.BertConfig()
        cfg._attn_implementation = "sdpa"
        return t.BertForMaskedLM(cfg).eval(), (2, seq)
    cfg = t.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                        tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    return t.LlamaForCausalLM(cfg).eval(), (1, seq)


def _passes(model, shape, semiring: str, mode: str, reps: int):
    """(first pass seconds, median of the rest, readout of the last)."""
    import semitriton
    os.environ["SEMITRITON_CPU_COMPILE"] = mode
    ids = torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(1))
    times, out = [], None
    for _ in range(reps + 1):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        score = model(inputs_embeds=emb).logits[:, -1, 5].sum()
        t0 = time.perf_counter()
        if semiring == "native":
            (g,) = torch.autograd.grad(score, emb)
        else:
            (g,) = semitriton.grad(score, emb, semiring=semiring)
        times.append(time.perf_counter() - t0)
        out = g
    return times[0], statistics.median(times[1:]), out


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    fin = torch.isfinite(a) & torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return float("inf")
    if not fin.any():
        return 0.0
    return float(((a[fin] - b[fin]).abs() / b[fin].abs().clamp_min(1e-30)).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,bert-base")
    ap.add_argument("--semirings", default=",".join(SEMIRINGS))
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    import semitriton
    from semitriton.semirings import _cpu_compiled

    device = cpu_device()
    date = time.strftime("%Y-%m-%d")
    rows = []
    for name in args.models.split(","):
        model, shape = build(name, args.seq)
        semitriton.patch(model)
        for p in model.parameters():
            p.requires_grad_(False)
        _, native, _ = _passes(model, shape, "native", "0", args.reps)
        for s in args.semirings.split(","):
            _, ref, out_ref = _passes(model, shape, s, "0", args.reps)
            before = sum(_cpu_compiled.calls.values())
            first, comp, out_comp = _passes(model, shape, s, "1", args.reps)
            n_calls = (sum(_cpu_compiled.calls.values()) - before) // (args.reps + 1)
            row = {"model": name, "shape": list(shape), "semiring": s, "native_ms": native * 1e3,
                   "reference_ms": ref * 1e3, "compiled_ms": comp * 1e3, "first_compiled_ms": first * 1e3,
                   "ratio_reference": ref / native, "ratio_compiled": comp / native, "speedup": ref / comp,
                   "compiled_calls_per_pass": n_calls, "max_rel_diff": _rel_diff(out_comp, out_ref)}
            rows.append(row)
            print(row, flush=True)
            save_json(args.out, device, date, rows)
    md = [f"CPU: {device}; {date}; float32, random weights; backward to the input embeddings.", "",
          "| model | batch×seq | semiring | native ms | chunked ms (×native) | compiled ms (×native) "
          "| compiled calls/pass | speed-up | first compiled pass ms | max rel diff |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['speedup']:.1f}" if r["compiled_calls_per_pass"] else "— (nothing compiled)"
        md.append(f"| {r['model']} | {r['shape'][0]}×{r['shape'][1]} | {r['semiring']} | {r['native_ms']:.0f} "
                  f"| {r['reference_ms']:.0f} ({r['ratio_reference']:.1f}) | {r['compiled_ms']:.0f} "
                  f"({r['ratio_compiled']:.1f}) | {r['compiled_calls_per_pass']} | {speedup} "
                  f"| {r['first_compiled_ms']:.0f} | {r['max_rel_diff']:.1e} |")
    return finish("\n".join(md), args.md)


if __name__ == "__main__":
    sys.exit(main())
