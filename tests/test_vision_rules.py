"""Rules for what vision/audio/multimodal models record: group norm, batch
norm (eval and training), max/avg/adaptive pools, upsampling in every mode,
writes at indices (index_put, masked_scatter, index_fill, index_copy,
scatter) and a few elementwise ops, each as one step of a float64 oracle
program (tests/oracle.py: its Jacobian's non-zero entries are the edges), in
every semiring, on the torch backend (float64) and the Triton one (float32,
interpreted on the CPU); and a small network end to end against
torch.autograd.grad."""

import functools

import pytest
import torch
import torch.nn.functional as F

import semitriton
from conftest import SEMIRINGS, assert_semiring_close, triton_ok
from oracle import Program, Step, oracle

_G = torch.Generator().manual_seed(11)


def _randn(*shape):
    return torch.randn(*shape, generator=_G, dtype=torch.float64)


_X4 = _randn(2, 4, 3, 3)                 # [N, C, H, W]
_X4B = _randn(2, 2, 5, 6)
_X3 = _randn(2, 2, 7)                    # [N, C, L]
_X5 = _randn(1, 2, 3, 4, 4)              # [N, C, D, H, W]
_XT = (_randn(1, 2, 4, 5) * 2).round() / 2   # ties inside pooling windows
_GAMMA, _BETA = _randn(4) + 0.5, _randn(4)
_RM, _RV = _randn(4), _randn(4).abs() + 0.3
_XM = _randn(3, 4)
_MASK = _XM > 0
_IDXR, _IDXC = torch.tensor([0, 2, 0, 1]), torch.tensor([1, 3, 1, 0])     # (0, 1) written twice
_SRC = _randn(12)
_FRAC_SAMPLES = torch.tensor([[0.3, 0.7], [0.9, 0.1]], dtype=torch.float64).expand(2, 2, 2)
_FRAC_SAMPLES3 = torch.tensor([[0.3, 0.7, 0.5], [0.9, 0.1, 0.2]], dtype=torch.float64).expand(1, 2, 3)


def _c(t, like):
    """A constant in the dtype of the traced input."""
    return t.to(like.dtype)


INPUTS = {
    "x4": _X4, "x4b": _X4B, "x3": _X3, "x5": _X5, "xt": _XT, "g": _GAMMA, "b": _BETA,
    "xm": _XM, "v4": _randn(4), "vk": _randn(int(_MASK.sum())), "vr": _randn(2, 4), "src": _SRC,
    "val": torch.tensor(0.7, dtype=torch.float64), "xc": _randn(3, 2), "xs": _randn(3, 1),
    "t1": _randn(3, 4), "t2": _randn(1, 4).abs() + 0.5, "wl": torch.rand(3, 1, generator=_G, dtype=torch.float64),
    "lo": _randn(4) - 0.3, "hi": _randn(3, 1).abs() + 0.2, "x2": _randn(5, 3), "g3": _randn(3), "b3": _randn(3),
}

