"""Matplotlib plots. Each function returns a ``matplotlib.figure.Figure``
(it displays in a notebook) and saves it when given a path. The figures are
made without pyplot, so the user's backend and pyplot's figure list are
left as they were."""

from __future__ import annotations

import importlib
from typing import Optional

from ..branches import ATTN_BRANCHES, branch_name

_COLORS = {"query": "#1f77b4", "key": "#ff7f0e", "value": "#2ca02c", "skip": "#7f7f7f"}


def available() -> bool:
    """Is matplotlib installed (the ``plot`` extra)?"""
    try:
        importlib.import_module("matplotlib.figure")
    except ImportError:
        return False
    return True


def _figure(figsize):
    """A figure that pyplot does not track (no backend switch, nothing to close)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("semitriton's plots need matplotlib: pip install 'semitriton[plot]'") from exc
    return Figure(figsize=figsize)


def _positive(v: float) -> bool:
    """Drawable on a log axis: not "no path" (0 or -inf), a negative signed product, NaN or inf."""
    return v == v and 0 < v < float("inf")


def _log_scale_values(vals) -> list:
    """Values for a log axis; the others become NaN, so nothing is drawn there."""
    return [v if _positive(v) else float("nan") for v in vals]


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_branch_weights(groups: dict, path=None, title: str = "mean top-path weight by branch"):
    """``groups``: {group name: layer_table rows}. One panel per group; per
    layer the mean top-path weight through each branch (log scale; a layer
    where a branch has no path, or a non-positive signed mean, is a gap)."""
    names = [g for g, rows in groups.items() if rows]
    fig = _figure((4.2 * max(1, len(names)), 3.4))
    axes = fig.subplots(1, max(1, len(names)), squeeze=False)
    for ax, g in zip(axes[0], names):
        rows = groups[g]
        layers = [r["layer"] for r in rows]
        for b in ATTN_BRANCHES:
            vals = _log_scale_values([r[b] for r in rows])
            if any(v == v for v in vals):
                ax.plot(layers, vals, marker="o", ms=3, label=b, color=_COLORS[b])
        ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(g)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-path weight")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_branch_fractions(rows: list, path=None, title: str = "branch taken by the top path"):
    """Stacked bars: per layer, the fraction of tokens whose top path takes
    each branch at the attention input (of the tokens with a path)."""
    fig = _figure((max(4.0, 0.25 * len(rows) + 2), 3.2))
    ax = fig.subplots()
    layers = [r["layer"] for r in rows]
    bottom = [0.0] * len(rows)
    for b in ATTN_BRANCHES:
        vals = [r.get(f"frac_{b}", 0.0) for r in rows]
        vals = [v if v == v else 0.0 for v in vals]          # NaN: no token of the layer has a path
        ax.bar(layers, vals, bottom=bottom, color=_COLORS[b], label=b, width=0.85)
        bottom = [x + y for x, y in zip(bottom, vals)]
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    fig.tight_layout()
    return _save(fig, path)


def plot_token_heatmap(analysis, path=None, title: Optional[str] = None):
    """Tokens × layers: log10 top-path weight at the layer input, with the
    branch the top path takes (Q/K/V/S; "-": no path) written in each cell;
    cells without a positive weight (no path, or a negative signed product)
    are left blank rather than stretching the colour scale."""
    import math

    import numpy as np
    br = analysis.branches
    if br is None:
        raise ValueError("this analysis has no branch attribution")
    T = len(analysis.tokens)
    data = np.ma.masked_invalid([[math.log10(v) if _positive(v) else math.nan
                                  for v in (float(br.total[L][0, t]) for L in br.layers)] for t in range(T)])
    fig = _figure((max(4.0, 0.35 * len(br.layers) + 2), max(2.5, 0.3 * T + 1)))
    ax = fig.subplots()
    import matplotlib
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#dddddd")
    im = ax.imshow(data, aspect="auto", cmap=cmap)
    for j, L in enumerate(br.layers):
        top = br.top_branch(L)[0]
        for t in range(T):
            ax.text(j, t, branch_name(int(top[t]))[0].upper(), ha="center", va="center", fontsize=6,
                    color="white" if data[t, j] is not np.ma.masked else "black")
    ax.set_yticks(range(T))
    ax.set_yticklabels([repr(x)[1:-1][:14] for x in analysis.tokens], fontsize=7)
    ax.set_xticks(range(len(br.layers)))
    ax.set_xticklabels(br.layers, fontsize=7)
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label="log10 top-path weight")
    ax.set_title(title or analysis.description or "top-path weight per token and layer", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy(rows: list, path=None):
    """Bars: accuracy per (condition, cell) row of a summary's accuracy table."""
    fig = _figure((max(4, 0.8 * len(rows) + 1), 3))
    ax = fig.subplots()
    ax.bar(range(len(rows)), [r["accuracy"] for r in rows], color="#4c72b0")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['condition']}\n{r['cell']}" for r in rows], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    fig.tight_layout()
    return _save(fig, path)
