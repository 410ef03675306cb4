"""Bad input gets a clear error that names the problem."""

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import semitriton
from semitriton import GraphError, GraphFreedError, UnsupportedNodeError


class Inner(nn.Module):
    def forward(self, x):
        return torch.linalg.qr(x.reshape(-1, 2, 2))[0]     # LinalgQrBackward0 has no rule


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = Inner()

    def forward(self, x):
        return self.inner(self.lin(x)).relu()


def test_unknown_node_names_node_and_module():
    model = nn.Sequential(nn.Linear(4, 4), Block())
    semitriton.track(model)
    try:
        x = torch.randn(2, 4, requires_grad=True)
        out = model(x).sum()
        with pytest.raises(UnsupportedNodeError, match=r"LinalgQrBackward0.*1\.inner \(Inner\)"):
            semitriton.grad(out, x, semiring="maxabs")
    finally:
        semitriton.untrack(model)


def test_unknown_node_without_tracking_says_how_to_name_module():
    x = torch.randn(2, 4, requires_grad=True)
    out = torch.linalg.qr(x.reshape(2, 2, 2))[0].sum()
    with pytest.raises(UnsupportedNodeError, match=r"LinalgQrBackward0.*semitriton.track"):
        semitriton.grad(out, x, semiring="abs")


def test_custom_function_without_rule():
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(UnsupportedNodeError, match="TwiceBackward"):
        semitriton.grad(Twice.apply(x).sum(), x, semiring="abs")


def test_input_not_in_graph():
    x = torch.randn(3, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    with pytest.raises(GraphError, match=r"inputs\[1\].*not part of the gradient graph"):
        semitriton.grad((x * 2).sum(), [x, y])


def test_input_without_requires_grad():
    x = torch.randn(3)
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(GraphError, match=r"inputs\[0\].*does not require grad.*requires_grad_"):
        semitriton.grad((x * w).sum(), x)


def test_output_without_graph():
    x = torch.randn(3, requires_grad=True)
    with torch.no_grad():
        out = (x * 2).sum()
    with pytest.raises(GraphError, match="output does not require grad"):
        semitriton.grad(out, x)
    with torch.inference_mode():
        out = (x * 2).sum()
    with pytest.raises(GraphError, match="output does not require grad.*inference_mode"):
        semitriton.grad(out, x)


def test_graph_freed_by_earlier_backward():
    x = torch.randn(4, 4, requires_grad=True)
    w = torch.randn(4, 4)
    out = torch.tanh(x @ w).sum()
    out.backward()
    with pytest.raises(GraphFreedError, match="already freed.*retain_graph=True"):
        semitriton.grad(out, x, semiring="abs")


def test_unknown_semiring():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="unknown semiring 'tropical'.*real, abs, max, maxabs, entropy"):
        semitriton.grad(x.sum(), x, semiring="tropical")


def test_unknown_backend():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        semitriton.grad(x.sum(), x, backend="cuda")


def test_attention_dropout_on_cpu_follows_the_recorded_mask():
    """With dropout_p > 0 on CPU, SDPA records the math graph (the dropout mask is
    a multiply): the engine follows the sampled mask edges exactly. (The fused
    CUDA nodes do not expose their mask; there the rule raises, naming eval().)"""
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    torch.manual_seed(0)
    o = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    (ref,) = torch.autograd.grad(o.sum(), q, retain_graph=True)
    (got,) = semitriton.grad(o.sum(), q, fast_real=False)
    torch.testing.assert_close(got, ref)


def test_inputs_are_not_modified_and_graph_reusable():
    x = torch.randn(2, 3, requires_grad=True)
    before = x.detach().clone()
    out = torch.softmax(x @ torch.randn(3, 3), -1).pow(2).sum()
    for s in semitriton.semirings.NAMES:
        semitriton.grad(out, x, semiring=s)
    (ours,) = semitriton.grad(out, x, fast_real=False)
    assert torch.equal(x.detach(), before) and x.grad is None
    (g,) = torch.autograd.grad(out, x)          # the graph was not freed by semitriton
    torch.testing.assert_close(ours, g)


def test_fast_real_is_the_autograd_gradient_and_keeps_the_graph():
    x = torch.randn(3, 4, requires_grad=True)
    out = torch.tanh(x @ torch.randn(4, 2)).sum()
    (a,) = semitriton.grad(out, x)                    # autograd engine
    (b,) = semitriton.grad(out, x, fast_real=False)   # the semiring walk
    torch.testing.assert_close(a, b)
    (c,) = semitriton.grad(out, x, semiring="abs")    # the graph is still there
    assert torch.isfinite(c).all()
    out.backward()
    with pytest.raises(GraphFreedError):
        semitriton.grad(out, x)


