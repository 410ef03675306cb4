"""Branch attribution against graph surgery: the top-path weight through a
branch equals the plain maxabs value at R_L of the same model with every
other branch of that layer detached."""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import semitriton
from semitriton import ATTN_BRANCHES


class Attn(nn.Module):
    def __init__(self, d, h, hk):
        super().__init__()
        self.h, self.hk, self.dh = h, hk, d // h
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, hk * self.dh, bias=False)
        self.v_proj = nn.Linear(d, hk * self.dh, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, keep=None, head=None):
        B, T, D = x.shape

        def src(b):
            return x if keep in (None, b) else x.detach()

        def heads(t, n):
            return t.view(B, T, n, self.dh).transpose(1, 2)

        q, k, v = heads(self.q_proj(src("query")), self.h), heads(self.k_proj(src("key")), self.hk), \
            heads(self.v_proj(src("value")), self.hk)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.hk != self.h)
        if head is not None:                      # only paths through query head `head`
            sel = torch.zeros(self.h, dtype=torch.bool)
            sel[head] = True
            o = torch.where(sel.view(1, -1, 1, 1), o, o.detach())
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.up_proj(x)))


class Layer(nn.Module):
    def __init__(self, d, h, hk):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.self_attn, self.mlp = Attn(d, h, hk), MLP(d)

    def forward(self, x, cut=None, head=None):
        a = self.self_attn(self.input_layernorm(x), keep=cut if cut != "skip" else None, head=head)
        if cut == "skip":
            a = a.detach()
        skip = x.detach() if cut in ("query", "key", "value") else x
        h = skip + a
        return h + self.mlp(self.post_attention_layernorm(h))


class Tiny(nn.Module):
    def __init__(self, d=8, h=4, hk=2, n=2):
        super().__init__()
        self.layers = nn.ModuleList(Layer(d, h, hk) for _ in range(n))
        self.head = nn.Linear(d, 5)

    def forward(self, x, cut_layer=None, cut=None, head=None):
        for i, layer in enumerate(self.layers):
            x = layer(x, cut if i == cut_layer else None, head if i == cut_layer else None)
        return self.head(x)


def _residuals(model, x, **kw):
    """The layer inputs R_L as intermediate tensors of one forward."""
    res = []
    hooks = [l.register_forward_pre_hook(lambda m, a: res.append(a[0])) for l in model.layers]
    y = model(x, **kw)
    for h in hooks:
        h.remove()
    return y, res


@pytest.mark.parametrize("semiring", ["maxabs", "max"])
def test_branches_equal_graph_surgery(semiring):
    torch.manual_seed(0)
    model = semitriton.patch(Tiny().double())
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    y = model(x)
    score = y[0, -1, 2] - y[0, -1, 4]
    attr = semitriton.branch_attribution(score, x, semiring=semiring, heads=True)
    assert attr.layers == [0, 1]
    sr = semitriton.semirings.get(semiring)
    for L in (0, 1):
        tot = []
        for b in ATTN_BRANCHES:
            yc, res = _residuals(model, x, cut_layer=L, cut=b)
            sc = yc[0, -1, 2] - yc[0, -1, 4]
            (v,) = semitriton.grad_values(sc, res[L], semiring=semiring)
            expected = sr.readout(sr.sum(v, -1))[0]
            torch.testing.assert_close(attr.attention[L][b][0], expected.double(), rtol=1e-9, atol=0)
            tot.append(expected)
        y2, res2 = _residuals(model, x)
        (vt,) = semitriton.grad_values(y2[0, -1, 2] - y2[0, -1, 4], res2[L], semiring=semiring)
        torch.testing.assert_close(attr.total[L][0], sr.readout(sr.sum(vt, -1))[0].double(), rtol=1e-9, atol=0)
        # per head: the query branch through one head
        for h in range(4):
            yc, res = _residuals(model, x, cut_layer=L, cut="query", head=h)
            sc = yc[0, -1, 2] - yc[0, -1, 4]
            (v,) = semitriton.grad_values(sc, res[L], semiring=semiring)
            torch.testing.assert_close(attr.heads[L]["query"][0, :, h], sr.readout(sr.sum(v, -1))[0].double(),
                                       rtol=1e-9, atol=0)
    tb = attr.top_branch(0)
    assert tb.shape == (1, 5)
    back = semitriton.BranchAttribution.from_dict(attr.to_dict())
    torch.testing.assert_close(back.attention[0]["key"], attr.attention[0]["key"])


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_hf_models_branch_sites(kind):
    pytest.importorskip("transformers")
    from hf_models import build, embeds_and_output
    model = semitriton.patch(build(kind, "sdpa", dtype=torch.float64))
    emb, score = embeds_and_output(model, kind, torch.tensor([[3, 5, 7, 9, 11]]))
    attr = semitriton.branch_attribution(score[0], emb, heads=True)
    assert attr.layers == [0, 1]
    for L in attr.layers:
        branches = torch.stack([attr.attention[L][b] for b in ATTN_BRANCHES])
        torch.testing.assert_close(branches.amax(0), attr.total[L])      # exactly one branch is taken
        assert set(attr.mlp[L]) == {"mlp", "skip"}
        hq = torch.stack([attr.heads[L][b] for b in ATTN_BRANCHES[:3]])
        torch.testing.assert_close(hq.amax(-1), branches[:3])


