"""One analysed input: per-token statistics, branch attribution, top paths."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..branches import ATTN_BRANCHES, NO_PATH, BranchAttribution, branch_attribution, branch_name
from ..engine import grad_values
from ..errors import SemitritonError, user_stacklevel
from ..jsonsafe import json_safe, none_as_neg_inf
from ..modes import outside_inference_mode, recording
from ..paths import Path, PathGraph, top_paths
from ..readouts import token_readout

STATS = {
    "entropy": "entropy of the path distribution (nats)",
    "log_flow": "log Z, total |w| path flow (log scale)",
    "top_path": "top-path weight (maxabs: largest |path product|; max: largest signed product)",
}


@dataclass
class Analysis:
    """Everything read off one input. ``stats[name][t]`` per token;
    ``branches`` per layer and branch; ``paths`` the top paths (indexed in
    the input tensor); ``spans`` named token groups (e.g. subject,
    attractor). In a padded batch, ``offset`` is the position of ``tokens[0]``
    in the input tensor (left padding) and ``seq_len`` that tensor's
    sequence length (None: ``len(tokens)``)."""

    tokens: list
    score: float
    description: str = ""
    stats: dict = field(default_factory=dict)
    branches: Optional[BranchAttribution] = None
    paths: list = field(default_factory=list)
    spans: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    offset: int = 0
    seq_len: Optional[int] = None

    # -- tables ------------------------------------------------------------------------------
    def token_table(self) -> list:
        """One row per token: the token, its per-token statistics, and per layer
        the branch taken at the attention input by the top path through the
        token's position of that layer's residual stream (branch tables
        computed with at="inputs": by the token's own top path), with the head
        where per-head weights were computed ("value/h3"); "-" where no path
        reaches the output."""
        rows = []
        tops = {}
        if self.branches is not None:
            for L in self.branches.layers:
                tops[L] = (self.branches.top_branch(L)[0], self.branches.top_head(L))
        for t, tok in enumerate(self.tokens):
            row = {"index": t, "token": tok}
            row.update({k: v[t] for k, v in self.stats.items()})
            for L, (branch, head) in tops.items():
                b = int(branch[t])
                row[f"L{L}"] = branch_name(b) + (f"/h{int(head[0, t, 1])}" if head is not None and 0 <= b < 3 else "")
            for name, idx in self.spans.items():
                row[name] = t in idx
            rows.append(row)
        return rows

    def layer_table(self, tokens: Optional[Sequence[int]] = None) -> list:
        """One row per layer: mean top-path weight per branch over ``tokens``
        (all by default) and the fraction of those tokens whose top path takes
        each branch. Tokens with no path to the output are left out of the
        fractions, and tokens with no path through a branch (maxabs reads 0,
        max -inf) out of the branch's mean (-inf when no token has one)."""
        if self.branches is None:
            return []
        toks = list(range(len(self.tokens))) if tokens is None else list(tokens)
        rows = []
        for L in self.branches.layers:
            row = {"layer": L}
            tb = self.branches.top_branch(L)[0][toks]
            reached = tb != NO_PATH
            for i, b in enumerate(ATTN_BRANCHES):
                vals = self.branches.attention[L][b][0][toks]
                vals = vals[vals != self.branches.no_path_value()]
                row[b] = float(vals.mean()) if len(vals) else (float("-inf") if toks else float("nan"))
                row[f"frac_{b}"] = float((tb[reached] == i).float().mean()) if bool(reached.any()) else float("nan")
            rows.append(row)
        return rows

    # -- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"tokens": list(self.tokens), "score": self.score, "description": self.description,
                "stats": {k: [float(x) for x in v] for k, v in self.stats.items()},
                "branches": None if self.branches is None else self.branches.to_dict(),
                "paths": [p.to_dict() for p in self.paths],
                "spans": {k: list(v) for k, v in self.spans.items()}, "meta": self.meta,
                "offset": self.offset, "seq_len": self.seq_len}

    @classmethod
    def from_dict(cls, d) -> "Analysis":
        return cls(list(d["tokens"]), d["score"], d.get("description", ""),
                   {k: none_as_neg_inf(list(v)) for k, v in d.get("stats", {}).items()},
                   None if d.get("branches") is None else BranchAttribution.from_dict(d["branches"]),
                   [Path.from_dict(p) for p in d.get("paths", [])],
                   {k: list(v) for k, v in d.get("spans", {}).items()}, d.get("meta", {}),
                   d.get("offset", 0), d.get("seq_len"))

    def to_json(self, path=None, **kw) -> str:
        s = json.dumps(json_safe(self.to_dict()), allow_nan=False, **kw)     # -inf (no path) as null
        if path is not None:
            with open(path, "w") as f:
                f.write(s)
        return s

    @classmethod
    def from_json(cls, s_or_path) -> "Analysis":
        s = s_or_path
        if not str(s).lstrip().startswith("{"):
            with open(s_or_path) as f:
                s = f.read()
        return cls.from_dict(json.loads(s))

    # -- views --------------------------------------------------------------------------------------
    def milestones(self, path: Path) -> list:
        """:func:`path_milestones` with positions counted in ``tokens``."""
        return path_milestones(path, self.seq_len or len(self.tokens), self.offset)

    def source_token(self, path: Path) -> Optional[int]:
        """The index into ``tokens`` of the token a path starts at (None: not a token)."""
        src = path.source_index
        t = int(src[1]) - self.offset if len(src) >= 2 else None
        return t if t is not None and 0 <= t < len(self.tokens) else None

    def to_html(self, title: str = "semitriton analysis") -> str:
        from .html import analysis_html
        return analysis_html(self, title)


