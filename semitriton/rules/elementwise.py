"""Elementwise primitives: one edge x[i] -> y[i] per input (broadcasting is
fan-out, ⊕-summed back to the input's shape)."""

from __future__ import annotations

import functools
import math

import torch

from ..errors import GraphError
from ..modes import recording
from . import RuleContext, rule, zero_where


def _pull(ctx: RuleContext, i: int, w=None, grad_index: int = 0):
    """Value of input ``i`` through the elementwise edge ``w`` (None = weight 1)."""
    if not ctx.needs[i]:
        return None
    v = ctx.grad(grad_index)
    shape = ctx.input_shape(i)
    if w is not None:
        if not isinstance(w, torch.Tensor):
            if w == 0:
                return None
            if w == 1:
                w = None
        if w is not None:
            w = ctx.tensor(w)
            v = ctx.sr.scale(v, w)
    return ctx.sr.sum_to_shape(v, shape)


#: points where torch versions' backward formulas differ: name -> (f, args); a
#: float argument is a float64 tensor that requires grad, an int one an int64
#: tensor, None stays None. :func:`_torch_edges` asks the running torch for
#: the edges of the float arguments there.
_VERSIONED_EDGES = {
    "atan2_origin": (torch.atan2, (0.0, 0.0)),             # NaN as x/(x² + y²) reads; 0 in torch 2.13
    "ldexp_negative_exponent": (torch.ldexp, (1.0, -1)),   # 2^e formed in integers: 0 in torch 2.13
    "fmax_tie": (torch.fmax, (1.0, 1.0)),                  # 1 (all to self) in 2.13, 0.5 in 2.14
    "fmin_tie": (torch.fmin, (1.0, 1.0)),
    "clamp_min_tie": (torch.clamp_min, (1.0, 1.0)),
    "clamp_max_tie": (torch.clamp_max, (1.0, 1.0)),
    # torch.clamp(x, min, max) with tensor bounds: (x, min, max) edges where x meets a bound,
    # or both bounds are equal (2.13 gives 1 to x at a bound, nothing below equal bounds;
    # 2.14 splits a bound 0.5/0.5 and gives min its 1 below equal bounds)
    "clamp_at_min": (torch.clamp, (1.0, 1.0, 2.0)),
    "clamp_at_max": (torch.clamp, (2.0, 1.0, 2.0)),
    "clamp_below_equal": (torch.clamp, (0.0, 1.0, 1.0)),
    "clamp_at_equal": (torch.clamp, (1.0, 1.0, 1.0)),
    "clamp_above_equal": (torch.clamp, (2.0, 1.0, 1.0)),
    "clamp_min_only_tie": (torch.clamp, (1.0, 1.0, None)),
    "clamp_max_only_tie": (torch.clamp, (1.0, None, 1.0)),
    # number bounds: x's edge where it meets one (1 in 2.13, 0 in 2.14)
    "clamp_number_at_min": (lambda x: torch.clamp(x, 1.0, 2.0), (1.0,)),
    "clamp_number_at_max": (lambda x: torch.clamp(x, 1.0, 2.0), (2.0,)),
    "clamp_number_at_equal": (lambda x: torch.clamp(x, 1.0, 1.0), (1.0,)),
    "clamp_number_min_only": (lambda x: torch.clamp(x, min=1.0), (1.0,)),
    "clamp_number_max_only": (lambda x: torch.clamp(x, max=1.0), (1.0,)),
    "clamp_min_number": (lambda x: torch.clamp_min(x, 1.0), (1.0,)),
    "clamp_max_number": (lambda x: torch.clamp_max(x, 1.0), (1.0,)),
}


@functools.lru_cache(maxsize=None)
def _torch_edges(point: str) -> tuple:
    """The edges of the float arguments at one of :data:`_VERSIONED_EDGES`'
    points, as the running torch's backward gives them: asked once, in
    float64 on the CPU, so no rule differentiates or launches anything
    inside a pass."""
    fn, args = _VERSIONED_EDGES[point]
    with recording():
        xs = [None if a is None else
              torch.tensor([a], dtype=torch.float64, requires_grad=True) if isinstance(a, float) else
              torch.tensor([a], dtype=torch.int64) for a in args]
        wrt = [x for x, a in zip(xs, args) if isinstance(a, float)]
        grads = torch.autograd.grad(fn(*xs).sum(), wrt, allow_unused=True)
    return tuple(0.0 if g is None else float(g) for g in grads)


def _torch_edge(point: str) -> float:
    """The first float argument's edge at ``point`` (:func:`_torch_edges`)."""
    return _torch_edges(point)[0]


# ---- binary ------------------------------------------------------------------------------
@rule("AddBackward0")
def add(ctx):
    alpha = ctx.saved("alpha")
    return [_pull(ctx, 0), _pull(ctx, 1, alpha)]


