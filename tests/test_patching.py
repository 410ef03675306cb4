"""semitriton.patch / unpatch on Hugging Face and PyTorch models."""

import copy
import gc
import warnings

import pytest
import torch
import torch.nn as nn

import semitriton
from conftest import SEMIRINGS, assert_semiring_close, node_types, walk_every_semiring
from hf_models import build, complex_rope_model, embeds_and_output
from oracle import Program, Step, oracle

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 6, 8, 10, 12, 14]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])


def _extra(kind, dtype=torch.float32, attn="sdpa"):
    t = transformers
    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32)
    cfg, cls = {
        "qwen2": (t.Qwen2Config, t.Qwen2ForCausalLM),
        "mistral": (t.MistralConfig, t.MistralForCausalLM),
        "gemma": (t.GemmaConfig, t.GemmaForCausalLM),
    }[kind]
    extra = {"head_dim": 4} if kind == "gemma" else {}
    c = cfg(**common, **extra)
    c._attn_implementation = attn
    m = cls(c).to(dtype).eval()
    if kind == "gemma":      # non-trivial (1 + weight)
        for mod in m.modules():
            if type(mod).__name__ == "GemmaRMSNorm":
                mod.weight.data.normal_(0, 0.3)
    return m


def _model(kind, attn="sdpa", dtype=torch.float32):
    if kind in ("qwen2", "mistral", "gemma"):
        return _extra(kind, dtype, attn)
    return build(kind, attn, dtype=dtype)


ALL = ["bert", "bert_cls", "gpt2", "llama", "qwen2", "mistral", "gemma"]


def _logits(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ALL)
def test_outputs_equal_and_unpatch_restores(kind, attn):
    model = _model(kind, attn)
    before = _logits(model)
    modules_before = dict(model.named_modules())
    keys_before = list(model.state_dict())
    impl_before = model.config._attn_implementation
    semitriton.patch(model)
    summary = semitriton.patch_summary(model)
    assert summary["attention_modules"] > 0
    after = _logits(model)
    assert after.dtype == before.dtype
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    assert list(model.state_dict()) == keys_before
    # patching twice changes nothing
    mods = dict(model.named_modules())
    semitriton.patch(model)
    assert list(dict(model.named_modules())) == list(mods)
    assert all(mods[k] is v for k, v in model.named_modules())
    assert semitriton.patch_summary(model) == summary
    assert torch.equal(_logits(model), after)
    semitriton.unpatch(model)
    assert list(dict(model.named_modules())) == list(modules_before)
    assert all(modules_before[k] is v for k, v in model.named_modules())
    assert model.config._attn_implementation == impl_before
    assert torch.equal(_logits(model), before)


def test_summary_lists_what_was_swapped(capsys):
    model = _model("llama")
    semitriton.patch(model, verbose=True)
    s = semitriton.patch_summary(model)
    assert s["swapped"] == {"LlamaRMSNorm": 5} and s["attention_modules"] == 2
    assert "5× LlamaRMSNorm" in capsys.readouterr().out
    gpt = semitriton.patch(_model("gpt2"))
    assert semitriton.patch_summary(gpt)["swapped"] == {"NewGELUActivation": 2}


@pytest.mark.parametrize("kind,norm", [("qwen2", "Qwen2RMSNorm"), ("mistral", "MistralRMSNorm"),
                                       ("gemma", "GemmaRMSNorm")])
def test_rms_norms_of_llama_relatives_are_swapped(kind, norm):
    """Every RMS norm of the model (2 per layer and the final one) becomes
    semitriton's one-node norm, and each attention one fused node: the
    patched graph holds no composed norm (pow/rsqrt) or softmax nodes."""
    model = semitriton.patch(_model(kind))
    s = semitriton.patch_summary(model)
    assert s["swapped"].get(norm) == 5 and s["attention_modules"] == 2, s
    assert not any(type(m).__name__ == norm for m in model.modules())
    emb = model.get_input_embeddings()(IDS).detach().requires_grad_()
    names = node_types(model(inputs_embeds=emb, attention_mask=MASK).logits.sum())
    assert not {"PowBackward0", "RsqrtBackward0", "SoftmaxBackward0", "ScaledDotProductEfficientAttentionBackward0",
                "ScaledDotProductFlashAttentionForCpuBackward0"} & set(names), sorted(set(names))
    assert sum("RMSNorm" in n for n in names) == 5 and sum("Attention" in n for n in names) == 2, sorted(set(names))


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "gemma"])
def test_training_backward_still_correct(kind):
    model = _model(kind).train()
    ref = copy.deepcopy(model)
    semitriton.patch(model)
    for m in (model, ref):
        torch.manual_seed(3)
        out = m(input_ids=IDS, attention_mask=MASK).logits
        (out.float() ** 2).mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_save_and_reload(kind, tmp_path):
    model = _model(kind)
    semitriton.patch(model)
    out = _logits(model)
    model.save_pretrained(tmp_path)
    cls = type(model)
    again = cls.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(again), out, rtol=1e-5, atol=1e-6)
    assert again.config._attn_implementation != semitriton.patching.ATTN_NAME


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_patched_eager_and_sdpa_same_statistics(kind, semiring):
    stats = []
    for attn in ("eager", "sdpa"):
        model = semitriton.patch(_model(kind, attn, dtype=torch.float64))
        emb, score = embeds_and_output(model, kind, IDS, MASK)
        stats.append(semitriton.grad_values(score, emb, semiring=semiring)[0])
    for a, b in zip(*stats):
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a))
        torch.testing.assert_close(a[fin], b[fin], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_fused_attention_equals_aten_attention(kind, semiring):
    """Patching only the attention changes no statistic (both are canonical)."""
    model = _model(kind, "eager", dtype=torch.float64)
    emb, score = embeds_and_output(model, kind, IDS, MASK)
    (ref,) = semitriton.grad_values(score, emb, semiring=semiring)
    semitriton.patch(model, norms=False, activations=False)
    emb2, score2 = embeds_and_output(model, kind, IDS, MASK)
    (got,) = semitriton.grad_values(score2, emb2, semiring=semiring)
    # LlamaRMSNorm rounds through float32, so eager vs fused forwards agree to float32 only
    tol = 2e-5 if kind == "llama" else 1e-9
    for a, b in zip(got, ref):
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin], b[fin], rtol=tol, atol=tol * max(1.0, b[fin].abs().max().item()))


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_fused_attention_gqa_with_repeated_heads(mask_kind, monkeypatch):
    """Where CUDA's SDPA would run grouped-query attention in its math kernel
    (fp32, or any mask), the fused node calls SDPA with k/v repeated to q's
    heads instead: same output, same ordinary gradients of q, k and v (summed
    over each group), same semiring values. Forced here on the CPU."""
    from semitriton.fused import attention as fa

    g = torch.Generator().manual_seed(8)
    B, H, Hk, T, D = 2, 6, 2, 5, 4
    q0, k0, v0 = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (H, Hk, Hk))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, T, T, generator=g) < 0.8
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(B, 1, T, T, generator=g, dtype=torch.float64)
    go = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    predicate = fa.gqa_falls_back_to_math
    results = {}
    for forced in (False, True):
        monkeypatch.setattr(fa, "gqa_falls_back_to_math", lambda q, m, _f=forced: _f)
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = fa.fused_attention(q, k, v, mask, mask is None, None)
        grads = torch.autograd.grad(out, (q, k, v), go, retain_graph=True)
        stats = [semitriton.grad_values((out * go).sum(), (q, k, v), semiring=sr) for sr in SEMIRINGS]
        results[forced] = (out.detach(), grads, stats)
    (o1, g1, s1), (o2, g2, s2) = results[False], results[True]
    torch.testing.assert_close(o2, o1, rtol=1e-12, atol=1e-12)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for vals_a, vals_b in zip(s2, s1):
        for va, vb in zip(vals_a, vals_b):
            for ca, cb in zip(va, vb):
                assert torch.equal(ca, cb)
    # the predicate: CUDA fp32, or CUDA with a mask; never the CPU
    assert not predicate(q0.float(), None) and not predicate(q0.float(), mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_half_precision_models(kind, dtype):
    model = _model(kind, dtype=dtype)
    before = _logits(model)
    semitriton.patch(model)
    after = _logits(model)
    assert after.dtype == dtype
    # the same ops in the same dtype: equal up to one rounding of the largest logit
    torch.testing.assert_close(after, before, rtol=0, atol=torch.finfo(dtype).eps * before.abs().max().item())
    emb, score = embeds_and_output(model, kind, IDS, MASK)
    (walked,) = semitriton.grad(score, emb, semiring="real")             # a half graph: walked in float32
    (ref,) = torch.autograd.grad(score, emb, torch.ones_like(score), retain_graph=True)   # torch's, in half
    assert walked.dtype == torch.float32
    torch.testing.assert_close(walked, ref.float(), rtol=0, atol=3e-2 * ref.abs().max().item())
    (flow,) = semitriton.grad(score, emb, semiring="abs")
    has_path = flow > 0
    for semiring in SEMIRINGS:
        (vals,) = semitriton.grad_values(score, emb, semiring=semiring)
        assert all(c.dtype == torch.float32 for c in vals)
        assert torch.isfinite(semitriton.semirings.get(semiring).readout(vals)[has_path]).all()


def _canonical_program(x0, w, eps, gelu_mod):
    steps = [
        Step("n", lambda x: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)), ("x",)),
        Step("a", lambda t: gelu_mod(t), ("n",)),           # one primitive each
        Step("out", lambda t: (t * torch.linspace(-1, 1, t.shape[-1], dtype=t.dtype)).sum(), ("a",)),
    ]
    return Program("canonical", {"x": x0}, steps, engine=None)


