"""Branch attribution at the fan-outs of a transformer layer.

At layer L the residual stream R_L splits into the attention sublayer and the
skip; inside the sublayer the attention input splits into query, key and
value (after the pre-norm in pre-LN models); after the attention's residual
add the stream R'_L splits into the MLP and the skip. For each position t of
R_L and each branch b, the *top-path weight through b* is the ⊕ (max for
maxabs/max) over the units of R_L[t] of the best path from that unit to the
output that takes branch b at layer L; the branch the top path takes is the
argmax over b. With ``heads=True`` the query/key/value weights are split by
the attention head (query heads; a key/value head of a GQA group is counted
under each query head it serves).

Everything comes from one semiring pass that keeps every tensor's value:
a branch's value at R_L is the value at the branch's entry (the q/k/v
projection output, or the head slice of the attention output) pulled back to
R_L through the few nodes in between (``engine.propagate``); the skip's is
the ⊕ of what every other edge out of the fan-out brings (the residual add's
contribution, in a plain layer). Module names come from ``semitriton.track`` /
``semitriton.patch``, which must be active during the forward pass.

The layout is read from the graph, not assumed: R_L is the operand of the
add where the attention's output rejoins the stream (reached through
dropout, a norm after the branch, or a residual multiplier; along a chain of
adds, the latest operand the attention was computed from; followed back
through a scaling or a copy of the stream), and "skip" is every edge that
leaves the fan-out between R_L and q/k/v other than into them. A layer
applied several times has one site per application. In a parallel block (Phi, GPT-J, GPT-NeoX,
Falcon, Cohere: attention and MLP read the same R_L) the attention table's
skip therefore holds the MLP's paths too, and the MLP table (at R_L) holds
the attention's, as "not this branch" does in a sequential layer. A layer
whose branches do not ⊕ to its stream's value raises an error rather than
giving a table.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

from .backend import use as _backend_use
from .engine import GradientGraph, SubGraph, propagate
from .errors import SemitritonError, user_stacklevel
from .jsonsafe import none_as_neg_inf
from .modes import outside_inference_mode, walk_mode
from .rules import RuleContext, rule_for
from .rules.attention import is_attention_node
from .semirings import Semiring
from .tracking import _TAG

ATTN_BRANCHES = ("query", "key", "value", "skip")
MLP_BRANCHES = ("mlp", "skip")
#: ``top_branch``'s index where no branch carries a path to the output
NO_PATH = -1


def branch_name(index: int) -> str:
    """The name of ``top_branch``'s ``index``: a branch, or "-" for ``NO_PATH``."""
    return "-" if index == NO_PATH else ATTN_BRANCHES[index]


def no_path_value(semiring: str) -> float:
    """What a branch without a path reads in ``semiring``'s readout: 0 for maxabs, -inf for max."""
    return 0.0 if semiring == "maxabs" else -math.inf


_Q = ("q_proj", "query", "q", "wq", "W_q", "q_lin", "query_proj")
_K = ("k_proj", "key", "k", "wk", "W_k", "k_lin", "key_proj")
_V = ("v_proj", "value", "v", "wv", "W_v", "v_lin", "value_proj")
_QKV = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv")
#: multi-head latent attention (DeepSeek-V2/V3, Kimi K2, Mistral 4, GLM-4 MoE Lite, MiniCPM3): the query
#: through q_b_proj (or q_proj), key and value through one down-projection of the stream, cut into the
#: latent (up-projected by kv_b_proj, cut into the keys' no-rope part and the values) and the keys' rope part
_LATENT_Q = ("q_b_proj",) + _Q
_LATENT_KV_A = ("kv_a_proj_with_mqa",)
_LATENT_KV_B = ("kv_b_proj",)
_ATTN_OUT = ("o_proj", "c_proj", "out_proj", "dense", "wo", "o", "out_lin", "Wo")
#: the MLP's output module, as a path below the layer (BART/OPT/Whisper keep fc2 in the layer itself)
#: (first match wins; then the MLP module itself, whose output is the block's for mixtures of experts)
_MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "output.dense", "mlp.dense_4h_to_h",
            "feed_forward.w2", "mlp.w2", "mlp.fc_out", "mlp.Wo", "fc2", "ffn.lin2", "feed_forward.output_dense",
            "ffn.down_proj", "mlp", "block_sparse_moe", "feed_forward", "ffn")
_MLP_OUT_RE = re.compile(r"layer\.\d+\.DenseReluDense\.wo")          # T5: block.N.layer.M.DenseReluDense.wo
_PASS = re.compile(r"^(View|UnsafeView|ReshapeAlias|Clone|Alias|NativeDropout|ToCopy|Contiguous|Unsqueeze|Squeeze|"
                   r"Transpose|Permute|Expand)Backward\d*$")