@rule("SubBackward0")
def sub(ctx):
    alpha = ctx.saved("alpha")
    return [_pull(ctx, 0), _pull(ctx, 1, -alpha)]


@rule("RsubBackward0")
def rsub(ctx):  # rsub(self, other, alpha) = other - alpha * self
    alpha = ctx.saved("alpha")
    return [_pull(ctx, 0, -alpha), _pull(ctx, 1)]


@rule("RsubBackward1")
def rsub_scalar(ctx):
    return [_pull(ctx, 0, -ctx.saved("alpha"))]


@rule("AddBackward1", "SubBackward1", "CloneBackward0", "AliasBackward0", "ContiguousBackward0",
      "LiftFreshBackward0", "PositiveBackward0")
def identity(ctx):
    return [_pull(ctx, i) if i == 0 else None for i in range(ctx.n_inputs)]


@rule("MulBackward0")
def mul(ctx):
    out = [None, None]
    if ctx.needs[0]:
        out[0] = _pull(ctx, 0, ctx.saved("other"))
    if ctx.needs[1]:
        out[1] = _pull(ctx, 1, ctx.saved("self"))
    return out


@rule("MulBackward1")
def mul_scalar(ctx):
    return [_pull(ctx, 0, ctx.saved("other"))]


@rule("DivBackward0")
def div(ctx):
    other = ctx.saved("other")
    out = [None, None]
    if ctx.needs[0]:
        out[0] = _pull(ctx, 0, 1.0 / ctx.tensor(other))
    if ctx.needs[1]:
        s = ctx.saved("self")
        o = ctx.tensor(other)
        out[1] = _pull(ctx, 1, -ctx.tensor(s) / (o * o))
    return out


@rule("DivBackward1")
def div_scalar(ctx):
    return [_pull(ctx, 0, 1.0 / ctx.tensor(ctx.saved("other")))]


@rule("NegBackward0")
def neg(ctx):
    return [_pull(ctx, 0, -1.0)]


@rule("WhereBackward0")
def where(ctx):
    cond = ctx.saved("condition")
    # next_functions: (self, other) — the condition is not differentiable.
    out = []
    for i, sel in enumerate((cond, ~cond)):
        if i >= ctx.n_inputs or not ctx.needs[i]:
            out.append(None)
            continue
        v = zero_where(ctx.sr, ctx.grad(), ~sel)
        out.append(ctx.sr.sum_to_shape(v, ctx.input_shape(i)))
    return out + [None] * (ctx.n_inputs - len(out))


#: log of the probability below which a training-mode keep mask that keeps every element is
#: taken for ``train=False`` (a mask of all ones over many elements is not a random draw)
_LOG_IMPROBABLE = math.log(1e-9)


@rule("NativeDropoutBackward0")
def dropout(ctx):
    """Training-mode dropout (the node saves p and the keep mask): edge
    mask·1/(1 − p), 0 everywhere at p = 1 (as torch's backward). A direct
    ``torch.native_dropout(x, p, train=False)`` records the same node without
    saving ``train``; its mask keeps everything and its edge is 1. A mask
    keeping all n elements is read that way at p = 1 (a training draw keeps
    nothing) and where a training draw would keep all with probability
    (1 − p)^n < 1e-9 (no host sync: a tensor select); a small tensor's
    all-keep mask at 0 < p < 1 is read as training. ``F.dropout`` in eval
    mode records no node."""
    mask = ctx.saved("result1")
    p = float(ctx.saved("p"))
    edge = ctx.tensor(mask) * (0.0 if p == 1 else 1.0 / (1.0 - p))
    if p == 1 or (0 < p < 1 and mask.numel() * math.log1p(-p) < _LOG_IMPROBABLE):
        edge = torch.where(mask.all(), torch.ones_like(edge), edge)
    return [_pull(ctx, 0, edge)]


# ---- unary functions: edge weight f'(x) --------------------------------------------------
def _activation(name, kind_of):
    """GELU / SiLU: the semiring's fused ``activation`` op (derivative and ⊗ in one pass)."""
    @rule(name)
    def _r(ctx):
        out = [None] * ctx.n_inputs
        if ctx.needs[0]:
            x = ctx.saved("self", cast=False)
            v = ctx.sr.activation(ctx.grad(0), x, kind_of(ctx))
            out[0] = ctx.sr.sum_to_shape(v, ctx.input_shape(0))
        return out

    _r.__name__ = name
    return _r


def _unary(name, fn):
    @rule(name)
    def _r(ctx):
        if not ctx.needs[0]:
            return [None] * ctx.n_inputs
        return [_pull(ctx, 0, fn(ctx))] + [None] * (ctx.n_inputs - 1)

    _r.__name__ = name
    return _r


def _sig(x):
    return torch.sigmoid(x)


