"""Contractions: mm, addmm, bmm, baddbmm, mv, dot, linear. For Y = A @ B the
edges are A[i,j] -> Y[i,k] with weight B[j,k] and B[j,k] -> Y[i,k] with
weight A[i,j]."""

from __future__ import annotations

from .. import cuda_graph
from ..errors import GraphError
from . import rule, zero_where


def _sr_matmul_left(ctx, v, b):
    """Value of A in Y = A @ B: A[i,j] = ⊕_k v[i,k] ⊗ B[j,k]."""
    w = b.transpose(-1, -2)
    if w.dim() == 2 and v[0].dim() >= 2:
        return live_rows_matmul(ctx.sr, v, w)
    return matmul_rows(ctx.sr, v, w)


def matmul_rows(sr, v, w):
    """``sr.matmul(v, w)``, also for a 1-D ``v`` (one row, as torch.matmul
    reads it): the semirings' products take values of [..., i, j]."""
    if v[0].dim() == 1:
        return sr.map(sr.matmul(sr.map(v, lambda c: c.unsqueeze(0)), w), lambda c: c.squeeze(0))
    return sr.matmul(v, w)


#: the row-skipping check costs a device sync; it pays for vocabulary-sized outputs
LIVE_ROWS_MIN_FEATURES = 8192


def live_rows_matmul(sr, v, w, max_live: float = 0.5):
    """``sr.matmul(v, w)`` computed only on the rows of ``v`` that are not the
    semiring zero (a language-model head where only the scored position has a
    value); the other rows read the zero. Only tried for outputs with at least
    ``LIVE_ROWS_MIN_FEATURES`` features: counting live rows synchronises the GPU."""
    lead, J = v[0].shape[:-1], v[0].shape[-1]
    if J < LIVE_ROWS_MIN_FEATURES or v[0].numel() < 2 * J:
        return matmul_rows(sr, v, w)
    flat = sr.map(v, lambda c: c.reshape(-1, J))
    R = flat[0].shape[0]
    live = ~sr.is_zero(flat).all(-1)
    n_live, idx = cuda_graph.live_rows(live, max_live)
    if idx is None:
        return sr.matmul(v, w)
    K = w.shape[-1]
    out = sr.zero((R, K), v[0].dtype, v[0].device)
    if n_live:
        part = sr.matmul(sr.map(flat, lambda c: c.index_select(0, idx)), w)
        out = tuple(o.index_copy(0, idx, p) for o, p in zip(out, part))
    return sr.map(out, lambda c: c.reshape(*lead, K))


def _sr_matmul_right(ctx, a, v):
    """Value of B in Y = A @ B: B[j,k] = ⊕_i A[i,j] ⊗ v[i,k]."""
    return ctx.sr.rmatmul(a.transpose(-1, -2), v)


def _scaled(t, s):
    return t if s == 1 else t * s


def _scaled_sum_start(ctx):
    """For Y = β·self + α·(product): the output's value, α, and the rule's
    outputs with self's value filled in (weight β, ⊕ over broadcast)."""
    v = ctx.grad()
    alpha, beta = ctx.saved("alpha"), ctx.saved("beta")
    out = [None, None, None]
    if ctx.needs[0] and beta != 0:
        out[0] = ctx.sr.sum_to_shape(v if beta == 1 else ctx.sr.scale(v, ctx.tensor(beta)), ctx.input_shape(0))
    return v, alpha, out


@rule("MmBackward0", "BmmBackward0")
def mm(ctx):
    v = ctx.grad()
    out = [None, None]
    if ctx.needs[0]:
        out[0] = _sr_matmul_left(ctx, v, ctx.saved("mat2", cast=False))
    if ctx.needs[1]:
        out[1] = _sr_matmul_right(ctx, ctx.saved("self", cast=False), v)
    return out


