"""The engine on CUDA (skipped without a GPU): the SDPA node types of every CUDA
backend, real == autograd, the Triton backend against the torch reference
rules on whole models, bf16, and float32-vs-float64 on a full-depth model."""

import os

import pytest
import torch
import torch.nn.functional as F

import semitriton
from conftest import SEMIRINGS, assert_semiring_close

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and TRITON_INTERPRET=0")]
transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[3, 5, 7, 9, 11, 2, 4, 6], [4, 6, 8, 10, 12, 14, 16, 18]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])


def _model(kind, attn="sdpa", dtype=torch.float32, patched=False):
    from hf_models import build
    m = build(kind, attn, dtype=dtype).cuda()
    return semitriton.patch(m) if patched else m


def _fwd(m, kind):
    from hf_models import embeds_and_output
    return embeds_and_output(m, kind, IDS.cuda(), MASK.cuda())


def _close(a, b, semiring, tol, what):
    assert_semiring_close(a.double().cpu(), b.double().cpu().numpy(), semiring, tol, what)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_real_equals_autograd(kind, attn):
    m = _model(kind, attn)
    emb, score = _fwd(m, kind)
    (ref,) = torch.autograd.grad(score.sum(), emb, retain_graph=True)
    (got,) = semitriton.grad(score, emb, fast_real=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("patched", [False, True], ids=["aten", "patched"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_triton_backend_equals_torch_reference(kind, patched):
    m = _model(kind, patched=patched)
    emb, score = _fwd(m, kind)
    for s in SEMIRINGS:
        (a,) = semitriton.grad(score, emb, semiring=s, backend="triton", fast_real=False)
        (b,) = semitriton.grad(score, emb, semiring=s, backend="torch", fast_real=False)
        _close(a, b, s, 1e-4, f"{kind}/{s}")


@pytest.mark.parametrize("kind", ["llama4", "deepseek_v2"])
def test_complex_rotary_models_triton_equals_torch_reference(kind):
    """The RotaryPairs node (patched LLaMA 4 / DeepSeek-V2) on CUDA: the
    Triton rope rule over the pairs gathered into halves, whose cos/sin
    broadcast at dim 2 (LLaMA 4's [B, T, H, D]) or 1, against the torch
    reference; real equals autograd."""
    from hf_models import complex_rope_model
    m = semitriton.patch(complex_rope_model(kind).cuda())
    emb = m.get_input_embeddings()(IDS[:1].cuda()).detach().requires_grad_()
    score = m(inputs_embeds=emb, use_cache=False).logits[0, -1, 3]
    (ref,) = torch.autograd.grad(score, emb, retain_graph=True)
    for s in SEMIRINGS:
        (a,) = semitriton.grad(score, emb, semiring=s, backend="triton", fast_real=False)
        (b,) = semitriton.grad(score, emb, semiring=s, backend="torch", fast_real=False)
        _close(a, b, s, 1e-4, f"{kind}/{s}")
        if s == "real":
            torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-5)


def _sdpa_stats(backend_enum, dtype, semiring, causal=False):
    from torch.nn.attention import sdpa_kernel
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4, 64, 32, device="cuda", generator=g).to(dtype).requires_grad_()
    mask = torch.rand(2, 1, 64, 64, device="cuda", generator=g) > 0.3
    mask[..., 0] = True
    with sdpa_kernel([backend_enum]):
        o = F.scaled_dot_product_attention(q, q * 0.5, q, attn_mask=None if causal else mask, is_causal=causal)
    node = type(o.grad_fn).__name__
    w = torch.randn(o.shape, device="cuda", generator=g).to(dtype)
    (v,) = semitriton.grad_values((o * w).float().sum(), q, semiring=semiring)
    return node, v


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_every_cuda_sdpa_backend_gives_the_math_statistics(semiring):
    from torch.nn.attention import SDPBackend
    seen = set()
    for be, dtype in ((SDPBackend.EFFICIENT_ATTENTION, torch.float32), (SDPBackend.CUDNN_ATTENTION, torch.float16),
                      (SDPBackend.FLASH_ATTENTION, torch.float16), (SDPBackend.EFFICIENT_ATTENTION, torch.float16)):
        causal = be == SDPBackend.FLASH_ATTENTION          # flash takes no mask: compare causal runs
        try:
            node, v = _sdpa_stats(be, dtype, semiring, causal)
        except RuntimeError as exc:                 # backend not available for these inputs
            if "No available kernel" in str(exc) or "not supported" in str(exc).lower():
                continue
            raise
        seen.add(node)
        _, ref = _sdpa_stats(SDPBackend.MATH, dtype, semiring, causal)
        for a, b in zip(v, ref):
            fin = torch.isfinite(b)
            assert torch.equal(fin, torch.isfinite(a)), node
            tol = 1e-4 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(a[fin], b[fin], rtol=tol, atol=tol * max(1.0, float(b[fin].abs().max())))
    assert "ScaledDotProductEfficientAttentionBackward0" in seen


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bf16_models(kind):
    m = _model(kind, dtype=torch.bfloat16, patched=True)
    emb, score = _fwd(m, kind)
    (flow,) = semitriton.grad(score, emb, semiring="abs")
    has = flow > 0
    for s in SEMIRINGS:
        (a,) = semitriton.grad(score, emb, semiring=s, backend="triton", fast_real=False)
        (b,) = semitriton.grad(score, emb, semiring=s, backend="torch", fast_real=False)
        assert a.dtype in (torch.float32, torch.float64) and torch.isfinite(a[has]).all()
        _close(a[has], b[has], s, 1e-3, f"bf16 {kind}/{s}")


FUSED_SDPA_NODES = ("ScaledDotProductEfficientAttentionBackward0", "ScaledDotProductCudnnAttentionBackward0",
                    "ScaledDotProductFlashAttentionBackward0")


@pytest.mark.parametrize("dtype,masked", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True)])
def test_fused_attention_gqa_avoids_the_math_kernel(dtype, masked):
    """Grouped-query attention that CUDA's SDPA would run in its math kernel
    (fp32, or a mask): the fused node's forward records a fused kernel on k/v
    repeated to q's heads (memory-efficient; cuDNN for bf16 with a mask on the
    H100 of 2026-11-27); output and ordinary gradients match the math kernel
    with enable_gqa."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from semitriton.fused.attention import FusedAttention, gqa_falls_back_to_math
    g = torch.Generator(device="cuda").manual_seed(1)
    q0 = torch.randn(2, 6, 128, 64, device="cuda", generator=g).to(dtype)
    k0, v0 = (torch.randn(2, 2, 128, 64, device="cuda", generator=g).to(dtype) for _ in range(2))
    mask = (torch.rand(2, 1, 128, 128, device="cuda", generator=g) > 0.2) if masked else None
    if mask is not None:
        mask[..., 0] = True
    go = torch.randn(2, 6, 128, 64, device="cuda", generator=g).to(dtype)
    assert gqa_falls_back_to_math(q0, mask)
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    out = FusedAttention.apply(q, k, v, mask, not masked, None)
    inner_out = out.grad_fn.inner[1]
    assert type(inner_out.grad_fn).__name__ in FUSED_SDPA_NODES, type(inner_out.grad_fn).__name__
    got = torch.autograd.grad(out, (q, k, v), go)
    rq, rk, rv = (t.clone().requires_grad_() for t in (q0, k0, v0))
    with sdpa_kernel([SDPBackend.MATH]):
        ref_out = F.scaled_dot_product_attention(rq, rk, rv, attn_mask=mask, is_causal=not masked, enable_gqa=True)
    ref = torch.autograd.grad(ref_out, (rq, rk, rv), go)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=10 * tol, atol=10 * tol)


def test_readouts_on_cuda():
    m = _model("llama", patched=True)
    emb, score = _fwd(m, "llama")
    (p,) = semitriton.top_paths(score[1], emb, k=1)
    (mx,) = semitriton.grad(score[1], emb, semiring="maxabs")
    assert p.weight == pytest.approx(float(mx.max()), rel=1e-4)
    attr = semitriton.branch_attribution(score, emb, heads=True)
    tot = torch.stack([attr.attention[0][b] for b in semitriton.ATTN_BRANCHES]).amax(0)
    torch.testing.assert_close(tot, attr.total[0])


def test_readouts_inside_cuda_autocast_and_inference_mode():
    """The walk turns CUDA autocast off and inference mode off (semitriton.modes):
    a graph recorded outside reads the same inside either block, with the
    Triton kernels."""
    m = _model("llama", patched=True)
    emb, score = _fwd(m, "llama")
    s = score.sum()

    def readouts():
        return ([semitriton.grad(s, emb, semiring=sr)[0] for sr in ("real", "abs", "maxabs", "entropy")]
                + [torch.tensor([p.weight for p in semitriton.top_paths(s, emb, k=2)])])
    want = readouts()
    for block in (lambda: torch.autocast("cuda", dtype=torch.bfloat16), torch.inference_mode):
        with block():
            got = readouts()
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_full_depth_float32_triton_vs_float64():
    """BERT-base, 12 layers: the Triton kernels' float32 statistics against a
    float64 torch-reference run of the same model."""
    cfg = transformers.BertConfig()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval().cuda()
    ids = torch.randint(5, 1000, (2, 32), device="cuda")
    stats = {}
    for dt, be in ((torch.float32, "triton"), (torch.float64, "torch")):
        m = model.to(dt)
        emb = m.get_input_embeddings()(ids).detach().requires_grad_()
        logits = m(inputs_embeds=emb).logits
        score = logits[:, -1, 7] - logits[:, -1, 3]
        stats[dt] = {s: semitriton.grad(score, emb, semiring=s, backend=be, fast_real=False)[0]
                     for s in SEMIRINGS}
    for s in SEMIRINGS:
        a, b = stats[torch.float32][s], stats[torch.float64][s]
        assert torch.isfinite(a).all() and ((a != 0) | (b == 0)).all(), s
        _close(a, b, s, 5e-4 if s == "abs" else 1e-4, f"bert-base {s}")


def test_statistics_keep_fp32_accuracy_with_tf32_on():
    """Training code often lets cuBLAS use TF32; the fp32 abs/entropy linears
    then take the Triton GEMM ("tf32x3") instead of exp/cuBLAS/log, so a
    graph's fp32 statistics keep their accuracy against a float64 run (the
    forwards run with TF32 off: only the pass is under test)."""
    cfg = transformers.BertConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg).eval().cuda()
    ids = torch.randint(5, 1000, (2, 32), device="cuda")
    stats = {}
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for dt, be in ((torch.float32, None), (torch.float64, "torch")):
            torch.backends.cuda.matmul.allow_tf32 = False
            m = model.to(dt)
            emb = m.get_input_embeddings()(ids).detach().requires_grad_()
            logits = m(inputs_embeds=emb).logits
            score = logits[:, -1, 7] - logits[:, -1, 3]
            torch.backends.cuda.matmul.allow_tf32 = True
            stats[dt] = {s: semitriton.grad(score, emb, semiring=s, backend=be)[0]
                         for s in ("abs", "entropy", "maxabs")}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    for s in ("abs", "entropy", "maxabs"):
        _close(stats[torch.float32][s], stats[torch.float64][s], s, 1e-4, f"tf32 on, {s}")
