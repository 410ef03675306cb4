"""Exact scalar-level paths: the k best paths, the signed top path, and path
sampling.

The scalar gradient graph is never built in full. One semiring pass (with
``keep``) stores each tensor's value: for maxabs the best |product| from
every scalar to the output, i.e. an exact potential. Paths are then grown
forward from the input, one scalar at a time: the out-edges of a scalar x
are the non-zero entries of the local Jacobian column J[:, x] of each node
that consumes x's tensor. That column is read off the node's own ``real``
rule by autograd (the rule is linear in the output values, so
∂ rule(g)[x] / ∂g = J[:, x]); attention, the one composite primitive, is
expanded into its canonical internal steps (scores S, probabilities P,
output O) so paths are reported scalar by scalar.

* :func:`top_paths` (maxabs): best-first search with the exact potentials and
  lazily sorted successor lists, which pops complete paths in exactly
  decreasing weight; k ≤ 16.
* :func:`top_paths` (max): the path with the largest signed product, by a
  walk that follows M+ or M- depending on the sign of each edge.
* :func:`sample_paths`: paths drawn with probability ∝ Π|w| exactly, each
  step choosing an out-edge with probability |w| Z(u) / Z(x) (abs values).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .columns import structural_column
from .engine import GradientGraph, compute_dtype, run
from .errors import user_stacklevel
from .modes import outside_inference_mode, recording, walk_mode
from .rules import RuleContext, rule_for
from .rules.attention import attention_args, is_attention_node
from .semirings import Real, Semiring, get, is_builtin
from .semirings.base import attention_probs

_REAL = Real()
MAX_K = 16


# ---- path objects ------------------------------------------------------------------------------
@dataclass
class PathStep:
    """One edge of a path: into element ``index`` of a tensor of ``shape``."""

    op: str             # e.g. "addmm", "layer_norm", "attention.scores", "view"
    node: str           # autograd node type (or the attention node for internal steps)
    module: str         # qualified module name, "" where unknown
    shape: tuple
    index: tuple
    weight: float       # the local derivative on this edge
    operand: str = ""   # "q", "k" or "v": the attention input this step leaves ("" elsewhere)

    def to_dict(self) -> dict:
        d = {"op": self.op, "node": self.node, "module": self.module, "shape": list(self.shape),
             "index": list(self.index), "weight": self.weight}
        if self.operand:
            d["operand"] = self.operand
        return d

    @classmethod
    def from_dict(cls, d) -> "PathStep":
        return cls(d["op"], d["node"], d["module"], tuple(d["shape"]), tuple(d["index"]), d["weight"],
                   d.get("operand", ""))


@dataclass
class Path:
    """A path from one scalar of the input to the output.

    ``weight``: |Π w| for maxabs and sampled paths, the signed Π w for max.
    ``source_index``: the input element. ``steps``: the edges in order."""

    weight: float
    source_index: tuple
    source_shape: tuple
    steps: list = field(default_factory=list)
    semiring: str = "maxabs"

    @property
    def product(self) -> float:
        return math.prod(s.weight for s in self.steps)

    @property
    def log_weight(self) -> float:
        return sum(math.log(abs(s.weight)) for s in self.steps)

    def modules(self) -> list:
        return [s.module for s in self.steps]

    def to_dict(self) -> dict:
        return {"weight": self.weight, "semiring": self.semiring, "source_index": list(self.source_index),
                "source_shape": list(self.source_shape), "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d) -> "Path":
        return cls(d["weight"], tuple(d["source_index"]), tuple(d["source_shape"]),
                   [PathStep.from_dict(s) for s in d["steps"]], d.get("semiring", "maxabs"))

    def __str__(self) -> str:
        lines = [f"path weight {self.weight:.6g} from input{list(self.source_index)}"]
        for s in self.steps:
            op = f"{s.op}[{s.operand}]" if s.operand else s.op
            lines.append(f"  ×{s.weight:+.4g}  {op:<18} {s.module or '-':<40} {list(s.index)}")
        return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def op_kind(node_name: str) -> str:
    """Friendly op name of an autograd node type ("AddmmBackward0" -> "addmm")."""
    base = re.sub(r"Backward\d*$", "", node_name)
    base = {"NativeLayerNorm": "layer_norm", "CanonicalRMSNorm": "rms_norm", "FusedRmsNorm": "rms_norm",
            "CanonicalElementwise": "activation", "CanonicalLinear": "linear", "RotaryEmbedding": "rope",
            "SafeSoftmax": "softmax", "_SafeSoftmax": "softmax",
            "ToCopy": "cast"}.get(base, base)
    base = re.sub(r"(\d)D(?![a-z])", r"\1d", base)            # MaxPool2D -> max_pool2d, not max_pool2_d
    return re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()


# ---- the scalar-level view -------------------------------------------------------------------------
_SINK = ("sink",)
#: op-name suffixes of the edges that enter attention from q, k or v (a fused
#: q/k/v projection gives these steps the same module, shape and index, so
#: the operand is the only thing that tells them apart); ``_make_path`` moves
#: the suffix into ``PathStep.operand``
_FROM_Q, _FROM_K, _FROM_V = ":q", ":k", ":v"


class PathGraph:
    """Out-edges and potentials of individual scalars of a recorded graph.

    Tensor references: ``("t", node, slot)`` for the forward output ``slot``
    of autograd ``node``; ``("S", node)`` / ``("P", node)`` for the scores and
    probabilities inside attention ``node`` ([B, H, Tq, Tk])."""

    @outside_inference_mode
    def __init__(self, output: Tensor, input: Tensor, semiring: Union[str, Semiring],
                 backend: Optional[str] = None):
        self.sr = _path_semiring(semiring, "PathGraph")
        self.output = output
        self.input = input
        self.graph = GradientGraph(output, [input])
        self.dtype = compute_dtype(output, [input])
        self.keep: dict = {}
        (self.input_value,) = run(output, [input], self.sr, backend=backend, keep=self.keep,
                                  graph=self.graph)
        tgt = self.graph.target_of(0)
        self.source = ("t",) + tgt if tgt is not None else None
        self.sink_ref = ("t", self.graph.root, output.output_nr) if self.graph.root is not None else None
        self._columns: dict = {}
        self._attn: dict = {}
        self._flat: dict = {}

    def check(self, output: Tensor, input: Tensor, semiring: Union[str, Semiring], who: str) -> None:
        """A reused graph must be the one the call asks about."""
        name = _path_semiring(semiring, who).name
        if self.sr.name != name:
            raise ValueError(f"{who}: graph= was built with semiring {self.sr.name!r}, the call asks for "
                             f"{name!r}; build PathGraph(output, input, {name!r})")
        if self.output is not output or self.input is not input:
            raise ValueError(f"{who}: graph= was built for another output or input tensor than the call's")

    # -- tensors ---------------------------------------------------------------------------------
    def shape(self, ref) -> tuple:
        if ref[0] == "t":
            return tuple(ref[1]._input_metadata[ref[2]].shape)
        a = self._attention(ref[1])
        return tuple(a["p"].shape)

    def value(self, ref) -> tuple:
        """The stored semiring value of a tensor (internal attention tensors are
        recomputed from the attention output's value with the semiring's own ops)."""
        if ref[0] == "t":
            g = self.keep.get(ref[1])
            v = None if g is None else g[ref[2]]
            if v is None:
                meta = ref[1]._input_metadata[ref[2]]
                v = self.sr.zero(tuple(meta.shape), self.dtype, meta.device)
            return v
        a = self._attention(ref[1])
        key = "v" + ref[0]
        if key not in a:
            vo = self.value(("t", ref[1], 0))
            with walk_mode(vo[0].device):
                a["vP"] = self.sr.matmul(vo, a["v"].transpose(-1, -2))
                a["vS"] = self.sr.softmax(a["vP"], a["p"], -1)
        return a[key]

    def module_of(self, node) -> str:
        lab = self.graph.labels.of(node)
        return lab[0] if lab else ""

    # -- attention internals --------------------------------------------------------------------------
    def _attention(self, node) -> dict:
        a = self._attn.get(node)
        if a is None:
            args = attention_args(node, self.dtype)
            q, k, v = (t.detach().to(self.dtype) for t in (args.q, args.k, args.v))
            group = q.shape[-3] // k.shape[-3]
            ke = k.repeat_interleave(group, dim=-3) if group > 1 else k
            ve = v.repeat_interleave(group, dim=-3) if group > 1 else v
            with walk_mode(q.device):
                p = attention_probs(q, ke, args.bias, args.causal, args.scale)
            a = self._attn[node] = {"q": q, "k": ke, "v": ve, "p": p, "scale": args.scale,
                                    "group": group, "hk": k.shape[-3]}
        return a

    def _attention_edges(self, node, slot: int, idx: tuple) -> list:
        """Out-edges of q/k/v element ``idx`` into S (scores) or O of attention
        ``node``, as edge groups."""
        a = self._attention(node)
        q, k, v, p, s, g = a["q"], a["k"], a["v"], a["p"], a["scale"], a["group"]
        shape = tuple(p.shape)                           # [..., H, Tq, Tk]
        Tq, Tk = shape[-2:]
        lead = idx[:-3]
        groups = []
        if slot == 0:                                    # q[.., h, i, d] -> S[.., h, i, j]: k[j, d]·s
            h, i, d = idx[-3:]
            w = k[lead + (h, slice(None), d)] * s
            flat = _ravel_t(lead + (h, i), shape[:-1]) * Tk + torch.arange(Tk)
            groups.append((("S", node), flat, w, "attention.scores" + _FROM_Q))
        elif slot == 1:                                  # k[.., hk, j, d] -> S[.., h, i, j]: q[i, d]·s
            hk, j, d = idx[-3:]
            for h in range(hk * g, hk * g + g):
                w = q[lead + (h, slice(None), d)] * s
                flat = (_ravel_t(lead + (h,), shape[:-2]) * Tq + torch.arange(Tq)) * Tk + j
                groups.append((("S", node), flat, w, "attention.scores" + _FROM_K))
        elif slot == 2:                                  # v[.., hk, j, d] -> O[.., h, i, d]: P[i, j]
            hk, j, d = idx[-3:]
            D = v.shape[-1]
            for h in range(hk * g, hk * g + g):
                w = p[lead + (h, slice(None), j)]
                flat = (_ravel_t(lead + (h,), shape[:-2]) * Tq + torch.arange(Tq)) * D + d
                groups.append((("t", node, 0), flat, w, "attention.values" + _FROM_V))
        return groups

    def _internal_edges(self, ref, idx: tuple) -> list:
        node = ref[1]
        a = self._attention(node)
        p, v = a["p"], a["v"]
        lead, (h, i, j) = idx[:-3], idx[-3:]
        if ref[0] == "S":                                # S[i, j] -> P[i, j']: P_ij' (δ - P_ij)
            row = p[lead + (h, i)]
            w = -row * row[j]
            w[j] = row[j] * (1 - row[j])
            flat = _ravel_t(lead + (h, i), tuple(p.shape[:-1])) * row.shape[0] + torch.arange(row.shape[0])
            return [(("P", node), flat, w, "attention.softmax")]
        vrow = v[lead + (h, j)]                           # P[i, j] -> O[i, d]: v[j, d]
        D = vrow.shape[0]
        flat = _ravel_t(lead + (h, i), tuple(p.shape[:-1])) * D + torch.arange(D)
        return [(("t", node, 0), flat, vrow, "attention.values")]

    # -- local Jacobian columns -------------------------------------------------------------------------
    def _column(self, node, slot: int, flat: int) -> list:
        """Non-zero entries J[u, x] of ``node``'s Jacobian for input ``slot``,
        element ``flat``: [(out_slot, flat indices u, weights)]."""
        key = (node, slot, flat)
        col = self._columns.get(key)
        if col is not None:
            return col
        col = structural_column(node, slot, flat, self.dtype)
        if col is not None:
            self._columns[key] = col
            return col
        metas = node._input_metadata
        # only the outputs the graph reads get a value (as in the walk: a norm's
        # mean/rstd outputs, read by nothing, must stay unreached)
        gs = [torch.ones(tuple(m.shape), dtype=self.dtype, device=m.device, requires_grad=True)
              if self.graph.consumers.get((node, o)) or ("t", node, o) == self.sink_ref else None
              for o, m in enumerate(metas)]
        needs = [i == slot for i in range(len(node.next_functions))]
        ctx = RuleContext(node, [None if g is None else (g,) for g in gs], needs, _REAL, self.dtype)
        fn = rule_for(node)
        col = []
        live = [(o, g) for o, g in enumerate(gs) if g is not None]
        with recording(self.output.device):
            res = fn(ctx)[slot]
            if res is not None and live and res[0].requires_grad:
                sel = res[0].reshape(-1)[flat]
                grads = torch.autograd.grad(sel, [g for _, g in live], allow_unused=True)
                for (o, _), gr in zip(live, grads):
                    if gr is None:
                        continue
                    gr = gr.detach().reshape(-1)
                    nz = torch.nonzero(gr, as_tuple=True)[0]
                    col.append((o, nz.cpu(), gr[nz].double().cpu()))
        self._columns[key] = col
        return col

    # -- successors --------------------------------------------------------------------------------
    def edge_groups(self, ref, idx: tuple) -> list:
        """All out-edges of scalar ``idx`` of tensor ``ref``, vectorised:
        [(ref_u, flat indices of u, weights, op, node name, module)]."""
        if ref == self.sink_ref:
            return [(_SINK, torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.float64),
                     "output", "", "")]
        out = []
        if ref[0] in ("S", "P"):
            node = ref[1]
            name, mod = type(node).__name__, self.module_of(node)
            return [(r, f.cpu(), w.detach().double().cpu(), op, name, mod)
                    for r, f, w, op in self._internal_edges(ref, idx)]
        flat = _ravel(idx, self.shape(ref))
        for cons, i in self.graph.consumers.get((ref[1], ref[2]), ()):
            name, mod = type(cons).__name__, self.module_of(cons)
            if is_attention_node(cons):
                out += [(r, f.cpu(), w.detach().double().cpu(), op, name, mod)
                        for r, f, w, op in self._attention_edges(cons, i, idx)]
                continue
            for o, fu, w in self._column(cons, i, flat):
                out.append((("t", cons, o), fu, w, op_kind(name), name, mod))
        return out

    def potentials(self, ref, component: int = 0) -> Tensor:
        """The stored value component of tensor ``ref``, flat, float64, on the CPU."""
        key = (ref, component)
        t = self._flat.get(key)
        if t is None:
            if ref == _SINK:
                t = torch.full((1,), 0.0 if self.sr.name != "max" else 1.0, dtype=torch.float64)
            else:
                t = self.value(ref)[component].detach().reshape(-1).double().cpu()
            self._flat[key] = t
        return t

    def edges(self, ref, idx: tuple) -> list:
        """All out-edges as tuples (ref_u, idx_u, weight, op, node name, module)."""
        out = []
        for r, flat, w, op, name, mod in self.edge_groups(ref, idx):
            shape = () if r == _SINK else self.shape(r)
            for f, ww in zip(flat.tolist(), w.tolist()):
                if ww != 0.0:
                    out.append((r, _unravel(f, shape), ww, op, name, mod))
        return out


def _ravel_t(idx, shape) -> int:
    return _ravel(tuple(int(i) for i in idx), tuple(shape))


def _ravel(idx, shape) -> int:
    f = 0
    for i, s in zip(idx, shape):
        f = f * s + i
    return f


def _unravel(flat: int, shape) -> tuple:
    out = []
    for s in reversed(shape):
        out.append(flat % s if s else 0)
        flat //= s if s else 1
    return tuple(reversed(out))


def _scalar(t: Tensor, idx: tuple) -> float:
    return float(t[idx]) if t.dim() else float(t)


def _element_index(index, shape: tuple, partial: bool = False) -> tuple:
    """``index`` (an int or a sequence, negative entries counting from the end)
    as a tuple of non-negative ints into ``shape``; IndexError if it does not
    name one element (``partial``: or the sub-tensor of its leading dims)."""
    if isinstance(index, Tensor):
        if index.is_floating_point() or index.is_complex():
            raise TypeError(f"index must hold integers, got a {index.dtype} tensor")
        index = index.tolist()
    index = tuple(int(i) for i in (index if isinstance(index, (tuple, list)) else (index,)))
    if len(index) > len(shape) or (not partial and len(index) != len(shape)) or not index:
        raise IndexError(f"index {index} has {len(index)} dims, input has {len(shape)}")
    for d, (i, n) in enumerate(zip(index, shape)):
        if not -n <= i < n:
            raise IndexError(f"index {index} is out of range in dim {d} (size {n})")
    return tuple(i % n for i, n in zip(index, shape))


def _start_region(index, batch, shape: tuple) -> tuple:
    """(one start element, or None; the leading index of the sub-tensor the
    starts are drawn from, or ()) for ``index`` (an element, or a prefix such
    as (b, t): every unit of token t of example b) and ``batch``."""
    b = _batch_index(batch, shape)
    if index is None:
        return None, (() if b is None else (b,))
    idx = _element_index(index, shape, partial=True)
    if b is not None and idx[0] != b:
        raise ValueError(f"index {idx} and batch {b} name different examples")
    return (idx, ()) if len(idx) == len(shape) else (None, idx)


def _region(prefix: tuple, shape: tuple) -> tuple:
    """(first flat index, number of elements) of ``input[prefix]``."""
    per = math.prod(shape[len(prefix):])
    return _ravel(prefix, shape[:len(prefix)]) * per, per


def _batch_index(batch: Optional[int], shape: tuple) -> Optional[int]:
    """``batch`` (negative counts from the end) as an index into ``shape[0]``."""
    if batch is None:
        return None
    if not shape or not -shape[0] <= int(batch) < shape[0]:
        raise IndexError(f"batch {batch} is out of range for an input of shape {tuple(shape)}")
    return int(batch) % shape[0]


# ---- top paths ---------------------------------------------------------------------------------------
def _check_tensors(output, input, who: str) -> None:
    for what, t in (("output", output), ("input", input)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{who}: {what} must be one tensor, got {type(t).__name__}"
                            + (" (paths run from one input tensor: call it once per input)"
                               if what == "input" and isinstance(t, (list, tuple)) else ""))


def _empty_paths(input: Tensor, n: int, index, prefix: tuple, semiring: str) -> list:
    """Paths of no edges (weight 1) when the output is the input itself:
    from ``input[index]``, else the first ``n`` elements (of ``input[prefix]``)."""
    shape = tuple(input.shape)
    if index is not None:
        starts = [index]
    else:
        lo, per = _region(prefix, shape)
        starts = [_unravel(f, shape) for f in range(lo, lo + min(per, n))]
    return [Path(1.0, tuple(int(i) for i in s), shape, [], semiring) for s in starts]


def _path_semiring(semiring: Union[str, Semiring], who: str) -> Semiring:
    """The built-in semiring a path readout runs: the path search reads the
    built-in algebras' values (maxabs/max/abs), so a user's class, whatever
    its name, is refused rather than read as the built-in of that name."""
    sr = get(semiring)
    if not is_builtin(sr):
        raise ValueError(f"{who}: paths are read with the built-in 'maxabs', 'max' or 'abs' semirings; "
                         f"got the custom semiring {type(sr).__name__} (named {sr.name!r}). Run it with "
                         "semitriton.grad / grad_values instead")
    return sr


@outside_inference_mode
def top_paths(output: Tensor, input: Tensor, k: int = 1, semiring: str = "maxabs",
              index: Optional[Sequence[int]] = None, backend: Optional[str] = None,
              graph: Optional[PathGraph] = None, batch: Optional[int] = None) -> list:
    """The ``k`` highest-weighted paths from any scalar of ``input`` (or from
    ``input[index]``: one scalar, or with fewer indices than dims any scalar
    of that sub-tensor, e.g. ``index=(b, t)`` for token t of example b; or
    from any scalar of ``input[batch]``) to ``output``, best first.

    ``semiring="maxabs"``: weights are |Π w|, exact k-best (k ≤ 16).
    ``semiring="max"``: the path with the largest signed product (k = 1).
    Exactly tied paths come in the order of their start scalars' flat
    indices, then of the out-edges. A :class:`PathGraph` built once can be
    passed as ``graph`` to query several indices without recomputing the
    pass."""
    name = _path_semiring(semiring, "top_paths").name
    if name not in ("maxabs", "max"):
        raise ValueError(f"top_paths supports semiring 'maxabs' (k-best) or 'max' (k=1), not {name!r}")
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}, got {k}")
    if name == "max" and k != 1:
        raise ValueError("the signed max semiring gives the single top path: use k=1 "
                         "(or semiring='maxabs' for the k best |products|)")
    _check_tensors(output, input, "top_paths")
    index, prefix = _start_region(index, batch, tuple(input.shape))
    if output is input:                  # each element is its own output: paths of no edges
        return _empty_paths(input, 1 if name == "max" else k, index, prefix, name)
    if graph is not None:
        graph.check(output, input, name, "top_paths")
    pg = graph if graph is not None else PathGraph(output, input, name, backend=backend)
    if pg.source is None or input.numel() == 0:
        return []
    if name == "max":
        p = _signed_top_path(pg, index, prefix)
        return [] if p is None else [p]
    return _kbest(pg, k, index, prefix)


class _Ranked:
    """The out-edges of one scalar ranked by log|w| + potential(u), best first;
    entries are materialised only when accessed."""

    def __init__(self, pg: PathGraph, ref, idx):
        self.pg = pg
        keys, lws, gids, pos = [], [], [], []
        self.groups = pg.edge_groups(ref, idx)
        for gi, (r, flat, w, *_rest) in enumerate(self.groups):
            pot = pg.potentials(r)[flat]
            lw = torch.log(w.abs())
            key = lw + pot
            keep = torch.isfinite(key)
            keys.append(key[keep])
            lws.append(lw[keep])
            gids.append(torch.full((int(keep.sum()),), gi, dtype=torch.long))
            pos.append(torch.nonzero(keep, as_tuple=True)[0])
        if keys:
            key = torch.cat(keys)
            order = torch.argsort(key, descending=True, stable=True)
            self.key, self.lw = key[order], torch.cat(lws)[order]
            self.gid, self.pos = torch.cat(gids)[order], torch.cat(pos)[order]
        else:
            self.key = torch.zeros(0, dtype=torch.float64)

    def __len__(self) -> int:
        return int(self.key.numel())

    def step(self, i: int) -> tuple:
        r, flat, w, op, name, mod = self.groups[int(self.gid[i])]
        j = int(self.pos[i])
        u = () if r == _SINK else _unravel(int(flat[j]), self.pg.shape(r))
        return (op, name, mod, r, u, float(w[j]))

    def __getitem__(self, i: int) -> tuple:
        return float(self.key[i]), float(self.lw[i]), self.step(i)


def _kbest(pg: PathGraph, k: int, index, prefix: tuple = ()) -> list:
    """Best-first search with exact potentials. A heap item is "partial path P
    (log weight g, head h) extended by the r-th best successor of h", with
    priority g + log|w_r| + pot(u_r) — an exact bound on its best completion.
    Popping it queues the extension's own best successor (same priority) and
    P's (r+1)-th alternative, so complete paths pop in decreasing weight."""
    NEG = float("-inf")
    src_val = pg.value(pg.source)[0]
    succ_cache: dict = {}

    def successors(ref, idx):
        s = succ_cache.get((ref, idx))
        if s is None:
            s = succ_cache[(ref, idx)] = _Ranked(pg, ref, idx)
        return s

    # the start scalars (a virtual source joined to each by weight 1); only the
    # top-k by potential can start one of the k best paths
    if index is not None:
        starts = [(_scalar(src_val, index), index)]
        _warn_if_nan_starts(src_val[index], "top_paths")
    else:
        part = src_val[prefix]
        flat = part.reshape(-1)
        _warn_if_nan_starts(flat, "top_paths")
        # stable: exactly tied starts come in index order
        order = torch.argsort(flat.nan_to_num(NEG), descending=True, stable=True)[: 4 * k]
        starts = [(float(flat[i]), prefix + _unravel(int(i), tuple(part.shape))) for i in order.tolist()]
    starts = [(pot, (("start", idx),), idx) for pot, idx in starts if pot > NEG]
    tie = itertools.count()
    heap: list = []

    def push_extension(g, head_ref, head_idx, steps, rank):
        succ = successors(head_ref, head_idx)
        if rank < len(succ):
            heapq.heappush(heap, (-(g + succ[rank][0]), next(tie), g, head_ref, head_idx, steps, rank))

    if starts:
        heapq.heappush(heap, (-starts[0][0], next(tie), 0.0, None, None, (), 0))
    out = []
    while heap and len(out) < k:
        _, _, g, ref, idx, steps, rank = heapq.heappop(heap)
        if ref is None:                                 # the virtual source's rank-th start
            if rank + 1 < len(starts):
                heapq.heappush(heap, (-starts[rank + 1][0], next(tie), 0.0, None, None, (), rank + 1))
            _, start_steps, sidx = starts[rank]
            push_extension(0.0, pg.source, sidx, start_steps, 0)
            continue
        _, lw, step = successors(ref, idx)[rank]
        push_extension(g, ref, idx, steps, rank + 1)    # P's next alternative
        steps = steps + (step,)
        if step[3] == _SINK:
            out.append(_make_path(pg, steps, "maxabs"))
            continue
        push_extension(g + lw, step[3], step[4], steps, 0)
    return out