def _slope_where(c, above):
    """Leaky ReLU's edge: 1 where ``above``, the slope elsewhere, in the
    compute dtype (a Python-float where() would round the slope to float32; a
    fill, not torch.tensor's host copy, which a CUDA-graph capture cannot see)."""
    return torch.where(above, 1.0, torch.full((), float(c.saved("negative_slope")), dtype=c.dtype,
                                              device=above.device))


_activation("GeluBackward0", lambda c: "gelu_tanh" if c.saved("approximate") == "tanh" else "gelu")
_activation("SiluBackward0", lambda c: "silu")
_unary("ReluBackward0", lambda c: (c.saved("result") > 0).to(c.dtype))
_unary("TanhBackward0", lambda c: 1 - c.saved("result") ** 2)
_unary("SigmoidBackward0", lambda c: (lambda y: y * (1 - y))(c.saved("result")))
_unary("ExpBackward0", lambda c: c.saved("result"))
_unary("LogBackward0", lambda c: 1.0 / c.saved("self"))
_unary("Log1PBackward0", lambda c: 1.0 / (1 + c.saved("self")))
_unary("SqrtBackward0", lambda c: 0.5 / c.saved("result"))
_unary("RsqrtBackward0", lambda c: -0.5 * c.saved("result") ** 3)
_unary("ReciprocalBackward0", lambda c: -c.saved("result") ** 2)
_unary("SinBackward0", lambda c: torch.cos(c.saved("self")))
_unary("CosBackward0", lambda c: -torch.sin(c.saved("self")))
_unary("AbsBackward0", lambda c: torch.sign(c.saved("self")))
_unary("ErfBackward0", lambda c: 2 / math.sqrt(math.pi) * torch.exp(-c.saved("self") ** 2))
_unary("LeakyReluBackward0", lambda c: _slope_where(c, c.saved("self") > 0))
_unary("HardtanhBackward0", lambda c: ((c.saved("self") > c.saved("min_val"))
                                      & (c.saved("self") < c.saved("max_val"))).to(c.dtype))
_unary("SoftplusBackward0", lambda c: (lambda x, b, th: torch.where(x * b > th, 1.0, _sig(x * b)))
       (c.saved("self"), c.saved("beta"), c.saved("threshold")).to(c.dtype))


_unary("Expm1Backward0", lambda c: c.saved("result") + 1)
_unary("Exp2Backward0", lambda c: c.saved("result") * math.log(2.0))
_unary("Log2Backward0", lambda c: 1.0 / (c.saved("self") * math.log(2.0)))
_unary("Log10Backward0", lambda c: 1.0 / (c.saved("self") * math.log(10.0)))
_unary("SignBackward0", lambda c: 0)                          # piecewise constant: no edge


def _sgn_grad(c):
    """torch.sgn of a real tensor is sign(x): piecewise constant, no edge (torch's
    backward gives 0 there too). Complex sgn (x/|x|) has no rule."""
    if c.saved("self", cast=False).is_complex():
        raise GraphError("SgnBackward0: torch.sgn of a complex tensor has no rule (complex graphs are not "
                         "supported)")
    return 0


_unary("SgnBackward0", _sgn_grad)
# erfinv'(x) = √π/2 · exp(erfinv(x)²)
_unary("ErfinvBackward0", lambda c: 0.5 * math.sqrt(math.pi) * torch.exp(torch.erfinv(c.saved("self")) ** 2))
_unary("NanToNumBackward0", lambda c: torch.isfinite(c.saved("self")).to(c.dtype))
_unary("AtanBackward0", lambda c: 1.0 / (1 + c.saved("self") ** 2))
_unary("ErfcBackward0", lambda c: -2 / math.sqrt(math.pi) * torch.exp(-c.saved("self") ** 2))
_unary("LogSigmoidBackward0", lambda c: _sig(-c.saved("self")))
# torch's own derivative (its value at the kinks x = ±3 changed between versions)
_unary("HardswishBackward0", lambda c: torch.ops.aten.hardswish_backward(torch.ones_like(c.saved("self")),
                                                                         c.saved("self")))
_unary("MishBackward0", lambda c: (lambda x: (lambda t: t + x * _sig(x) * (1 - t * t))(
       torch.tanh(torch.nn.functional.softplus(x))))(c.saved("self")))


# gamma and Bessel functions, the normal distribution's special functions (torch's formulas)
_unary("DigammaBackward0", lambda c: torch.polygamma(1, c.saved("self")))
_unary("LgammaBackward0", lambda c: torch.digamma(c.saved("self")))
_unary("PolygammaBackward0", lambda c: torch.polygamma(int(c.saved("n")) + 1, c.saved("self")))
_unary("MvlgammaBackward0", lambda c: sum(torch.digamma(c.saved("self") - j / 2) for j in range(int(c.saved("p")))))
_unary("I0Backward0", lambda c: torch.special.i1(c.saved("self")))
_unary("SpecialI0EBackward0", lambda c: torch.special.i1e(c.saved("self"))
       - torch.sign(c.saved("self")) * c.saved("result"))
