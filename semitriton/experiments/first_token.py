"""The synthetic "FirstTokenRepeatedOnce" task of Du et al. (ACL 2023), "Generalizing
Backpropagation for Gradient-Based Interpretability", with a tiny BERT classifier trained on it.

Task. Sequences of ``length`` (10) tokens drawn from ``1 .. vocab-1`` (1..19; id 0 is the padding
id of the BERT config and never occurs in a sequence -- there is no [CLS] token: position 0 holds
the *first token* itself, and BERT's pooler reads position 0). An example is positive iff the
first token occurs again exactly once at a later position (1..length-1); negatives have no later
occurrence. All other positions are uniform over the tokens different from the first token, so
in a positive example the first token occurs exactly twice, in a negative one exactly once.
Exactly half of the examples are positive (``n`` must be even).

Model. ``transformers.BertForSequenceClassification``: 1 layer, hidden 16, 2 heads, intermediate
32, vocab 20, 10 positions, 1 token type, 2 labels, every dropout 0 (so train-time and eval-time
graphs agree and training is deterministic), attention implementation ``"sdpa"`` or ``"eager"``.

Usage::

    from semitriton.experiments.first_token import trained_model
    model, train, test, metrics = trained_model()            # full setting, cached on disk
    model, train, test, metrics = trained_model(quick=True)  # 2,000 examples, seconds

The trained ``state_dict`` and a JSON of its training metrics are cached under
``$XDG_CACHE_HOME/semitriton/first_token`` (or ``~/.cache/semitriton/first_token``), keyed by a
hash of the data size, seeds, model configuration and training hyperparameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = [
    "FirstTokenData", "make_dataset", "split", "build_model", "train", "accuracy", "trained_model",
    "model_config", "default_cache_dir", "FULL", "QUICK", "LENGTH", "VOCAB",
]

LENGTH = 10
VOCAB = 20

# Hyperparameters of the full setting (10,000 examples, 1,000 held out): plain Adam.
FULL = dict(n=10_000, n_test=1000, epochs=20, batch_size=128, lr=2e-3, weight_decay=0.0, target_accuracy=0.995)
# Small-scale setting for tests: 2,000 examples (500 held out). With ~80 training examples per first
# token, plain Adam tends to learn the token-matching attention for only some tokens and memorise
# the rest (held-out accuracy plateaus anywhere between 0.6 and 0.97 depending on the seed);
# decoupled weight decay (AdamW, 0.1) and a large batch/lr fix that: seeds 0..3 all reached >= 0.97
# held-out accuracy within 40-200 epochs. Seed 0 stops after ~40 epochs (a few seconds on one core).
QUICK = dict(n=2000, n_test=500, epochs=250, batch_size=256, lr=2e-2, weight_decay=0.1, target_accuracy=0.96)

# Bump when the data generator, model or training loop changes in a way that invalidates caches.
_CACHE_VERSION = 1


@dataclass
class FirstTokenData:
    input_ids: torch.LongTensor        # [N, length]
    labels: torch.LongTensor           # [N] 0/1
    repeat_position: torch.LongTensor  # [N] position of the repeat (1..length-1) for positives, -1 for negatives

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, idx) -> "FirstTokenData":
        return FirstTokenData(self.input_ids[idx], self.labels[idx], self.repeat_position[idx])


def make_dataset(n: int = 10_000, length: int = LENGTH, vocab: int = VOCAB, seed: int = 0) -> FirstTokenData:
    """``n`` examples (exactly ``n // 2`` positive, in random order), deterministic in ``seed``."""
    if n % 2:
        raise ValueError(f"n must be even (exactly half positive), got {n}")
    if length < 2 or vocab < 3:
        raise ValueError("need length >= 2 and vocab >= 3 (tokens 1..vocab-1, 0 reserved)")
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(1, vocab, (n,), generator=g)
    # Other tokens uniform over {1..vocab-1} \ {first}: draw from vocab-2 values and skip `first`.
    rest = torch.randint(1, vocab - 1, (n, length - 1), generator=g)
    rest = rest + (rest >= first[:, None]).long()
    ids = torch.cat([first[:, None], rest], dim=1)
    labels = torch.zeros(n, dtype=torch.long)
    labels[torch.randperm(n, generator=g)[: n // 2]] = 1
    pos = torch.randint(1, length, (n,), generator=g)
    repeat = torch.where(labels == 1, pos, torch.full_like(pos, -1))
    rows = torch.nonzero(labels == 1).squeeze(1)
    ids[rows, repeat[rows]] = first[rows]
    return FirstTokenData(ids, labels, repeat)


def split(data: FirstTokenData, n_test: int = 1000) -> tuple[FirstTokenData, FirstTokenData]:
    """(train, test): the last ``n_test`` examples are held out (the data is already shuffled)."""
    n = len(data)
    if not 0 < n_test < n:
        raise ValueError(f"n_test must be in 1..{n - 1}, got {n_test}")
    return data[: n - n_test], data[n - n_test:]


def model_config(attn: str = "sdpa"):
    import transformers

    if attn not in ("sdpa", "eager"):
        raise ValueError(f"attn must be 'sdpa' or 'eager', got {attn!r}")
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=LENGTH, type_vocab_size=1, num_labels=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0,
        pad_token_id=0,
    )
    cfg._attn_implementation = attn
    return cfg


def build_model(attn: str = "sdpa", seed: int = 0):
    """A freshly initialised ``BertForSequenceClassification`` (deterministic in ``seed``), in eval mode."""
    import transformers

    cfg = model_config(attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification(cfg)
    return model.eval()


@contextmanager
def _threads(n: int | None):
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def accuracy(model, data: FirstTokenData, batch_size: int = 512, num_threads: int | None = 1) -> float:
    """Fraction of ``data`` classified correctly (eval mode; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with _threads(num_threads):
            for i in range(0, len(data), batch_size):
                logits = model(input_ids=data.input_ids[i:i + batch_size]).logits
                correct += (logits.argmax(-1) == data.labels[i:i + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return correct / max(len(data), 1)


def train(model, data: FirstTokenData, epochs: int = 20, batch_size: int = 128, lr: float = 2e-3,
          target_accuracy: float = 0.995, eval_data: FirstTokenData | None = None, seed: int = 0,
          progress: bool = True, log=print, weight_decay: float = 0.0, num_threads: int | None = 1) -> dict:
    """Adam on cross-entropy (AdamW when ``weight_decay`` > 0), shuffled mini-batches
    (deterministic in ``seed``). After every epoch the accuracy on ``eval_data`` (or on ``data``
    when it is None) is measured; training stops once it reaches ``target_accuracy``. The model is left in eval mode.

    Returns {"epochs": ..., "train_accuracy": ..., "eval_accuracy": ..., "seconds": ...}
    (``eval_accuracy`` is None without ``eval_data``). Shows a tqdm progress bar when progress=True.

    ``num_threads`` (default 1) sets torch's intra-op thread count for the duration of the call:
    the model is so small that a step is pure overhead (~7 ms on one core), and with several
    threads on a busy 2-core machine a step can take 100-1000 ms. None leaves it unchanged.
    """
    from tqdm.auto import tqdm

    log = log or (lambda *a, **k: None)
    g = torch.Generator().manual_seed(seed)
    if weight_decay:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    bar = tqdm(total=epochs * steps_per_epoch, desc="first-token", unit="step", disable=not progress,
               leave=False)
    t0 = time.perf_counter()
    done = 0
    acc_train = acc_eval = None
    with _threads(num_threads):
        try:
            for epoch in range(1, epochs + 1):
                model.train()
                perm = torch.randperm(n, generator=g)
                total = 0.0
                for i in range(0, n, batch_size):
                    idx = perm[i:i + batch_size]
                    out = model(input_ids=data.input_ids[idx], labels=data.labels[idx])
                    opt.zero_grad(set_to_none=True)
                    out.loss.backward()
                    opt.step()
                    total += out.loss.item() * len(idx)
                    bar.update(1)
                model.eval()
                done = epoch
                acc_train = accuracy(model, data, num_threads=None)
                acc_eval = accuracy(model, eval_data, num_threads=None) if eval_data is not None else None
                bar.set_postfix(loss=f"{total / n:.4f}", train=f"{acc_train:.4f}",
                                eval="-" if acc_eval is None else f"{acc_eval:.4f}")
                log(f"epoch {epoch}: loss {total / n:.4f}  train acc {acc_train:.4f}"
                    + ("" if acc_eval is None else f"  held-out acc {acc_eval:.4f}"))
                if (acc_eval if acc_eval is not None else acc_train) >= target_accuracy:
                    break
        finally:
            bar.close()
            model.eval()
    return {"epochs": done, "train_accuracy": acc_train, "eval_accuracy": acc_eval,
            "seconds": time.perf_counter() - t0}


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "semitriton", "first_token")


def trained_model(cache_dir: str | None = None, attn: str = "sdpa", n: int | None = None, seed: int = 0,
                  log=print, quick: bool = False, progress: bool = True):
    """Build + train (settings ``QUICK`` if ``quick`` else ``FULL``; ``n`` overrides their data
    size), caching the trained state_dict and a small JSON of the training metrics under
    ``cache_dir`` (default :func:`default_cache_dir`), keyed by (n, seed, attn, hyperparameters);
    later calls load it instantly. Returns (model, data_train, data_test, metrics); ``metrics``
    has "epochs", "train_accuracy", "eval_accuracy", "seconds", "hparams" and "cached" (True when
    the weights were loaded rather than trained in this call). Data is regenerated
    deterministically from the seed (cheap), never cached.
    """
    log = log or (lambda *a, **k: None)
    hp = dict(QUICK if quick else FULL)
    if n is not None:
        hp["n"] = n
    data = make_dataset(hp["n"], seed=seed)
    data_train, data_test = split(data, hp["n_test"])
    model = build_model(attn, seed)

    key_src = dict(version=_CACHE_VERSION, seed=seed, attn=attn, length=LENGTH, vocab=VOCAB, **hp,
                   config={k: v for k, v in sorted(model.config.to_diff_dict().items())
                           if k not in ("transformers_version", "_attn_implementation_autoset")})
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    stem = os.path.join(cache_dir, f"{'quick' if quick else 'full'}-n{hp['n']}-s{seed}-{attn}-{key}")
    weights, meta = stem + ".pt", stem + ".json"

    if os.path.exists(weights) and os.path.exists(meta):
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
        with open(meta) as f:
            metrics = json.load(f)
        metrics["cached"] = True
        log(f"first_token: loaded cached model {weights}")
        return model, data_train, data_test, metrics

    log(f"first_token: training ({'quick' if quick else 'full'}: {hp})")
    metrics = train(model, data_train, epochs=hp["epochs"], batch_size=hp["batch_size"], lr=hp["lr"],
                    weight_decay=hp["weight_decay"], target_accuracy=hp["target_accuracy"],
                    eval_data=data_test, seed=seed, progress=progress, log=log)
    metrics["hparams"] = dict(hp, seed=seed, attn=attn)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{stem}.tmp{os.getpid()}"
    torch.save(model.state_dict(), tmp + ".pt")
    os.replace(tmp + ".pt", weights)
    with open(tmp + ".json", "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp + ".json", meta)
    log(f"first_token: {metrics['epochs']} epochs, {metrics['seconds']:.1f}s, held-out accuracy "
        f"{metrics['eval_accuracy']:.4f}; cached at {weights}")
    metrics["cached"] = False
    return model, data_train, data_test, metrics
