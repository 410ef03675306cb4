"""Analysis results: tables, JSON round trip, plots and the HTML report."""

import json
import warnings

import pytest
import torch

import semitriton
from semitriton.report import (Analysis, analyze, analyze_batch, plot_branch_fractions, plot_branch_weights,
                               plot_token_heatmap, report_html)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def analysis():
    from hf_models import build, embeds_and_output
    model = semitriton.patch(build("llama", "sdpa", dtype=torch.float64))
    emb, score = embeds_and_output(model, "llama", torch.tensor([[3, 5, 7, 9, 11]]))
    return analyze(score[0], emb, tokens=["The", " keys", " to", " the", " cabinet"], k=3, heads=True,
                   spans={"subject": [1], "attractor": [4]}, description="logit(7) - logit(3)",
                   meta={"model": "tiny llama"}), score, emb


def test_statistics_agree_with_the_semiring_passes(analysis):
    a, score, emb = analysis
    (h,) = semitriton.grad_values(score[0], emb, semiring="entropy")
    torch.testing.assert_close(torch.tensor(a.stats["entropy"], dtype=torch.float64), semitriton.token_readout(h, "entropy")[0].double())
    (m,) = semitriton.grad(score[0], emb, semiring="maxabs")
    torch.testing.assert_close(torch.tensor(a.stats["top_path"], dtype=torch.float64), m[0].amax(-1).double())
    assert a.paths[0].weight == pytest.approx(max(a.stats["top_path"]), rel=1e-9)
    # the top path's first layer milestone agrees with the branch attribution
    ms = a.milestones(a.paths[0])
    assert ms[0]["branch"] == "input" and ms[-1]["branch"] == "output"
    assert [m_["layer"] for m_ in ms[1:-1]] == a.branches.layers
    t = a.paths[0].source_index[1]
    for m_ in ms[1:-1]:
        if m_["position"] == t:
            assert semitriton.ATTN_BRANCHES[int(a.branches.top_branch(m_["layer"])[0, t])] == m_["branch"]
            break


def test_tables(analysis):
    a, _, _ = analysis
    rows = a.token_table()
    assert [r["token"] for r in rows] == a.tokens
    assert rows[1]["subject"] and not rows[0]["subject"]
    assert set(rows[0]) >= {"entropy", "log_flow", "top_path", "L0", "L1"}
    lt = a.layer_table()
    assert [r["layer"] for r in lt] == [0, 1]
    for r in lt:
        assert sum(r[f"frac_{b}"] for b in semitriton.ATTN_BRANCHES) == pytest.approx(1.0)
    sub = a.layer_table(tokens=[1])
    assert sub[0]["key"] == pytest.approx(float(a.branches.attention[0]["key"][0, 1]))
    # with per-head weights, a top path inside the attention names its head
    for L in a.branches.layers:
        for t, row in enumerate(rows):
            b = semitriton.ATTN_BRANCHES[int(a.branches.top_branch(L)[0, t])]
            if b == "skip":
                assert row[f"L{L}"] == "skip"
            else:
                h = int(a.branches.heads[L][b][0, t].argmax())
                assert row[f"L{L}"] == f"{b}/h{h}"
    assert any("/h" in row[f"L{L}"] for row in rows for L in a.branches.layers)


