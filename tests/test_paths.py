"""Exact top paths, the signed top path and path sampling against brute-force
enumeration of the explicit scalar graph (tests/oracle.py)."""

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import semitriton
from oracle import Program, Step, enumerate_paths
from programs import residual_mlp


def _tiny_attention(mask="causal", group=2, seed=0, rope=False):
    """A tiny GQA attention block with residual fan-out (few enough paths to
    enumerate); ``rope``: rotary embedding of q and k (composed for the
    oracle, semitriton's one-node RotaryEmbedding in the engine)."""
    g = torch.Generator().manual_seed(seed)
    B, H, T, D = 1, 2, 3, 2
    Hk = H // group
    x = torch.randn(B, T, H * D, generator=g, dtype=torch.float64)
    Wq = torch.randn(H * D, H * D, generator=g, dtype=torch.float64)
    Wk = torch.randn(H * D, Hk * D, generator=g, dtype=torch.float64)
    Wv = torch.randn(H * D, Hk * D, generator=g, dtype=torch.float64)
    Wv[0, 1] = 0.0                                   # an exact zero: not an edge
    r = torch.randn(H * D, generator=g, dtype=torch.float64)
    scale = 1 / math.sqrt(D)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    ang = torch.arange(T, dtype=torch.float64)[:, None] * torch.tensor([0.7, 0.7], dtype=torch.float64)
    cos, sin = ang.cos(), ang.sin()                  # sin = 0 at position 0: no edge

    def heads(n):
        return lambda t: t.reshape(B, T, n, D).transpose(1, 2)

    def rot(t):
        return torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1) * sin

    def rope_steps(name):
        return [Step(name + "c", lambda t: t * cos, (name,)), Step(name + "r", rot, (name,)),
                Step(name + "e", lambda a, b: a + b, (name + "c", name + "r"))]

    def scores(q, k):
        s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scale
        return s.masked_fill(~causal, float("-inf")) if mask == "causal" else s

    steps = [Step("q", lambda x: x @ Wq, ("x",)), Step("k", lambda x: x @ Wk, ("x",)),
             Step("v", lambda x: x @ Wv, ("x",)),
             Step("qh", heads(H), ("q",)), Step("kh", heads(Hk), ("k",)), Step("vh", heads(Hk), ("v",))]
    if rope:
        steps += rope_steps("qh") + rope_steps("kh")
    qn, kn = ("qhe", "khe") if rope else ("qh", "kh")
    steps += [Step("s", scores, (qn, kn)), Step("p", lambda s: torch.softmax(s, -1), ("s",)),
             Step("oh", lambda p, v: p @ v.repeat_interleave(group, 1), ("p", "vh")),
             Step("o", lambda o: o.transpose(1, 2).reshape(B, T, H * D), ("oh",)),
             Step("res", lambda o, x: o + x, ("o", "x")),
             Step("out", lambda t: (t * r).sum(), ("res",))]

    def engine(x):
        q, k, v = heads(H)(x @ Wq), heads(Hk)(x @ Wk), heads(Hk)(x @ Wv)
        if rope:
            from semitriton.fused import RotaryEmbedding
            q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=mask == "causal", enable_gqa=group > 1)
        return ((o.transpose(1, 2).reshape(B, T, H * D) + x) * r).sum()

    return Program("tiny_attention", {"x": x}, steps, engine)


PROGS = [residual_mlp, lambda: _tiny_attention("causal", 2), lambda: _tiny_attention("none", 1),
         lambda: _tiny_attention("causal", 2, rope=True)]
IDS = ["residual_mlp", "gqa_causal", "attention", "gqa_causal_rope"]


def _products(prog):
    paths = enumerate_paths(prog, "x")
    return {i: [math.prod(p) for p in ps] for i, ps in paths.items()}


def _run(prog):
    x = prog.inputs["x"].clone().requires_grad_()
    return x, prog.engine(x)


