"""The paper's synthetic experiment at reduced scale: structure of the branch
table and its consistency with a plain maxabs pass."""

import pytest
import torch

import semitriton
from semitriton.branches import ATTN_BRANCHES
from semitriton.experiments import first_token as task
from semitriton.experiments.first_token_paths import GROUPS, branch_means, format_table

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, _, test, metrics = task.trained_model(cache_dir=str(tmp_path_factory.mktemp("ft")), quick=True,
                                                 progress=False, log=lambda *a: None)
    return model, test, metrics


def test_branch_table(trained):
    model, test, metrics = trained
    assert metrics["eval_accuracy"] >= 0.95
    res = branch_means(model, test, n=64, batch_size=32)
    assert res["n_examples"] == 64 and res["accuracy"] >= 0.9
    g = res["groups"]
    assert g["first"]["tokens"] == 64 and g["repeated"]["tokens"] == 64 and g["other"]["tokens"] == 64 * 8
    # the classifier reads position 0: every other position reaches it only as a key or value
    for grp in ("repeated", "other"):
        assert g[grp]["mean_weight"]["query"] == 0 and g[grp]["mean_weight"]["skip"] == 0
        assert g[grp]["mean_weight"]["key"] > 0 and g[grp]["mean_weight"]["value"] > 0
    assert all(g["first"]["mean_weight"][b] > 0 for b in ATTN_BRANCHES)
    for grp in GROUPS:
        assert sum(g[grp]["top_branch_fraction"].values()) == pytest.approx(1.0)
    text = format_table(res)
    assert "[0.270]" in text and "repeated" in text


def test_branch_weights_match_plain_maxabs_per_token(trained):
    """Every path crosses the layer-0 branch point once: the max over branches
    equals the per-token maxabs readout at the input embeddings."""
    model, test, _ = trained
    semitriton.patch(model)
    ids, labels = test.input_ids[:16], test.labels[:16]
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    gold = model(inputs_embeds=emb).logits.gather(1, labels[:, None])[:, 0]
    attr = semitriton.branch_attribution(gold, emb, at="inputs")
    best = torch.stack([attr.attention[0][b] for b in ATTN_BRANCHES]).amax(0)
    (m,) = semitriton.grad(gold, emb, semiring="maxabs")
    torch.testing.assert_close(best, m.amax(-1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("semiring", ["maxabs", "max"])
def test_branch_means_average_only_tokens_with_a_path(trained, monkeypatch, semiring):
    """A token without a path through a branch (the semiring's zero) is left out
    of that branch's mean, in both semirings, as in sva's tables; a branch that
    no token of a group reaches prints "no path"."""
    from semitriton.experiments import first_token_paths as ftp

    model, test, _ = trained
    real = ftp.branch_attribution
    seen = []

    def cut_some_keys(*args, **kwargs):              # the first two examples' key branch reads "no path"
        attr = real(*args, **kwargs)
        L = attr.layers[0]
        attr.attention[L]["key"][:2] = attr.no_path_value()
        seen.append({b: attr.attention[L][b].clone() for b in ATTN_BRANCHES})
        return attr

    monkeypatch.setattr(ftp, "branch_attribution", cut_some_keys)
    res = branch_means(model, test, n=8, batch_size=8, semiring=semiring)
    (w,) = seen
    rep = test.repeat_position[test.labels == 1][:8]
    g = res["groups"]
    for b in ATTN_BRANCHES:
        first = w[b][:, 0]
        keep = first != ftp.no_path_value(semiring)
        assert g["first"]["tokens_with_path"][b] == int(keep.sum())
        assert g["first"]["mean_weight"][b] == pytest.approx(float(first[keep].mean()), rel=1e-6)
        repeated = w[b][torch.arange(8), rep]
        keep = repeated != ftp.no_path_value(semiring)
        if keep.any():
            assert g["repeated"]["mean_weight"][b] == pytest.approx(float(repeated[keep].mean()), rel=1e-6)
        else:
            assert g["repeated"]["mean_weight"][b] == ftp.no_path_value(semiring)
    assert g["first"]["tokens_with_path"]["key"] == 6 and g["repeated"]["tokens_with_path"]["query"] == 0
    text = format_table(res)
    assert text.count("no path") == 4            # query and skip of the repeated and other tokens
