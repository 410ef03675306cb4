"""The dense Triton kernels (matmul, softmax/log-softmax, layer/RMS norm)
against the torch reference methods of the semirings.

On the CPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1,
set here before triton is imported) at small shapes with small blocks; the
``gpu``-marked variants run the compiled kernels on CUDA tensors (run them
with TRITON_INTERPRET=0 on a machine with a GPU).

Note: under the interpreter tl.dot of fp32 is exact numpy math, so these
tests prove the algebra and the masking, not the compiled precision (the
``gpu`` variants check that).
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import semitriton  # noqa: E402
from semitriton.semirings import BUILTIN  # noqa: E402

try:
    from semitriton.kernels import registry  # noqa: E402
    from semitriton import weight_cache  # noqa: E402
except Exception as e:  # pragma: no cover - triton broken
    pytest.skip(f"semitriton.kernels not importable: {e}", allow_module_level=True)

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
NINF, PINF = float("-inf"), float("inf")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERP, reason="CPU kernels need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available() or INTERP,
        reason="needs a CUDA GPU and TRITON_INTERPRET=0 (compiled kernels)")]),
]

# components: "log" (log-space, compare |Δ| ≤ rtol·max(1,|ref|)), "mu" (entropy mean,
# normwise), "lin" (signed linear, elementwise relative), "real" (normwise)
KINDS = {"real": ("real",), "abs": ("log",), "maxabs": ("log",), "entropy": ("log", "mu"),
         "max": ("lin", "lin")}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def kernel(op, sr):
    return registry.KERNELS[(op, sr)]


def gen_values(name, shape, device, g, dead=0.2, dead_index=(0,), scale=3.0):
    """A semiring value of ``shape``: random, with zero entries and one
    entirely-zero slice ``x[..., dead_index]`` along dim -2 when given."""
    def rn():
        return torch.randn(shape, generator=g, dtype=torch.float64).float()
    mask = torch.rand(shape, generator=g) < dead
    if dead_index is not None and len(shape) >= 2:
        sl = [slice(None)] * len(shape)
        sl[-2] = list(dead_index)
        mask[tuple(sl)] = True
    if name == "real":
        v = (rn(),)
    elif name == "max":
        a, b = rn() * scale, rn() * scale
        p, n = torch.maximum(a, b), torch.minimum(a, b)
        p[mask], n[mask] = NINF, PINF
        v = (p, n)
    else:
        l = rn() * scale
        l[mask] = NINF
        v = (l, torch.where(mask, 0.0, rn() * 2)) if name == "entropy" else (l,)
    return tuple(c.to(device) for c in v)


def check(out, ref, name, rtol, mu_rtol=None, what=""):
    assert out is not NotImplemented, f"{what}: kernel declined"
    assert len(out) == len(ref)
    kinds = KINDS[name]
    for k, (a, b) in enumerate(zip(out, ref)):
        a = a.detach().double().cpu()
        b = b.detach().double().cpu()
        assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert not torch.isnan(a).any(), f"{what}: NaN in component {k}"
        kind = kinds[k]
        if kind == "mu":
            live = torch.isfinite(out[0].detach().double().cpu())
            assert (a[~live] == 0).all(), f"{what}: μ not 0 where log z = -inf"
            if live.any():
                err = (a[live] - b[live]).abs().max() / max(1.0, b[live].abs().max().item())
                assert err <= (mu_rtol or rtol), f"{what}: μ normwise error {err:.3g}"
            continue
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        assert torch.equal(fa, fb) and torch.equal(a[~fa], b[~fb]), \
            f"{what}: infinite entries differ in component {k}\n{a}\n{b}"
        if not fa.any():
            continue
        x, y = a[fa], b[fb]
        if kind == "real":
            err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
        elif kind == "log":
            err = ((x - y).abs() / y.abs().clamp_min(1.0)).max().item()
        else:
            err = ((x - y).abs() / y.abs().clamp_min(1e-30)).max().item()
        assert err <= rtol, f"{what}: component {k} relative error {err:.3g} > {rtol}"


def reference(method, *args):
    with semitriton.use_backend("torch"):
        return method(*args)


# ---------------------------------------------------------------------------------------------
# matmul
# ---------------------------------------------------------------------------------------------
MM_SEMIRINGS = ("abs", "entropy", "maxabs", "max")


def _weights(shape, dtype, device, g, zeros=0.2):
    """Random weights with exact zeros (not edges), and one all-zero slice
    ``w[..., 0]`` (an output column / input row without edges)."""
    w = torch.randn(shape, generator=g, dtype=torch.float64).float()
    w[torch.rand(shape, generator=g) < zeros] = 0.0
    w[..., 0] = 0.0
    return w.to(dtype).to(device)


def _mm_cases(device):
    """(label, v shape, v as a transposed view?, w shape (before the transpose), transpose w?,
    w dtype)."""
    f32, bf16 = torch.float32, torch.bfloat16
    if device == "cpu":
        return [
            ("rows", (2, 3, 13, 37), False, (37, 21), False, f32),
            ("rmatmul-view", (2, 13, 37), True, (21, 37), True, f32),
            ("batched", (3, 13, 37), False, (3, 37, 21), False, f32),
            ("batched-4d-wT", (2, 2, 9, 20), False, (2, 2, 17, 20), True, f32),
            ("J=1", (11, 1), False, (1, 18), False, f32),
            ("bf16", (13, 40), False, (40, 33), False, bf16),
            # low-precision batched weights: no cached transform, |W|, log|W| and E from the raw weight
            ("batched-bf16", (3, 13, 37), False, (3, 37, 21), False, bf16),
            ("batched-fp16-wT", (2, 9, 20), False, (2, 17, 20), True, torch.float16),
        ]
    return [
        ("rows", (3, 100, 300), False, (300, 257), False, f32),
        ("rmatmul-view", (190, 300), True, (257, 300), True, f32),
        ("batched", (6, 130, 64), False, (6, 64, 129), False, f32),
        ("bf16", (257, 768), False, (768, 300), False, bf16),
        ("fp16", (129, 200), False, (200, 70), False, torch.float16),
        ("batched-bf16", (4, 130, 96), False, (4, 96, 129), False, bf16),
        ("few-rows", (3, 1000), False, (1000, 600), False, f32),
    ]


def _mm_tol(name, wdtype, device):
    if wdtype in (torch.bfloat16, torch.float16) and name in ("abs", "entropy"):
        # hi+lo split (the default); fp16's lo parts of small terms are subnormal
        return (2e-5, 5e-5) if device == "cpu" and wdtype == torch.bfloat16 else (5e-5, 1e-4)
    if name in ("max", "maxabs"):
        return (1e-6 if device == "cpu" else 1e-5), None
    return (2e-6 if device == "cpu" else 2e-5), (1e-5 if device == "cpu" else 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MM_SEMIRINGS)
def test_matmul(name, device):
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(1)
    fn = kernel("matmul", name)
    for label, vs, vt, ws, wt, wdt in _mm_cases(device):
        vshape = vs if not vt else vs[:-2] + (vs[-1], vs[-2])
        v = gen_values(name, vshape, device, g)
        if vt:
            v = tuple(c.transpose(-1, -2) for c in v)
        w = _weights(ws, wdt, device, g)
        if wt:
            w = w.transpose(-1, -2)
        ref = reference(sr.matmul, v, w)
        out = fn(v, w)
        if wdt == torch.float16 and name in ("abs", "entropy"):
            assert out is NotImplemented, label        # fp16 weights go to the cuBLAS path (fp32 copy)
            continue
        rtol, mu_rtol = _mm_tol(name, wdt, device)
        check(out, ref, name, rtol, mu_rtol, f"matmul/{name}/{label}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ("maxabs", "max"))
def test_matmul_split_j(name, device, monkeypatch):
    """Split-J launches (slices of the contraction index in separate programs,
    combined with ⊕) give the unsplit result: slice counts that do not divide J,
    more slices than steps, a batched weight and a transposed view; dead rows and
    zero weights fall in some slices only; with and without the loads of the
    next step issued ahead (PIPE), down to one- and two-step loops."""
    from semitriton.kernels import matmul as mm

    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(11)
    fn = kernel("matmul", name)
    base = mm._simt_configs(name == "max", 64, gpu=device == "cuda")[0]
    cases = [((2, 13, 37), None, 3, True), ((13, 37), None, 5, False), ((11, 5), None, 8, True),
             ((3, 13, 37), 3, 4, False), ((19, 40), "view", 7, True), ((7, 1), None, 1, True),
             ((7, 2), None, 1, False)]
    for vs, batched, split, pipe in cases:           # pipe: loads one step ahead (PIPE)
        monkeypatch.setattr(mm, "_simt_configs", lambda *a, **k: [dict(base, SPLIT_J=split, PIPE=pipe)])
        v = gen_values(name, vs, device, g, dead=0.3)
        if batched == "view":
            w = _weights((21, vs[-1]), torch.float32, device, g, zeros=0.4).transpose(0, 1)
        elif batched:
            w = _weights((batched, vs[-1], 21), torch.float32, device, g, zeros=0.4)
        else:
            w = _weights((vs[-1], 21), torch.float32, device, g, zeros=0.4)
        check(fn(v, w), reference(sr.matmul, v, w), name, 1e-6 if device == "cpu" else 1e-5, None,
              f"split/{name}/{vs}/S={split}/pipe={pipe}")


@pytest.mark.parametrize("device", DEVICES)
def test_maxplus_blocked_kernel(device, monkeypatch):
    """The register-blocked max-plus kernel (cached log|W|) equals the rank-1
    kernel and the torch reference bit for bit: tiles past the matrix edge in
    rows, columns or both (masked loads) and inside it (unmasked), dead rows,
    zero weights, leading batch dims, slices of the contraction (split-J),
    one- and two-step loops; on the CPU with small quarter blocks."""
    from semitriton.kernels import matmul as mm

    sr = BUILTIN["maxabs"]
    g = torch.Generator().manual_seed(12)
    fn = kernel("matmul", "maxabs")
    if device == "cpu":
        blocks = [dict(mm._cfg(8, 8, None, 1, 1), BLOCKED=True, RM=2, RN=2),
                  dict(mm._cfg(8, 16, None, 1, 1), BLOCKED=True, RM=2, RN=4)]
        shapes = [((13, 37), 21), ((2, 12, 37), 16), ((16, 5), 16), ((7, 1), 3), ((9, 2), 40)]
    else:
        blocks = mm._blocked_configs(4096, gpu=True)
        shapes = [((300, 768), 257), ((2, 128, 512), 256), ((4096, 768), 768), ((129, 2), 3000)]
    for vs, K in shapes:
        v = gen_values("maxabs", vs, device, g, dead=0.3)
        w = _weights((vs[-1], K), torch.float32, device, g, zeros=0.4)
        ref = reference(sr.matmul, v, w)
        rank1 = fn(v, w)
        for cfg in blocks:
            for split in (1, 3):
                monkeypatch.setattr(mm, "_simt_configs", lambda *a, **k: [])
                monkeypatch.setattr(mm, "_blocked_configs", lambda *a, _c=cfg, _s=split, **k: [dict(_c, SPLIT_J=_s)])
                out = fn(v, w)
                monkeypatch.undo()
                what = f"blocked/{vs}x{K}/{cfg['BM']}x{cfg['BN']}/S={split}"
                assert torch.equal(out[0], rank1[0]), what
                check(out, ref, "maxabs", 0.0, None, what)


def test_blocked_candidates_fit_their_layout():
    """The register-blocked candidates are offered on the GPU only, not for a
    few rows, and each quarter tile's thread grid (TM × TN) is the CTA's
    threads with operand vectors smaller than it (what keeps them out of
    shared memory)."""
    from semitriton.kernels import matmul as mm

    assert mm._blocked_configs(4096) == [] and mm._blocked_configs(8, gpu=True) == []
    cfgs = mm._blocked_configs(4096, gpu=True)
    assert cfgs
    for c in cfgs:
        tm, tn = c["BM"] // 2 // c["RM"], c["BN"] // 2 // c["RN"]
        threads = 32 * c["num_warps"]
        assert tm * tn == threads and c["RM"] * tm < threads and c["RN"] * tn < threads


def test_split_j_candidates_only_for_small_grids(monkeypatch):
    """The autotuner is offered split-J variants only where the unsplit grid
    leaves SMs idle, with at least SPLIT_MIN_STEPS steps per slice and bounded
    partial buffers; never under the interpreter or off the GPU."""
    from semitriton.kernels import matmul as mm

    cfgs = [mm._cfg(128, 128, None, 4, 3), mm._cfg(64, 128, None, 4, 3)]
    assert mm._with_splits(cfgs, 1, 4096, 768, 768, 1, torch.device("cpu")) == cfgs
    monkeypatch.setattr(mm, "interpreting", lambda: False)
    monkeypatch.setattr(mm, "sm_count", lambda i: 132)
    cuda = torch.device("cuda", 0)
    bert_qkv = mm._with_splits(cfgs, 1, 4096, 768, 768, 1, cuda)       # 192 and 384 tiles
    assert [(c["BM"], c.get("SPLIT_J", 1)) for c in bert_qkv] == [(128, 1), (64, 1), (128, 2), (128, 4), (64, 2)]
    assert mm._with_splits(cfgs, 1, 4096, 768, 768, 1, cuda, bases=1) == bert_qkv[:4]
    square = mm._with_splits(cfgs, 1, 4096, 4096, 4096, 1, cuda)       # 1024 tiles: none
    assert square == cfgs
    head = mm._with_splits([mm._cfg(32, 128, None, 4, 3)], 1, 32, 30522, 768, 1, cuda)
    splits = [c.get("SPLIT_J", 1) for c in head]
    assert splits[0] == 1 and max(splits) >= 64 and all(30522 // s >= mm.SPLIT_MIN_STEPS for s in splits)
    short = mm._with_splits(cfgs, 1, 4096, 100, 768, 1, cuda)            # J too short to split
    assert short == cfgs
    assert mm._split_of({"SPLIT_J": 5}, 7) == (4, 2)          # no empty slices
    assert mm._split_of({"SPLIT_J": 9}, 3) == (3, 1)
    assert mm._split_of({}, 10) == (1, 10)
    # a split tuned at batch 2 reused at batch 512 (the key holds only B > 1): the partials of
    # [S, 512, 4096, 64] fp32 would take 4 GiB at S = 8; the launch keeps them within 256 MiB
    assert mm._split_of({"SPLIT_J": 8}, 4096, 2 * 4096 * 64) == (8, 512)
    assert mm._split_of({"SPLIT_J": 8}, 4096, 512 * 4096 * 64) == (1, 4096)
    assert mm._split_of({"SPLIT_J": 8}, 4096, 32 * 4096 * 64)[0] * 32 * 4096 * 64 * 4 <= mm.SPLIT_MAX_BYTES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ("abs", "entropy"))
def test_matmul_lowp_single_product(name, device, monkeypatch):
    """SEMITRITON_LOWP_SPLIT=0: bf16 weights with one rounded bf16 product of the
    exp tile (bf16 accuracy, ~3e-3)."""
    monkeypatch.setenv("SEMITRITON_LOWP_SPLIT", "0")
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(9)
    I, J, K = (13, 70, 33) if device == "cpu" else (300, 768, 257)
    v = gen_values(name, (I, J), device, g)
    for wt in (False, True):
        w = _weights((K, J) if wt else (J, K), torch.bfloat16, device, g)
        w = w.transpose(0, 1) if wt else w
        check(kernel("matmul", name)(v, w), reference(sr.matmul, v, w), name, 1e-2, 2e-2,
              f"single/{name}/wT={wt}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", (True, False), ids=("split", "single"))
@pytest.mark.parametrize("name", ("abs", "entropy"))
def test_matmul_lowp_pre_split(name, split, device, monkeypatch):
    """The pre-split low-precision GEMM (``PRE`` candidates: a prologue writes the
    rounded exp operands, the GEMM loop only loads and dots) against the float64
    reference: bf16 weights, a transposed weight view, a batched weight, dead
    values, zero weights, sizes that are not multiples of the tiles; with the
    hi/lo split (fp32 accuracy) and without (one rounded product). (fp16
    weights are declined: the cuBLAS path takes them.)"""
    from semitriton.kernels import matmul as mm

    monkeypatch.setenv("SEMITRITON_LOWP_SPLIT", "1" if split else "0")
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(21)
    fn = kernel("matmul", name)
    if device == "cpu":
        cases = [((2, 13, 70), (70, 33), False, torch.bfloat16), ((13, 40), (29, 40), True, torch.bfloat16),
                 ((3, 9, 24), (3, 24, 18), False, torch.bfloat16)]
    else:
        cases = [((3, 100, 300), (300, 257), False, torch.bfloat16), ((257, 768), (300, 768), True, torch.bfloat16),
                 ((6, 130, 64), (6, 64, 129), False, torch.bfloat16), ((5, 768), (768, 3072), False, torch.bfloat16)]
    seen = []

    def only_pre(entropy, lowp, I, **kw):
        cfg = (dict(mm._cfg(16, 16, 16, 1, 1), PRE=True) if device == "cpu" else mm._pre_configs(entropy, I)[0])
        seen.append(cfg)
        return [cfg]

    monkeypatch.setattr(mm, "_dot_configs", only_pre)
    for vs, ws, wt, wdt in cases:
        v = gen_values(name, vs, device, g, dead=0.2)
        w = _weights(ws, wdt, device, g)
        if wt:
            w = w.transpose(-1, -2)
        rtol, mu_rtol = _mm_tol(name, wdt, device) if split else (1e-2, 2e-2)
        check(fn(v, w), reference(sr.matmul, v, w), name, rtol, mu_rtol, f"pre/{name}/{vs}/{ws}/wT={wt}")
    assert len(seen) == len(cases)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", MM_SEMIRINGS)
def test_matmul_dispatch_and_rmatmul(name, device):
    """Through the semiring methods (backend switch), including rmatmul, which
    serves the kernel transposed views; ties and -inf entries everywhere."""
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(2)
    v = gen_values(name, (2, 19, 23), device, g, dead=0.4, dead_index=(0, 5))
    w = _weights((23, 17), torch.float32, device, g, zeros=0.5)
    a = _weights((19, 11), torch.float32, device, g, zeros=0.3)
    ref = reference(sr.matmul, v, w)
    ref_r = reference(sr.rmatmul, a.transpose(0, 1), v)
    with semitriton.use_backend("triton"):
        out = sr.matmul(v, w)
        out_r = sr.rmatmul(a.transpose(0, 1), v)
    check(out, ref, name, 2e-5, 1e-4, f"{name} matmul")
    check(out_r, ref_r, name, 2e-5, 1e-4, f"{name} rmatmul")


@pytest.mark.parametrize("name", MM_SEMIRINGS)
def test_matmul_declines(name):
    fn = kernel("matmul", name)
    g = torch.Generator().manual_seed(3)
    v = gen_values(name, (3, 5, 7), "cpu", g)
    w = _weights((1, 7, 4), torch.float32, "cpu", g)        # broadcast batch: not supported
    assert fn(v, w) is NotImplemented
    v64 = tuple(c.double() for c in v)
    assert fn(v64, w[0].double()) is NotImplemented
    # the semiring method still works (falls back to the torch reference)
    sr = BUILTIN[name]
    if INTERP:
        with semitriton.use_backend("triton"):
            out = sr.matmul(v, w)
        check(out, reference(sr.matmul, v, w), name, 1e-6, 1e-6, "fallback")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ("entropy", "maxabs"))
def test_weight_cache_invalidation(name, device):
    """Cached per-weight transforms follow in-place updates and freed tensors."""
    sr = BUILTIN[name]
    fn = kernel("matmul", name)
    g = torch.Generator().manual_seed(4)
    v = gen_values(name, (9, 20), device, g)
    weight = torch.nn.Parameter(_weights((20, 12), torch.float32, device, g))
    rt, mt = (2e-6, 1e-5) if device == "cpu" else (2e-5, 1e-4)
    w = weight.detach()                      # shares storage and version counter
    check(fn(v, w), reference(sr.matmul, v, w), name, rt, mt, "first")
    n0 = weight_cache.stats()["entries"]
    check(fn(v, w), reference(sr.matmul, v, w), name, rt, mt, "hit")
    assert weight_cache.stats()["entries"] == n0
    with torch.no_grad():
        weight.mul_(-3.0)
        weight[0, 0] = 0.0
    check(fn(v, w), reference(sr.matmul, v, w), name, rt, mt, "after in-place update")
    del weight, w
    w2 = _weights((20, 12), torch.float32, device, g)
    check(fn(v, w2), reference(sr.matmul, v, w2), name, rt, mt, "new tensor")


# ---------------------------------------------------------------------------------------------
# softmax / log-softmax
# ---------------------------------------------------------------------------------------------
SM_SEMIRINGS = ("real", "abs", "entropy", "maxabs", "max")


def _probs(shape, dim, device, g, log=False, ydtype=torch.float32):
    x = torch.randn(shape, generator=g, dtype=torch.float64).float() * 2
    x[torch.rand(shape, generator=g) < 0.2] = NINF                  # masked: y = 0 exactly
    xm = x.movedim(dim, -1)
    xm[..., 0] = torch.where(torch.isfinite(xm).any(-1), xm[..., 0], torch.zeros_like(xm[..., 0]))
    if xm.shape[-1] > 1 and xm.numel() >= 2 * xm.shape[-1]:
        row = xm.reshape(-1, xm.shape[-1])
        row[1] = NINF
        row[1, 1] = 0.0                                             # one-hot row: y = 1 exactly
        if row.shape[0] > 2:                                        # saturated row: y_max = 1 - O(1e-8)
            row[2] = torch.where(torch.isfinite(row[2]), row[2], torch.zeros_like(row[2]))
            row[2, -1] = 20.0
    y = torch.softmax(x, dim)
    return y.to(ydtype).to(device)


def _sm_cases(device):
    """(shape, dim): short rows (registers), long rows (streamed), dim not last."""
    if device == "cpu":
        return [((3, 5, 7), -1), ((4, 50), -1), ((3, 100), 1), ((3, 9, 4), 1), ((5, 1), -1), ((2, 64), -1)]
    return [((7, 33, 128), -1), ((64, 512), -1), ((5, 5000), -1), ((4, 300, 6), 1), ((9, 1), -1),
            ((3, 30522), -1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ("softmax", "log_softmax"))
@pytest.mark.parametrize("name", SM_SEMIRINGS)
def test_softmax(name, op, device):
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(5)
    fn = kernel(op, name)
    rtol = 2e-5 if device == "cpu" else 5e-5
    for shape, dim in _sm_cases(device):
        for ydt in (torch.float32, torch.bfloat16):
            y = _probs(shape, dim, device, g, ydtype=ydt)
            vmoved = gen_values(name, tuple(torch.empty(shape).movedim(dim, -1).shape[:-1]) + (shape[dim],),
                                "cpu", g, dead_index=None)
            v = tuple(c.movedim(-1, dim).to(device) for c in vmoved)
            # one entirely-zero row
            v = tuple(c.clone() for c in v)
            zero = sr.zero((), torch.float32, "cpu")
            if name != "real":
                for c, z in zip(v, zero):
                    c.movedim(dim, -1).reshape(-1, shape[dim])[0] = z.item()
            ref = reference(getattr(sr, op), v, y, dim)
            out = fn(v, y, dim)
            check(out, ref, name, rtol, 10 * rtol, f"{op}/{name}/{shape}/dim{dim}/{ydt}")


# ---------------------------------------------------------------------------------------------
# layer norm / RMS norm
# ---------------------------------------------------------------------------------------------
NORM_SEMIRINGS = ("abs", "entropy", "maxabs", "max")
#: how the O(n²) norm kernels get the row shift: (ROW_SHIFT: by the launcher, PRE:
#: with the per-column factors, in a pass before the kernel)
NORM_VARIANTS = {"shift-in": (True, False), "shift-per-program": (False, False),
                 "columns-precomputed": (True, True)}


def _norm_inputs(lead, n, centered, device, g, gdtype=torch.float32, weight=True):
    x = torch.randn(*lead, n, generator=g, dtype=torch.float64).float()
    if centered:
        mean = x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        xhat = (x - mean) * rstd
    else:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        xhat = x * rstd
    gamma = None
    if weight:
        gamma = torch.randn(n, generator=g, dtype=torch.float64).float()
        gamma[torch.rand(n, generator=g) < 0.2] = 0.0
        gamma = gamma.to(gdtype).to(device)
    return xhat.to(device), rstd.to(device), gamma


def _norm_cases(device):
    if device == "cpu":
        return [((2, 3), 24), ((4,), 40), ((1,), 16), ((3,), 1)]
    return [((4, 33), 768), ((64,), 576), ((8,), 100), ((2,), 3072)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ("layer_norm", "rms_norm"))
@pytest.mark.parametrize("name", NORM_SEMIRINGS)
@pytest.mark.parametrize("variant", tuple(NORM_VARIANTS))
def test_norm(name, op, device, variant, monkeypatch):
    """The O(n²) norm kernels against the reference, with the row shift
    computed by the launcher (ROW_SHIFT) or in each program, or the shift and
    the per-column factors computed once per row (PRE; max has neither)."""
    from semitriton.kernels import norm as knorm
    base = next(c for c in knorm._configs(knorm._CODES[name], 768) if not c.get("SORTED"))
    flags = NORM_VARIANTS[variant]
    if name == "max":
        flags = (False, False)
    monkeypatch.setattr(knorm, "_configs", lambda *a, **k: [dict(base, ROW_SHIFT=flags[0], PRE=flags[1])])
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(6)
    fn = kernel(op if op == "layer_norm" else "rms_norm_dense", name)
    centered = op == "layer_norm"
    rtol = 2e-5 if device == "cpu" else 5e-5
    for lead, n in _norm_cases(device):
        for gdt, has_w in ((torch.float32, True), (torch.bfloat16, True), (torch.float32, False)):
            xhat, rstd, gamma = _norm_inputs(lead, n, centered, device, g, gdt, has_w)
            v = gen_values(name, lead + (n,), "cpu", g, dead_index=None)
            v = tuple(c.clone() for c in v)
            for c, z in zip(v, sr.zero((), torch.float32, "cpu")):
                c.reshape(-1, n)[0] = z.item()                       # an all-zero row
            if name != "max" and v[0].reshape(-1, n).shape[0] > 1:
                v[0].reshape(-1, n)[-1] += 150.0         # log values far beyond exp's fp32 range: needs the shift
            v = tuple(c.to(device) for c in v)
            ref = reference(getattr(sr, op), v, xhat, rstd, gamma)
            out = fn(v, xhat, rstd, gamma)
            check(out, ref, name, rtol, 10 * rtol, f"{op}/{name}/{lead}x{n}/{gdt}/w={has_w}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERP, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("op", ("layer_norm", "rms_norm"))
@pytest.mark.parametrize("name", NORM_SEMIRINGS)
def test_norm_every_candidate_gpu(name, op, monkeypatch):
    """Every launch candidate the GPU autotuner may pick for the O(n²) norm
    kernels (tiles, ROW_SHIFT, PRE, the sorted abs layer norm), compiled, at
    BERT's width and at a width that is not a multiple of the tiles."""
    from semitriton.kernels import norm as knorm
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(29)
    fn = kernel(op if op == "layer_norm" else "rms_norm_dense", name)
    centered = op == "layer_norm"
    for n in (768, 300):
        cands = knorm._configs(knorm._CODES[name], n, centered)
        xhat, rstd, gamma = _norm_inputs((64,), n, centered, "cuda", g)
        v = gen_values(name, (64, n), "cpu", g, dead_index=None)
        for c, z in zip(v, sr.zero((), torch.float32, "cpu")):
            c[3] = z.item()                                     # a row of zero values: runs no tile
        v = tuple(c.to("cuda") for c in v)
        ref = reference(getattr(sr, op), v, xhat, rstd, gamma)
        for cfg in cands:
            monkeypatch.setattr(knorm, "_configs", lambda *a, _c=cfg, **k: [_c])
            check(fn(v, xhat, rstd, gamma), ref, name, 5e-5, 5e-4, f"{op}/{name}/{n}/{cfg}")