@pytest.mark.parametrize("semiring", ["maxabs", "max"])
def test_tokens_without_a_path_take_no_branch(semiring, tmp_path):
    """A causal LM scored at position 2 of 5: tokens 3 and 4 cannot reach the
    score, so their top path takes no branch ("-", NO_PATH), they are left out
    of the branch fractions, and the signed max semiring's means stay finite."""
    from hf_models import build
    from semitriton.sva.run import PairResult, summarize
    model = semitriton.patch(build("llama", "sdpa", dtype=torch.float64))
    emb = model.get_input_embeddings()(torch.tensor([[3, 5, 7, 9, 11]])).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    a = analyze(logits[0, 2, 7] - logits[0, 2, 3], emb, tokens=list("abcde"), k=1, semiring=semiring,
                spans={"subject": [1, 4]})
    for L in a.branches.layers:
        top = a.branches.top_branch(L)[0]
        assert top[3:].tolist() == [semitriton.NO_PATH] * 2
        assert (top[:3] >= 0).all()
        assert [r[f"L{L}"] for r in a.token_table()][3:] == ["-", "-"]
    none = a.branches.no_path_value()
    for r in a.layer_table():
        assert sum(r[f"frac_{b}"] for b in semitriton.ATTN_BRANCHES) == pytest.approx(1.0)
        assert max(r[b] for b in semitriton.ATTN_BRANCHES) > (0 if semiring == "maxabs" else -float("inf"))
        # a branch's mean is over the tokens with a path through it, in either semiring
        for b in semitriton.ATTN_BRANCHES:
            vals = [v for v in a.branches.attention[r["layer"]][b][0].tolist() if v != none]
            assert r[b] == (pytest.approx(sum(vals) / len(vals), rel=1e-12) if vals else -float("inf"))
    only_none = a.layer_table(tokens=[3, 4])
    assert all(r[f"frac_{b}"] != r[f"frac_{b}"] for r in only_none for b in semitriton.ATTN_BRANCHES)   # NaN
    summary = summarize([PairResult(None, a, True, "logit")])
    for r, lt in zip(summary["branches"]["subject"], a.layer_table(tokens=[1, 4])):
        assert r["tokens"] == 2
        assert sum(r[f"frac_{b}"] for b in semitriton.ATTN_BRANCHES) == pytest.approx(1.0)
        # the branch most top paths take, with its share (not the branch of the largest mean)
        share = max(r[f"frac_{b}"] for b in semitriton.ATTN_BRANCHES)
        assert r["taken_share"] == share and r[f"frac_{r['most_taken']}"] == share
        assert [r[b] for b in semitriton.ATTN_BRANCHES] == pytest.approx([lt[b] for b in semitriton.ATTN_BRANCHES])
    plot_branch_fractions(only_none, tmp_path / "f.png")
    plot_branch_weights({"subject": summary["branches"]["subject"]}, tmp_path / "w.png")
    fig = plot_token_heatmap(a, tmp_path / "h.png")
    lo, hi = fig.axes[0].images[0].get_clim()
    assert -30 < lo <= hi < 30                  # no-path cells are blank, not a floor that stretches the scale
    assert ">-<" in a.to_html()


def test_encoder_decoder_report_keeps_the_layers_on_the_input_positions():
    """T5 analysed at its encoder embeddings: the decoder layers run along the
    decoder's positions, so the per-token tables leave them out (with a
    warning) at any decoder length; at="inputs" reads every layer per input
    token."""
    import transformers as t
    torch.manual_seed(0)
    cfg = t.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                     decoder_start_token_id=0)
    m = semitriton.patch(t.T5ForConditionalGeneration(cfg).eval())
    for enc_len, dec_len in ((5, 3), (3, 5), (4, 4)):
        emb = m.get_input_embeddings()(torch.arange(3, 3 + enc_len)[None]).detach().requires_grad_()
        lg = m(inputs_embeds=emb, decoder_input_ids=torch.arange(10, 10 + dec_len)[None]).logits
        score = lg[0, -1, 5] - lg[0, -1, 6]
        toks = [f"e{i}" for i in range(enc_len)]
        with pytest.warns(UserWarning, match="not on the input's positions"):
            a = analyze(score, emb, tokens=toks, k=1)
        assert all(m_.startswith("encoder.") for m_ in a.branches.modules.values()) and len(a.branches.layers) == 2
        assert len(a.token_table()) == enc_len and len(a.layer_table()) == 2
        assert "<svg" in a.to_html()
    per_token = analyze(score, emb, tokens=toks, k=1, at="inputs")
    assert len(per_token.branches.layers) == 4
    assert all(tuple(per_token.branches.total[L].shape) == (1, enc_len) for L in per_token.branches.layers)
    assert len(per_token.token_table()) == enc_len
    # the top path crosses from the encoder's block 1 into the decoder's blocks, also numbered 0 and 1:
    # each stack's layers are milestones of their own, labelled by side
    from semitriton.report.analysis import _layer_of, milestone_label
    (path,) = a.paths
    visited = []
    for s in path.steps:
        key = (s.module.split(".")[0], _layer_of(s.module))
        if key[1] is not None and (not visited or visited[-1] != key):
            visited.append(key)
    ms = a.milestones(path)
    assert [(m_["side"], m_["layer"]) for m_ in ms[1:-1]] == visited
    assert visited[0] == ("encoder", 0) and visited[-1] == ("decoder", 1) and ("encoder", 1) in visited
    labels = [milestone_label(m_) for m_ in ms]
    assert labels[0] == "in" and labels[-1] == "out" and "enc L1" in labels and "dec L1" in labels
    assert "dec L1" in a.to_html()