#: RMS norms: listed classes, and classes found by name and checked on the
#: module (Phi3, Gemma3 with 1 + weight, T5's "LayerNorm"): (module, class, γ offset)
RMS_NORMS = {"nn.RMSNorm": (None, "RMSNorm", 0.0), "LlamaRMSNorm": ("llama", "LlamaRMSNorm", 0.0),
             "Phi3RMSNorm": ("phi3", "Phi3RMSNorm", 0.0), "Gemma3RMSNorm": ("gemma3", "Gemma3RMSNorm", 1.0),
             "T5LayerNorm": ("t5", "T5LayerNorm", 0.0), "Qwen2RMSNorm": ("qwen2", "Qwen2RMSNorm", 0.0),
             "MistralRMSNorm": ("mistral", "MistralRMSNorm", 0.0), "GemmaRMSNorm": ("gemma", "GemmaRMSNorm", 1.0)}


@pytest.mark.parametrize("norm", list(RMS_NORMS))
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_patched_statistics_follow_canonical_definitions(semiring, norm):
    """RMSNorm and the composed tanh-GELU each count as ONE primitive once patched."""
    import importlib

    from transformers.activations import NewGELUActivation
    torch.manual_seed(0)
    module, cls_name, offset = RMS_NORMS[norm]
    if module is None:
        rms = nn.RMSNorm(6, eps=1e-5)
    else:
        cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls_name)
        rms = cls(6, eps=1e-5)
    model = nn.Sequential(rms, NewGELUActivation()).double()
    model[0].weight.data.normal_(1 - offset, 0.3)
    x0 = torch.randn(2, 3, 6, dtype=torch.float64)
    semitriton.patch(model)
    assert semitriton.patch_summary(model)["swapped"] == {cls_name: 1, "NewGELUActivation": 1}
    x = x0.clone().requires_grad_()
    y = model(x)
    out = (y * torch.linspace(-1, 1, 6, dtype=torch.float64)).sum()
    (got,) = semitriton.grad(out, x, semiring=semiring)
    w = model[0].weight.detach().clone() + offset
    expected = oracle(_canonical_program(x0, w, 1e-5, NewGELUActivation()), semiring)["x"]
    # transformers' RMS norms compute in float32 even in a float64 model
    tol = 1e-9 if norm == "nn.RMSNorm" else 1e-6
    assert_semiring_close(got, expected, semiring, tol, "patched rmsnorm+gelu")


def test_norms_patch_cannot_swap_are_named_in_the_summary():
    """A class named like an RMS norm whose forward is something else, and a
    norm semitriton does not know (e.g. Cohere's composed layer norm), are
    left as they are and listed under "skipped" (they were left silently)."""
    class OddRMSNorm(nn.Module):                    # mean-centred: not an RMS norm
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(6))

        def forward(self, x):
            x = x - x.mean(-1, keepdim=True)
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class ScaleNorm(nn.Module):
        def forward(self, x):
            return x / x.norm(dim=-1, keepdim=True)

    class PlainLayerNorm(nn.LayerNorm):             # torch's forward: one canonical node, not reported
        pass

    class FreeLayerNorm1P(nn.Module):               # OLMo/Nemotron: calls F.layer_norm, one node
        def forward(self, x):
            return torch.nn.functional.layer_norm(x, (6,), None, None, eps=1e-5)

    class PreLayerNormBlock(nn.Module):             # not a norm: "Norm" inside its name only
        def forward(self, x):
            return x * 2

    class ToyRMSNormGated(nn.Module):               # Mamba's gated RMS norm: composed, listed
        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    model = nn.Sequential(OddRMSNorm(), ScaleNorm(), ScaleNorm(), PlainLayerNorm(6), FreeLayerNorm1P(),
                          PreLayerNormBlock(), ToyRMSNormGated())
    x = torch.randn(2, 6)
    ref = model(x)
    semitriton.patch(model)
    summary = semitriton.patch_summary(model)
    assert summary["swapped"] == {}
    assert any("OddRMSNorm" in m and "differs" in m for m in summary["skipped"])
    assert sum("ScaleNorm" in m and "aten ops" in m for m in summary["skipped"]) == 1
    assert not any(n in m for m in summary["skipped"] for n in ("PlainLayerNorm", "FreeLayerNorm1P", "PreLayerNorm"))
    assert any("ToyRMSNormGated" in m and "aten ops" in m for m in summary["skipped"])
    assert torch.equal(model(x), ref)
    assert node_types(model(x.requires_grad_())).count("NativeLayerNormBackward0") == 2   # the two unreported
    semitriton.unpatch(model)


def test_a_norm_that_ignores_its_weight_is_swapped_without_it():
    """FalconMamba's weightless RMS norm keeps a dummy buffer of ones that its
    forward never reads, and is applied to rows of other widths: the swapped
    node has no weight (it multiplied by the buffer, and the backward failed
    on the other widths), and reads as one primitive x·rsqrt(mean(x²)+eps)."""
    class DummyWeightRMSNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.eps = 1e-6
            self.weight = nn.Buffer(torch.ones(n), persistent=False)

        def forward(self, x):
            return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), DummyWeightRMSNorm(8)).double()
    x0 = torch.randn(4, 3, dtype=torch.float64)
    ref = model(x0)
    plain = copy.deepcopy(model)
    semitriton.patch(model)
    assert semitriton.patch_summary(model)["swapped"] == {"DummyWeightRMSNorm": 1}
    x = x0.clone().requires_grad_()
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert "CanonicalRMSNormBackward" in node_types(out)
    (W, b) = model[0].weight.detach(), model[0].bias.detach()
    steps = [Step("h", lambda t: t @ W.T + b, ("x",)),
             Step("n", lambda t: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6), ("h",)),
             Step("out", lambda t: (t * torch.arange(5.0, dtype=t.dtype)).sum(), ("n",))]
    score = (out * torch.arange(5.0, dtype=out.dtype)).sum()
    xp = x0.clone().requires_grad_()
    torch.testing.assert_close(torch.autograd.grad(score, x, retain_graph=True)[0],
                               torch.autograd.grad((plain(xp) * torch.arange(5.0, dtype=out.dtype)).sum(), xp)[0],
                               rtol=1e-5, atol=0)          # the module normalises in float32
    for s in SEMIRINGS:
        (got,) = semitriton.grad(score, x, semiring=s, **({"fast_real": False} if s == "real" else {}))
        assert_semiring_close(got, oracle(Program("weightless", {"x": x0}, steps, engine=None), s)["x"], s, 1e-9,
                              f"weightless norm/{s}")
    semitriton.unpatch(model)


