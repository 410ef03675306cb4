"""Strict JSON for results that hold "no path" values.

A statistic with no path reads -inf (log flow, the signed top path), which
Python's json writes as ``-Infinity``: not JSON, and a browser's
``JSON.parse`` rejects it. Results are written with non-finite numbers as
``null`` and read back with ``null`` as -inf, the only non-finite value an
analysis holds (a summary's mean or fraction over no tokens is NaN, also
written ``null``).
"""

from __future__ import annotations

import math


def json_safe(obj):
    """``obj`` (dicts, lists, tuples, numbers) with non-finite floats as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def none_as_neg_inf(obj):
    """Inverse of :func:`json_safe` for (nested lists of) numbers: None -> -inf."""
    if obj is None:
        return float("-inf")
    if isinstance(obj, (list, tuple)):
        return [none_as_neg_inf(v) for v in obj]
    return obj
