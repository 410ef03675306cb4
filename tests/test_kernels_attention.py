"""The fused Triton attention backward (kernels/attention.py) against the torch
reference rule (``Semiring.attention`` under ``use_backend("torch")``), for
every built-in semiring.

CPU tests run the kernels under the Triton interpreter (TRITON_INTERPRET=1, set
here before triton is imported) at small shapes. The ``gpu`` tests run the
compiled kernels on CUDA tensors at larger shapes; run them with
``TRITON_INTERPRET=0 pytest -m gpu tests/test_kernels_attention.py``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import semitriton  # noqa: E402
from conftest import SEMIRINGS, assert_semiring_close  # noqa: E402
from semitriton.rules.attention import sdpa_bias  # noqa: E402
from semitriton.semirings import get  # noqa: E402

katt = pytest.importorskip("semitriton.kernels.attention")
from semitriton.kernels.registry import KERNELS  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
cpu_only = pytest.mark.skipif(not INTERPRET, reason="CPU kernel tests need TRITON_INTERPRET=1")
NEG, POS = float("-inf"), float("inf")


# ------------------------------------------------------------------ inputs
def _seed(*parts) -> int:
    return zlib.crc32("/".join(parts).encode())


def make_vo(semiring, shape, g, device="cpu"):
    """A random value of O with some semiring zeros (nodes without a path)."""
    a = torch.randn(shape, generator=g)
    dead = torch.rand(shape, generator=g) < 0.1
    dead[..., 0, :] = False
    dead[..., 1, :] = True                            # a whole dead output row
    if semiring == "real":
        vo = (torch.where(dead, 0.0, a),)
    elif semiring in ("abs", "maxabs"):
        vo = (torch.where(dead, NEG, 2 * a),)
    elif semiring == "entropy":
        mu = torch.randn(shape, generator=g)
        vo = (torch.where(dead, NEG, 2 * a), torch.where(dead, 0.0, mu))
    else:  # max
        b = torch.randn(shape, generator=g)
        p, n = torch.maximum(a, b), torch.minimum(a, b)
        n = torch.where(torch.rand(shape, generator=g) < 0.1, p, n)   # single-path values: M+ == M-
        vo = (torch.where(dead, NEG, p), torch.where(dead, POS, n))
    return tuple(c.to(device) for c in vo)


def make_case(name, g, device="cpu", big=False):
    """(q, k, v, bias, causal) for a named scenario."""
    B, H, HK, Tq, Tk, D, dtype = 1, 2, 2, 32, 32, 16, torch.float32
    DV = None                               # value head dim (None: D)
    bias, causal = None, False
    if name == "plain":                     # no mask, sizes multiples of the block
        pass
    elif name == "boolmask":                # boolean mask: fully masked keys and one fully masked row
        B, H, HK, Tq, Tk = 2, 1, 1, 19, 27
    elif name == "floatbias":               # float bias, finite and -inf, zeros in q/k/v, D=32
        H, HK, Tq, Tk, D = 2, 1, 21, 18, 32
    elif name == "causal_gqa":              # causal with Tq < Tk, GQA H=4, Hk=2
        H, HK, Tq, Tk = 4, 2, 23, 37
        causal = True
    elif name == "causal_long_q":           # causal with Tq > Tk (rows past Tk see every key)
        H, HK, Tq, Tk = 2, 1, 37, 20
        causal = True
    elif name == "bf16":                    # bf16 q/k/v, GQA, causal and a float bias
        H, HK, Tq, Tk, dtype = 4, 2, 21, 26, torch.bfloat16
        causal = True
    elif name == "fp16":
        Tq, Tk, dtype = 17, 20, torch.float16
    elif name == "head_dims":               # head dims that are not a power of two (q/k 24, v 20), causal GQA
        H, HK, Tq, Tk, D, DV = 2, 1, 19, 21, 24, 20
        causal = True
    elif name == "saturated":               # attention sinks: rows whose top P is 1 - O(1e-8) (see below)
        H, HK, Tq, Tk = 2, 1, 19, 40
    else:
        raise ValueError(name)
    if big:
        B, H, HK, Tq, Tk, D = 2, 2 * H, 2 * HK, 8 * Tq + 3, 8 * Tk + 5, 64
        if DV is not None:
            D, DV = 72, 40
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, HK, Tk, D, generator=g)
    v = torch.randn(B, HK, Tk, DV or D, generator=g)
    if name in ("floatbias", "causal_gqa", "bf16", "head_dims"):
        q[0, 0, 2, :3] = 0.0
        q[..., 5, 1] = 0.0
        k[0, 0, 4, :] = 0.0                  # a key with no edges to q
        v[0, 0, 3, :] = 0.0                  # a value row with no edges to O
        v[..., 7, 2] = 0.0
    if name == "boolmask":
        mask = torch.rand(B, 1, Tq, Tk, generator=g) > 0.3
        mask[..., 3] = False                 # fully masked keys
        mask[..., Tk - 1] = False
        mask[1, 0, 5, :] = False             # a fully masked query row (P = 0, no edges)
        mask[..., 0] = mask[..., 0] | (torch.arange(Tq) != 5)   # every other row sees key 0
        bias = sdpa_bias(mask, Tq, Tk, torch.float32)
    elif name == "saturated":
        # a +20 sink in the first key block, or in the last with a +10 decoy
        # before it (the LSE pass's running top changes block), or two equal
        # sinks (P = 1/2 each); q/k small so the bias sets the scores
        q, k = q * 0.1, k * 0.1
        bias = torch.zeros(1, H, Tq, Tk)
        rows = torch.arange(Tq)
        bias[..., rows % 3 == 0, 1] = 20.0
        bias[..., rows % 3 == 1, Tk - 3] = 20.0
        bias[..., rows % 3 == 1, 5] = 10.0
        bias[..., rows % 3 == 2, 2] = 20.0
        bias[..., rows % 3 == 2, Tk - 1] = 20.0
    elif name in ("floatbias", "bf16"):
        bias = torch.randn(1, H, Tq, Tk, generator=g)
        bias = bias.masked_fill(torch.rand(1, H, Tq, Tk, generator=g) < 0.2, NEG)
        bias[..., 2] = NEG
        bias[..., 0] = 0.0
    if big and bias is not None and bias.shape[0] == 1:
        bias = bias.expand(B, *bias.shape[1:])
    q, k, v = (t.to(dtype).to(device) for t in (q, k, v))
    if bias is not None:
        bias = bias.to(device)
    return q, k, v, bias, causal


def small_gqa(g, bias=False):
    """A small causal GQA case (H=2, Hk=1, Tq=17 < Tk=20, D=16), zeros in q/k/v,
    optionally a float bias with -inf entries."""
    q = torch.randn(1, 2, 17, 16, generator=g)
    k = torch.randn(1, 1, 20, 16, generator=g)
    v = torch.randn(1, 1, 20, 16, generator=g)
    q[0, 0, 3, :4] = 0.0
    k[0, 0, 2, :] = 0.0
    v[0, 0, 5, 1] = 0.0
    b = None
    if bias:
        b = torch.randn(1, 2, 17, 20, generator=g).masked_fill(torch.rand(1, 2, 17, 20, generator=g) < 0.2, NEG)
        b[..., 0] = 0.0
    return q, k, v, b, True


# ------------------------------------------------------------------ comparison
def compare(semiring, got, ref, what, rtol=1e-4):
    """Readout-level comparison: infinities exactly; abs/maxabs (exp of log
    values) and max elementwise relative; real and entropy μ normwise."""
    assert (got is None) == (ref is None), what
    if ref is None:
        return
    assert len(got) == len(ref), what
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32, (what, a.shape, b.shape, a.dtype)
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        if semiring in ("abs", "maxabs") or (semiring == "entropy" and i == 0):
            a, b, kind = torch.exp(a), torch.exp(b), "abs"
        elif semiring == "entropy":
            kind = "entropy"
        else:
            kind = semiring
        assert_semiring_close(a, b.numpy(), kind, rtol, f"{what}[{i}]")


def run_both(semiring, vo, q, k, v, bias, causal, scale, needs):
    sr = get(semiring)
    with semitriton.use_backend("torch"):
        ref = sr.attention(vo, q, k, v, bias, causal, scale, needs)
    got = KERNELS[("attention", semiring)](vo, q, k, v, bias, causal, scale, needs)
    assert got is not NotImplemented, "the kernel declined a supported case"
    return got, ref


# ------------------------------------------------------------------ CPU (interpreter)
CASES = ["plain", "boolmask", "floatbias", "causal_gqa", "causal_long_q", "bf16", "head_dims", "saturated"]


def test_all_semirings_registered():
    for s in SEMIRINGS:
        assert ("attention", s) in KERNELS


@cpu_only
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_kernel_matches_reference(semiring, case):
    g = torch.Generator().manual_seed(_seed(semiring, case))
    q, k, v, bias, causal = make_case(case, g)
    vo = make_vo(semiring, (*q.shape[:-1], v.shape[-1]), g)
    scale = 1.0 / math.sqrt(q.shape[-1])
    got, ref = run_both(semiring, vo, q, k, v, bias, causal, scale, (True, True, True))
    for name, a, b in zip("qkv", got, ref):
        compare(semiring, a, b, f"{semiring}/{case}/{name}")


def _allocated_bytes(fn) -> int:
    """Bytes torch allocates on the CPU while ``fn`` runs (top-level ops,
    from the profiler's memory records)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and e.cpu_parent is None)


@cpu_only
@pytest.mark.parametrize("semiring,bias", [(s, False) for s in SEMIRINGS] + [("entropy", True)])
def test_memory_is_linear_in_the_sequence_length(semiring, bias):
    """The fused backward recomputes P block by block: what it allocates
    doubles when T doubles (a [B, H, T, T] buffer would quadruple it; the
    torch reference, which holds P, is the control that the measure sees
    such a buffer). A float bias [1, 1, T, T] is the caller's, read in place."""
    def run(T, kernel):
        g = torch.Generator().manual_seed(3)
        B, H, HK, D = 1, 4, 2, 16
        q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, HK, HK))
        vo = make_vo(semiring, (B, H, T, D), g)
        b = torch.randn(1, 1, T, T, generator=g) if bias else None
        if kernel:
            def call():
                assert KERNELS[("attention", semiring)](vo, q, k, v, b, not bias, 0.25, (True, True, True)) \
                    is not NotImplemented
        else:
            def call():
                with semitriton.use_backend("torch"):
                    get(semiring).attention(vo, q, k, v, b, not bias, 0.25, (True, True, True))
        return _allocated_bytes(call)
    small, large = run(32, True), run(64, True)
    assert large <= 2.25 * small, (small, large)
    ref_small, ref_large = run(32, False), run(64, False)
    assert ref_large >= 3 * ref_small, (ref_small, ref_large)          # the control: P is [B, H, T, T]


