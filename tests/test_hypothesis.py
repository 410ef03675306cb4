"""Property tests: random shapes, broadcasts, masks and exact zeros, engine vs
oracle in float64 for every semiring."""

import math

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import semitriton
from conftest import SEMIRINGS, assert_semiring_close
from oracle import Program, Step, oracle

SETTINGS = dict(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _t(g, *shape, zeros=0.0):
    t = torch.randn(*shape, generator=g, dtype=torch.float64)
    if zeros:
        t = t * (torch.rand(*shape, generator=g, dtype=torch.float64) >= zeros)
    return t


def _check(prog, semiring):
    x = prog.inputs["x"].clone().requires_grad_()
    out = prog.engine(x)
    (got,) = semitriton.grad(out, x, semiring=semiring)
    assert_semiring_close(got, oracle(prog, semiring)["x"], semiring, 1e-9, prog.name)


@settings(**SETTINGS)
@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), n=st.integers(1, 5),
       m=st.integers(1, 5), k=st.integers(1, 5), zeros=st.sampled_from([0.0, 0.3, 0.7]),
       bias_bcast=st.booleans(), act=st.sampled_from(["relu", "gelu", "tanh", "silu"]),
       semiring=st.sampled_from(SEMIRINGS), seed=st.integers(0, 2 ** 16))
def test_linear_broadcast_zeros(lead, n, m, k, zeros, bias_bcast, act, semiring, seed):
    g = torch.Generator().manual_seed(seed)
    x = _t(g, *lead, n, m)
    W = _t(g, m, k, zeros=zeros)
    b = _t(g, 1, k) if bias_bcast else _t(g, *lead, n, k)
    s = _t(g, k, zeros=zeros)
    f = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}[act]
    steps = [Step("h", lambda x: x @ W, ("x",)), Step("hb", lambda h: h + b, ("h",)),
             Step("a", f, ("hb",)), Step("y", lambda a, x: a.sum(-1, keepdim=True) * x, ("a", "x")),
             Step("z", lambda y: y * s[:m] if m <= k else y, ("y",)),
             Step("out", lambda z: z.sum(), ("z",))]

    def engine(x):
        y = f(x @ W + b).sum(-1, keepdim=True) * x
        return (y * s[:m] if m <= k else y).sum()

    _check(Program("linear", {"x": x}, steps, engine), semiring)


@settings(**SETTINGS)
@given(B=st.integers(1, 2), H=st.sampled_from([1, 2, 4]), group=st.sampled_from([1, 2]),
       Tq=st.integers(1, 5), Tk=st.integers(1, 5), D=st.integers(1, 4),
       mask=st.sampled_from(["none", "bool", "float", "causal"]), zeros=st.sampled_from([0.0, 0.4]),
       semiring=st.sampled_from(SEMIRINGS), seed=st.integers(0, 2 ** 16))
def test_attention_masks_gqa(B, H, group, Tq, Tk, D, mask, zeros, semiring, seed):
    if H % group:
        group = 1
    Hk = H // group
    g = torch.Generator().manual_seed(seed)
    x = _t(g, B, H, Tq, D)
    K = _t(g, B, Hk, Tk, D, zeros=zeros)
    V = _t(g, B, Hk, Tk, D, zeros=zeros)
    keep = torch.rand(B, 1, Tq, Tk, generator=g) > 0.3
    keep[..., 0] = True                       # no fully masked row
    fb = torch.where(keep, _t(g, B, 1, Tq, Tk) * 0.5, torch.tensor(float("-inf"), dtype=torch.float64))
    scale = 1 / math.sqrt(D)
    if mask == "causal" and Tk < Tq:
        Tq = Tk
        x = x[:, :, :Tq]
    causal = torch.ones(Tq, Tk, dtype=torch.bool).tril()

    def scores(q, k):
        s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scale
        if mask == "bool":
            s = s.masked_fill(~keep, float("-inf"))
        elif mask == "float":
            s = s + fb
        elif mask == "causal":
            s = s.masked_fill(~causal, float("-inf"))
        return s

    kk = K  # k and v are constants here; q (from x) and the K/V branch through x
    steps = [Step("q", lambda x: x * 1.5, ("x",)),
             Step("k", lambda x: kk + x.mean(2, keepdim=True)[:, ::group], ("x",)),
             Step("v", lambda x: V + x.mean(2, keepdim=True)[:, ::group], ("x",)),
             Step("s", scores, ("q", "k")), Step("p", lambda s: torch.softmax(s, -1), ("s",)),
             Step("o", lambda p, v: p @ v.repeat_interleave(group, 1), ("p", "v")),
             Step("out", lambda o: (o * o.detach().sign()).sum(), ("o",))]

    def engine(x):
        q = x * 1.5
        k = kk + x.mean(2, keepdim=True)[:, ::group]
        v = V + x.mean(2, keepdim=True)[:, ::group]
        kw = {"enable_gqa": group > 1}
        if mask == "bool":
            kw["attn_mask"] = keep
        elif mask == "float":
            kw["attn_mask"] = fb
        elif mask == "causal":
            kw["is_causal"] = True
        o = F.scaled_dot_product_attention(q, k, v, **kw)
        return (o * o.detach().sign()).sum()

    _check(Program("attention", {"x": x}, steps, engine), semiring)


@settings(**SETTINGS)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), n=st.integers(2, 6),
       dim=st.integers(-2, -1), zeros=st.sampled_from([0.0, 0.5]), log=st.booleans(),
       semiring=st.sampled_from(SEMIRINGS), seed=st.integers(0, 2 ** 16))
def test_norms_and_softmax(shape, n, dim, zeros, log, semiring, seed):
    g = torch.Generator().manual_seed(seed)
    x = _t(g, *shape, n)
    if x.dim() < 2:
        dim = -1
    gam = _t(g, n, zeros=zeros)
    c = _t(g, *shape, n)
    sm = (lambda t: torch.log_softmax(t, dim)) if log else (lambda t: torch.softmax(t, dim))
    steps = [Step("h", lambda x: F.layer_norm(x, (n,), gam), ("x",)), Step("s", sm, ("h",)),
             Step("out", lambda s: (s * c).sum(), ("s",))]

    def engine(x):
        return (sm(F.layer_norm(x, (n,), gam)) * c).sum()

    _check(Program("norm_softmax", {"x": x}, steps, engine), semiring)