#: name -> (inputs used, the op)
CASES = {
    # ---- group norm / batch norm ----
    "group_norm_affine": (("x4", "g", "b"), lambda x, g, b: F.group_norm(x, 2, g, b)),
    "group_norm_plain": (("x4",), lambda x: F.group_norm(x, 2)),
    "group_norm_per_channel": (("x4", "g"), lambda x, g: F.group_norm(x, 4, g)),
    "batch_norm_eval": (("x4", "g", "b"), lambda x, g, b: F.batch_norm(x, _c(_RM, x), _c(_RV, x), g, b, False)),
    "batch_norm_eval_plain": (("x4",), lambda x: F.batch_norm(x, _c(_RM, x), _c(_RV, x), training=False)),
    "batch_norm_train": (("x4", "g", "b"),
                         lambda x, g, b: F.batch_norm(x, _c(_RM, x).clone(), _c(_RV, x).clone(), g, b, True)),
    "batch_norm_train_no_stats": (("x4",), lambda x: F.batch_norm(x, None, None, training=True)),
    "batch_norm_1d_train": (("x2", "g3", "b3"), lambda x, g, b: F.batch_norm(x, None, None, g, b, True)),
    "instance_norm": (("x4", "g", "b"), lambda x, g, b: F.instance_norm(x, weight=g, bias=b)),
    # ---- pooling ----
    "max_pool1d": (("x3",), lambda x: F.max_pool1d(x, 3, stride=2, padding=1, ceil_mode=True)),
    "max_pool2d_dilated": (("x4b",), lambda x: F.max_pool2d(x, 2, stride=1, padding=1, dilation=2)),
    "max_pool2d_ceil": (("x4b",), lambda x: F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)),
    "max_pool2d_ties": (("xt",), lambda x: F.max_pool2d(x, 2, stride=1)),
    "max_pool3d": (("x5",), lambda x: F.max_pool3d(x, 2, stride=(1, 2, 2), padding=(1, 0, 1))),
    "avg_pool1d": (("x3",), lambda x: F.avg_pool1d(x, 3, stride=2, padding=1, ceil_mode=True)),
    "avg_pool2d_include_pad": (("x4b",), lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True)),
    "avg_pool2d_exclude_pad": (("x4b",), lambda x: F.avg_pool2d(x, (3, 2), stride=(2, 1), padding=(1, 1),
                                                               ceil_mode=True, count_include_pad=False)),
    "avg_pool2d_divisor": (("x4b",), lambda x: F.avg_pool2d(x, 2, stride=1, padding=1, divisor_override=3)),
    "avg_pool3d": (("x5",), lambda x: F.avg_pool3d(x, 2, stride=(1, 2, 2), padding=1, count_include_pad=False)),
    "adaptive_avg_pool1d": (("x3",), lambda x: F.adaptive_avg_pool1d(x, 3)),
    "adaptive_avg_pool2d": (("x4b",), lambda x: F.adaptive_avg_pool2d(x, (3, 4))),
    "adaptive_avg_pool2d_up": (("x4",), lambda x: F.adaptive_avg_pool2d(x, (4, 5))),
    "adaptive_avg_pool3d": (("x5",), lambda x: F.adaptive_avg_pool3d(x, (2, 3, 3))),
    "adaptive_max_pool1d": (("x3",), lambda x: F.adaptive_max_pool1d(x, 3)),
    "adaptive_max_pool2d": (("x4b",), lambda x: F.adaptive_max_pool2d(x, (3, 4))),
    "adaptive_max_pool3d": (("x5",), lambda x: F.adaptive_max_pool3d(x, (2, 3, 2))),
    "fractional_max_pool3d": (("x5",), lambda x: F.fractional_max_pool3d(
        x, 2, output_size=(1, 2, 2), _random_samples=_c(_FRAC_SAMPLES3, x))),
    "fractional_max_pool2d": (("x4b",), lambda x: F.fractional_max_pool2d(
        x, 2, output_size=(3, 4), _random_samples=_c(_FRAC_SAMPLES, x))),
    # ---- upsampling ----
    "nearest1d": (("x3",), lambda x: F.interpolate(x, scale_factor=2.5, mode="nearest")),
    "nearest2d": (("x4",), lambda x: F.interpolate(x, size=(5, 7), mode="nearest")),
    "nearest2d_down": (("x4b",), lambda x: F.interpolate(x, scale_factor=0.7, mode="nearest")),
    "nearest3d": (("x5",), lambda x: F.interpolate(x, scale_factor=(1.5, 1, 1.25), mode="nearest")),
    "nearest_exact2d": (("x4",), lambda x: F.interpolate(x, size=(5, 7), mode="nearest-exact")),
    "nearest_exact1d": (("x3",), lambda x: F.interpolate(x, scale_factor=1.7, mode="nearest-exact")),
    "bilinear": (("x4",), lambda x: F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=False)),
    "bilinear_align": (("x4",), lambda x: F.interpolate(x, size=(5, 7), mode="bilinear", align_corners=True)),
    "bilinear_scale": (("x4",), lambda x: F.interpolate(x, scale_factor=1.7, mode="bilinear")),
    "bilinear_down": (("x4b",), lambda x: F.interpolate(x, size=(3, 4), mode="bilinear")),
    # sizes where torch's float64 antialias weights have no rounding residue (5 -> 3 has a weight
    # 7.9e-17 in float64 that float32 computes as 0: a path the float32 graph does not have)
    "bilinear_antialias": (("x4b",), lambda x: F.interpolate(x, size=(2, 4), mode="bilinear", antialias=True)),
    "bicubic": (("x4",), lambda x: F.interpolate(x, size=(4, 5), mode="bicubic", align_corners=False)),
    "bicubic_align": (("x4b",), lambda x: F.interpolate(x, scale_factor=0.8, mode="bicubic", align_corners=True)),
    "bicubic_antialias": (("x4b",), lambda x: F.interpolate(x, size=(2, 4), mode="bicubic", antialias=True)),
    "lanczos_antialias": (("x4b",), lambda x: torch.ops.aten._upsample_lanczos2d_aa(x, [2, 3], False)),
    "nearest_exact3d": (("x5",), lambda x: F.interpolate(x, size=(2, 5, 3), mode="nearest-exact")),
    "linear1d": (("x3",), lambda x: F.interpolate(x, size=10, mode="linear", align_corners=True)),
    "trilinear": (("x5",), lambda x: F.interpolate(x, size=(4, 3, 5), mode="trilinear")),
    # ---- writes at indices ----
    "index_put_mask": (("xm", "vk"), lambda x, v: x.index_put((_MASK,), v)),
    "index_put_mask_accumulate": (("xm", "vk"), lambda x, v: x.index_put((_MASK,), v, accumulate=True)),
    "index_put_repeated_accumulate": (("xm", "v4"), lambda x, v: x.index_put((_IDXR, _IDXC), v, accumulate=True)),
    "index_put_int": (("xm", "v4"), lambda x, v: x.index_put((_IDXR[1:], _IDXC[1:]), v[1:])),
    "index_put_broadcast": (("xm", "v4"), lambda x, v: x.index_put((torch.tensor([0, 2]),), v)),
    "setitem_rows": (("xm", "vr"), lambda x, v: _setitem(x, torch.tensor([2, 0]), v)),
    "setitem_mask_scalar": (("xm",), lambda x: _setitem(x, _MASK, 0.5)),
    "setitem_columns": (("xm", "xc"), lambda x, v: _setitem(x, (slice(None), torch.tensor([3, 1])), v)),
    "unsafe_index_put": (("xm", "v4"), lambda x, v: torch.ops.aten._unsafe_index_put(x, [_IDXR[1:], _IDXC[1:]],
                                                                                    v[1:], False)),
    "index_put_impl": (("xm", "v4"), lambda x, v: torch._index_put_impl_(x * 1, (_IDXR, _IDXC), v, True, False)),
    "masked_scatter": (("xm", "src"), lambda x, s: x.masked_scatter(_MASK, s)),
    "index_fill": (("xm",), lambda x: x.index_fill(1, torch.tensor([2, 0]), -1.0)),
    "index_fill_tensor": (("xm", "val"), lambda x, val: x.index_fill(1, torch.tensor([2, 0, 2]), val)),
    "index_copy": (("xm", "xc"), lambda x, s: x.index_copy(1, torch.tensor([3, 0]), s)),
    "scatter": (("xm", "xs"), lambda x, s: x.scatter(1, torch.tensor([[2], [0], [3]]), s)),
    "scatter_value": (("xm",), lambda x: x.scatter(1, torch.tensor([[2, 1], [0, 0], [3, 1]]), 1.5)),
    # ---- elementwise ----
    "addcmul": (("xm", "t1", "t2"), lambda x, a, b: torch.addcmul(x, a, b, value=-0.5)),
    "addcdiv": (("xm", "t1", "t2"), lambda x, a, b: torch.addcdiv(x, a, b, value=1.5)),
    "lerp_scalar": (("xm", "t1"), lambda x, e: torch.lerp(x, e, 0.3)),
    "lerp_tensor": (("xm", "t1", "wl"), lambda x, e, w: torch.lerp(x, e, w)),
    "threshold": (("xm",), lambda x: F.threshold(x, 0.1, 2.0)),
    "threshold_inplace": (("xm",), lambda x: F.threshold_(x * 1, 0.1, 2.0)),
    "atan2": (("xm", "t2"), lambda y, x: torch.atan2(y, x)),
    "hypot": (("xm", "t2"), lambda y, x: torch.hypot(y, x)),
    "clamp_tensors": (("xm", "lo", "hi"), lambda x, lo, hi: torch.clamp(x, lo, hi)),
    "clamp_tensor_min": (("xm", "lo"), lambda x, lo: torch.clamp(x, min=lo)),
    "clamp_tensor_max": (("xm", "hi"), lambda x, hi: torch.clamp(x, max=hi)),
}