@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_abs_sorted(device, monkeypatch):
    """The O(n log n) abs layer-norm kernel (SORTED: sort, float64 prefix sums,
    binary search) against the float64 reference: fp32 / bf16 / no γ with zero
    entries, an all-zero row, a row 150 above exp's range, exact zeros in x̂
    (threshold −1/0), a spike row (one x̂ near √n, its edges to the rest
    nearly cancel), n = 1 and n not a power of two; more rows than programs
    (each program loops over rows)."""
    from semitriton.kernels import norm as knorm
    monkeypatch.setattr(knorm, "_configs", lambda sr, n=None, centered=True: [dict(SORTED=True)])
    sr = BUILTIN["abs"]
    g = torch.Generator().manual_seed(23)
    fn = kernel("layer_norm", "abs")
    cases = _norm_cases(device) + ([((9,), 5)] if device == "cpu" else [((300,), 768)])
    for lead, n in cases:
        for gdt, has_w in ((torch.float32, True), (torch.bfloat16, True), (torch.float32, False)):
            xhat, rstd, gamma = _norm_inputs(lead, n, True, device, g, gdt, has_w)
            x2 = xhat.reshape(-1, n).clone()
            if x2.shape[0] > 2 and n > 3:
                x2[1, :2] = 0.0                                       # x̂_i = 0: every edge positive
                spike = torch.full((n,), -1.0 / math.sqrt(n - 1), device=device)
                spike[0] = 0.999 * math.sqrt(n - 1)     # near a unit-variance spike: 1 + x̂_0 x̂_j = 0.001
                x2[2] = spike
            xhat = x2.reshape(xhat.shape)
            v = gen_values("abs", lead + (n,), "cpu", g, dead_index=None)
            v = tuple(c.clone() for c in v)
            v[0].reshape(-1, n)[0] = float("-inf")                   # an all-zero row
            if v[0].reshape(-1, n).shape[0] > 1:
                v[0].reshape(-1, n)[-1] += 150.0
            v = tuple(c.to(device) for c in v)
            ref = reference(sr.layer_norm, v, xhat, rstd, gamma)
            check(fn(v, xhat, rstd, gamma), ref, "abs", 2e-5 if device == "cpu" else 5e-5, 2e-4,
                  f"sorted/{lead}x{n}/{gdt}/w={has_w}")
    # a NaN x̂ (a broken forward) gives a NaN row, not finite values without its term
    xhat, rstd, gamma = _norm_inputs((3,), 24, True, device, g)
    xhat[1, 5] = float("nan")
    v = tuple(c.to(device) for c in gen_values("abs", (3, 24), "cpu", g, dead_index=None))
    (out,) = fn(v, xhat, rstd, gamma)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any() and not torch.isnan(out[2]).any()


