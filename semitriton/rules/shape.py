"""Shape and indexing ops: weight-1 identity edges (view, reshape, permute,
transpose, expand, select, slice, cat, split, stack, squeeze, gather, index,
embedding, repeat, dtype/device casts). Expansion and repeated gathers are
fan-out, combined with ⊕."""

from __future__ import annotations

import math

import torch

from ..embedded import EmbeddedValue, worth_embedding
from ..errors import GraphError
from ..semirings.base import scatter_plus
from . import RuleContext, rule, zero_where


def _only0(ctx, value):
    return [value if ctx.needs[0] else None] + [None] * (ctx.n_inputs - 1)


#: nodes whose rule is a reshape of the value to the input's shape (the walk
#: runs the built-in rule for these inline, without a RuleContext)
VIEW_NODES = frozenset(("ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "SqueezeBackward0",
                        "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3",
                        "_ReshapeAliasBackward0",
                        # in-place squeeze_ (1-D @ 2-D records one: matmul squeezes its result in place)
                        "SqueezeBackward4", "SqueezeBackward5"))


@rule(*sorted(VIEW_NODES))
def view(ctx):
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    shape = ctx.input_shape(0)
    return _only0(ctx, ctx.sr.map(ctx.grad(), lambda c: c.reshape(shape)))


@rule("UnsqueezeBackward0", "UnsqueezeBackward1")          # unsqueeze, unsqueeze_
def unsqueeze(ctx):
    d = ctx.saved("dim")
    return _only0(ctx, ctx.sr.map(ctx.grad(), lambda c: c.squeeze(d)))


@rule("TransposeBackward0", "TransposeBackward1")
def transpose(ctx):
    d0, d1 = ctx.saved("dim0"), ctx.saved("dim1")
    return _only0(ctx, ctx.sr.map(ctx.grad(), lambda c: c.transpose(d0, d1)))


@rule("TBackward0", "TBackward1", "NumpyTBackward0")       # t, t_, .T
def t(ctx):
    return _only0(ctx, ctx.sr.map(ctx.grad(), lambda c: c.transpose(0, 1) if c.dim() == 2 else c))


@rule("PermuteBackward0")
def permute(ctx):
    dims = [d % len(ctx.saved("dims")) for d in ctx.saved("dims")]
    inv = [0] * len(dims)
    for i, d in enumerate(dims):
        inv[d] = i
    return _only0(ctx, ctx.sr.map(ctx.grad(), lambda c: c.permute(inv)))


@rule("ExpandBackward0")
def expand(ctx):
    if not ctx.needs[0]:
        return [None]
    return [ctx.sr.sum_to_shape(ctx.grad(), tuple(ctx.saved("self_sym_sizes")))]


@rule("ToCopyBackward0", "_ToCopyBackward0")
def to_copy(ctx):
    if not ctx.needs[0]:
        return [None]
    dev = ctx.input_device(0)
    return [ctx.sr.map(ctx.grad(), lambda c: c.to(dev))]


@rule("CopyBackwards")
def copy_whole(ctx):
    """``h.copy_(src)`` (also ``h[:] = src``, ``h[...] = src``): every element
    of h is overwritten, so h's old value has no edge; src (broadcast to h,
    any dtype or device) reaches each element it was copied to with weight 1."""
    out = [None, None]
    if ctx.needs[1]:
        dev = ctx.input_device(1)
        out[1] = ctx.sr.map(ctx.sr.sum_to_shape(ctx.grad(), ctx.input_shape(1)), lambda c: c.to(dev))
    return out


@rule("ZeroBackward0", "FillBackward2")
def overwritten(ctx):
    """``h.zero_()``, ``h.fill_(number)``: every element is overwritten by a
    constant, so h's old value has no edge."""
    return [None] * ctx.n_inputs


@rule("FillBackward3")
def fill_with_tensor(ctx):
    """``h.fill_(value)`` with a 0-dim tensor ``value``: h's old value has no
    edge; ``value`` reaches every element of h with weight 1 (⊕ over them)."""
    out = [None, None]
    if ctx.needs[1]:
        dev = ctx.input_device(1)               # a CPU 0-dim value may fill a CUDA tensor
        out[1] = ctx.sr.map(ctx.sr.sum_to_shape(ctx.grad(), ctx.input_shape(1)), lambda c: c.to(dev))
    return out


