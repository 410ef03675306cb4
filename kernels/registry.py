"""(op, semiring) -> Triton implementation, filled by the kernel modules."""

from __future__ import annotations

from typing import Callable

KERNELS: dict[tuple[str, str], Callable] = {}


def register(op: str, *semirings: str):
    def deco(fn):
        for s in semirings:
            KERNELS[(op, s)] = fn
        return fn
    return deco