@pytest.mark.parametrize("name", ("abs", "entropy", "maxabs", "max"))
def test_norm_candidates_are_timed_on_live_rows(name, monkeypatch):
    """The autotuner's timing launches (GPU only; driven here by a stand-in
    chooser under the interpreter) run on every row live, into scratch
    outputs: a call whose rows are nearly all zero values still gets the
    exact result, and the inputs the kernel saw while timing had no zero row."""
    from semitriton.kernels import norm as knorm
    cands = [dict(BI=16, BJ=16, num_warps=1, num_stages=1, ROW_SHIFT=name != "max", PRE=False),
             dict(BI=16, BJ=16, num_warps=1, num_stages=1, ROW_SHIFT=name != "max", PRE=name != "max")]
    monkeypatch.setattr(knorm, "_configs", lambda *a, **k: cands)
    seen = []
    kern = knorm._norm_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(a, b, *args, **kw):
                seen.append(bool((a.reshape(-1, a.shape[-1]) == float("-inf")).all(-1).any()))
                return kern[grid](a, b, *args, **kw)
            return run

    def choose(key, candidates, timed):
        for c in candidates:
            timed(c)
        return candidates[-1]

    monkeypatch.setattr(knorm, "_norm_kernel", Spy())
    monkeypatch.setattr(knorm, "choose", choose)
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(31)
    xhat, rstd, gamma = _norm_inputs((6,), 20, True, "cpu", g)
    v = gen_values(name, (6, 20), "cpu", g, dead_index=None)
    for c, z in zip(v, sr.zero((), torch.float32, "cpu")):
        c[1:] = z.item()                                # one live row of six
    out = kernel("layer_norm", name)(v, xhat, rstd, gamma)
    check(out, reference(sr.layer_norm, v, xhat, rstd, gamma), name, 2e-5, 2e-4, f"timed/{name}")
    assert seen == [False, False, True], seen           # two timing launches on live rows, then the call


