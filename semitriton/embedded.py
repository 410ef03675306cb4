"""Values that are the semiring zero outside a few slices of a large tensor.

``logits[:, -1, 7] - logits[:, -1, 3]`` reaches the logits through two
select chains; each select rule would write its small value into a full
``[B, T, V]`` semiring zero (two components for entropy and max) and the two
would then be ⊕-combined element by element, the largest tensors of the whole
pass. Select/slice rules inside the walk return an :class:`EmbeddedValue`
instead; several of them reaching the same tensor are merged as a list, and
the full tensor is built once, when a rule (or a readout) needs it, with ⊕
applied only on the slices.
"""

from __future__ import annotations

from typing import Callable


#: embed lazily only into tensors of at least this many elements
LAZY_MIN_NUMEL = 1 << 20


class EmbeddedValue:
    """The semiring zero of ``shape`` except at ``index_fn(component)`` for each part."""

    __slots__ = ("shape", "parts")

    def __init__(self, shape: tuple, parts: list):
        self.shape = tuple(shape)
        self.parts = parts                  # [(index_fn, value)]

    @classmethod
    def single(cls, shape, index_fn: Callable, value) -> "EmbeddedValue":
        return cls(shape, [(index_fn, value)])

    def merged(self, other: "EmbeddedValue") -> "EmbeddedValue":
        return EmbeddedValue(self.shape, self.parts + other.parts)

    def materialize(self, sr):
        first = self.parts[0][1][0]
        zero = sr.zero((1,) * len(self.shape), first.dtype, first.device)
        return self._write(sr, tuple(z.expand(self.shape).clone() for z in zero), fresh=True)

    def added_to(self, sr, base):
        """``base ⊕ self`` for a plain value ``base`` (not modified): ⊕ only on the slices."""
        return self._write(sr, tuple(c.clone() for c in base), fresh=False)

    def _write(self, sr, comps, fresh: bool):
        for k, (index_fn, value) in enumerate(self.parts):
            region = tuple(index_fn(c) for c in comps)
            if k or not fresh:                          # slices may overlap earlier writes
                value = sr.plus(tuple(r.clone() for r in region), value)
            for r, v in zip(region, value):
                r.copy_(v)
        return comps


def materialize(sr, v):
    """A plain value (tuple of tensors) for ``v``, which may be embedded or None."""
    return v.materialize(sr) if isinstance(v, EmbeddedValue) else v


def accumulate(sr, cur, val):
    """``cur ⊕ val`` for values that may be embedded (embedded ones are merged
    without building the full tensor)."""
    if cur is None:
        return val
    lazy_cur, lazy_val = isinstance(cur, EmbeddedValue), isinstance(val, EmbeddedValue)
    if lazy_cur and lazy_val and cur.shape == val.shape:
        return cur.merged(val)
    if lazy_val and not lazy_cur and tuple(cur[0].shape) == val.shape:
        return val.added_to(sr, cur)
    if lazy_cur and not lazy_val and tuple(val[0].shape) == cur.shape:
        return cur.added_to(sr, val)
    return sr.plus(materialize(sr, cur), materialize(sr, val))


def worth_embedding(shape, value) -> bool:
    n = 1
    for s in shape:
        n *= int(s)
    return n >= LAZY_MIN_NUMEL and n >= 4 * value[0].numel()
