"""Benchmark of the fused semiring attention backward (kernels/attention.py).

    from bench import kernels_attention as b
    for c in b.cases(quick=True):
        print(b.run(c))

Each case times the kernel (``attention(vo, q, k, v, None, causal, scale,
needs=(True, True, True))``, all three values, with its pre-passes and the
torch glue of the launcher) with ``triton.testing.do_bench`` (median), and in
the same run the baseline: ``F.scaled_dot_product_attention`` forward +
backward (``requires_grad`` q/k/v, same dtype and shapes, ``enable_gqa`` for
grouped heads), and the torch reference rule (``Semiring.attention`` on the
torch backend) where its Tq×Tk intermediates fit in free GPU memory (else
``None``). Peak memory is ``torch.cuda.max_memory_allocated`` during one call,
inputs included. Nothing runs at import; CUDA is needed only by ``run``.

Shapes: B=4 H=16 T=4096 D=64 (the long-sequence target: within 3x of SDPA
fp32 fwd+bwd for abs, entropy, maxabs), BERT-base (B=32 H=12 T=128 D=64) and
SmolLM2-135M (B=8 H=9 Hk=3 T=512 D=64, causal); fp32 and bf16 q/k/v.

A case may carry ``dims`` (overriding the named shape) and ``device="cpu"``
for a dry run of this file under TRITON_INTERPRET=1 (plain timer, no peaks).
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import autotune_keys, autotune_since  # noqa: E402

SEMIRINGS = ("real", "abs", "entropy", "maxabs", "max")
SHAPES = {
    "long-4096": dict(B=4, H=16, HK=16, T=4096, D=64, causal=False),
    "bert-base": dict(B=32, H=12, HK=12, T=128, D=64, causal=False),
    "smollm2-135m": dict(B=8, H=9, HK=3, T=512, D=64, causal=True),
}


def cases(quick: bool, shapes=None) -> list:
    """quick: BERT-base and SmolLM2 shapes; full: also the T=4096 shape;
    ``shapes``: an explicit list of SHAPES names."""
    shapes = list(shapes) if shapes else (["bert-base", "smollm2-135m"] if quick else list(SHAPES))
    return [dict(kernel="attention", semiring=s, shape=name, dtype=dt)
            for name in shapes for dt in ("float32", "bfloat16") for s in SEMIRINGS]


def _value(semiring, shape, device, gen):
    import torch
    a = torch.randn(shape, device=device, generator=gen)
    if semiring == "real":
        return (a,)
    if semiring in ("abs", "maxabs"):
        return (a,)
    if semiring == "entropy":
        return (a, torch.randn(shape, device=device, generator=gen).abs())
    b = torch.randn(shape, device=device, generator=gen)
    return (torch.maximum(a, b), torch.minimum(a, b))


def _bench(fn, dev, **kw):
    """Median ms: triton.testing.do_bench on CUDA; a plain timer on the CPU
    (dry runs of this file under TRITON_INTERPRET=1)."""
    if dev == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, return_mode="median", **kw)
    import time
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[1]


def _cuda_time(fn, reps=3):
    """Median ms of ``reps`` timed calls after one warm-up (for slow references)."""
    import torch
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e))
    return sorted(ts)[len(ts) // 2]


def _peak(fn, dev="cuda"):
    import torch
    if dev != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def run(case) -> dict:
    import torch
    import torch.nn.functional as F

    dev = case.get("device", "cuda")
    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench/kernels_attention.py needs a CUDA GPU")
    import semitriton
    from semitriton.kernels import attention  # noqa: F401  (registers the kernels)
    from semitriton.kernels.registry import KERNELS
    from semitriton.semirings import get

    sr_name, dtype = case["semiring"], getattr(torch, case["dtype"])
    shp = case.get("dims") or SHAPES[case["shape"]]
    B, H, HK, T, D, causal = shp["B"], shp["H"], shp["HK"], shp["T"], shp["D"], shp["causal"]
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, T, D, device=dev, generator=gen).to(dtype)
    k = torch.randn(B, HK, T, D, device=dev, generator=gen).to(dtype)
    v = torch.randn(B, HK, T, D, device=dev, generator=gen).to(dtype)
    vo = _value(sr_name, (B, H, T, D), dev, gen)
    scale = 1.0 / math.sqrt(D)
    needs = (True, True, True)
    kern = KERNELS[("attention", sr_name)]

    def call():
        return kern(vo, q, k, v, None, causal, scale, needs)

    before = autotune_keys()
    out = call()                                           # compile + time the launch plans
    assert out is not NotImplemented
    del out
    candidates = autotune_since(before)
    ms = _bench(call, dev)
    peak = _peak(call, dev)

    # baseline: SDPA forward + backward, same shapes and dtype
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    do = torch.randn(B, H, T, D, device=dev, generator=gen).to(dtype)
    gqa = H != HK

    def sdpa():
        o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, enable_gqa=gqa) if gqa else \
            F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
        o.backward(do)

    base_ms = _bench(sdpa, dev, grad_to_none=[qg, kg, vg]) if dev == "cuda" else _bench(sdpa, dev)
    base_peak = _peak(sdpa, dev)

    # the torch reference rule, where its B·H·T·T intermediates fit
    sr = get(sr_name)
    comps = len(vo)
    need_bytes = B * H * T * T * 4 * (8 + 6 * comps)          # P, its value, the S value, temporaries
    free = torch.cuda.mem_get_info()[0] if dev == "cuda" else 2**33
    ref_ms = ref_peak = None
    if need_bytes < 0.6 * free:
        def ref():
            with semitriton.use_backend("torch"):
                return sr.attention(vo, q, k, v, None, causal, scale, needs)
        try:
            ref_ms = _cuda_time(ref) if dev == "cuda" else _bench(ref, dev)
            ref_peak = _peak(ref, dev)
        except torch.cuda.OutOfMemoryError:
            ref_ms = ref_peak = None
        if dev == "cuda":
            torch.cuda.empty_cache()

    scores = B * H * T * T * (0.5 if causal else 1.0)
    return {
        "kernel": "attention",
        "semiring": sr_name,
        "shape": f"{case.get('shape', 'custom')} B={B} H={H} Hk={HK} T={T} D={D}" + (" causal" if causal else ""),
        "dtype": case["dtype"],
        "ms": ms,
        "throughput": scores / (ms * 1e-3) / 1e9,
        "unit": "G scores/s (fused backward incl. pre-passes)",
        "baseline_ms": base_ms,
        "ratio_to_baseline": ms / base_ms,
        "reference_ms": ref_ms,
        "ratio_to_reference": None if ref_ms is None else ms / ref_ms,
        "peak_mem_mb": None if peak is None else peak / 2**20,
        "baseline_peak_mem_mb": None if base_peak is None else base_peak / 2**20,
        "reference_peak_mem_mb": None if ref_peak is None else ref_peak / 2**20,
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu (interpreter dry run)",
        "baseline": "F.scaled_dot_product_attention forward+backward" + (" (enable_gqa)" if gqa else ""),
        # the autotuner's launch plans for this case and their measured times
        "candidates": candidates,
    }


if __name__ == "__main__":
    import json
    import sys

    for c in cases(quick="--quick" in sys.argv):
        print(json.dumps(run(c)), flush=True)