@pytest.mark.parametrize("name", ("abs", "entropy", "maxabs", "max"))
@pytest.mark.parametrize("tile", ((32, 16), (16, 32), (16, 16)), ids=("BI>BJ", "BI<BJ", "BI=BJ"))
def test_norm_diagonal_tiles(name, tile, monkeypatch):
    """The three j loops (left of the diagonal block, the tiles holding i = j,
    the rest) of the PRE path and of max: the diagonal block split over several
    j tiles (BI > BJ), one j tile holding several i blocks' diagonals (BI < BJ),
    rows that are not a multiple of either, under the interpreter."""
    from semitriton.kernels import norm as knorm
    bi, bj = tile
    pre = name != "max"
    monkeypatch.setattr(knorm, "_configs", lambda *a, **k: [dict(BI=bi, BJ=bj, num_warps=1, num_stages=1,
                                                                ROW_SHIFT=pre, PRE=pre)])
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(21)
    fn = kernel("layer_norm", name)
    for lead, n in (((3,), 70), ((2,), 33), ((1,), 7)):
        xhat, rstd, gamma = _norm_inputs(lead, n, True, "cpu", g)
        v = gen_values(name, lead + (n,), "cpu", g, dead_index=None)
        if lead[0] > 1:
            for c, z in zip(v, sr.zero((), torch.float32, "cpu")):
                c.reshape(-1, n)[1] = z.item()              # a row of zero values: runs no tile
        check(fn(v, xhat, rstd, gamma), reference(sr.layer_norm, v, xhat, rstd, gamma), name, 2e-5, 2e-4,
              f"pre/{name}/{tile}/{lead}x{n}")


@pytest.mark.parametrize("name", ("abs", "entropy"))
@pytest.mark.parametrize("variant", tuple(NORM_VARIANTS))
def test_norm_nan_value_propagates(name, variant, monkeypatch):
    """A NaN value reaches every output of its row (as in the torch reference)
    in each way of finding the row shift, also in a row whose other values are
    all zero (tl.max drops NaN: such a row must not be taken for a row of zero
    values and skipped)."""
    from semitriton.kernels import norm as knorm
    row_shift, pre = NORM_VARIANTS[variant]
    monkeypatch.setattr(knorm, "_configs", lambda *a, **k: [dict(BI=16, BJ=16, num_warps=1, num_stages=1,
                                                                ROW_SHIFT=row_shift, PRE=pre)])
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(5)
    xhat, rstd, gamma = _norm_inputs((3,), 20, True, "cpu", g)
    v = gen_values(name, (3, 20), "cpu", g, dead_index=None)
    v[0][1] = float("-inf")                      # row 1: zero values and one NaN
    v[0][1, 4] = float("nan")
    v[0][2, 17] = float("nan")                   # row 2: live values and one NaN
    ref = reference(sr.layer_norm, v, xhat, rstd, gamma)
    out = kernel("layer_norm", name)(v, xhat, rstd, gamma)
    assert torch.isnan(ref[0][1:]).all()
    assert torch.isnan(out[0][1:]).all(), variant
    check(tuple(c[:1] for c in out), tuple(c[:1] for c in ref), name, 2e-5, 2e-4, f"nan/{name}/{variant}")


@pytest.mark.parametrize("op", ("layer_norm", "rms_norm_dense"))
@pytest.mark.parametrize("name", NORM_SEMIRINGS)
def test_norm_low_precision_rows(name, op):
    """bf16 x̂ and rstd (what a bf16 layer norm saves on the CPU, where aten's
    mean and rstd keep the input's dtype) and a bf16 γ: the kernel reads them
    as fp32, like the reference."""
    g = torch.Generator().manual_seed(3)
    xhat, rstd, gamma = _norm_inputs((3,), 24, op == "layer_norm", "cpu", g, gdtype=torch.bfloat16)
    xhat, rstd = xhat.bfloat16(), rstd.bfloat16()
    v = gen_values(name, (3, 24), "cpu", g)
    sr = BUILTIN[name]
    ref = reference(sr.layer_norm if op == "layer_norm" else sr.rms_norm, v, xhat, rstd, gamma)
    check(kernel(op, name)(v, xhat, rstd, gamma), ref, name, 2e-5, 2e-4, f"bf16 rows/{op}/{name}")


def _rms_closed_cases(device):
    if device == "cpu":
        return [((2, 3), 24), ((4,), 37), ((1,), 16), ((3,), 1), ((2,), 2)]
    return [((4, 33), 576), ((64,), 768), ((8,), 100), ((2,), 3072), ((3,), 9000)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NORM_SEMIRINGS)
def test_rms_norm_closed_form(name, device):
    """The O(n) closed-form RMS-norm kernel (op "rms_norm", what the engine
    dispatches) against the torch closed forms, with zero values, an all-zero
    row, zero γ entries, an exactly-zero x̂ (a_i = 0, only the diagonal edge)
    and one dominant term per row (the exclusive sums drop it exactly)."""
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(16)
    fn = kernel("rms_norm", name)
    rtol = 2e-5 if device == "cpu" else 5e-5
    for lead, n in _rms_closed_cases(device):
        for gdt, has_w in ((torch.float32, True), (torch.bfloat16, True), (torch.float32, False)):
            xhat, rstd, gamma = _norm_inputs(lead, n, False, "cpu", g, gdt, has_w)
            xhat.reshape(-1, n)[-1, 0] = 0.0
            v = gen_values(name, lead + (n,), "cpu", g, dead_index=None)
            v = tuple(c.clone() for c in v)
            for c, z in zip(v, sr.zero((), torch.float32, "cpu")):
                c.reshape(-1, n)[0] = z.item()                       # an all-zero row
            if name != "max" and n > 2:
                v[0].reshape(-1, n)[-1, 1] = 60.0                     # one term dominates its row
            dev = lambda t: None if t is None else t.to(device)     # noqa: E731
            args = (tuple(c.to(device) for c in v), dev(xhat), dev(rstd), dev(gamma))
            ref = reference(sr.rms_norm, *args)
            out = fn(*args)
            check(out, ref, name, rtol, 10 * rtol, f"rms closed/{name}/{lead}x{n}/{gdt}/w={has_w}")