#: the first item of one of these module lists in a name is its layer (T5's
#: block.N.layer.M is block N; an expert's number inside a layer is not a layer)
_LAYER_LIST = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")


def _layer_of(module: str) -> Optional[int]:
    """The layer number in a module's qualified name: the item of its first
    layer list (layers, layer, h, block, blocks), else its last number."""
    m = _LAYER_LIST.search(module or "")
    if m:
        return int(m.group(1))
    nums = re.findall(r"\.(\d+)(?:\.|$)", module or "")
    return int(nums[-1]) if nums else None


def _side(module: str) -> Optional[str]:
    """The outermost of "encoder"/"decoder" in a module's name (a BERT2BERT
    decoder is decoder.bert.encoder.layer.N)."""
    return next((p for p in (module or "").split(".") if p in ("encoder", "decoder")), None)


def milestone_label(m: dict) -> str:
    """A milestone's column label: "in", "out", "L3", or "enc L3"/"dec L3"
    on a path through both stacks of an encoder-decoder."""
    if m["layer"] == -1:
        return "in"
    if m["layer"] == "out":
        return "out"
    side = {"encoder": "enc ", "decoder": "dec "}.get(m.get("side"), "")
    return f"{side}L{m['layer']}"


def _position(shape: tuple, index: tuple, T: int, op: str) -> Optional[int]:
    """The sequence position a scalar belongs to, from its tensor's shape."""
    if op.startswith("attention.") and len(shape) == 4:
        return int(index[2])                      # query position of S/P/O
    if len(shape) >= 3 and shape[-2] == T and len(shape) == 4:
        return int(index[-2])                     # [B, H, T, D]
    if len(shape) >= 2 and shape[1] == T:
        return int(index[1])                      # [B, T, ...]
    if len(shape) == 2 and T and shape[0] % T == 0:
        return int(index[0]) % T                  # flattened [B*T, D]
    return None


def path_milestones(path: Path, T: int, offset: int = 0) -> list:
    """Where a path is, layer by layer: [(layer, position, branch, head)]. The
    branch at a layer is query/key/value when the path enters that layer's q/k/v
    projection, "skip" otherwise; the head is read off the attention steps.
    ``T``: the sequence length of the path's tensors; positions are reported
    minus ``offset`` (the example's first position in a left-padded batch).
    On a path through an encoder-decoder's two stacks each layer also has
    its ``side`` ("encoder"/"decoder"; else None): their layers are numbered
    alike."""
    out = _milestones(path, T)
    if offset:
        for m in out:
            m["position"] -= offset
    return out