def test_a_weight_of_ones_is_not_taken_for_an_unused_one():
    """A norm whose weight is all ones at patch time (a fresh model, weights
    loaded later) and whose forward also runs on other widths still reads
    its weight: it is swapped with it, and the torch gradients stay right
    once the weight changes."""
    class LenientRMSNorm(nn.Module):                # γ where the widths agree, none otherwise
        def __init__(self, n):
            super().__init__()
            self.weight, self.eps = nn.Parameter(torch.ones(n)), 1e-6

        def forward(self, x):
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return y * self.weight if x.shape[-1] == self.weight.shape[-1] else y

    model = nn.Sequential(LenientRMSNorm(4))
    plain = copy.deepcopy(model)
    semitriton.patch(model)
    assert not model[0]._semitriton_weightless
    with torch.no_grad():
        for m in (model, plain):
            m[0].weight.copy_(torch.tensor([0.5, 2.0, -1.0, 3.0]))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((model(x) * w).sum(), (x, model[0].weight))
    want = torch.autograd.grad((plain(x) * w).sum(), (x, plain[0].weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    semitriton.unpatch(model)


def test_falcon_mamba_patched_keeps_its_gradients():
    """FalconMamba applies its weightless norms to the time step (width
    time_step_rank) and to B/C (width state_size): patched, the outputs and
    torch's gradient are the unpatched ones, and every semiring runs."""
    t = transformers
    if not hasattr(t, "FalconMambaForCausalLM"):
        pytest.skip("transformers without FalconMamba")
    torch.manual_seed(0)
    cfg = t.FalconMambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, state_size=4, time_step_rank=2,
                              expand=2, conv_kernel=4)
    model = t.FalconMambaForCausalLM(cfg).eval()
    ids = IDS[:1]
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    ref = model(inputs_embeds=emb).logits[0, -1, 3]
    (g_ref,) = torch.autograd.grad(ref, emb)
    semitriton.patch(model)
    assert semitriton.patch_summary(model)["swapped"].get("FalconMambaWeightlessRMSNorm") == 6
    out = model(inputs_embeds=emb).logits[0, -1, 3]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.autograd.grad(out, emb, retain_graph=True)[0], g_ref, rtol=1e-5, atol=1e-7)
    walk_every_semiring(out, emb, g_ref)
    semitriton.unpatch(model)


def test_unlisted_rms_norms_on_the_meta_device_are_left():
    """On the meta device a norm's forward cannot be checked: a listed class
    (known formula and offset) is swapped, one found by name is not (it could
    be Gemma3's 1 + weight, or not an RMS norm at all), and the summary says why."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    with torch.device("meta"):
        model = nn.Sequential(LlamaRMSNorm(6), Gemma3RMSNorm(6))
    semitriton.patch(model)
    summary = semitriton.patch_summary(model)
    assert summary["swapped"] == {"LlamaRMSNorm": 1}
    assert any("Gemma3RMSNorm" in m and "meta device" in m for m in summary["skipped"])
    semitriton.unpatch(model)


@pytest.mark.parametrize("cls_name, kind", [("NewGELUActivation", "gelu_tanh"), ("FastGELUActivation", "gelu_tanh"),
                                             ("GELUTanh", "gelu_tanh"), ("QuickGELUActivation", None)])
def test_known_composed_activations_use_the_fused_rule(cls_name, kind):
    """Patched tanh-GELU modules record their kind, so their rule is the fused
    ``activation`` op; the statistics equal those from autograd's derivative of
    the module's own formula (the generic path, which QuickGELU keeps)."""
    import transformers.activations as acts
    torch.manual_seed(1)
    mod = nn.Sequential(getattr(acts, cls_name)()).double()
    semitriton.patch(mod)
    # |x| <= 4: beyond, the generic path's naive float64 1 + tanh loses digits (and
    # reads as 0 from x ≈ -9 on) where the fused rule's stable form does not
    x = (torch.randn(3, 40, dtype=torch.float64) * 1.5).clamp(-4, 4).requires_grad_()
    y = mod(x)
    assert type(y.grad_fn).__name__ == "CanonicalElementwiseBackward" and y.grad_fn.kind == kind
    out = (y * torch.linspace(-1, 1, 40, dtype=torch.float64)).sum()
    y.grad_fn.kind = None                   # the generic path: f'(x) by autograd of the formula
    generic = {s: semitriton.grad(out, x, semiring=s)[0] for s in SEMIRINGS}
    y.grad_fn.kind = kind
    for s in SEMIRINGS:
        (got,) = semitriton.grad(out, x, semiring=s)
        assert_semiring_close(got, generic[s].numpy(), s, 1e-9, f"{cls_name}/{s}")


def test_nn_rmsnorm_and_custom_modules():
    class Custom(nn.Module):          # unknown custom module: aten rules apply
        def forward(self, x):
            return torch.tanh(x) * x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 5), nn.RMSNorm(5), Custom(), nn.Linear(5, 2))
    x = torch.randn(3, 5, requires_grad=True)
    before = model(x)
    semitriton.patch(model)
    assert semitriton.patch_summary(model)["swapped"] == {"RMSNorm": 1}
    after = model(x)
    torch.testing.assert_close(after, before)
    (g,) = semitriton.grad(after.sum(), x, fast_real=False)
    torch.testing.assert_close(g, torch.autograd.grad(before.sum(), x)[0], rtol=1e-5, atol=1e-6)
    # every semiring against the oracle: the swapped RMSNorm one primitive,
    # the custom module's tanh(x)·x two edges (through tanh and directly)
    model = model.double()
    x0 = torch.randn(3, 5, dtype=torch.float64)
    xd = x0.clone().requires_grad_()
    out = model(xd).sum()
    (W1, b1), rms_w, (W2, b2) = (model[0].weight.detach(), model[0].bias.detach()), model[1].weight.detach(), \
        (model[3].weight.detach(), model[3].bias.detach())
    eps = torch.finfo(torch.float64).eps if model[1].eps is None else model[1].eps
    steps = [
        Step("h", lambda t: t @ W1.T + b1, ("x",)),
        Step("n", lambda t: rms_w * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps), ("h",)),
        Step("th", torch.tanh, ("n",)),
        Step("c", lambda a, b: a * b, ("th", "n")),
        Step("y", lambda t: t @ W2.T + b2, ("c",)),
        Step("out", lambda t: t.sum(), ("y",)),
    ]
    for s in SEMIRINGS:
        (got,) = semitriton.grad(out, xd, semiring=s)
        expected = oracle(Program("custom", {"x": x0}, steps, engine=None), s)["x"]
        assert_semiring_close(got, expected, s, 1e-9, f"patched custom model/{s}")


def test_unsupported_node_inside_patched_model_names_module():
    class Weird(nn.Module):
        def forward(self, x):
            return torch.linalg.qr(x.reshape(-1, 2, 2))[0]

    model = nn.Sequential(nn.Linear(4, 4), Weird())
    semitriton.patch(model)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(semitriton.UnsupportedNodeError, match=r"LinalgQrBackward0.*module 1 \(Weird\)"):
        semitriton.grad(model(x).sum(), x, semiring="maxabs")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_linear_swap_same_outputs_statistics_and_gradients(kind):
    model = _model(kind, dtype=torch.float64)
    before = _logits(model)
    emb, score = embeds_and_output(model, kind, IDS, MASK)
    ref = {s: semitriton.grad_values(score, emb, semiring=s)[0] for s in SEMIRINGS}
    semitriton.patch(model, norms=False, activations=False, attention=False, linear=True)
    assert sum(semitriton.patch_summary(model)["swapped"].values()) > 0
    torch.testing.assert_close(_logits(model), before, rtol=1e-12, atol=1e-12)
    emb2, score2 = embeds_and_output(model, kind, IDS, MASK)
    for s in SEMIRINGS:
        (got,) = semitriton.grad_values(score2, emb2, semiring=s)
        for a, b in zip(got, ref[s]):
            fin = torch.isfinite(b)
            torch.testing.assert_close(a[fin], b[fin], rtol=1e-9, atol=1e-12)
    model.train()
    torch.manual_seed(7)
    out = model(input_ids=IDS, attention_mask=MASK).logits
    (out ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    semitriton.unpatch(model)
    model.zero_grad()
    torch.manual_seed(7)
    out = model(input_ids=IDS, attention_mask=MASK).logits
    (out ** 2).mean().backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-9, atol=1e-12, msg=n)


def test_patched_graphs_are_freed_without_the_cyclic_gc():
    """Tracking tags must not create reference cycles (a module returning its
    input, e.g. dropout in eval, once made a node reference itself)."""
    import gc
    import weakref
    model = semitriton.patch(_model("bert"))
    gc.disable()
    try:
        refs = []
        for _ in range(2):
            emb, score = embeds_and_output(model, "bert", IDS, MASK)
            semitriton.grad(score, emb, semiring="abs")
            refs.append(weakref.ref(emb))
            del emb, score
        assert not any(r() is not None for r in refs)
    finally:
        gc.enable()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma"])
