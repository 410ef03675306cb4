"""Float32 statistics on full-depth random-weight configs (BERT-base, 12 layers;
SmolLM2-135M, 30 layers) are finite wherever a path exists, never underflow to
zero, and agree with float64 runs of the same model."""

import pytest
import torch

import semitriton
from conftest import SEMIRINGS

transformers = pytest.importorskip("transformers")


def _bert_base():
    cfg = transformers.BertConfig()
    cfg._attn_implementation = "sdpa"
    return transformers.BertForMaskedLM(cfg).eval()


def _smollm2_config_llama():
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                   rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                                   max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(cfg).eval()


def _stats(model, ids, dtype):
    model = model.to(dtype)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    score = logits[0, -1, 7] - logits[0, -1, 3]
    out = {}
    for s in SEMIRINGS:
        (v,) = semitriton.grad_values(score, emb, semiring=s)
        out[s] = v
    return out


@pytest.mark.slow
@pytest.mark.parametrize("build", [_bert_base, _smollm2_config_llama], ids=["bert-base", "smollm2-135m"])
def test_float32_matches_float64_without_underflow(build):
    torch.manual_seed(0)
    model = build()
    ids = torch.randint(5, 1000, (1, 8))
    s32 = _stats(model, ids, torch.float32)
    s64 = _stats(model, ids, torch.float64)
    sr = {s: semitriton.semirings.get(s) for s in SEMIRINGS}
    has_path = s64["abs"][0] > float("-inf")
    assert has_path.all()
    log_z = s64["abs"][0]
    assert log_z.max() > 88.8, "the test model should overflow float32 in linear space"
    for s in SEMIRINGS:
        r32 = sr[s].readout(s32[s]).double()
        r64 = sr[s].readout(s64[s]).double()
        assert torch.isfinite(r32).all(), s
        tol = 1e-4
        if s in ("abs", "maxabs", "max"):
            assert (r32 != 0).all(), f"{s}: underflow to zero"
            rel = ((r32 - r64).abs() / r64.abs()).max().item()
            if s == "abs":
                # Z is kept as float32 log Z; its resolution is |log Z|·6e-8 per
                # rounding (log Z ≈ 350 on the 30-layer model), so the relative
                # error of Z after hundreds of ops is bounded by ~1e-6·|log Z|.
                tol = max(1e-4, 1e-6 * log_z.abs().max().item())
        else:
            rel = ((r32 - r64).abs().max() / r64.abs().max()).item()
        assert rel <= tol, f"{s}: float32 vs float64 relative error {rel:.2e} > {tol:.1e}"
    # per-token statistics too (not real: behind a LayerNorm the gradient sums to 0 per token)
    for s in ("abs", "max", "maxabs", "entropy"):
        t32 = semitriton.token_readout(s32[s], s).double()
        t64 = semitriton.token_readout(s64[s], s).double()
        assert torch.isfinite(t32).all()
        rel = ((t32 - t64).abs().max() / t64.abs().max()).item()
        assert rel <= 1e-4, f"{s} per-token: relative error {rel:.2e}"