_unary("SpecialI1Backward0", lambda c: torch.where(c.saved("self") == 0, 0.5, torch.special.i0(c.saved("self"))
                                                   - c.saved("result") / c.saved("self")))
_unary("SpecialI1EBackward0", lambda c: torch.where(
    c.saved("self") == 0, 0.5,
    torch.special.i0e(c.saved("self")) - c.saved("result") * (torch.sign(c.saved("self")) + 1 / c.saved("self"))))
_unary("SpecialErfcxBackward0", lambda c: 2 * c.saved("self") * c.saved("result") - 2 / math.sqrt(math.pi))
_unary("SpecialNdtriBackward0", lambda c: math.sqrt(2 * math.pi) * torch.exp(c.saved("result") ** 2 / 2))
_unary("SpecialLogNdtrBackward0", lambda c: torch.exp(-(c.saved("result") + c.saved("self") ** 2 / 2))
       / math.sqrt(2 * math.pi))
_unary("SpecialEntrBackward0", lambda c: -(1 + torch.log(c.saved("self"))))
@rule("LdexpBackward0")
def ldexp(ctx):
    """ldexp(x, e) = x·2^e: x's edge 2^e as the running torch's backward
    gives it (an integer e < 0 has the edge 0 where torch forms 2^e in
    integers); a floating e that requires grad has the edge
    x·2^e·ln 2 = out·ln 2."""
    out = [None, None]
    e = ctx.saved("other", cast=False)
    if ctx.needs[0]:
        edge = torch.exp2(e.to(ctx.dtype))
        if not e.is_floating_point() and _torch_edge("ldexp_negative_exponent") == 0:
            edge = torch.where(e < 0, 0.0, edge)
        out[0] = _pull(ctx, 0, edge)
    if ctx.needs[1]:
        out[1] = _pull(ctx, 1, ctx.saved("result") * math.log(2.0))
    return out
# rrelu: the drawn slopes in training (1 where x > 0), (lower + upper)/2 below 0 in eval (torch's backward)
_unary("RreluWithNoiseBackward0", lambda c: torch.ops.aten.rrelu_with_noise_backward(
    torch.ones_like(c.saved("self")), c.saved("self"), c.saved("noise"), c.saved("lower"), c.saved("upper"),
    bool(c.saved("training")), False))
_unary("RreluWithNoiseBackward1", lambda c: torch.ops.aten.rrelu_with_noise_backward(      # in place: from the result
    torch.ones_like(c.saved("result")), c.saved("result"), c.saved("noise"), c.saved("lower"), c.saved("upper"),
    bool(c.saved("training")), True))


# inverse trigonometric/hyperbolic functions, sinc, logit and friends (torch's formulas)
_unary("AsinBackward0", lambda c: (1 - c.saved("self") ** 2).rsqrt())
_unary("AcosBackward0", lambda c: -(1 - c.saved("self") ** 2).rsqrt())
_unary("AsinhBackward0", lambda c: (c.saved("self") ** 2 + 1).rsqrt())
_unary("AcoshBackward0", lambda c: (c.saved("self") ** 2 - 1).rsqrt())
_unary("AtanhBackward0", lambda c: 1.0 / (1 - c.saved("self") ** 2))
_unary("SinhBackward0", lambda c: torch.cosh(c.saved("self")))
_unary("CoshBackward0", lambda c: torch.sinh(c.saved("self")))
_unary("TanBackward0", lambda c: 1 + c.saved("result") ** 2)
_unary("SincBackward0", lambda c: (lambda px: ((px * torch.cos(px) - torch.sin(px)) / (px * c.saved("self")))
       .masked_fill(c.saved("self") == 0, 0.0))(math.pi * c.saved("self")))
_unary("LogitBackward0", lambda c: torch.ops.aten.logit_backward(torch.ones_like(c.saved("self")), c.saved("self"),
                                                                 c.saved("eps")))
_unary("Deg2RadBackward0", lambda c: math.pi / 180)
_unary("Rad2DegBackward0", lambda c: 180 / math.pi)
_unary("HardsigmoidBackward0", lambda c: torch.ops.aten.hardsigmoid_backward(torch.ones_like(c.saved("self")),
                                                                             c.saved("self")))
_unary("HardshrinkBackward0", lambda c: torch.ops.aten.hardshrink_backward(torch.ones_like(c.saved("self")),
                                                                           c.saved("self"), c.saved("lambd")))
_unary("SoftshrinkBackward0", lambda c: torch.ops.aten.softshrink_backward(torch.ones_like(c.saved("self")),
                                                                           c.saved("self"), c.saved("lambd")))