def test_layer_numbers_of_module_names():
    from semitriton.report.analysis import _layer_of
    assert _layer_of("model.layers.3.self_attn.q_proj") == 3
    assert _layer_of("model.layers.3.block_sparse_moe.experts.5.w1") == 3          # not the expert
    assert _layer_of("encoder.block.1.layer.0.SelfAttention.q") == 1                # T5: the block
    assert _layer_of("decoder.block.2.layer.2.DenseReluDense.wo") == 2
    assert _layer_of("transformer.h.7.attn.c_attn") == 7
    assert _layer_of("bert.encoder.layer.4.attention.self.query") == 4
    assert _layer_of("models.0.model.layers.6.mlp") == 6                             # inside a wrapper's list
    assert _layer_of("encoder.albert_layer_groups.0.albert_layers.1.attention") == 1
    assert _layer_of("lm_head") is None


def test_bert2bert_decoder_layers_are_told_from_the_encoder_ones():
    """An EncoderDecoderModel of two BERTs names its decoder layers
    decoder.bert.encoder.layer.N: they are the decoder's (left out at the
    encoder's positions), not the encoder's."""
    import transformers as t
    torch.manual_seed(0)
    enc = t.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32)
    dec = t.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, is_decoder=True, add_cross_attention=True)
    cfg = t.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    m = semitriton.patch(t.EncoderDecoderModel(config=cfg).eval())
    emb = m.get_input_embeddings()(torch.arange(3, 7)[None]).detach().requires_grad_()
    lg = m(inputs_embeds=emb, decoder_input_ids=torch.arange(10, 17)[None]).logits
    with pytest.warns(UserWarning, match="not on the input's positions"):
        a = analyze(lg[0, -1, 5] - lg[0, -1, 6], emb, tokens=list("abcd"), k=1)
    assert a.branches.modules and all(v.startswith("encoder.") for v in a.branches.modules.values())


def test_analyze_checks_its_semiring_and_k_first():
    from hf_models import build, embeds_and_output
    model = semitriton.patch(build("llama", "sdpa"))
    emb, score = embeds_and_output(model, "llama", torch.tensor([[3, 5, 7]]))
    assert len(analyze(score[0], emb, semiring="max").paths) == 1          # k defaults to 1 for max
    assert len(analyze(score[0], emb, semiring=semitriton.semirings.Max()).paths) == 1
    assert len(analyze(score[0], emb).paths) == 4                          # and to 4 for maxabs
    with pytest.raises(ValueError, match="k=2 with semiring='max'"):
        analyze(score[0], emb, semiring="max", k=2)
    with pytest.raises(ValueError, match="semiring='entropy'"):
        analyze(score[0], emb, semiring="entropy")