def test_rotary_node_same_outputs_and_statistics(kind):
    """RoPE as one RotaryEmbedding node per q/k: bit-identical outputs, the
    statistics of the composed aten graph (its edges are the same cos/±sin),
    unpatched models in the same process untouched, and unpatch restores the
    modeling file's function."""
    import sys
    model = _model(kind, dtype=torch.float64)
    other = _model(kind, dtype=torch.float64)
    modname = type(model.model.layers[0].self_attn).__module__
    gc.collect()             # patched models earlier tests dropped without unpatch stop using the dispatcher
    fn = sys.modules[modname].apply_rotary_pos_emb
    original = getattr(fn, "_semitriton_original", fn)
    emb, score = embeds_and_output(model, "llama", IDS, MASK)
    ref = {s: semitriton.grad_values(score, emb, semiring=s)[0] for s in SEMIRINGS}
    assert "RotaryEmbeddingBackward" not in node_types(score)

    semitriton.patch(model, norms=False, activations=False, attention=False)
    assert semitriton.patch_summary(model)["rotary_modules"] == 2
    assert semitriton.patch_summary(model)["swapped"] == {}
    emb2, score2 = embeds_and_output(model, "llama", IDS, MASK)
    assert torch.equal(score2, score)
    types = node_types(score2)
    assert types.count("RotaryEmbeddingBackward") == 4           # q and k of two layers
    assert "NegBackward0" not in types
    for s in SEMIRINGS:
        got = semitriton.grad_values(score2, emb2, semiring=s)[0]
        assert_semiring_close(got, ref[s], s, 1e-10, f"{kind} rope {s}")
    # ordinary gradients through the node
    (g2,) = torch.autograd.grad(score2.sum(), emb2)
    (g1,) = torch.autograd.grad(score.sum(), emb)
    torch.testing.assert_close(g2, g1, rtol=1e-12, atol=1e-12)
    # another model of the same family, not patched, keeps its aten graph
    e3, s3 = embeds_and_output(other, "llama", IDS, MASK)
    assert "RotaryEmbeddingBackward" not in node_types(s3)

    semitriton.unpatch(model)
    assert sys.modules[modname].apply_rotary_pos_emb is original
    e4, s4 = embeds_and_output(model, "llama", IDS, MASK)
    assert "RotaryEmbeddingBackward" not in node_types(s4) and torch.equal(s4, score)


def test_rotary_dispatcher_shared_by_two_patched_models():
    import sys
    a, b = _model("llama"), _model("llama")
    modname = type(a.model.layers[0].self_attn).__module__
    gc.collect()             # patched models earlier tests dropped without unpatch stop using the dispatcher
    fn = sys.modules[modname].apply_rotary_pos_emb
    original = getattr(fn, "_semitriton_original", fn)
    semitriton.patch(a)
    semitriton.patch(b)
    semitriton.unpatch(a)
    e, s = embeds_and_output(b, "llama", IDS, MASK)
    assert "RotaryEmbeddingBackward" in node_types(s)          # b still patched
    semitriton.unpatch(b)
    assert sys.modules[modname].apply_rotary_pos_emb is original


@pytest.mark.parametrize("kind", ["olmo2", "modernbert"])
def test_rotary_half_precision_conventions(kind):
    """Modeling files that round RoPE differently in bf16: OLMo computes in
    result_type(q, cos) with float32 cos/sin and casts back to q's dtype;
    ModernBERT computes in float32 and casts back. The fused node follows each
    (bit-identical bf16 outputs: OLMo's patched forward raised on q/k/v
    dtypes, ModernBERT's was one bf16 unit off in 15-23% of q/k entries), and
    the walk (fp32 accumulation) gives what it gives on the composed graph."""
    t = transformers
    torch.manual_seed(0)
    if kind == "olmo2":
        cfg = t.Olmo2Config(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)
        model_cls = t.Olmo2ForCausalLM
    else:
        cfg = t.ModernBertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=48, max_position_embeddings=32, local_attention=4,
                                 global_attn_every_n_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 cls_token_id=1, sep_token_id=2)
        model_cls = t.ModernBertForMaskedLM
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg).to(torch.bfloat16).eval()
    ids = torch.tensor([[5, 17, 41, 9, 23, 51, 33, 12]])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    ref = model(inputs_embeds=emb).logits
    walked = {s: semitriton.grad(ref[0, -1, 3].float() - ref[0, -1, 7].float(), emb, semiring=s,
                                 **({"fast_real": False} if s == "real" else {}))[0] for s in ("real", "abs")}
    semitriton.patch(model, norms=False, activations=False, attention=False)
    try:
        assert semitriton.patch_summary(model)["rotary_modules"] > 0
        out = model(inputs_embeds=emb).logits
        assert torch.equal(out, ref)
        score = out[0, -1, 3].float() - out[0, -1, 7].float()
        assert "RotaryEmbeddingBackward" in node_types(score)
        for s, want in walked.items():
            (got,) = semitriton.grad(score, emb, semiring=s, **({"fast_real": False} if s == "real" else {}))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    finally:
        semitriton.unpatch(model)


@pytest.mark.parametrize("module,convention", [("llama", "plain"), ("olmo", "cast_back"), ("modernbert", "float")])
def test_rotary_convention_detected(module, convention):
    """Each modeling file's apply_rotary_pos_emb is matched to the convention
    that reproduces it bit for bit in bf16 (larger inputs than the detection's
    probes), and the plain one does not where the file rounds otherwise."""
    import importlib

    from semitriton.fused import apply_rotary
    from semitriton.patching import _rope_form
    fn = importlib.import_module(f"transformers.models.{module}.modeling_{module}").apply_rotary_pos_emb
    fn = getattr(fn, "_semitriton_original", fn)
    assert _rope_form("apply_rotary_pos_emb", fn) == convention
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 4, 16, 32, generator=g).to(torch.bfloat16) for _ in range(2))
    for cdt in (torch.bfloat16, torch.float32):
        cos, sin = (torch.randn(2, 16, 32, generator=g).to(cdt) for _ in range(2))
        want = fn(q, k, cos, sin)
        got = apply_rotary(q.clone().requires_grad_(), k.clone().requires_grad_(), cos, sin, 1, convention)
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(want, got))
        if convention != "plain":
            plain = apply_rotary(q.clone().requires_grad_(), k.clone().requires_grad_(), cos, sin, 1, "plain")
            differs = any(a.dtype != b.dtype or not torch.equal(a, b) for a, b in zip(want, plain))
            assert differs or (convention == "cast_back" and cdt == torch.bfloat16)


@pytest.mark.parametrize("kind,dim", [("llama4", 2), ("deepseek_v2", 1)])
def test_complex_rotary_is_one_node_with_the_rotation_edges(kind, dim):
    """LLaMA 4's and DeepSeek-V2's apply_rotary_emb multiply adjacent pairs by
    complex freqs_cis (no semiring edges on complex values). Recorded as one
    RotaryPairs node (the file's own forward, detected with its broadcast
    dim), its edges are the rotation's real Jacobian: against the oracle in
    every semiring, and torch's gradient is the complex form's."""
    import importlib

    from semitriton.fused.rope import apply_rotary_pairs
    from semitriton.patching import _rope_form
    fn = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}").apply_rotary_emb
    fn = getattr(fn, "_semitriton_original", fn)
    assert _rope_form("apply_rotary_emb", fn) == dim
    g = torch.Generator().manual_seed(3)
    q0, k0 = torch.randn(2, 3, 4, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 6, generator=g,
                                                                                      dtype=torch.float64)
    shape = [s for i, s in enumerate(q0.shape[:-1]) if i != dim] + [3]
    freqs = torch.polar(0.5 + torch.rand(shape, generator=g), 3 * torch.randn(shape, generator=g))
    wq, wk = torch.randn(q0.shape, generator=g, dtype=torch.float64), torch.randn(k0.shape, generator=g,
                                                                                  dtype=torch.float64)
    f = freqs.unsqueeze(dim)
    c, sn = f.real.double(), f.imag.double()

    def rotated(x):
        xr, xi = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((xr * c - xi * sn, xr * sn + xi * c), dim=-1).flatten(-2)

    steps = [Step("yq", rotated, ("q",)), Step("yk", rotated, ("k",)),
             Step("out", lambda a, b: (a * wq).sum() + (b * wk).sum(), ("yq", "yk"))]
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    yq, yk = apply_rotary_pairs(q, k, freqs, fn, dim)
    with torch.no_grad():
        want_q, want_k = fn(q0, k0, freqs)
    assert torch.equal(yq, want_q) and torch.equal(yk, want_k)
    out = (yq * wq).sum() + (yk * wk).sum()
    assert "RotaryPairsBackward" in node_types(out)
    qc, kc = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    a, b = fn(qc, kc, freqs)
    for got, want in zip(torch.autograd.grad(out, (q, k), retain_graph=True),
                         torch.autograd.grad((a * wq).sum() + (b * wk).sum(), (qc, kc))):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for s in SEMIRINGS:
        got = semitriton.grad(out, (q, k), semiring=s, **({"fast_real": False} if s == "real" else {}))
        want = oracle(Program("rotary_pairs", {"q": q0, "k": k0}, steps, engine=None), s)
        for name, v in zip("qk", got):
            assert_semiring_close(v, want[name], s, 1e-9, f"{kind}/{name}/{s}")
    # float32: the file returns views of its complex product, the node copies (in-place ops work as
    # unpatched); an operand that does not require grad gives an output that does not either
    for dt in (torch.float32, torch.bfloat16):      # (bf16: a fresh tensor, not a view)
        yq, yk = apply_rotary_pairs(q0.to(dt).requires_grad_(), k0.to(dt), freqs, fn, dim)
        assert yq.requires_grad and not yk.requires_grad
        yq.mul_(2.0).sum().backward()