@rule("AddmmBackward0", "BaddbmmBackward0", "AddbmmBackward0")
def addmm(ctx):
    v, alpha, out = _scaled_sum_start(ctx)
    a_name, b_name = ("batch1", "batch2") if ctx.has_saved("batch1") else ("mat1", "mat2")
    if alpha == 0:
        return out
    if ctx.needs[1]:
        out[1] = _sr_matmul_left(ctx, v, _scaled(ctx.saved(b_name, cast=False), alpha))
    if ctx.needs[2]:
        out[2] = _sr_matmul_right(ctx, _scaled(ctx.saved(a_name, cast=False), alpha), v)
    return out


def _matrix_vector(ctx, v, mat: str, vec: str, needs, alpha=1):
    """Values of M and x in y = α·(M @ x) from y's value v (M and x named by
    their saved attributes): M_ij <- edge(α x_j) ⊗ v_i, x_j <- ⊕_i edge(α M_ij) ⊗ v_i."""
    col = ctx.sr.map(v, lambda c: c.unsqueeze(-1))
    m_val = x_val = None
    if needs[0]:
        m_val = ctx.sr.matmul(col, _scaled(ctx.saved(vec), alpha).unsqueeze(0))
    if needs[1]:
        m = _scaled(ctx.saved(mat, cast=False), alpha)
        x_val = ctx.sr.map(ctx.sr.rmatmul(m.transpose(-1, -2), col), lambda c: c.squeeze(-1))
    return [m_val, x_val]


@rule("MvBackward0")
def mv(ctx):  # y = M @ x
    return _matrix_vector(ctx, ctx.grad(), "self", "vec", ctx.needs)


@rule("AddmvBackward0")
def addmv(ctx):
    """y = β·self + α·(M @ x): self weight β (broadcast), M_ij weight α·x_j,
    x_j weight α·M_ij."""
    v, alpha, out = _scaled_sum_start(ctx)
    if alpha != 0:
        out[1:] = _matrix_vector(ctx, v, "mat", "vec", ctx.needs[1:], alpha)
    return out


@rule("AddrBackward0")
def addr(ctx):
    """Y = β·self + α·(a ⊗ b): self weight β, a_i weight α·b_j into Y_ij,
    b_j weight α·a_i."""
    v, alpha, out = _scaled_sum_start(ctx)
    if alpha == 0:
        return out
    if ctx.needs[1]:
        b = _scaled(ctx.saved("vec2"), alpha)
        out[1] = ctx.sr.map(ctx.sr.matmul(v, b.unsqueeze(-1)), lambda c: c.squeeze(-1))
    if ctx.needs[2]:
        a = _scaled(ctx.saved("vec1"), alpha)
        vt = ctx.sr.map(v, lambda c: c.transpose(0, 1))
        out[2] = ctx.sr.map(ctx.sr.matmul(vt, a.unsqueeze(-1)), lambda c: c.squeeze(-1))
    return out


@rule("DotBackward0")
def dot(ctx):  # y = a · b
    v = ctx.grad()
    out = [None, None]
    for i, other in ((0, "tensor"), (1, "self")):
        if ctx.needs[i]:
            w = ctx.saved(other)
            out[i] = ctx.sr.scale(ctx.sr.map(v, lambda c: c.expand(w.shape)), w)
    return out


@rule("LinearBackward0")
def linear(ctx):  # y = x @ Wᵀ + b
    v = ctx.grad()
    out = [None] * ctx.n_inputs
    if ctx.needs[0]:
        out[0] = matmul_rows(ctx.sr, v, ctx.saved("weight", cast=False))
    if ctx.n_inputs > 1 and ctx.needs[1]:
        x = ctx.saved("self", cast=False)
        x2 = x.reshape(-1, x.shape[-1])
        v2 = ctx.sr.map(v, lambda c: c.reshape(-1, c.shape[-1]))
        r = ctx.sr.rmatmul(x2.transpose(0, 1), v2)            # [in, out]
        out[1] = ctx.sr.map(r, lambda c: c.transpose(0, 1))
    if ctx.n_inputs > 2 and ctx.needs[2]:
        out[2] = ctx.sr.sum_to_shape(v, ctx.input_shape(2))
    return out