@pytest.mark.parametrize("make", PROGS, ids=IDS)
def test_kbest_equals_brute_force(make):
    prog = make()
    prods = _products(prog)
    allw = sorted((abs(p) for ps in prods.values() for p in ps), reverse=True)
    x, out = _run(prog)
    k = 16
    paths = semitriton.top_paths(out, x, k=k)
    assert len(paths) == k
    got = [p.weight for p in paths]
    assert got == sorted(got, reverse=True)
    for a, b in zip(got, allw[:k]):
        assert a == pytest.approx(b, rel=1e-10)
    for p in paths:                               # steps multiply to the path weight
        assert abs(p.product) == pytest.approx(p.weight, rel=1e-12)
        assert p.steps[-1].shape == ()            # ends at the (scalar) output
    # from one given scalar
    shape = tuple(prog.inputs["x"].shape)
    flat = 4
    idx = torch.unravel_index(torch.tensor(flat), shape)
    idx = tuple(int(i) for i in idx)
    per = sorted((abs(p) for p in prods[flat]), reverse=True)
    got = semitriton.top_paths(out, x, k=5, index=idx)
    assert [p.source_index for p in got] == [idx] * len(got)
    for a, b in zip([p.weight for p in got], per[:5]):
        assert a == pytest.approx(b, rel=1e-10)


@pytest.mark.parametrize("make", PROGS, ids=IDS)
def test_signed_top_path_equals_brute_force(make):
    prog = make()
    prods = _products(prog)
    x, out = _run(prog)
    (p,) = semitriton.top_paths(out, x, k=1, semiring="max")
    best = max(max(ps) for ps in prods.values() if ps)
    assert p.weight == pytest.approx(best, rel=1e-10)
    assert p.product == pytest.approx(p.weight, rel=1e-12)
    (m,) = semitriton.grad(out, x, semiring="max")
    assert m.max().item() == pytest.approx(best, rel=1e-10)
    # per scalar
    for flat in (0, 5):
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(x.shape)))
        (q,) = semitriton.top_paths(out, x, semiring="max", index=idx)
        assert q.weight == pytest.approx(max(prods[flat]), rel=1e-10)


def test_sampling_matches_exact_path_probabilities():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 2, generator=g, dtype=torch.float64)
    W = torch.randn(2, 2, generator=g, dtype=torch.float64)
    prog = Program("small", {"x": x0}, [
        Step("a", lambda x: x @ W, ("x",)), Step("b", lambda a: torch.tanh(a), ("a",)),
        Step("c", lambda b, x: b * x, ("b", "x")), Step("out", lambda c: c.sum(), ("c",))], None)
    paths = enumerate_paths(prog, "x")
    x = x0.clone().requires_grad_()
    out = (torch.tanh(x @ W) * x).sum()
    idx = (0, 1)
    flat = 1
    exact = [abs(math.prod(p)) for p in paths[flat]]
    z = sum(exact)
    n = 4000
    samples = semitriton.sample_paths(out, x, n=n, index=idx, seed=0)
    keys = Counter(tuple(round(abs(s.weight), 12) for s in [p]) for p in samples)
    for w in set(round(e, 12) for e in exact):
        expected = sum(e for e in exact if round(e, 12) == w) / z
        observed = keys.get((w,), 0) / n
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 1e-3
    # the entropy of that distribution is the entropy semiring's readout
    (h,) = semitriton.grad(out, x, semiring="entropy")
    ent = -sum(e / z * math.log(e / z) for e in exact)
    assert h[idx].item() == pytest.approx(ent, rel=1e-9)
    # drawing from any scalar: start in proportion to Z
    anyp = semitriton.sample_paths(out, x, n=2000, seed=1)
    (zz,) = semitriton.grad(out, x, semiring="abs")
    start = Counter(p.source_index for p in anyp)
    frac = start[(0, 1)] / 2000
    exp = (zz[0, 1] / zz.sum()).item()
    assert abs(frac - exp) < 4 * math.sqrt(exp * (1 - exp) / 2000) + 1e-3
    # drawing from one row (an example of a batch): starts in that row, in proportion to its Z
    rowp = semitriton.sample_paths(out, x, n=2000, seed=2, batch=-2)
    assert {p.source_index[0] for p in rowp} == {0}
    frac = Counter(p.source_index for p in rowp)[(0, 1)] / 2000
    exp = (zz[0, 1] / zz[0].sum()).item()
    assert abs(frac - exp) < 4 * math.sqrt(exp * (1 - exp) / 2000) + 1e-3
    assert {p.source_index[0] for p in semitriton.sample_paths(x, x, n=20, seed=0, batch=1)} == {1}
    with pytest.raises(IndexError, match="batch 2 is out of range"):
        semitriton.sample_paths(out, x, n=1, batch=2)