def _embed(ctx, shape, index_fn, value=None):
    """A zero value of ``shape`` with ``value`` (default: the output value)
    written at ``index_fn(c)`` (one allocation per component: a language-model
    head's [B, T, V] value is the largest tensor of the pass). Inside the
    walk, a large one is returned unbuilt (:class:`~semitriton.embedded.EmbeddedValue`)."""
    v = ctx.grad() if value is None else value
    if ctx.lazy and worth_embedding(shape, v):
        return EmbeddedValue.single(shape, index_fn, v)
    z = ctx.sr.zero((1,) * len(shape), ctx.dtype, v[0].device)
    out = []
    for zc, vc in zip(z, v):
        zc = zc.expand(shape).clone()
        index_fn(zc).copy_(vc)
        out.append(zc)
    return tuple(out)


@rule("SelectBackward0")
def select(ctx):
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    d, i = ctx.saved("dim"), ctx.saved("index")
    return [_embed(ctx, shape, lambda c: c.select(d, i))]


@rule("SliceBackward0")
def slice_(ctx):
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    d = ctx.saved("dim") % len(shape)
    start, end, step = ctx.saved("start"), ctx.saved("end"), ctx.saved("step")
    sl = slice(*slice(start, end, step).indices(shape[d]))
    idx = (slice(None),) * d + (sl,)
    return [_embed(ctx, shape, lambda c: c[idx])]


def _fill_missing_sizes(sizes: list, total: tuple, what: str) -> list:
    """``sizes`` (a tuple per input; None for an input that does not require
    grad, whose size its node does not record) with one missing entry
    recovered from the output's ``total`` (the sum of all of them); more than
    one missing is a GraphError naming ``what`` (the node and its pieces)."""
    missing = [i for i, s in enumerate(sizes) if s is None]
    if len(missing) == 1:
        known = [s for s in sizes if s is not None]
        sizes[missing[0]] = tuple(t - sum(s[k] for s in known) for k, t in enumerate(total))
    elif missing:
        raise GraphError(f"{what} that does not require grad (the node does not record their sizes): mark "
                         "the constant pieces requires_grad_() (they then carry their sizes; nothing flows to "
                         "them unless they are among the inputs)")
    return sizes


def _cat_sizes(ctx, dim):
    sizes = []
    for i in range(ctx.n_inputs):
        s = ctx.input_shape(i)
        sizes.append(None if s is None else (s[dim % len(s)],))
    out = ctx.output_shape(0)
    sizes = _fill_missing_sizes(sizes, (out[dim % len(out)],), "CatBackward0: cannot recover the sizes of "
                                "more than one concatenated tensor")
    return [s[0] for s in sizes]


@rule("CatBackward0")
def cat(ctx):
    dim = ctx.saved("dim")
    v = ctx.grad()
    nd = v[0].dim()
    dim = dim % nd
    sizes = _cat_sizes(ctx, dim)
    out, off = [], 0
    for i, s in enumerate(sizes):
        if ctx.needs[i]:
            out.append(ctx.sr.map(v, lambda c: c.narrow(dim, off, s)))
        else:
            out.append(None)
        off += s
    return out


@rule("BlockDiagBackward0")
def block_diag(ctx):
    """torch.block_diag(t_0, t_1, ...): t_i's element (a, b) -> out[r_i + a,
    c_i + b], weight 1, where t_i's block starts at (r_i, c_i) = the rows and
    columns of the blocks before it (a 0-dim t_i is a 1×1 block, a 1-dim one
    1×n). The node saves no sizes: those of the inputs that require grad come
    from their metadata, one other block's from the output's size."""
    v = ctx.grad()
    blocks = []
    for i in range(ctx.n_inputs):
        s = ctx.input_shape(i)
        blocks.append(None if s is None else (1, 1) if len(s) == 0 else (1, s[0]) if len(s) == 1 else tuple(s))
    blocks = _fill_missing_sizes(blocks, ctx.output_shape(0), "BlockDiagBackward0: cannot recover the sizes "
                                 "of more than one block")
    out, r, c = [], 0, 0
    for i, (h, w) in enumerate(blocks):
        if ctx.needs[i]:
            shape = ctx.input_shape(i)
            out.append(ctx.sr.map(v, lambda t, r=r, c=c, h=h, w=w: t[r:r + h, c:c + w].reshape(shape)))
        else:
            out.append(None)
        r, c = r + h, c + w
    return out


