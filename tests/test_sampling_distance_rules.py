"""Rules for grid sampling (F.grid_sample 2-D/3-D in every mode, padding mode
and align_corners; F.affine_grid), distances (torch.cdist for p in
{0, 0.5, 1, 1.5, 2, 3, inf}, torch.pdist) and bilinear forms (F.bilinear,
torch._trilinear), each as one step of a float64 oracle program
(tests/oracle.py: its Jacobian's non-zero entries are the edges), in every
semiring, on the torch backend (float64) and the Triton one (float32,
interpreted on the CPU); the real walk against torch.autograd.grad; and a
small spatial-transformer network with a bilinear head end to end.

Grid coordinates are multiples of 1/8 (exact in float32 too), so points
land exactly on pixel centres, half-pixel boundaries and the image border
(where a bilinear corner weight, or the clip's derivative, is exactly 0),
and beyond the image. Bicubic with border padding stays less than a pixel
beyond (farther out all four taps of a coordinate read one pixel), bicubic
with reflection off the mirrors u = ±1 (where the taps pair up
symmetrically): there the grid's derivative cancels to rounding residue,
~1e-17 in torch's float64 backward and ~1e-8 in a float32 walk, which no
tolerance compares. Data for the distances are multiples of 1/2 with
repeated rows (zero distances, zero coordinate differences) and ties for the
max norm."""

import functools
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

import semitriton
from conftest import SEMIRINGS, assert_semiring_close, check_each_operand_alone, node_types, triton_ok
from oracle import Program, Step, oracle
from test_custom_semiring import PathCount

_G = torch.Generator().manual_seed(23)


def _randn(*shape):
    return torch.randn(*shape, generator=_G, dtype=torch.float64)


def _eighths(*shape, lo=-12, hi=13):
    return torch.randint(lo, hi, shape, generator=_G).double() / 8


def _halves(*shape):
    return torch.randint(-3, 4, shape, generator=_G).double() / 2


_GRID2 = _eighths(2, 4, 4, 2, lo=-10, hi=11)
_GRID2[0, 0] = torch.tensor([[0.3141, -0.7727], [1.0, -1.0], [0.0, 0.0], [-1.0, 0.25]],
                            dtype=torch.float64)   # off the lattice, corners, centres (W = 5, H = 4)
_GRID2[1, 0] = torch.tensor([[0.0, 0.75], [0.5, -0.25], [-0.5, 0.5], [0.25, -0.75]], dtype=torch.float64)
_GRID3 = _eighths(1, 2, 2, 3, 3, lo=-10, hi=11)
_GRID3[0, 1, 1, 2] = torch.tensor([0.6180, -1.2, 0.05], dtype=torch.float64)
_GRID3[0, 0, 0, 0] = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
_C1 = _halves(2, 4, 3)
_C2 = _halves(2, 5, 3)
_C2[:, 0] = _C1[:, 1]                                    # duplicate rows: distance 0
_C2[0, 2] = _C1[0, 3] + torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)   # a max-norm tie
_PD = _halves(5, 3)
_PD[3] = _PD[1]                                          # a zero pairwise distance
_XB = _randn(27, 2)                                      # over 25 rows: cdist's mm path unless told not to
_XBB = torch.randn(2, 27, 2, generator=torch.Generator().manual_seed(27), dtype=torch.float64)   # not from _G