def test_paths_name_modules_on_a_patched_model():
    pytest.importorskip("transformers")
    from hf_models import build, embeds_and_output
    model = semitriton.patch(build("llama", "sdpa"))
    emb, score = embeds_and_output(model, "llama", torch.tensor([[3, 5, 7, 9]]))
    (p,) = semitriton.top_paths(score[0], emb, k=1)
    mods = [s.module for s in p.steps if s.module]
    assert any("layers." in m for m in mods) and p.steps[-1].shape == ()
    assert abs(p.product) == pytest.approx(p.weight, rel=1e-6)
    (m,) = semitriton.grad(score[0], emb, semiring="maxabs")
    assert p.weight == pytest.approx(m.max().item(), rel=1e-5)
    (s,) = semitriton.top_paths(score[0], emb, semiring="max")
    (mp,) = semitriton.grad(score[0], emb, semiring="max")
    assert s.weight == pytest.approx(mp.max().item(), rel=1e-5)
    # JSON round trip
    q = semitriton.Path.from_dict(p.to_dict())
    assert q.weight == p.weight and len(q.steps) == len(p.steps)


def test_top_paths_arguments():
    x = torch.randn(3, requires_grad=True)
    out = (x * 2).sum()
    with pytest.raises(ValueError, match="k must be between 1 and 16"):
        semitriton.top_paths(out, x, k=17)
    with pytest.raises(ValueError, match="k=1"):
        semitriton.top_paths(out, x, k=2, semiring="max")
    with pytest.raises(ValueError, match="maxabs"):
        semitriton.top_paths(out, x, semiring="abs")
    with pytest.raises(TypeError, match="input must be one tensor, got list"):
        semitriton.top_paths(out, [x])
    with pytest.raises(TypeError, match="input must be one tensor"):
        semitriton.sample_paths(out, (x,))
    with pytest.raises(TypeError, match="integers"):
        semitriton.top_paths(out, x, index=torch.tensor([1.0]))


def test_index_may_be_a_tensor():
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    out = torch.tanh(x @ torch.randn(3, 3, dtype=torch.float64)).sum()
    (a,) = semitriton.top_paths(out, x, index=torch.tensor([1, 2]))
    (b,) = semitriton.top_paths(out, x, index=(1, 2))
    assert a.source_index == b.source_index == (1, 2) and a.weight == b.weight


@pytest.mark.parametrize("semiring", ["maxabs", "max"])
def test_empty_inputs_have_no_paths(semiring):
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    e = torch.zeros(0, 3, dtype=torch.float64, requires_grad=True)
    out = (e.sum(0) * x).sum()
    assert semitriton.top_paths(out, e, semiring=semiring) == []
    assert semitriton.sample_paths(out, e, n=2) == []