def test_entropy_is_never_negative():
    """One path per unit through 40 diagonal layers with |w| from e^-7 to e^7:
    H = 0 exactly, which float32 forms as μ + log z with |log z| in the
    hundreds; rounding must not read as a negative entropy."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, generator=g).requires_grad_()
    h = x
    for _ in range(40):
        d = torch.exp(torch.empty(8).uniform_(-7, 7, generator=g)) * torch.sign(torch.randn(8, generator=g))
        h = h @ torch.diag(d)
    (H,) = semitriton.grad(h.sum(), x, semiring="entropy")
    assert (H >= 0).all() and float(H.max()) < 1e-4


def test_silu_derivative_keeps_its_subnormal_tail():
    """silu'(x) = σ(x)(1 + x σ(-x)) for x in (-103, -88.7): float32 still holds
    it (a subnormal), though 1/(1 + e^-x) overflows to 0 there; the torch
    reference must not drop the edge the Triton kernel keeps."""
    from semitriton.semirings._util import activation_derivative
    x = torch.tensor([-100.0, -95.0, -90.0, -60.0, 0.5])
    xd = x.double()
    want = torch.sigmoid(xd) * (1 + xd * torch.sigmoid(-xd))
    got = activation_derivative(x, "silu")
    assert (got != 0).all()
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=0)      # subnormals keep ~2-3 digits


def test_max_overflow_is_warned():
    """A 10-step chain whose every edge is 1e5: the top path product 1e50 is
    past float32's range, so max's linear-space M+ reads inf; that comes with
    a warning naming maxabs (which has 1e50); the float64 walk does not warn."""
    import warnings

    def chain(x):
        for _ in range(10):
            x = torch.tanh(x * 1e5)
        return x.sum()

    x64 = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (m64,) = semitriton.grad(chain(x64), x64, semiring="max")
    torch.testing.assert_close(m64, torch.full((3,), 1e50, dtype=torch.float64))
    x32 = torch.zeros(3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"3 max-semiring value\(s\) read ±inf.*overflowed torch.float32.*maxabs"):
        (m32,) = semitriton.grad(chain(x32), x32, semiring="max")
    assert (m32 == float("inf")).all()
    (ma32,) = semitriton.grad(chain(x32), x32, semiring="maxabs")
    torch.testing.assert_close(ma32.double(), m64, rtol=1e-4, atol=0)


@pytest.mark.parametrize("semiring", ["abs", "maxabs"])
def test_linear_readouts_past_float64_say_so(semiring):
    """abs and maxabs keep log values: a path product of 1e±800 is exact in
    log space (log_space=True), while the float64 readout overflows (an error
    naming log_space) or underflows to 0 (a warning naming it)."""
    import math
    import warnings

    def chain(x, a):
        for _ in range(4):
            x = torch.tanh(x * a)
        return x.sum()

    for a, sign in ((1e200, 1), (1e-200, -1)):
        x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        (log_v,) = semitriton.grad(chain(x, a), x, semiring=semiring, log_space=True)
        torch.testing.assert_close(log_v, torch.full((2,), sign * 800 * math.log(10), dtype=torch.float64))
        if sign > 0:
            with pytest.raises(FloatingPointError, match=f"the {semiring} readout overflows float64.*log_space=True"):
                semitriton.grad(chain(x, a), x, semiring=semiring)
        else:
            with pytest.warns(RuntimeWarning, match=f"the {semiring} readout underflows float64.*log_space=True"):
                (v,) = semitriton.grad(chain(x, a), x, semiring=semiring)
            assert (v == 0).all()
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (v,) = semitriton.grad(chain(x, 1e-50), x, semiring=semiring)     # 1e-200: in range, no warning
    torch.testing.assert_close(v, torch.full((2,), 1e-200, dtype=torch.float64))


def test_max_underflow_is_warned():
    """A 60-step tanh chain without a residual: the top path product (~1e-61)
    is below float32's range, so max's linear-space M+ reads 0; that comes
    with a warning naming maxabs, which keeps the magnitude. The float64 walk
    of the same program has the range and does not warn."""
    import warnings

    torch.manual_seed(0)
    ws = [torch.randn(8, 8, dtype=torch.float64) * 0.05 for _ in range(60)]

    def chain(x):
        for w in ws:
            x = torch.tanh(x @ w.to(x.dtype))
        return x.sum()

    x64 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (m64,) = semitriton.grad(chain(x64), x64, semiring="max")
    assert (m64 > 0).all() and m64.max() < 1e-45
    x32 = x64.detach().float().requires_grad_()
    with pytest.warns(RuntimeWarning, match=r"32 max-semiring readout\(s\) underflowed torch.float32.*maxabs"):
        (m32,) = semitriton.grad(chain(x32), x32, semiring="max")
    assert (m32 == 0).all()
    (ma32,) = semitriton.grad(chain(x32), x32, semiring="maxabs")
    (ma64,) = semitriton.grad(chain(x64), x64, semiring="maxabs")
    assert (ma64 >= m64 * (1 - 1e-12)).all()          # |M+| ≤ the largest |product| (log-space rounding)
    torch.testing.assert_close(ma32, ma64, rtol=1e-4, atol=0)