INPUTS = {
    "img": _randn(2, 2, 4, 5), "grid": _GRID2, "grid_near": _GRID2.clamp(-1.125, 1.125),
    "grid_off_mirror": torch.where(_GRID2.abs() == 1, _GRID2 * 1.0625, _GRID2),
    "vol": _randn(1, 2, 3, 4, 5), "grid3": _GRID3,
    "theta": _randn(2, 2, 3), "theta3": _randn(1, 3, 4),
    "c1": _C1, "c2": _C2, "c2b": _halves(5, 3), "r1": _randn(3, 4), "r2": _randn(2, 4), "pd": _PD,
    "xb": _XB, "yb": _randn(3, 2), "xbb": _XBB,
    "b1": _randn(4, 3), "b2": _randn(4, 2), "bw": _randn(5, 3, 2), "bb": _randn(5),
    "b1b": _randn(2, 3, 3), "b2b": _randn(2, 3, 2),
    "ta": _randn(3, 4), "tb": _randn(4, 5), "tc": _randn(3, 5), "tv": _randn(3), "tw": _randn(3),
}
INPUTS["xbb"][1, 4] = INPUTS["yb"][0]                    # a zero distance (the mm path reads about 1e-15)


def _sampler(mode, padding, align):
    return lambda x, g: F.grid_sample(x, g, mode=mode, padding_mode=padding, align_corners=align)


def _stn(x, theta):
    return F.grid_sample(x, F.affine_grid(theta, (2, 2, 3, 3), align_corners=False), padding_mode="border",
                         align_corners=False)


#: name -> (inputs used, the op[, the oracle's op when torch has no backward for it])
CASES = {}
for _mode, _pad, _ac in itertools.product(("bilinear", "nearest", "bicubic"), ("zeros", "border", "reflection"),
                                          (True, False)):
    _name = f"{_mode}_{_pad}_{'align' if _ac else 'noalign'}"
    _grid = {"bicubic_border": "grid_near", "bicubic_reflection": "grid_off_mirror"}.get(f"{_mode}_{_pad}", "grid")
    CASES["grid2d_" + _name] = (("img", _grid), _sampler(_mode, _pad, _ac))
    if _mode != "bicubic":
        CASES["grid3d_" + _name] = (("vol", "grid3"), _sampler(_mode, _pad, _ac))
CASES.update({
    "affine_grid": (("theta",), lambda t: F.affine_grid(t, (2, 1, 3, 4), align_corners=False)),
    "affine_grid_3d_align": (("theta3",), lambda t: F.affine_grid(t, (1, 1, 2, 3, 3), align_corners=True)),
    "affine_grid_then_sample": (("img", "theta"), _stn),
})
for _p in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, float("inf")):
    CASES[f"cdist_p{_p:g}"] = (("c1", "c2"), lambda a, b, p=_p: torch.cdist(a, b, p=p))
for _p in (0.5, 1.0, 2.0, 3.0, float("inf")):
    CASES[f"pdist_p{_p:g}"] = (("pd",), lambda a, p=_p: torch.pdist(a, p=p))