def _nan_starts(values: Tensor) -> int:
    """How many start scalars have a NaN path weight."""
    return int(torch.isnan(values).sum()) if values.is_floating_point() else 0


def _warn_if_nan_starts(values: Tensor, fn: str) -> None:
    n = _nan_starts(values)
    if n:
        warnings.warn(f"semitriton: {fn}: {n} start scalar(s) have a NaN path weight (a NaN weight or activation "
                      "on some path from them, where torch's gradient is NaN too); paths through NaN edges are "
                      "skipped, so paths from those scalars can be missing", RuntimeWarning,
                      stacklevel=user_stacklevel())


def _make_path(pg: PathGraph, steps, semiring: str) -> Path:
    source = steps[0][1]
    out_steps = []
    for op, node, mod, r, u, w in steps[1:]:
        if r == _SINK:
            continue
        op, _, operand = op.partition(":")
        out_steps.append(PathStep(op, node, mod, pg.shape(r), tuple(int(i) for i in u), float(w), operand))
    prod = math.prod(s.weight for s in out_steps)
    weight = abs(prod) if semiring != "max" else prod
    return Path(weight, tuple(int(i) for i in source), tuple(pg.input.shape), out_steps, semiring)


def _signed_top_path(pg: PathGraph, index, prefix: tuple = ()) -> Optional[Path]:
    """Follow M+ (or M- after a negative edge) greedily; exact for k = 1."""
    NEG = float("-inf")
    src = pg.source
    vp, _ = pg.value(src)
    if index is None:
        part = vp[prefix]
        _warn_if_nan_starts(part, "top_paths")
        index = prefix + _unravel(int(torch.argmax(part.reshape(-1).nan_to_num(NEG))), tuple(part.shape))
    else:
        _warn_if_nan_starts(vp[index], "top_paths")
    if not _scalar(vp, index) > NEG:                    # no path (or a NaN weight)
        return None
    steps = [("start", index)]
    ref, idx, want_pos = src, index, True
    while ref != _SINK:
        best = None
        for r, flat, w, op, node, mod in pg.edge_groups(ref, idx):
            p, n = pg.potentials(r, 0)[flat], pg.potentials(r, 1 if r != _SINK else 0)[flat]
            live = (p != NEG) & (w != 0)
            if not bool(live.any()):
                continue
            if want_pos:          # continue with M+ after a positive edge, M- after a negative one
                cand = torch.where(live, torch.where(w > 0, w * p, w * n), torch.full_like(w, NEG))
                j = int(torch.argmax(cand))
                better = best is None or float(cand[j]) > best[0]
                nxt = bool(w[j] > 0)
            else:
                cand = torch.where(live, torch.where(w > 0, w * n, w * p), torch.full_like(w, float("inf")))
                j = int(torch.argmin(cand))
                better = best is None or float(cand[j]) < best[0]
                nxt = not bool(w[j] > 0)
            if better:
                u = () if r == _SINK else _unravel(int(flat[j]), pg.shape(r))
                best = (float(cand[j]), r, u, float(w[j]), op, node, mod, nxt)
        if best is None:
            return None
        _, r, u, w, op, node, mod, want_pos = best
        steps.append((op, node, mod, r, u, w))
        ref, idx = r, u
    return _make_path(pg, steps, "max")