@cpu_only
@pytest.mark.parametrize("needs", [(True, False, True), (False, True, False), (False, False, True)],
                         ids=["qv", "k", "v"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_needs_subsets(semiring, needs):
    g = torch.Generator().manual_seed(7)
    q, k, v, bias, causal = small_gqa(g)
    vo = make_vo(semiring, (*q.shape[:-1], v.shape[-1]), g)
    got, ref = run_both(semiring, vo, q, k, v, bias, causal, 0.3, needs)
    for name, a, b, n in zip("qkv", got, ref, needs):
        assert (a is None) == (not n)
        compare(semiring, a, b, f"{semiring}/needs{needs}/{name}")


@cpu_only
@pytest.mark.parametrize("semiring", ["maxabs", "max"])
def test_tropical_rank1_path(semiring, monkeypatch):
    """The GPU code path of the tropical contractions (CHUNK = 1: rank-1 updates)."""
    monkeypatch.setattr(katt, "TROPICAL_CHUNK", 1)
    g = torch.Generator().manual_seed(11)
    q, k, v, bias, causal = small_gqa(g, bias=True)
    vo = make_vo(semiring, (*q.shape[:-1], v.shape[-1]), g)
    got, ref = run_both(semiring, vo, q, k, v, bias, causal, 0.25, (True, True, True))
    for name, a, b in zip("qkv", got, ref):
        compare(semiring, a, b, f"{semiring}/rank1/{name}")


@cpu_only
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_gpu_launch_plans(semiring, monkeypatch):
    """Every launch plan the GPU autotuner may pick (tile sizes, warps, dot
    precision, entropy's split q/k + v launches; abs also split; the tropical
    contractions as rank-1 updates or in the plan's chunks), run under the
    interpreter against the reference, with GQA, a bias and a subset of outputs."""
    plans = katt._plans(semiring, 64, 64, gpu=True, groups=2)
    if semiring in ("abs", "entropy"):
        plans = plans + [dict(p, split=not p["split"]) for p in plans]
    if semiring in ("maxabs", "max"):
        assert any(p.get("chunk", 1) > 1 for p in plans) and any("chunk" not in p for p in plans)
    g = torch.Generator().manual_seed(13)
    q, k, v, bias, causal = small_gqa(g, bias=True)
    vo = make_vo(semiring, (*q.shape[:-1], v.shape[-1]), g)
    for plan in plans:
        monkeypatch.setattr(katt, "_plans", lambda *a, _p=plan, **kw: [_p])
        if semiring in ("maxabs", "max"):       # the GPU's CHUNK: the plan's, else rank-1 updates
            monkeypatch.setattr(katt, "TROPICAL_CHUNK", plan.get("chunk", 1))
        for needs in ((True, True, True), (False, True, True), (True, False, False), (False, False, True)):
            got, ref = run_both(semiring, vo, q, k, v, bias, causal, 0.25, needs)
            for name, a, b in zip("qkv", got, ref):
                compare(semiring, a, b, f"{semiring}/{plan}/{needs}/{name}")


@cpu_only
def test_fp16_and_value_head_dim():
    """fp16 q/k/v, and a value head dim different from the query/key one."""
    g = torch.Generator().manual_seed(3)
    q, k, v, bias, causal = make_case("fp16", g)
    v = torch.randn(*v.shape[:-1], 24, generator=g).to(v.dtype)
    q[0, 0, 2, :3] = 0.0                      # zeros in q, a key with no edges, a value row with none
    k[0, 0, 4, :] = 0.0
    v[0, 0, 3, :] = 0.0
    for semiring in SEMIRINGS:
        vo = make_vo(semiring, (*q.shape[:-1], v.shape[-1]), g)
        got, ref = run_both(semiring, vo, q, k, v, None, False, 0.2, (True, True, True))
        for name, a, b in zip("qkv", got, ref):
            compare(semiring, a, b, f"{semiring}/fp16/{name}")


@cpu_only
def test_dispatch_uses_kernel():
    """sr.attention under the triton backend gives the kernel's result."""
    g = torch.Generator().manual_seed(5)
    q, k, v, bias, causal = small_gqa(g, bias=True)
    vo = make_vo("abs", (*q.shape[:-1], v.shape[-1]), g)
    sr = get("abs")
    with semitriton.use_backend("triton"):
        out = sr.attention(vo, q, k, v, bias, causal, 0.25, (True, True, True))
    direct = KERNELS[("attention", "abs")](vo, q, k, v, bias, causal, 0.25, (True, True, True))
    for a, b in zip(out, direct):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0, equal_nan=False)


def test_declines_unsupported():
    """float64 values, mismatched dtypes, head counts that do not divide: NotImplemented."""
    q = torch.randn(1, 2, 4, 16)
    k = torch.randn(1, 2, 5, 16)
    v = torch.randn(1, 2, 5, 16)
    vo = (torch.randn(1, 2, 4, 16),)
    f = KERNELS[("attention", "real")]
    assert f((vo[0].double(),), q, k, v, None, False, 0.25, (True, True, True)) is NotImplemented
    assert f(vo, q.double(), k.double(), v.double(), None, False, 0.25, (True, True, True)) is NotImplemented
    assert f(vo, q, k.half(), v, None, False, 0.25, (True, True, True)) is NotImplemented
    q3 = torch.randn(1, 3, 4, 16)
    assert f((torch.randn(1, 3, 4, 16),), q3, k, v, None, False, 0.25, (True, True, True)) is NotImplemented
    assert f(vo, q, k, v, None, False, 0.25, (False, False, False)) is NotImplemented


@cpu_only
@pytest.mark.parametrize("xlogx,log", ((False, False), (True, False), (False, True)))
def test_abs_scaled_packs_up_to_three_tensors(xlogx, log):
    """The abs/entropy/maxabs pre-pass: |x·scale| (its log for maxabs, -inf at
    0; and a·log a, 0 at a = 0, for entropy) of one to three tensors of sizes
    that are not multiples of the block or of the 64-element segment
    alignment, each with its own scale, in one launch."""
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 5, 7, generator=g), torch.randn(1300, generator=g), torch.randn(2, 65, generator=g)]
    xs[0][0, 0, :3] = 0.0
    scales = [1.0, 0.125, -3.0]
    for k in (1, 2, 3):
        items = list(zip(xs[:k], scales[:k]))
        out = katt._abs_scaled(items, xlogx, log=log)
        assert len(out) == k
        for (x, sc), (a, ax) in zip(items, out):
            ref = (x.double() * sc).abs()
            assert a.shape == x.shape and a.dtype == torch.float32 and a.is_contiguous()
            if log:
                assert torch.equal(torch.isinf(a), ref == 0) and (a[ref == 0] < 0).all()
                assert torch.allclose(a.double()[ref > 0], ref.log()[ref > 0], rtol=0, atol=1e-6)
            else:
                assert torch.allclose(a.double(), ref, rtol=1e-6, atol=0)
            if xlogx:
                refx = torch.where(ref > 0, ref * torch.log(torch.where(ref > 0, ref, 1.0)), 0.0)
                assert torch.allclose(ax.double(), refx, rtol=1e-5, atol=1e-7)
                assert (ax[x == 0] == 0).all()
            else:
                assert ax.data_ptr() == a.data_ptr()           # the same tensor without XLOGX
    assert katt._abs_scaled([], xlogx, log=log) == []


