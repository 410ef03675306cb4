"""Per-token statistics: ⊕ over the embedding dimension (a virtual source joined
to each embedding unit by weight-1 edges)."""

from __future__ import annotations

from typing import Union

from torch import Tensor

from .semirings import Semiring, Value, get


def token_values(values: Value, semiring: Union[str, Semiring], dim: int = -1) -> Value:
    """⊕ of raw semiring values over ``dim`` (default: the embedding dimension)."""
    sr = get(semiring)
    _check_components(values, sr, "token_values")
    return sr.sum(values, dim)


def token_readout(values: Union[Value, Tensor], semiring: Union[str, Semiring], dim: int = -1) -> Tensor:
    """Per-token statistic: the readout of ⊕ over the last (embedding) dimension.

    ``values`` are raw semiring values from :func:`semitriton.grad_values` (for
    entropy: z_tok = Σz, e_tok = Σe, H = e_tok/z_tok + log z_tok). For the
    semirings whose readout is invertible (real, abs, maxabs) a readout tensor
    from :func:`semitriton.grad` is accepted too."""
    sr = get(semiring)
    if isinstance(values, Tensor):
        if sr.name == "real":
            return values.sum(dim)
        if sr.name == "abs":
            return values.sum(dim)
        if sr.name == "maxabs":
            return values.amax(dim)
        raise TypeError(f"token_readout for the {sr.name} semiring needs the raw values from "
                        "semitriton.grad_values(...), not readouts")
    _check_components(values, sr, "token_readout")
    return sr.readout(sr.sum(values, dim))


def _check_components(values, sr, who: str) -> None:
    """Raw values of another semiring (a different number of components) are
    an error, not a number (for a user-defined semiring, where it declares
    its ``components``)."""
    if type(sr).components is Semiring.components:          # not declared: nothing to check against
        return
    if isinstance(values, (tuple, list)) and len(values) != len(sr.components):
        raise ValueError(f"{who}: these values have {len(values)} component(s), but the {sr.name} semiring's "
                         f"have {len(sr.components)} ({', '.join(sr.components)}): pass the values of "
                         f"semitriton.grad_values(..., semiring={sr.name!r})")


def log_readout(values: Value, semiring: Union[str, Semiring]) -> Tensor:
    """log of the readout for the log-space semirings (abs: log Z, maxabs: log m),
    finite where a float32 readout would overflow."""
    sr = get(semiring)
    if hasattr(sr, "log_readout"):
        _check_components(values, sr, "log_readout")
        return sr.log_readout(values)
    raise TypeError(f"the {sr.name} semiring has no log-space readout")