@pytest.mark.parametrize("kind", ["llama4", "deepseek_v2"])
def test_complex_rotary_models_walk_once_patched(kind):
    """Unpatched, LLaMA 4 and DeepSeek-V2 are refused (complex values on the
    path, named); patched, the outputs are the same bits, torch's gradient the
    same, every semiring runs, and real equals autograd. unpatch puts the
    modeling file's function back. LLaMA 4's MoE block returns (output,
    router logits): branch attribution reads the output (it had taken the
    logits, computed earlier, for the block's output)."""
    import importlib
    model = complex_rope_model(kind)
    mod = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    emb = model.get_input_embeddings()(IDS[:1]).detach().requires_grad_()
    ref = model(inputs_embeds=emb, use_cache=False).logits[0, -1, 3]
    with pytest.raises(semitriton.GraphError, match="ViewAsComplexBackward0"):
        semitriton.grad(ref, emb, semiring="abs")
    (g_ref,) = torch.autograd.grad(ref, emb)
    semitriton.patch(model)
    assert semitriton.patch_summary(model)["rotary_modules"] >= 1
    out = model(inputs_embeds=emb, use_cache=False).logits[0, -1, 3]
    assert torch.equal(out, ref)
    assert "ViewAsComplexBackward0" not in node_types(out)
    (want,) = torch.autograd.grad(out, emb, retain_graph=True)
    torch.testing.assert_close(want, g_ref, rtol=1e-5, atol=1e-6 * float(g_ref.abs().max()))
    got = walk_every_semiring(out, emb, want)
    for s in ("max", "entropy"):        # the Triton rope rule over the gathered halves (interpreted on the CPU)
        (t,) = semitriton.grad(out, emb, semiring=s, backend="triton")
        assert_semiring_close(t, got[s].detach().double().numpy(), s, 1e-4, f"{kind} triton vs torch/{s}")
    if kind == "llama4":
        attr = semitriton.branch_attribution(out, emb)
        assert sorted(attr.layers) == [0, 1, 2, 3]
    semitriton.unpatch(model)
    assert not hasattr(mod.apply_rotary_emb, "_semitriton_original")


def test_rotary_dispatcher_takes_every_call_the_original_takes():
    """Qwen4-Exp's apply_rotary_pos_emb has k=None (its indexer rotates q
    alone, by keyword): the dispatcher binds each call to the original's
    signature and runs the original where the node cannot take it. Before,
    its fixed (q, k, cos, sin) signature raised a TypeError in the patched
    model and in every unpatched Qwen4-Exp model of the process."""
    t = transformers
    if not hasattr(t, "Qwen4ExpForCausalLM"):
        pytest.skip("transformers without Qwen4-Exp")
    cfg = t.Qwen4ExpForCausalLM.config_class(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=4,
        num_experts_per_tok=2, layer_types=["linear_attention", "indexed_attention"], linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=4, linear_value_head_dim=4, indexer_n_heads=2,
        indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2, pad_token_id=0)
    torch.manual_seed(0)
    model, other = t.Qwen4ExpForCausalLM(cfg).eval(), t.Qwen4ExpForCausalLM(cfg).eval()
    emb = model.get_input_embeddings()(IDS[:1]).detach().requires_grad_()
    ref = model(inputs_embeds=emb, use_cache=False).logits[0, -1, 3]
    other_ref = other(input_ids=IDS[:1], use_cache=False).logits
    semitriton.patch(model)
    try:
        out = model(inputs_embeds=emb, use_cache=False).logits[0, -1, 3]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)
        assert torch.equal(other(input_ids=IDS[:1], use_cache=False).logits, other_ref)
        walk_every_semiring(out, emb)
    finally:
        semitriton.unpatch(model)


def test_rotary_not_fused_without_grad_or_with_rope_false():
    model = semitriton.patch(_model("llama"), rope=False)
    assert semitriton.patch_summary(model)["rotary_modules"] == 0
    e, s = embeds_and_output(model, "llama", IDS, MASK)
    assert "RotaryEmbeddingBackward" not in node_types(s)
    semitriton.unpatch(model)


def _tiny(kind):
    """Models whose attention needs more than sdpa: Gemma2 (logit soft-capping)
    and GPT-OSS (attention sinks, made non-trivial)."""
    t = transformers
    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32, head_dim=4)
    if kind == "gemma2":
        return t.Gemma2ForCausalLM(t.Gemma2Config(**common)).eval()
    m = t.GptOssForCausalLM(t.GptOssConfig(**common, num_local_experts=4, num_experts_per_tok=2)).eval()
    for mod in m.modules():
        if hasattr(mod, "sinks"):
            mod.sinks.data.normal_(0, 1.0)
    return m


@pytest.mark.parametrize("forced", [False, True], ids=["as-declared", "sdpa-forced"])
@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss"])
def test_attention_the_fused_node_cannot_do_runs_eager(kind, forced, monkeypatch):
    """Soft-capping and attention sinks are not in the fused node. These
    models declare no sdpa support, so patch() leaves their attention; with
    that flag forced on, each call carries the feature and the modeling file's
    eager attention runs for it. Same outputs as unpatched either way; Gemma2's
    statistics through the aten nodes, real equal to autograd."""
    import semitriton.patching as patching
    if not hasattr(transformers, {"gemma2": "Gemma2Config", "gpt_oss": "GptOssConfig"}[kind]):
        pytest.skip(f"transformers has no {kind}")
    model = _tiny(kind)
    calls = []
    eager = patching._eager_attention
    monkeypatch.setattr(patching, "_eager_attention", lambda *a, **k: calls.append(a[-1]) or eager(*a, **k))
    before = _logits(model)
    if forced:
        model._supports_sdpa = True
    semitriton.patch(model)
    assert model.config._attn_implementation == ("semitriton" if forced else "eager")
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-6)
    assert bool(calls) == forced
    if kind == "gpt_oss":       # its experts are a grouped mm (no rule yet): outputs only
        semitriton.unpatch(model)
        return
    emb = model.get_input_embeddings()(IDS).detach().requires_grad_()
    score = model(inputs_embeds=emb, attention_mask=MASK).logits[:, -1, 7].sum()
    (g,) = semitriton.grad(score, emb, fast_real=False)
    torch.testing.assert_close(g, torch.autograd.grad(score, emb, retain_graph=True)[0], rtol=1e-4, atol=1e-6)
    (m,) = semitriton.grad(score, emb, semiring="maxabs")
    assert torch.isfinite(m).all() and (m > 0).any()
    semitriton.unpatch(model)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_output_attentions_on_a_patched_model(kind):
    """output_attentions=True returns the probabilities the unpatched eager
    model returns (GPT-2 does not pass the flag to its attention function)."""
    model = _model(kind, "eager")
    with torch.no_grad():
        ref = model(input_ids=IDS, attention_mask=MASK, output_attentions=True)
        semitriton.patch(model)
        got = model(input_ids=IDS, attention_mask=MASK, output_attentions=True)
    assert len(got.attentions) == len(ref.attentions) > 0
    keep = MASK.bool()[:, None, :, None]           # rows of real query positions
    for a, b in zip(got.attentions, ref.attentions):
        torch.testing.assert_close(a * keep, b * keep, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits, ref.logits, rtol=1e-5, atol=1e-5)
    semitriton.unpatch(model)


