"""Analysis results: tables, JSON round trip, plots and the HTML report."""

import json

import pytest
import torch

import semitriton
from semitriton.report import (Analysis, analyze, plot_branch_fractions, plot_branch_weights,
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
