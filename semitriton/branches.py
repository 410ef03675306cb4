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
R_L through the few nodes in between (``engine.propagate``); the skip's is the
residual add's contribution. Module names come from ``semitriton.track`` /
``semitriton.patch``, which must be active during the forward pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

from .backend import use as _backend_use
from .engine import GradientGraph, propagate
from .errors import SemitritonError
from .jsonsafe import none_as_neg_inf
from .rules import RuleContext, rule_for
from .rules.attention import is_attention_node
from .semirings import Semiring
from .tracking import _TAG

ATTN_BRANCHES = ("query", "key", "value", "skip")
MLP_BRANCHES = ("mlp", "skip")

_Q = ("q_proj", "query", "q", "wq", "W_q")
_K = ("k_proj", "key", "k", "wk", "W_k")
_V = ("v_proj", "value", "v", "wv", "W_v")
_QKV = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv")
_ATTN_OUT = ("o_proj", "c_proj", "out_proj", "dense", "wo")
_MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "mlp.fc2", "output.dense", "mlp.dense_4h_to_h",
            "feed_forward.w2", "mlp.w2")
_PASS = re.compile(r"^(View|UnsafeView|ReshapeAlias|Clone|Alias|NativeDropout|ToCopy|Contiguous|"
                   r"Transpose|Permute|Expand)Backward\d*$")


