"""Select/slice values embedded lazily into large tensors (semitriton.embedded)
give the same statistics as building each full tensor at once."""

import pytest
import torch

import semitriton
from conftest import SEMIRINGS, assert_semiring_close
from semitriton import embedded


def _program(x, dense_consumer: bool):
    y = torch.tanh(x) * 2.0                      # [4, 300, 1000]: 1.2M elements
    last = y[:, -1, 7] - y[:, -1, 3]             # two select chains into y
    out = last + 0.5 * y[:, -1, 7]               # the same element again (overlapping slices)
    out = out + y[:, 0, 10:20].sum(-1)           # a slice
    if dense_consumer:
        out = out + 1e-3 * y.mean((1, 2))        # a value on every element of y as well
    return out


@pytest.mark.parametrize("dense_consumer", [False, True])
@pytest.mark.parametrize("semiring", SEMIRINGS)
def test_lazy_embedding_equals_eager(semiring, dense_consumer, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 300, 1000, generator=g, dtype=torch.float64).requires_grad_()
    out = _program(x, dense_consumer)
    assert 4 * 300 * 1000 >= embedded.LAZY_MIN_NUMEL
    made = []
    orig = embedded.EmbeddedValue._write

    def spy(self, sr, comps, fresh):
        made.append((len(self.parts), fresh))
        return orig(self, sr, comps, fresh)

    monkeypatch.setattr(embedded.EmbeddedValue, "_write", spy)
    (lazy,) = semitriton.grad_values(out, x, semiring=semiring)
    if dense_consumer:        # written into the dense value slice by slice, never a full zero
        assert made and not any(fresh for _, fresh in made)
    else:                     # several selects merged, then one build
        assert made and max(n for n, _ in made) >= 2
    monkeypatch.setattr(embedded, "LAZY_MIN_NUMEL", 1 << 62)
    made.clear()
    (eager,) = semitriton.grad_values(out, x, semiring=semiring)
    assert not made
    assert_semiring_close(lazy, eager, semiring, 1e-12, f"lazy vs eager {semiring}")
    if semiring == "real":
        (g_ref,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(lazy[0], g_ref, rtol=1e-12, atol=1e-12)