def _same_analysis(a, alone):
    """A batch example's analysis reads like the example analysed alone."""
    assert a.tokens == alone.tokens
    for name, v in alone.stats.items():
        torch.testing.assert_close(torch.tensor(a.stats[name]), torch.tensor(v), rtol=1e-9, atol=1e-12)
    assert [r[f"L{L}"] for r in a.token_table() for L in a.branches.layers] == \
        [r[f"L{L}"] for r in alone.token_table() for L in alone.branches.layers]
    for x, y in zip(a.layer_table(), alone.layer_table()):
        assert x == pytest.approx(y, rel=1e-9, nan_ok=True)
    assert [p.weight for p in a.paths] == pytest.approx([p.weight for p in alone.paths], rel=1e-9)
    for p, q in zip(a.paths, alone.paths):
        assert a.source_token(p) == alone.source_token(q)
        assert a.milestones(p) == alone.milestones(q)


@pytest.mark.parametrize("side", ["left", "right"])
def test_analyze_batch_with_padding_equals_each_example_alone(side):
    """Each example of a padded batch reads as if analysed alone: left padding
    through ``attention_mask`` (positions and path milestones shifted), right
    padding through ``lengths`` or the mask; trimming positions that reach
    the output (``lengths`` on a left-padded batch) is an error."""
    from hf_models import build
    from semitriton.report import analyze_batch
    model = semitriton.patch(build("llama", "sdpa", dtype=torch.float64))
    E = model.get_input_embeddings()
    seqs = [torch.tensor([21, 22, 23, 24, 25, 26]), torch.tensor([11, 12, 13, 14])]
    T = 6
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[b, sl], mask[b, sl] = s, 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    emb = E(ids).detach().requires_grad_()
    lo = model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits
    last = [T - 1, T - 1] if side == "left" else [len(s) - 1 for s in seqs]
    score = torch.stack([lo[b, last[b], 7] - lo[b, last[b], 9] for b in range(2)])
    toks = [[f"t{int(x)}" for x in s] for s in seqs]
    variants = [dict(attention_mask=mask)] + ([dict(lengths=[6, 4])] if side == "right" else [])
    for v in variants:
        batch = analyze_batch(score, emb, tokens=toks, k=3, heads=True, **v)
        for b, s in enumerate(seqs):
            e1 = E(s[None]).detach().requires_grad_()
            l1 = model(inputs_embeds=e1).logits
            alone = analyze(l1[0, -1, 7] - l1[0, -1, 9], e1, tokens=toks[b], k=3, heads=True)
            _same_analysis(batch[b], alone)
            back = Analysis.from_json(batch[b].to_json())
            assert (back.offset, back.seq_len) == (batch[b].offset, batch[b].seq_len)
            assert [back.milestones(p) for p in back.paths] == [batch[b].milestones(p) for p in batch[b].paths]
    if side == "left":
        with pytest.raises(ValueError, match="left-padded"):
            analyze_batch(score, emb, tokens=toks, lengths=[6, 4], k=0)
    holes = mask.clone()
    holes[0, 2] = 0
    with pytest.raises(ValueError, match="one run of consecutive positions"):
        analyze_batch(score, emb, attention_mask=holes, k=0)


def test_json_round_trip(analysis, tmp_path):
    a, _, _ = analysis
    p = tmp_path / "a.json"
    a.to_json(p)
    b = Analysis.from_json(p)
    assert b.to_dict() == json.loads(json.dumps(a.to_dict()))
    assert b.paths[0].weight == a.paths[0].weight
    assert torch.equal(b.branches.top_branch(1), a.branches.top_branch(1))


def test_plots_and_html(analysis, tmp_path):
    a, _, _ = analysis
    for fn, arg in ((plot_token_heatmap, a), (plot_branch_fractions, a.layer_table()),
                    (plot_branch_weights, {"all": a.layer_table(), "subject": a.layer_table([1])})):
        out = tmp_path / (fn.__name__ + ".png")
        fn(arg, out)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = a.to_html("report")
    assert page.startswith("<!doctype html>") and "<svg" in page and "cabinet" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")   # self-contained
    rep = report_html("SVA", [("summary", "<p>ok</p>")], [a, a])
    assert rep.count("<details") >= 2