def test_a_learned_attention_mask_keeps_its_gradient():
    """A mask that requires grad has edges of its own: ``fused_attention``
    runs SDPA for it, so the ordinary backward and the walk see them."""
    import torch.nn.functional as F
    from semitriton.fused import fused_attention
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    W = torch.randn(8, 4, dtype=torch.float64)
    bias = x @ W
    ref = F.scaled_dot_product_attention(x * 0.5, x * 0.7, x * 1.1, attn_mask=bias)
    out = fused_attention(x * 0.5, x * 0.7, x * 1.1, x @ W, False, None)
    g_ref = torch.autograd.grad(ref.sum(), x)[0]
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x, retain_graph=True)[0], g_ref)
    torch.testing.assert_close(semitriton.grad(out.sum(), x, fast_real=False)[0], g_ref)
    with pytest.raises(ValueError, match="mask requires grad"):
        semitriton.fused.FusedAttention.apply(x, x, x, bias, False, None)


def test_train_and_eval_while_patched_carry_over_to_unpatch():
    model = semitriton.patch(_model("llama"))
    model.train()
    semitriton.unpatch(model)
    assert all(m.training for m in model.modules())
    semitriton.patch(model)
    model.eval()
    semitriton.unpatch(model)
    assert not any(m.training for m in model.modules())


def test_unpatch_restores_every_sub_config_and_shared_configs():
    t = transformers
    torch.manual_seed(0)
    vc = t.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                            image_size=8, patch_size=4, projection_dim=16)
    tc = t.LlamaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=24, max_position_embeddings=64)
    cfg = t.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=55, vision_feature_layer=-1)
    cfg._attn_implementation = {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    m = t.LlavaForConditionalGeneration(cfg).eval()

    def impls(c):
        return c._attn_implementation, c.text_config._attn_implementation, c.vision_config._attn_implementation

    ids, px = torch.tensor([[3, 55, 55, 55, 55, 7, 9]]), torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = m(input_ids=ids, pixel_values=px).logits
        semitriton.patch(m)
        torch.testing.assert_close(m(input_ids=ids, pixel_values=px).logits, before, rtol=1e-5, atol=1e-5)
    semitriton.unpatch(m)
    assert impls(m.config) == ("sdpa", "sdpa", "eager")
    # two models on one config object: the last unpatch restores it
    a = _model("llama")
    b = type(a)(a.config).eval()
    semitriton.patch(a)
    semitriton.patch(b)
    semitriton.unpatch(a)
    assert b.config._attn_implementation == "semitriton"
    semitriton.unpatch(b)
    assert a.config._attn_implementation == "sdpa"


def test_unpatching_a_deep_copy_leaves_the_original_patched():
    import sys
    a = semitriton.patch(_model("llama"))
    modname = type(a.model.layers[0].self_attn).__module__
    original = sys.modules[modname].apply_rotary_pos_emb._semitriton_original
    c = copy.deepcopy(a)
    semitriton.unpatch(c)
    assert c.config._attn_implementation == "sdpa" and a.config._attn_implementation == "semitriton"
    e, s = embeds_and_output(a, "llama", IDS, MASK)
    assert "RotaryEmbeddingBackward" in node_types(s)
    semitriton.unpatch(a)
    assert sys.modules[modname].apply_rotary_pos_emb is original


def test_a_patched_model_pickles(tmp_path):
    """torch.save / pickle of a patched model (spawned workers do this): the
    copy runs patched with the same outputs, in this process and in a new
    one, and unpatching it leaves the original patched."""
    import pickle
    import subprocess
    import sys
    model = semitriton.patch(_model("llama"))
    before = _logits(model)
    clone = pickle.loads(pickle.dumps(model))
    assert semitriton.is_patched(clone)
    torch.testing.assert_close(_logits(clone), before)
    e, s = embeds_and_output(clone, "llama", IDS, MASK)
    assert {"RotaryEmbeddingBackward", "FusedAttentionBackward"} <= set(node_types(s))
    semitriton.unpatch(clone)
    assert not any(type(m).__name__.startswith("Semiring") for m in clone.modules())
    assert clone.config._attn_implementation == "sdpa" and model.config._attn_implementation == "semitriton"
    torch.save(model, tmp_path / "m.pt")
    torch.save(before, tmp_path / "logits.pt")
    code = f"""
import torch, semitriton
m = torch.load({str(tmp_path / 'm.pt')!r}, weights_only=False)
ids = torch.tensor({IDS.tolist()}); mask = torch.tensor({MASK.tolist()})
with torch.no_grad():
    got = m(input_ids=ids, attention_mask=mask).logits
torch.testing.assert_close(got, torch.load({str(tmp_path / 'logits.pt')!r}))
emb = m.get_input_embeddings()(ids).detach().requires_grad_()
s = m(inputs_embeds=emb, attention_mask=mask).logits[:, -1, 7].sum()
seen, stack = set(), [s.grad_fn]
while stack:
    n = stack.pop()
    if n is not None and n not in seen:
        seen.add(n)
        stack.extend(f for f, _ in n.next_functions)
assert {{"FusedAttentionBackward", "RotaryEmbeddingBackward"}} <= {{type(n).__name__ for n in seen}}
assert semitriton.grad(s, emb, semiring="maxabs")[0].isfinite().all()
semitriton.unpatch(m)
assert m.config._attn_implementation == "sdpa"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
    semitriton.unpatch(model)


def test_a_model_without_sdpa_support_keeps_its_attention():
    model = _model("llama")
    model._supports_sdpa = False
    semitriton.patch(model)
    assert model.config._attn_implementation == "sdpa"
    assert any("does not support sdpa" in s for s in semitriton.patch_summary(model)["skipped"])
    e, s = embeds_and_output(model, "llama", IDS, MASK)
    assert "FusedAttentionBackward" not in node_types(s)
    semitriton.unpatch(model)


class _Scorer(nn.Module):
    """A user's wrapper around a Hugging Face model (no config of its own)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, inputs_embeds, attention_mask=None):
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits


@pytest.mark.parametrize("wrap", [_Scorer, nn.DataParallel, lambda m: nn.ModuleList([m])],
                         ids=["wrapper", "data_parallel", "module_list"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_patching_a_wrapper_fuses_the_attention_of_the_model_inside(wrap, attn):
    """The attention of a model inside a wrapper is selected on the inner
    model's config, as when the model itself is patched; unpatch restores it."""
    direct = _model("llama", attn)
    semitriton.patch(direct)
    model = _model("llama", attn)
    before = _logits(model)
    w = wrap(model)
    semitriton.patch(w)
    summary = semitriton.patch_summary(w)
    assert summary["attention_modules"] == semitriton.patch_summary(direct)["attention_modules"] > 0
    assert summary["attention_implementation"] == "semitriton"
    assert model.config._attn_implementation == "semitriton"
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
    e, s = embeds_and_output(model, "llama", IDS, MASK)
    assert "FusedAttentionBackward" in node_types(s)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # no "attention is not one fused node" warning
        attr = semitriton.branch_attribution(s[1], e, heads=True)
    assert attr.heads, "per-head weights need the fused attention node"
    semitriton.unpatch(w)
    assert model.config._attn_implementation == attn
    semitriton.unpatch(direct)


def test_a_backbone_with_a_config_of_its_own_is_fused():
    """A PreTrainedModel (its own config) holding a language model with
    another config (a reward/scoring model): the backbone's attention reads
    the backbone's config, which setting the outer one does not reach."""
    t = transformers

    class ScorerConfig(t.PretrainedConfig):
        model_type = "semitriton_test_scorer"

    class Scorer(t.PreTrainedModel):
        config_class = ScorerConfig
        _supports_sdpa = True

        def __init__(self, config, lm):
            super().__init__(config)
            self.backbone = lm
            self.head = nn.Linear(16, 1)

        def forward(self, inputs_embeds):
            h = self.backbone(inputs_embeds=inputs_embeds, output_hidden_states=True).hidden_states[-1]
            return self.head(h[:, -1]).squeeze(-1)

    lm = _model("llama")
    m = Scorer(ScorerConfig(), lm).eval()
    emb = lm.get_input_embeddings()(IDS).detach().requires_grad_()
    before = m(emb).detach()
    semitriton.patch(m)
    assert lm.config._attn_implementation == "semitriton"
    s = m(emb)
    torch.testing.assert_close(s.detach(), before, rtol=1e-5, atol=1e-6)
    assert "FusedAttentionBackward" in node_types(s)
    semitriton.unpatch(m)
    assert lm.config._attn_implementation == "sdpa" and m.config._attn_implementation != "semitriton"
    assert "FusedAttentionBackward" not in node_types(m(emb))


def test_a_wrapped_model_without_sdpa_support_is_named_in_the_summary():
    model = _model("llama")
    model._supports_sdpa = False
    w = _Scorer(model)
    semitriton.patch(w)
    skipped = semitriton.patch_summary(w)["skipped"]
    assert any("lm: LlamaForCausalLM" in s and "does not support sdpa" in s for s in skipped), skipped
    assert model.config._attn_implementation == "sdpa"
    semitriton.unpatch(w)


def test_patching_a_bare_norm_warns_that_it_cannot_swap_it():
    norm = nn.RMSNorm(8)
    with pytest.warns(UserWarning, match="cannot replace"):
        semitriton.patch(norm)
    assert any("cannot replace" in s for s in semitriton.patch_summary(norm)["skipped"])
    semitriton.unpatch(norm)
    wrapped = semitriton.patch(nn.Sequential(nn.RMSNorm(8)))
    assert semitriton.patch_summary(wrapped)["swapped"] == {"RMSNorm": 1}


def _bloom():
    torch.manual_seed(0)
    cfg = transformers.BloomConfig(vocab_size=60, hidden_size=16, n_layer=2, n_head=4)
    cfg._attn_implementation = "eager"
    return transformers.BloomForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("patched", [False, True])
def test_bloom_gelu_function_is_one_primitive(patched):
    """BLOOM's MLP runs its tanh-GELU as a custom autograd Function with a
    hand-written backward (GeLUFunction). Unpatched, the node's edges are that
    backward's own f'(x) (its rule is keyed by the Function class); patched,
    BloomGelu is the fused gelu_tanh node. Either way: the model walks in every
    semiring, real equals autograd, and the statistics agree (both are one
    elementwise primitive with f'(x) of the same formula)."""
    model = _bloom()
    ids = torch.tensor([[3, 17, 41, 9, 23]])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    ref = model(inputs_embeds=emb).logits
    stats = {}
    for s in SEMIRINGS:
        stats[s] = semitriton.grad(ref[0, -1, 3] - ref[0, -1, 7], emb, semiring=s,
                                   **({"fast_real": False} if s == "real" else {}))[0]
    assert "GeLUFunctionBackward" in node_types(ref[0, -1, 3])
    if patched:
        semitriton.patch(model)
        assert semitriton.patch_summary(model)["swapped"].get("BloomGelu") == 2
        out = model(inputs_embeds=emb).logits
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
        score = out[0, -1, 3] - out[0, -1, 7]
        assert "GeLUFunctionBackward" not in node_types(score)
    else:
        score = ref[0, -1, 3] - ref[0, -1, 7]
    (want,) = torch.autograd.grad(score, emb, retain_graph=True)
    for s in SEMIRINGS:
        (got,) = semitriton.grad(score, emb, semiring=s, **({"fast_real": False} if s == "real" else {}))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, stats[s], rtol=1e-7, atol=0)
        if s == "real":
            torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-12)
    if patched:
        semitriton.unpatch(model)
        assert "GeLUFunctionBackward" in node_types(model(inputs_embeds=emb).logits[0, -1, 3])


def test_recurrent_gemma_clipped_sqrt_is_one_primitive():
    """RecurrentGemma's RG-LRU takes a square root through a custom Function
    whose backward clips the derivative near 0 (SqrtBoundDerivative): its
    edges are that backward's (against the oracle, whose Jacobian is the
    Function's own, at values on both sides of the clip), and the model walks
    in every semiring with real equal to autograd."""
    t = transformers
    if not hasattr(t, "RecurrentGemmaForCausalLM"):
        pytest.skip("transformers without RecurrentGemma")
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import SqrtBoundDerivative
    x0 = torch.tensor([[1e-9, 4e-8, 0.3], [2.0, 0.0, 1e-7]], dtype=torch.float64)
    w = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.5, -1.0]], dtype=torch.float64)
    steps = [Step("r", SqrtBoundDerivative.apply, ("x",)), Step("out", lambda r: (r * w).sum(), ("r",))]
    x = x0.clone().requires_grad_()
    score = (SqrtBoundDerivative.apply(x) * w).sum()
    for s in SEMIRINGS:
        (got,) = semitriton.grad(score, x, semiring=s, **({"fast_real": False} if s == "real" else {}))
        assert_semiring_close(got, oracle(Program("clipped_sqrt", {"x": x0}, steps, engine=None), s)["x"], s,
                              1e-12, f"clipped sqrt/{s}")
    torch.manual_seed(0)
    cfg = t.RecurrentGemmaConfig(vocab_size=50, hidden_size=16, lru_width=16, num_hidden_layers=3,
                                 num_attention_heads=2, num_key_value_heads=1, intermediate_size=24,
                                 attention_window_size=8, block_types=["recurrent", "attention"])
    model = semitriton.patch(t.RecurrentGemmaForCausalLM(cfg).eval())
    emb = model.get_input_embeddings()(IDS[:1]).detach().requires_grad_()
    out = model(inputs_embeds=emb, use_cache=False).logits[0, -1, 3]
    assert "SqrtBoundDerivativeBackward" in node_types(out)
    walk_every_semiring(out, emb)
    semitriton.unpatch(model)


