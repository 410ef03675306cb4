"""Aten-level rules on ops a user's own module may use, against
torch.autograd.grad (real through the walk) and the |grad| / max-|grad|
readouts of one-edge-per-element programs. Each case was wrong or failed
before its fix (a fuzz of the rules against the float64 oracle)."""

import pytest
import torch

import semitriton
from semitriton.errors import GraphError
from semitriton.rules import RULES

#: rule names that are no node class of this torch: aliases kept for other
#: torch versions and the names of Python-defined nodes
NOT_TORCH_NODES = {"<custom>", "ContiguousBackward0", "PositiveBackward0", "_ReshapeAliasBackward0",
                   "NumpyTBackward0", "_ToCopyBackward0", "SplitBackward1", "SplitWithSizesBackward1",
                   "BackwardHookFunctionBackward", "_SafeSoftmaxBackward0"}


def test_rule_names_are_torch_node_names():
    """A misspelt name registers a rule that never runs (log1p's was
    "Log1pBackward0"; torch's node is Log1PBackward0)."""
    unknown = sorted(n for n in RULES if not hasattr(torch._C._functions, n) and n not in NOT_TORCH_NODES)
    assert not unknown, f"rules registered under names torch has no node for: {unknown}"


def _walk(out, inputs, semiring):
    kw = {"fast_real": False} if semiring == "real" else {}
    return semitriton.grad(out, inputs, semiring=semiring, **kw)


def _check_elementwise(out, inputs):
    """Each input element reaches ``out`` (a sum) by one path: real equals
    autograd, abs and maxabs read |grad|."""
    ref = torch.autograd.grad(out, inputs, retain_graph=True)
    for s in ("real", "abs", "maxabs"):
        got = _walk(out, inputs, s)
        for g, r in zip(got, ref):
            want = r if s == "real" else r.abs()
            torch.testing.assert_close(g, want, rtol=1e-14, atol=0, msg=f"{s}")


def test_division_by_a_python_float_in_float64():
    """x / 3.0: torch saves 3.0 as a float64 "wrapped number"; 1 / it was a
    float32 division (relative error 3e-8 in a float64 graph)."""
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    _check_elementwise((x / 3.0).sum(), (x,))
    _check_elementwise((x / 0.1).sum(), (x,))


def test_tensor_power_at_a_zero_base():
    """x ** e with tensors: torch's limits at x = 0 (0 where e = 0 for ∂x, and
    where e ≥ 0 for ∂e), not 0·inf or 0·log 0 = NaN."""
    x = torch.tensor([0.0, 0.0, 2.0, 1.5], dtype=torch.float64, requires_grad=True)
    e = torch.tensor([2.0, 0.0, 1.0, -1.0], dtype=torch.float64, requires_grad=True)
    _check_elementwise((x ** e).sum(), (x, e))


def test_log1p():
    x = torch.tensor([0.5, -0.25, 3.0], dtype=torch.float64, requires_grad=True)
    _check_elementwise(torch.log1p(x).sum(), (x,))


@pytest.mark.parametrize("p", [0.4, 1.0])
def test_training_mode_dropout_node(p):
    """NativeDropoutBackward0 (training-mode dropout on CUDA, and SDPA's) saves
    p and the keep mask, no scale; the edge is mask / (1 − p), 0 at p = 1."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y, _ = torch.native_dropout(x, p, True)
    assert type(y.grad_fn).__name__ == "NativeDropoutBackward0"
    out = (y * torch.arange(1.0, 5.0, dtype=torch.float64)).sum()
    (real,) = _walk(out, x, "real")
    torch.testing.assert_close(real, torch.autograd.grad(out, x, retain_graph=True)[0], rtol=1e-14, atol=0)
    (absv,) = _walk(out, x, "abs")
    torch.testing.assert_close(absv, real.abs(), rtol=1e-14, atol=0)


def test_cat_of_several_constants():
    """cat([BOS, x, EOS]) with constant ends: the node does not record their
    sizes; the error names the node and the fix, and the fix works."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    bos = torch.zeros(1, 3, dtype=torch.float64)
    eos = torch.ones(2, 3, dtype=torch.float64)
    w = torch.arange(1.0, 6.0, dtype=torch.float64)[:, None]
    with pytest.raises(GraphError, match="CatBackward0.*requires_grad_"):
        _walk((torch.cat([bos, x, eos]) * w).sum(), x, "abs")
    bos.requires_grad_()
    eos.requires_grad_()
    _check_elementwise((torch.cat([bos, x, eos]) * w).sum(), (x,))