def test_rms_norm_is_dispatched_to_the_closed_form_kernel():
    from semitriton import dispatch
    for name in NORM_SEMIRINGS:
        assert registry.KERNELS[("rms_norm", name)].__name__ == f"{name}_rms_norm"
    v = (torch.zeros(2, 4),)
    with semitriton.use_backend("triton"):
        assert dispatch.kernel("rms_norm", "abs", v[0]) is registry.KERNELS[("rms_norm", "abs")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ("real",) + NORM_SEMIRINGS)
def test_rms_norm_from_input(name, device):
    """Op "rms_norm_from_input" (what the canonical RMS-norm node calls: r, x̂
    and γ = weight + offset formed in the kernel from x) against the torch
    reference (r and x̂ in torch, then the semiring's RMS-norm rule), for fp32,
    bf16 and fp16 x, γ = w, 1 + w and none, an all-zero x row (r = eps^-½,
    x̂ = 0), an all-zero value row, one dominant term; ``real`` also against
    float64 autograd of the formula."""
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(23)
    fn = kernel("rms_norm_from_input", name)
    rtol = 2e-5 if device == "cpu" else 5e-5
    for lead, n in _rms_closed_cases(device):
        for xdt, w_kind in ((torch.float32, "w"), (torch.bfloat16, "1+w"), (torch.float16, None),
                            (torch.float32, "1+w")):
            x = (torch.randn(*lead, n, generator=g, dtype=torch.float64) * 2).to(xdt)
            x.reshape(-1, n)[-1] = 0.0                                  # an all-zero input row
            w = None if w_kind is None else (torch.randn(n, generator=g) * 0.7).to(xdt)
            if w is not None:
                w[torch.rand(n, generator=g) < 0.2] = -1.0 if w_kind == "1+w" else 0.0   # γ = 0 entries
            offset = 1.0 if w_kind == "1+w" else 0.0
            v = tuple(c.clone() for c in gen_values(name, lead + (n,), "cpu", g, dead_index=None))
            for c, z in zip(v, sr.zero((), torch.float32, "cpu")):
                c.reshape(-1, n)[0] = z.item()                           # an all-zero value row
            if name not in ("max", "real") and n > 2:
                v[0].reshape(-1, n)[-1, 1] = 60.0                         # one term dominates its row
            dev = lambda t: None if t is None else t.to(device)          # noqa: E731
            args = (tuple(c.to(device) for c in v), x.to(device), 1e-6, dev(w), offset)
            what = f"rms from x/{name}/{lead}x{n}/{xdt}/{w_kind}"
            ref = reference(sr.rms_norm_from_input, *args)
            out = fn(*args)
            check(out, ref, name, rtol, 10 * rtol, what)
            if name == "real":
                x64 = x.double().requires_grad_()
                y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
                if w is not None:
                    y = y * (w.double() + offset)
                (dx,) = torch.autograd.grad(y, x64, v[0].double())
                err = ((out[0].double().cpu() - dx).abs().max() / dx.abs().max().clamp_min(1e-30)).item()
                assert err <= 1e-5, f"{what}: {err:.3g} against float64 autograd"
    # declined (the torch reference runs): float64 values, rows of different shapes
    x = torch.randn(2, 8).to(device)
    v64 = tuple(c.double().to(device) for c in gen_values(name, (2, 8), "cpu", g, dead_index=None))
    assert fn(v64, x, 1e-6, None, 0.0) is NotImplemented
    v = tuple(c.to(device) for c in gen_values(name, (2, 8), "cpu", g, dead_index=None))
    assert fn(v, x[:, :5], 1e-6, None, 0.0) is NotImplemented


def test_rms_norm_node_uses_the_from_input_kernel(monkeypatch):
    """The canonical RMS-norm node's semiring rule dispatches op
    "rms_norm_from_input" (one launch) on the Triton backend, for every
    built-in semiring, and gives the torch backend's values."""
    from semitriton.fused.rms_norm import CanonicalRMSNorm

    calls = []
    for name in ("real",) + NORM_SEMIRINGS:
        orig = registry.KERNELS[("rms_norm_from_input", name)]

        def spy(*a, _orig=orig, _name=name):
            calls.append(_name)
            return _orig(*a)
        monkeypatch.setitem(registry.KERNELS, ("rms_norm_from_input", name), spy)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 24, generator=g).requires_grad_()
    w = torch.randn(24, generator=g)

    def impl(t):
        return (1.0 + w) * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6))

    y = CanonicalRMSNorm.apply(x, w, impl, 1e-6, 1.0)
    out = (y * torch.randn(3, 4, 24, generator=g)).sum()
    for name in ("real",) + NORM_SEMIRINGS:
        a = semitriton.grad(out, x, name, backend="triton", fast_real=False, log_space=name in ("abs", "maxabs"))
        b = semitriton.grad(out, x, name, backend="torch", fast_real=False, log_space=name in ("abs", "maxabs"))
        assert torch.allclose(a[0], b[0], rtol=1e-5, atol=1e-5), name
    assert calls == ["real"] + list(NORM_SEMIRINGS)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_ordinary_backward_kernel(device):
    """The fused kernel for the ordinary dx of a patched RMS norm against
    float64 autograd of the formula (γ = w, 1 + w, none; fp32, bf16 and fp16;
    a row length that is not a power of two, an all-zero row), and through
    CanonicalRMSNorm with the Triton backend, weight gradient included."""
    from semitriton.fused.rms_norm import CanonicalRMSNorm
    from semitriton.kernels.rms_norm import rms_norm_input_grad

    g = torch.Generator().manual_seed(5)

    def ref_dx(x, go, w, eps, offset):
        x64 = x.double().requires_grad_()
        y = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
        if w is not None:
            y = y * (w.double() + offset)
        (dx,) = torch.autograd.grad(y, x64, go.double())
        return dx

    for dt, n, w_kind in ((torch.float32, 37, "w"), (torch.float32, 64, None), (torch.bfloat16, 37, "1+w"),
                          (torch.float16, 20, "w")):
        x = (torch.randn(3, 5, n, generator=g) * 2).to(dt)
        x[0, 1] = 0.0
        go = torch.randn(3, 5, n, generator=g).to(dt)
        w = None if w_kind is None else (torch.randn(n, generator=g) * 0.5).to(dt)
        offset = 1.0 if w_kind == "1+w" else 0.0
        x, go, w = x.to(device), go.to(device), None if w is None else w.to(device)
        with semitriton.use_backend("triton"):
            dx = rms_norm_input_grad(x, go, w, 1e-5, offset)
        assert dx is not None and dx.dtype == dt and dx.shape == x.shape
        ref = ref_dx(x.cpu(), go.cpu(), None if w is None else w.cpu(), 1e-5, offset)
        tol = 1e-5 if dt == torch.float32 else 2e-2
        err = ((dx.double().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert err <= tol, f"{dt} n={n} {w_kind}: {err:.3g}"
    # through the autograd node: the Triton dx and the torch weight gradient
    x = torch.randn(4, 37, generator=g).to(device).requires_grad_()
    w = torch.randn(37, generator=g).to(device).requires_grad_()
    go = torch.randn(4, 37, generator=g).to(device)

    def impl(t):
        return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6))

    grads = {}
    for backend in ("torch", "triton"):
        with semitriton.use_backend(backend):
            y = CanonicalRMSNorm.apply(x, w, impl, 1e-6, 0.0)
            grads[backend] = torch.autograd.grad(y, (x, w), go)
    with torch.enable_grad():
        ref = torch.autograd.grad(impl(x), (x, w), go)
    for name, a, b in zip(("dx", "dw"), grads["triton"], ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    for a, b in zip(grads["torch"], ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert rms_norm_input_grad(x, go[:, :5], w, 1e-6, 0.0) is None          # shapes differ: declined
    # create_graph=True: the closed form keeps its graph, so second derivatives stay right
    with semitriton.use_backend("triton"):
        (dx,) = torch.autograd.grad(CanonicalRMSNorm.apply(x, w, impl, 1e-6, 0.0), x, go, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.pow(2).sum(), x)
    (dx_ref,) = torch.autograd.grad(impl(x), x, go, create_graph=True)
    (ddx_ref,) = torch.autograd.grad(dx_ref.pow(2).sum(), x)
    assert torch.allclose(ddx, ddx_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ("layer_norm", "rms_norm"))
def test_max_norm_zero_weight_edges(op, device):
    """max semiring, edges whose weight t' is exactly 0 (layer norm: 1 + x̂_i x̂_j = 0;
    RMS norm: x̂_j = 0) are not edges: row 0's only real candidates are negative
    (M+ = t'_00 M+_0 < 0), so a kernel that kept the 0 of the t' = 0 edge would report
    M+ = 0; the other rows are random, with and without such edges."""
    sr = BUILTIN["max"]
    g = torch.Generator().manual_seed(41)
    n = 16                                        # a power of two: t' = 0 exactly in fp32
    xhat = torch.randn(5, n, generator=g)
    p = torch.randn(5, n, generator=g)
    v = (p + 1.0, p - 1.0)
    xhat[0] = 0.3
    xhat[0, 0] = 2.0
    xhat[0, 1] = -0.5 if op == "layer_norm" else 0.0
    v[0][0], v[1][0] = float("-inf"), float("inf")          # row 0: every value zero ...
    v[0][0, 0], v[1][0, 0] = -1.0, -2.0                     # ... but its own (the diagonal edge)
    v[0][0, 1], v[1][0, 1] = 1.0, 1.0                       # and the t' = 0 edge's
    xhat[2, 3] = -1.0 / xhat[2, 5] if op == "layer_norm" else 0.0
    rstd = torch.ones(5, 1)
    gamma = torch.ones(n)
    args = (tuple(c.to(device) for c in v), xhat.to(device), rstd.to(device), gamma.to(device))
    ref = reference(getattr(sr, op), *args)
    c = 1.0 if op == "layer_norm" else 0.0
    assert ref[0][0, 0].item() == pytest.approx((1.0 - (c + 4.0) / n) * -1.0)     # -t'_00 · M+_0
    out = kernel(op if op == "layer_norm" else "rms_norm_dense", "max")(*args)
    check(out, ref, "max", 2e-5, None, f"{op}: t' = 0 edges")


@pytest.mark.parametrize("device", DEVICES)
def test_maxabs_norm_underflow_fallback(device):
    """A row where the winning term is e^-200 below the row's largest value
    (x̂_0 = 0 leaves only the diagonal edge for unit 0 in RMS norm): the
    linear-space shortcut underflows and the kernel redoes the row in log space."""
    sr = BUILTIN["maxabs"]
    g = torch.Generator().manual_seed(7)
    n = 20
    xhat, rstd, gamma = _norm_inputs((3,), n, False, "cpu", g)
    xhat[:, 0] = 0.0
    l = torch.randn(3, n, generator=g)
    l[:, 0] = -200.0
    args = ((l.to(device),), xhat.to(device), rstd.to(device), gamma.to(device))
    ref = reference(sr.rms_norm, *args)
    out = kernel("rms_norm_dense", "maxabs")(*args)
    assert torch.isfinite(ref[0][:, 0]).all()
    check(out, ref, "maxabs", 2e-5, None, "underflow row")


# ---------------------------------------------------------------------------------------------
# the engine end to end
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ("abs", "entropy", "maxabs", "max"))
def test_engine_backends_agree(name, device):
    """A tiny block (linear -> layer norm -> softmax attention-ish -> linear ->
    log-softmax) through semitriton.grad with both backends."""
    g = torch.Generator().manual_seed(8)
    d, h, t = 12, 20, 5
    lin1 = torch.nn.Linear(d, h).to(device)
    ln = torch.nn.LayerNorm(h).to(device)
    lin2 = torch.nn.Linear(h, 7).to(device)
    with torch.no_grad():
        for p in (*lin1.parameters(), *ln.parameters(), *lin2.parameters()):
            p.copy_(torch.randn(p.shape, generator=g).to(device))
        lin1.weight[0, :3] = 0.0
    x = torch.randn(t, d, generator=g).to(device).requires_grad_()
    hdn = ln(lin1(x))
    att = torch.softmax(hdn @ hdn.T / 4.0, -1) @ hdn
    out = torch.log_softmax(lin2(att), -1)[2, 3]
    res = {}
    for backend in ("torch", "triton"):
        res[backend] = semitriton.grad_values(out, [x], semiring=name, backend=backend)[0]
    check(res["triton"], res["torch"], name, 1e-4, 1e-3, f"engine/{name}")


@pytest.mark.skipif(not INTERP, reason="CPU kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", ("real", "abs", "entropy", "maxabs", "max"))
def test_patched_llama_backends_agree(name):
    """A patched tiny LLaMA (RMS norm, RoPE, SwiGLU product, fused GQA
    attention, linears) through semitriton.grad with every kernel against the
    torch reference rules on the same graph."""
    pytest.importorskip("transformers")
    from hf_models import build, embeds_and_output
    m = semitriton.patch(build("llama"))
    ids = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 6, 8, 10, 12, 14]])
    emb, score = embeds_and_output(m, "llama", ids)
    (a,) = semitriton.grad_values(score, emb, semiring=name, backend="triton")
    (b,) = semitriton.grad_values(score, emb, semiring=name, backend="torch")
    check(a, b, name, 1e-4, 1e-3, f"patched llama/{name}")