CASES.update({
    "cdist_broadcast_batch": (("c1", "c2b"), lambda a, b: torch.cdist(a, b, p=1.5)),
    "cdist_random_p3": (("r1", "r2"), lambda a, b: torch.cdist(a, b, p=3.0)),
    "cdist_random_p0.5": (("r1", "r2"), lambda a, b: torch.cdist(a, b, p=0.5)),
    "cdist_p2_many_rows": (("xb", "yb"), lambda a, b: torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")),
    # the default compute_mode past 25 rows: torch's _euclidean_dist (matmuls, one EuclideanDistBackward0 node)
    "cdist_p2_many_rows_mm": (("xb", "yb"), lambda a, b: torch.cdist(a, b), lambda a, b: torch.cdist(
        a, b, compute_mode="donot_use_mm_for_euclid_dist")),
    "cdist_p2_many_rows_mm_batched": (("xbb", "yb"), lambda a, b: torch.cdist(a, b), lambda a, b: torch.cdist(
        a, b, compute_mode="donot_use_mm_for_euclid_dist")),
    "cdist_p2_many_rows_mm_second": (("yb", "xb"), lambda a, b: torch.cdist(a, b), lambda a, b: torch.cdist(
        a, b, compute_mode="donot_use_mm_for_euclid_dist")),
    "pdist_random_p1.5": (("r1",), lambda a: torch.pdist(a, p=1.5)),
    "bilinear_bias": (("b1", "b2", "bw", "bb"), lambda a, b, w, c: F.bilinear(a, b, w, c)),
    "bilinear_no_bias": (("b1", "b2", "bw"), lambda a, b, w: F.bilinear(a, b, w)),
    "bilinear_batched": (("b1b", "b2b", "bw", "bb"), lambda a, b, w, c: F.bilinear(a, b, w, c)),
    "trilinear_chain": (("ta", "tb", "tc"), lambda a, b, c: torch._trilinear(a, b, c, [2], [0], [1], [1, 2])),
    "trilinear_partial": (("ta", "tb", "tc"), lambda a, b, c: torch._trilinear(a, b, c, [2], [0], [1], [1])),
    # torch's own backward fails here (an operand's dim that only it has, summed): the oracle uses einsum
    "trilinear_lone_dim": (("ta", "tv", "tw"), lambda a, v, w: torch._trilinear(a, v, w, [], [1], [1], [1]),
                           lambda a, v, w: torch.einsum("ik,i,i->i", a, v, w)),
})

#: the node each case is about (its output's grad_fn, or the one below a view)
NODES = {name: ("GridSampler2DBackward0" if name.startswith("grid2d") else "GridSampler3DBackward0")
         for name in CASES if name.startswith("grid")}
NODES.update({n: "EuclideanDistBackward0" if "_mm" in n else "CdistBackward0"
              for n in CASES if n.startswith("cdist")})
NODES.update({n: "PdistBackward0" for n in CASES if n.startswith("pdist")})
NODES.update({n: "TrilinearBackward0" for n in CASES if n.startswith(("trilinear", "bilinear"))})
NODES.update({"affine_grid": "AffineGridGeneratorBackward0", "affine_grid_3d_align": "AffineGridGeneratorBackward0",
              "affine_grid_then_sample": "GridSampler2DBackward0"})


def _weights(name):
    used, fn = CASES[name][:2]
    shape = fn(*[INPUTS[k] for k in used]).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _want(name, semiring):
    used, fn, *ref = CASES[name]
    w = _weights(name)
    steps = [Step("z", ref[0] if ref else fn, used), Step("out", lambda z: (z * w).sum(), ("z",))]
    return oracle(Program(name, {k: INPUTS[k] for k in used}, steps, engine=None), semiring)


def _walk(name, semiring, backend="torch", dtype=torch.float64, dev="cpu"):
    used, fn = CASES[name][:2]
    leaves = [INPUTS[k].to(dev, dtype).requires_grad_() for k in used]
    out = (fn(*leaves) * _weights(name).to(dev, dtype)).sum()
    got = semitriton.grad(out, leaves, semiring=semiring, backend=backend,
                          **({"fast_real": False} if semiring == "real" else {}))
    return used, leaves, out, got


@pytest.mark.parametrize("backend,dtype,tol", [("torch", torch.float64, 1e-12), ("triton", torch.float32, 2e-4)],
                         ids=["torch-f64", "triton-f32"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", list(CASES))
def test_sampling_distance_ops_against_the_oracle(name, semiring, backend, dtype, tol):
    if backend == "triton" and not triton_ok():
        pytest.skip("triton unavailable (or no GPU and TRITON_INTERPRET unset)")
    want = _want(name, semiring)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    used, _, _, got = _walk(name, semiring, backend, dtype, dev)
    for k, g in zip(used, got):
        assert_semiring_close(g, want[k], semiring, tol, f"{name}/{k}/{semiring}/{backend}")


@pytest.mark.parametrize("name", [n for n in CASES if len(CASES[n]) == 2])
def test_real_walk_equals_autograd(name):
    used, leaves, out, got = _walk(name, "real")
    ref = torch.autograd.grad(out, leaves, allow_unused=True)
    for k, g, r in zip(used, got, ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-12, atol=1e-13,
                                   msg=f"{name}/{k}")


class _GenericReal(PathCount):
    """The real semiring from the required methods only (generic contractions)."""

    name = "generic_real"

    def edge(self, w):
        return (w,)


class _GenericMaxAbs(_GenericReal):
    """max |path product| (zero = 0: no path)."""

    name = "generic_maxabs"

    def plus(self, a, b):
        return (torch.maximum(a[0], b[0]),)

    def edge(self, w):
        return (w.abs(),)


@pytest.mark.parametrize("name,chunked", [(n, False) for n in CASES] + [
    (n, True) for n in CASES if n.startswith(("cdist", "pdist", "bilinear", "trilinear"))])
def test_user_defined_semirings(name, chunked, monkeypatch):
    """A semiring with only zero/one/plus/times/edge/readout runs through the
    generic contractions; chunked: a budget of 7 elements, so cdist/pdist
    build their Jacobians a row at a time and _trilinear in slices of its
    largest dim (⊕-ed over a fan-out dim, side by side otherwise)."""
    if chunked:
        from semitriton.rules import distance
        monkeypatch.setattr(distance, "_CHUNK_ELEMS", 7)
    for sr, ref in ((_GenericReal(), "real"), (_GenericMaxAbs(), "maxabs")):
        used, _, _, got = _walk(name, sr)
        want = _want(name, ref)
        for k, g in zip(used, got):
            assert_semiring_close(g, want[k], ref, 1e-12, f"{name}/{k}/{sr.name}")


def test_the_cases_record_the_nodes_they_test():
    """Each case's forward records the node it is named for (F.bilinear:
    below the view back to the batch shape and the bias' add)."""
    for name, node in NODES.items():
        used, fn = CASES[name][:2]
        f = fn(*[INPUTS[k].clone().requires_grad_() for k in used]).grad_fn
        while type(f).__name__ in ("AddBackward0", "ViewBackward0"):
            f = f.next_functions[0][0]
        assert type(f).__name__ == node, name
    x = INPUTS["img"].clone().requires_grad_()
    g = F.affine_grid(INPUTS["theta"].clone().requires_grad_(), (2, 2, 3, 3), align_corners=False)
    assert type(g.grad_fn).__name__ == "AffineGridGeneratorBackward0"
    assert type(F.grid_sample(x, g, align_corners=False).grad_fn).__name__ == "GridSampler2DBackward0"


def test_bicubic_taps_on_one_pixel_are_one_edge():
    """Border padding clips the tap left of the image onto its first column:
    the two taps' weights form one edge (torch's Jacobian entry), so the abs
    value there is |w₋₁ + w₀|, not |w₋₁| + |w₀|."""
    x = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[[[-0.9, 0.0]]]], dtype=torch.float64)        # x = 0.15: taps -1, 0 -> column 0
    out = F.grid_sample(x, g, mode="bicubic", padding_mode="border", align_corners=True).sum()
    (want,) = torch.autograd.grad(out, x, retain_graph=True)
    (got,) = semitriton.grad(out, x, semiring="abs")
    torch.testing.assert_close(got, want.abs(), rtol=1e-14, atol=0)
    assert want[0, 0, 1, 0] != 0


def test_cudnn_grid_sampler_reads_its_saved_tensors():
    """cuDNN's node (CUDA: bilinear, zeros, align_corners=True) saves the
    input as ``self``: given those, its rule is grid_sample's (a stand-in
    node here, as a CPU records GridSampler2DBackward0)."""
    from semitriton.rules import RULES, RuleContext
    from semitriton.semirings import get
    x, g = INPUTS["img"].clone().requires_grad_(), INPUTS["grid"].clone().requires_grad_()
    node = F.grid_sample(x, g, align_corners=True).grad_fn

    class CudnnGridSamplerBackward0:
        next_functions, _input_metadata = node.next_functions, node._input_metadata
        _saved_self, _saved_grid = node._saved_input, node._saved_grid

    sr = get("maxabs")
    v = sr.edge(_weights("grid2d_bilinear_zeros_align"))
    want = RULES["GridSampler2DBackward0"](RuleContext(node, [v], [True, True], sr, torch.float64))
    got = RULES["CudnnGridSamplerBackward0"](RuleContext(CudnnGridSamplerBackward0(), [v], [True, True], sr,
                                                          torch.float64))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _SpatialTransformerBilinear(torch.nn.Module):
    """A localisation net predicts an affine map; the input is resampled
    (affine_grid + grid_sample); pooled features and their distances to
    anchors meet in an nn.Bilinear head."""

    def __init__(self):
        super().__init__()
        self.loc = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 6))
        self.anchors = torch.nn.Parameter(torch.randn(3, 2))
        self.head = torch.nn.Bilinear(8, 12, 3)

    def forward(self, x):
        theta = torch.eye(2, 3, dtype=x.dtype) + 0.2 * self.loc(x).view(-1, 2, 3)
        grid = F.affine_grid(theta, x.shape, align_corners=False)
        y = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        p = F.adaptive_avg_pool2d(y, 2).flatten(1)                       # [N, 8]
        q = torch.cdist(p.view(-1, 4, 2), self.anchors).flatten(1)       # [N, 12]
        return self.head(p, q)