def test_needs_module_names():
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(semitriton.SemitritonError, match="track"):
        semitriton.branch_attribution((x * 2).sum(), x)


# ---- other layer layouts, against the same graph surgery -------------------------------------------
class FusedAttn(nn.Module):
    """q, k, v from one projection, cut by slices (Phi-3) or by a view + chunk
    (GPT-NeoX); ``keep`` as in Attn (the cut branch reads a detached input)."""

    def __init__(self, d, h, cut):
        super().__init__()
        self.h, self.dh, self.cut = h, d // h, cut
        self.qkv_proj = nn.Linear(d, 3 * d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, keep=None):
        B, T, D = x.shape

        fused = self.qkv_proj(x) if keep is None else None          # one projection output, cut three ways

        def qkv(b):
            t = fused if fused is not None else self.qkv_proj(x if keep == b else x.detach())
            if self.cut in ("slice", "qvk"):
                at = {"query": 0, "key": 1, "value": 2} if self.cut == "slice" else {"query": 0, "value": 1, "key": 2}
                part = t[..., at[b] * D:(at[b] + 1) * D]
                return part.view(B, T, self.h, self.dh).transpose(1, 2)
            return t.view(B, T, self.h, 3 * self.dh).transpose(1, 2).chunk(3, dim=-1)[ATTN_BRANCHES.index(b)]

        if fused is not None and self.cut == "chunk":
            q, k, v = fused.view(B, T, self.h, 3 * self.dh).transpose(1, 2).chunk(3, dim=-1)
        elif fused is not None and self.cut == "qvk":              # CodeGen: query, value, key = split
            q, v, k = (t.view(B, T, self.h, self.dh).transpose(1, 2) for t in fused.split(D, dim=-1))
        else:
            q, k, v = qkv("query"), qkv("key"), qkv("value")
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, D))