@dataclass
class LayerSites:
    """Where layer ``index`` branches, as (node, slot) tensor references."""

    index: int
    attention: str                      # qualified name of the attention core module
    residual: tuple                     # R_L
    attn_skip: tuple                    # (residual add node, input index of R_L)
    entries: dict                       # "query"/"key"/"value" -> (node, slot) of the projection output
    attn_node: object = None            # the fused/SDPA attention node, if any
    mlp_residual: Optional[tuple] = None  # R'_L
    mlp_skip: Optional[tuple] = None


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
        """Index into ATTN_BRANCHES of the branch the top path takes, [batch, T]."""
        return torch.stack([self.attention[layer][b] for b in ATTN_BRANCHES], -1).argmax(-1)

    def top_head(self, layer: int) -> Optional[Tensor]:
        """(branch index, head) of the top path inside the attention, [batch, T, 2]."""
        if layer not in self.heads:
            return None
        h = torch.stack([self.heads[layer][b] for b in ATTN_BRANCHES[:3]], -2)   # [B, T, 3, H]
        flat = h.flatten(-2).argmax(-1)
        return torch.stack([flat // h.shape[-1], flat % h.shape[-1]], -1)

    def select(self, batch: int, length: Optional[int] = None) -> "BranchAttribution":
        """The attribution of one example of a batch (positions [:length])."""
        sl = slice(None) if length is None else slice(0, length)

        def cut(x):
            return x[batch:batch + 1, sl]
        return BranchAttribution(
            self.semiring, list(self.layers),
            {L: {b: cut(v) for b, v in d.items()} for L, d in self.attention.items()},
            {L: {b: cut(v) for b, v in d.items()} for L, d in self.mlp.items()},
            {L: {b: cut(v) for b, v in d.items()} for L, d in self.heads.items()},
            {L: cut(v) for L, v in self.total.items()}, dict(self.modules))

    def table(self, layer: int, batch: int = 0) -> dict:
        return {b: self.attention[layer][b][batch].tolist() for b in ATTN_BRANCHES}

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
    def __init__(self, graph: GradientGraph):
        self.graph = graph
        self.outputs: dict = {}          # module qualname -> output node (tagged by tracking)
        self.classes: dict = {}
        for node in graph.relevant:
            try:
                tags = node.metadata.get(_TAG)
            except (AttributeError, RuntimeError):
                tags = None
            for qual, cls, seq, _ in tags or ():
                self.outputs.setdefault(qual, node)
                self.classes[qual] = cls
        if not self.outputs:
            raise SemitritonError("branch attribution needs module names: call semitriton.patch(model) or "
                                  "semitriton.track(model) before the forward pass")

    def output_ref(self, qual: str):
        node = self.outputs.get(qual)
        return None if node is None else (node, 0)

    def child(self, parent: str, names) -> Optional[str]:
        for n in names:
            q = f"{parent}.{n}" if parent else n
            if q in self.outputs:
                return q
        return None


def _parent(q: str) -> str:
    return q.rsplit(".", 1)[0] if "." in q else ""


def _layer_index(q: str) -> Optional[int]:
    nums = re.findall(r"\.(\d+)(?:\.|$)", q)
    return int(nums[-1]) if nums else None


def _layer_prefix(q: str) -> str:
    m = list(re.finditer(r"\.(\d+)(?=\.|$)", q))
    return q[: m[-1].end()] if m else q


def _walk_to_add(graph: GradientGraph, ref):
    """From a module output, follow single consumers through weight-1 nodes to
    the residual add; returns (add node, input index of the *other* operand)."""
    for _ in range(16):
        cons = graph.consumers.get(ref, [])
        if len(cons) != 1:
            return None
        node, i = cons[0]
        name = type(node).__name__
        if name == "AddBackward0":
            other = 1 - i
            if node.next_functions[other][0] is None:
                return None
            return node, other
        if not _PASS.match(name):
            return None
        ref = (node, 0)
    return None


def discover(graph: GradientGraph) -> list:
    """The branch sites of every transformer layer found in the graph."""
    idx = _Index(graph)
    sites = []
    cores = sorted({_parent(q) for q in idx.outputs
                    if q.rsplit(".", 1)[-1] in _Q + _QKV},
                   key=lambda q: (_layer_index(q) or 0, q))
    for core in cores:
        L = _layer_index(core)
        if L is None:
            continue
        entries = {}
        fused = idx.child(core, _QKV)
        if fused:
            out = idx.output_ref(fused)
            split = [c for c, _ in graph.consumers.get(out, []) if "Split" in type(c).__name__]
            if not split:
                continue
            entries = {b: (split[0], s) for s, b in enumerate(ATTN_BRANCHES[:3])}
        else:
            for b, names in zip(ATTN_BRANCHES[:3], (_Q, _K, _V)):
                q = idx.child(core, names)
                if q is not None:
                    entries[b] = idx.output_ref(q)
        if len(entries) != 3:
            continue
        out_mod = idx.child(core, _ATTN_OUT) or idx.child(_parent(core), ("output.dense",))
        if out_mod is None:
            continue
        add = _walk_to_add(graph, idx.output_ref(out_mod))
        if add is None:
            continue
        add_node, other = add
        residual = add_node.next_functions[other]
        attn_node = next((n for n in graph.relevant if is_attention_node(n)
                          and graph.labels.of(n) and graph.labels.of(n)[0].startswith(core)), None)
        site = LayerSites(L, core, residual, (add_node, other), entries, attn_node)
        mlp_out = idx.child(_layer_prefix(core), _MLP_OUT)
        if mlp_out is not None:
            madd = _walk_to_add(graph, idx.output_ref(mlp_out))
            if madd is not None:
                site.mlp_residual = madd[0].next_functions[madd[1]]
                site.mlp_skip = madd
        sites.append(site)
    return sites


# ---- attribution ------------------------------------------------------------------------------------
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
    from .paths import PathGraph
    if graph is None:
        graph = PathGraph(output, inputs, "maxabs" if semiring is None else semiring, backend=backend)
    else:
        graph.check(output, inputs, graph.sr if semiring is None else semiring, "branch_attribution")
    sr = graph.sr
    if sr.name not in ("maxabs", "max"):
        raise ValueError("branch attribution reads top paths: use semiring 'maxabs' or 'max'")
    g, keep, dtype = graph.graph, graph.keep, graph.dtype
    sites = discover(g)
    if not sites:
        raise SemitritonError("no transformer layers with query/key/value projections were found in the "
                              "graph (is the model tracked, and does the output depend on the layers?)")
    res = BranchAttribution(sr.name, [s.index for s in sites])

    def value_of(ref):
        gr = keep.get(ref[0])
        v = None if gr is None else gr[ref[1]]
        if v is None:
            meta = ref[0]._input_metadata[ref[1]]
            v = sr.zero(tuple(meta.shape), dtype, meta.device)
        return v

    source = g.target_of(0)

    def token(v, ref=None):
        if at == "inputs" and ref is not None and ref != source:
            v = propagate({ref: v}, source, sr, dtype, g.labels, backend)
        return sr.readout(sr.sum(v, -1)).double().cpu()

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

    with torch.no_grad():
        for s in sites:
            res.modules[s.index] = s.attention
            br = {}
            for b, entry in s.entries.items():
                br[b] = token(propagate({entry: value_of(entry)}, s.residual, sr, dtype, g.labels, backend),
                              s.residual)
            br["skip"] = token(combine([edge_value(*s.attn_skip)], s.residual), s.residual)
            res.attention[s.index] = br
            res.total[s.index] = token(value_of(s.residual), s.residual)
            if s.mlp_residual is not None:
                cons = g.consumers.get(s.mlp_residual, [])
                res.mlp[s.index] = {
                    "mlp": token(combine([edge_value(n, i) for n, i in cons if (n, i) != s.mlp_skip],
                                         s.mlp_residual), s.mlp_residual),
                    "skip": token(combine([edge_value(*s.mlp_skip)], s.mlp_residual), s.mlp_residual),
                }
            if heads and s.attn_node is not None:
                res.heads[s.index] = _head_weights(s, keep, sr, dtype, g, backend, value_of, token)
    return res


def _head_weights(site, keep, sr, dtype, graph, backend, value_of, token) -> dict:
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
            if vals[i] is None:
                out[b].append(torch.zeros(1))
                continue
            ref = nexts[i]
            out[b].append(token(propagate({ref: vals[i]}, site.residual, sr, dtype, graph.labels, backend),
                                site.residual))
    return {b: torch.stack(v, -1) for b, v in out.items()}
