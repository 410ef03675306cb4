"""Custom autograd Functions: the ones that carry their own semiring rule
(the fused nodes of patched modules: ``Function.semiring_backward(ctx) ->
list``), and known third-party Functions (``FUNCTION_RULES``)."""

from __future__ import annotations

import torch

from ..fused._saved import pad, saved_tensors
from . import FUNCTION_RULES, rule


@rule("<custom>")
def custom(ctx):
    return ctx.node._forward_cls.semiring_backward(ctx)


def _elementwise_function(ctx):
    """A custom Function y = f(x), f elementwise, that saves x (one edge
    x[i] -> y[i]): the weight f'(x[i]) is the Function's own backward applied
    to ones, so the edges are exactly what its backward uses."""
    if not ctx.needs[0]:
        return pad([], ctx.n_inputs)
    (x,) = saved_tensors(ctx.node)
    with torch.no_grad():
        d = ctx.node.apply(torch.ones_like(x))
    d = d[0] if isinstance(d, tuple) else d
    return pad([ctx.sr.scale(ctx.grad(), d.to(ctx.dtype))], ctx.n_inputs)


# BLOOM's tanh-GELU (BloomGelu.forward), a custom Function with a hand-written backward
FUNCTION_RULES[("transformers.models.bloom.modeling_bloom", "GeLUFunction")] = _elementwise_function
# RecurrentGemma's RG-LRU: sqrt with its derivative clipped at x < 1/(4·1000²)
FUNCTION_RULES[("transformers.models.recurrent_gemma.modeling_recurrent_gemma", "SqrtBoundDerivative")] = \
    _elementwise_function