def test_aot_specs_shape():
    specs = katt.aot_specs()
    assert specs
    names = set()
    for fn, sig, constexprs in specs:
        assert list(sig) == list(fn.arg_names)
        assert all(sig[c] == "constexpr" for c in constexprs)
        names.add(fn.__name__)
    assert {"_attn_lse_kernel", "_attn_bwd_real_kernel", "_attn_bwd_sum_kernel",
            "_attn_bwd_maxabs_kernel", "_attn_bwd_max_kernel"} <= names
    assert all(len(spec) == 4 and set(spec[3]) == {"num_warps", "num_stages"}
               for spec in katt.aot_specs(options=True))


# ------------------------------------------------------------------ GPU
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                                reason="needs a CUDA GPU and TRITON_INTERPRET=0")


@gpu
@needs_cuda
@pytest.mark.parametrize("case", ["plain", "boolmask", "floatbias", "causal_gqa", "bf16", "head_dims", "saturated"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_kernel_matches_reference_gpu(semiring, case):
    g = torch.Generator().manual_seed(_seed(semiring, case, "gpu"))
    q, k, v, bias, causal = make_case(case, g, device="cuda", big=True)
    vo = make_vo(semiring, (*q.shape[:-1], v.shape[-1]), g, device="cuda")
    scale = 1.0 / math.sqrt(q.shape[-1])
    got, ref = run_both(semiring, vo, q, k, v, bias, causal, scale, (True, True, True))
    for name, a, b in zip("qkv", got, ref):
        compare(semiring, a, b, f"gpu/{semiring}/{case}/{name}")


@gpu
@needs_cuda
@pytest.mark.parametrize("case", ["causal_gqa", "floatbias", "bf16"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_every_launch_plan_gpu(semiring, case, monkeypatch):
    """Each launch plan the autotuner may pick, compiled, against the reference
    (the autotuner times them all but would otherwise only ever run the winner here)."""
    g = torch.Generator().manual_seed(_seed(semiring, case, "plans"))
    q, k, v, bias, causal = make_case(case, g, device="cuda", big=True)
    vo = make_vo(semiring, (*q.shape[:-1], v.shape[-1]), g, device="cuda")
    plans = katt._plans(semiring, katt._pow2(q.shape[-1]), katt._pow2(v.shape[-1]), gpu=True,
                        groups=q.shape[-3] // k.shape[-3])
    for plan in plans:
        monkeypatch.setattr(katt, "_plans", lambda *a, _p=plan, **kw: [_p])
        got, ref = run_both(semiring, vo, q, k, v, bias, causal, 0.125, (True, True, True))
        for name, a, b in zip("qkv", got, ref):
            compare(semiring, a, b, f"gpu/{semiring}/{case}/{plan}/{name}")


@gpu
@needs_cuda
@pytest.mark.parametrize("D", [80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_wide_heads_every_plan_gpu(semiring, dtype, D, monkeypatch):
    """Head dims past 64 (80, 96, 128 in most models from ~1B parameters;
    Gemma's 256): every launch plan fits a block's shared memory and matches
    the reference (the single plan before needed 240-368 KiB and failed to
    launch). A fallback to the reference would be a KernelFallbackWarning,
    which the test configuration turns into an error."""
    g = torch.Generator().manual_seed(D)
    B, H, HK, T = 1, 4, 2, 67
    q = torch.randn(B, H, T, D, generator=g).to("cuda", dtype)
    k, v = (torch.randn(B, HK, T, D, generator=g).to("cuda", dtype) for _ in range(2))
    vo = make_vo(semiring, (B, H, T, D), g, device="cuda")
    plans = katt._plans(semiring, katt._pow2(D), katt._pow2(D), gpu=True, groups=H // HK)
    for plan in plans:
        monkeypatch.setattr(katt, "_plans", lambda *a, _p=plan, **kw: [_p])
        got, ref = run_both(semiring, vo, q, k, v, None, True, D ** -0.5, (True, True, True))
        for name, a, b in zip("qkv", got, ref):
            compare(semiring, a, b, f"gpu/{semiring}/D{D}/{dtype}/{plan}/{name}")


@gpu
@needs_cuda
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_needs_subsets_gpu(semiring):
    g = torch.Generator().manual_seed(17)
    q, k, v, bias, causal = make_case("causal_gqa", g, device="cuda", big=True)
    vo = make_vo(semiring, (*q.shape[:-1], v.shape[-1]), g, device="cuda")
    for needs in [(True, False, False), (False, True, True)]:
        got, ref = run_both(semiring, vo, q, k, v, bias, causal, 0.125, needs)
        for name, a, b in zip("qkv", got, ref):
            compare(semiring, a, b, f"gpu/{semiring}/needs{needs}/{name}")
