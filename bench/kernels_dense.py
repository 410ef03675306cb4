"""Benchmarks of the dense semiring kernels (matmul, softmax/log-softmax,
layer/RMS norm, fused GELU/SiLU rules) on a CUDA GPU.

    from bench import kernels_dense as kd
    for case in kd.cases(quick=True):
        print(kd.run(case))

``cases(quick)`` lists plain dicts; ``run(case)`` times one case and returns a
flat dict with the keys

    kernel, semiring, shape, dtype, label, ms, throughput, unit,
    baseline_ms, ratio_to_baseline, reference_ms, ratio_to_reference

- ``ms``: the Triton kernel (``triton.testing.do_bench`` median; the first
  call, which compiles and autotunes, is excluded).
- ``throughput``: semiring multiply-accumulates per second (``unit`` "T/s") for
  matmuls, bytes moved per second (``unit`` "GB/s": every input and output
  read/written once) for row kernels.
- ``baseline_ms``: the same-shape native op in the same run: cuBLAS
  ``torch.matmul`` (fp32 operands with TF32 off, or bf16 operands when the
  weights are bf16); ``torch.softmax``/``log_softmax`` forward+backward;
  ``F.layer_norm``/``F.rms_norm`` backward; GELU/SiLU backward (activation).
- ``reference_ms``: the torch reference rule of the semiring
  (``semitriton.use_backend("torch")``).
- ``ratio_to_baseline`` = ms / baseline_ms and ``ratio_to_reference`` =
  ms / reference_ms (below 1: the kernel is faster).

Value tensors are float32 (the engine's compute dtype); ``dtype`` is the dtype
of the weights (matmul) or of the probabilities / γ (row kernels). Nothing
runs at import time; only ``run`` needs CUDA.
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _output import autotune_keys, autotune_since  # noqa: E402

# Model shapes. BERT-base: batch 32 x seq 128 = 4096 rows, d 768, FFN 3072, 12
# heads, vocab 30522. SmolLM2-135M: batch 8 x seq 512 = 4096 rows, d 576, FFN
# 1536, 9 query / 3 kv heads of 64, vocab 49152.
_MATMULS = [
    # label, (B, I, J, K): out[b, i, k] = ⊕_j v[b, i, j] ⊗ w[b, j, k]; B = 1: 2-D weight
    ("square 4096^3", (1, 4096, 4096, 4096)),
    ("BERT q/k/v/o 768x768", (1, 4096, 768, 768)),
    ("BERT FFN W1 (3072 -> 768)", (1, 4096, 3072, 768)),
    ("BERT FFN W2 (768 -> 3072)", (1, 4096, 768, 3072)),
    ("BERT LM head (30522 -> 768)", (1, 4096, 30522, 768)),
    ("BERT LM head, 32 live rows", (1, 32, 30522, 768)),
    ("BERT attention P: vo·vᵀ (bmm)", (384, 128, 64, 128)),
    ("BERT attention q: S·k (bmm)", (384, 128, 128, 64)),
    ("SmolLM2 q/o 576x576", (1, 4096, 576, 576)),
    ("SmolLM2 k/v 192 -> 576", (1, 4096, 192, 576)),
    ("SmolLM2 MLP gate/up (1536 -> 576)", (1, 4096, 1536, 576)),
    ("SmolLM2 MLP down (576 -> 1536)", (1, 4096, 576, 1536)),
    ("SmolLM2 LM head, 8 live rows", (1, 8, 49152, 576)),
    ("SmolLM2 attention P: vo·vᵀ (bmm)", (72, 512, 64, 512)),
    ("SmolLM2 attention q: S·k (bmm)", (72, 512, 512, 64)),
]
_ROWS = [
    # kernel, label, (rows, n)
    ("softmax", "BERT attention rows", (32 * 12 * 128, 128)),
    ("softmax", "SmolLM2 attention rows", (8 * 9 * 512, 512)),
    ("log_softmax", "BERT LM head", (4096, 30522)),
    ("log_softmax", "SmolLM2 LM head", (4096, 49152)),
    ("layer_norm", "BERT layer norm", (4096, 768)),
    ("rms_norm", "SmolLM2 RMS norm", (4096, 576)),
    ("activation", "BERT FFN GELU", (4096, 3072)),
    ("activation", "SmolLM2 MLP SiLU", (4096, 1536)),
]
MM_SEMIRINGS = ("abs", "entropy", "maxabs", "max")
ROW_SEMIRINGS = {"softmax": ("real", "abs", "entropy", "maxabs", "max"),
                 "log_softmax": ("real", "abs", "entropy", "maxabs", "max"),
                 "layer_norm": ("abs", "entropy", "maxabs", "max"),
                 "rms_norm": ("abs", "entropy", "maxabs", "max"),
                 "activation": ("abs", "entropy", "maxabs", "max")}


def cases(quick: bool = False) -> list:
    """Benchmark cases (dicts). ``quick``: the 4096³ square matmul per
    semiring, the BERT FFN with bf16 weights, and one row shape per op."""
    out = []
    if quick:
        for sr in MM_SEMIRINGS:
            out.append(dict(kernel="matmul", semiring=sr, label="square 4096^3", shape=(1, 4096, 4096, 4096),
                            dtype="fp32"))
        for sr in ("abs", "entropy"):
            out.append(dict(kernel="matmul", semiring=sr, label="BERT FFN W1 (3072 -> 768)",
                            shape=(1, 4096, 3072, 768), dtype="bf16"))
        for kernel, label, shape in (_ROWS[0], _ROWS[2], _ROWS[4], _ROWS[6]):
            for sr in ROW_SEMIRINGS[kernel]:
                out.append(dict(kernel=kernel, semiring=sr, label=label, shape=shape, dtype="fp32"))
            if kernel == "layer_norm":
                out += _lm_head_norms(label, shape)
        return out
    for label, shape in _MATMULS:
        dtypes = ("fp32",) if shape[0] > 1 else ("fp32", "bf16")
        for dt in dtypes:
            for sr in MM_SEMIRINGS:
                out.append(dict(kernel="matmul", semiring=sr, label=label, shape=shape, dtype=dt))
    for kernel, label, shape in _ROWS:
        for dt in ("fp32", "bf16"):
            for sr in ROW_SEMIRINGS[kernel]:
                out.append(dict(kernel=kernel, semiring=sr, label=label, shape=shape, dtype=dt))
        if kernel == "layer_norm":
            out += _lm_head_norms(label, shape)
    return out


def _lm_head_norms(label, shape) -> list:
    """The layer norms next to a language-model head that scores one position
    per sequence: 32 live rows of 4096, the rest the semiring zero (those rows
    run no tile; the torch reference is not timed)."""
    return [dict(kernel="layer_norm", semiring=sr, label=label + ", 32 live rows", shape=shape, dtype="fp32",
                 live=32) for sr in ROW_SEMIRINGS["layer_norm"]]


# ---------------------------------------------------------------------------------------------
def _bench(fn, slow: bool = False):
    import triton.testing
    if slow:
        return triton.testing.do_bench(fn, warmup=1, rep=1, return_mode="median")
    return triton.testing.do_bench(fn, return_mode="median")


def _values(semiring, shape, device, gen):
    import torch
    def rn():
        return torch.randn(shape, generator=gen, device=device)
    if semiring == "real":
        return (rn(),)
    if semiring == "max":
        a, b = rn(), rn()
        return (torch.maximum(a, b), torch.minimum(a, b))
    l = rn() * 2
    return (l, rn()) if semiring == "entropy" else (l,)


def _torch_dtype(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _run_matmul(case, sr, fn, device, gen):
    import torch

    B, I, J, K = case["shape"]
    wdt = _torch_dtype(case["dtype"])
    vshape = (B, I, J) if B > 1 else (I, J)
    wshape = (B, J, K) if B > 1 else (J, K)
    v = _values(sr.name, vshape, device, gen)
    w = (torch.randn(wshape, generator=gen, device=device) * 0.05).to(wdt)
    before = autotune_keys()
    out = fn(v, w)                                        # compile + autotune
    assert out is not NotImplemented, "kernel declined the case"
    torch.cuda.synchronize()
    case["candidates"] = autotune_since(before)
    ms = _bench(lambda: fn(v, w))
    macs = B * I * J * K
    # cuBLAS baseline on the same shape
    a = v[0].to(wdt) if wdt != torch.float32 else v[0]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        base_ms = _bench(lambda: torch.matmul(a, w))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    del out
    # the torch reference rule (chunked broadcasts for max/maxabs: ~0.2 T/s)
    import semitriton
    slow = sr.name in ("max", "maxabs")
    if slow and not case.get("reference", True):
        return ms, macs / (ms * 1e-3) / 1e12, "T/s", base_ms, None
    with semitriton.use_backend("torch"):
        sr.matmul(v, w)
        torch.cuda.synchronize()
        ref_ms = _bench(lambda: sr.matmul(v, w), slow=slow)
    return ms, macs / (ms * 1e-3) / 1e12, "T/s", base_ms, ref_ms


def _row_inputs(case, sr, device, gen):
    import torch
    import torch.nn.functional as F

    R, n = case["shape"]
    dt = _torch_dtype(case["dtype"])
    kernel = case["kernel"]
    x = torch.randn(R, n, generator=gen, device=device)
    if kernel == "activation":
        kind = "gelu" if "GELU" in case["label"] else "silu"
        xa = (x * 2).to(dt)
        args = (xa, kind)
        g = torch.randn(R, n, generator=gen, device=device)
        xg = xa.clone().requires_grad_()
        act = torch.nn.functional.gelu if kind == "gelu" else torch.nn.functional.silu
        ya = act(xg)

        def baseline():
            torch.autograd.grad(ya, xg, g, retain_graph=True)
        return args, baseline, R * n * xa.element_size()
    if kernel in ("softmax", "log_softmax"):
        y = torch.softmax(x, -1)
        args = (y.to(dt), -1)
        xg = x.to(dt).requires_grad_()                    # the native op in the model's dtype
        g = torch.randn(R, n, generator=gen, device=device).to(dt)
        op = torch.softmax if kernel == "softmax" else torch.log_softmax

        def baseline():
            out = op(xg, -1)
            torch.autograd.grad(out, xg, g)
        extra_bytes = R * n * y.to(dt).element_size()
    else:
        gamma = torch.randn(n, generator=gen, device=device).to(dt)
        if kernel == "layer_norm":
            mean = x.mean(-1, keepdim=True)
            rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
            xhat = (x - mean) * rstd
        else:
            rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            xhat = x * rstd
        args = (xhat, rstd, gamma)
        xg = x.to(dt).requires_grad_()                    # the native op in the model's dtype
        yv = (F.layer_norm(xg, (n,), gamma) if kernel == "layer_norm" else F.rms_norm(xg, (n,), gamma, eps=1e-6))
        g = torch.randn(R, n, generator=gen, device=device).to(dt)

        def baseline():
            torch.autograd.grad(yv, xg, g, retain_graph=True)
        extra_bytes = R * n * 4 + R * 4 + n * gamma.element_size()
    return args, baseline, extra_bytes


def _run_rows(case, sr, fn, device, gen):
    import torch

    import semitriton

    R, n = case["shape"]
    v = _values(sr.name, (R, n), device, gen)
    live = case.get("live")
    if live is not None:                                  # rows beyond the first `live` hold the zero
        for c, z in zip(v, sr.zero((), torch.float32, device)):
            c[live:] = z
    args, baseline, extra_bytes = _row_inputs(case, sr, device, gen)
    before = autotune_keys()
    out = fn(v, *args)                                    # compile + autotune
    assert out is not NotImplemented, "kernel declined the case"
    torch.cuda.synchronize()
    case["candidates"] = autotune_since(before)
    ms = _bench(lambda: fn(v, *args))
    nbytes = 2 * len(v) * R * n * 4 + extra_bytes
    base_ms = _bench(baseline)
    if live is not None:             # bytes of every row, though only `live` rows are read past their shift
        return ms, nbytes / (ms * 1e-3) / 1e9, "GB/s effective", base_ms, float("nan")
    method = getattr(sr, case["kernel"])
    # the dense references build n×n Jacobians (abs layer norm and every RMS norm have closed forms)
    slow = case["kernel"] == "layer_norm" and sr.name != "abs"
    with semitriton.use_backend("torch"):
        method(v, *args)
        torch.cuda.synchronize()
        ref_ms = _bench(lambda: method(v, *args), slow=slow)
    return ms, nbytes / (ms * 1e-3) / 1e9, "GB/s", base_ms, ref_ms


def run(case: dict) -> dict:
    """Time one case on the current CUDA device (see the module docstring)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("bench/kernels_dense.py needs a CUDA GPU")
    from semitriton.kernels import registry
    from semitriton.semirings import BUILTIN

    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    sr = BUILTIN[case["semiring"]]
    # rms_norm: the O(n) closed form from x̂ and rstd (patched models call the
    # same closed form from x, op rms_norm_from_input; the dense O(n²) kernel
    # stays registered as rms_norm_dense)
    fn = registry.KERNELS[(case["kernel"], case["semiring"])]
    if case["kernel"] == "matmul":
        ms, thr, unit, base_ms, ref_ms = _run_matmul(case, sr, fn, device, gen)
    else:
        ms, thr, unit, base_ms, ref_ms = _run_rows(case, sr, fn, device, gen)
    torch.cuda.empty_cache()

    def ratio(a, b):
        return a / b if b and not math.isnan(b) else float("nan")

    return {
        "kernel": case["kernel"],
        "semiring": case["semiring"],
        "shape": "x".join(str(s) for s in case["shape"]),
        "dtype": case["dtype"],
        "label": case.get("label", ""),
        "ms": ms,
        "throughput": thr,
        "unit": unit,
        "baseline_ms": base_ms,
        "ratio_to_baseline": ratio(ms, base_ms),
        "reference_ms": ref_ms,
        "ratio_to_reference": ratio(ms, ref_ms),
        # the autotuner's candidates for this case and their measured times
        "candidates": case.get("candidates", []),
    }
