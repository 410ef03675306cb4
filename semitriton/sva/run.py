"""Scoring minimal pairs and analysing them with one semiring pass each.

A pair is scored by the language model's preference for the correct verb:
``logit(target) - logit(foil)`` at the next-token position (causal LMs) or
at a [MASK] placed after the prefix (masked LMs) when both forms are single
tokens; otherwise the difference of the forms' log-probabilities (causal LMs
only). That score is the output of the semiring passes; the inputs are the
prefix's token embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..errors import SemitritonError
from ..report.analysis import Analysis, analyze_batch
from .templates import MinimalPair, token_spans


class ScoringError(SemitritonError):
    """An input cannot be scored (e.g. a form is not a single token)."""


@dataclass
class Encoded:
    ids: list                 # token ids of the model input
    tokens: list              # their strings
    offsets: list             # character offsets into the prefix
    position: int             # where the next-token / mask logits are read
    target_ids: list
    foil_ids: list
    method: str               # "logit" | "logprob"
    spans: dict = field(default_factory=dict)


def _ids(tok, text: str) -> list:
    return list(tok(text, add_special_tokens=False).input_ids)


def word_ids(tok, word: str, prefix: str = "") -> list:
    """The tokens of ``word`` as the next space-separated word after
    ``prefix``: what a masked LM predicts at a mask that follows a space
    (" are" is 'Ġare' for a byte-level BPE such as RoBERTa's, 'are' for
    WordPiece). Read in context (the tokens the word adds to the prefix),
    else from " word" alone."""
    word = word.strip()
    if not word:
        return []
    if prefix.strip():
        pre, full = _ids(tok, prefix), _ids(tok, f"{prefix} {word}")
        if full[:len(pre)] == pre:
            return full[len(pre):]
    return _ids(tok, " " + word)


#: families whose position ids start after the padding index (max_position_embeddings counts those)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "data2vec-text", "xmod")


def _max_positions(cfg) -> Optional[int]:
    limit = getattr(cfg, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    if getattr(cfg, "model_type", "") in _OFFSET_POSITIONS and isinstance(getattr(cfg, "pad_token_id", None), int):
        limit -= cfg.pad_token_id + 1
    return limit


def check_forms(tok, kind: str, prefix: str, target: str, foil: str) -> tuple:
    """The target's and the foil's token ids for a ``kind`` ("causal" or
    "masked") LM, or ScoringError where the input cannot be scored; needs the
    tokenizer only (so a command can refuse an input before the weights load)."""
    if not prefix.strip():
        raise ScoringError("the text is empty: there is no position to score")
    if kind == "masked":
        t_ids, f_ids = word_ids(tok, target, prefix), word_ids(tok, foil, prefix)
        if len(t_ids) != 1 or len(f_ids) != 1:
            bad = target if len(t_ids) != 1 else foil
            raise ScoringError(f"{bad!r} is not a single token for this masked LM (it splits into "
                               f"{len(t_ids) if bad == target else len(f_ids)}); choose single-token forms")
        unk = getattr(tok, "unk_token_id", None)
        for word, w_ids in ((target, t_ids), (foil, f_ids)):
            if unk is not None and w_ids[0] == unk:
                raise ScoringError(f"{word!r} is not in this masked LM's vocabulary (it reads as "
                                   f"{tok.unk_token}); choose a word it knows")
        if t_ids == f_ids:
            raise ScoringError("the target and the foil are the same token")
        if tok.mask_token and tok.mask_token in prefix:
            raise ScoringError(f"the text contains the mask token {tok.mask_token}: the tool appends the one "
                               "it scores")
    else:
        t_ids, f_ids = _ids(tok, target), _ids(tok, foil)
        if not t_ids or not f_ids:
            raise ScoringError("the target and the foil must not be empty")
        if t_ids == f_ids:
            raise ScoringError("the target and the foil are the same tokens")
    return t_ids, f_ids


def encode(loaded, prefix: str, target: str, foil: str, pair: Optional[MinimalPair] = None) -> Encoded:
    """Tokenise one input and decide how to score it."""
    tok = loaded.tokenizer
    t_ids, f_ids = check_forms(tok, loaded.kind, prefix, target, foil)
    if loaded.kind == "masked":
        text = f"{prefix} {tok.mask_token}"
        enc = tok(text, return_offsets_mapping=True)
        ids = list(enc.input_ids)
        pos = ids.index(loaded.mask_token_id)
        method = "logit"
    else:
        enc = tok(prefix, return_offsets_mapping=True)
        ids = list(enc.input_ids)
        if not ids:
            raise ScoringError("the text has no tokens: there is no position to score")
        pos = len(ids) - 1
        method = "logit" if len(t_ids) == 1 and len(f_ids) == 1 else "logprob"
    limit = _max_positions(loaded.model.config)
    needed = len(ids) + (max(len(t_ids), len(f_ids)) if method == "logprob" else 0)   # + the continuation
    if limit is not None and needed > limit:
        raise ScoringError(f"the text is {needed} tokens long (with the scored continuation); this model "
                           f"reads at most {limit}")
    offsets = [tuple(o) for o in enc.offset_mapping]
    tokens = _token_texts(tok, ids, offsets, text if loaded.kind == "masked" else prefix)
    spans = token_spans(pair, offsets) if pair is not None else {}
    return Encoded(ids, tokens, offsets, pos, t_ids, f_ids, method, spans)


def _token_texts(tok, ids, offsets, text: str) -> list:
    """Each token as text. A byte-level token holding part of a multi-byte
    character decodes to U+FFFD on its own: it shows the characters of the
    text its offsets cover instead (the split character, on each of its
    tokens)."""
    out = []
    for t, (a, b) in zip(tok.convert_ids_to_tokens(ids), offsets):
        s = tok.convert_tokens_to_string([t])
        if "\ufffd" in s and 0 <= a < b <= len(text) and "\ufffd" not in text[a:b]:
            s = text[a:b]
        out.append(s)
    return out


def _score_logits(logits, position, t, f):
    return logits[position, t[0]] - logits[position, f[0]]


def forward_scores(loaded, batch: Sequence[Encoded], device) -> tuple:
    """Embeddings [B, T, D] (a leaf that requires grad; right-padded) and the
    scores [B] (each depending only on its own row)."""
    model, tok = loaded.model, loaded.tokenizer
    emb_layer = model.get_input_embeddings()
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    if any(e.method == "logprob" for e in batch):
        if len(batch) != 1:
            raise ValueError("log-probability scoring runs one example at a time")
        return _forward_logprob(loaded, batch[0], device)
    T = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), T), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for b, e in enumerate(batch):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        mask[b, : len(e.ids)] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        emb = emb_layer(ids)
    emb = emb.detach().clone().requires_grad_()
    logits = model(inputs_embeds=emb, attention_mask=mask).logits
    scores = torch.stack([_score_logits(logits[b], e.position, e.target_ids, e.foil_ids)
                          for b, e in enumerate(batch)])
    return emb, scores


def _forward_logprob(loaded, e: Encoded, device) -> tuple:
    """Σ log p(target tokens | prefix) - Σ log p(foil tokens | prefix); the prefix
    embeddings are one leaf shared by both continuations (fan-out)."""
    model = loaded.model
    emb_layer = model.get_input_embeddings()
    with torch.no_grad():
        pe = emb_layer(torch.tensor([e.ids], device=device))
    prefix = pe.detach().clone().requires_grad_()
    total = []
    for cont in (e.target_ids, e.foil_ids):
        with torch.no_grad():
            ce = emb_layer(torch.tensor([cont], device=device))
        x = torch.cat([prefix, ce], 1)
        lp = torch.log_softmax(model(inputs_embeds=x).logits[0].float(), -1)
        start = len(e.ids) - 1
        total.append(sum(lp[start + i, t] for i, t in enumerate(cont)))
    return prefix, (total[0] - total[1]).reshape(1)


@dataclass
class PairResult:
    pair: Optional[MinimalPair]
    analysis: Analysis
    correct: bool
    method: str


def analyse(loaded, items: Sequence[tuple], device, batch_size: int = 8, k: int = 1, heads: bool = False,
            semiring: str = "maxabs", progress: Optional[Callable] = None) -> list:
    """``items``: [(pair or None, prefix, target, foil)]. Returns PairResults in
    order; ``progress(n)`` is called after each batch."""
    encoded = [(item, encode(loaded, item[1], item[2], item[3], item[0])) for item in items]
    batches, cur = [], []
    for it in encoded:
        if it[1].method == "logprob":
            batches.append([it])
            continue
        cur.append(it)
        if len(cur) == batch_size:
            batches.append(cur)
            cur = []
    if cur:
        batches.append(cur)
    results = []
    for chunk in batches:
        encs = [e for _, e in chunk]
        emb, scores = forward_scores(loaded, encs, device)
        descr = [f"{it[1]}|{it[2]!r} vs {it[3]!r}" for it, _ in chunk]
        metas = [{"method": e.method, "target": it[2], "foil": it[3]} for it, e in chunk]
        analyses = analyze_batch(scores, emb, [e.tokens for e in encs], [len(e.ids) for e in encs], k=k,
                                 heads=heads, descriptions=descr, spans=[e.spans for e in encs],
                                 metas=metas, semiring=semiring)
        for (item, e), a in zip(chunk, analyses):
            if e.method == "logprob" and a.branches is not None:
                a.branches = a.branches.merge_calls()      # the target and the foil pass: one table per layer
            if item[0] is not None:
                a.meta.update({"condition": item[0].condition, "subject_number": item[0].subject_number,
                               "attractor_number": item[0].attractor_number})
            results.append(PairResult(item[0], a, bool(a.score > 0), e.method))
        if progress is not None:
            progress(len(chunk))
    return results


# ---- aggregation -----------------------------------------------------------------------------------
GROUPS = ("subject", "attractor", "other")


def _group_tokens(a: Analysis, group: str) -> list:
    if group == "other":
        taken = set(a.spans.get("subject", [])) | set(a.spans.get("attractor", []))
        return [t for t in range(len(a.tokens)) if t not in taken]
    return list(a.spans.get(group, []))


def summarize(results: Sequence[PairResult]) -> dict:
    """Accuracy per condition and attractor match; mean top-path weight per
    branch and layer for subject / attractor / other tokens (over the tokens
    with a path through the branch, in either semiring: maxabs's 0 and max's
    -inf, which mean "no path", are left out; -inf where no token has one);
    the fraction of those tokens whose top path takes each branch, and the
    branch most of them take ("most_taken", its "taken_share"); with
    per-head weights, the head those top paths take inside the
    attention (``_head_rows``); mean per-token entropy. Tokens from which no
    path reaches the score count in "tokens" but in no fraction
    ("most_taken" is "-" where no token has one)."""
    from ..branches import ATTN_BRANCHES, NO_PATH
    acc: dict = {}
    for r in results:
        if r.pair is None:
            continue
        p = r.pair
        cell = "no attractor" if p.attractor_number is None else (
            "attractor match" if p.attractor_match else "attractor mismatch")
        for key in ((p.condition, cell), (p.condition, "all"), ("all", cell), ("all", "all")):
            n, c = acc.get(key, (0, 0))
            acc[key] = (n + 1, c + int(r.correct))
    accuracy = [{"condition": c, "cell": cell, "n": n, "accuracy": k / n}
                for (c, cell), (n, k) in sorted(acc.items(), key=lambda kv: (kv[0][0] == "all", kv[0]))]
    branches: dict = {}
    entropy: dict = {}
    for g in GROUPS:
        sums: dict = {}
        for r in results:
            a = r.analysis
            toks = _group_tokens(a, g)
            if not toks:
                continue
            ent = entropy.setdefault(g, [])
            ent += [a.stats["entropy"][t] for t in toks]
            if a.branches is None:
                continue
            no_path = a.branches.no_path_value()
            for L in a.branches.layers:
                top = a.branches.top_branch(L)[0]
                for t in toks:
                    s = sums.setdefault(L, {"n": 0, "n_path": 0, **{b: 0.0 for b in ATTN_BRANCHES},
                                            **{f"n_{b}": 0 for b in ATTN_BRANCHES},
                                            **{f"frac_{b}": 0.0 for b in ATTN_BRANCHES}})
                    s["n"] += 1
                    s["n_path"] += int(top[t] != NO_PATH)
                    for i, b in enumerate(ATTN_BRANCHES):
                        w = float(a.branches.attention[L][b][0, t])
                        if w != no_path:            # "no path" (0 for maxabs, -inf for max) is not averaged
                            s[b] += w
                            s[f"n_{b}"] += 1
                        s[f"frac_{b}"] += float(top[t] == i)
        rows = []
        for L in sorted(sums):
            s = sums[L]
            row = {"layer": L, "tokens": s["n"]}
            for b in ATTN_BRANCHES:
                row[b] = s[b] / s[f"n_{b}"] if s[f"n_{b}"] else -math.inf
            for b in ATTN_BRANCHES:         # of the tokens from which a path reaches the score
                row[f"frac_{b}"] = s[f"frac_{b}"] / s["n_path"] if s["n_path"] else math.nan
            # the branch most of these tokens' top paths take (first in ATTN_BRANCHES' order at a tie),
            # not the largest mean: each mean is over the tokens with a path through its branch
            most = max(ATTN_BRANCHES, key=lambda b: s[f"frac_{b}"])
            row["most_taken"] = most if s["n_path"] else "-"
            row["taken_share"] = row[f"frac_{most}"]
            rows.append(row)
        branches[g] = rows
    ent_rows = [{"group": g, "tokens": len(v), "mean_entropy": sum(v) / len(v) if v else math.nan}
                for g, v in entropy.items()]
    return {"n": len(results), "accuracy": accuracy, "branches": branches,
            "heads": {g: _head_rows(results, g) for g in GROUPS}, "entropy": ent_rows}


def _head_rows(results: Sequence[PairResult], group: str) -> list:
    """Per layer with per-head weights: of the ``group`` tokens whose top path
    enters the attention (top branch query, key or value), how many, the
    (branch, head) most of them take ("value/h3") and its share, and the
    runner-up."""
    from ..branches import ATTN_BRANCHES
    counts: dict = {}
    for r in results:
        a = r.analysis
        if a.branches is None or not a.branches.heads:
            continue
        toks = _group_tokens(a, group)
        for L in a.branches.layers:
            head = a.branches.top_head(L)
            if head is None:
                continue
            top = a.branches.top_branch(L)[0]
            c = counts.setdefault(L, {})
            for t in toks:
                if 0 <= int(top[t]) < 3:
                    label = f"{ATTN_BRANCHES[int(head[0, t, 0])]}/h{int(head[0, t, 1])}"
                    c[label] = c.get(label, 0) + 1
    rows = []
    for L in sorted(counts):
        ranked = sorted(counts[L].items(), key=lambda kv: (-kv[1], kv[0]))
        n = sum(counts[L].values())
        row = {"layer": L, "tokens": n, "top_head": ranked[0][0] if ranked else "-",
               "share": ranked[0][1] / n if n else math.nan,
               "second": ranked[1][0] if len(ranked) > 1 else "-",
               "second_share": ranked[1][1] / n if len(ranked) > 1 else math.nan}
        rows.append(row)
    return rows