class LatentAttn(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 without a query LoRA): q =
    q_proj(x); kv_a_proj_with_mqa(x) cut into the latent c and the keys'
    rope part k_r (one head, shared); kv_b_proj(norm(c)) cut into the keys'
    no-rope part and the values; k = (k_nope, k_r). ``keep`` as in Attn: key
    and value then each come from their own kv computation, the other one
    reading a detached input."""

    def __init__(self, d, h, dn=2, dr=2, dv=2, r=4):
        super().__init__()
        self.h, self.dn, self.dr, self.dv, self.r = h, dn, dr, dv, r
        self.q_proj = nn.Linear(d, h * (dn + dr), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, r + dr, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(r)
        self.kv_b_proj = nn.Linear(r, h * (dn + dv), bias=False)
        self.o_proj = nn.Linear(h * dv, d, bias=False)

    def _kv(self, x):
        B, T, _ = x.shape
        c, k_r = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c)).view(B, T, self.h, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat((k_nope, k_r[:, None].expand(B, self.h, T, self.dr)), dim=-1)
        return k, v

    def forward(self, x, keep=None):
        B, T, _ = x.shape

        def src(b):
            return x if keep in (None, b) else x.detach()

        q = self.q_proj(src("query")).view(B, T, self.h, self.dn + self.dr).transpose(1, 2)
        if keep is None:
            k, v = self._kv(x)
        else:
            k, v = self._kv(src("key"))[0], self._kv(src("value"))[1]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.h * self.dv))


class LayoutLayer(nn.Module):
    """One transformer layer in a given layout:
    "sequential" (LLaMA): h = x + attn(n1(x)); y = h + mlp(n2(h));
    "parallel" (Phi, GPT-J: one norm): y = attn(n1(x)) + mlp(n1(x)) + x;
    "parallel2" (GPT-NeoX: two norms): y = mlp(n2(x)) + attn(n1(x)) + x;
    "chained" (Cohere): y = (x + attn(n1(x))) + mlp(n1(x));
    "sandwich" (Gemma2/3): h = x + n3(attn(n1(x))); y = h + n4(mlp(n2(h)));
    "scaled" (Granite): h = x + 0.5·attn(n1(x)); y = h + 0.5·mlp(n2(h));
    "deepnorm": h = 2·x + attn(n1(x)); y = 2·h + mlp(n2(h)) (the stream scaled before its add);
    "inplace": h = x.clone(); h += attn(n1(x)); y = h + mlp(n2(h));
    "reinject": h = (attn(n1(x)) + e) + x, e the embeddings (an earlier ancestor); y = h + mlp(n2(h)).
    ``cut`` keeps one branch of the layer's fan-out and detaches the others:
    query/key/value (the attention table), "skip" (everything but the
    attention), "mlp" (only the MLP), "mlp_skip" (everything but the MLP).
    The fan-out streams are appended to ``self.streams``."""

    def __init__(self, d, h, layout, fused=None):
        super().__init__()
        self.layout = layout
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.self_attn = (LatentAttn(d, h) if fused == "latent" else FusedAttn(d, h, fused) if fused
                          else Attn(d, h, h))
        self.mlp = MLP(d)
        if layout == "sandwich":
            self.post_attn_norm, self.post_mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.streams = []

    def forward(self, x, cut=None, e=None):
        lay = self.layout
        parallel = lay in ("parallel", "parallel2", "chained")
        # which edges of the fan-out(s) stay live under the cut
        if cut in ATTN_BRANCHES[:3]:
            live = {cut} | ({"mlp_in2", "skip2"} if not parallel else set())
        elif cut == "skip":
            live = {"skip", "mlp_in", "mlp_in2", "skip2"}
        elif cut == "mlp":
            live = {"mlp_in"} if parallel else set(ATTN_BRANCHES[:3]) | {"skip", "mlp_in2"}
        elif cut == "mlp_skip":
            live = set(ATTN_BRANCHES[:3]) | ({"skip"} if parallel else {"skip", "skip2"})
        else:
            live = set(ATTN_BRANCHES[:3]) | {"skip", "mlp_in", "mlp_in2", "skip2"}

        def src(t, part):
            return t if part in live else t.detach()

        self.streams.append(x)
        n1 = self.input_layernorm(x)
        a = self.self_attn(n1, keep=None if cut is None or cut not in ATTN_BRANCHES[:3] else cut)
        if cut is not None and not (set(ATTN_BRANCHES[:3]) & live):
            a = a.detach()
        elif cut in ATTN_BRANCHES[:3]:
            pass                                   # the attention reads only the kept branch
        elif cut is not None:
            a = self.self_attn(n1, keep=None)
        if lay == "sandwich":
            a = self.post_attn_norm(a)
        if lay == "scaled":
            a = 0.5 * a
        if parallel:
            n2 = n1 if lay != "parallel2" else self.post_attention_layernorm(x)
            m = self.mlp(src(n2, "mlp_in"))
            if lay == "parallel":
                return a + m + src(x, "skip")
            if lay == "parallel2":
                return m + a + src(x, "skip")
            return (src(x, "skip") + a) + m
        if lay == "deepnorm":
            h = 2.0 * src(x, "skip") + a
        elif lay == "inplace":
            h = src(x, "skip").clone()
            h += a
        elif lay == "reinject":                    # at layer 0 the embeddings are R_0 itself
            h = (a + (src(e, "skip") if e is x else e)) + src(x, "skip")
        else:
            h = src(x, "skip") + a
        self.streams.append(h)
        m = self.mlp(self.post_attention_layernorm(src(h, "mlp_in2")))
        if lay == "sandwich":
            m = self.post_mlp_norm(m)
        if lay == "scaled":
            m = 0.5 * m
        if lay == "deepnorm":
            return 2.0 * src(h, "skip2") + m
        return src(h, "skip2") + m


class LayoutModel(nn.Module):
    def __init__(self, layout, fused=None, d=8, h=4, n=2):
        super().__init__()
        self.layers = nn.ModuleList(LayoutLayer(d, h, layout, fused) for _ in range(n))
        self.head = nn.Linear(d, 5)

    def forward(self, x, cut_layer=None, cut=None):
        for layer in self.layers:
            layer.streams = []
        # the embeddings are R_0: a cut at layer 0 that detaches its skip detaches them everywhere
        e = x.detach() if cut_layer == 0 and cut in ATTN_BRANCHES[:3] else x
        for i, layer in enumerate(self.layers):
            x = layer(x, cut if i == cut_layer else None, x if i == 0 else e)
        return self.head(x)


@pytest.mark.parametrize("layout,fused", [("sequential", "slice"), ("parallel", None), ("parallel2", "chunk"),
                                          ("chained", None), ("sandwich", None), ("scaled", "slice"),
                                          ("deepnorm", "qvk"), ("inplace", None), ("reinject", None),
                                          ("sequential", "latent")])
@pytest.mark.parametrize("semiring", ["maxabs", "max"])
def test_layouts_equal_graph_surgery(layout, fused, semiring):
    """Each table entry is the plain semiring value at the fan-out's stream of
    the same model with every other branch of that fan-out detached; the
    total is the value at R_L (the layer's input)."""
    torch.manual_seed(0)
    model = semitriton.patch(LayoutModel(layout, fused).double())
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    y = model(x)
    score = y[0, -1, 2] - y[0, -1, 4]
    attr = semitriton.branch_attribution(score, x, semiring=semiring)
    assert attr.layers == [0, 1]
    sr = semitriton.semirings.get(semiring)
    parallel = layout in ("parallel", "parallel2", "chained")

    def at(L, cut, stream):
        yc = model(x, cut_layer=L, cut=cut)
        (v,) = semitriton.grad_values(yc[0, -1, 2] - yc[0, -1, 4], model.layers[L].streams[stream],
                                      semiring=semiring)
        return sr.readout(sr.sum(v, -1))[0].double()

    for L in (0, 1):
        torch.testing.assert_close(attr.total[L][0], at(L, None, 0), rtol=1e-9, atol=0)
        for b in ATTN_BRANCHES:
            torch.testing.assert_close(attr.attention[L][b][0], at(L, b, 0), rtol=1e-9, atol=0)
        mstream = 0 if parallel else 1
        torch.testing.assert_close(attr.mlp[L]["mlp"][0], at(L, "mlp", mstream), rtol=1e-9, atol=0)
        torch.testing.assert_close(attr.mlp[L]["skip"][0], at(L, "mlp_skip", mstream), rtol=1e-9, atol=0)


def test_an_attention_input_that_is_not_query_key_or_value_is_refused():
    """A gated attention (a gate projection inside the attention module that
    reads the normed stream) has a fourth way in: refused with the module
    named, not counted as skip."""
    class Gated(Attn):
        def __init__(self, d, h, hk):
            super().__init__(d, h, hk)
            self.gate = nn.Linear(d, d)

        def forward(self, x, keep=None, head=None):
            return super().forward(x) * torch.sigmoid(self.gate(x))

    torch.manual_seed(0)
    model = Tiny()
    for layer in model.layers:
        layer.self_attn = Gated(8, 4, 2)
    model = semitriton.patch(model.double())
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    score = model(x)[0, -1, 2]
    with pytest.raises(semitriton.SemitritonError, match=r"layers\.0\.self_attn reads the stream through"):
        semitriton.branch_attribution(score, x)


def _hf(kind):
    t = pytest.importorskip("transformers")
    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=24, max_position_embeddings=32)
    small = dict(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32)
    return {
        "phi": lambda: t.PhiForCausalLM(t.PhiConfig(**common, partial_rotary_factor=0.5)),
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**common, pad_token_id=0)),
        "cohere": lambda: t.CohereForCausalLM(t.CohereConfig(**common)),
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**common, head_dim=4)),
        "granite": lambda: t.GraniteForCausalLM(t.GraniteConfig(**common, residual_multiplier=0.5)),
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
            rotary_pct=0.5)),
        "gptj": lambda: t.GPTJForCausalLM(t.GPTJConfig(**small, rotary_dim=2)),
        "bloom": lambda: t.BloomForCausalLM(t.BloomConfig(vocab_size=64, hidden_size=16, n_layer=2, n_head=4)),
        "falcon": lambda: t.FalconForCausalLM(t.FalconConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
            new_decoder_architecture=True)),
        "gpt_bigcode": lambda: t.GPTBigCodeForCausalLM(t.GPTBigCodeConfig(**small, multi_query=True)),
        "distilbert": lambda: t.DistilBertForMaskedLM(t.DistilBertConfig(
            vocab_size=64, dim=16, n_layers=2, n_heads=4, hidden_dim=24, max_position_embeddings=32)),
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, ffn_dim=24,
            max_position_embeddings=32, word_embed_proj_dim=16)),
    }[kind]