# in-place leaky ReLU (saves its output): 1 above 0, the slope below
_unary("LeakyReluBackward1", lambda c: _slope_where(c, c.saved("result") > 0))
# copysign(x, s) = ±x: edge result/x (±1), none at x = 0 (torch's backward); s has no edge
_unary("CopysignBackward0", lambda c: (lambda x: torch.where(x != 0, c.saved("result") / torch.where(x != 0, x, 1.0),
                                                             0.0))(c.saved("self")))
_unary("CopysignBackward1", lambda c: (lambda x: torch.where(x != 0, c.saved("result") / torch.where(x != 0, x, 1.0),
                                                             0.0))(c.saved("self")))
# piecewise constant: no edge; frac(x) = x − trunc(x) and x mod c: weight 1
_unary("FloorBackward0", lambda c: 0)
_unary("CeilBackward0", lambda c: 0)
_unary("TruncBackward0", lambda c: 0)
_unary("RoundBackward0", lambda c: 0)
_unary("RoundBackward1", lambda c: 0)
_unary("FracBackward0", lambda c: 1)
_unary("FmodBackward0", lambda c: 1)
_unary("RemainderBackward0", lambda c: 1)


@rule("FmodBackward1", "RemainderBackward1")
def fmod(ctx):
    """x mod y with tensors: x weight 1; y weight −trunc(x/y) (fmod) or
    −floor(x/y) (remainder), as torch's backward."""
    x, y = ctx.saved("self"), ctx.saved("other")
    mode = "trunc" if ctx.name.startswith("Fmod") else "floor"
    out = [_pull(ctx, 0), None]
    if ctx.needs[1]:
        out[1] = _pull(ctx, 1, -torch.div(ctx.tensor(x), ctx.tensor(y), rounding_mode=mode))
    return out


@rule("DivBackward2", "DivBackward3")
def div_rounding(ctx):
    """torch.div with rounding_mode: "trunc"/"floor" are piecewise constant (no
    edges); without one, an ordinary division."""
    if ctx.saved("rounding_mode") is not None:
        return [None] * ctx.n_inputs
    if ctx.name == "DivBackward3":
        return [_pull(ctx, 0, 1.0 / ctx.tensor(ctx.saved("other")))]
    return div(ctx)


@rule("PowBackward2")
def pow_scalar_base(ctx):
    """c ** e, c a number: e -> out with weight c^e·log c (0 where c = 0 and
    e ≥ 0, torch's limit; NaN for c < 0, as torch's gradient)."""
    e = ctx.saved("exponent")
    base = float(ctx.saved("self"))
    if base == 0:
        return [_pull(ctx, 0, torch.where(e >= 0, 0.0, ctx.tensor(ctx.saved("result")) * -math.inf))]
    return [_pull(ctx, 0, ctx.tensor(ctx.saved("result")) * (math.log(base) if base > 0 else math.nan))]


@rule("LogaddexpBackward0", "Logaddexp2Backward0")
def logaddexp(ctx):
    """log(e^x + e^y) (base 2 for logaddexp2): x weight 1/(1 + b^(y−x)), y
    weight 1/(1 + b^(x−y)), b = e or 2."""
    x, y = ctx.tensor(ctx.saved("self")), ctx.tensor(ctx.saved("other"))
    pw = torch.exp if ctx.name.startswith("LogaddexpB") else torch.exp2
    return [_pull(ctx, 0, 1.0 / (1 + pw(y - x))), _pull(ctx, 1, 1.0 / (1 + pw(x - y)))]


def _pick(ctx, first_wins, tie, op: str) -> list:
    """Edges of a two-operand selection: 1 to the operand that wins outright,
    the running torch's share to each at an exact tie (:func:`_torch_edge`)."""
    share = _torch_edge(op + "_tie")
    w0 = torch.where(tie, share, first_wins.to(ctx.dtype))
    w1 = torch.where(tie, 1.0 - share, (~first_wins).to(ctx.dtype))
    return [_pull(ctx, 0, w0), _pull(ctx, 1, w1)]


@rule("ClampMinBackward1", "ClampMaxBackward1")
def clamp_tensor_bound(ctx):
    """clamp_min(x, m) / clamp_max(x, m) with a tensor bound: x weight 1 where
    it is kept (x > m, resp. x < m), m weight 1 elsewhere; at x = m as the
    running torch splits it."""
    x = ctx.saved("self")
    if ctx.name.startswith("ClampMin"):
        m = ctx.saved("min")
        return _pick(ctx, x > m, x == m, "clamp_min")
    m = ctx.saved("max")
    return _pick(ctx, x < m, x == m, "clamp_max")


