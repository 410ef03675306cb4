"""The max-plus and signed max-times contractions on CPU tensors, compiled by
``torch.compile`` (inductor's C++ backend) into one loop nest.

The torch reference (``_util.tropical_matmul`` / ``signed_max_matmul``)
materialises [..., I, k, J] chunks of the broadcast and reduces them, several
passes over memory per semiring MAC. The compiled kernels compute

    max-plus:          out[b, i, k] = max_j l[b, i, j] + lt[b, k, j]
    signed max-times:  P[b, i, k] = max_j max(w p, w n) + pen,
                       N[b, i, k] = min_j min(w p, w n) - pen

(w = wt[b, k, j], p/n = the value at [b, i, j], pen = -inf where the edge or
the value is missing) with the same elementwise operations and a fused max
reduction, so they equal the reference bit for bit (a max is exact in any
order) and hold no [I, K, J] intermediate. Measured on 2 CPU cores: 20–70×
the chunked reference at a 64×1536×576 contraction (bench/RESULTS.md).

``SEMITRITON_CPU_COMPILE``: ``auto`` (default), ``1`` (every CPU contraction
from now on), ``0`` (never). Compiling costs seconds once per process (about
3 s of imports and 3 s per compiled function with a warm inductor cache, tens
of seconds with an empty one), which a short run never earns back (the
default ``semitriton sva`` run does 22 G max-plus MACs, 10 s on the
reference). So ``auto`` keeps the reference until this process has done
``AUTO_UNITS`` of work on it (counted in max-plus-MAC units, the other
contractions weighted by their measured cost; about 15 s on 2 cores), and
compiles from then on: the choice depends on the calls made, not on timing,
so a run is reproducible. Contractions below ``MIN_MACS`` always take the
reference. A compile that fails (no C++ compiler, an unsupported platform)
warns once and the reference runs from then on.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import backend
from ..errors import user_stacklevel

NEG_INF = float("-inf")
POS_INF = float("inf")

#: contractions with fewer semiring MACs always take the chunked reference
MIN_MACS = 1 << 20
#: cost of one MAC of each kind on the chunked reference, in max-plus MACs
#: (2 CPU cores, float32: 2.2 G max-plus MACs/s at SmolLM2's linears)
COST = {"max-plus": 1, "signed max-times": 7, "norm-rows maxabs": 8, "norm-rows entropy": 16, "norm-rows max": 24}
#: ``auto`` compiles once the reference has done this much work in the process
AUTO_UNITS = 1 << 35

_lock = threading.Lock()
_compiled: dict[Callable, Callable] = {}
_failed: Optional[str] = None
_exhausted: set = set()
#: compiled variants (shapes with size-0/1 dims, ranks, dtypes) kept per function
RECOMPILE_LIMIT = 64
_units_done = 0
#: compiled calls per contraction kind in this process (for benchmarks)
calls: Counter = Counter()


def _max_plus(l: Tensor, lt: Tensor) -> Tensor:
    return torch.amax(l.unsqueeze(-2) + lt.unsqueeze(-3), dim=-1)


def _signed_max_times(p: Tensor, n: Tensor, wt: Tensor) -> tuple[Tensor, Tensor]:
    live = p != NEG_INF
    pe = torch.where(live, p, 0.0).unsqueeze(-2)
    ne = torch.where(live, n, 0.0).unsqueeze(-2)
    pen = (torch.where(live, 0.0, NEG_INF).to(p.dtype).unsqueeze(-2)
           + torch.where(wt != 0, 0.0, NEG_INF).to(p.dtype).unsqueeze(-3))
    w = wt.unsqueeze(-3)
    a, b = w * pe, w * ne
    return torch.amax(torch.maximum(a, b) + pen, dim=-1), torch.amin(torch.minimum(a, b) - pen, dim=-1)


def _norm_jacobian(xh: Tensor, rs: Tensor, g: Tensor, centered: float) -> Tensor:
    """[R, n, n] (never materialised once compiled): w[r, i, j] =
    γ_j r_r (δ_ij − (c + x̂_ri x̂_rj)/n), c = 1 (layer norm) or 0 (RMS norm),
    in the operation order of ``Semiring._norm``."""
    n = xh.shape[-1]
    idx = torch.arange(n, device=xh.device)
    eye = (idx.unsqueeze(-1) == idx).to(xh.dtype)
    w = eye - (xh.unsqueeze(-1) * xh.unsqueeze(-2) + centered) / n
    return w * rs.unsqueeze(-1) * g


def _norm_maxabs(xh: Tensor, rs: Tensor, g: Tensor, l: Tensor, centered: float) -> Tensor:
    """log m_i = max_j log|w_ij| + log m_j."""
    w = _norm_jacobian(xh, rs, g, centered)
    return torch.amax(torch.log(torch.abs(w)) + l.unsqueeze(-2), dim=-1)


def _norm_maxabs_linear(xh: Tensor, rs: Tensor, g: Tensor, e: Tensor, centered: float) -> Tensor:
    """m_i / e^shift = max_j |w_ij| e_j with e_j = m_j / e^shift: no log per
    Jacobian entry (see :func:`_maxabs_rows` for when it is exact)."""
    w = _norm_jacobian(xh, rs, g, centered)
    return torch.amax(torch.abs(w) * e.unsqueeze(-2), dim=-1)


#: the linear-space maxabs rows need every value of a row within e^-SPAN of
#: its largest (all e_j normal numbers), and a result of at least e^-FLOOR
#: (its winning term normal, so no term lost to underflow could have won)
_SPAN = {torch.float32: 80.0, torch.float64: 700.0}
_FLOOR = {torch.float32: 69.0, torch.float64: 620.0}


def _maxabs_rows(xh: Tensor, rs: Tensor, g: Tensor, l: Tensor, c: float) -> Optional[Tensor]:
    """The maxabs value of a norm's input rows: in linear space with one shift
    per row (a product and a max per Jacobian entry), and in log space
    (:func:`_norm_maxabs`) for the rows where that could underflow; the two
    agree to rounding."""
    from ._util import finite_amax
    shift = finite_amax(l, -1)
    e = torch.exp(l - shift)
    q = _run("norm-rows maxabs", _norm_maxabs_linear, xh, rs, g, e, c)
    if q is None:
        return None
    out = torch.log(q) + shift
    lo = torch.where(l == NEG_INF, shift, l).amin(-1)
    live = (l != NEG_INF).any(-1)
    redo = live & ((lo - shift.squeeze(-1) < -_SPAN[l.dtype]) | (out - shift < -_FLOOR[l.dtype]).any(-1)
                   | (l == POS_INF).any(-1))
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(-1)
        part = _run("norm-rows maxabs (log space)", _norm_maxabs, xh[rows], rs[rows], g, l[rows], c)
        if part is None:
            return None
        out = out.index_copy(0, rows, part)
    return torch.where(live.unsqueeze(-1), out, NEG_INF)


def _norm_max(xh: Tensor, rs: Tensor, g: Tensor, p: Tensor, n: Tensor,
              centered: float) -> tuple[Tensor, Tensor]:
    """(M+, M-)_i = signed max-times of the row's w_ij with (M+, M-)_j."""
    return _signed_max_times(p.unsqueeze(-2), n.unsqueeze(-2), _norm_jacobian(xh, rs, g, centered))