@pytest.mark.parametrize("live", ["query", "key", "value"])
def test_milestones_read_the_branch_off_the_attention_operand(live):
    """With one fused q/k/v projection (GPT-2's c_attn) the q, k and v steps
    share module, shape and index: the branch must come from the operand the
    path leaves attention by. Only the ``live`` third of c_attn reads x (the
    other two are bias only), so every path through attention takes that
    branch — also through the diagonal score S[i, i]."""
    import torch.nn.functional as F
    from torch import nn
    from semitriton.report.analysis import path_milestones
    torch.manual_seed(0)
    D, T = 4, 3

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

        def forward(self, x):
            q, k, v = (t.view(1, T, 1, D).transpose(1, 2) for t in self.c_attn(x).split(D, dim=2))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(o.transpose(1, 2).reshape(1, T, D))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.ModuleList([Attn()])
            self.head = nn.Linear(D, 1)

        def forward(self, x):
            return self.head(x + self.h[0](x))[0, -1, 0]

    m = Model().double()
    with torch.no_grad():
        for i, name in enumerate(("query", "key", "value")):
            if name != live:
                m.h[0].c_attn.weight[i * D:(i + 1) * D].zero_()
    for p in m.parameters():
        p.requires_grad_(False)
    semitriton.track(m)
    x = torch.randn(1, T, D, dtype=torch.float64, requires_grad=True)
    paths = semitriton.top_paths(m(x), x, k=16)
    through = [p for p in paths if any(s.op.startswith("attention.") for s in p.steps)]
    assert through
    if live == "key":           # the case a position test gets wrong: a key path into S[i, i]
        assert any(s.index[2] == s.index[3] for p in through for s in p.steps if s.op == "attention.scores")
    for p in through:
        (branch,) = [ms["branch"] for ms in path_milestones(p, T) if ms["layer"] == 0]
        assert branch == live
        entry = next(s for s in p.steps if s.op in ("attention.scores", "attention.values"))
        assert entry.operand == live[0]
        assert semitriton.PathStep.from_dict(entry.to_dict()) == entry


def test_tokens_must_match_the_positions(analysis):
    _, score, emb = analysis
    with pytest.raises(ValueError, match="2 entries for 5 positions"):
        analyze(score[0], emb, tokens=["The", " keys"], k=1)


def test_no_path_values_are_strict_json_and_read_back(tmp_path):
    """A token with no path to the score reads log flow -inf (and the signed
    top path -inf): written as null (valid JSON for browsers), read as -inf."""
    from hf_models import build
    model = semitriton.patch(build("llama", "sdpa", dtype=torch.float64))
    emb = model.get_input_embeddings()(torch.tensor([[3, 5, 7, 9, 11]])).detach().requires_grad_()
    logits = model(inputs_embeds=emb).logits
    score = logits[0, 2, 7] - logits[0, 2, 3]                 # causal: positions 3, 4 have no path
    for semiring in ("maxabs", "max"):
        a = analyze(score, emb, k=1, semiring=semiring)
        assert a.stats["log_flow"][4] == float("-inf")
        s = a.to_json()
        json.loads(s, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
        b = Analysis.from_json(s)
        assert b.stats["log_flow"] == a.stats["log_flow"] and b.stats["top_path"] == a.stats["top_path"]
        if a.branches is not None:
            assert torch.equal(b.branches.total[0], a.branches.total[0])


def test_a_model_without_readable_attention_layers_still_gets_a_report_and_is_told_why():
    """A model with no q/k/v layers (here a plain MLP stack) has no branch
    tables; the rest of the analysis is there, and a warning says why."""
    torch.manual_seed(0)
    model = semitriton.patch(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)))
    emb = torch.randn(1, 3, 4, requires_grad=True)
    score = model(emb)[0, -1, 0]
    with pytest.warns(UserWarning, match="no branch tables: no attention layers"):
        a = analyze(score, emb, k=1)
    assert a.branches is None and len(a.stats["entropy"]) == 3 and a.paths