@rule("GroupedMmBackward0")
def grouped_mm(ctx):
    """``torch._grouped_mm(A, B, offs)`` in the mixture-of-experts layout
    (transformers' grouped experts): A [M, K] with rows sorted by expert,
    B [G, K, N], offs [G] the cumulative row ends; rows offs[g-1]..offs[g] of
    A are multiplied by B[g]; rows past offs[-1] have no edge. The group ends
    are read on the host (one synchronisation per node; such a pass is not
    captured into a CUDA graph)."""
    a_shape, b_shape = tuple(ctx.saved("self_sym_sizes")), tuple(ctx.saved("mat2_sym_sizes"))
    offs = ctx.saved("offs")
    if len(a_shape) != 2 or len(b_shape) != 3 or offs is None:
        raise GraphError(f"GroupedMmBackward0: only A [M, K] @ B [G, K, N] with offs (a mixture-of-experts "
                         f"layer) has a rule; got A {a_shape}, B {b_shape}, "
                         f"offs {'None' if offs is None else tuple(offs.shape)}")
    sr, v = ctx.sr, ctx.grad()
    dt, dev = v[0].dtype, v[0].device
    groups, start = [], 0
    for g, end in enumerate(cuda_graph.host_values(offs)):
        if end > start:
            groups.append((g, start, end))
        start = max(start, end)
    out = [None, None]
    if ctx.needs[0]:
        b = ctx.saved("mat2", cast=False)
        va = tuple(c.clone() for c in sr.zero(a_shape, dt, dev))
        for g, s0, s1 in groups:
            part = _sr_matmul_left(ctx, sr.map(v, lambda c: c[s0:s1]), b[g])
            for dst, src in zip(va, part):
                dst[s0:s1] = src
        out[0] = va
    if ctx.needs[1]:
        a = ctx.saved("self", cast=False)
        vb = tuple(c.clone() for c in sr.zero(b_shape, dt, dev))
        for g, s0, s1 in groups:
            part = _sr_matmul_right(ctx, a[s0:s1], sr.map(v, lambda c: c[s0:s1]))
            for dst, src in zip(vb, part):
                dst[g] = src
        out[1] = vb
    return out + [None] * (ctx.n_inputs - 2)


# ---- determinants, inverses, solves ------------------------------------------------------------------
# Each is one primitive: its Jacobian entries are the edges. Those of an
# inverse or a solve are products of two matrix entries (∂Y_kl/∂A_ij =
# −Y_ki Y_jl), so the ⊕ over k and l is two semiring contractions, valid in
# every semiring because an edge of weight ab is edge(a) ⊗ edge(b).
def _det_edges(ctx, fn):
    """∂fn(A)/∂A per matrix (the cofactors, or A⁻ᵀ for log|det|), as torch's
    own backward forms them (singular matrices included)."""
    import torch
    a = ctx.saved("A").detach().clone().requires_grad_()
    with torch.enable_grad():
        (w,) = torch.autograd.grad(fn(a).sum(), a)
    return w


def _to_matrices(ctx, v, w):
    """The output's value broadcast over its matrix: v ⊗ edge(w), w [..., n, n]."""
    return ctx.sr.scale(ctx.sr.map(v, lambda c: c[..., None, None]), w)


@rule("LinalgDetBackward0")
def det(ctx):
    """y = det A: edge A_ij -> y of weight ∂det/∂A_ij (the cofactor C_ij)."""
    import torch
    if not ctx.needs[0]:
        return [None]
    return [_to_matrices(ctx, ctx.grad(), _det_edges(ctx, torch.linalg.det))]


@rule("LinalgSlogdetBackward0")
def slogdet(ctx):
    """(sign, log|det A|): edges A_ij -> log|det A| of weight (A⁻¹)_ji; the sign has none."""
    import torch
    if not ctx.needs[0] or ctx.grads[1] is None:
        return [None]
    return [_to_matrices(ctx, ctx.grad(1), _det_edges(ctx, lambda a: torch.linalg.slogdet(a)[1]))]


