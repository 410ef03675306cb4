"""``semitriton.grad``'s torch.autograd.grad-style arguments: a sequence of
outputs, ``grad_outputs``, ``allow_unused``, ``retain_graph``; each semiring
checked against an independent formulation of the same sum over paths."""

import pytest
import torch

import semitriton
from semitriton.errors import GraphError

SEMIRINGS = ["real", "abs", "max", "maxabs", "entropy"]


def _program(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(4, 5, generator=g, dtype=torch.float64)
    h = torch.tanh(x @ W)
    return x, h, g


def _walk(out, inputs, semiring, **kw):
    if semiring == "real":
        kw["fast_real"] = False
    return semitriton.grad(out, inputs, semiring=semiring, **kw)


@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("fast", [True, False])
def test_grad_outputs_is_an_edge_into_the_sink(semiring, fast):
    """Weighting the output elements by g is the same graph as the output
    multiplied by g (one more edge of weight g per element); real is
    torch.autograd.grad with those grad_outputs."""
    x, h, g = _program()
    w = torch.randn(h.shape, generator=g, dtype=torch.float64)
    w[0, 1] = 0.0                                     # an exact zero: no path through that element
    kw = {} if fast else {"fast_real": False}
    (got,) = semitriton.grad(h, x, semiring=semiring, grad_outputs=w, **kw)
    (want,) = _walk(h * w, x, semiring)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if semiring == "real":
        (ref,) = torch.autograd.grad(h, x, grad_outputs=w, retain_graph=True)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    (vals,) = semitriton.grad_values(h, x, semiring, grad_outputs=w)
    (ref_vals,) = semitriton.grad_values(h * w, x, semiring)
    for a, b in zip(vals, ref_vals):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_a_sequence_of_outputs_joins_their_sinks(semiring):
    """Several outputs: real adds their gradients (torch.autograd.grad on the
    sequence); abs adds the path sums; max/maxabs take the larger extreme."""
    x, h, g = _program()
    o1 = (h[:, :2] ** 2).sum(1)
    o2 = h[1:].exp().sum()
    (got,) = semitriton.grad([o1, o2], x, semiring=semiring)
    (a,) = _walk(o1, x, semiring)
    (b,) = _walk(o2, x, semiring)
    if semiring == "real":
        (ref,) = torch.autograd.grad([o1, o2], x, grad_outputs=[torch.ones_like(o1), torch.ones_like(o2)],
                                     retain_graph=True)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, a + b, rtol=1e-12, atol=1e-12)
    elif semiring == "abs":
        torch.testing.assert_close(got, a + b, rtol=1e-12, atol=1e-12)
    elif semiring in ("max", "maxabs"):
        torch.testing.assert_close(got, torch.maximum(a, b), rtol=1e-12, atol=1e-12)
    else:                       # entropy of the joined distribution: mix of the two by their masses
        (za,) = _walk(o1, x, "abs")
        (zb,) = _walk(o2, x, "abs")
        z = za + zb
        pa, pb = za / z, zb / z
        mix = pa * a + pb * b - torch.special.xlogy(pa, pa) - torch.special.xlogy(pb, pb)
        torch.testing.assert_close(got, mix, rtol=1e-9, atol=1e-9)
    # grad_outputs per output, None meaning ones
    w2 = torch.tensor(-2.5, dtype=torch.float64)
    (got_w,) = semitriton.grad((o1, o2), x, semiring=semiring, grad_outputs=[None, w2])
    (want_w,) = semitriton.grad([o1, o2 * w2], x, semiring=semiring)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_allow_unused_gives_none(semiring):
    x, h, g = _program()
    y = torch.randn(4, dtype=torch.float64, requires_grad=True)
    out = h.sum()
    with pytest.raises(GraphError, match="allow_unused=True gives None"):
        semitriton.grad(out, [x, y], semiring=semiring)
    got_x, got_y = semitriton.grad(out, [x, y], semiring=semiring, allow_unused=True)
    assert got_y is None
    (want,) = semitriton.grad(out, x, semiring=semiring)
    torch.testing.assert_close(got_x, want, rtol=0, atol=0)
    with pytest.raises(GraphError) as info:                 # readouts without that option do not offer it
        semitriton.top_paths(out, y)
    assert "not part of the gradient graph" in str(info.value) and "allow_unused" not in str(info.value)
    vx, vy = semitriton.grad_values(out, [x, y], semiring, allow_unused=True)
    assert vy is None and vx is not None
    # retain_graph is accepted (the graph is always kept)
    (again,) = semitriton.grad(out, x, semiring=semiring, retain_graph=False)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_argument_errors_name_the_problem():
    x, h, g = _program()
    with pytest.raises(ValueError, match="grad_outputs has shape"):
        semitriton.grad(h, x, grad_outputs=torch.ones(2))
    with pytest.raises(ValueError, match="2 entries for 1 output"):
        semitriton.grad(h, x, grad_outputs=[torch.ones_like(h), torch.ones_like(h)])
    with pytest.raises(ValueError, match="1 entries for 2 outputs"):
        semitriton.grad([h, h.sum()], x, grad_outputs=[None])
    with pytest.raises(TypeError, match=r"outputs\[1\] is a str"):
        semitriton.grad([h, "h"], x)
    with pytest.raises(ValueError, match="outputs is empty"):
        semitriton.grad([], x)
    with pytest.raises(GraphError, match=r"outputs\[1\] does not require grad"):
        semitriton.grad([h, h.detach()], x, semiring="abs")
    with pytest.raises(TypeError, match="floating-point"):
        semitriton.grad(h, x, grad_outputs=torch.ones(h.shape, dtype=torch.long))


@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_a_saved_tensor_changed_in_place_is_one_error_type(semiring):
    """real (PyTorch's own backward) and the walks raise the same GraphError."""
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    s = torch.sigmoid(x * 2)
    out = s.sum()
    with torch.no_grad():
        s.mul_(2)
    with pytest.raises(GraphError, match="modified in place after the forward"):
        semitriton.grad(out, x, semiring=semiring)
