"""The paper's synthetic experiment, read with exact scalar-level top paths.

Du et al. (ACL 2023) trained a 1-layer BERT on FirstTokenRepeatedOnce and
back-propagated the gold-class logit with the max-product semiring; at the
attention input they report the mean top-path weight by branch: the repeated
token's top path goes through the key (about 0.27), the first token's through
the query (about 0.17, with key and skip about 0.095 each), other tokens near
zero. Here the same quantity is computed exactly: for each position of the
layer-0 attention input (the embedding LayerNorm output), the largest
|path product| to the gold logit through each branch (query, key, value,
skip), one semiring pass per batch of held-out examples.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..branches import ATTN_BRANCHES, NO_PATH, branch_attribution, no_path_value
from ..patching import patch

#: the paper's numbers (mean top-path weight by branch at the attention input)
PAPER = {
    "repeated": {"key": 0.27},
    "first": {"query": 0.17, "key": 0.095, "skip": 0.095},
    "other": {"note": "near zero"},
}
GROUPS = ("first", "repeated", "other")


def branch_means(model, data, n: int = 1000, batch_size: int = 100, semiring: str = "maxabs",
                 positives_only: bool = True, backend: Optional[str] = None, progress: bool = False,
                 at: str = "inputs") -> dict:
    """Mean top-path weight through each branch of the layer-0 attention input,
    and the fraction of tokens whose top path takes each branch, for the first
    token, the repeated token and the other tokens of ``n`` held-out examples
    (positives only by default: negatives have no repeated token). The output
    back-propagated is the gold-class logit of each example. ``at="inputs"``
    starts paths at each token's input embedding (as the paper does);
    ``"residual"`` at the attention input itself (after the embedding LayerNorm).

    A branch's mean is over the tokens with a path through it
    (``tokens_with_path``); with none it reads the semiring's no-path value
    (0 for maxabs, -inf for max). Branch fractions are over the tokens from
    which a path reaches the output (``tokens_reaching_output``)."""
    patch(model)
    model.eval()
    ids = data.input_ids
    labels = data.labels
    rep = data.repeat_position
    keep = (labels == 1) if positives_only else torch.ones_like(labels, dtype=torch.bool)
    ids, labels, rep = ids[keep][:n], labels[keep][:n], rep[keep][:n]
    emb_layer = model.get_input_embeddings()
    sums = {g: {b: 0.0 for b in ATTN_BRANCHES} for g in GROUPS}
    with_path = {g: {b: 0 for b in ATTN_BRANCHES} for g in GROUPS}   # tokens with a path through b
    fracs = {g: {b: 0 for b in ATTN_BRANCHES} for g in GROUPS}
    counts = {g: 0 for g in GROUPS}
    reached = {g: 0 for g in GROUPS}           # tokens with a path to the output
    no_path = no_path_value(semiring)          # 0 (maxabs) or -inf (max)
    correct = 0
    batches = range(0, ids.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="examples", unit="batch")
    for i0 in batches:
        bid, blab, brep = ids[i0:i0 + batch_size], labels[i0:i0 + batch_size], rep[i0:i0 + batch_size]
        with torch.no_grad():
            e = emb_layer(bid)
        emb = e.detach().clone().requires_grad_()
        logits = model(inputs_embeds=emb).logits
        correct += int((logits.argmax(-1) == blab).sum())
        gold = logits.gather(1, blab[:, None])[:, 0]          # [B]: each example its own output
        attr = branch_attribution(gold, emb, semiring=semiring, backend=backend, at=at)
        L = attr.layers[0]
        w = torch.stack([attr.attention[L][b] for b in ATTN_BRANCHES], -1)   # [B, T, 4]
        top = attr.top_branch(L)                                               # NO_PATH: none reaches the output
        T = w.shape[1]
        for b in range(w.shape[0]):
            groups = {"first": [0], "repeated": [int(brep[b])] if brep[b] > 0 else [],
                      "other": [t for t in range(1, T) if t != int(brep[b])]}
            for g, toks in groups.items():
                for t in toks:
                    counts[g] += 1
                    for j, br in enumerate(ATTN_BRANCHES):
                        v = float(w[b, t, j])
                        if v != no_path:        # a token without a path through br is not averaged
                            sums[g][br] += v
                            with_path[g][br] += 1
                    if int(top[b, t]) != NO_PATH:
                        reached[g] += 1
                        fracs[g][ATTN_BRANCHES[int(top[b, t])]] += 1
    out = {"n_examples": int(ids.shape[0]), "accuracy": correct / max(1, int(ids.shape[0])),
           "semiring": semiring, "at": at, "groups": {}}
    for g in GROUPS:
        out["groups"][g] = {"tokens": counts[g],
                            "tokens_reaching_output": reached[g],
                            "tokens_with_path": dict(with_path[g]),
                            "mean_weight": {b: sums[g][b] / with_path[g][b] if with_path[g][b] else no_path
                                            for b in ATTN_BRANCHES},
                            "top_branch_fraction": {b: fracs[g][b] / max(1, reached[g]) for b in ATTN_BRANCHES}}
    return out


def format_table(res: dict) -> str:
    """Ours beside the paper's, one row per token group."""
    start = "each token's input embedding" if res.get("at") == "inputs" else "the attention input"
    lines = [f"{res['n_examples']} held-out positive examples, accuracy {res['accuracy']:.3f}, "
             f"semiring {res['semiring']}, paths from {start}",
             "mean top-path weight by branch at the attention input (ours; paper in brackets)",
             f"{'token':<10}" + "".join(f"{b:>16}" for b in ATTN_BRANCHES) + "   top path takes"]
    for g in GROUPS:
        r = res["groups"][g]
        cells = []
        for b in ATTN_BRANCHES:
            paper = PAPER.get(g, {}).get(b)
            v = r["mean_weight"][b]
            ours = " no path" if r["tokens_with_path"][b] == 0 else f"{v:>8.3f}"
            cells.append(ours + (f" [{paper:.3f}]" if paper is not None else " " * 8))
        frac = r["top_branch_fraction"]
        best, second = sorted(frac, key=frac.get, reverse=True)[:2]
        takes = f"{best} ({frac[best]:.0%})" if frac[second] == 0 else \
            f"{best} {frac[best]:.0%}, {second} {frac[second]:.0%}"
        if not r["tokens_reaching_output"]:
            takes = "- (no path)"
        lines.append(f"{g:<10}" + "".join(f"{c:>16}" for c in cells) + f"   {takes}")
    lines.append("paper: other tokens near zero")
    return "\n".join(lines)