def _norm_entropy(xh: Tensor, rs: Tensor, g: Tensor, a: Tensor, amu: Tensor,
                  centered: float) -> tuple[Tensor, Tensor]:
    """z_i = Σ_j |w_ij| a_j and s_i = Σ_j |w_ij| a_j μ_j − Σ_j |w_ij| log|w_ij| a_j
    (a = z/e^shift per row, amu = a·μ)."""
    A = torch.abs(_norm_jacobian(xh, rs, g, centered))
    xlx = torch.where(A > 0, A * torch.log(torch.where(A > 0, A, 1.0)), 0.0)
    a_, amu_ = a.unsqueeze(-2), amu.unsqueeze(-2)
    return (A * a_).sum(-1), (A * amu_).sum(-1) - (xlx * a_).sum(-1)


def wanted(kind: str, t: Tensor, macs: int) -> bool:
    """Whether a ``kind`` contraction of ``macs`` semiring MACs on ``t``'s
    device takes the compiled kernel (``auto``: counts the reference's work)."""
    global _units_done
    if t.device.type != "cpu" or _failed is not None or t.dtype not in (torch.float32, torch.float64):
        return False
    mode = str(backend.env("SEMITRITON_CPU_COMPILE", "auto")).strip().lower()
    if mode in ("0", "off", "false", "no"):
        return False
    if mode in ("1", "on", "true", "yes"):
        return True
    if macs < MIN_MACS:
        return False
    if _units_done < AUTO_UNITS:
        _units_done += macs * COST[kind]
    return _units_done >= AUTO_UNITS


def _function(fn: Callable) -> Callable:
    with _lock:
        if fn not in _compiled:
            _compiled[fn] = torch.compile(fn, dynamic=True)
        return _compiled[fn]


class _NeverRaised(Exception):
    """Stands in for dynamo's recompile-limit exception on a torch without it
    (there the settings ``_run`` patches are missing too, which counts as a
    compile failure)."""