def _milestones(path: Path, T: int) -> list:
    out = []
    pos = path.source_index[1] if len(path.source_index) >= 2 else 0
    cur = {"layer": -1, "position": int(pos), "branch": "input", "head": None, "side": None}
    out.append(dict(cur))
    for s in path.steps:
        L = _layer_of(s.module)
        p = _position(s.shape, s.index, T, s.op)
        last = s.module.rsplit(".", 1)[-1] if s.module else ""
        branch = {"q_proj": "query", "query": "query", "k_proj": "key", "key": "key",
                  "v_proj": "value", "value": "value"}.get(last)
        side = _side(s.module)
        if L is not None and (L, side) != (cur["layer"], cur["side"]):
            cur = {"layer": L, "position": cur["position"], "branch": "skip", "head": None, "side": side}
            out.append(cur)
        if branch and cur["branch"] == "skip":
            cur["branch"] = branch
        if s.op == "attention.scores" and len(s.index) == 4:
            cur["head"] = int(s.index[1])
            if cur["branch"] == "skip":
                if s.operand:
                    cur["branch"] = "query" if s.operand == "q" else "key"
                else:       # a path saved before steps recorded their operand
                    cur["branch"] = "query" if cur["position"] == int(s.index[2]) else "key"
        if s.op == "attention.values" and len(s.index) == 4 and cur["head"] is None:
            cur["head"] = int(s.index[1])
            if cur["branch"] == "skip":
                cur["branch"] = "value"
        if p is not None:
            cur["position"] = p
    out.append({"layer": "out", "position": cur["position"], "branch": "output", "head": None, "side": None})
    if {m["side"] for m in out} != {None, "encoder", "decoder"}:
        for m in out:                   # one stack (BERT's encoder, a decoder-only LM): no side to tell
            m["side"] = None
    return out


def _semiring_name(semiring) -> str:
    return semiring if isinstance(semiring, str) else getattr(semiring, "name", semiring)


def _check_semiring_k(semiring, k: int) -> None:
    name = _semiring_name(semiring)
    if name not in ("maxabs", "max"):
        raise ValueError(f"semiring={name!r}: the report's top paths and branch tables are read with 'maxabs' "
                         "(|path products|) or 'max' (signed); entropy and |w| flow are always in its statistics")
    if name == "max" and k > 1:
        raise ValueError(f"k={k} with semiring='max': the signed max semiring gives the single top path "
                         "(k=0 or 1); use semiring='maxabs' for the k best |path products|")


@outside_inference_mode
def analyze(output: Tensor, embeds: Tensor, tokens: Optional[Sequence[str]] = None, k: Optional[int] = None,
            heads: bool = False, branches: bool = True, backend: Optional[str] = None,
            description: str = "", spans: Optional[dict] = None, meta: Optional[dict] = None,
            semiring: str = "maxabs", at: str = "residual") -> Analysis:
    """Per-token entropy, log flow and top-path weight; branch attribution per
    layer (if the model is tracked/patched; ``at`` as in :func:`analyze_batch`);
    the ``k`` best paths (default 4 for maxabs, 1 for max). ``output``: a
    scalar; ``embeds``: [1, T, D] input embeddings that require grad.
    ``semiring``: "maxabs" (|products|, k-best) or "max" (signed, k ≤ 1)."""
    if k is None:
        k = 1 if _semiring_name(semiring) == "max" else 4
    if output.numel() != 1:
        raise ValueError("analyze() reads one scalar output; pass e.g. logits[0, -1, a] - logits[0, -1, b]")
    if embeds.dim() != 3 or embeds.shape[0] != 1:
        raise ValueError(f"embeds must be [1, T, D], got {tuple(embeds.shape)}")
    with recording():                   # the view is part of the graph, also inside torch.no_grad()
        output = output.reshape(1)
    return analyze_batch(output, embeds, [tokens] if tokens is not None else None, k=k,
                         heads=heads, branches=branches, backend=backend, descriptions=[description],
                         spans=[spans or {}], metas=[meta or {}], semiring=semiring, at=at)[0]