def test_spatial_transformer_with_a_bilinear_head_end_to_end():
    """The real walk equals torch.autograd.grad (input, the localisation
    net's and the head's weights, the anchors), every semiring runs without
    NaN, and abs bounds |real|."""
    torch.manual_seed(0)
    model = _SpatialTransformerBilinear().double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    params = [x, model.loc[0].weight, model.loc[4].weight, model.anchors, model.head.weight, model.head.bias]
    out = (model(x) * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)).sum()
    assert {"GridSampler2DBackward0", "AffineGridGeneratorBackward0", "CdistBackward0", "TrilinearBackward0"} <= \
        set(node_types(out))
    want = torch.autograd.grad(out, params, retain_graph=True)
    real = semitriton.grad(out, params, semiring="real", fast_real=False)
    for g, r in zip(real, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    for s in SEMIRINGS:
        vals = semitriton.grad(out, params, semiring=s, **({"fast_real": False} if s == "real" else {}))
        for v, r in zip(vals, want):
            assert not torch.isnan(v).any(), s
            if s == "abs":
                assert bool((v >= r.abs() * (1 - 1e-12) - 1e-15).all())


CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", ["grid2d_bilinear_zeros_align", "grid2d_bilinear_border_noalign",
                                  "grid3d_bilinear_reflection_align", "affine_grid_then_sample", "cdist_p2",
                                  "bilinear_bias"])
def test_on_cuda_against_the_oracle(name, semiring, dtype, tol):
    """On CUDA (cuDNN records CudnnGridSamplerBackward0 for bilinear, zero
    padding and align_corners; torch's CUDA kernels elsewhere), both backends
    against the float64 oracle."""
    cudnn = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        want = _want(name, semiring)
        for backend in ("torch", "triton"):
            used, _, out, got = _walk(name, semiring, backend, dtype, "cuda")
            for k, g in zip(used, got):
                assert_semiring_close(g.cpu(), want[k], semiring, tol, f"{name}/{k}/{semiring}/{backend}")
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn


@pytest.mark.parametrize("semiring", SEMIRINGS)
@pytest.mark.parametrize("name", [n for n in CASES if len(CASES[n][0]) > 1])
def test_each_operand_alone_requiring_grad(name, semiring):
    """A frozen nn.Bilinear fed one constant input (only one operand
    requires grad, so torch saves only the others) reads what the oracle does."""
    used, fn = CASES[name][:2]
    check_each_operand_alone(name, fn, INPUTS, used, _weights(name), _want(name, semiring), semiring)