def test_a_third_party_function_named_like_blooms_is_not_taken_for_it():
    class GeLUFunction(torch.autograd.Function):       # same name, another module
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(semitriton.UnsupportedNodeError, match="GeLUFunctionBackward"):
        semitriton.grad(GeLUFunction.apply(x).sum(), x, semiring="abs")


def test_a_norm_built_from_torch_norm_modules_is_not_reported_as_composed():
    """StableLM's per-head q/k layer norm is a container of nn.LayerNorm (one
    canonical node per head): the summary must not list it as walked op by op,
    while a norm with a forward of its own ops still is."""
    t = transformers
    torch.manual_seed(0)
    cfg = t.StableLmConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=24, qk_layernorm=True)
    model = semitriton.patch(t.StableLmForCausalLM(cfg).eval())
    try:
        assert not any("StableLmLayerNormPerHead" in s for s in semitriton.patch_summary(model)["skipped"])
    finally:
        semitriton.unpatch(model)

    class MyNorm(nn.Module):
        def forward(self, x):
            return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)

    model = semitriton.patch(nn.Sequential(nn.Linear(4, 4), MyNorm()))
    try:
        assert any("MyNorm" in s for s in semitriton.patch_summary(model)["skipped"])
    finally:
        semitriton.unpatch(model)


def test_linear_subclasses_are_named_in_the_summary():
    """linear=True swaps nn.Linear itself; a subclass (Falcon's FalconLinear
    has its own forward) is left alone and the summary says so, once."""
    class MyLinear(nn.Linear):
        def forward(self, x):
            return x @ self.weight.T + self.bias

    model = semitriton.patch(nn.Sequential(MyLinear(4, 4), nn.Linear(4, 4), MyLinear(4, 2)), linear=True)
    try:
        summary = semitriton.patch_summary(model)
        assert summary["swapped"] == {"Linear": 1}
        assert [s for s in summary["skipped"] if "MyLinear" in s] == [
            "MyLinear (e.g. 0): a subclass of nn.Linear, left as it is (linear=True swaps nn.Linear itself)"]
    finally:
        semitriton.unpatch(model)


def test_summary_counts_only_layers_that_rotate_and_calls_that_fuse():
    """SmolLM3 rotates q/k in the layers its no_rope_layers marks 1 only: the
    summary counts those (it counted every attention); the attention line says
    a call with a learned mask or bias runs SDPA's own graph."""
    import transformers as t
    torch.manual_seed(0)
    cfg = t.SmolLM3Config(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          no_rope_layers=[1, 0, 1, 0], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = t.SmolLM3ForCausalLM(cfg).eval()
    ids = torch.tensor([[5, 7, 9, 11, 13]])
    ref = model(ids).logits
    semitriton.patch(model)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    assert torch.allclose(logits, ref, rtol=1e-5, atol=1e-6)
    assert node_types(logits).count("RotaryEmbeddingBackward") == 4          # q and k of 2 layers
    assert semitriton.patch_summary(model)["rotary_modules"] == 2
    text = getattr(model, semitriton.patching._RECORD).describe()
    assert "2× rotary embedding" in text and "4× attention -> one fused node per call" in text
    assert "requires grad" in text
    semitriton.unpatch(model)
    assert torch.equal(model(ids).logits, ref)


def _tiny_family(cfg_name: str, cls_name: str, attn: str, **config):
    """A 2-layer, hidden-32 random model of a transformers family (seed 0), in eval mode."""
    import transformers as t
    torch.manual_seed(0)
    cfg = getattr(t, cfg_name)(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, pad_token_id=0, **config)
    cfg._attn_implementation = attn
    return getattr(t, cls_name)(cfg).eval()


_NEWER_DECODERS = {      # config class, model class, extra config (sequences of 6 reach past the sliding windows)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),                     # q_norm/k_norm per head
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "sliding_window": 4}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {"no_rope_layers": [1, 0]}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),                                     # parameter-free layer norm
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", {"sliding_window": 4}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", {"head_dim": 8, "sliding_window": 4}),
}