@rule("StackBackward0")
def stack(ctx):
    dim = ctx.saved("dim")
    v = ctx.grad()
    dim = dim % v[0].dim()
    return [ctx.sr.map(v, lambda c: c.select(dim, i)) if ctx.needs[i] else None
            for i in range(ctx.n_inputs)]


def _join_outputs(ctx: RuleContext, dim: int, stack: bool = False):
    """Value of the input of a multi-output split/unbind: join the outputs'
    values (zeros for outputs nothing reached)."""
    parts = [ctx.grad(i) for i in range(len(ctx.node._input_metadata))]
    if stack:
        return tuple(torch.stack(cs, dim) for cs in zip(*parts))
    return tuple(torch.cat(cs, dim) for cs in zip(*parts))


@rule("SplitBackward0", "SplitWithSizesBackward0", "SplitBackward1", "SplitWithSizesBackward1",
      "UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0")
def split(ctx):
    """split / split_with_sizes / chunk (and their ``unsafe_`` forms, which
    nn.GRU, nn.LSTMCell and nn.GRUCell record): weight-1 edges, the outputs'
    values joined back along dim (an output nothing reached reads zero)."""
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    dim = ctx.saved("dim") % len(shape)
    return [_join_outputs(ctx, dim)]


@rule("UnbindBackward0")
def unbind(ctx):
    if not ctx.needs[0]:
        return [None]
    dim = ctx.saved("dim")
    return [_join_outputs(ctx, dim % (len(ctx.output_shape(0)) + 1), stack=True)]


# ---- gathers: scatter the value back with ⊕ ----------------------------------------------
def _gather_back(ctx, shape, positions, valid=None):
    """``positions`` (output-shaped) holds for each output element the flat index
    of the input element it was read from."""
    v = ctx.grad()
    flat = ctx.sr.map(v, lambda c: c.reshape(-1))
    pos = positions.reshape(-1).to(v[0].device)
    if valid is not None:
        keep = valid.reshape(-1).to(v[0].device)
        pos = pos[keep]
        flat = ctx.sr.map(flat, lambda c: c[keep])
    out = scatter_plus(ctx.sr, flat, pos, math.prod(shape))
    return ctx.sr.map(out, lambda c: c.reshape(shape))


def _arange(shape, device):
    return torch.arange(math.prod(shape), device=device).reshape(shape)


@rule("IndexBackward0", "UnsafeIndexBackward0", "UnsafeMaskedIndexBackward0")
def index(ctx):
    """x[indices] (and the unchecked ``_unsafe_index`` that decompositions
    record; ``_unsafe_masked_index`` reads only where its mask is set, a fill
    elsewhere): each output element is one input element, weight 1."""
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    shape = tuple(ctx.saved("self_sym_sizes"))
    idx = tuple(slice(None) if i is None else i for i in ctx.saved("indices"))
    dev = ctx.grad()[0].device
    idx = tuple(i.to(dev) if isinstance(i, torch.Tensor) else i for i in idx)
    valid = None
    if ctx.has_saved("mask"):
        valid = ctx.saved("mask").to(dev).expand(ctx.output_shape(0))
        idx = tuple(torch.where(valid, i, 0) if isinstance(i, torch.Tensor) else i for i in idx)
    positions = _arange(shape, dev)[idx]
    return _only0(ctx, _gather_back(ctx, shape, positions, valid))


@rule("IndexSelectBackward0")
def index_select(ctx):
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    shape = tuple(ctx.saved("self_sym_sizes"))
    dev = ctx.grad()[0].device
    positions = _arange(shape, dev).index_select(ctx.saved("dim"), ctx.saved("index").to(dev))
    return _only0(ctx, _gather_back(ctx, shape, positions))


@rule("GatherBackward0")
def gather(ctx):
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    return _only0(ctx, _gather_along(ctx, tuple(ctx.saved("self").shape), ctx.saved("dim"), ctx.saved("index")))