def test_environment_overrides_the_kernel_policy(monkeypatch):
    """SEMITRITON_FORCE_REFERENCE / SEMITRITON_FORCE_KERNEL pick the torch
    reference or the kernel per (op, semiring), for A/B measurements."""
    from semitriton import dispatch
    sr = BUILTIN["maxabs"]
    g = torch.Generator().manual_seed(3)
    v = gen_values("maxabs", (5, 8), "cpu", g)
    w = torch.randn(8, 4, generator=g)
    calls = []
    k = registry.KERNELS[("matmul", "maxabs")]
    monkeypatch.setitem(registry.KERNELS, ("matmul", "maxabs"), lambda *a: calls.append(1) or k(*a))
    with semitriton.use_backend("triton"):
        sr.matmul(v, w)
        assert len(calls) == 1
        monkeypatch.setenv("SEMITRITON_FORCE_REFERENCE", "softmax:abs, matmul:maxabs")
        ref = sr.matmul(v, w)
        assert len(calls) == 1
    check(ref, reference(sr.matmul, v, w), "maxabs", 0.0, None, "forced reference")
    assert dispatch._overridden("SEMITRITON_FORCE_REFERENCE", "softmax", "abs")
    assert not dispatch._overridden("SEMITRITON_FORCE_KERNEL", "matmul", "maxabs")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ("abs", "entropy"))
def test_matmul_cublas_fused_elementwise(name, device):
    """exp-shift + cuBLAS + log with the elementwise parts in two Triton
    launches (op "matmul_cublas") against the torch reference: zero values, an
    all-zero row, exact zeros in W, leading batch dims, a J larger than one
    prologue block."""
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(21)
    fn = kernel("matmul_cublas", name)
    rtol = 2e-6 if device == "cpu" else 1e-5
    for lead, J, K in (((7,), 20, 12), ((2, 3), 33, 5), ((1,), 1100, 9)):
        v = gen_values(name, lead + (J,), device, g)
        if J > 1024:                       # the row maximum sits in the second prologue block
            v[0][..., -1, 1050] = 150.0    # (a shift that missed it would overflow exp in fp32)
        w = _weights((J, K), torch.float32, device, g)
        out = fn(v, w)
        check(out, reference(sr.matmul, v, w), name, rtol, 10 * rtol, f"{name}/{lead}x{J}x{K}")
    assert fn(v, w.to(torch.bfloat16)) is NotImplemented        # fp32 and fp16 weights only


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ("abs", "entropy"))
def test_fp16_weights_keep_terms_far_below_the_row_maximum(name, device):
    """An fp16 weight's matmul: the Triton GEMM split a = exp(l − rowmax) into
    fp16 hi/lo parts, which lost terms ~10 nats below the row maximum (8e-4
    at 12 nats) and dropped those ~17 below (a finite value read -inf). The
    kernel declines fp16; the cuBLAS path contracts the weight's fp32 copy and
    keeps them."""
    sr = BUILTIN[name]
    J, K = 32, 16
    w = (torch.rand(J, K, generator=torch.Generator().manual_seed(3)) + 0.5).to(torch.float16).to(device)
    w[0, 0] = 0.0                          # the row maximum has no edge to column 0
    for gap in (12.0, 18.0, 40.0):
        l = torch.full((4, J), -60.0, device=device)
        l[:, 0], l[:, 1] = 0.0, -gap       # column 0's only live path is gap nats below the row max
        v = (l,) if name == "abs" else (l, torch.randn(4, J, generator=torch.Generator().manual_seed(4)).to(device))
        assert kernel("matmul", name)(v, w) is NotImplemented
        out = kernel("matmul_cublas", name)(v, w)
        check(out, reference(sr.matmul, v, w), name, 2e-6 if device == "cpu" else 1e-5, 1e-5, f"gap {gap}")
        assert bool(torch.isfinite(out[0][:, 0]).all())


def test_fp32_abs_matmul_policy_picks_the_cublas_path(monkeypatch):
    """On CUDA with fp32 weights the policy skips the Triton GEMM and runs the
    exp/log-around-cuBLAS path (op "matmul_cublas"); SEMITRITON_FORCE_REFERENCE
    naming it gives the torch reference, SEMITRITON_FORCE_KERNEL naming the
    GEMM gives the Triton GEMM; bf16 weights keep the Triton GEMM."""
    from semitriton import dispatch
    calls = []
    monkeypatch.setitem(registry.KERNELS, ("matmul_cublas", "abs"), lambda *a: calls.append(1) or "alt")

    class FakeCuda:
        is_cuda = True
        dtype = torch.float32

    v, w = (FakeCuda(),), torch.zeros(2, 2)
    monkeypatch.setitem(registry.KERNELS, ("matmul", "abs"), lambda *a: "gemm")
    monkeypatch.setattr(dispatch, "kernel", lambda op, sr, t: registry.KERNELS.get((op, sr)))
    assert dispatch.call("matmul", "abs", v, w) == "alt" and len(calls) == 1
    monkeypatch.setenv("SEMITRITON_FORCE_REFERENCE", "matmul_cublas:abs")
    assert dispatch.call("matmul", "abs", v, w) is NotImplemented and len(calls) == 1
    monkeypatch.setenv("SEMITRITON_FORCE_KERNEL", "matmul:abs")
    monkeypatch.delenv("SEMITRITON_FORCE_REFERENCE")
    assert dispatch.call("matmul", "abs", v, w) == "gemm" and len(calls) == 1
    monkeypatch.delenv("SEMITRITON_FORCE_KERNEL")
    assert dispatch.call("matmul", "abs", v, w.to(torch.bfloat16)) == "gemm" and len(calls) == 1