@pytest.mark.parametrize("kind", ["phi", "phi3", "cohere", "gemma2", "granite", "gpt_neox", "gptj", "bloom",
                                  "falcon", "gpt_bigcode", "distilbert", "opt"])
def test_hf_layouts_read_at_the_layer_inputs(kind):
    """Parallel blocks (Phi, GPT-J, GPT-NeoX, Falcon, Cohere's attn + mlp +
    stream), norms after the branch (Gemma2), a residual multiplier
    (Granite), fused q/k/v cut by slices (Phi-3), chunks (GPT-NeoX), selects
    (BLOOM), index lists (Falcon) or nested splits (GPT-BigCode), other module
    names (DistilBERT, OPT): R_L is the decoder layer's input (its value is the
    total), each fan-out's branches ⊕ to its stream's value, and every layer
    has an MLP table."""
    torch.manual_seed(0)
    model = semitriton.patch(_hf(kind)().double().eval())
    ids = torch.tensor([[3, 5, 7, 9, 11, 2]])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    inputs = {}
    layers = [m for n, m in model.named_modules() if re.fullmatch(r".*\.(layers|h|layer)\.\d+", n)]
    hooks = [m.register_forward_pre_hook(
        lambda mod, a, kw, i=i: inputs.__setitem__(i, a[0] if a else kw["hidden_states"]), with_kwargs=True)
        for i, m in enumerate(layers)]
    logits = model(inputs_embeds=emb).logits
    for h in hooks:
        h.remove()
    score = logits[0, -1, 7] - logits[0, -1, 3]
    attr = semitriton.branch_attribution(score, emb, heads=True)
    assert attr.layers == [0, 1] and sorted(attr.mlp) == [0, 1]
    sr = semitriton.semirings.get("maxabs")
    for L in attr.layers:
        (v,) = semitriton.grad_values(score, inputs[L], semiring="maxabs")
        torch.testing.assert_close(attr.total[L], sr.readout(sr.sum(v, -1)).double(), rtol=1e-9, atol=0)
        branches = torch.stack([attr.attention[L][b] for b in ATTN_BRANCHES])
        torch.testing.assert_close(branches.amax(0), attr.total[L], rtol=1e-9, atol=0)
        assert (branches[:3] > 0).any()                # the attention is found, not read as nothing
        assert (attr.mlp[L]["mlp"] > 0).any()           # and the MLP (Cohere's read 0 before)
        for table in (attr.attention[L], attr.mlp[L]):   # per position, also where the stream is flat (OPT)
            assert all(v.shape == (1, 6) for v in table.values())
        if L in attr.heads:
            hq = torch.stack([attr.heads[L][b] for b in ATTN_BRANCHES[:3]])
            torch.testing.assert_close(hq.amax(-1), branches[:3], rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_encoder_decoder_sites_are_numbered_in_forward_order(kind):
    """An encoder and a decoder repeat layer numbers (T5 nests its blocks'
    sublayers too): the sites are numbered in forward order, ``modules``
    names each, and nothing is overwritten (a decoder layer's self- and
    cross-attention both appear; the MLP table goes to the cross-attention it
    follows)."""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bart":
        model = t.BartForConditionalGeneration(t.BartConfig(
            vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32))
    else:
        model = t.T5ForConditionalGeneration(t.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                                        num_heads=4, decoder_start_token_id=0))
    model = semitriton.patch(model.double().eval())
    ids, dec = torch.tensor([[3, 5, 7, 9, 11, 2, 13]]), torch.tensor([[0, 4, 6, 8]])
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    lg = model(inputs_embeds=emb, decoder_input_ids=dec).logits
    attr = semitriton.branch_attribution(lg[0, -1, 7] - lg[0, -1, 3], emb)
    mods = [attr.modules[L] for L in attr.layers]
    assert attr.layers == list(range(len(mods))) and len(set(mods)) == len(mods) == 4
    assert all(re.match(r"(model\.)?encoder\.", m) for m in mods[:2])
    assert all(re.match(r"(model\.)?decoder\.", m) for m in mods[2:])   # the decoder's layer 1: self, then cross
    cross = 3
    assert ("EncDecAttention" if kind == "t5" else "encoder_attn") in mods[cross]
    assert cross in attr.mlp and 2 not in attr.mlp and {0, 1} <= set(attr.mlp)