def _on_input_positions(attr: BranchAttribution, T: int) -> Optional[BranchAttribution]:
    """The layers whose residual stream runs along the input's positions (the
    per-token tables index them by input token; a stream may run on past
    them, as when a causal LM reads a continuation appended to the input).
    An encoder-decoder's decoder layers run along the decoder's positions:
    they are left out, with a warning, when the input is the encoder's
    (encoder and decoder layers both reached), as is any stream shorter than
    the input."""
    sides = {L: _side(attr.modules.get(L, "")) for L in attr.layers}
    both = {"encoder", "decoder"} <= set(sides.values())
    off = [L for L in attr.layers if attr.total[L].shape[1] < T or (both and sides[L] == "decoder")]
    if not off:
        return attr
    warnings.warn(f"the report's per-token branch tables leave out {len(off)} layer(s) whose residual stream is not "
                  f"on the input's positions (e.g. {attr.modules.get(off[0], off[0])}); at='inputs' reads every "
                  "layer per input token", stacklevel=user_stacklevel())
    keep = [L for L in attr.layers if L not in off]
    if not keep:
        return None
    return BranchAttribution(attr.semiring, keep, *({L: d[L] for L in keep if L in d}
                                                   for d in (attr.attention, attr.mlp, attr.heads, attr.total)),
                             {L: attr.modules[L] for L in keep if L in attr.modules})


def _windows(B: int, T: int, lengths, attention_mask) -> list:
    """(first position, number of positions) of each example's tokens."""
    if attention_mask is None:
        if lengths is None:
            return [(0, T)] * B
        lengths = [int(n) for n in lengths]
        if len(lengths) != B or not all(0 < n <= T for n in lengths):
            raise ValueError(f"lengths must give 1..{T} positions for each of the {B} examples; got {lengths}")
        return [(0, n) for n in lengths]
    mask = attention_mask.detach().cpu()
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"attention_mask must be [B, T] = [{B}, {T}]; got {tuple(mask.shape)}")
    out = []
    for b in range(B):
        pos = torch.nonzero(mask[b] != 0).flatten().tolist()
        if not pos or pos[-1] - pos[0] + 1 != len(pos):
            raise ValueError(f"attention_mask[{b}] must mark one run of consecutive positions (a left- or "
                             f"right-padded example); it marks {pos}")
        out.append((pos[0], len(pos)))
    if lengths is not None and [int(n) for n in lengths] != [n for _, n in out]:
        raise ValueError(f"lengths {list(lengths)} disagree with attention_mask's {[n for _, n in out]}")
    return out


def _rotary_shifted(pg: PathGraph, windows: list, T: int) -> list:
    """The left-padded examples whose first token is not at rotary position 0
    (sin ≠ 0 there), read off the first of the patched model's rotary nodes
    (``semitriton.fused.rope``; an unpatched model's RoPE is not checked)."""
    padded = [(b, s) for b, (s, _) in enumerate(windows) if s > 0]
    node = next((n for n in pg.graph.order if type(n).__name__ == "RotaryEmbeddingBackward"), None) \
        if padded else None
    if node is None:
        return []
    _, sin = node.saved_tensors
    rows = []
    for b, s in padded:
        sb = sin[min(b, sin.shape[0] - 1)] if sin.dim() >= 3 else sin
        if sb.numel() != T * sin.shape[-1]:        # positions not laid out along the input (a KV cache)
            return []
        rows.append(sb.reshape(T, -1)[s].ne(0).any())
    return [b for (b, _), bad in zip(padded, torch.stack(rows).tolist()) if bad]


