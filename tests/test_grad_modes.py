"""semitriton called from inside the blocks users run models in: the same
recorded graph gives the same statistics inside ``torch.no_grad()``,
``torch.inference_mode()`` and ``torch.autocast`` as outside (the walk runs
in its own modes, semitriton.modes), and the ordinary backward of a patched
model works where the unpatched one does."""

import pytest
import torch

import semitriton
from hf_models import build, embeds_and_output

pytest.importorskip("transformers")

IDS = torch.tensor([[2, 17, 41, 5, 3, 9]])


@pytest.fixture(scope="module")
def gpt2_graph():
    model = semitriton.patch(build("gpt2"))
    emb, score = embeds_and_output(model, "gpt2", IDS)
    return model, emb, score.sum()


def _readouts(emb, score):
    out = {sr: semitriton.grad(score, emb, semiring=sr, fast_real=False)[0]
           for sr in ("real", "abs", "maxabs", "max", "entropy")}
    out["real_fast"] = semitriton.grad(score, emb)[0]                 # torch's own backward
    (ent,) = semitriton.grad_values(score, emb, semiring="entropy")
    out["token_entropy"] = semitriton.token_readout(ent, "entropy")
    out["paths"] = [(p.source_index, p.weight) for p in semitriton.top_paths(score, emb, k=2)]
    out["samples"] = [p.source_index for p in semitriton.sample_paths(score, emb, n=3, seed=0)]
    out["branches"] = semitriton.branch_attribution(score, emb).top_branch(0)
    from semitriton.report import analyze
    out["analysis"] = analyze(score, emb, k=1).stats
    return out


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast_bf16"])
def test_the_same_graph_reads_the_same_inside_the_users_block(gpt2_graph, mode):
    """Before: top_paths returned [] and sample_paths failed inside
    inference_mode; analyze failed under no_grad and inference_mode; inside
    autocast the walk ran in bfloat16 (abs off by 5e-3, real returned bf16),
    and so did the real semiring's fast path (torch's own backward)."""
    _, emb, score = gpt2_graph
    want = _readouts(emb, score)
    block = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
             "autocast_bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[mode]
    with block():
        got = _readouts(emb, score)
    for key, w in want.items():
        g = got[key]
        if isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype, key
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=key)
        else:
            assert g == w, key


def test_a_sequence_of_outputs_inside_no_grad(gpt2_graph):
    """The outputs' join is recorded also inside no_grad (it was diagnosed as
    an output computed without a gradient graph)."""
    model, _, _ = gpt2_graph
    emb = model.get_input_embeddings()(IDS).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    s1, s2 = logits[0, -1, 3], logits[0, -1, 4]
    want = semitriton.grad([s1, s2], emb, semiring="abs")[0]
    with torch.no_grad():
        got = semitriton.grad([s1, s2], emb, semiring="abs")[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_patched_activations_differentiate_inside_inference_mode():
    """A patched activation recomputes its derivative through autograd,
    which inference mode switched off: torch.autograd.grad of a patched
    model, and the walk through an activation without a fused rule, failed
    there while the unpatched model's backward works."""
    from transformers.activations import QuickGELUActivation
    model = semitriton.patch(build("gpt2"))
    emb, score = embeds_and_output(model, "gpt2", IDS)
    score = score.sum()
    want = torch.autograd.grad(score, emb, retain_graph=True)[0]
    with torch.inference_mode():
        got = torch.autograd.grad(score, emb, retain_graph=True)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    net = semitriton.patch(torch.nn.Sequential(torch.nn.Linear(4, 4), QuickGELUActivation()))
    x = torch.randn(2, 4, requires_grad=True)
    y = net(x).sum()
    want = semitriton.grad(y, x, semiring="abs")[0]
    with torch.inference_mode():
        got = semitriton.grad(y, x, semiring="abs")[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_tf32_on_sends_fp32_linears_to_the_tf32x3_kernel_and_reads_flags_safely():
    """With TF32 allowed for cuBLAS (training code often sets it), the abs and
    entropy linears with fp32 weights take the Triton GEMM ("tf32x3": fp32
    accuracy), not exp/cuBLAS/log (~1e-3 relative with TF32); semitriton
    leaves the flags alone and reads them without tripping torch's check
    against mixing its two precision APIs (a legacy read after the
    fp32_precision API was set raises)."""
    from semitriton import cuda_graph, dispatch
    from semitriton.modes import tf32_matmul_on, tf32_settings

    mm = torch.backends.cuda.matmul
    before = (torch.get_float32_matmul_precision(), mm.allow_tf32, torch.backends.cudnn.allow_tf32)
    new_api = hasattr(mm, "fp32_precision")
    old_new = mm.fp32_precision if new_api else None
    w32, w16 = torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float16)
    try:
        assert not tf32_matmul_on() and dispatch._fp32_gemm_prefers_cublas(None, w32)
        mm.allow_tf32 = True
        assert tf32_matmul_on() and tf32_settings()[0]
        assert not dispatch._fp32_gemm_prefers_cublas(None, w32)
        assert dispatch._fp32_gemm_prefers_cublas(None, w16)          # the kernel declines fp16 anyway
        mm.allow_tf32 = False
        torch.set_float32_matmul_precision("high")                      # the other legacy switch
        assert tf32_matmul_on()
        torch.set_float32_matmul_precision("highest")
        assert not tf32_matmul_on()
        if new_api:
            mm.fp32_precision = "tf32"
            with pytest.raises(RuntimeError):
                mm.allow_tf32                                           # torch's own mix check
            assert tf32_matmul_on() and not dispatch._fp32_gemm_prefers_cublas(None, w32)
            cuda_graph._torch_settings()                                # reads without tripping it
            mm.fp32_precision = old_new
    finally:
        if new_api:
            mm.fp32_precision = old_new
        torch.set_float32_matmul_precision(before[0])
        mm.allow_tf32, torch.backends.cudnn.allow_tf32 = before[1], before[2]
    assert (torch.get_float32_matmul_precision(), mm.allow_tf32, torch.backends.cudnn.allow_tf32) == before