class Looped(nn.Module):
    """One layer applied three times (weights shared, as in ALBERT or a looped
    transformer): one site per application."""

    def __init__(self, n=3, d=8):
        super().__init__()
        self.layers = nn.ModuleList([LayoutLayer(d, 4, "sequential")])
        self.n, self.head = n, nn.Linear(d, 5)

    def forward(self, x, cut_call=None, cut=None):
        streams = []
        for i in range(self.n):
            x = self.layers[0](x, cut if i == cut_call else None)
            streams.append(self.layers[0].streams[-2])
            self.layers[0].streams = []
        self.streams = streams
        return self.head(x)


def test_a_layer_applied_several_times_has_one_site_per_application():
    torch.manual_seed(0)
    model = semitriton.patch(Looped().double())
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    y = model(x)
    attr = semitriton.branch_attribution(y[0, -1, 2] - y[0, -1, 4], x, heads=True)
    assert attr.layers == [0, 1, 2] and set(attr.modules.values()) == {"layers.0.self_attn"}
    sr = semitriton.semirings.get("maxabs")
    for call in range(3):
        for b in ATTN_BRANCHES:
            yc = model(x, cut_call=call, cut=b)
            (v,) = semitriton.grad_values(yc[0, -1, 2] - yc[0, -1, 4], model.streams[call], semiring="maxabs")
            torch.testing.assert_close(attr.attention[call][b][0], sr.readout(sr.sum(v, -1))[0].double(),
                                       rtol=1e-9, atol=0)
        hq = torch.stack([attr.heads[call][b] for b in ATTN_BRANCHES[:3]]).amax(-1)
        torch.testing.assert_close(hq, torch.stack([attr.attention[call][b] for b in ATTN_BRANCHES[:3]]),
                                   rtol=1e-9, atol=0)


