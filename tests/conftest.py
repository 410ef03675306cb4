import os
import sys

# Without a GPU the Triton kernels are tested with the interpreter; it must be
# chosen before triton is first imported.
try:
    import torch as _torch
    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

SEMIRINGS = ("real", "abs", "max", "maxabs", "entropy")


def node_types(t) -> list:
    """The type names of the autograd nodes of ``t``'s graph, each node once."""
    seen, stack, names = set(), [t.grad_fn], []
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        names.append(type(n).__name__)
        stack.extend(f for f, _ in n.next_functions)
    return names


def walk_every_semiring(out, inp, want=None) -> dict:
    """``semitriton.grad`` of scalar ``out`` to ``inp`` in every semiring
    (real walked by the rules): each finite, real equal to ``want`` (torch's
    gradient, computed here if not given). Returns {semiring: value}."""
    import semitriton
    if want is None:
        (want,) = torch.autograd.grad(out, inp, retain_graph=True)
    got = {}
    for s in SEMIRINGS:
        (v,) = semitriton.grad(out, inp, semiring=s, **({"fast_real": False} if s == "real" else {}))
        assert torch.isfinite(v).all(), s
        if s == "real":
            torch.testing.assert_close(v, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))
        got[s] = v
    return got


def triton_ok() -> bool:
    """Whether the Triton backend can run here: a GPU, or the interpreter."""
    from semitriton import backend
    return backend.triton_available() and (torch.cuda.is_available() or backend.interpreting())
NORMWISE = {"real", "entropy"}


def assert_semiring_close(actual, expected, semiring, rtol, what=""):
    """Compare a readout with the oracle. Infinite entries (no path) must match
    exactly; abs/max/maxabs elementwise relative; real and entropy normwise
    (their values may cancel or be near 0)."""
    a = actual.detach().double().cpu().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    b = np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert not np.isnan(a).any(), f"{what}: NaN in result"
    inf_a, inf_b = ~np.isfinite(a), ~np.isfinite(b)
    assert (inf_a == inf_b).all() and (a[inf_a] == b[inf_b]).all(), \
        f"{what}: infinite entries differ\n{a}\n{b}"
    fa, fb = a[~inf_a], b[~inf_b]
    if fa.size == 0:
        return
    if semiring in NORMWISE:
        floor = np.abs(fb).max() if semiring == "real" else max(1.0, np.abs(fb).max())
        diff = np.abs(fa - fb).max()
        err = 0.0 if diff == 0 else diff / max(floor, 1e-300)
    else:
        err = (np.abs(fa - fb) / np.maximum(np.abs(fb), 1e-300)).max()
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}\nactual {fa[:8]}\nexpected {fb[:8]}"


@pytest.fixture
def semiring_close():
    return assert_semiring_close


def check_each_operand_alone(name, fn, inputs: dict, used, weights, want: dict, semiring: str, rtol=1e-12):
    """Walk ``(fn(*operands) * weights).sum()`` with one operand at a time
    requiring grad: torch then saves only what that operand's edges need
    (the others may be saved as None), and its statistic must still be the
    oracle's ``want[name of that operand]`` (from the program where all require grad)."""
    import semitriton
    for k, key in enumerate(used):
        leaves = [inputs[u].detach().clone().requires_grad_(i == k) for i, u in enumerate(used)]
        out = (fn(*leaves) * weights).sum()
        (got,) = semitriton.grad(out, leaves[k], semiring=semiring,
                                 **({"fast_real": False} if semiring == "real" else {}))
        assert_semiring_close(got, want[key], semiring, rtol, f"{name}/{key} alone/{semiring}")