def _run(name: str, fn: Callable, *args: Tensor):
    """The compiled ``fn`` on ``args``; None where it cannot run: a compile
    failure switches every compiled contraction off (the reference from then
    on); dynamo's recompile limit (``fn`` met in more shape/dtype variants than
    it keeps) switches off ``fn`` alone. The limit raises here instead of
    falling back to eager, which would materialise the whole broadcast."""
    global _failed
    if fn in _exhausted:
        return None
    import torch._dynamo
    limit_hit = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None) or _NeverRaised
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=RECOMPILE_LIMIT), \
                torch.no_grad():
            out = _function(fn)(*args)
    except limit_hit:
        _exhausted.add(fn)
        warnings.warn(f"semitriton: the compiled CPU {name} contraction met more than {RECOMPILE_LIMIT} shape "
                      "and dtype variants (dynamo's recompile limit); it runs the chunked torch reference from "
                      "now on (slower, same values).", RuntimeWarning, stacklevel=user_stacklevel())
        return None
    except Exception as e:                                  # noqa: BLE001 - any compile failure
        _failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        warnings.warn(f"semitriton: compiling the CPU {name} contraction with torch.compile failed "
                      f"({_failed[:300]}); the chunked torch reference runs instead (slower). "
                      "SEMITRITON_CPU_COMPILE=0 skips the attempt.", RuntimeWarning, stacklevel=user_stacklevel())
        return None
    calls[name] += 1
    return out


def _batched(lead: tuple, *ts: Tensor) -> list[Tensor]:
    """Each [..., a, b] tensor broadcast to ``lead`` and flattened to a
    contiguous [B, a, b] (B = prod(lead))."""
    return [t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:]).contiguous() for t in ts]


def max_plus(l: Tensor, lt: Tensor, lead: tuple) -> Optional[Tensor]:
    """max_j l[..., i, j] + lt[..., k, j] as [*lead, I, K] (None: use the reference)."""
    I, J, K = l.shape[-2], l.shape[-1], lt.shape[-2]
    if not wanted("max-plus", l, math.prod(lead) * I * J * K):
        return None
    if lt.dim() == 2:                                       # one weight: fold the lead dims into the rows
        out = _run("max-plus", _max_plus, l.expand(*lead, *l.shape[-2:]).reshape(-1, l.shape[-1]).contiguous(),
                   lt.contiguous())
    else:
        out = _run("max-plus", _max_plus, *_batched(lead, l, lt))
    return None if out is None else out.reshape(*lead, I, K)


def signed_max_times(p: Tensor, n: Tensor, wt: Tensor, lead: tuple) -> Optional[tuple[Tensor, Tensor]]:
    """(P, N) of ``_util.signed_max_matmul`` with ``wt`` as [..., K, J] (None: use the reference)."""
    I, J, K = p.shape[-2], p.shape[-1], wt.shape[-2]
    if not wanted("signed max-times", p, math.prod(lead) * I * J * K):
        return None
    if wt.dim() == 2:
        flat = [t.expand(*lead, *t.shape[-2:]).reshape(-1, t.shape[-1]).contiguous() for t in (p, n)]
        out = _run("signed max-times", _signed_max_times, *flat, wt.contiguous())
    else:
        out = _run("signed max-times", _signed_max_times, *_batched(lead, p, n, wt))
    return None if out is None else tuple(o.reshape(*lead, I, K) for o in out)


def norm_rows(name: str, v: tuple, xh: Tensor, rs: Tensor, g: Optional[Tensor], centered: bool) -> Optional[tuple]:
    """The value of a layer/RMS norm's input rows [R, n] for the built-in
    semiring ``name`` with the dense per-row Jacobian formed on the fly
    (None: use the chunked reference, ``Semiring._rowwise_chunked``)."""
    R, n = xh.shape
    if name not in ("max", "maxabs", "entropy") or not wanted(f"norm-rows {name}", xh, R * n * n):
        return None
    xh, rs = xh.contiguous(), rs.contiguous()
    g = torch.ones(n, dtype=xh.dtype, device=xh.device) if g is None else g.contiguous()
    c = 1.0 if centered else 0.0
    if name == "maxabs":
        out = _maxabs_rows(xh, rs, g, v[0].contiguous(), c)
        return None if out is None else (out,)
    if name == "max":
        out = _run("norm-rows max", _norm_max, xh, rs, g, v[0].contiguous(), v[1].contiguous(), c)
        return None if out is None else (out[0].squeeze(-2), out[1].squeeze(-2))
    from ._util import finite_amax, safe_div
    l, mu = v
    m = finite_amax(l, -1)
    a = torch.exp(l - m)
    out = _run("norm-rows entropy", _norm_entropy, xh, rs, g, a.contiguous(), (a * mu).contiguous(), c)
    if out is None:
        return None
    z, s = out
    lz = torch.log(z) + m
    return lz, torch.where(lz == NEG_INF, 0.0, safe_div(s, z))