@dataclass
class LayerSites:
    """Where layer ``index`` branches, as (node, slot) tensor references.

    ``skip_edges`` are the edges (tensor, consumer node, input index) that
    leave the attention's fan-out without entering query, key or value: the
    residual add, and in a parallel block (Phi, GPT-J, GPT-NeoX) the MLP's
    input too. ``mlp_skip_edges`` likewise for the MLP's fan-out at
    ``mlp_residual`` (R_L itself in a parallel block)."""

    index: int
    attention: str                      # qualified name of the attention core module
    residual: tuple                     # R_L
    entries: dict                       # "query"/"key"/"value" -> [(node, slot)] of the projection output(s)
    skip_edges: list = field(default_factory=list)
    attn_node: object = None            # the fused/SDPA attention node, if any
    mlp: Optional[str] = None           # qualified name of the MLP's output module
    mlp_residual: Optional[tuple] = None  # R'_L
    mlp_exit: Optional[tuple] = None    # the MLP output module's output
    mlp_entry_edges: Optional[list] = None  # R'_L's edges into the MLP, when nothing else leaves the MLP's fan-out
    mlp_skip_edges: list = field(default_factory=list)


@dataclass
class BranchAttribution:
    """Top-path weights per branch. ``attention[L][b]`` and ``mlp[L][b]`` are
    [batch, T] tensors (readouts of the per-position ⊕); ``heads[L][b]`` is
    [batch, T, H] when computed. ``total[L]`` is the top-path weight at R_L
    over all branches (equals the ⊕ over the four branches)."""

    semiring: str
    layers: list
    attention: dict = field(default_factory=dict)
    mlp: dict = field(default_factory=dict)
    heads: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)

    def top_branch(self, layer: int) -> Tensor:
        """Index into ATTN_BRANCHES of the branch the top path takes, [batch, T];
        ``NO_PATH`` (-1) at a position from which no path reaches the output
        (every branch reads the semiring's zero: 0 for maxabs, -inf for max).
        At an exact tie the first branch in ATTN_BRANCHES' order is named."""
        w = torch.stack([self._layer(layer)[b] for b in ATTN_BRANCHES], -1)
        return torch.where((w == self.no_path_value()).all(-1), NO_PATH, w.argmax(-1))

    def _layer(self, layer) -> dict:
        """The attention branches of ``layer``; a KeyError that lists the layers there are."""
        try:
            return self.attention[layer]
        except KeyError:
            raise KeyError(f"no layer {layer!r} in this attribution; its layers are {self.layers}") from None

    def no_path_value(self) -> float:
        """The readout of the semiring's zero: what a branch without a path reads."""
        return no_path_value(self.semiring)

    def top_head(self, layer: int) -> Optional[Tensor]:
        """(branch index, head) of the top path inside the attention, [batch, T, 2];
        meaningful where ``top_branch`` is query, key or value (at an exact
        tie, the first branch, then the lowest head). None for a layer without
        per-head weights."""
        self._layer(layer)
        if layer not in self.heads:
            return None
        h = torch.stack([self.heads[layer][b] for b in ATTN_BRANCHES[:3]], -2)   # [B, T, 3, H]
        flat = h.flatten(-2).argmax(-1)
        return torch.stack([flat // h.shape[-1], flat % h.shape[-1]], -1)

    def select(self, batch: int, length: Optional[int] = None, start: int = 0) -> "BranchAttribution":
        """The attribution of one example of a batch (positions [start, start + length))."""
        sl = slice(start, None) if length is None else slice(start, start + length)

        def cut(x):
            return x[batch:batch + 1, sl]
        return BranchAttribution(
            self.semiring, list(self.layers),
            {L: {b: cut(v) for b, v in d.items()} for L, d in self.attention.items()},
            {L: {b: cut(v) for b, v in d.items()} for L, d in self.mlp.items()},
            {L: {b: cut(v) for b, v in d.items()} for L, d in self.heads.items()},
            {L: cut(v) for L, v in self.total.items()}, dict(self.modules))

    def merge_calls(self) -> "BranchAttribution":
        """The layers that are calls of one attention module (a model run
        several times on one input, e.g. once per scored continuation) as one
        layer each: every table ⊕ (max) over the calls, at the positions the
        calls share. Keys are then the modules' layer numbers (forward order
        where those repeat). Not for a layer applied at several depths
        (ALBERT), whose calls are different layers."""
        groups: dict = {}
        for L in self.layers:
            groups.setdefault(self.modules.get(L, L), []).append(L)
        if all(len(g) == 1 for g in groups.values()):
            return self
        firsts = [_numbers(m)[0] if isinstance(m, str) and _numbers(m) else None for m in groups]
        keys = firsts if None not in firsts and len(set(firsts)) == len(firsts) else list(range(len(groups)))

        def top(xs):
            n = min(x.shape[1] for x in xs)
            return torch.stack([x[:, :n] for x in xs]).amax(0)

        def merged(d):
            return {key: {b: top([d[L][b] for L in calls]) for b in d[calls[0]]}
                    for key, calls in zip(keys, groups.values()) if all(L in d for L in calls)}
        return BranchAttribution(
            self.semiring, keys, merged(self.attention), merged(self.mlp), merged(self.heads),
            {key: top([self.total[L] for L in calls]) for key, calls in zip(keys, groups.values())},
            {key: m for key, m in zip(keys, groups)})

    def table(self, layer: int, batch: int = 0) -> dict:
        return {b: self._layer(layer)[b][batch].tolist() for b in ATTN_BRANCHES}

    def to_dict(self) -> dict:
        def t(x):
            return x.tolist()
        return {
            "semiring": self.semiring, "layers": list(self.layers), "modules": {str(k): v for k, v in self.modules.items()},
            "attention": {str(L): {b: t(v) for b, v in d.items()} for L, d in self.attention.items()},
            "mlp": {str(L): {b: t(v) for b, v in d.items()} for L, d in self.mlp.items()},
            "heads": {str(L): {b: t(v) for b, v in d.items()} for L, d in self.heads.items()},
            "total": {str(L): t(v) for L, v in self.total.items()},
        }

    @classmethod
    def from_dict(cls, d) -> "BranchAttribution":
        def tt(x):
            return torch.tensor(none_as_neg_inf(x), dtype=torch.float64)
        return cls(d["semiring"], list(d["layers"]),
                   {int(L): {b: tt(v) for b, v in x.items()} for L, x in d["attention"].items()},
                   {int(L): {b: tt(v) for b, v in x.items()} for L, x in d["mlp"].items()},
                   {int(L): {b: tt(v) for b, v in x.items()} for L, x in d["heads"].items()},
                   {int(L): tt(v) for L, v in d["total"].items()},
                   {int(k): v for k, v in d.get("modules", {}).items()})


# ---- discovery ------------------------------------------------------------------------------------
class _Index:
    """Module outputs of a tracked graph: qualified name -> output node of
    each call, in forward order (a layer module applied several times, as in
    ALBERT or a looped model, has one per call)."""

    def __init__(self, graph: GradientGraph):
        self.graph = graph
        self.pos = {n: i for i, n in enumerate(graph.order)}
        calls: dict = {}                 # qualname -> {call number: (output index, output node)}
        self.classes: dict = {}          # qualname -> class name
        for node in graph.order:
            try:
                tags = node.metadata.get(_TAG)
            except (AttributeError, RuntimeError):
                tags = None
            for qual, cls, seq, _, k in tags or ():
                # a call's first output on the graph (a MoE block's output, not its router logits)
                have = calls.setdefault(qual, {}).get(seq)
                if have is None or k < have[0]:
                    calls[qual][seq] = (k, node)
                self.classes.setdefault(qual, getattr(cls, "__name__", str(cls)))
        self.calls = {q: [c[s][1] for s in sorted(c)] for q, c in calls.items()}
        if not self.calls:
            raise SemitritonError("branch attribution needs module names: call semitriton.patch(model) or "
                                  "semitriton.track(model) before the forward pass")

    def output_ref(self, qual: str, call: int = 0):
        nodes = self.calls.get(qual)
        return None if not nodes or call >= len(nodes) else (nodes[call], 0)

    def n_calls(self, qual: str) -> int:
        return len(self.calls.get(qual, ()))

    def child(self, parent: str, names) -> Optional[str]:
        for n in names:
            q = f"{parent}.{n}" if parent else n
            if q in self.calls:
                return q
        return None


def _parent(q: str) -> str:
    return q.rsplit(".", 1)[0] if "." in q else ""


def _numbers(q: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\.(\d+)(?=\.|$)", q))


def _numbered_prefixes(q: str) -> list:
    """The prefixes of ``q`` that end in a number (module-list items), deepest first."""
    return [q[: m.end()] for m in reversed(list(re.finditer(r"\.(\d+)(?=\.|$)", q)))]


def _computed_from(node, targets, pos: dict) -> bool:
    """Whether any of ``targets`` is computed from ``node``'s output (searched
    down from the targets, never below ``node`` in the topological order)."""
    floor = pos.get(node, -1)
    seen, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        if n is node:
            return True
        seen.add(n)
        if pos.get(n, -1) > floor:
            stack.extend(f for f, _ in n.next_functions if f is not None and f not in seen)
    return False


#: single-input nodes the stream may pass before its add (a scaled or copied stream: DeepNorm's α·x, x.clone())
_STREAM_PASS = re.compile(r"^(Mul|Div|Clone|NativeDropout|_?ToCopy|Alias|View|UnsafeView)Backward\d*$")


def _stream_candidates(add, j: int, targets, pos: dict, depth: int = 4) -> list:
    """[(add node, stream ref)] for operand ``j`` of ``add``: the operand, or
    the tensor it was scaled or copied from, when the branch was computed
    from it; inside an add it is made of ((stream + a) + b), each of that
    add's operands."""
    f, slot = add.next_functions[j]
    if f is None:
        return []
    ref = (f, slot)
    for _ in range(4):
        if _computed_from(ref[0], targets, pos):
            return [(add, ref)]
        live = [nf for nf in ref[0].next_functions if nf[0] is not None]
        if not (_STREAM_PASS.match(type(ref[0]).__name__) and len(live) == 1):
            break
        ref = live[0]
    if depth and type(f).__name__ == "AddBackward0":
        return [c for jj in (0, 1) for c in _stream_candidates(f, jj, targets, pos, depth - 1)]
    return []


def _join(graph: GradientGraph, exit_ref, pos: dict, max_nodes: int = 512):
    """Where a branch rejoins the residual stream it left. Searching forward
    from the branch's output ``exit_ref`` (breadth first: through dropout, a
    norm after the branch (Gemma2/3) or a residual multiplier (Granite)) for
    the first add of two tensors, and along the chain of adds it starts
    (attn + mlp + stream, (a + x0) + x), the operands the branch's output was
    computed from (not the output itself): the one computed last is the
    stream. Returns (add node, stream ref) or None."""
    targets = [f for f, _ in exit_ref[0].next_functions if f is not None]
    queue, seen = deque([exit_ref]), set()
    while queue and len(seen) < max_nodes:
        ref = queue.popleft()
        for node, i in graph.consumers.get(ref, ()):
            if type(node).__name__ == "AddBackward0" and node.next_functions[1 - i][0] is not None:
                found, add, came = [], node, i
                for _ in range(8):
                    found += _stream_candidates(add, 1 - came, targets, pos)
                    nxt = graph.consumers.get((add, 0), [])
                    if len(nxt) != 1 or type(nxt[0][0]).__name__ != "AddBackward0":
                        break
                    add, came = nxt[0]
                # the first add of two tensors on the way is the join, or there is none
                # (a cross-attention whose stream does not come from the inputs)
                return max(found, key=lambda c: pos.get(c[1][0], -1)) if found else None
            if node not in seen:
                seen.add(node)
                queue.extend((node, s) for s in range(len(node._input_metadata)))
    return None


def _fan_out(graph: GradientGraph, stream, entries, pos: dict) -> tuple:
    """The nodes between ``stream`` and a branch's entry tensors, and the
    edges that leave them elsewhere: (region, [(tensor, consumer, input index)])."""
    sub = SubGraph([e[0] for e in entries], stream, positions=pos)
    region = set(sub.relevant) - {stream[0]}
    inside = set(entries)
    refs = [stream] + [(n, s) for n in region for s in range(len(n._input_metadata))]
    leaks = [(ref, c, i) for ref in refs if ref not in inside
             for c, i in graph.consumers.get(ref, ()) if c not in region]
    return region, leaks


_FANOUT = ("SplitBackward0", "SplitWithSizesBackward0", "UnbindBackward0", "SliceBackward0", "SelectBackward0",
           "IndexBackward0")


def _piece_position(node) -> Optional[tuple]:
    """(dim, first element) of the part of its input a slice/select/index
    node takes, or None where that is not one contiguous piece."""
    name = type(node).__name__
    try:
        sizes = tuple(node._saved_self_sym_sizes)
        if name == "SliceBackward0":
            d = int(node._saved_dim) % len(sizes)
            return d, slice(int(node._saved_start), int(node._saved_end)).indices(sizes[d])[0]
        if name == "SelectBackward0":
            d = int(node._saved_dim) % len(sizes)
            return d, int(node._saved_index) % sizes[d]
        if name == "IndexBackward0":          # x[..., [i], :]: one index list on one dim
            idx = list(node._saved_indices)
            dims = [d for d, t in enumerate(idx) if t is not None]
            if len(dims) != 1 or idx[dims[0]].dim() != 1:
                return None
            d = dims[0]
            return d, int(idx[d].min()) % sizes[d]
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None
    return None


def _cut(graph: GradientGraph, ref) -> Optional[list]:
    """The pieces tensor ``ref`` is cut into, in order, followed through views:
    the outputs of a split/chunk/unbind, or slices, selects and single-index
    lists by their position along one dim; None where it is read otherwise."""
    for _ in range(8):
        cons = graph.consumers.get(ref, [])
        names = [type(c).__name__ for c, _ in cons]
        if len(cons) == 1 and _PASS.match(names[0]):
            ref = (cons[0][0], 0)
            continue
        if not cons or not all(n in _FANOUT for n in names):
            return None
        if len(cons) == 1 and names[0].startswith(("Split", "Unbind")):
            node = cons[0][0]
            return [(node, s) for s in range(len(node._input_metadata))]
        pos = [_piece_position(c) for c, _ in cons]
        if any(p is None for p in pos) or len({p[0] for p in pos}) != 1 or len(cons) < 2:
            return None
        return [(cons[j][0], 0) for j in sorted(range(len(cons)), key=lambda j: pos[j][1])]
    return None


def _fused_entries(graph: GradientGraph, ref) -> Optional[dict]:
    """query/key/value of a fused projection's output: GPT-2's split,
    GPT-NeoX's chunk, Phi-3's slices, BLOOM's selects, Falcon's slice and
    index lists, and GPT-BigCode's q | kv split with kv split again (a piece
    is cut further only while there are fewer than three)."""
    pieces = _cut(graph, ref)
    while pieces is not None and len(pieces) < 3:
        for j, piece in enumerate(pieces):
            more = _cut(graph, piece)
            if more is not None:
                pieces = pieces[:j] + more + pieces[j + 1:]
                break
        else:
            return None
    if pieces is None or len(pieces) != 3:
        return None
    # label by the attention input each piece reaches (CodeGen cuts q | v | k);
    # in position order where no fused attention node is reached (eager attention)
    slots = [_attention_input(graph, p) for p in pieces]
    if all(sl is not None for sl in slots) and sorted(sl[1] for sl in slots) == [0, 1, 2] \
            and len({sl[0] for sl in slots}) == 1:
        return {ATTN_BRANCHES[sl[1]]: [p] for p, sl in zip(pieces, slots)}
    return {b: [p] for b, p in zip(ATTN_BRANCHES[:3], pieces)}


def _latent_entries(graph: GradientGraph, idx: "_Index", core: str, call: int):
    """query/key/value entry tensors of multi-head latent attention: the
    query projection's output; the pieces of the kv down-projection's output
    that reach the attention's key input without passing kv_b_proj (the rope
    part), and the pieces of kv_b_proj's output, by the attention input each
    reaches (the keys' no-rope part, the values; in that order where no fused
    attention node is reached)."""
    q, kv_a, kv_b = (idx.child(core, names) for names in (_LATENT_Q, _LATENT_KV_A, _LATENT_KV_B))
    refs = [None if m is None else idx.output_ref(m, call) for m in (q, kv_a, kv_b)]
    if any(r is None for r in refs):
        return (f"multi-head latent attention without a {'/'.join(_LATENT_Q[:2])}, "
                f"{_LATENT_KV_A[0]} and {_LATENT_KV_B[0]} output on the graph")
    q_ref, a_ref, b_ref = refs
    a_pieces, b_pieces = _cut(graph, a_ref), _cut(graph, b_ref)
    if a_pieces is None or b_pieces is None:
        return f"the outputs of {kv_a} and {kv_b} are not cut into latent, key and value parts by splits or slices"
    entries: dict = {"query": [q_ref], "key": [], "value": []}
    rope_parts = [p for p in a_pieces if _first_consumer(graph, p, lambda n: n is b_ref[0]) is None]
    slots = [_attention_input(graph, p) for p in rope_parts + b_pieces]
    if all(sl is None for sl in slots) and len(b_pieces) == 2:
        # no fused attention node (eager attention): the rope part is the keys', kv_b_proj's output is
        # cut into keys then values, as every modeling file of this layout does
        slots = [(None, 1)] * len(rope_parts) + [(None, 1), (None, 2)]
    for p, sl in zip(rope_parts + b_pieces, slots):
        if sl is None or sl[1] not in (1, 2):
            return (f"a piece of the output of {kv_a if p in a_pieces else kv_b} reaches no key or value input "
                    "of the attention")
        entries[ATTN_BRANCHES[sl[1]]].append(p)
    if not entries["key"] or not entries["value"]:
        return f"the outputs of {kv_a} and {kv_b} do not reach both the key and the value input of the attention"
    return entries


def _first_consumer(graph: GradientGraph, ref, found, max_nodes: int = 64) -> Optional[tuple]:
    """(node, input index) of the first node with ``found(node)`` that
    tensor ``ref`` reaches, searching forward breadth first; None if none is near."""
    queue, seen = deque([ref]), set()
    while queue and len(seen) < max_nodes:
        r = queue.popleft()
        for node, i in graph.consumers.get(r, ()):
            if found(node):
                return node, i
            if node not in seen:
                seen.add(node)
                queue.extend((node, s) for s in range(len(node._input_metadata)))
    return None


def _attention_input(graph: GradientGraph, ref) -> Optional[tuple]:
    """(attention node, input index) of the first fused attention node ``ref`` reaches, or None."""
    return _first_consumer(graph, ref, is_attention_node)


def _inside(label, qual: str) -> bool:
    return bool(label) and (label[0] == qual or label[0].startswith(qual + "."))


def _mlp_exit(idx: "_Index", core: str) -> Optional[str]:
    """The MLP output module of the layer that holds attention ``core``: the
    deepest numbered container of ``core`` with one below it."""
    for prefix in _numbered_prefixes(core):
        for name in _MLP_OUT:
            if f"{prefix}.{name}" in idx.calls and not core.startswith(f"{prefix}.{name}."):
                return f"{prefix}.{name}"
        found = [q for q in idx.calls if q.startswith(prefix + ".") and _MLP_OUT_RE.fullmatch(q[len(prefix) + 1:])]
        if found:
            return sorted(found)[0]
    return None


def _entries(graph: GradientGraph, idx: "_Index", core: str, call: int):
    """query/key/value entry tensors of ``call`` of attention ``core``, or a
    string saying why they cannot be read."""
    fused = idx.child(core, _QKV)
    if fused:
        entries = _fused_entries(graph, idx.output_ref(fused, call))
        if entries is None:
            return (f"the output of the fused projection {fused} is not cut into query, key and value "
                    "by splits, slices, selects or index lists")
        return entries
    if idx.child(core, _LATENT_KV_A) and idx.child(core, _LATENT_KV_B):
        return _latent_entries(graph, idx, core, call)
    entries = {}
    for b, names in zip(ATTN_BRANCHES[:3], (_Q, _K, _V)):
        q = idx.child(core, names)
        if q is not None and idx.output_ref(q, call) is not None:
            entries[b] = [idx.output_ref(q, call)]
    return entries


def _site(graph: GradientGraph, idx: "_Index", core: str, call: int):
    """The LayerSites of ``call`` of attention ``core`` (index still unset),
    or a string saying which part of the layout could not be read, or None
    where the layer is not on a path from the inputs."""
    pos = idx.pos
    entries = _entries(graph, idx, core, call)
    if isinstance(entries, str):
        return entries
    out_mod = idx.child(core, _ATTN_OUT) or idx.child(_parent(core), ("output.dense",))
    if out_mod is None or idx.output_ref(out_mod, call) is None:
        return f"no output projection ({'/'.join(_ATTN_OUT)}) of {core} was found in the graph"
    if not entries:
        return None
    join = _join(graph, idx.output_ref(out_mod, call), pos)
    if join is None and len(entries) < 3:
        return None                     # a cross-attention whose stream does not come from the inputs
    if join is None:
        return f"the output of {out_mod} could not be followed to an add with the residual stream"
    add_node, residual = join
    if residual[0] not in graph.relevant:
        return None                     # e.g. a cross-attention whose stream does not come from the inputs
    region, leaks = _fan_out(graph, residual, [e for refs in entries.values() for e in refs], pos)
    # (BLOOM adds the residual inside its attention module: that add is the skip)
    odd = [c for _, c, _ in leaks if c is not add_node and _inside(graph.labels.of(c), core)]
    if odd:
        return (f"{core} reads the stream through {type(odd[0]).__name__} as well as its "
                f"{'/'.join(entries)} projection(s): its query/key/value inputs are not all named "
                f"({'/'.join(_Q[:1] + _K[:1] + _V[:1] + _QKV[:1])}, ...)")
    reached = (_attention_input(graph, e) for refs in entries.values() for e in refs)   # the first found will do
    attn_node = next((r[0] for r in reached if r is not None), None)
    site = LayerSites(-1, core, residual, entries, leaks, attn_node)
    mlp = _mlp_exit(idx, core)
    if mlp is not None and idx.output_ref(mlp, call) is not None:
        exit_ref = idx.output_ref(mlp, call)
        mjoin = _join(graph, exit_ref, pos)
        if mjoin is None:
            return f"the output of {mlp} could not be followed to an add with the residual stream"
        stream = mjoin[1]
        mregion, mleaks = _fan_out(graph, stream, [exit_ref], pos)
        site.mlp, site.mlp_residual, site.mlp_exit, site.mlp_skip_edges = mlp, stream, exit_ref, mleaks
        if all(ref == stream for ref, _, _ in mleaks):
            site.mlp_entry_edges = [(c, i) for c, i in graph.consumers.get(stream, ()) if c in mregion]
    return site


def _unread_attention(idx: _Index, most: int = 2) -> list:
    """Attention modules of numbered layers (a name ending in "attn" or
    "attention") whose projections have none of the query/key/value names:
    the first of each class (at most ``most``), with its submodules, for the
    error message."""
    found, classes = [], set()
    for q in idx.calls:
        if re.search(r"(attn|attention)$", q.rsplit(".", 1)[-1].lower()) and _numbers(q) \
                and idx.classes.get(q) not in classes:
            found.append(q)
            classes.add(idx.classes.get(q))
    out = []
    for q in found[:most]:
        kids = sorted({c[len(q) + 1:].split(".")[0] for c in idx.calls if c.startswith(q + ".")})
        out.append(f"{q} ({idx.classes.get(q, '?')}): none of its submodules ({', '.join(kids) or 'none'}) is a "
                   "query/key/value projection by name (q_proj/k_proj/v_proj, query/key/value, a fused "
                   "c_attn/qkv_proj/query_key_value, ...)")
    return out


def discover(graph: GradientGraph) -> list:
    """The branch sites of every transformer layer found in the graph, in
    forward order (one per call of a layer applied several times). ``index``
    is the layer's number in its module list, or, where those repeat (an
    encoder and a decoder, T5's blocks, Swin's stages, shared layers), the
    site's position in forward order (``BranchAttribution.modules`` names
    each). Raises SemitritonError naming the layer whose layout it cannot read."""
    idx = _Index(graph)
    cores = sorted({_parent(q) for q in idx.calls
                    if q.rsplit(".", 1)[-1] in _Q + _K + _V + _QKV + _LATENT_KV_A and _numbers(q)})
    sites, problems = [], []
    for core in cores:
        projections = [idx.child(core, names) for names in (_Q, _K, _V, _QKV, _LATENT_KV_A)]
        n = max(idx.n_calls(q) for q in projections if q is not None)
        for call in range(n):
            site = _site(graph, idx, core, call)
            if isinstance(site, str):
                problems.append(f"{core}: {site}")
            elif site is not None:
                sites.append(site)
    if not cores:
        problems += _unread_attention(idx)
    if problems:
        raise SemitritonError("branch attribution cannot read these attention layers: "
                              + "; ".join(dict.fromkeys(problems)))
    sites.sort(key=lambda s: idx.pos.get(s.residual[0], -1))
    # an MLP shared by two attentions of one layer (a decoder's self- and
    # cross-attention) belongs to the one it follows
    seen = set()
    for s in reversed(sites):
        if s.mlp_exit in seen:
            s.mlp = s.mlp_residual = s.mlp_exit = s.mlp_entry_edges = None
            s.mlp_skip_edges = []
        elif s.mlp_exit is not None:
            seen.add(s.mlp_exit)
    firsts = [_numbers(s.attention)[0] for s in sites]
    unique = len(set(firsts)) == len(firsts)
    for n, s in enumerate(sites):
        s.index = firsts[n] if unique else n
    return sites


# ---- attribution ------------------------------------------------------------------------------------
@outside_inference_mode
def branch_attribution(output: Tensor, inputs: Tensor, semiring: Union[str, Semiring, None] = None,
                       heads: bool = False, backend: Optional[str] = None,
                       graph=None, at: str = "residual") -> BranchAttribution:
    """Top-path weight through each branch (query, key, value, skip; MLP and
    skip) per layer and position, from one semiring pass (see the module
    docstring). ``inputs``: the tensor the graph is walked to (usually the
    input embeddings). ``semiring``: "maxabs" (|product|, the default) or "max"
    (signed M+); with ``graph`` it defaults to the graph's.
    ``graph``: a :class:`semitriton.PathGraph` built with that semiring, to reuse
    its pass (and share it with :func:`semitriton.top_paths`). ``at``:
    "residual" reads each branch per position of R_L; "inputs" pulls each
    branch's value further down to ``inputs`` and reads it per *source* token
    (the best path from token t's input embedding that takes branch b at layer
    L; costs a pass through the layers below L per branch)."""
    if at not in ("residual", "inputs"):
        raise ValueError(f"at must be 'residual' or 'inputs', not {at!r}")
    from .paths import PathGraph, _check_tensors
    _check_tensors(output, inputs, "branch_attribution")
    if graph is None:
        graph = PathGraph(output, inputs, "maxabs" if semiring is None else semiring, backend=backend)
    else:
        graph.check(output, inputs, graph.sr if semiring is None else semiring, "branch_attribution")
    sr = graph.sr
    if sr.name not in ("maxabs", "max"):
        raise ValueError("branch attribution reads top paths: use semiring 'maxabs' or 'max'")
    g, keep, dtype = graph.graph, graph.keep, graph.dtype
    sites = discover(g)
    pos = {n: i for i, n in enumerate(g.order)}
    if not sites:
        raise SemitritonError("no attention layers with query/key/value projections (q_proj/k_proj/v_proj, "
                              "query/key/value, a fused c_attn/qkv_proj/query_key_value, ...) were found on the "
                              "paths from the inputs to the output (is the model tracked or patched before the "
                              "forward pass, and does the output depend on the layers?)")
    res = BranchAttribution(sr.name, [s.index for s in sites])

    def value_of(ref):
        gr = keep.get(ref[0])
        v = None if gr is None else gr[ref[1]]
        if v is None:
            meta = ref[0]._input_metadata[ref[1]]
            v = sr.zero(tuple(meta.shape), dtype, meta.device)
        return v

    source = g.target_of(0)

    def token(v, ref=None, like=None):
        """Per position: ⊕ over the last dim, read out; ``like``: the
        positions of the layer's R_L, for a stream kept flat as [B·T, D]
        (OPT's MLP)."""
        if at == "inputs" and ref is not None and ref != source:
            v = propagate({ref: v}, source, sr, dtype, g.labels, backend, pos)
        r = sr.readout(sr.sum(v, -1)).double().cpu()
        if like is not None and tuple(r.shape) != like and r.numel() == math.prod(like):
            r = r.reshape(like)
        return r

    def edge_value(node, i):
        """The contribution of consumer ``node`` through its input ``i`` (its rule re-run)."""
        needs = [j == i for j in range(len(node.next_functions))]
        with _backend_use(backend):
            return rule_for(node)(RuleContext(node, keep[node], needs, sr, dtype))[i]

    def combine(vals, ref):
        vals = [v for v in vals if v is not None]
        if not vals:
            meta = ref[0]._input_metadata[ref[1]]
            return sr.zero(tuple(meta.shape), dtype, meta.device)
        out = vals[0]
        for v in vals[1:]:
            out = sr.plus(out, v)
        return out

    def pulled(edges, stream):
        """⊕ of the values the edges (tensor, consumer, input index) bring,
        pulled back to ``stream`` through the nodes between."""
        direct, seeds = [], {}
        for ref, c, i in edges:
            v = edge_value(c, i)
            if v is None:
                continue
            if ref == stream:
                direct.append(v)
            else:
                seeds[ref] = v if ref not in seeds else sr.plus(seeds[ref], v)
        if seeds:
            direct.append(propagate(seeds, stream, sr, dtype, g.labels, backend, pos))
        return combine(direct, stream)

    def through(refs, stream):
        return propagate({ref: value_of(ref) for ref in refs}, stream, sr, dtype, g.labels, backend, pos)

    unfused = [s.attention for s in sites if s.attn_node is None]
    if heads and unfused:
        warnings.warn(f"branch_attribution(heads=True): no per-head weights for {len(unfused)} attention layer(s) "
                      f"(e.g. {unfused[0]}) whose attention is not one fused node; semitriton.patch(model) before "
                      "the forward pass fuses it where the model uses transformers' attention interface",
                      stacklevel=user_stacklevel())
    with walk_mode(graph.output.device):
        for s in sites:
            res.modules[s.index] = s.attention
            R = s.residual
            br = {b: token(through(s.entries[b], R) if b in s.entries else combine([], R), R)
                  for b in ATTN_BRANCHES[:3]}
            br["skip"] = token(pulled(s.skip_edges, R), R)
            res.attention[s.index] = br
            res.total[s.index] = token(value_of(R), R)
            _check_split(s, "query/key/value/skip", br, res.total[s.index])
            if s.mlp_residual is not None:
                R2 = s.mlp_residual
                if s.mlp_entry_edges is not None:
                    mlp = combine([edge_value(c, i) for c, i in s.mlp_entry_edges], R2)
                else:                   # the MLP's fan-out has other exits (a parallel block): pull its output back
                    mlp = through([s.mlp_exit], R2)
                like = tuple(res.total[s.index].shape)
                res.mlp[s.index] = {"mlp": token(mlp, R2, like),
                                    "skip": token(pulled(s.mlp_skip_edges, R2), R2, like)}
                _check_split(s, "mlp/skip", res.mlp[s.index], token(value_of(R2), R2, like))
            if heads and s.attn_node is not None:
                res.heads[s.index] = _head_weights(s, keep, sr, dtype, g, backend, value_of, token, pos)
    return res


def _check_split(site: LayerSites, what: str, parts: dict, total: Tensor) -> None:
    """The branches of a fan-out must account for every path through it: their
    ⊕ (a max of top-path weights) is the stream's own value. A layout read
    wrongly fails here instead of giving a table that looks right."""
    best = torch.stack(list(parts.values())).amax(0)
    ok = (best == total) | torch.isclose(best, total, rtol=1e-4, atol=0)
    if not bool(ok.all()):
        raise SemitritonError(
            f"branch attribution at {site.attention}: the {what} branches do not account for every path "
            f"through the layer's fan-out (largest branch {float((best - total).abs().max()):.3g} away from "
            "the stream's value); its layout is not one semitriton reads")


def _head_weights(site, keep, sr, dtype, graph, backend, value_of, token, pos) -> dict:
    """Per query head h: the attention rule on the output value masked to head
    h, pulled back from the q/k/v inputs to R_L."""
    node = site.attn_node
    vo = value_of((node, 0))
    H = vo[0].shape[-3]
    fn = rule_for(node)
    zero = sr.zero(tuple(vo[0].shape), dtype, vo[0].device)
    out = {b: [] for b in ATTN_BRANCHES[:3]}
    nexts = node.next_functions
    for h in range(H):
        keep_h = torch.zeros(H, dtype=torch.bool, device=vo[0].device)
        keep_h[h] = True
        m = keep_h.view(H, 1, 1)
        vh = tuple(torch.where(m, c, z) for c, z in zip(vo, zero))
        needs = [i < 3 and nexts[i][0] is not None for i in range(len(nexts))]
        grads = [vh] + list(keep.get(node, [None])[1:])
        vals = fn(RuleContext(node, grads, needs, sr, dtype))
        for i, b in enumerate(ATTN_BRANCHES[:3]):
            if vals[i] is None:                 # no path through this input (e.g. k/v computed without grad)
                meta = site.residual[0]._input_metadata[site.residual[1]]
                out[b].append(token(sr.zero(tuple(meta.shape), dtype, meta.device), site.residual))
                continue
            ref = nexts[i]
            out[b].append(token(propagate({ref: vals[i]}, site.residual, sr, dtype, graph.labels, backend, pos),
                                site.residual))
    return {b: torch.stack(v, -1) for b, v in out.items()}
