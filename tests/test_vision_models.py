"""Vision and audio models of transformers (tiny random configs, built
offline) walk to their raw inputs in every semiring: ViT and CLIP (patch
convolutions), Whisper's encoder (conv1d), wav2vec2 (group norm, strided
conv1d, grouped positional convolution), ResNet (batch norm, max pool),
ConvNeXt (depthwise convolutions) and Swin (window shifts, an adaptive pool
on a strided view). real equals torch.autograd.grad; |real| ≤ abs and
maxabs ≤ abs elementwise (one path's |product| and the |sum| are each at
most the sum of all |products|); patching keeps the outputs."""

import os

import pytest
import torch

import semitriton
from conftest import SEMIRINGS, assert_semiring_close
from semitriton.semirings import get

transformers = pytest.importorskip("transformers")


def _vit(t):
    c = t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    image_size=16, patch_size=4, num_labels=3)
    return t.ViTForImageClassification(c), "pixel_values", (2, 3, 16, 16)


def _clip_vision(t):
    c = t.CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=16, patch_size=4)
    return t.CLIPVisionModel(c), "pixel_values", (2, 3, 16, 16)


def _whisper_encoder(t):
    c = t.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8,
                        max_source_positions=8, vocab_size=60, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    return t.WhisperModel(c).get_encoder(), "input_features", (2, 8, 16)


def _wav2vec2(t):
    c = t.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=4, feat_extract_norm="group", vocab_size=20)
    return t.Wav2Vec2ForCTC(c), "input_values", (2, 400)


def _resnet(t):
    c = t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, layer_type="basic")
    return t.ResNetForImageClassification(c), "pixel_values", (2, 3, 32, 32)


def _convnext(t):
    c = t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3, image_size=32)
    return t.ConvNextForImageClassification(c), "pixel_values", (2, 3, 32, 32)


def _swin(t):
    c = t.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=2,
                     num_labels=3)
    return t.SwinForImageClassification(c), "pixel_values", (2, 3, 32, 32)


MODELS = {"vit": _vit, "clip_vision": _clip_vision, "whisper_encoder": _whisper_encoder, "wav2vec2": _wav2vec2,
          "resnet": _resnet, "convnext": _convnext, "swin": _swin}


def _score(out):
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return y.reshape(y.shape[0], -1)[:, 1].sum()


@pytest.mark.parametrize("name", list(MODELS))
def test_vision_and_audio_models_walk(name):
    torch.manual_seed(0)
    model, key, shape = MODELS[name](transformers)
    model = model.eval().double()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    before = _score(model(**{key: x}))
    semitriton.patch(model)
    score = _score(model(**{key: x}))
    torch.testing.assert_close(score, before, rtol=1e-12, atol=0)
    (ref,) = torch.autograd.grad(score, x, retain_graph=True)
    assert ref.abs().max() > 0
    (real,) = semitriton.grad(score, x, semiring="real", fast_real=False)
    torch.testing.assert_close(real, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    abs_ = semitriton.grad(score, x, semiring="abs")[0]
    maxabs = semitriton.grad(score, x, semiring="maxabs")[0]
    slack = 1 + 1e-9
    assert bool((ref.abs() <= abs_ * slack).all()), "|real| > abs"
    assert bool((maxabs <= abs_ * slack).all()), "maxabs > abs"
    assert bool((maxabs > 0).any())
    for s in ("max", "entropy"):
        v = semitriton.grad_values(score, x, semiring=s)[0]
        assert not any(bool(torch.isnan(c).any()) for c in v), f"NaN in {s}"
        assert bool(torch.isfinite(get(s).readout(v)).any())


CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("name", ["vit", "wav2vec2", "resnet", "convnext"])
def test_vision_and_audio_models_on_cuda(name):
    """On CUDA (cuDNN convolutions and batch norm, the Triton kernels, TF32
    off): real equals autograd, and every semiring's Triton backend agrees
    with the torch reference."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.manual_seed(0)
        model, key, shape = MODELS[name](transformers)
        model = model.eval().cuda()
        for p in model.parameters():
            p.requires_grad_(False)
        semitriton.patch(model)
        x = torch.randn(*shape, device="cuda", requires_grad=True)
        score = _score(model(**{key: x}))
        (ref,) = torch.autograd.grad(score, x, retain_graph=True)
        (real,) = semitriton.grad(score, x, semiring="real", fast_real=False)
        torch.testing.assert_close(real, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
        for s in SEMIRINGS:
            kw = {"fast_real": False} if s == "real" else {}
            (a,) = semitriton.grad(score, x, semiring=s, backend="triton", **kw)
            (b,) = semitriton.grad(score, x, semiring=s, backend="torch", **kw)
            assert_semiring_close(a.double().cpu(), b.double().cpu().numpy(), s, 1e-4, f"{name}/{s}")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
