"""Small programs written twice: as canonical primitives for the oracle and as
an ordinary torch forward (with fused ops: F.linear, F.layer_norm, SDPA) for
the engine. Together they cover every rule family: residual fan-out,
multi-head attention with and without masks, causal, GQA, RoPE, layer norm,
composed RMS norm, gating multiply, broadcasting, log-softmax, selects,
split/cat, embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from oracle import Program, Step


def _rand(g, *shape, zeros: float = 0.0):
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    if zeros:
        t = t * (torch.rand(*shape, generator=g, dtype=torch.float64) >= zeros)
    return t.float().double()          # values exactly representable in float32


def _p(t, dtype):
    return t.to(dtype)


# ---------------------------------------------------------------------------------------------
def residual_mlp(dtype=torch.float64, seed=0, sink=False, zeros=0.0):
    """x -> LN -> Linear -> gelu -> Linear -> + x (residual fan-out) -> * r (broadcast)."""
    g = torch.Generator().manual_seed(seed)
    B, T, D, Hd = 2, 3, 6, 8
    x = _rand(g, B, T, D)
    gam, bet = _rand(g, D), _rand(g, D)
    W1, b1 = _rand(g, Hd, D, zeros=zeros), _rand(g, Hd)
    W2, b2 = _rand(g, D, Hd, zeros=zeros), _rand(g, D)
    r = _rand(g, D)
    steps = [
        Step("h", lambda x: F.layer_norm(x, (D,), gam, bet), ("x",)),
        Step("t1", lambda h: h @ W1.T, ("h",)),
        Step("t2", lambda t: t + b1, ("t1",)),
        Step("a", lambda t: F.gelu(t), ("t2",)),
        Step("t3", lambda a: a @ W2.T, ("a",)),
        Step("t4", lambda t: t + b2, ("t3",)),
        Step("o", lambda t, x: t + x, ("t4", "x")),
        Step("y", lambda o: o * r, ("o",)),
    ]
    if not sink:
        steps.append(Step("out", lambda y: y.sum(), ("y",)))

    def engine(x):
        h = F.layer_norm(x, (D,), _p(gam, x.dtype), _p(bet, x.dtype))
        a = F.gelu(F.linear(h, _p(W1, x.dtype), _p(b1, x.dtype)))
        o = F.linear(a, _p(W2, x.dtype), _p(b2, x.dtype)) + x
        y = o * _p(r, x.dtype)
        return y if sink else y.sum()

    return Program("residual_mlp" + ("_sink" if sink else ""), {"x": x}, steps, engine)


# ---------------------------------------------------------------------------------------------
def _mha_common(g, B, T, D, H, zeros=0.0):
    Wq, Wk, Wv, Wo = (_rand(g, D, D, zeros=zeros) * 0.5 for _ in range(4))
    r = _rand(g, D)
    return Wq, Wk, Wv, Wo, r


def mha(dtype=torch.float64, seed=1, mask: str = "none", eager: bool = False, zeros=0.0):
    """Multi-head self-attention with the input fanning out to q, k, v and the skip.
    mask: none | bool | float | causal."""
    g = torch.Generator().manual_seed(seed)
    B, T, D, H = 2, 4, 8, 2
    Dh = D // H
    scale = 1.0 / math.sqrt(Dh)
    x = _rand(g, B, T, D)
    Wq, Wk, Wv, Wo, r = _mha_common(g, B, T, D, H, zeros)
    keep = torch.ones(B, 1, T, T, dtype=torch.bool)
    keep[0, :, :, -1] = False                      # padding key in example 0
    keep[1, :, 1, 0] = False
    fbias = torch.zeros(B, 1, T, T, dtype=torch.float64)
    fbias[0, :, :, -1] = float("-inf")
    fbias[1] = _rand(g, 1, T, T) * 0.3             # finite additive bias too
    fbias[1, :, 2, 1] = float("-inf")

    def heads(t):
        return t.reshape(B, T, H, Dh).transpose(1, 2)

    def scores(q, k):
        s = q @ k.transpose(-1, -2) * scale
        if mask == "bool":
            s = s.masked_fill(~keep, float("-inf"))
        elif mask == "float":
            s = s + fbias
        elif mask == "causal":
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        return s

    steps = [
        Step("q", lambda x: x @ Wq, ("x",)), Step("k", lambda x: x @ Wk, ("x",)),
        Step("v", lambda x: x @ Wv, ("x",)),
        Step("qh", heads, ("q",)), Step("kh", heads, ("k",)), Step("vh", heads, ("v",)),
        Step("s", scores, ("qh", "kh")),
        Step("p", lambda s: torch.softmax(s, -1), ("s",)),
        Step("oh", lambda p, v: p @ v, ("p", "vh")),
        Step("o", lambda o: o.transpose(1, 2).reshape(B, T, D), ("oh",)),
        Step("proj", lambda o: o @ Wo, ("o",)),
        Step("res", lambda a, x: a + x, ("proj", "x")),
        Step("out", lambda t: (t * r).sum(), ("res",)),
    ]

    def engine(x):
        dt = x.dtype
        q, k, v = (heads(x @ _p(W, dt)) for W in (Wq, Wk, Wv))
        if eager:
            s = torch.matmul(q, k.transpose(-1, -2)) * scale
            if mask == "bool":
                s = s.masked_fill(~keep, float("-inf"))
            elif mask == "float":
                s = s + _p(fbias, dt)
            elif mask == "causal":
                s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            o = torch.matmul(torch.softmax(s, -1), v)
        else:
            kw = {}
            if mask == "bool":
                kw["attn_mask"] = keep
            elif mask == "float":
                kw["attn_mask"] = _p(fbias, dt)
            elif mask == "causal":
                kw["is_causal"] = True
            o = F.scaled_dot_product_attention(q, k, v, **kw)
        o = o.transpose(1, 2).reshape(B, T, D) @ _p(Wo, dt) + x
        return (o * _p(r, dt)).sum()

    return Program(f"mha_{mask}_{'eager' if eager else 'sdpa'}", {"x": x}, steps, engine)


# ---------------------------------------------------------------------------------------------
def llama_block(dtype=torch.float64, seed=2, gqa_mode: str = "sdpa", zeros=0.0, fused_rope: bool = False):
    """Composed RMS norm, RoPE (slice/neg/cat; or semitriton's one-node
    RotaryEmbedding with ``fused_rope``), causal grouped-query attention,
    SwiGLU gating, residuals, final norm, log-softmax head and a logit
    difference at the last position (select/index)."""
    g = torch.Generator().manual_seed(seed)
    B, T, D, H, Hk, V = 1, 5, 8, 4, 2, 7
    Dh = D // H
    eps = 1e-6
    scale = 1.0 / math.sqrt(Dh)
    x = _rand(g, B, T, D)
    w1, w2, wf = (1 + 0.1 * _rand(g, D) for _ in range(3))
    Wq = _rand(g, D, H * Dh, zeros=zeros) * 0.5
    Wk = _rand(g, D, Hk * Dh, zeros=zeros) * 0.5
    Wv = _rand(g, D, Hk * Dh, zeros=zeros) * 0.5
    Wo = _rand(g, H * Dh, D, zeros=zeros) * 0.5
    Wg, Wu = _rand(g, D, 12, zeros=zeros) * 0.4, _rand(g, D, 12, zeros=zeros) * 0.4
    Wd = _rand(g, 12, D, zeros=zeros) * 0.4
    Wl = _rand(g, D, V)
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / (100.0 ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh))
    ang = torch.cat([pos[:, None] * inv[None]] * 2, -1)
    cos, sin = ang.cos().float().double(), ang.sin().float().double()

    def rms_steps(pfx, inp, w):
        return [
            Step(pfx + "sq", lambda t: t.pow(2), (inp,)),
            Step(pfx + "ms", lambda t: t.mean(-1, keepdim=True), (pfx + "sq",)),
            Step(pfx + "mse", lambda t: t + eps, (pfx + "ms",)),
            Step(pfx + "r", lambda t: torch.rsqrt(t), (pfx + "mse",)),
            Step(pfx + "xr", lambda t, r: t * r, (inp, pfx + "r")),
            Step(pfx + "out", lambda t: w * t, (pfx + "xr",)),
        ]

    def rope_steps(name, hname, nh):
        return [
            Step(name + "c", lambda t: t * cos, (hname,)),
            Step(name + "x1", lambda t: t[..., : Dh // 2], (hname,)),
            Step(name + "x2", lambda t: t[..., Dh // 2:], (hname,)),
            Step(name + "nx2", lambda t: -t, (name + "x2",)),
            Step(name + "rot", lambda a, b: torch.cat([a, b], -1), (name + "nx2", name + "x1")),
            Step(name + "rs", lambda t: t * sin, (name + "rot",)),
            Step(name + "e", lambda a, b: a + b, (name + "c", name + "rs")),
        ]

    def heads(n):
        return lambda t: t.reshape(B, T, n, Dh).transpose(1, 2)

    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def scores(q, k):
        k = k.repeat_interleave(H // Hk, dim=1)
        s = q @ k.transpose(-1, -2) * scale
        return s.masked_fill(~causal, float("-inf"))

    steps = rms_steps("n1", "x", w1) + [
        Step("q", lambda t: t @ Wq, ("n1out",)), Step("k", lambda t: t @ Wk, ("n1out",)),
        Step("v", lambda t: t @ Wv, ("n1out",)),
        Step("qh", heads(H), ("q",)), Step("kh", heads(Hk), ("k",)), Step("vh", heads(Hk), ("v",)),
    ] + rope_steps("qr", "qh", H) + rope_steps("kr", "kh", Hk) + [
        Step("s", scores, ("qre", "kre")),
        Step("p", lambda s: torch.softmax(s, -1), ("s",)),
        Step("oh", lambda p, v: p @ v.repeat_interleave(H // Hk, dim=1), ("p", "vh")),
        Step("o", lambda o: o.transpose(1, 2).reshape(B, T, D), ("oh",)),
        Step("ao", lambda o: o @ Wo, ("o",)),
        Step("h1", lambda a, x: x + a, ("ao", "x")),
    ] + rms_steps("n2", "h1", w2) + [
        Step("gt", lambda t: t @ Wg, ("n2out",)), Step("up", lambda t: t @ Wu, ("n2out",)),
        Step("act", lambda t: F.silu(t), ("gt",)),
        Step("gated", lambda a, u: a * u, ("act", "up")),
        Step("dn", lambda t: t @ Wd, ("gated",)),
        Step("h2", lambda a, h: h + a, ("dn", "h1")),
    ] + rms_steps("nf", "h2", wf) + [
        Step("logits", lambda t: t @ Wl, ("nfout",)),
        Step("logp", lambda t: torch.log_softmax(t, -1), ("logits",)),
        Step("last", lambda t: t[0, -1], ("logp",)),
        Step("out", lambda t: t[3] - t[5], ("last",)),
    ]

    def rms(t, w):
        return _p(w, t.dtype) * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))

    def rope(t):
        c, s = _p(cos, t.dtype), _p(sin, t.dtype)
        if fused_rope:
            from semitriton.fused import RotaryEmbedding
            return RotaryEmbedding.apply(t, c, s)
        rot = torch.cat([-t[..., Dh // 2:], t[..., : Dh // 2]], -1)
        return t * c + rot * s

    def engine(x):
        dt = x.dtype
        h = rms(x, w1)
        q = rope(heads(H)(h @ _p(Wq, dt)))
        k = rope(heads(Hk)(h @ _p(Wk, dt)))
        v = heads(Hk)(h @ _p(Wv, dt))
        if gqa_mode == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:   # HF-style repeat_kv: expand + reshape, then SDPA with a boolean mask
            def rep(t):
                return t[:, :, None].expand(B, Hk, H // Hk, T, Dh).reshape(B, H, T, Dh)
            o = F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=causal)
        h1 = x + o.transpose(1, 2).reshape(B, T, D) @ _p(Wo, dt)
        n2 = rms(h1, w2)
        h2 = h1 + (F.silu(n2 @ _p(Wg, dt)) * (n2 @ _p(Wu, dt))) @ _p(Wd, dt)
        logp = torch.log_softmax(rms(h2, wf) @ _p(Wl, dt), -1)
        last = logp[0, -1]
        return last[3] - last[5]

    return Program(f"llama_block_{gqa_mode}" + ("_fused_rope" if fused_rope else ""), {"x": x}, steps, engine)


# ---------------------------------------------------------------------------------------------
def broadcast_gating(dtype=torch.float64, seed=3, zeros=0.0):
    """Broadcasting (fan-out over expanded dims), a gating multiply of two
    input-derived tensors, division, split/cat, mean, tanh/sigmoid, softmax
    over a non-last dim, embeddings with a repeated id, and a non-scalar output."""
    g = torch.Generator().manual_seed(seed)
    V, D = 5, 4
    E = _rand(g, V, D, zeros=zeros)
    ids = torch.tensor([[1, 3, 1], [4, 0, 3]])
    gvec = _rand(g, D, zeros=zeros)
    c = _rand(g, 2, 1, 1, D)
    W = _rand(g, D, D, zeros=zeros)

    steps = [
        Step("e", lambda E: E[ids], ("E",)),                         # [2, 3, D]
        Step("y", lambda e: e * gvec, ("e",)),
        Step("z", lambda y: y.unsqueeze(0) + c, ("y",)),              # [2, 2, 3, D]
        Step("zw", lambda z: z @ W, ("z",)),
        Step("a", lambda z: torch.tanh(z), ("zw",)),
        Step("b", lambda z: torch.sigmoid(z), ("z",)),
        Step("ab", lambda a, b: a * b, ("a", "b")),                   # gating multiply
        Step("m", lambda t: t.mean(-1, keepdim=True), ("ab",)),
        Step("m2", lambda a, b: a * b, ("m", "m")),                  # x*x: two parallel edges
        Step("den", lambda t: 2.0 + t, ("m2",)),
        Step("dv", lambda t, d: t / d, ("ab", "den")),
        Step("p1", lambda t: t[..., :2], ("dv",)),
        Step("p2", lambda t: t[..., 2:], ("dv",)),
        Step("cat", lambda a, b: torch.cat([b * 2.0, a], -1), ("p1", "p2")),
        Step("sm", lambda t: torch.softmax(t, 1), ("cat",)),
        Step("out", lambda t, y: t.sum(0) * y, ("sm", "y")),        # non-scalar sink [2,3,D]
    ]

    def engine(E):
        y = F.embedding(ids, E) * _p(gvec, E.dtype)
        z = y.unsqueeze(0) + _p(c, E.dtype)
        ab = torch.tanh(z @ _p(W, E.dtype)) * torch.sigmoid(z)
        m = ab.mean(-1, keepdim=True)
        dv = ab / (2.0 + m * m)
        p1, p2 = dv.split([2, D - 2], -1)
        sm = torch.softmax(torch.cat([p2 * 2.0, p1], -1), 1)
        return sm.sum(0) * y

    return Program("broadcast_gating", {"E": E}, steps, engine)


def intermediate_input(dtype=torch.float64, seed=4):
    """Queries an intermediate activation and a leaf together."""
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, 3, 4)
    W1, W2 = _rand(g, 4, 5), _rand(g, 5, 4)
    steps = [
        Step("h", lambda x: torch.relu(x @ W1), ("x",)),
        Step("h2", lambda h: h @ W2, ("h",)),
        Step("o", lambda a, x: (a * x).sum(), ("h2", "x")),
    ]

    def engine(x):
        return ((torch.relu(x @ _p(W1, x.dtype)) @ _p(W2, x.dtype)) * x).sum()

    return Program("intermediate_input", {"x": x}, steps, engine)


def vector_products(dtype=torch.float64, seed=5):
    """1-D operands: vector @ matrix (torch squeezes the product in place:
    SqueezeBackward4), matrix @ vector (mv), a dot product, and the in-place
    views unsqueeze_ and t_."""
    g = torch.Generator().manual_seed(seed)
    x = _rand(g, 4)
    W1, W2, u = _rand(g, 4, 5), _rand(g, 3, 5), _rand(g, 3)
    steps = [
        Step("h", lambda x: x @ W1, ("x",)),                          # [5]
        Step("a", lambda h: torch.tanh(h), ("h",)),
        Step("m", lambda a: W2 @ a, ("a",)),                          # [3]
        Step("c", lambda m: m.reshape(1, 3).t(), ("m",)),             # [3, 1]
        Step("out", lambda c, m: torch.dot(c.reshape(3) * u, m), ("c", "m")),
    ]

    def engine(x):
        m = W2.to(x.dtype) @ torch.tanh(x @ _p(W1, x.dtype))
        c = m.clone()
        c.unsqueeze_(0)
        c.t_()
        return torch.dot(c.reshape(3) * _p(u, x.dtype), m)

    return Program("vector_products", {"x": x}, steps, engine)


def saturated(dtype=torch.float64, seed=6):
    """Nearly saturated rows: softmax and log-softmax whose top entry is
    1 - O(1e-7), and attention whose every query leans on key 0 (a sink, its
    probability 1 - O(1e-7)). The diagonal edge y_i(1 - y_i) must keep
    1 - y_i = Σ_{j≠i} y_j, which float32 loses when it forms 1 - y_i from y_i.
    The output reads the saturated entries, so that diagonal edges carry
    the top paths."""
    g = torch.Generator().manual_seed(seed)
    B, T, D = 2, 4, 4
    x = _rand(g, B, T, D)
    W, Wq, Wk, Wv = _rand(g, D, D), _rand(g, D, D), _rand(g, D, D), _rand(g, D, D)
    off = torch.zeros(D, dtype=torch.float64)
    off[1] = 16.0
    sink = torch.zeros(T, T, dtype=torch.float64)
    sink[:, 0] = 16.0
    scale = 0.5
    steps = [
        Step("a", lambda x: x @ W + off, ("x",)),
        Step("y", lambda a: torch.softmax(a, -1), ("a",)),
        Step("lp", lambda a: torch.log_softmax(a, -1), ("a",)),
        Step("q", lambda x: x @ Wq, ("x",)), Step("k", lambda x: x @ Wk, ("x",)),
        Step("v", lambda x: x @ Wv, ("x",)),
        Step("s", lambda q, k: q @ k.transpose(-1, -2) * scale + sink, ("q", "k")),
        Step("p", lambda s: torch.softmax(s, -1), ("s",)),
        Step("o", lambda p, v: p @ v, ("p", "v")),
        Step("out", lambda y, lp, p, o: y[..., 1].sum() + lp[..., 1].sum() + p[..., 0].sum() + o.sum(),
             ("y", "lp", "p", "o")),
    ]

    def engine(x):
        dt = x.dtype
        a = x @ _p(W, dt) + _p(off, dt)
        q, k, v = ((x @ _p(M, dt))[:, None] for M in (Wq, Wk, Wv))
        s = q @ k.transpose(-1, -2) * scale + _p(sink, dt)
        p = torch.softmax(s, -1)[:, 0]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=_p(sink, dt), scale=scale)[:, 0]
        return (torch.softmax(a, -1)[..., 1].sum() + torch.log_softmax(a, -1)[..., 1].sum() + p[..., 0].sum()
                + o.sum())

    return Program("saturated", {"x": x}, steps, engine)


def all_programs(zeros=0.0):
    return [
        residual_mlp(zeros=zeros), residual_mlp(sink=True, zeros=zeros),
        mha(zeros=zeros), mha(mask="bool", zeros=zeros), mha(mask="float", zeros=zeros),
        mha(mask="causal", zeros=zeros), mha(mask="bool", eager=True, zeros=zeros),
        mha(mask="float", eager=True, zeros=zeros),
        llama_block(zeros=zeros), llama_block(gqa_mode="repeat_kv", zeros=zeros),
        llama_block(zeros=zeros, fused_rope=True),
        broadcast_gating(zeros=zeros), vector_products(), saturated(),
    ]