def test_output_is_the_input_paths_of_no_edges():
    """grad(x, x) reads 1 everywhere (each element is its own output); the
    paths are the empty ones, weight 1, as many as asked for."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    (m,) = semitriton.grad(x, x, semiring="maxabs")
    assert bool((m == 1).all())
    ps = semitriton.top_paths(x, x, k=4)
    assert [p.source_index for p in ps] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert all(p.weight == 1.0 and p.steps == [] for p in ps)
    assert [p.source_index for p in semitriton.top_paths(x, x, k=2, batch=1)] == [(1, 0), (1, 1)]
    assert [p.source_index for p in semitriton.top_paths(x, x, semiring="max", index=(1, -1))] == [(1, 2)]
    sampled = semitriton.sample_paths(x, x, n=5, seed=0)
    assert len(sampled) == 5 and all(p.weight == 1.0 and not p.steps for p in sampled)


def test_an_index_prefix_starts_anywhere_in_its_sub_tensor():
    """``index=(i, j)`` on a 3-d input: the k best paths starting at any
    scalar of ``input[i, j]``, against brute force over that slice; the signed
    top path and sampling draw there too; a prefix that disagrees with
    ``batch`` is an error."""
    prog = residual_mlp()
    prods = _products(prog)
    x, out = _run(prog)
    shape = tuple(x.shape)
    prefix = (0, -2)
    rows = [f for f in range(x.numel()) if tuple(torch.unravel_index(torch.tensor(f), shape))[:2] == (0, 1)]
    best = sorted((abs(w) for f in rows for w in prods[f]), reverse=True)[:4]
    got = semitriton.top_paths(out, x, k=4, index=prefix)
    assert [p.weight for p in got] == pytest.approx(best, rel=1e-10)
    assert all(p.source_index[:2] == (0, 1) for p in got)
    (s,) = semitriton.top_paths(out, x, semiring="max", index=prefix)
    assert s.source_index[:2] == (0, 1)
    assert s.weight == pytest.approx(max(w for f in rows for w in prods[f]), rel=1e-10)
    assert {p.source_index[:2] for p in semitriton.sample_paths(out, x, n=20, index=prefix, seed=0)} == {(0, 1)}
    assert semitriton.top_paths(out, x, k=4, index=(0,)) == semitriton.top_paths(out, x, k=4, batch=0)
    assert semitriton.top_paths(out, x, k=2, index=prefix, batch=0)[0].weight == got[0].weight
    with pytest.raises(ValueError, match="name different examples"):
        semitriton.top_paths(out, x, index=(0, 1), batch=1)


def test_negative_indices_name_the_same_scalar():
    """``index`` counts from the end like tensor indexing: the path, its
    ``source_index`` and its weight are those of the normalised element."""
    prog = residual_mlp()
    prods = _products(prog)
    x, out = _run(prog)
    neg, pos = (0, -1, -2), (0, 2, 4)
    flat = (pos[0] * 3 + pos[1]) * 6 + pos[2]
    got = semitriton.top_paths(out, x, k=3, index=neg)
    assert [p.source_index for p in got] == [pos] * 3
    for p, b in zip(got, sorted((abs(w) for w in prods[flat]), reverse=True)):
        assert p.weight == pytest.approx(b, rel=1e-10)
    (s,) = semitriton.top_paths(out, x, semiring="max", index=neg)
    assert s.source_index == pos and s.weight == pytest.approx(max(prods[flat]), rel=1e-10)
    assert {p.source_index for p in semitriton.sample_paths(out, x, n=5, index=neg, seed=0)} == {pos}
    for bad in ((0, 3, 0), (0, -4, 0), (2, 0, 0)):
        with pytest.raises(IndexError, match="out of range"):
            semitriton.top_paths(out, x, index=bad)
        with pytest.raises(IndexError, match="out of range"):
            semitriton.sample_paths(out, x, index=bad)


def test_no_path_from_a_scalar_means_no_paths():
    """A scalar whose every edge weighs exactly 0 has no path: nothing to
    return, nothing to sample (not a path of weight 1 with no steps)."""
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    out = (x * torch.tensor([2.0, 0.0, 5.0], dtype=torch.float64)).sum()
    assert semitriton.top_paths(out, x, index=(1,)) == []
    assert semitriton.top_paths(out, x, index=(1,), semiring="max") == []
    assert semitriton.sample_paths(out, x, n=3, index=(1,), seed=0) == []
    drawn = semitriton.sample_paths(out, x, n=50, seed=0)
    assert {p.source_index for p in drawn} <= {(0,), (2,)} and all(len(p.steps) == 2 for p in drawn)


def test_a_reused_graph_must_match_the_call():
    prog = residual_mlp()
    x, out = _run(prog)
    pg = semitriton.PathGraph(out, x, "max")
    with pytest.raises(ValueError, match="built with semiring 'max'"):
        semitriton.top_paths(out, x, k=2, graph=pg)
    out2 = out * 2
    pgm = semitriton.PathGraph(out, x, "maxabs")
    with pytest.raises(ValueError, match="another output or input"):
        semitriton.top_paths(out2, x, k=2, graph=pgm)
    with pytest.raises(ValueError, match="built with semiring 'maxabs'"):
        semitriton.sample_paths(out, x, n=2, graph=pgm)
    with pytest.raises(ValueError, match="n must be at least 0"):
        semitriton.sample_paths(out, x, n=-1)
    assert [p.weight for p in semitriton.top_paths(out, x, k=2, graph=pgm)] == \
        [p.weight for p in semitriton.top_paths(out, x, k=2)]


def test_op_kind_names():
    """Friendly op names of node types, "2D" kept as one word as aten spells it."""
    from semitriton.paths import op_kind
    assert op_kind("AddmmBackward0") == "addmm"
    assert op_kind("NativeLayerNormBackward0") == "layer_norm"
    assert op_kind("MaxPool2DWithIndicesBackward0") == "max_pool2d_with_indices"
    assert op_kind("UpsampleBilinear2DBackward0") == "upsample_bilinear2d"
    assert op_kind("GridSampler3DBackward0") == "grid_sampler3d"
    assert op_kind("TBackward0") == "t"


def _normalised(col):
    out = {}
    for o, u, w in col:
        out.setdefault(o, []).extend(zip(u.tolist(), w.tolist()))
    return {o: sorted(v) for o, v in out.items() if v}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_structural_columns_equal_the_generic_ones(dtype, monkeypatch):
    """Index maps (views, transposes, permutes, negative and stepped selects
    and slices, squeezes) and matrix products (mm, addmm with α ≠ 1) have their
    Jacobian columns read off the saved attributes: every column of every such
    node equals the one from the node's real rule and autograd."""
    from semitriton import columns, paths
    g = torch.Generator().manual_seed(0)
    rms = semitriton.patch(torch.nn.Sequential(torch.nn.RMSNorm(4, eps=1e-5))).to(dtype)
    rms[0].weight.data.normal_(1, 0.3, generator=g)
    x = torch.randn(2, 3, 4, generator=g, dtype=dtype, requires_grad=True)
    W0 = torch.randn(4, 5, generator=g, dtype=dtype, requires_grad=True)
    W = W0 * (x.sum() / 1000 + 1)                                    # on a path from x too (mm's slot 1)
    W[1, 2].data.zero_()                                             # an exact zero: no edge
    bias = torch.randn(5, generator=g, dtype=dtype, requires_grad=True)
    pieces = [
        x.view(6, 4), x.reshape(3, 8), x.transpose(0, 2), x.permute(2, 0, 1), x.permute(-1, -3, -2),
        x.select(1, -1), x.select(-1, 2), x[:, 1:], x[:, ::2], x[:, -2:-1], x[..., 1:4:2], x.narrow(2, 1, 2),
        x.unsqueeze(1), x.unsqueeze(-1), x[:1].squeeze(0), x[:, :1].squeeze(), x.transpose(1, 2).reshape(2, 12),
        x[0].t(), x.clone(), x.view(6, 4) @ W, torch.addmm(bias, x.view(6, 4), W, beta=0.5, alpha=1.5),
        torch.mm(W.t(), x.view(6, 4).t()), x + x.exp(), torch.add(x, x.sin(), alpha=1.5),
        torch.sub(x.cos(), x, alpha=0.5), x - x.tanh(), x + bias[:4], rms(x), rms(x * 3),
        F.layer_norm(x, (4,), bias[:4] + 1, bias[1:]), F.layer_norm(x * 2, (3, 4)),
    ]
    out = sum((p * torch.randn(p.shape, generator=g, dtype=dtype)).sum() for p in pieces)
    pg = paths.PathGraph(out, x, "maxabs")
    names, checked = set(), 0
    stack, seen = [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack += [fn for fn, _ in node.next_functions]
        if not pg.graph.consumers.get((node, 0)) and node is not out.grad_fn:
            continue                                     # not between x and out: never searched
        for slot in range(len(node.next_functions)):
            shape = columns._input_meta_shape(node, slot)
            if shape is None:
                continue
            for flat in range(math.prod(shape)):
                fast = columns.structural_column(node, slot, flat)
                if fast is None:
                    continue
                monkeypatch.setattr(paths, "structural_column", lambda *a: None)
                pg._columns.clear()
                slow = pg._column(node, slot, flat)
                monkeypatch.undo()
                a, b = _normalised(fast), _normalised(slow)
                if "Norm" in type(node).__name__:                        # the same Jacobian, other roundings
                    assert a.keys() == b.keys() and all([u for u, _ in a[o]] == [u for u, _ in b[o]] for o in a)
                    for o in a:
                        torch.testing.assert_close(torch.tensor([w for _, w in a[o]]),
                                                   torch.tensor([w for _, w in b[o]]),
                                                   rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=1e-7)
                else:
                    assert a == b, (type(node).__name__, slot, flat)
                names.add(type(node).__name__)
                checked += 1
    assert {"ViewBackward0", "TransposeBackward0", "PermuteBackward0", "SelectBackward0", "SliceBackward0",
            "UnsqueezeBackward0", "SqueezeBackward0", "TBackward0", "CloneBackward0", "MmBackward0",
            "AddmmBackward0", "UnsafeViewBackward0", "AddBackward0", "SubBackward0",
            "CanonicalRMSNormBackward", "NativeLayerNormBackward0"} <= names, names
    assert checked > 500


@pytest.mark.parametrize("semiring", ["maxabs", "max"])
def test_paths_through_a_group_norm(semiring):
    """A group norm node has three outputs (y, mean, rstd); the columns give
    only the read ones a value (the norm's rule refuses a value at mean/rstd)."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, dtype=torch.float64, requires_grad=True)
    gn = torch.nn.GroupNorm(2, 4).double()
    out = (gn(x) * torch.randn(1, 4, 6, dtype=torch.float64)).sum()
    (best,) = semitriton.grad(out, x, semiring=semiring)
    (p,) = semitriton.top_paths(out, x, k=1, semiring=semiring)
    assert p.weight == pytest.approx(float(best.max()), rel=1e-12)
    assert math.prod(s.weight for s in p.steps) == pytest.approx(p.weight, rel=1e-12)
    assert len(semitriton.sample_paths(out, x, n=3, seed=0)) == 3


def test_exactly_tied_starts_come_in_index_order():
    """Every path weighs exactly 1: the k best start at the first k scalars
    (the start ranking is a stable sort, as the out-edge ranking is)."""
    for n in (10, 5000):
        x = torch.randn(n, dtype=torch.float64, requires_grad=True)
        out = (x * 1.0).sum()
        assert [p.source_index for p in semitriton.top_paths(out, x, k=4)] == [(0,), (1,), (2,), (3,)]


def test_nan_path_weights_warn_in_top_paths_and_stop_sampling():
    """A NaN weight on an edge into a dead end makes the start's path weight
    NaN (as torch's gradient is): top_paths says paths can be missing;
    sample_paths refuses, naming the NaN, instead of failing inside
    torch.multinomial."""
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 0.5], [float("nan"), 3.0]], dtype=torch.float64)
    out = (x @ w)[1]
    with pytest.warns(RuntimeWarning, match=r"top_paths: 1 start scalar\(s\) have a NaN path weight"):
        paths = semitriton.top_paths(out, x, k=4)
    assert [(p.source_index, p.weight) for p in paths] == [((0,), 0.5)]
    with pytest.warns(RuntimeWarning, match="NaN path weight"):
        semitriton.top_paths(out, x, index=(1,))
    with pytest.warns(RuntimeWarning, match=r"top_paths: 1 start scalar\(s\) have a NaN path weight"):
        signed = semitriton.top_paths(out, x, semiring="max")
    assert [(p.source_index, p.weight) for p in signed] == [((0,), 0.5)]
    with pytest.raises(ValueError, match=r"sample_paths: 1 start scalar\(s\) have a NaN path weight"):
        semitriton.sample_paths(out, x, n=3, seed=0)
    assert [p.source_index for p in semitriton.sample_paths(out, x, n=3, index=(0,), seed=0)] == [(0,)] * 3