def test_log_space_is_checked_before_the_real_fast_path():
    x = torch.randn(3, requires_grad=True)
    out = (x * 2).sum()
    with pytest.raises(ValueError, match="no log-space readout"):
        semitriton.grad(out, x, log_space=True)
    with pytest.raises(TypeError, match="output must be a tensor"):
        semitriton.grad(1.0, x)


def test_empty_and_non_floating_inputs():
    x = torch.randn(3, requires_grad=True)
    out = (x * 2).sum()
    with pytest.raises(ValueError, match="inputs is empty"):
        semitriton.grad(out, [], semiring="abs")
    with pytest.raises(TypeError, match="dtype torch.int64"):
        semitriton.grad(out, [torch.arange(3)], semiring="abs")


def test_a_saved_tensor_changed_in_place_is_named_as_such():
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    out = torch.tanh(lin(x)).sum()
    with torch.no_grad():
        lin.weight.mul_(2.0)
    for semiring in ("abs", "maxabs"):
        with pytest.raises(GraphError, match="modified in place after the forward") as e:
            semitriton.grad(out, x, semiring=semiring)
        assert not isinstance(e.value, GraphFreedError)


@pytest.mark.parametrize("semiring", ["real", "abs", "max", "maxabs", "entropy"])
def test_module_backward_hooks_are_identity_nodes(semiring):
    """register_full_backward_hook puts BackwardHookFunction nodes around a
    module: the walk passes values through them unchanged (and runs no hook)."""
    def stats(hooked):
        torch.manual_seed(0)
        a, b = nn.Linear(3, 4), nn.Linear(4, 2)
        if hooked:
            a.register_full_backward_hook(lambda m, gi, go: tuple(g * 0 if g is not None else None for g in gi))
        x = torch.randn(5, 3, requires_grad=True)
        out = torch.tanh(b(torch.tanh(a(x)))).sum()
        return semitriton.grad(out, x, semiring=semiring, fast_real=False)[0]
    torch.testing.assert_close(stats(True), stats(False), rtol=0, atol=0)


