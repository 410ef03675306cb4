"""Convolution rules beyond the one-step cases of test_aten_rules.py: a small
CNN against the float64 oracle (every semiring, both backends) and against
torch.autograd.grad, the convolution nodes that calling aten's backend ops
directly records, top paths through a convolution, and padding modes other
than zeros (a padding op before the convolution)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import semitriton
from conftest import SEMIRINGS, assert_semiring_close, triton_ok
from oracle import Program, Step, oracle


def _kw(semiring):
    return {"fast_real": False} if semiring == "real" else {}


class TinyCNN(nn.Module):
    """Conv2d -> ReLU -> Conv2d(stride 2, groups 2) -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(6 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(self.c2(torch.relu(self.c1(x))).flatten(1))


def _cnn():
    torch.manual_seed(0)
    model = TinyCNN().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = torch.randn(2, 2, dtype=torch.float64)
    return model, x, w


def _cnn_program(model, x, w):
    """The CNN as its recorded primitives (the oracle's steps)."""
    steps = [Step("h", model.c1, ("x",)), Step("r", torch.relu, ("h",)), Step("c", model.c2, ("r",)),
             Step("o", lambda c: model.fc(c.flatten(1)), ("c",)), Step("out", lambda o: (o * w).sum(), ("o",))]
    return Program("tiny_cnn", {"x": x}, steps, engine=None)


def test_cnn_real_equals_autograd():
    model, x, w = _cnn()
    xl = x.clone().requires_grad_()
    out = (model(xl) * w).sum()
    (want,) = torch.autograd.grad(out, xl, retain_graph=True)
    (got,) = semitriton.grad(out, xl, semiring="real", fast_real=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # the parameters too: the weight and bias rules
    params = [model.c1.weight, model.c1.bias, model.c2.weight, model.c2.bias]
    want = torch.autograd.grad(out, params, retain_graph=True)
    got = semitriton.grad(out, params, semiring="real", fast_real=False)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-10), ("triton", torch.float32, 2e-4)],
                         ids=["torch-f64", "triton-f32"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_cnn_against_the_oracle(semiring, backend, dtype, tol):
    if backend == "triton" and not triton_ok():
        pytest.skip("triton unavailable (or no GPU and TRITON_INTERPRET unset)")
    model, x, w = _cnn()
    want = oracle(_cnn_program(model, x, w), semiring)["x"]
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    m = copy.deepcopy(model).to(dev, dtype)
    xl = x.to(dev, dtype).requires_grad_()
    out = (m(xl) * w.to(dev, dtype)).sum()
    (got,) = semitriton.grad(out, xl, semiring=semiring, backend=backend, **_kw(semiring))
    assert_semiring_close(got, want, semiring, tol, f"tiny CNN/{semiring}/{backend}")


_G = torch.Generator().manual_seed(4)


def _r(*shape):
    return torch.randn(*shape, generator=_G, dtype=torch.float64)


_X2, _W2, _B2 = _r(2, 2, 5, 5), _r(3, 2, 3, 3), _r(3)
_X3, _W3 = _r(1, 2, 4, 3, 4), _r(2, 2, 2, 2, 2)
_WT2, _WT3 = _r(2, 3, 3, 3), _r(2, 2, 2, 2, 2)
_XG, _WG = _r(1, 4, 4, 4), _r(6, 2, 2, 2)
_XTBC, _WTBC, _BTBC = _r(6, 2, 3), _r(3, 3, 4), _r(4)

#: name -> (expected node, inputs, op[, dtype, the oracle's op]); the inputs are all queried
BACKEND_OPS = {
    "_convolution": ("ConvolutionBackward1", {"x": _X2, "w": _W2, "b": _B2},
                     lambda x, w, b: torch._convolution(x, w, b, [2, 1], [1, 2], [1, 2], False, [0, 0], 1,
                                                        False, False, True, True)),
    "_convolution_transposed": ("ConvolutionBackward1", {"x": _X2, "w": _WT2},
                                lambda x, w: torch._convolution(x, w, None, [2, 2], [1, 0], [1, 1], True, [1, 0],
                                                                1, False, False, True, True)),
    "thnn_conv2d": ("SlowConv2DBackward0", {"x": _X2, "w": _W2, "b": _B2},
                    lambda x, w, b: torch._C._nn.thnn_conv2d(x, w, [3, 3], b, [2, 1], [1, 0])),
    "slow_conv_dilated2d": ("SlowConvDilated2DBackward0", {"x": _X2, "w": _W2},
                            lambda x, w: torch._C._nn.slow_conv_dilated2d(x, w, [3, 3], None, [1, 1], [1, 2],
                                                                          [2, 1])),
    "slow_conv3d": ("SlowConv3DBackward0", {"x": _X3, "w": _W3},
                    lambda x, w: torch._C._nn.slow_conv3d(x, w, [2, 2, 2], None, [1, 2, 1], [1, 0, 1])),
    "slow_conv_dilated3d": ("SlowConvDilated3DBackward0", {"x": _X3, "w": _W3},
                            lambda x, w: torch._C._nn.slow_conv_dilated3d(x, w, [2, 2, 2], None, [1, 1, 2],
                                                                          [0, 1, 1], [2, 1, 1])),
    "slow_conv_transpose2d": ("SlowConvTranspose2DBackward0", {"x": _X2, "w": _WT2},
                              lambda x, w: torch._C._nn.slow_conv_transpose2d(x, w, [3, 3], None, [2, 1], [1, 1],
                                                                              [1, 0], [1, 2])),
    "slow_conv_transpose3d": ("SlowConvTranspose3DBackward0", {"x": _X3, "w": _WT3},
                              lambda x, w: torch._C._nn.slow_conv_transpose3d(x, w, [2, 2, 2], None, [2, 1, 1],
                                                                              [0, 1, 0], [1, 0, 0], [1, 1, 2])),
    "mkldnn_convolution": ("MkldnnConvolutionBackward0", {"x": _XG, "w": _WG},
                           lambda x, w: torch.mkldnn_convolution(x, w, None, [1, 1], [2, 1], [1, 1], 2),
                           torch.float32,                         # oneDNN: no float64
                           lambda x, w: F.conv2d(x, w, None, [2, 1], [1, 1], [1, 1], 2)),
    "conv_tbc": ("ConvTbcBackward0", {"x": _XTBC, "w": _WTBC, "b": _BTBC},
                 lambda x, w, b: torch.conv_tbc(x, w, b, 1)),
    "conv_transpose1d_groups": ("ConvolutionBackward0", {"x": _r(2, 4, 4), "w": _r(4, 1, 3), "b": _r(2)},
                                lambda x, w, b: F.conv_transpose1d(x, w, b, stride=3, padding=2, output_padding=1,
                                                                   groups=2, dilation=2)),
}


@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", list(BACKEND_OPS))
def test_backend_convolution_nodes_against_the_oracle(name, semiring):
    """The convolution nodes aten's backend ops record when called directly
    read the same stride/padding/dilation/groups (defaults where a node
    saves none), on the torch backend in float64."""
    node, inputs, fn, dtype, ref = (BACKEND_OPS[name] + (torch.float64, None))[:5]
    try:
        probe = fn(*[t.to(dtype).requires_grad_() for t in inputs.values()])
    except RuntimeError as exc:               # an op this build of torch lacks on the CPU
        pytest.skip(f"{name}: {exc}")
    assert type(probe.grad_fn).__name__ == node
    w = torch.randn(probe.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    steps = [Step("z", ref or fn, tuple(inputs)), Step("out", lambda z: (z * w).sum(), ("z",))]
    want = oracle(Program(name, inputs, steps, engine=None), semiring)
    leaves = [t.to(dtype).requires_grad_() for t in inputs.values()]
    out = (fn(*leaves) * w.to(dtype)).sum()
    got = semitriton.grad(out, leaves, semiring=semiring, backend="torch", **_kw(semiring))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for k, g in zip(inputs, got):
        assert_semiring_close(g, want[k], semiring, tol, f"{name}/{k}/{semiring}")


def test_top_path_through_a_convolution():
    """Paths read the conv rule's Jacobian columns: the best path's product
    is the maxabs readout, and its first step is the convolution."""
    from semitriton.paths import top_paths
    model, x, w = _cnn()
    xl = x.clone().requires_grad_()
    out = (model(xl) * w).sum()
    (best,) = top_paths(out, xl, k=1)
    assert best.steps[0].node == "ConvolutionBackward0"
    (m,) = semitriton.grad(out, xl, semiring="maxabs")
    torch.testing.assert_close(abs(best.product), float(m.max()), rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes(mode):
    """nn.Conv2d with a padding mode other than zeros pads with a separate op
    and convolves without padding: reflection and replication padding are
    copies, circular padding writes into slices of a new tensor (CopySlices);
    every padded element is a weight-1 copy of one input element: real
    equals autograd, abs is Σ|w| over the copies."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=mode).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    out = (conv(x) * torch.randn(1, 3, 5, 5, dtype=torch.float64)).sum()
    (got,) = semitriton.grad(out, x, semiring="real", fast_real=False)
    torch.testing.assert_close(got, torch.autograd.grad(out, x, retain_graph=True)[0], rtol=1e-12, atol=1e-14)
    w = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    pad = (2, 1, 0, 1)
    out = (F.pad(x, pad, mode=mode) * w).sum()
    (got,) = semitriton.grad(out, x, semiring="abs")
    want = torch.autograd.grad((F.pad(x, pad, mode=mode) * w.abs()).sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_inconsistent_shapes_are_an_error():
    """Taps that would read outside the padded input raise, naming the node,
    instead of a truncated (silently wrong) value."""
    from semitriton.errors import GraphError
    from semitriton.rules.conv import _Spec, conv_values
    from semitriton.semirings import get
    sr = get("maxabs")
    v = sr.one((1, 3, 9), torch.float64, "cpu")        # no unpadded stride-1 conv of length 5 gives 9
    x, w = torch.randn(1, 2, 5, dtype=torch.float64), torch.randn(3, 2, 2, dtype=torch.float64)
    with pytest.raises(GraphError, match="ConvolutionBackward0: input"):
        conv_values(sr, v, x, w, _Spec((1,), (0,), (1,), 1, False), (1, 2, 5), (True, True, False),
                    "ConvolutionBackward0")