@outside_inference_mode
def analyze_batch(outputs: Tensor, embeds: Tensor, tokens: Optional[Sequence[Sequence[str]]] = None,
                  lengths: Optional[Sequence[int]] = None, k: int = 1, heads: bool = False,
                  branches: bool = True, backend: Optional[str] = None,
                  descriptions: Optional[Sequence[str]] = None, spans: Optional[Sequence[dict]] = None,
                  metas: Optional[Sequence[dict]] = None, semiring: str = "maxabs",
                  attention_mask: Optional[Tensor] = None, at: str = "residual") -> list:
    """:func:`analyze` for a batch of independent examples in one set of
    passes: ``outputs`` [B] (example b's score depends only on embeds[b]),
    ``embeds`` [B, T, D]. Padding is left out of each example's tables:
    ``lengths`` for a right-padded batch (example b: positions [0, n_b)), or
    ``attention_mask`` [B, T] (1 on each example's tokens, one run per row)
    for left or right padding. A padding position from which a path reaches
    the output is an error (the padding is on the other side, or the model
    did not get the mask). A left-padded rotary (RoPE) model must also get
    ``position_ids`` that start at each example's first token, or its path
    weights read shifted positions' cos/sin (warned for patched models).
    ``tokens[b]`` lists the example's tokens (or all T positions');
    ``spans`` index into them. ``at``: the branch tables per
    position of each layer's residual stream ("residual"; the layers whose
    stream is not on the input's positions, such as a decoder's, are left
    out) or per input token ("inputs": the branches taken by each token's
    own top paths; a pass through the lower layers per branch and layer)."""
    if outputs.dim() != 1 or embeds.dim() != 3 or embeds.shape[0] != outputs.shape[0]:
        raise ValueError(f"outputs must be [B] and embeds [B, T, D]; got {tuple(outputs.shape)} and "
                         f"{tuple(embeds.shape)}")
    _check_semiring_k(semiring, k)
    B, T = embeds.shape[:2]
    windows = _windows(B, T, lengths, attention_mask)
    if tokens is not None:
        if len(tokens) != B:
            raise ValueError(f"tokens: {len(tokens)} lists for a batch of {B}")
        for b, (toks, (_, n)) in enumerate(zip(tokens, windows)):
            if len(toks) not in (n, T):
                raise ValueError(f"tokens[{b}] has {len(toks)} entries for {n} positions")
    pg = PathGraph(outputs, embeds, semiring, backend=backend)
    (ent,) = grad_values(outputs, embeds, "entropy", backend=backend)
    (flow,) = grad_values(outputs, embeds, "abs", backend=backend)
    h = token_readout(ent, "entropy").double().cpu()
    lf = flow[0].logsumexp(-1).double().cpu()
    tp = pg.sr.readout(pg.sr.sum(pg.input_value, -1)).double().cpu()
    for b, (s, n) in enumerate(windows):
        outside = [t for t in range(T) if not s <= t < s + n and lf[b, t] > float("-inf")]
        if outside:
            raise ValueError(
                f"example {b}: positions {outside} are left out as padding, but paths from them reach "
                f"outputs[{b}]" + (" (is the batch left-padded? pass attention_mask=)" if attention_mask is None
                                   else " (was the attention mask passed to the model?)"))
    shifted = _rotary_shifted(pg, windows, T)
    if shifted:
        warnings.warn(f"examples {shifted} are left-padded, but their first token is not at rotary position 0: "
                      "the score is the same (rotary attention is relative), but the path weights read the "
                      "cos/sin of the shifted positions, so the tables differ from the example analysed alone; "
                      "pass position_ids=attention_mask.cumsum(-1) - 1 (clamped at 0) to the model",
                      RuntimeWarning, stacklevel=user_stacklevel())
    attribution = None
    if branches:
        try:
            attribution = branch_attribution(outputs, embeds, semiring, heads=heads, backend=backend, graph=pg,
                                             at=at)
        except SemitritonError as exc:            # the rest of the report does not need it
            warnings.warn(f"the report has no branch tables: {exc}", stacklevel=user_stacklevel())
            attribution = None
        if attribution is not None and at == "residual":
            attribution = _on_input_positions(attribution, T)
    scores = outputs.detach().double().cpu()
    out = []
    for b, (s, n) in enumerate(windows):
        if tokens is None:
            toks = [str(i) for i in range(n)]
        else:
            toks = list(tokens[b])
            toks = toks[s:s + n] if len(toks) == T and n < T else toks
        paths = top_paths(outputs, embeds, k=k, graph=pg, batch=b, semiring=semiring) if k else []
        stats = {"entropy": h[b, s:s + n].tolist(), "log_flow": lf[b, s:s + n].tolist(),
                 "top_path": tp[b, s:s + n].tolist()}
        out.append(Analysis(toks, float(scores[b]), (descriptions or [""] * B)[b], stats,
                            None if attribution is None else attribution.select(b, n, start=s), paths,
                            {k_: list(v) for k_, v in ((spans or [{}] * B)[b]).items()},
                            dict((metas or [{}] * B)[b]), s, T if n != T else None))
    return out