def _gather_along(ctx, shape, dim, index):
    """Value of x for y = x.gather(dim, index): y's values scattered back with ⊕."""
    dev = ctx.grad()[0].device
    return _gather_back(ctx, shape, _arange(shape, dev).gather(dim, index.to(dev)))


@rule("TopkBackward0", "SortBackward0", "SortBackward1", "MaxBackward0", "MinBackward0", "KthvalueBackward0", "MedianBackward1",
      "NanmedianBackward1", "ModeBackward0", "CummaxBackward0", "CumminBackward0")
def take_along_dim(ctx):
    """Values read at saved indices along a dim (topk, sort, max/min/median
    over a dim, cummax): each output element is one input element, weight 1
    (as the recorded op routes its gradient: to the one index it returned)."""
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    shape = tuple(ctx.saved("self_sym_sizes")) if ctx.has_saved("self_sym_sizes") else tuple(ctx.saved("self").shape)
    if not shape:                                     # a 0-dim input: the value itself
        return _only0(ctx, ctx.sr.sum_to_shape(ctx.grad(), ()))
    dim = ctx.saved("dim") % len(shape)
    idx = ctx.saved("indices")
    if ctx.has_saved("keepdim") and not ctx.saved("keepdim"):
        idx = idx.unsqueeze(dim)
    return _only0(ctx, _gather_along(ctx, shape, dim, idx))


@rule("IndexAddBackward0")
def index_add(ctx):
    """out = self.index_add(dim, index, source, alpha): self[p] -> out[p]
    (weight 1) and source[.., i, ..] -> out[.., index[i], ..] (weight alpha)."""
    v = ctx.grad()
    out = [None, None]
    if ctx.needs[0]:
        out[0] = ctx.sr.sum_to_shape(v, ctx.input_shape(0))
    if ctx.needs[1]:
        dim = ctx.saved("dim") % max(1, v[0].dim())
        index = ctx.saved("index").to(v[0].device)
        vs = ctx.sr.map(v, lambda c: c.index_select(dim, index) if c.dim() else c.reshape(1).index_select(0, index))
        alpha = ctx.saved("alpha")
        if alpha != 1:
            vs = ctx.sr.scale(vs, ctx.tensor(alpha))
        out[1] = ctx.sr.sum_to_shape(vs, ctx.input_shape(1))
    return out


@rule("ScatterAddBackward0")
def scatter_add(ctx):
    """out = self.scatter_add(dim, index, src): self[p] -> out[p] and
    src[q] -> out[q with index[q] along dim] (weight 1 each)."""
    v = ctx.grad()
    out = [None] * ctx.n_inputs
    if ctx.needs[0]:
        out[0] = ctx.sr.sum_to_shape(v, ctx.input_shape(0))
    if ctx.n_inputs > 1 and ctx.needs[1]:
        index = ctx.saved("index").to(v[0].device)
        if v[0].dim() == 0:                             # 0-dim: every src element adds to the one value
            out[1] = ctx.sr.map(v, lambda c: c.expand(index.shape))
            return out
        dim = ctx.saved("dim") % v[0].dim()
        if tuple(index.shape) != tuple(ctx.input_shape(1)):
            raise GraphError("ScatterAddBackward0: src is larger than index (torch's own backward "
                             "refuses this too); pass src[..., :k] with index's shape")
        out[1] = ctx.sr.map(v, lambda c: c.gather(dim, index))
    return out


@rule("FlipBackward0")
def flip(ctx):
    if not ctx.needs[0]:
        return [None]
    dims = list(ctx.saved("dims"))
    return [ctx.sr.map(ctx.grad(), lambda c: c.flip(dims))]


@rule("RollBackward0")
def roll(ctx):
    if not ctx.needs[0]:
        return [None]
    shifts, dims = list(ctx.saved("shifts")), list(ctx.saved("dims"))
    back = [-s for s in shifts]
    if dims:
        return [ctx.sr.map(ctx.grad(), lambda c: c.roll(back, dims))]
    shape = ctx.input_shape(0)                # rolled flattened
    return [ctx.sr.map(ctx.grad(), lambda c: c.reshape(-1).roll(back).reshape(shape))]