def test_heads_where_key_and_value_have_no_path_are_the_semiring_zero():
    """Cross-attention over encoder states computed without grad: key and
    value carry nothing, per head too ([B, T, H] of the zero, so top_head works)."""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = t.BartForConditionalGeneration(t.BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32))
    model = semitriton.patch(model.double().eval().requires_grad_(False))       # frozen: k/v have no graph
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=torch.tensor([[3, 5, 7, 9, 11]]))
    dec = model.get_decoder().embed_tokens(torch.tensor([[0, 4, 6, 8]])).detach().requires_grad_()
    lg = model(encoder_outputs=enc, decoder_inputs_embeds=dec).logits
    for semiring, zero in (("maxabs", 0.0), ("max", float("-inf"))):
        attr = semitriton.branch_attribution(lg[0, -1, 7] - lg[0, -1, 3], dec, semiring=semiring, heads=True)
        cross = next(L for L, m in attr.modules.items() if "encoder_attn" in m)
        for b in ("key", "value"):
            assert attr.heads[cross][b].shape == (1, 4, 4)
            assert (attr.heads[cross][b] == zero).all() and (attr.attention[cross][b] == zero).all()
        assert attr.top_head(cross).shape == (1, 4, 2)


def test_heads_of_an_unfused_attention_are_refused_with_a_warning():
    """Per-head weights split the fused attention node; a tracked (unpatched)
    eager attention has none, and the caller is told so."""
    t = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = t.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=24)
    cfg._attn_implementation = "eager"
    model = semitriton.track(t.LlamaForCausalLM(cfg).double().eval())
    emb = model.get_input_embeddings()(torch.tensor([[3, 5, 7, 9]])).detach().requires_grad_()
    score = model(inputs_embeds=emb).logits[0, -1, 3]
    with pytest.warns(UserWarning, match=r"no per-head weights for 2 attention layer\(s\)"):
        attr = semitriton.branch_attribution(score, emb, heads=True)
    assert attr.heads == {} and attr.layers == [0, 1]