@rule("MaskedFillBackward0", "MaskedFillBackward1")
def masked_fill(ctx):
    """x.masked_fill(mask, value): x keeps its edges outside the mask; a 0-dim
    tensor value (MaskedFillBackward1) reaches every masked element with
    weight 1."""
    v = ctx.grad()
    m = ctx.saved("mask").to(v[0].device).expand(v[0].shape)
    out = [None] * ctx.n_inputs
    if ctx.needs[0]:
        out[0] = ctx.sr.sum_to_shape(zero_where(ctx.sr, v, m), ctx.input_shape(0))
    if ctx.n_inputs > 1 and ctx.needs[1]:
        out[1] = ctx.sr.sum_to_shape(zero_where(ctx.sr, v, ~m), ctx.input_shape(1))
    return out


@rule("PreluKernelBackward0")
def prelu(ctx):
    """prelu(x, a) = x (x > 0) or a_c·x, a per channel (dim 1) or one number:
    x weight 1 or a_c; a_c weight x over channel c's elements where x ≤ 0."""
    x, a = ctx.saved("self"), ctx.saved("weight")
    shape = [1] * x.dim()
    if a.numel() > 1:
        shape[1 if x.dim() > 1 else 0] = a.numel()
    ab = a.reshape(shape) if x.dim() else a.reshape(())
    out = [_pull(ctx, 0, torch.where(x > 0, torch.ones_like(x), ab)), None]
    if ctx.needs[1]:
        v = ctx.sr.scale(ctx.grad(), torch.where(x > 0, torch.zeros_like(x), x))
        keep = [d for d in range(x.dim()) if shape[d] == 1]
        if keep:
            v = ctx.sr.sum(v, keep, keepdim=True)
        out[1] = ctx.sr.map(v, lambda c: c.reshape(ctx.input_shape(1)))
    return out


def _elu_grad(c):
    """ELU/SELU (EluBackward0): scale for x > 0, scale·α·s·exp(s·x) below
    (s = input_scale); CELU: 1 above 0, exp(x/α) below."""
    x = c.saved("self")
    if type(c.node).__name__.startswith("Celu"):      # torch's backward takes 1/α in float32
        alpha = float(c.saved("alpha"))
        s = 1.0 / float(torch.tensor(alpha, dtype=torch.float32))
        return torch.where(x > 0, torch.ones_like(x), alpha * s * torch.exp(s * x))
    scale, alpha, s = float(c.saved("scale")), float(c.saved("alpha")), float(c.saved("input_scale"))
    return torch.where(x > 0, torch.full_like(x, scale), scale * alpha * s * torch.exp(s * x))


_unary("EluBackward0", _elu_grad)
_unary("CeluBackward0", _elu_grad)
# in-place ELU/SELU (saves its output y): scale above 0, s·(y + α·scale) below
_unary("EluBackward1", lambda c: (lambda y, scale, alpha, s: torch.where(y > 0, torch.full_like(y, scale),
                                                                         s * (y + alpha * scale)))(
       c.saved("result"), float(c.saved("scale")), float(c.saved("alpha")), float(c.saved("input_scale"))))


def _pow_grad(c):
    x = c.saved("self")
    e = c.saved("exponent")
    if isinstance(e, torch.Tensor):
        e = e.to(x.dtype)
    elif e == 0:
        return torch.zeros_like(x)
    return e * x ** (e - 1)


_unary("PowBackward0", _pow_grad)


@rule("PowBackward1")
def pow_tensor(ctx):  # self ** exponent, both tensors
    """∂/∂x = e·x^(e−1), 0 where e = 0; ∂/∂e = x^e·log x, 0 where x = 0 and
    e ≥ 0 (the limits torch's backward takes instead of 0·inf and 0·log 0)."""
    x = ctx.saved("self")
    e = ctx.saved("exponent")
    out = [None, None]
    if ctx.needs[0]:
        out[0] = _pull(ctx, 0, torch.where(e == 0, 0.0, e * x ** (e - 1)))
    if ctx.needs[1]:
        out[1] = _pull(ctx, 1, torch.where((x == 0) & (e >= 0), 0.0, ctx.saved("result") * torch.log(x)))
    return out


@rule("MaximumBackward0", "MinimumBackward0")
def maximum(ctx):
    """max(x, y) elementwise: an edge of weight 1 from the larger (smaller),
    1/2 from each where they tie, 1 from both where one is NaN (torch's
    backward, formula for formula)."""
    x, y = ctx.saved("self"), ctx.saved("other")
    base = torch.where(x == y, 0.5, 1.0).to(ctx.dtype)
    lose_x, lose_y = (x < y, x > y) if type(ctx.node).__name__.startswith("Maximum") else (x > y, x < y)
    return [_pull(ctx, 0, base.masked_fill(lose_x, 0.0)), _pull(ctx, 1, base.masked_fill(lose_y, 0.0))]


@rule("FmaxBackward0", "FminBackward0")
def fmax(ctx):
    """fmax/fmin: the NaN-ignoring forms (a NaN operand loses; self wins when
    both are NaN); at an exact tie as the running torch splits it."""
    x, y = ctx.saved("self"), ctx.saved("other")
    is_max = type(ctx.node).__name__.startswith("Fmax")
    wins = ((x > y) if is_max else (x < y)) | torch.isnan(y)
    return _pick(ctx, wins, x == y, "fmax" if is_max else "fmin")