@rule("TrilBackward0", "TriuBackward0")
def tril(ctx):
    """Entries kept by tril/triu are weight-1 edges; the others have none."""
    if not ctx.needs[0]:
        return [None]
    v = ctx.grad()
    k = ctx.saved("diagonal")
    rows, cols = v[0].shape[-2:]
    keep = torch.ones(rows, cols, dtype=torch.bool, device=v[0].device)
    keep = keep.tril(k) if type(ctx.node).__name__.startswith("Tril") else keep.triu(k)
    return [zero_where(ctx.sr, v, ~keep)]


@rule("ConstantPadNdBackward0")
def constant_pad(ctx):
    """F.pad(x, pad) with a constant: x's elements are weight-1 edges to their
    places in the padded tensor (negative pads crop: the cropped elements
    have no edge)."""
    if not ctx.needs[0]:
        return [None]
    pad = list(ctx.saved("pad"))
    shape = tuple(ctx.input_shape(0))
    v = ctx.grad()
    nd = v[0].dim()
    idx = [slice(None)] * nd
    src = [slice(None)] * nd
    for i in range(len(pad) // 2):
        d = nd - 1 - i
        lo, hi = pad[2 * i], pad[2 * i + 1]
        n = shape[d]
        idx[d] = slice(max(lo, 0), max(lo, 0) + n - max(-lo, 0) - max(-hi, 0))
        src[d] = slice(max(-lo, 0), n - max(-hi, 0))
    part = ctx.sr.map(v, lambda c: c[tuple(idx)])
    if all(p >= 0 for p in pad):
        return [part]
    return [_embed(ctx, shape, lambda c: c[tuple(src)], part)]


@rule("ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReflectionPad3DBackward0",
      "ReplicationPad1DBackward0", "ReplicationPad2DBackward0", "ReplicationPad3DBackward0")
def mirror_pad(ctx):
    """F.pad with mode "reflect" or "replicate" (also nn.Conv*'s padding_mode):
    every padded element is a copy of one input element, a weight-1 edge; an
    element near the border fans out to its mirror images or replicas."""
    import torch.nn.functional as F
    mode = "reflect" if ctx.name.startswith("Reflection") else "replicate"
    return _copied(ctx, tuple(ctx.input_shape(0)), lambda t: F.pad(t, list(ctx.saved("padding")), mode=mode))


@rule("AsStridedBackward0", "AsStridedBackward1")
def as_strided(ctx):
    """y = x.as_strided(size, stride, offset) (also the in-place as_strided_
    some pooling ops apply to their result): y[i] reads x's storage at
    offset + Σ i_d·stride_d, a weight-1 edge from the element of x stored
    there. torch's node does not show x's own geometry, so the rule asks the
    node's backward (two calls on float64 codes): with ones it returns k_j,
    how many outputs read x_j; with the storage position + 1 of each output
    it returns k_j·(s_j + 1), so s_j, where x_j is stored. Outputs that read
    storage outside x get no edge (torch's gradient drops them too)."""
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    from .. import cuda_graph
    what = "the storage positions of a strided input"
    cuda_graph.refuse_capture(what)
    node = cuda_graph.real_node(ctx.node)
    size, stride = tuple(ctx.saved("size")), tuple(ctx.saved("stride"))
    offset = ctx.saved("storage_offset") or 0
    shape = tuple(ctx.input_shape(0))
    dev = ctx.grad()[0].device
    pos = torch.full(size, float(offset), dtype=torch.float64, device=dev)
    for d, (n, st) in enumerate(zip(size, stride)):
        pos = pos + (torch.arange(n, dtype=torch.float64, device=dev) * st).reshape([n] + [1] * (len(size) - d - 1))
    k = node(torch.ones(size, dtype=torch.float64, device=dev)).reshape(-1)
    s = node(pos + 1).reshape(-1) / k.clamp(min=1) - 1
    read = k > 0
    flat = torch.arange(k.numel(), device=dev)
    span = int(cuda_graph.host_values(pos.max(), what)) + 2 if pos.numel() else 2   # positions, and a sink
    s_idx = torch.where(read, s.round().long(), span - 1).clamp(0, span - 1)
    owner = torch.full((span,), -1, dtype=torch.long, device=dev).scatter_(0, s_idx, flat)
    hits = torch.zeros(span, dtype=torch.long, device=dev).scatter_add_(0, s_idx, read.long())
    if cuda_graph.host_values(hits[:-1].max(), what) > 1:
        raise GraphError(f"{ctx.name}: two elements of the strided input share storage (an expanded or "
                         "overlapping tensor under as_strided); its edges cannot be told apart")
    own = owner[pos.long()]                                     # the element of x each output reads, or -1
    return _only0(ctx, _gather_back(ctx, shape, own.clamp(min=0), own >= 0))


# ---- ops that copy elements: the routing read off the op applied to codes ----------------------
def _copied(ctx, in_shape, forward):
    """Value of the input of an op whose every output element is one input
    element or a fill (padding, a zero off the diagonal): ``forward`` applied
    to float64 codes 1..N of the input (exact below 2**53) says which; the
    output's value is gathered back with ⊕ (fan-out where windows overlap)."""
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    dev = ctx.grad()[0].device
    codes = torch.arange(1, math.prod(in_shape) + 1, dtype=torch.float64, device=dev).reshape(in_shape)
    pos = forward(codes).round().long() - 1
    return _only0(ctx, _gather_back(ctx, tuple(in_shape), pos.clamp(min=0), pos >= 0))


@rule("DiagonalBackward0", "DiagonalBackward0_copy")          # x.diagonal(k); torch.diag(matrix, k)
def diagonal(ctx):
    return _copied(ctx, tuple(ctx.saved("self_sym_sizes")),
                   lambda t: t.diagonal(ctx.saved("offset"), ctx.saved("dim1"), ctx.saved("dim2")))


@rule("DiagEmbedBackward0")
def diag_embed(ctx):
    return _copied(ctx, ctx.input_shape(0),
                   lambda t: torch.diag_embed(t, ctx.saved("offset"), ctx.saved("dim1"), ctx.saved("dim2")))


@rule("Rot90Backward0")
def rot90(ctx):
    return _copied(ctx, ctx.input_shape(0), lambda t: t.rot90(ctx.saved("k"), list(ctx.saved("dims"))))


@rule("PixelShuffleBackward0", "PixelUnshuffleBackward0", "ChannelShuffleBackward0")
def shuffle(ctx):
    """pixel_shuffle / pixel_unshuffle / channel_shuffle: permutations."""
    import torch.nn.functional as F
    if ctx.name.startswith("PixelShuffle"):
        fwd = lambda t: F.pixel_shuffle(t, ctx.saved("upscale_factor"))        # noqa: E731
    elif ctx.name.startswith("PixelUnshuffle"):
        fwd = lambda t: F.pixel_unshuffle(t, ctx.saved("downscale_factor"))    # noqa: E731
    else:
        fwd = lambda t: F.channel_shuffle(t, ctx.saved("groups"))              # noqa: E731
    return _copied(ctx, ctx.input_shape(0), fwd)


@rule("UnfoldBackward0")
def unfold(ctx):
    """Tensor.unfold(dim, size, step): sliding windows (overlapping ones fan out)."""
    return _copied(ctx, tuple(ctx.saved("self_sym_sizes")),
                   lambda t: t.unfold(ctx.saved("dimension"), ctx.saved("size"), ctx.saved("step")))


def _im2col(ctx):
    import torch.nn.functional as F
    return lambda t: F.unfold(t, list(ctx.saved("kernel_size")), list(ctx.saved("dilation")),
                              list(ctx.saved("padding")), list(ctx.saved("stride")))


@rule("Im2ColBackward0")
def im2col(ctx):
    """F.unfold: patches as columns (overlapping patches fan out; zero padding has no edge)."""
    return _copied(ctx, ctx.input_shape(0), _im2col(ctx))


@rule("Col2ImBackward0")
def col2im(ctx):
    """F.fold (the adjoint of F.unfold): each column entry is added into one
    output position (none where it lands in the padding), weight 1: its value
    is the output's value there."""
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    v = ctx.grad()
    out_shape = tuple(v[0].shape)
    codes = torch.arange(1, math.prod(out_shape) + 1, dtype=torch.float64, device=v[0].device)
    pos = _im2col(ctx)(codes.reshape(out_shape)).round().long() - 1
    return _only0(ctx, zero_where(ctx.sr, ctx.sr.map(v, lambda c: c.reshape(-1)[pos.clamp(min=0)]), pos < 0))


@rule("TakeBackward0")
def take(ctx):
    return _copied(ctx, tuple(ctx.saved("self").shape), lambda t: t.take(ctx.saved("index").to(t.device)))


@rule("MaskedSelectBackward0")
def masked_select(ctx):
    return _copied(ctx, tuple(ctx.saved("self").shape),
                   lambda t: t.masked_select(ctx.saved("mask").to(t.device)))


@rule("NarrowCopyBackward0")
def narrow_copy(ctx):
    return _copied(ctx, tuple(ctx.saved("self_sym_sizes")),
                   lambda t: t.narrow_copy(ctx.saved("dim"), ctx.saved("start"), ctx.saved("length")))


@rule("SliceScatterBackward0", "SelectScatterBackward0")
def slice_scatter(ctx):
    """slice_scatter / select_scatter (the out-of-place slice writes a
    compiled graph records): self keeps its edges outside the written slice;
    src's elements are weight-1 edges to the slice."""
    v = ctx.grad()
    shape = tuple(v[0].shape)
    dim = ctx.saved("dim") % len(shape)
    idx = [slice(None)] * len(shape)
    if ctx.name.startswith("Slice"):
        start, end = ctx.saved("start"), ctx.saved("end")
        idx[dim] = slice(start, end, ctx.saved("step"))
    else:
        idx[dim] = ctx.saved("index")
    idx = tuple(idx)
    out = [None] * ctx.n_inputs
    if ctx.needs[0]:
        written = torch.zeros(shape, dtype=torch.bool, device=v[0].device)
        written[idx] = True
        out[0] = zero_where(ctx.sr, v, written)
    if ctx.n_inputs > 1 and ctx.needs[1]:
        out[1] = ctx.sr.map(v, lambda c: c[idx].reshape(ctx.input_shape(1)))
    return out


@rule("DiagonalScatterBackward0")
def diagonal_scatter(ctx):
    """torch.diagonal_scatter(x, src, offset, dim1, dim2): x keeps its edges
    off the written diagonal; src's elements are weight-1 edges to it."""
    v = ctx.grad()
    shape = tuple(v[0].shape)
    diag = (ctx.saved("offset"), ctx.saved("dim1"), ctx.saved("dim2"))
    out = [None] * ctx.n_inputs
    if ctx.needs[0]:
        written = torch.zeros(shape, dtype=torch.bool, device=v[0].device)
        written.diagonal(*diag).fill_(True)
        out[0] = zero_where(ctx.sr, v, written)
    if ctx.n_inputs > 1 and ctx.needs[1]:
        out[1] = ctx.sr.map(v, lambda c: c.diagonal(*diag).reshape(ctx.input_shape(1)))
    return out


@rule("PutBackward0")
def put(ctx):
    """x.put(index, source, accumulate): source[j] goes to the flat position
    index[j] of x (added with accumulate, written otherwise). x keeps every
    edge with accumulate, those outside the written positions otherwise;
    source[j] has a weight-1 edge to position index[j] (also where a
    position is written twice, as torch's backward)."""
    v = ctx.grad()
    shape = tuple(v[0].shape)
    n = math.prod(shape)
    index = ctx.saved("index").to(v[0].device).reshape(-1) % max(n, 1)      # negative indices count from the end
    out = [None] * ctx.n_inputs
    if ctx.needs[0]:
        if ctx.saved("accumulate"):
            out[0] = v
        else:
            written = torch.zeros(n, dtype=torch.bool, device=v[0].device)
            written[index] = True
            out[0] = zero_where(ctx.sr, v, written.reshape(shape))
    if ctx.n_inputs > 1 and ctx.needs[1]:
        out[1] = ctx.sr.map(v, lambda c: c.reshape(-1)[index].reshape(ctx.input_shape(1)))
    return out


@rule("EmbeddingBackward0")
def embedding(ctx):
    if not ctx.needs[0]:
        return [None] * ctx.n_inputs
    idx = ctx.saved("indices")
    num = ctx.saved("weight_sym_argsize_0")
    out_shape = ctx.output_shape(0)
    dim = out_shape[-1]
    shape = (int(num), dim)
    dev = ctx.grad()[0].device
    positions = _arange(shape, dev)[idx.to(dev)]
    pad = ctx.saved("padding_idx")
    valid = None
    if pad is not None and pad >= 0:
        valid = (idx.to(dev) != pad).unsqueeze(-1).expand(positions.shape)
    return _only0(ctx, _gather_back(ctx, shape, positions, valid))


@rule("EmbeddingBagBackward0")
def embedding_bag(ctx):
    """F.embedding_bag(indices, weight, offsets, mode, per_sample_weights,
    padding_idx): out[b, d] reads weight[r, d] for the positions j of bag b
    with indices[j] = r (the padding index left out). One edge per (r, b,
    d), its weight the Jacobian entry: Σ per_sample_weights[j] over those
    positions (sum; their count without weights), their count / |bag|
    (mean), or 1 where row r gave the bag's max in column d (max, as
    torch's backward). per_sample_weights[j] -> out[b_j, d] has the weight
    weight[indices[j], d]."""
    out = [None] * ctx.n_inputs
    if not any(ctx.needs):
        return out
    sr, v = ctx.sr, ctx.grad()
    dev, B = v[0].device, v[0].shape[0]
    idx = ctx.saved("indices").to(dev).reshape(-1)
    offsets = ctx.saved("offsets").to(dev).reshape(-1)
    # the bag of each position, from the offsets (torch's offset2bag may be left empty on its fast paths)
    bag = torch.searchsorted(offsets, torch.arange(idx.numel(), device=dev), right=True) - 1
    mode = int(ctx.saved("mode"))
    rows = int(ctx.saved("weight_sym_argsize_0"))
    pad = ctx.saved("padding_idx")
    pad = int(pad) if pad is not None else -1
    keep = (idx != pad) if 0 <= pad < rows else torch.ones_like(idx, dtype=torch.bool)
    psw = ctx.saved("per_sample_weights")
    if ctx.needs[0]:
        if mode == 0:
            w = torch.ones(idx.numel(), dtype=ctx.dtype, device=dev) if psw is None \
                else psw.to(dev, ctx.dtype).reshape(-1)
        else:
            size = torch.bincount(bag[keep], minlength=B).to(ctx.dtype)
            w = 1.0 / size[bag].clamp_min(1)
        pair, w = (bag * rows + idx)[keep], w[keep]
        uniq, inv = torch.unique(pair, return_inverse=True)                  # one edge per (bag, row)
        ub, ur = uniq // rows, uniq % rows
        vb = sr.map(v, lambda c: c[ub])                                      # [m, D]
        if mode == 2:
            top = ctx.saved("result3").to(dev)[ub]                           # the row each bag's max came from
            val = zero_where(sr, vb, top != ur.unsqueeze(-1))
        else:
            jac = torch.zeros(uniq.numel(), dtype=ctx.dtype, device=dev).index_add_(0, inv, w)
            val = sr.scale(vb, jac.unsqueeze(-1))
        out[0] = scatter_plus(sr, val, ur, rows)
    if ctx.n_inputs > 1 and ctx.needs[1]:
        vj = sr.map(v, lambda c: c[bag])
        val = sr.sum(sr.scale(vj, ctx.saved("weight").to(dev)[idx]), -1)
        out[1] = sr.map(zero_where(sr, val, ~keep), lambda c: c.reshape(ctx.input_shape(1)))
    return out


@rule("RepeatBackward0")
def repeat(ctx):
    if not ctx.needs[0]:
        return [None]
    shape = tuple(ctx.saved("self_sym_sizes"))
    reps = tuple(ctx.saved("repeats"))
    dev = ctx.grad()[0].device
    positions = _arange(shape, dev).repeat(reps)
    return [_gather_back(ctx, shape, positions)]


@rule("BackwardHookFunctionBackward")
def backward_hook(ctx):
    """The marker node of module backward hooks (``register_full_backward_hook``):
    the identity on each of its tensors. The walk runs no hooks (they act on
    gradients, not on semiring values)."""
    return [ctx.grads[i] if ctx.needs[i] else None for i in range(ctx.n_inputs)]