def test_unread_attention_layout_names_the_module():
    """JetMoe's attention projects through a mixture of query experts and a
    joint kv projection: no query/key/value projection by name. The error
    names the attention module, its class and its submodules (it named none)."""
    import transformers as t
    torch.manual_seed(0)
    cfg = t.JetMoeConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                         intermediate_size=32, num_local_experts=2, num_experts_per_tok=1)
    model = semitriton.patch(t.JetMoeForCausalLM(cfg).eval())
    emb = model.get_input_embeddings()(torch.tensor([[5, 7, 9, 11]])).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    with pytest.raises(semitriton.SemitritonError,
                       match=r"model\.layers\.0\.self_attention \(\w*JetMoeAttention\): none of its submodules "
                             r"\(experts, kv_proj\) is a query/key/value projection"):
        semitriton.branch_attribution(logits[0, -1, 7] - logits[0, -1, 3], emb)


@pytest.mark.parametrize("kind", ["deepseek_v3", "deepseek_v2"])
def test_multi_head_latent_attention_branches(kind):
    """DeepSeek-V3's (query LoRA) and DeepSeek-V2's (q_proj; complex rotary)
    multi-head latent attention, patched: the key branch is the kv
    down-projection's rope part and kv_b_proj's key part, the value branch
    its value part (told apart by the fused attention node's inputs). Every
    position takes exactly one branch, and the per-head tables agree (the
    graph surgery of the toy LatentAttn above checks the values)."""
    import transformers as t
    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=64, max_position_embeddings=64, n_routed_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=16, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=16,
                  qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)
    if kind == "deepseek_v3":
        model = t.DeepseekV3ForCausalLM(t.DeepseekV3Config(**common, q_lora_rank=16))
    else:
        model = t.DeepseekV2ForCausalLM(t.DeepseekV2Config(**common, q_lora_rank=None, pad_token_id=0))
    model = semitriton.patch(model.eval())
    emb = model.get_input_embeddings()(torch.tensor([[5, 7, 9, 11, 13]])).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    attr = semitriton.branch_attribution(logits[0, -1, 7] - logits[0, -1, 3], emb, heads=True)
    assert attr.layers == [0, 1]
    for L in attr.layers:
        branches = torch.stack([attr.attention[L][b] for b in ATTN_BRANCHES])
        torch.testing.assert_close(branches.amax(0), attr.total[L])
        assert (attr.attention[L]["key"] > 0).any() and (attr.attention[L]["value"] > 0).any()
        hq = torch.stack([attr.heads[L][b] for b in ATTN_BRANCHES[:3]])
        torch.testing.assert_close(hq.amax(-1), branches[:3])