def test_a_kernel_that_cannot_run_on_the_gpu_falls_back_to_the_reference(monkeypatch):
    """A kernel that Triton cannot build or launch on the GPU (out of shared
    memory, a ptxas failure) ends in the torch reference with a warning once
    per (op, semiring, error), not in a failed pass; other errors still raise."""
    from triton.runtime.errors import OutOfResources

    from semitriton import dispatch
    from semitriton.errors import KernelFallbackWarning

    def too_big(v, w):
        raise OutOfResources(245760, 232448, "shared memory")

    calls = []
    monkeypatch.setitem(registry.KERNELS, ("matmul", "maxabs"), lambda v, w: calls.append(1) or too_big(v, w))
    monkeypatch.setattr(dispatch, "kernel", lambda op, sr, t: registry.KERNELS.get((op, sr)))
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_failed", {})
    sr = BUILTIN["maxabs"]
    g = torch.Generator().manual_seed(2)
    v, w = gen_values("maxabs", (5, 7), "cpu", g), _weights((7, 3), torch.float32, "cpu", g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)          # as under pytest: each fallback raises
        for _ in range(2):
            with pytest.raises(KernelFallbackWarning):
                sr.matmul(v, w)
    with pytest.warns(KernelFallbackWarning, match=r"matmul/maxabs.*OutOfResources.*torch reference"):
        out = sr.matmul(v, w)
    check(out, reference(sr.matmul, v, w), "maxabs", 0.0, None, "fallback")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sr.matmul(v, w)                                    # warned once
    assert len(calls) == 1                                 # a failed build is not retried for its shapes
    v2 = gen_values("maxabs", (5, 70), "cpu", g)
    sr.matmul(v2, _weights((70, 3), torch.float32, "cpu", g))
    assert len(calls) == 2                                 # another shape bucket is tried

    def broken(v, w):
        raise ValueError("a bug, not a resource limit")

    monkeypatch.setitem(registry.KERNELS, ("matmul", "maxabs"), broken)
    monkeypatch.setattr(dispatch, "_failed", {})
    with pytest.raises(ValueError, match="a bug"):
        sr.matmul(v, w)


def test_fp32_gemm_race_keeps_the_faster_path(monkeypatch):
    """With the autotuner on (the GPU), fp32 abs/entropy matmuls time the
    exp/log-around-cuBLAS path against the Triton GEMM once per shape bucket and
    keep the faster; a path that declines is skipped; SEMITRITON_AUTOTUNE=0
    keeps the measured default (cuBLAS)."""
    import triton.testing
    from semitriton import dispatch
    from semitriton.kernels import _common

    class FakeCuda:
        is_cuda = True
        dtype = torch.float32
        device = "cuda:0"

        def __init__(self, *shape):
            self.shape = shape

    ran = []
    speed = {"alt": 2.0, "gemm": 1.0}
    monkeypatch.setitem(registry.KERNELS, ("matmul_cublas", "abs"), lambda v, w: ran.append("alt") or "alt")
    monkeypatch.setitem(registry.KERNELS, ("matmul", "abs"),
                        lambda v, w: ran.append("gemm") or ("gemm" if v[0].shape[0] < 1000 else NotImplemented))
    monkeypatch.setattr(dispatch, "kernel", lambda op, sr, t: registry.KERNELS.get((op, sr)))
    monkeypatch.setattr(_common, "autotune_enabled", lambda: True)
    monkeypatch.setattr(_common, "_best", {})
    monkeypatch.setattr(_common, "timings", {})

    def fake_bench(fn, **kw):
        n = len(ran)
        fn()
        return speed[ran[n]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    w = torch.zeros(64, 32)
    assert dispatch.call("matmul", "abs", (FakeCuda(100, 64),), w) == "gemm"        # timed: gemm faster
    assert ran == ["alt", "gemm", "gemm"]
    assert dispatch.call("matmul", "abs", (FakeCuda(120, 64),), w) == "gemm"        # same bucket: cached
    assert ran[3:] == ["gemm"]
    speed.update(alt=0.5)
    assert dispatch.call("matmul", "abs", (FakeCuda(3000, 64),), w) == "alt"        # gemm declines there
    assert [t for _, t in next(v for k, v in _common.timings.items() if 4096 in k[3])] == [0.5, None]
    monkeypatch.setattr(_common, "autotune_enabled", lambda: False)
    del ran[:]
    assert dispatch.call("matmul", "abs", (FakeCuda(100, 64),), w) == "alt" and ran == ["alt"]


# ---------------------------------------------------------------------------------------------
# fused activation rules (op "activation")
# ---------------------------------------------------------------------------------------------
ACT_KINDS = ("gelu", "gelu_tanh", "silu")


def _act_inputs(shape, dtype, device, g):
    """x with large magnitudes (both tails), exact zeros and, for the tanh
    form, |u| around 0 and the saturated range."""
    x = torch.randn(shape, generator=g, dtype=torch.float64).float() * 3
    flat = x.view(-1)
    flat[:7] = torch.tensor([0.0, -0.0, 40.0, -40.0, 1e-4, -1e-4, -0.75])
    flat[7:11] = torch.tensor([-20.0, 20.0, -15.0, 15.0])
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_entropy_plus(device, monkeypatch):
    """entropy ⊕ in one pass (op "plus") against the torch reference: zero
    values (-inf, 0) on either side and on both, a non-contiguous operand;
    broadcast shapes are declined; the semiring method dispatches to it."""
    from semitriton.kernels import elementwise
    monkeypatch.setattr(elementwise, "MIN_NUMEL_CUDA", 0)
    sr = BUILTIN["entropy"]
    g = torch.Generator().manual_seed(51)
    fn = kernel("plus", "entropy")
    for shape, transposed in (((3, 5, 7), False), ((6, 9), True), ((3, 101), False)):   # 303: full blocks + tail
        a = gen_values("entropy", shape, device, g, dead=0.3)
        b = gen_values("entropy", shape, device, g, dead=0.3)
        if transposed:
            a = tuple(c.t() for c in a)
            b = tuple(c.t() for c in b)
        check(fn(a, b), reference(sr.plus, a, b), "entropy", 1e-6, 1e-6, f"plus/{shape}")
    a = gen_values("entropy", (4, 5), device, g)
    b = gen_values("entropy", (1, 5), device, g)
    assert fn(a, b) is NotImplemented
    if device == "cpu":
        calls = []
        monkeypatch.setitem(registry.KERNELS, ("plus", "entropy"), lambda *x: calls.append(1) or fn(*x))
        with semitriton.use_backend("triton"):
            sr.plus(a, a)
        assert calls == [1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ("real", "abs", "entropy", "maxabs", "max"))
def test_rope(name, device, monkeypatch):
    """The rotary-embedding rule (op "rope": v ⊗ edge(cos) ⊕ partner(v) ⊗
    edge(±sin) in one pass) against the torch reference: cos/sin broadcast
    over heads and batch, bf16 cos/sin, exact zeros in both, dead values;
    declined: an odd head dim, a weight that does not broadcast to v."""
    from semitriton.kernels import elementwise
    monkeypatch.setattr(elementwise, "MIN_NUMEL_CUDA", 0)
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(41)
    fn = kernel("rope", name)
    for vshape, cshape, cdt in (((2, 3, 5, 8), (2, 1, 5, 8), torch.float32), ((1, 2, 7, 16), (1, 1, 7, 16),
                                                                              torch.bfloat16),
                                ((2, 2, 3, 4), (2, 2, 3, 4), torch.float32)):
        v = gen_values(name, vshape, device, g)
        ang = torch.randn(cshape, generator=g) * 3
        cos, sin = torch.cos(ang), torch.sin(ang)
        cos.view(-1)[:3] = 0.0
        sin.view(-1)[3:6] = 0.0
        cos, sin = cos.to(cdt).to(device), sin.to(cdt).to(device)
        check(fn(v, cos, sin), reference(sr.rope, v, cos, sin), name, 1e-6, 1e-6, f"rope/{name}/{vshape}/{cdt}")
    v = gen_values(name, (1, 1, 2, 5), device, g)
    assert fn(v, torch.ones(1, 1, 2, 5, device=device), torch.ones(1, 1, 2, 5, device=device)) is NotImplemented
    v = gen_values(name, (1, 1, 2, 4), device, g)
    assert fn(v, torch.ones(1, 3, 2, 4, device=device), torch.ones(1, 1, 2, 4, device=device)) is NotImplemented


@pytest.mark.parametrize("device", DEVICES)
def test_rope_ordinary_backward_kernel(device, monkeypatch):
    """The ordinary backward of the RoPE node from the real semiring's Triton
    rule (one launch) against float64 autograd of x·cos + rotate_half(x)·sin,
    with cos/sin broadcast over batch and heads and an input broadcast to a
    bigger output (sum_to_size); create_graph=True and half-precision
    gradients keep the torch form."""
    from semitriton.fused.rope import RotaryEmbedding, rotate_half
    from semitriton.kernels import elementwise
    monkeypatch.setattr(elementwise, "MIN_NUMEL_CUDA", 0)
    calls = []
    fn = registry.KERNELS[("rope", "real")]
    monkeypatch.setitem(registry.KERNELS, ("rope", "real"), lambda *a: calls.append(1) or fn(*a))
    g = torch.Generator().manual_seed(12)
    ang = torch.randn(1, 1, 5, 8, generator=g, dtype=torch.float64) * 3
    cos, sin = torch.cos(ang), torch.sin(ang)
    for xshape in ((2, 3, 5, 8), (2, 1, 5, 8)):
        x = torch.randn(*xshape, generator=g, dtype=torch.float64)
        go = torch.randn(2, 3, 5, 8, generator=g, dtype=torch.float64)
        x64 = x.clone().requires_grad_()
        (ref,) = torch.autograd.grad((x64 * cos + rotate_half(x64) * sin).expand(2, 3, 5, 8), x64, go)
        xd = x.float().to(device).requires_grad_()
        with semitriton.use_backend("triton"):
            y = RotaryEmbedding.apply(xd.expand(2, 3, 5, 8) if xshape[1] == 1 else xd, cos.float().to(device),
                                      sin.float().to(device))
            (got,) = torch.autograd.grad(y, xd, go.float().to(device))
        assert got.shape == x.shape
        assert torch.allclose(got.double().cpu(), ref, rtol=1e-5, atol=1e-6), xshape
    assert len(calls) == 2
    # create_graph: torch's form (differentiable); bf16 gradients: torch's form
    xd = torch.randn(2, 3, 5, 8, generator=g).to(device).requires_grad_()
    with semitriton.use_backend("triton"):
        (gx,) = torch.autograd.grad(RotaryEmbedding.apply(xd, cos.float().to(device), sin.float().to(device)),
                                    xd, torch.ones(2, 3, 5, 8, device=device), create_graph=True)
        xb = torch.randn(2, 3, 5, 8, generator=g).to(device).bfloat16().requires_grad_()
        torch.autograd.grad(RotaryEmbedding.apply(xb, cos.bfloat16().to(device), sin.bfloat16().to(device)),
                            xb, torch.ones(2, 3, 5, 8, device=device, dtype=torch.bfloat16))
    assert len(calls) == 2 and torch.isfinite(gx).all()          # neither used the kernel


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ("abs", "entropy", "maxabs", "max"))
def test_scale(name, device, monkeypatch):
    """v ⊗ edge(w) for a weight of v's shape (op "scale", the fused
    activation kernel with w given) against the torch reference: exact zeros
    and negative weights, zero values, bf16 weights, a non-contiguous value;
    broadcast weights and scalars are declined; the semiring method dispatches
    to the kernel."""
    from semitriton import dispatch
    from semitriton.kernels import elementwise
    monkeypatch.setattr(elementwise, "MIN_NUMEL_CUDA", 0)
    sr = BUILTIN[name]
    g = torch.Generator().manual_seed(31)
    fn = kernel("scale", name)
    for shape, wdt, transposed in (((3, 7, 11), torch.float32, False), ((5, 130), torch.bfloat16, False),
                                   ((9, 6), torch.float32, True)):
        v = gen_values(name, shape, device, g)
        w = torch.randn(shape, generator=g) * 3
        w[torch.rand(shape, generator=g) < 0.2] = 0.0
        w = w.to(wdt).to(device)
        if transposed:
            v = tuple(c.t() for c in v)
            w = w.t()
        check(fn(v, w), reference(sr.scale, v, w), name, 1e-6, 1e-6, f"scale/{name}/{shape}/{wdt}")
    v = gen_values(name, (4, 5), device, g)
    assert fn(v, torch.ones(5, device=device)) is NotImplemented          # broadcast weight
    assert fn(v, 2.0) is NotImplemented
    calls = []
    monkeypatch.setitem(registry.KERNELS, ("scale", name), lambda *a: calls.append(1) or fn(*a))
    if device == "cpu":
        with semitriton.use_backend("triton"):
            sr.scale(v, torch.ones(4, 5))
        assert calls == [1]
        assert dispatch.kernel("scale", "real", v[0]) is None            # real keeps the torch multiply


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ACT_KINDS)
@pytest.mark.parametrize("name", ("real", "abs", "entropy", "maxabs", "max"))
def test_activation(name, kind, device):
    """v ⊗ edge(f'(x)) in one pass against the torch reference (derivative,
    then the semiring's scale): zero values (l = -inf, M+ = -inf), both tails
    of x, x = ±0, a size that is not a multiple of the block, bf16 x."""
    sr = BUILTIN[name]
    fn = kernel("activation", name)
    g = torch.Generator().manual_seed(5)
    n = 300 if device == "cpu" else (1 << 16) + 77
    for dtype in (torch.float32, torch.bfloat16):
        v = gen_values(name, (n,), device, g, dead_index=None)
        x = _act_inputs((n,), dtype, device, g)
        out = fn(v, x, kind)
        ref = reference(sr.activation, v, x, kind)
        # f' is a sum of two terms that cancel near its root (gelu' at x ≈ -0.752,
        # silu' at x ≈ -1.278): there fp32 cannot pin w down in either
        # implementation, so compare where the cancellation loses < 20x
        well = (_act_condition(x, kind) < 20).to(device)
        assert well.float().mean() > 0.9
        rtol = 1e-5 if device == "cpu" else 2e-5
        check(tuple(c[well] for c in out), tuple(c[well] for c in ref), name, rtol, rtol,
              f"{name}/{kind}/{dtype}")


