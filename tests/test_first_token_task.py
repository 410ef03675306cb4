"""The FirstTokenRepeatedOnce task (Du et al., ACL 2023): data invariants, quick training, cache."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("transformers")

from semitriton.experiments import first_token as ft  # noqa: E402


def _check_invariants(d: ft.FirstTokenData, n: int, length: int = 10, vocab: int = 20):
    assert d.input_ids.shape == (n, length) and d.input_ids.dtype == torch.long
    assert d.labels.shape == (n,) and d.labels.dtype == torch.long
    assert d.repeat_position.shape == (n,) and d.repeat_position.dtype == torch.long
    assert int(d.input_ids.min()) >= 1 and int(d.input_ids.max()) <= vocab - 1  # 0 never used
    assert set(d.labels.unique().tolist()) <= {0, 1}
    assert int(d.labels.sum()) == n // 2  # exactly half positive
    first = d.input_ids[:, :1]
    later_hits = d.input_ids[:, 1:] == first  # [n, length-1]
    count = later_hits.sum(1)
    pos, neg = d.labels == 1, d.labels == 0
    assert (count[pos] == 1).all() and (count[neg] == 0).all()
    # the single later occurrence is at repeat_position (1..length-1); negatives have -1
    rp = d.repeat_position
    assert ((rp[pos] >= 1) & (rp[pos] <= length - 1)).all() and (rp[neg] == -1).all()
    assert (later_hits[pos].int().argmax(1) + 1 == rp[pos]).all()
    rows = torch.nonzero(pos).squeeze(1)
    assert (d.input_ids[rows, rp[rows]] == d.input_ids[rows, 0]).all()


@pytest.mark.parametrize("n,seed", [(10_000, 0), (2000, 1), (8, 3)])
def test_dataset_invariants(n, seed):
    _check_invariants(ft.make_dataset(n, seed=seed), n)


def test_dataset_spread():
    d = ft.make_dataset(10_000)
    pos = d.labels == 1
    # repeat positions cover 1..9, first tokens cover 1..19, labels are shuffled (not blocked)
    assert set(d.repeat_position[pos].tolist()) == set(range(1, 10))
    assert set(d.input_ids[:, 0].tolist()) == set(range(1, 20))
    assert 0.4 < d.labels[:5000].float().mean() < 0.6


def test_dataset_deterministic_per_seed():
    a, b, c = ft.make_dataset(500, seed=0), ft.make_dataset(500, seed=0), ft.make_dataset(500, seed=1)
    for f in ("input_ids", "labels", "repeat_position"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.input_ids, c.input_ids)


def test_dataset_rejects_odd_n():
    with pytest.raises(ValueError):
        ft.make_dataset(11)


def test_split():
    d = ft.make_dataset(100)
    tr, te = ft.split(d, 30)
    assert len(tr) == 70 and len(te) == 30
    assert torch.equal(torch.cat([tr.input_ids, te.input_ids]), d.input_ids)
    assert torch.equal(torch.cat([tr.repeat_position, te.repeat_position]), d.repeat_position)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_build_model(attn):
    m = ft.build_model(attn, seed=0)
    cfg = m.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.num_labels, cfg.vocab_size) == (1, 16, 2, 32, 2, 20)
    assert cfg.max_position_embeddings >= 10
    assert cfg.hidden_dropout_prob == 0 and cfg.attention_probs_dropout_prob == 0
    assert cfg._attn_implementation == attn
    assert not m.training
    m2 = ft.build_model(attn, seed=0)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    ids = ft.make_dataset(8).input_ids
    # dropout 0: train-mode and eval-mode forwards agree
    with torch.no_grad():
        a = m(input_ids=ids).logits
        m.train()
        b = m(input_ids=ids).logits
    assert torch.equal(a, b)


def test_sdpa_and_eager_agree():
    ids = ft.make_dataset(16).input_ids
    with torch.no_grad():
        a = ft.build_model("sdpa").eval()(input_ids=ids).logits
        b = ft.build_model("eager").eval()(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_quick_training_reaches_95_percent():
    q = ft.QUICK
    data = ft.make_dataset(q["n"], seed=0)
    tr, te = ft.split(data, q["n_test"])
    model = ft.build_model("sdpa", seed=0)
    t0 = time.perf_counter()
    metrics = ft.train(model, tr, epochs=q["epochs"], batch_size=q["batch_size"], lr=q["lr"],
                       weight_decay=q["weight_decay"], target_accuracy=q["target_accuracy"], eval_data=te, seed=0, progress=False,
                       log=None)
    seconds = time.perf_counter() - t0
    acc = ft.accuracy(model, te)
    print(f"\nquick training: {metrics['epochs']} epochs, {seconds:.1f}s, held-out accuracy {acc:.4f}")
    assert acc == metrics["eval_accuracy"]
    assert acc >= 0.95, metrics
    # a regression guard, not a benchmark (a few seconds when idle; other jobs on the CPUs slow it)
    assert seconds < 120, f"quick training took {seconds:.1f}s"


def test_trained_model_cache(tmp_path):
    logs = []
    t0 = time.perf_counter()
    m1, tr1, te1, met1 = ft.trained_model(cache_dir=str(tmp_path), quick=True, progress=False, log=logs.append)
    t_train = time.perf_counter() - t0
    assert met1["cached"] is False and met1["eval_accuracy"] >= 0.95
    assert len(list(tmp_path.glob("*.pt"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1

    t0 = time.perf_counter()
    m2, tr2, te2, met2 = ft.trained_model(cache_dir=str(tmp_path), quick=True, progress=False, log=logs.append)
    t_load = time.perf_counter() - t0
    print(f"\ntrained_model(quick=True): train {t_train:.1f}s, cached load {t_load:.2f}s")
    assert met2["cached"] is True
    assert {k: v for k, v in met1.items() if k != "cached"} == {k: v for k, v in met2.items() if k != "cached"}
    assert t_load < t_train / 3
    sd1, sd2 = m1.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert torch.equal(tr1.input_ids, tr2.input_ids) and torch.equal(te1.labels, te2.labels)
    assert not m2.training
    assert ft.accuracy(m2, te2) == met1["eval_accuracy"]

    # a different key (attention implementation) is a different cache entry
    m3, _, _, met3 = ft.trained_model(cache_dir=str(tmp_path), quick=True, attn="eager", progress=False, log=None)
    assert met3["cached"] is False and len(list(tmp_path.glob("*.pt"))) == 2
