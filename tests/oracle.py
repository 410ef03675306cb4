"""An independent float64 oracle for semiring backpropagation.

A small program is written twice: as an ordinary torch forward (``engine``),
which the library walks, and as a list of canonical primitives (``steps``).
The oracle builds the explicit scalar gradient graph of the steps: every
scalar of every tensor is a node, and every non-zero entry of each
primitive's Jacobian (computed in float64 by torch.autograd.functional) is an
edge. It then evaluates the semiring definitions of DESIGN.md directly, in
linear space, over those edges: real, abs, max (M+, M-), maxabs, entropy
(<z, e> pairs). It shares no code with the library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch


# ---- semiring definitions (DESIGN.md section 1), vectorised over edges -----------------------
# Values are numpy arrays with a leading component axis: shape [C, n].
class OReal:
    name = "real"

    def one(self, n):
        return np.ones((1, n))

    def zero(self, n):
        return np.zeros((1, n))

    def plus(self, a, b):
        return a + b

    def pull(self, J, v):          # J[u, i] = dy_u/dx_i ; out_i = ⊕_u J[u,i] ⊗ v_u
        return (J.T @ v[0])[None]

    def readout(self, v):
        return v[0]

    def sum_last(self, v, shape):
        return v[0].reshape(shape).sum(-1)


class OAbs(OReal):
    name = "abs"

    def pull(self, J, v):
        return (np.abs(J).T @ v[0])[None]


class OMaxAbs(OReal):
    name = "maxabs"

    def plus(self, a, b):
        return np.maximum(a, b)

    def pull(self, J, v):
        A = np.abs(J)
        cand = np.where(A > 0, A * v[0][:, None], 0.0)
        return cand.max(0, initial=0.0)[None]

    def sum_last(self, v, shape):
        return v[0].reshape(shape).max(-1)


class OMax(OReal):
    name = "max"

    def one(self, n):
        return np.ones((2, n))

    def zero(self, n):
        return np.stack([np.full(n, -np.inf), np.full(n, np.inf)])

    def plus(self, a, b):
        return np.stack([np.maximum(a[0], b[0]), np.minimum(a[1], b[1])])

    def pull(self, J, v):
        p, n = v[0][:, None], v[1][:, None]
        with np.errstate(invalid="ignore"):
            cp = np.where(J > 0, J * p, np.where(J < 0, J * n, -np.inf))
            cn = np.where(J > 0, J * n, np.where(J < 0, J * p, np.inf))
        cp = np.where(np.isnan(cp), -np.inf, cp)
        cn = np.where(np.isnan(cn), np.inf, cn)
        return np.stack([cp.max(0, initial=-np.inf), cn.min(0, initial=np.inf)])

    def readout(self, v):
        return v[0]

    def sum_last(self, v, shape):
        return v[0].reshape(shape).max(-1)


class OEntropy(OReal):
    """Expectation semiring: edge <|w|, -|w| log|w|>; ⊗ <z1 z2, z1 e2 + z2 e1>."""

    name = "entropy"

    def one(self, n):
        return np.stack([np.ones(n), np.zeros(n)])

    def zero(self, n):
        return np.zeros((2, n))

    def pull(self, J, v):
        A = np.abs(J)
        with np.errstate(divide="ignore", invalid="ignore"):
            E = np.where(A > 0, -A * np.log(np.where(A > 0, A, 1.0)), 0.0)
        z = A.T @ v[0]
        e = A.T @ v[1] + E.T @ v[0]
        return np.stack([z, e])

    @staticmethod
    def _h(z, e):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(z > 0, e / np.where(z > 0, z, 1.0) + np.log(np.where(z > 0, z, 1.0)), 0.0)

    def readout(self, v):
        return self._h(v[0], v[1])

    def sum_last(self, v, shape):
        return self._h(v[0].reshape(shape).sum(-1), v[1].reshape(shape).sum(-1))


SEMIRINGS = {s.name: s for s in (OReal(), OAbs(), OMax(), OMaxAbs(), OEntropy())}


# ---- programs ---------------------------------------------------------------------------------
@dataclass
class Step:
    out: str
    fn: Callable
    args: tuple


@dataclass
class Program:
    """``inputs``: the tensors queried (float64 masters). ``steps``: canonical
    primitives over named tensors (args that are not tensor names are
    constants baked into ``fn``). ``engine(**inputs)`` is the torch forward
    the library walks; it must compute the same output as the steps."""

    name: str
    inputs: dict
    steps: list
    engine: Callable
    output: str = field(default="")

    def __post_init__(self):
        if not self.output:
            self.output = self.steps[-1].out


def run_steps(prog: Program, inputs: dict | None = None) -> dict:
    env = dict(inputs or prog.inputs)
    for st in prog.steps:
        env[st.out] = st.fn(*[env[a] for a in st.args])
    return env


def oracle(prog: Program, semiring: str, token: bool = False) -> dict:
    """Readouts (numpy float64) per input name; with ``token=True`` the ⊕ over
    the last dimension as well."""
    sr = SEMIRINGS[semiring]
    env = {k: v.detach().double() for k, v in prog.inputs.items()}
    shapes, jac = {}, []
    for st in prog.steps:
        args = [env[a] for a in st.args]
        env[st.out] = st.fn(*args).detach()
        shapes[st.out] = tuple(env[st.out].shape)
        js = []
        for k, a in enumerate(args):
            def f(x, k=k):
                xs = list(args)
                xs[k] = x
                return st.fn(*xs)
            J = torch.autograd.functional.jacobian(f, a)
            js.append(J.reshape(env[st.out].numel(), a.numel()).numpy())
        jac.append(js)
    for k, v in prog.inputs.items():
        shapes[k] = tuple(v.shape)
    vals = {prog.output: sr.one(int(np.prod(shapes[prog.output])))}
    for st, js in zip(reversed(prog.steps), reversed(jac)):
        v = vals.get(st.out)
        if v is None:
            continue
        for a, J in zip(st.args, js):
            contrib = sr.pull(J, v)
            vals[a] = contrib if a not in vals else sr.plus(vals[a], contrib)
    out = {}
    for k in prog.inputs:
        v = vals.get(k, sr.zero(int(np.prod(shapes[k]))))
        out[k] = sr.readout(v).reshape(shapes[k])
        if token:
            out[k + ":token"] = sr.sum_last(v, shapes[k])
    return out


def enumerate_paths(prog: Program, inp: str):
    """All paths (as lists of edge weights) from every scalar of ``inp`` to the
    output, by explicit depth-first enumeration (tiny programs only)."""
    env = {k: v.detach().double() for k, v in prog.inputs.items()}
    edges = {}                                       # (tensor, idx) -> list of ((tensor, idx), w)
    for st in prog.steps:
        args = [env[a] for a in st.args]
        env[st.out] = st.fn(*args).detach()
        for k, a in enumerate(args):
            def f(x, k=k):
                xs = list(args)
                xs[k] = x
                return st.fn(*xs)
            J = torch.autograd.functional.jacobian(f, a).reshape(env[st.out].numel(), a.numel())
            for u, i in zip(*torch.nonzero(J, as_tuple=True)):
                edges.setdefault((st.args[k], int(i)), []).append(((st.out, int(u)), float(J[u, i])))
    result = {}

    def dfs(node, acc):
        if node[0] == prog.output:
            yield list(acc)
            return
        for nxt, w in edges.get(node, ()):
            acc.append(w)
            yield from dfs(nxt, acc)
            acc.pop()

    for i in range(prog.inputs[inp].numel()):
        result[i] = list(dfs((inp, i), []))
    return result


def brute_force(paths: list, semiring: str) -> float:
    prods = [math.prod(p) for p in paths]
    if semiring == "real":
        return sum(prods)
    if semiring == "abs":
        return sum(abs(x) for x in prods)
    if semiring == "max":
        return max(prods) if prods else -math.inf
    if semiring == "maxabs":
        return max((abs(x) for x in prods), default=0.0)
    if semiring == "entropy":
        z = sum(abs(x) for x in prods)
        if z == 0:
            return 0.0
        return -sum(abs(x) / z * math.log(abs(x) / z) for x in prods)
    raise ValueError(semiring)


__all__ = ["Program", "Step", "oracle", "run_steps", "SEMIRINGS", "enumerate_paths", "brute_force"]
