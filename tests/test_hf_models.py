"""Hugging Face models: `real` equals torch.autograd.grad; eager and sdpa
attention give the same statistics for every semiring."""

import pytest
import torch

import semitriton
from conftest import SEMIRINGS
from hf_models import build, embeds_and_output

transformers = pytest.importorskip("transformers")

KINDS = ["bert", "bert_cls", "gpt2", "llama"]
IDS = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 6, 8, 10, 12, 14]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])


@pytest.mark.parametrize("padding", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_real_equals_autograd(kind, attn, padding):
    model = build(kind, attn)
    emb, score = embeds_and_output(model, kind, IDS, MASK if padding else None)
    (ref,) = torch.autograd.grad(score.sum(), emb, retain_graph=True)
    (got,) = semitriton.grad(score, emb, semiring="real", fast_real=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_real_equals_autograd_float64(kind):
    model = build(kind, "sdpa", dtype=torch.float64)
    emb, score = embeds_and_output(model, kind, IDS, MASK)
    (ref,) = torch.autograd.grad(score.sum(), emb, retain_graph=True)
    (got,) = semitriton.grad(score, emb, fast_real=False)
    assert got.dtype == torch.float64
    # LlamaRMSNorm casts to float32 inside, so torch's own backward runs that
    # part in float32; the engine keeps float64 throughout.
    tol = 1e-5 if kind == "llama" else 1e-10
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())


def _stats(kind, attn, semiring, dtype=torch.float64):
    model = build(kind, attn, dtype=dtype)
    emb, score = embeds_and_output(model, kind, IDS, MASK)
    (vals,) = semitriton.grad_values(score, emb, semiring=semiring)
    return vals


@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_eager_and_sdpa_same_statistics(kind, semiring):
    a = _stats(kind, "eager", semiring)
    b = _stats(kind, "sdpa", semiring)
    # float64 models; LLaMA's RMSNorm rounds through float32 in the forward, so
    # its two attention paths agree to float32 precision only.
    tol = 2e-5 if kind == "llama" else 1e-9
    for ca, cb in zip(a, b):
        fin = torch.isfinite(cb)
        assert torch.equal(fin, torch.isfinite(ca))
        torch.testing.assert_close(ca[fin], cb[fin], rtol=tol, atol=tol * max(1.0, cb[fin].abs().max().item()))


def test_per_example_statistics_in_one_pass():
    """BERT classification: a batch output gives each example its own statistics."""
    model = build("bert_cls", "sdpa", dtype=torch.float64)
    emb, score = embeds_and_output(model, "bert_cls", IDS, MASK)
    for semiring in SEMIRINGS:
        (both,) = semitriton.grad(score, emb, semiring=semiring)
        (first,) = semitriton.grad(score[0], emb, semiring=semiring)
        torch.testing.assert_close(both[0], first[0], rtol=1e-10, atol=1e-12)


def test_training_mode_dropout_is_followed():
    """Dropout in training mode is recorded (NativeDropoutBackward0) and its
    mask edges are followed; real still equals autograd."""
    model = build("bert_cls", "eager").train()
    torch.manual_seed(1)
    emb, score = embeds_and_output(model, "bert_cls", IDS, MASK)
    (ref,) = torch.autograd.grad(score.sum(), emb, retain_graph=True)
    (got,) = semitriton.grad(score, emb, fast_real=False)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_bf16_model_statistics_in_float32():
    model = build("llama", "sdpa", dtype=torch.bfloat16)
    emb, score = embeds_and_output(model, "llama", IDS, MASK)
    (flow,) = semitriton.grad(score, emb, semiring="abs")
    has_path = flow > 0
    assert has_path[1].all() and not has_path[0, 4].any()   # padding token 4 reaches nothing
    for semiring in SEMIRINGS:
        (vals,) = semitriton.grad_values(score, emb, semiring=semiring)
        assert all(c.dtype == torch.float32 for c in vals)
        r = semitriton.semirings.get(semiring).readout(vals)
        assert torch.isfinite(r[has_path]).all()
    (ref,) = torch.autograd.grad(score.sum(), emb, retain_graph=True)
    (got,) = semitriton.grad(score, emb, fast_real=False)
    torch.testing.assert_close(got, ref.float(), rtol=2e-2, atol=2e-2)
