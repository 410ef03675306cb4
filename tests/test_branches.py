"""Branch attribution against graph surgery: the top-path weight through a
branch equals the plain maxabs value at R_L of the same model with every
other branch of that layer detached."""

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
