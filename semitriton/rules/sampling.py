"""Grid sampling: ``F.grid_sample`` (GridSampler2DBackward0,
GridSampler3DBackward0, and cuDNN's CudnnGridSamplerBackward0) and
``F.affine_grid`` (AffineGridGeneratorBackward0).

grid_sample: output point o of batch n reads the input at the grid's
coordinates u = grid[n, o] (u_0 = x indexes the last spatial dim),
unnormalised to pixels x = (u + 1)/2·(S − 1) (align_corners) or
((u + 1)·S − 1)/2, then clipped to [0, S − 1] (border) or reflected and
clipped (reflection).

- bilinear (trilinear in 3-D): each corner c of the cell around x that lies
  in the image is an edge input[n, ch, c] -> out[n, ch, o] of weight
  Π_d (1 − |x_d − c_d|);
- bicubic (2-D): the 4×4 taps ⌊x⌋ − 1 .. ⌊x⌋ + 2 (indices padded as torch
  pads them; taps that land on one pixel are one edge of the summed weight),
  weight the product of the cubic-convolution coefficients (A = −0.75);
- nearest: the pixel at round-half-even(x), weight 1.

The grid's edges grid[n, o, d] -> out[n, ch, o] carry ∂out/∂u_d =
(dx_d/du_d)·Σ_c ±input[c]·Π_{d'≠d} w_{d'} (bicubic: the coefficients'
derivatives), dx/du being the unnormalisation factor times the clip (0
outside the image and on its border) and reflection (±1) derivatives;
nearest has none. The formulas and their order of operations are those of
torch's scalar kernels (CUDA, CPU 3-D; the vectorised CPU 2-D kernel rounds
a few differently), so the exact zeros are torch's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import GraphError
from ..semirings.base import scatter_plus
from . import rule

_MODES = ("bilinear", "nearest", "bicubic")
_PADDINGS = ("zeros", "border", "reflection")
#: the cubic-convolution constant of torch's bicubic modes
_A = -0.75


# ---- coordinates (torch's GridSampler.h) -----------------------------------------------------
def _clip(x: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """x clipped to [0, size − 1] and its derivative (0 outside and on the borders)."""
    hi = float(size - 1)
    return x.clamp(0.0, hi), ((x > 0) & (x < hi)).to(x.dtype)


def _reflect(x: Tensor, size: int, align: bool) -> tuple[Tensor, Tensor]:
    """x reflected into [0, S − 1] (align_corners) or [−½, S − ½] and its derivative ±1."""
    if align and size <= 1:
        return torch.zeros_like(x), torch.zeros_like(x)
    lo, span = (0.0, float(size - 1)) if align else (-0.5, float(size))
    t = x - lo
    neg = t < 0
    t = t.abs()
    extra = torch.fmod(t, span)
    odd = torch.fmod(torch.floor(t / span), 2) != 0
    out = torch.where(odd, span - extra + lo, extra + lo)
    return out, 1 - 2 * (odd ^ neg).to(x.dtype)


def _pad(x: Tensor, size: int, padding: str, align: bool) -> tuple[Tensor, Tensor]:
    """The padding mode applied to pixel coordinates x and its derivative."""
    if padding == "border":
        return _clip(x, size)
    if padding == "reflection":
        x, gr = _reflect(x, size, align)
        x, gc = _clip(x, size)
        return x, gr * gc
    return x, torch.ones_like(x)


def _unnormalize(u: Tensor, size: int, align: bool) -> tuple[Tensor, float]:
    """Pixel coordinate of grid coordinate u and dx/du."""
    if align:
        return (u + 1) / 2 * (size - 1), (size - 1) / 2
    return ((u + 1) * size - 1) / 2, size / 2


def _in_bounds(idx: Tensor, size: int) -> Tensor:
    return (idx >= 0) & (idx < size)


# ---- taps (pixel, weight) and the grid's local derivatives ---------------------------------------
def _gather(inp: Tensor, pix: Tensor, ok: Tensor) -> Tensor:
    """inp [N, C, P] at flat pixels pix [N, O] (0 where not ok): [N, C, O]."""
    idx = torch.where(ok, pix, 0).unsqueeze(1).expand(-1, inp.shape[1], -1)
    return torch.where(ok.unsqueeze(1), inp.gather(2, idx), 0.0)


def _linear(inp, u, sizes, padding, align, want_grid):
    """Bilinear/trilinear taps and ∂out/∂u per coordinate (torch's scalar backward)."""
    k = len(u)
    xs, mults = [], []
    for j in range(k):
        x, m = _unnormalize(u[j], sizes[j], align)
        x, g = _pad(x, sizes[j], padding, align)
        xs.append(x)
        mults.append(m * g)
    lo = [torch.floor(x) for x in xs]
    sides = [((lo_j + 1) - x, x - lo_j) for lo_j, x in zip(lo, xs)]     # weight of the low/high corner
    strides = [math.prod(sizes[:j]) for j in range(k)]
    taps, grads = [], [inp.new_zeros(inp.shape[0], inp.shape[1], xs[0].shape[1]) for _ in range(k)]
    for c in range(2 ** k):
        bits = [(c >> j) & 1 for j in range(k)]
        idx = [lo[j].long() + bits[j] for j in range(k)]
        ok = torch.stack([_in_bounds(i, s) for i, s in zip(idx, sizes)]).all(0)
        pix = sum(i * s for i, s in zip(idx, strides))
        w = sides[0][bits[0]]
        for j in range(1, k):
            w = w * sides[j][bits[j]]
        taps.append((pix, torch.where(ok, w, 0.0)))
        if want_grid:
            val = _gather(inp, pix, ok)
            for j in range(k):
                term = val
                for j2 in range(k):
                    if j2 != j:
                        term = term * sides[j2][bits[j2]].unsqueeze(1)
                grads[j] = grads[j] + term if bits[j] else grads[j] - term
    grid = [m.unsqueeze(1) * g for m, g in zip(mults, grads)] if want_grid else None
    return taps, grid


def _nearest(u, sizes, padding, align):
    """The nearest pixel (round half to even), weight 1."""
    idx, strides = [], [math.prod(sizes[:j]) for j in range(len(u))]
    for j, s in enumerate(sizes):
        x, _ = _unnormalize(u[j], s, align)
        idx.append(torch.round(_pad(x, s, padding, align)[0]).long())
    ok = torch.stack([_in_bounds(i, s) for i, s in zip(idx, sizes)]).all(0)
    pix = sum(i * s for i, s in zip(idx, strides))
    return [(pix, ok.to(u[0].dtype))]


def _cubic(t: Tensor) -> list[Tensor]:
    """torch's cubic-convolution coefficients of the taps −1, 0, 1, 2 at offset t."""
    def near(x):
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    t2 = 1 - t
    return [far(t + 1), near(t), near(t2), far(t2 + 1)]


def _cubic_grad(t: Tensor) -> list[Tensor]:
    """Their derivatives in t."""
    x0, x1, x2, x3 = -1 - t, -t, 1 - t, 2 - t
    return [(-3 * _A * x0 - 10 * _A) * x0 - 8 * _A, (-3 * (_A + 2) * x1 - 2 * (_A + 3)) * x1,
            (3 * (_A + 2) * x2 - 2 * (_A + 3)) * x2, (3 * _A * x3 - 10 * _A) * x3 + 8 * _A]


def _bicubic(inp, u, sizes, padding, align, want_grid):
    """The 4×4 taps (one edge per pixel: repeated pixels' weights summed in
    torch's tap order) and ∂out/∂u."""
    W, H = sizes
    coefs, dcoefs, cols, mults = [], [], [], []
    for j in range(2):
        x, m = _unnormalize(u[j], sizes[j], align)
        lo = torch.floor(x)
        coefs.append(_cubic(x - lo))
        dcoefs.append(_cubic_grad(x - lo))
        cols.append([_pad(lo - 1 + i, sizes[j], padding, align)[0].long() for i in range(4)])
        mults.append(m)
    pix, ws, oks = [], [], []
    for i in range(4):                                        # x outer, y inner: torch's order
        for jj in range(4):
            ix, iy = cols[0][i], cols[1][jj]
            oks.append(_in_bounds(ix, W) & _in_bounds(iy, H))
            pix.append(iy * W + ix)
            ws.append(coefs[0][i] * coefs[1][jj])
    grads = None
    if want_grid:
        gx = gy = inp.new_zeros(inp.shape[0], inp.shape[1], u[0].shape[1])
        for t in range(16):
            i, jj = divmod(t, 4)
            val = _gather(inp, pix[t], oks[t])
            gx = gx - val * dcoefs[0][i].unsqueeze(1) * coefs[1][jj].unsqueeze(1)
            gy = gy - val * dcoefs[1][jj].unsqueeze(1) * coefs[0][i].unsqueeze(1)
        grads = [mults[0] * gx, mults[1] * gy]
    ws = [torch.where(ok, w, 0.0) for w, ok in zip(ws, oks)]
    if padding != "zeros":                                    # clipped/reflected taps may share a pixel
        first = [torch.ones_like(oks[0]) for _ in range(16)]
        for t in range(1, 16):
            for s in range(t):
                same = first[s] & first[t] & (pix[s] == pix[t])
                ws[s] = torch.where(same, ws[s] + ws[t], ws[s])
                first[t] = first[t] & ~same
        ws = [torch.where(f, w, 0.0) for w, f in zip(ws, first)]
    return list(zip(pix, ws)), grads


# ---- the values -------------------------------------------------------------------------------
def _input_value(sr, v, taps, spatial: tuple):
    """input[n, ch, p] = ⊕_{o, t: pix_t[n, o] = p} edge(w_t[n, o]) ⊗ v[n, ch, o]."""
    N, C = v[0].shape[:2]
    P = math.prod(spatial)
    pix = torch.stack([p for p, _ in taps], -1)                      # [N, O, T]
    w = torch.stack([w for _, w in taps], -1)
    keep = w != 0
    pos = (pix + (torch.arange(N, device=pix.device) * P).reshape(N, 1, 1))[keep]
    rows = sr.map(v, lambda c: c.reshape(N, C, -1).transpose(1, 2).unsqueeze(2).expand(-1, -1, w.shape[-1], -1)
                  [keep])                                             # [M, C]
    rows = sr.scale(rows, w[keep].unsqueeze(-1))
    out = scatter_plus(sr, rows, pos, N * P)
    return sr.map(out, lambda c: c.reshape(N, *spatial, C).movedim(-1, 1))


def grid_sample_values(ctx, inp: Tensor, grid: Tensor, mode: str, padding: str, align: bool) -> list:
    """Values of (input, grid) of a grid sampler node from its output's value."""
    sr, v = ctx.sr, ctx.grad()
    k = inp.dim() - 2
    N, C = inp.shape[:2]
    if mode == "bicubic" and k != 2:
        raise GraphError(f"{ctx.name}: bicubic grid sampling of a {k}-D input (torch has it for 2-D only)")
    sizes = tuple(inp.shape[2:])[::-1]                                # per grid coordinate: W, H(, D)
    out_spatial = tuple(grid.shape[1:-1])
    u = [grid[..., j].reshape(N, -1) for j in range(k)]
    want_grid = ctx.needs[1] and mode != "nearest"
    flat = inp.reshape(N, C, -1)
    if mode == "nearest":
        taps, gd = _nearest(u, sizes, padding, align), None
    elif mode == "bilinear":
        taps, gd = _linear(flat, u, sizes, padding, align, want_grid)
    else:
        taps, gd = _bicubic(flat, u, sizes, padding, align, want_grid)
    out = [None, None]
    if ctx.needs[0]:
        out[0] = _input_value(sr, v, taps, tuple(inp.shape[2:]))
    if want_grid:
        d = torch.stack(gd, -1).reshape(N, C, *out_spatial, k)        # [N, C, *O, k]
        out[1] = sr.sum(sr.scale(sr.map(v, lambda c: c.unsqueeze(-1)), d), 1)
    return out


@rule("GridSampler2DBackward0", "GridSampler3DBackward0")
def grid_sampler(ctx):
    """``F.grid_sample`` in every mode, padding mode and align_corners."""
    m, pm = int(ctx.saved("interpolation_mode")), int(ctx.saved("padding_mode"))
    if not (0 <= m < len(_MODES) and 0 <= pm < len(_PADDINGS)):
        raise GraphError(f"{ctx.name}: unknown interpolation mode {m} or padding mode {pm}")
    return grid_sample_values(ctx, ctx.saved("input"), ctx.saved("grid"), _MODES[m], _PADDINGS[pm],
                              bool(ctx.saved("align_corners")))


@rule("CudnnGridSamplerBackward0")
def cudnn_grid_sampler(ctx):
    """cuDNN's grid sampler (CUDA, float, 2-D): bilinear, zeros, align_corners=True."""
    return grid_sample_values(ctx, ctx.saved("self"), ctx.saved("grid"), "bilinear", "zeros", True)


def _base_coords(n: int, align: bool, dtype, device) -> Tensor:
    """torch's linspace_from_neg_one: the grid coordinates of n pixels."""
    if n <= 1:
        return torch.zeros(max(n, 1), dtype=dtype, device=device)
    r = torch.linspace(-1, 1, n, dtype=dtype, device=device)
    return r if align else r * (n - 1) / n


@rule("AffineGridGeneratorBackward0")
def affine_grid(ctx):
    """``F.affine_grid(θ, size)``: grid[n, o, i] = Σ_j base[o, j]·θ[n, i, j],
    base[o] = (x, y[, z], 1) the pixel's normalised coordinates: edge
    θ[n, i, j] -> grid[n, o, i] of weight base[o, j] (none where it is 0)."""
    out = [None] * ctx.n_inputs
    if not ctx.needs[0]:
        return out
    size = tuple(ctx.saved("size"))
    align = bool(ctx.saved("align_corners"))
    v = ctx.grad()
    dt, dev = v[0].dtype, v[0].device
    spatial = size[2:]
    k = len(spatial)
    axes = [_base_coords(s, align, dt, dev) for s in spatial]         # D, H, W order
    mesh = torch.meshgrid(*axes, indexing="ij")
    base = torch.stack([*mesh[::-1], torch.ones_like(mesh[0])], -1).reshape(-1, k + 1)
    vt = ctx.sr.map(v, lambda c: c.reshape(size[0], -1, k).transpose(1, 2))     # [N, k, O]
    out[0] = ctx.sr.matmul(vt, base)
    return out