@rule("GluBackward0")
def glu(ctx):
    """glu(x) = a·σ(b), x = [a, b] halves along dim: a_i -> out_i weight σ(b_i),
    b_i -> out_i weight a_i σ(b_i)(1 − σ(b_i))."""
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    x = ctx.saved("self")
    dim = ctx.saved("dim") % x.dim()
    a, b = x.chunk(2, dim)
    sb = _sig(b)
    v = ctx.grad()
    va = ctx.sr.scale(v, sb)
    vb = ctx.sr.scale(v, a * sb * (1 - sb))
    return [tuple(torch.cat(pair, dim) for pair in zip(va, vb))] + [None] * (ctx.n_inputs - 1)


@rule("ClampBackward1")
def clamp(ctx):
    """clamp(x, min, max) with number bounds (either may be None): x has the
    edge 1 strictly inside, and where it meets a bound the edge the running
    torch gives there (:func:`_torch_edges`: 1 in torch 2.13, 0 in 2.14)."""
    x = ctx.saved("self")
    lo, hi = ctx.saved("min"), ctx.saved("max")
    inside = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        inside &= x > lo
    if hi is not None:
        inside &= x < hi
    w = inside.to(ctx.dtype)
    if lo is not None and hi is not None:
        if lo == hi:
            w = torch.where(x == lo, _torch_edge("clamp_number_at_equal"), w)
        elif lo < hi:
            w = torch.where(x == lo, _torch_edge("clamp_number_at_min"), w)
            w = torch.where(x == hi, _torch_edge("clamp_number_at_max"), w)
    elif lo is not None:
        w = torch.where(x == lo, _torch_edge("clamp_number_min_only"), w)
    elif hi is not None:
        w = torch.where(x == hi, _torch_edge("clamp_number_max_only"), w)
    return [_pull(ctx, 0, w)]


@rule("ClampMinBackward0", "ClampMaxBackward0")
def clamp_number_bound(ctx):
    """clamp_min(x, m) / clamp_max(x, m) with a number m: x has the edge 1
    where it is kept (x > m, resp. x < m), and at x = m what the running
    torch gives."""
    x = ctx.saved("self")
    if ctx.name.startswith("ClampMin"):
        m = ctx.saved("min")
        keep, tie = x > m, _torch_edge("clamp_min_number")
    else:
        m = ctx.saved("max")
        keep, tie = x < m, _torch_edge("clamp_max_number")
    return [_pull(ctx, 0, torch.where(x == m, tie, keep.to(ctx.dtype)))]


# ---- addcmul, addcdiv, lerp, threshold, atan2, hypot, clamp with tensor bounds --------------------

@rule("AddcmulBackward0")
def addcmul(ctx):
    """out = self + value·t1·t2: self 1, t1 value·t2, t2 value·t1."""
    value = ctx.saved("value")
    out = [_pull(ctx, 0), None, None]
    if ctx.needs[1]:
        out[1] = _pull(ctx, 1, ctx.tensor(ctx.saved("tensor2")) * value)
    if ctx.needs[2]:
        out[2] = _pull(ctx, 2, ctx.tensor(ctx.saved("tensor1")) * value)
    return out


@rule("AddcdivBackward0")
def addcdiv(ctx):
    """out = self + value·t1/t2: self 1, t1 value/t2, t2 −value·t1/t2²."""
    value = ctx.saved("value")
    out = [_pull(ctx, 0), None, None]
    t2 = ctx.tensor(ctx.saved("tensor2"))
    if ctx.needs[1]:
        out[1] = _pull(ctx, 1, value / t2)
    if ctx.needs[2]:
        t1 = ctx.tensor(ctx.saved("tensor1"))
        out[2] = _pull(ctx, 2, -value * t1 / (t2 * t2))
    return out


@rule("LerpBackward0")
def lerp_scalar(ctx):
    """out = self + w·(end − self), w a number: self 1 − w, end w."""
    w = float(ctx.saved("weight"))
    return [_pull(ctx, 0, 1.0 - w), _pull(ctx, 1, w)]


@rule("LerpBackward1")
def lerp(ctx):
    """out = self + w·(end − self), w a tensor: self 1 − w, end w, w end − self."""
    w = ctx.tensor(ctx.saved("weight"))
    out = [_pull(ctx, 0, 1 - w), _pull(ctx, 1, w), None]
    if ctx.needs[2]:
        out[2] = _pull(ctx, 2, ctx.tensor(ctx.saved("end")) - ctx.tensor(ctx.saved("self")))
    return out