def test_a_nan_output_warns():
    """A NaN in the output (a broken forward) is said, not passed over: the
    Triton kernels drop NaN terms from their max and sums, so statistics
    through it could read finite. A -inf (a masked logit) is not a NaN."""
    import warnings

    x = torch.tensor([1.0, float("nan"), 2.0], requires_grad=True)
    w = torch.randn(3, 2)
    y = x @ w
    with pytest.warns(RuntimeWarning, match="2 NaN value"):
        semitriton.grad(y, x, semiring="maxabs")
    x2 = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    masked = (x2 @ w).masked_fill(torch.tensor([False, True]), float("-inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        semitriton.grad((x2 @ w).sum(), x2, semiring="abs")
        semitriton.grad(masked, x2, semiring="maxabs")


def test_complex_arithmetic_on_a_path_is_refused_with_the_node():
    """A rotary embedding written as a complex product (view_as_complex,
    polar): the semirings have no edges for complex values; the error names
    the node and the real rewrite, instead of a reshape error deep in the walk
    (real through PyTorch's own backward still gives the gradient)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, requires_grad=True)
    freqs = torch.polar(torch.ones(4, 4), torch.randn(4, 4))
    y = torch.view_as_real(torch.view_as_complex(x.reshape(2, 4, 4, 2)) * freqs).flatten(2)
    out = (y * torch.randn(2, 4, 8)).sum()
    for s in ("abs", "maxabs"):
        with pytest.raises(GraphError, match="ViewAsComplexBackward0.*complex.*cos"):
            semitriton.grad(out, x, semiring=s)
    with pytest.raises(GraphError, match="complex"):
        semitriton.grad(out, x, semiring="real", fast_real=False)
    (g,) = semitriton.grad(out, x)
    torch.testing.assert_close(g, torch.autograd.grad(out, x)[0])
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(GraphError, match=r"inputs\[0\] is complex"):
        semitriton.grad(torch.view_as_real(z * 2).sum(), z, semiring="abs")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def test_reentrant_checkpointing_is_refused_with_the_way_out():
    from torch.utils.checkpoint import checkpoint
    m = _mlp()
    x = torch.randn(2, 4, requires_grad=True)
    out = checkpoint(m, x, use_reentrant=True).sum()
    with pytest.raises(UnsupportedNodeError, match=r"CheckpointFunctionBackward.*use_reentrant=False"):
        semitriton.grad(out, x, semiring="maxabs")


@pytest.mark.parametrize("semiring", ["real", "abs", "maxabs", "entropy", "max"])
def test_non_reentrant_checkpointing_gives_the_unchecked_statistics(semiring):
    from torch.utils.checkpoint import checkpoint
    m = _mlp()
    x = torch.randn(2, 4, requires_grad=True)
    (want,) = semitriton.grad(m(x).sum(), x, semiring=semiring)
    (got,) = semitriton.grad(checkpoint(m, x, use_reentrant=False).sum(), x, semiring=semiring)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_a_fused_onednn_lstm_is_refused_with_the_way_out():
    """nn.LSTM in float32 on the CPU is one oneDNN node; with oneDNN off the
    cells are ordinary ops, walked (real equals autograd)."""
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 5, batch_first=True)
    x = torch.randn(2, 3, 4, requires_grad=True)
    out = lstm(x)[0].sum()
    if "MkldnnRnnLayerBackward0" not in repr(out.grad_fn.next_functions[0][0].next_functions):
        pytest.skip("this torch does not record the oneDNN RNN node")
    with pytest.raises(UnsupportedNodeError, match=r"MkldnnRnnLayerBackward0.*mkldnn\.flags\(enabled=False\)"):
        semitriton.grad(out, x, semiring="abs")
    with torch.backends.mkldnn.flags(enabled=False):
        out = lstm(x)[0].sum()
    (got,) = semitriton.grad(out, x, semiring="real", fast_real=False)
    (want,) = torch.autograd.grad(out, x, retain_graph=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (flow,) = semitriton.grad(out, x, semiring="abs")
    assert bool((flow >= want.abs() * (1 - 1e-5)).all())      # Σ|Π w| ≥ |Σ Π w|


def test_a_compiled_region_is_refused_with_the_way_out():
    m = torch.compile(_mlp(), backend="aot_eager")
    x = torch.randn(2, 4, requires_grad=True)
    out = m(x).sum()
    with pytest.raises(UnsupportedNodeError, match=r"CompiledFunctionBackward.*torch\.compile"):
        semitriton.grad(out, x, semiring="abs")


def test_readout_and_attribution_mistakes_are_named():
    """Raw values of another semiring, a list for branch_attribution's one
    input tensor, and a layer the attribution does not have: each an error
    that says what is wrong (not an unpacking error, an AttributeError, a
    bare KeyError, or a meaningless number)."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = (x.tanh() * 2).sum()
    (abs_v,) = semitriton.grad_values(y, x, semiring="abs")
    (max_v,) = semitriton.grad_values(y, x, semiring="max")
    with pytest.raises(ValueError, match=r"1 component\(s\), but the entropy semiring's have 2"):
        semitriton.token_readout(abs_v, "entropy")
    with pytest.raises(ValueError, match=r"2 component\(s\), but the abs semiring's have 1.*semiring='abs'"):
        semitriton.token_readout(max_v, "abs")
    with pytest.raises(ValueError, match=r"token_values: these values have 2 component"):
        semitriton.token_values(max_v, "maxabs")
    with pytest.raises(ValueError, match=r"log_readout: these values have 2 component"):
        semitriton.log_readout(max_v, "abs")
    with pytest.raises(TypeError, match=r"branch_attribution: input must be one tensor, got list"):
        semitriton.branch_attribution(y, [x])
    attr = semitriton.BranchAttribution("maxabs", [0, 1], {0: {}, 1: {}})
    with pytest.raises(KeyError, match=r"no layer 7 in this attribution; its layers are \[0, 1\]"):
        attr.top_branch(7)


def test_warnings_point_at_the_users_line():
    """However many of semitriton's frames lie between (a decorator around a
    readout added one), a warning names the caller's file and line."""
    import warnings
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0, 0.5], [float("nan"), 3.0]], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        semitriton.top_paths((x @ w)[1], x, k=2)
        line_paths = sys._getframe().f_lineno - 1
        semitriton.grad((x * float("nan")).sum(), x, semiring="abs")
        line_grad = sys._getframe().f_lineno - 1
    where = {("NaN path weight" in str(m.message), "output holds" in str(m.message)): (m.filename, m.lineno)
             for m in caught}
    assert where[(True, False)] == (__file__, line_paths)
    assert where[(False, True)] == (__file__, line_grad)