# ---- sampling -----------------------------------------------------------------------------------------
@outside_inference_mode
def sample_paths(output: Tensor, input: Tensor, n: int = 100, index: Optional[Sequence[int]] = None,
                 seed: Optional[int] = None, backend: Optional[str] = None,
                 graph: Optional[PathGraph] = None, batch: Optional[int] = None) -> list:
    """Draw ``n`` paths with probability ∝ Π|w| exactly: the start scalar with
    probability Z(x)/ΣZ over ``input`` (or over ``input[batch]``, or
    ``input[index]``: one scalar, or a sub-tensor as in :func:`top_paths`),
    then each out-edge x -> u with probability |w| Z(u) / Z(x), using the abs
    semiring's values. The entropy semiring's H is the entropy of this
    distribution."""
    if n < 0:
        raise ValueError(f"n must be at least 0, got {n}")
    _check_tensors(output, input, "sample_paths")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None    # draws on the CPU
    index, prefix = _start_region(index, batch, tuple(input.shape))
    if output is input:                  # paths of no edges, each element Z = 1: a uniform start
        if input.numel() == 0:
            return []
        shape = tuple(input.shape)
        lo, per = _region(prefix, shape)
        starts = [index] * n if index is not None else \
            [_unravel(lo + f, shape) for f in torch.randint(per, (n,), generator=gen).tolist()]
        return [Path(1.0, tuple(int(i) for i in s), shape, [], "abs") for s in starts]
    if graph is not None:
        graph.check(output, input, "abs", "sample_paths")
    pg = graph if graph is not None else PathGraph(output, input, "abs", backend=backend)
    if pg.source is None or input.numel() == 0:
        return []
    src_val = pg.value(pg.source)[0].double().cpu()
    pool = src_val[prefix]                                        # where a start is drawn
    n_nan = _nan_starts(src_val[index] if index is not None else pool)
    if n_nan:
        raise ValueError(f"sample_paths: {n_nan} start scalar(s) have a NaN path weight (a NaN weight or "
                         "activation on some path from them, where torch's gradient is NaN too): the path "
                         "distribution is undefined; find the NaN in the forward pass or choose index= elsewhere")
    # no path from input[index] (or from any scalar of input / input[prefix]): nothing to draw
    if (float(src_val[index]) if index is not None else float(pool.max())) == float("-inf"):
        return []
    succ_cache: dict = {}

    def successors(ref, idx):
        s = succ_cache.get((ref, idx))
        if s is None:
            ranked = _Ranked(pg, ref, idx)
            s = succ_cache[(ref, idx)] = (ranked, torch.softmax(ranked.key, 0) if len(ranked) else None)
        return s

    paths = []
    start_p = torch.softmax(pool.reshape(-1), 0)
    for _ in range(n):
        if index is None:
            sidx = prefix + _unravel(int(torch.multinomial(start_p, 1, generator=gen)), tuple(pool.shape))
        else:
            sidx = index
        steps = [("start", sidx)]
        ref, idx = pg.source, sidx
        while ref != _SINK:
            ranked, probs = successors(ref, idx)
            if probs is None:       # Z(x) > 0 guarantees an out-edge with Z(u) > 0
                raise RuntimeError(f"sample_paths: scalar {idx} of {op_kind(type(ref[1]).__name__)} "
                                   "has a path weight but no out-edge that carries it (inconsistent "
                                   "semiring values)")
            step = ranked.step(int(torch.multinomial(probs, 1, generator=gen)))
            steps.append(step)
            ref, idx = step[3], step[4]
        paths.append(_make_path(pg, steps, "abs"))
    return paths