@rule("LinalgInvExBackward0")
def inv(ctx):
    """Y = A⁻¹: A_ij = ⊕_{k,l} edge(−Y_ki Y_jl) ⊗ v_kl, i.e. ⊕_k edge(−Y_ki) ⊗
    (⊕_l v_kl ⊗ edge(Y_jl)). (The second output, info, has no edges.)"""
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    y = ctx.saved("inverse")
    t = ctx.sr.matmul(ctx.grad(0), y.transpose(-1, -2))
    return [ctx.sr.rmatmul(-y.transpose(-1, -2), t)] + [None] * (ctx.n_inputs - 1)


@rule("LinalgSolveExBackward0")
def solve(ctx):
    """X = A⁻¹B (``left=True``): B_jm -> X_im of weight (A⁻¹)_ij, and A_ij ->
    X_km of weight −(A⁻¹)_ki X_jm; a vector B ([..., n]) is one column.
    ``left=False`` (X A = B) is refused."""
    import torch
    if not bool(ctx.saved("left")):
        raise GraphError("LinalgSolveExBackward0: torch.linalg.solve(..., left=False) has no rule; write it "
                         "as solve(Aᵀ, Bᵀ)ᵀ")
    a, x = ctx.saved("A"), ctx.saved("result")
    y = torch.linalg.inv(a)
    vector = x.dim() == a.dim() - 1
    v = ctx.grad(0)
    if vector:
        v = ctx.sr.map(v, lambda c: c.unsqueeze(-1))
        x = x.unsqueeze(-1)
    out = [None] * ctx.n_inputs
    if ctx.needs[0]:
        t = ctx.sr.matmul(v, x.transpose(-1, -2))
        out[0] = ctx.sr.sum_to_shape(ctx.sr.rmatmul(-y.transpose(-1, -2), t), ctx.input_shape(0))
    if ctx.n_inputs > 1 and ctx.needs[1]:
        vb = ctx.sr.rmatmul(y.transpose(-1, -2), v)
        if vector:
            vb = ctx.sr.map(vb, lambda c: c.squeeze(-1))
        out[1] = ctx.sr.sum_to_shape(vb, ctx.input_shape(1))
    return out


@rule("LinalgSolveTriangularBackward0")
def solve_triangular(ctx):
    """X = T⁻¹B (``left=True``) or X = B T⁻¹ (``left=False``), T the lower (or
    upper) triangle of A, with ones on its diagonal when ``unitriangular``.
    With Y = T⁻¹: left, B_jm -> X_im of weight Y_ij and T_ij -> X_km of
    weight −Y_ki X_jm; right, B_ij -> X_im of weight Y_jm and T_jk -> X_im of
    weight −X_ij Y_km. Entries of A the solve does not read (the other
    triangle; the diagonal when unitriangular) have no edge. Y is triangular,
    and its zeros are the semiring zero in every semiring, so both
    contractions run over the triangle only."""
    import torch
    a, x = ctx.saved("self"), ctx.saved("result")
    upper, left, unit = bool(ctx.saved("upper")), bool(ctx.saved("left")), bool(ctx.saved("unitriangular"))
    n = a.shape[-1]
    rows = torch.arange(n, device=a.device)
    read = (rows[None, :] >= rows[:, None]) if upper else (rows[None, :] <= rows[:, None])
    if unit:
        read = read & (rows[None, :] != rows[:, None])
    eye = torch.eye(n, dtype=a.dtype, device=a.device).expand_as(a)
    y = torch.linalg.solve_triangular(a, eye, upper=upper, unitriangular=unit)   # reads T only
    v = ctx.grad(0)
    sr = ctx.sr
    out = [None] * ctx.n_inputs
    if ctx.needs[0]:
        if left:
            va = sr.rmatmul(-y.transpose(-1, -2), sr.matmul(v, x.transpose(-1, -2)))
        else:
            va = sr.rmatmul(-x.transpose(-1, -2), sr.matmul(v, y.transpose(-1, -2)))
        out[0] = sr.sum_to_shape(zero_where(sr, va, ~read), ctx.input_shape(0))
    if ctx.n_inputs > 1 and ctx.needs[1]:
        vb = sr.rmatmul(y.transpose(-1, -2), v) if left else sr.matmul(v, y.transpose(-1, -2))
        out[1] = sr.sum_to_shape(vb, ctx.input_shape(1))
    return out