@rule("ThresholdBackward0", "ThresholdBackward1")
def threshold(ctx):
    """F.threshold(x, th, value) (and threshold_): edge 1 where x > th, none
    where x is replaced."""
    return [_pull(ctx, 0, (ctx.saved("self") > ctx.saved("threshold")).to(ctx.dtype))]


@rule("Atan2Backward0")
def atan2(ctx):
    """out = atan2(self, other): self other/(self² + other²), other
    −self/(self² + other²); at (0, 0) what the running torch's backward
    gives (0: no edge; NaN in older torch)."""
    y, x = ctx.tensor(ctx.saved("self")), ctx.tensor(ctx.saved("other"))
    r2 = y * y + x * x
    recip = torch.where(r2 == 0, _torch_edge("atan2_origin"), r2.reciprocal())
    out = [None, None]
    if ctx.needs[0]:
        out[0] = _pull(ctx, 0, x * recip)
    if ctx.needs[1]:
        out[1] = _pull(ctx, 1, -y * recip)
    return out


@rule("HypotBackward0")
def hypot(ctx):
    """out = hypot(self, other): self self/out, other other/out."""
    r = ctx.tensor(ctx.saved("result"))
    out = [None, None]
    if ctx.needs[0]:
        out[0] = _pull(ctx, 0, ctx.tensor(ctx.saved("self")) / r)
    if ctx.needs[1]:
        out[1] = _pull(ctx, 1, ctx.tensor(ctx.saved("other")) / r)
    return out


@rule("ClampBackward0")
def clamp_tensor(ctx):
    """torch.clamp(x, min, max) with tensor bounds (either may be None):
    the edge 1 goes to x strictly between the bounds, to min below it, to
    max above it (and everywhere when max < min); where x meets a bound, or
    the bounds are equal, the (x, min, max) edges are what the running torch
    gives there (:func:`_torch_edges`)."""
    x = ctx.saved("self")
    lo, hi = ctx.saved("min"), ctx.saved("max")
    w = [torch.zeros_like(x, dtype=ctx.dtype) for _ in range(3)]    # x, min, max

    def put(where, edges, slots=(0, 1, 2)):
        for k, e in zip(slots, edges):
            w[k] = torch.where(where, e, w[k])

    if lo is not None and hi is not None:
        ordered, equal = lo < hi, lo == hi
        put(ordered & (x > lo) & (x < hi), (1.0,), (0,))
        put(ordered & (x < lo), (1.0,), (1,))
        put(ordered & (x > hi), (1.0,), (2,))
        put(lo > hi, (1.0,), (2,))
        put(ordered & (x == lo), _torch_edges("clamp_at_min"))
        put(ordered & (x == hi), _torch_edges("clamp_at_max"))
        put(equal & (x < lo), _torch_edges("clamp_below_equal"))
        put(equal & (x == lo), _torch_edges("clamp_at_equal"))
        put(equal & (x > lo), _torch_edges("clamp_above_equal"))
    elif lo is not None:
        put(x > lo, (1.0,), (0,))
        put(x < lo, (1.0,), (1,))
        put(x == lo, _torch_edges("clamp_min_only_tie"), (0, 1))
    elif hi is not None:
        put(x < hi, (1.0,), (0,))
        put(x > hi, (1.0,), (2,))
        put(x == hi, _torch_edges("clamp_max_only_tie"), (0, 2))
    return [_pull(ctx, i, w[i]) if ctx.needs[i] else None for i in range(ctx.n_inputs)]


@rule("XlogyBackward0", "XlogyBackward1", "XlogyBackward2",
      "SpecialXlog1PyBackward0", "SpecialXlog1PyBackward1", "SpecialXlog1PyBackward2")
def xlogy(ctx):
    """out = x·log y (xlogy; ``F.kl_div`` records it) or x·log1p(y) (xlog1py):
    x edge log y (log1p y), none where x = 0 and y ≤ 0 (y ≤ −1), torch's
    convention; y edge x/y (x/(1 + y)). Backward1 (x a number) has y alone as
    input, Backward2 (y a number) x alone."""
    log1p = ctx.name.startswith("SpecialXlog1Py")
    x, y = ctx.tensor(ctx.saved("self")), ctx.tensor(ctx.saved("other"))
    which = ctx.name[-1]
    slots = {"0": (0, 1), "1": (None, 0), "2": (0, None)}[which]
    out = [None] * ctx.n_inputs
    ix, iy = slots
    if ix is not None and ctx.needs[ix]:
        w = torch.special.xlog1py(torch.ones_like(y), y) if log1p else torch.xlogy(torch.ones_like(y), y)
        w = torch.where((x == 0) & (y <= (-1.0 if log1p else 0.0)), 0.0, w)
        out[ix] = _pull(ctx, ix, w)
    if iy is not None and ctx.needs[iy]:
        out[iy] = _pull(ctx, iy, x / (y + 1) if log1p else x / y)
    return out