def _setitem(x, idx, v):
    y = x * 1
    y[idx] = v
    return y


def _program(name):
    used, fn = CASES[name]
    inputs = {k: INPUTS[k] for k in used}
    w = torch.randn(fn(*inputs.values()).shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    steps = [Step("z", fn, used), Step("out", lambda z: (z * w.to(z.dtype)).sum(), ("z",))]
    return Program(name, inputs, steps, engine=None), w


@functools.lru_cache(maxsize=None)
def _want(name, semiring):
    prog, _ = _program(name)
    return oracle(prog, semiring)


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12), ("triton", torch.float32, 2e-4)],
                         ids=["torch-f64", "triton-f32"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", list(CASES))
def test_vision_ops_against_the_oracle(name, semiring, backend, dtype, tol):
    if backend == "triton" and not triton_ok():
        pytest.skip("triton unavailable (or no GPU and TRITON_INTERPRET unset)")
    used, fn = CASES[name]
    _, w = _program(name)
    want = _want(name, semiring)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    leaves = [INPUTS[k].to(dev, dtype).requires_grad_() for k in used]
    out = (fn(*leaves) * w.to(dev, dtype)).sum()
    got = semitriton.grad(out, leaves, semiring=semiring, backend=backend,
                          **({"fast_real": False} if semiring == "real" else {}))
    for k, g in zip(used, got):
        assert_semiring_close(g, want[k], semiring, tol, f"{name}/{k}/{semiring}/{backend}")


def test_the_cases_record_the_nodes_they_test():
    """Each case's forward records the node it is named for (not a
    composite that other rules walk)."""
    expect = {"group_norm_affine": "NativeGroupNormBackward0", "batch_norm_eval": "NativeBatchNormBackward0",
              "max_pool2d_ceil": "MaxPool2DWithIndicesBackward0", "max_pool3d": "MaxPool3DWithIndicesBackward0",
              "avg_pool2d_divisor": "AvgPool2DBackward0", "avg_pool3d": "AvgPool3DBackward0",
              "adaptive_avg_pool2d": "AdaptiveAvgPool2DBackward0", "adaptive_avg_pool3d": "AdaptiveAvgPool3DBackward0",
              "adaptive_max_pool2d": "AdaptiveMaxPool2DBackward0", "adaptive_max_pool3d": "AdaptiveMaxPool3DBackward0",
              "fractional_max_pool3d": "FractionalMaxPool3DBackward0",
              "bicubic_antialias": "UpsampleBicubic2DAaBackward0", "lanczos_antialias": "UpsampleLanczos2DAaBackward0",
              "nearest_exact3d": "UpsampleNearestExact3DBackward0",
              "fractional_max_pool2d": "FractionalMaxPool2DBackward0",
              "nearest2d": "UpsampleNearest2DBackward0", "nearest3d": "UpsampleNearest3DBackward0",
              "nearest_exact2d": "UpsampleNearestExact2DBackward0", "nearest1d": "UpsampleNearest1DBackward0",
              "bilinear": "UpsampleBilinear2DBackward0", "bilinear_antialias": "UpsampleBilinear2DAaBackward0",
              "bicubic": "UpsampleBicubic2DBackward0", "linear1d": "UpsampleLinear1DBackward0",
              "trilinear": "UpsampleTrilinear3DBackward0", "index_put_mask": "IndexPutBackward0",
              "setitem_rows": "IndexPutBackward0", "unsafe_index_put": "UnsafeIndexPutBackward0",
              "index_put_impl": "IndexPutImplBackward0", "masked_scatter": "MaskedScatterBackward0",
              "index_fill": "IndexFillBackward0", "index_fill_tensor": "IndexFillBackward1",
              "index_copy": "IndexCopyBackward0", "scatter": "ScatterBackward0", "scatter_value": "ScatterBackward1",
              "addcmul": "AddcmulBackward0", "addcdiv": "AddcdivBackward0", "lerp_scalar": "LerpBackward0",
              "lerp_tensor": "LerpBackward1", "threshold": "ThresholdBackward0",
              "threshold_inplace": "ThresholdBackward1", "atan2": "Atan2Backward0", "hypot": "HypotBackward0",
              "clamp_tensors": "ClampBackward0"}
    for name, node in expect.items():
        used, fn = CASES[name]
        y = fn(*[INPUTS[k].clone().requires_grad_() for k in used])
        assert type(y.grad_fn).__name__ == node, name


def test_batch_norm_modes_through_the_other_entry_points():
    """The batch-norm ops torch.export/compile and the 2.x entry points record
    (_native_batch_norm_legit*, _batch_norm_with_update / _no_update) walk
    as F.batch_norm does."""
    x, g, b = (INPUTS[k].clone().requires_grad_() for k in ("x4", "g", "b"))
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rm, rv = _RM.clone(), _RV.clone()
    ref_train = F.batch_norm(x, rm.clone(), rv.clone(), g, b, True)
    ref_eval = F.batch_norm(x, rm, rv, g, b, False)
    aten = torch.ops.aten
    variants = [
        (aten._native_batch_norm_legit(x, g, b, rm.clone(), rv.clone(), True, 0.1, 1e-5)[0], ref_train),
        (aten._native_batch_norm_legit(x, g, b, True, 0.1, 1e-5)[0], ref_train),
        (aten._native_batch_norm_legit_no_training(x, g, b, rm, rv, 0.1, 1e-5)[0], ref_eval),
        (aten._batch_norm_with_update(x, g, b, rm.clone(), rv.clone(), 0.1, 1e-5)[0], ref_train),
        (aten._batch_norm_no_update(x, g, b, rm, rv, 0.1, 1e-5)[0], ref_eval),
    ]
    for y, ref in variants:
        for s in SEMIRINGS:
            kw = {"fast_real": False} if s == "real" else {}
            got = semitriton.grad((y * w).sum(), [x, g, b], semiring=s, **kw)
            want = semitriton.grad((ref * w).sum(), [x, g, b], semiring=s, **kw)
            for gv, wv in zip(got, want):
                assert_semiring_close(gv, wv.detach().numpy(), s, 1e-12, f"{type(y.grad_fn).__name__}/{s}")


def test_small_network_end_to_end():
    """GroupNorm -> Conv2d -> avg pool -> BatchNorm (eval) -> bilinear
    upsampling -> max pool -> adaptive pool -> Linear on a 4-D input: the
    real walk equals torch.autograd.grad, and every semiring runs without NaN."""
    torch.manual_seed(0)
    layers = [torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 4, 3, padding=1),
              torch.nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
              torch.nn.BatchNorm2d(4), torch.nn.Upsample(scale_factor=1.5, mode="bilinear"),
              torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.AdaptiveAvgPool2d((2, 3)),
              torch.nn.Flatten(), torch.nn.Linear(24, 3)]
    model = torch.nn.Sequential(*layers).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    y = model(x)
    out = (y * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum()
    (want,) = torch.autograd.grad(out, x, retain_graph=True)
    (got,) = semitriton.grad(out, x, semiring="real", fast_real=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for s in SEMIRINGS:
        (v,) = semitriton.grad(out, x, semiring=s, **({"fast_real": False} if s == "real" else {}))
        assert not torch.isnan(v).any(), s


def test_training_batch_norm_over_a_large_batch_says_to_call_eval():
    """Batch statistics couple every element of a channel: past the row
    limit the error names the node and the fix."""
    from semitriton.errors import GraphError
    x = torch.randn(2, 1, 128, 129, requires_grad=True)
    bn = torch.nn.BatchNorm2d(1)
    out = bn(x).square().sum()
    with pytest.raises(GraphError, match="NativeBatchNormBackward0.*model.eval"):
        semitriton.grad(out, x, semiring="maxabs")
    bn.eval()
    (v,) = semitriton.grad(bn(x).square().sum(), x, semiring="maxabs")
    assert torch.isfinite(v).all()