def test_table_cells_keep_tokens_that_look_like_numbers():
    """Only numbers are rounded: a token such as "007", " 1.50" or "Infinity"
    is shown as it is (left cells keep their leading spaces), and a cell
    without a class carries no empty class attribute."""
    from semitriton.report.html import table
    page = table([{"token": t, "v": 1234.5678} for t in ("007", " 1.50", "Infinity", "1_000", "<b>")],
                 left=("token",))
    for cell in ("<td class=l>007</td>", "<td class=l> 1.50</td>", "<td class=l>Infinity</td>",
                 "<td class=l>1_000</td>", "<td class=l>&lt;b&gt;</td>", "<td>1.23e+03</td>"):
        assert cell in page
    assert "class=>" not in page


def test_plots_leave_the_users_matplotlib_state_alone(tmp_path):
    """The plot functions return figures without going through pyplot: the
    backend a notebook chose stays, and pyplot's figure list is unchanged."""
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    import matplotlib.pyplot as plt
    from semitriton.report import plot_branch_fractions
    before, figs = matplotlib.get_backend(), plt.get_fignums()
    rows = [{"layer": 0, "frac_query": 0.1, "frac_key": 0.2, "frac_value": 0.3, "frac_skip": 0.4}]
    try:
        matplotlib.use("pdf")                   # a backend the user chose (Agg is what the plots used to force)
        fig = plot_branch_fractions(rows, tmp_path / "f.png")
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert isinstance(fig, Figure) and (tmp_path / "f.png").stat().st_size > 0
    assert plt.get_fignums() == figs


def test_left_padded_rotary_batch_needs_position_ids():
    """transformers does not derive positions from the mask: a left-padded
    example of a RoPE model then sits at shifted positions, where the score
    is the same but the cos/sin edges are not. analyze_batch warns (patched
    model); with position_ids from the mask the tables equal the example
    analysed alone."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = semitriton.patch(transformers.LlamaForCausalLM(cfg).eval())
    seqs = [[5, 6, 7, 8, 9], [11, 12, 13]]
    ids = torch.tensor([seqs[0], [0, 0] + seqs[1]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    e1 = model.get_input_embeddings()(torch.tensor([seqs[1]])).detach().requires_grad_()
    l1 = model(inputs_embeds=e1).logits
    alone = analyze(l1[0, -1, 3] - l1[0, -1, 4], e1)
    for pos in (None, (mask.cumsum(-1) - 1).clamp(min=0)):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        lg = model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).logits
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            batch = analyze_batch(lg[:, -1, 3] - lg[:, -1, 4], emb, attention_mask=mask)
        shifted = [str(m.message) for m in w if "rotary position 0" in str(m.message)]
        assert batch[1].score == pytest.approx(alone.score, rel=1e-5)
        diff = max(abs(x - y) for k in alone.stats for x, y in zip(batch[1].stats[k], alone.stats[k]))
        if pos is None:
            assert shifted and shifted[0].startswith("examples [1] are left-padded") and diff > 1e-3
        else:
            assert not shifted and diff < 1e-4


def test_sva_summary_names_the_branch_most_top_paths_take_first_at_a_tie():
    """Two subject tokens, one whose top path takes value and one skip:
    a 0.5/0.5 split names value (the first of query, key, value, skip), and
    skip's larger mean weight does not make it the branch taken."""
    from semitriton.sva.run import PairResult, summarize
    t = lambda *xs: torch.tensor([list(xs)], dtype=torch.float64)      # noqa: E731
    br = semitriton.BranchAttribution("maxabs", [0], {0: {"query": t(0.1, 0.1), "key": t(0.1, 0.1),
                                                          "value": t(0.9, 0.2), "skip": t(0.3, 5.0)}})
    a = Analysis(tokens=["The", "keys"], score=1.0, stats={"entropy": [0.5, 0.7]}, branches=br,
                 spans={"subject": [0, 1]})
    (row,) = summarize([PairResult(None, a, True, "logit")])["branches"]["subject"]
    assert (row["most_taken"], row["taken_share"]) == ("value", 0.5)
    assert row["skip"] > row["value"]