@pytest.mark.parametrize("kind", list(_NEWER_DECODERS))
def test_newer_decoder_families(kind):
    """Families beyond the ones above, on a left-padded batch of two: patched
    outputs equal the unpatched model's; real equals autograd; eager and sdpa
    give the same statistics patched; with the norms left alone, the patched
    model's statistics equal the unpatched model's (attention and RoPE are
    canonical either way)."""
    t = pytest.importorskip("transformers")
    cfg_name, cls_name, extra = _NEWER_DECODERS[kind]
    if not hasattr(t, cls_name):
        pytest.skip(f"transformers has no {cls_name}")

    def build_(attn):
        return _tiny_family(cfg_name, cls_name, attn, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                            **extra)

    ids = torch.tensor([[0, 0, 5, 7, 9, 11], [3, 5, 7, 9, 11, 13]])
    mask = (ids != 0).long()

    def stats(model, semirings=SEMIRINGS):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        lg = model(inputs_embeds=emb, attention_mask=mask).logits
        score = lg[:, -1, 7] - lg[:, -1, 3]
        return lg, emb, score, {s: semitriton.grad(score, emb, semiring=s, fast_real=False)[0] for s in semirings}

    ref_lg, _, _, plain = stats(build_("eager"))
    per_attn = {}
    for attn in ("eager", "sdpa"):
        model = semitriton.patch(build_(attn))
        lg, emb, score, per_attn[attn] = stats(model)
        keep = mask.bool()          # a padding query attends to no key: SDPA's output there (README)
        torch.testing.assert_close(lg[keep], ref_lg[keep], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_attn[attn]["real"], torch.autograd.grad(score.sum(), emb)[0],
                                   rtol=1e-4, atol=1e-6)
    for s in SEMIRINGS:
        assert_semiring_close(per_attn["eager"][s], per_attn["sdpa"][s], s, 1e-4, f"{kind} eager/sdpa {s}")
    lg, _, _, kept_norms = stats(semitriton.patch(build_("sdpa"), norms=False))
    for s in SEMIRINGS:
        assert_semiring_close(kept_norms[s], plain[s], s, 1e-4, f"{kind} patched(norms=False)/unpatched {s}")


_NEWER_ENCODERS = {      # config class, model class, extra config, whether the model supports sdpa
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", {"embedding_size": 16}, True),
    "xlm_roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification", {}, True),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", {"embedding_size": 16}, True),    # shared layer
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification",
                   {"relative_attention": True, "position_buckets": 8, "max_relative_positions": 16,
                    "pos_att_type": ["p2c", "c2p"]}, False),              # its own attention, eager only
}


@pytest.mark.parametrize("kind", list(_NEWER_ENCODERS))
def test_newer_encoder_families(kind):
    """Encoder classifiers beyond BERT/RoBERTa/DistilBERT on a right-padded
    batch: patched outputs equal the unpatched model's and real equals
    autograd; with norms and activations left alone (ALBERT's tanh-GELU
    becomes one primitive otherwise), patched eager and sdpa (where
    supported) give the unpatched model's statistics."""
    t = pytest.importorskip("transformers")
    cfg_name, cls_name, extra, sdpa = _NEWER_ENCODERS[kind]
    if not hasattr(t, cls_name):
        pytest.skip(f"transformers has no {cls_name}")

    def build_(attn):
        return _tiny_family(cfg_name, cls_name, attn, num_labels=2, **extra)

    ids = torch.tensor([[5, 7, 9, 11, 0, 0], [3, 5, 7, 9, 11, 13]])
    mask = (ids != 0).long()

    def stats(model):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        lg = model(inputs_embeds=emb, attention_mask=mask).logits
        score = lg[:, 1] - lg[:, 0]
        return lg, emb, score, {s: semitriton.grad(score, emb, semiring=s, fast_real=False)[0] for s in SEMIRINGS}

    ref_lg, _, _, plain = stats(build_("eager"))
    for attn in ("eager", "sdpa") if sdpa else ("eager",):
        lg, emb, score, got = stats(semitriton.patch(build_(attn)))
        torch.testing.assert_close(lg, ref_lg, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["real"], torch.autograd.grad(score.sum(), emb)[0], rtol=1e-4, atol=1e-6)
        _, _, _, got = stats(semitriton.patch(build_(attn), norms=False, activations=False))
        for s in SEMIRINGS:
            assert_semiring_close(got[s], plain[s], s, 1e-4, f"{kind} patched {attn}/unpatched eager {s}")


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_an_rms_eps_changed_after_patching_is_used_by_the_backward(kind):
    """The patched norm runs its original forward (which reads the module's
    eps now) and must also differentiate at that eps: it read the eps of
    patch time, so gradients and statistics were off after a change."""
    ref = _model(kind).double()
    model = semitriton.patch(copy.deepcopy(ref))
    for m in (ref, model):
        for mod in m.modules():
            for attr in ("variance_epsilon", "eps"):
                if "RMSNorm" in type(mod).__name__ and hasattr(mod, attr):
                    setattr(mod, attr, 0.5)
    grads = []
    for m in (ref, model):
        emb = m.get_input_embeddings()(IDS).detach().requires_grad_()
        out = m(inputs_embeds=emb, attention_mask=MASK).logits[:, -1].sum()
        grads.append(torch.autograd.grad(out, emb, retain_graph=True)[0])
        if m is model:
            (walked,) = semitriton.grad(out, emb, fast_real=False)
    # (the original norms compute in float32 even on float64 inputs, the one-node backward in float64: ~1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(walked, grads[1], rtol=1e-12, atol=1e-14)


def test_a_patched_model_deleted_without_unpatch_leaves_no_config_behind():
    """The attention registry held each patched model's config strongly
    (keyed by id), so configs of models deleted without unpatch lived on."""
    import weakref
    from semitriton import patching
    before = len(patching._attn_configs)
    refs = []
    for _ in range(3):
        model = semitriton.patch(_model("llama"))
        refs.append(weakref.ref(model.config))
        del model
    gc.collect()
    assert all(r() is None for r in refs) and len(patching._attn_configs) == before
    shared = _model("llama")                       # two models on one config: the last unpatch restores it
    other = type(shared)(shared.config)
    semitriton.patch(shared)
    semitriton.patch(other)
    semitriton.unpatch(shared)
    assert shared.config._attn_implementation == patching.ATTN_NAME
    semitriton.unpatch(other)
    assert shared.config._attn_implementation == "sdpa"
    for _ in range(3):                             # each unpatch of a live model leaves no finalizer behind
        semitriton.patch(shared)
        finalizer = patching._attn_configs[id(shared.config)][2]
        semitriton.unpatch(shared)
        assert not finalizer.alive and id(shared.config) not in patching._attn_configs


def test_a_deleted_patched_model_is_freed_without_a_gc_run():
    """A module swapped directly under the model (here every one) leaves no
    reference from the patch record back to the model: ``del`` frees it (and
    with it its cached weight transforms) at once, as it frees an unpatched
    one; a deep copy and a pickled copy still unpatch their own modules."""
    import gc
    import pickle
    import weakref

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.RMSNorm(4), nn.GELU(approximate="tanh"), nn.Linear(4, 2))

    enabled = gc.isenabled()
    gc.disable()
    try:
        m = semitriton.patch(model(), linear=True)
        x = torch.randn(3, 4, requires_grad=True)
        semitriton.grad(m(x).sum(), x, semiring="maxabs")
        ref = weakref.ref(m)
        del m
        assert ref() is None
    finally:
        if enabled:
            gc.enable()
    m = semitriton.patch(model(), linear=True)
    x = torch.randn(3, 4)
    for copy_ in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        semitriton.unpatch(copy_)
        assert [type(c) for c in copy_] == [nn.Linear, nn.RMSNorm, nn.GELU, nn.Linear]
        assert [type(c).__name__ for c in m] == ["SemiringLinear", "SemiringRMSNorm", "GELU", "SemiringLinear"]
        torch.testing.assert_close(copy_(x), m(x))
    semitriton.unpatch(m)
    assert [type(c) for c in m] == [nn.Linear, nn.RMSNorm, nn.GELU, nn.Linear]