def _act_condition(x, kind):
    """(|a| + |b|)/|a + b| for f' = a + b written as in the kernels (float64)."""
    x = x.double().cpu()
    if kind == "gelu":
        a = 0.5 * torch.special.erfc(-x / 2 ** 0.5)
        b = x * torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5
    elif kind == "gelu_tanh":
        c = (2 / torch.pi) ** 0.5
        u = c * (x + 0.044715 * x ** 3)
        e = torch.exp(-2 * u.abs())
        a = torch.where(u >= 0, 1.0, e) / (1 + e)
        b = 2 * x * e / (1 + e) ** 2 * c * (1 + 3 * 0.044715 * x * x)
    else:
        a, b = torch.sigmoid(x), x * torch.sigmoid(x) * torch.sigmoid(-x)
    return ((a.abs() + b.abs()) / (a + b).abs()).nan_to_num(nan=1.0, posinf=float("inf"))


def test_activation_rules_use_the_fused_op(monkeypatch):
    """GeluBackward0 (both forms) and SiluBackward0 go through the semiring's
    ``activation`` op, which the engine dispatches to the kernel."""
    seen = []
    for name in ("abs", "max"):
        k = registry.KERNELS[("activation", name)]
        monkeypatch.setitem(registry.KERNELS, ("activation", name),
                            lambda v, x, kind, k=k: seen.append(kind) or k(v, x, kind))
    x = torch.randn(4, 6, dtype=torch.float32, requires_grad=True)
    y = (torch.nn.functional.gelu(x) + torch.nn.functional.gelu(x, approximate="tanh")
         + torch.nn.functional.silu(x)).sum()
    for name in ("abs", "max"):
        with semitriton.use_backend("torch"):
            (ref,) = semitriton.grad(y, x, semiring=name)
        with semitriton.use_backend("triton"):
            (got,) = semitriton.grad(y, x, semiring=name)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    assert sorted(seen) == sorted(["gelu", "gelu_tanh", "silu"] * 2)


def test_activation_derivatives_are_accurate_in_the_tails():
    """The reference derivatives: in float64 equal to autograd of the
    activations where autograd's own (naive) float64 forms are accurate
    (|x| <= 5); in float32 within 5e-5 of their float64 values over [-9, 9],
    including the tails where the naive forms (1 + erf, 1 + tanh, 1 - σ) lose
    all digits."""
    from semitriton.semirings._util import activation_derivative
    x64 = torch.cat([torch.linspace(-9, 9, 721, dtype=torch.float64), torch.tensor([0.0, 1e-3, -1e-3])])
    for kind, f in (("gelu", lambda t: torch.nn.functional.gelu(t)),
                    ("gelu_tanh", lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
                    ("silu", torch.nn.functional.silu)):
        well = _act_condition(x64, kind) < 100
        mid = well & (x64.abs() <= 5)
        xx = x64.clone().requires_grad_()
        (auto,) = torch.autograd.grad(f(xx).sum(), xx)
        d64 = activation_derivative(x64, kind)
        err = ((d64 - auto).abs() / auto.abs())[mid].max().item()
        assert err < 1e-8, f"{kind}: float64 form vs autograd {err:.3g}"
        d32 = activation_derivative(x64.float(), kind).double()
        err = ((d32 - d64).abs() / d64.abs().clamp_min(1e-300))[well].max().item()
        assert err < 5e-5, f"{kind}: float32 vs float64 relative error {err:.3g}"


def test_fits_int32_spans():
    """The launchers' int32 offset check: contiguous tensors by element count,
    others by their strided span (per batch element when asked); meta tensors,
    so nothing is allocated."""
    from semitriton.kernels._common import fits_int32
    small = torch.empty(64, 64, device="meta")
    assert fits_int32(small, small.t(), None)
    assert not fits_int32(torch.empty(2, 2**30 + 1, device="meta"))
    assert fits_int32(torch.empty(4, 2**29 + 1, device="meta"), per_batch=True)    # 2^29 + 1 per batch element
    assert not fits_int32(torch.empty(4, 2**29 + 1, device="meta"))
    big_t = torch.empty(2**16, 2**15 + 1, device="meta").t()                      # span > 2^31, not contiguous
    assert not fits_int32(big_t)
    assert fits_int32(torch.zeros(1).expand(2**31 + 5))                            # stride 0: one element
