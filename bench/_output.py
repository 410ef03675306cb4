"""Writing benchmark results: JSON after every row, markdown at the end."""

from __future__ import annotations

import json


def cpu_device() -> str:
    """The CPU's model name, torch's thread count and version (the device
    column of the CPU benchmarks)."""
    import platform

    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def save_json(path, device: str, date: str, rows: list, autotune: dict | None = None) -> None:
    """The rows so far (and, if given, the autotuner's measurements as
    [{"key", "candidates": [[config, ms], ...]}]), so that a run cut off by a
    time limit keeps what it measured."""
    if path:
        doc = {"device": device, "date": date, "rows": rows}
        if autotune:
            doc["autotune"] = [{"key": [str(k) for k in key], "candidates": [[c, t] for c, t in cands]}
                               for key, cands in autotune.items()]
        with open(path, "w") as f:
            json.dump(doc, f, indent=1, default=str)


def finish(md: str, path) -> int:
    print(md)
    if path:
        with open(path, "w") as f:
            f.write(md)
    return 0


#: the legend of the autotuner tables
AUTOTUNE_LEGEND = ("Autotuner candidates (BMxBN/warps, S = split-J slices, attention plans with their dot "
                   "precision, dispatch choices by implementation; median ms as the autotuner timed them; "
                   "* = chosen):")


def config_label(c: dict) -> str:
    """A launch config as BMxBN/warps with its variant flags (split-J slices,
    PIPE, ROW_SHIFT), an attention plan as BMxBN/warps precision (split:
    q/k and v in two launches; pipe, chunk C: the tropical contractions'
    loop form), a dispatch choice by its implementation."""
    if "cfg" in c:                                          # attention launch plan
        bm, bn, nw, _, prec = c["cfg"]
        s = f"{bm}x{bn}/{nw}w {prec}"
        if c.get("split"):
            qk = c.get("qk_cfg")
            s += " split" + (f" (q/k {qk[0]}x{qk[1]})" if qk else "")
        if c.get("pipe"):
            s += " pipe"
        if c.get("chunk", 1) > 1:
            s += f" chunk {c['chunk']}"
        if c.get("split_g"):
            s += " split-G"
        return s
    if "impl" in c:                                         # dispatch race
        return str(c.get("name", f"impl {c['impl']}"))
    if c.get("SORTED"):                                     # the O(n log n) abs layer norm
        return f"sorted {c.get('WARPS_X', 1)}x warps"
    s = f"{c.get('BM', c.get('BI'))}x{c.get('BN', c.get('BJ'))}/{c.get('num_warps')}w"
    if c.get("SPLIT_J", 1) > 1:
        s += f" S={c['SPLIT_J']}"
    if c.get("PIPE") is False:
        s += " no-PIPE"
    if c.get("ROW_SHIFT") is False:
        s += " shift-per-program"
    if c.get("maxnreg"):
        s += f" maxnreg {c['maxnreg']}"
    return s


def candidates_cell(cands: list) -> str:
    """[(config, ms or None)] -> 'cfg ms, cfg ms*' (* = the fastest)."""
    ok = [i for i, c in enumerate(cands) if c[1] is not None]
    best = min(ok, key=lambda i: cands[i][1]) if ok else None
    return ", ".join(f"{config_label(c)} {'-' if t is None else format(t, '.3g')}{'*' if i == best else ''}"
                     for i, (c, t) in enumerate(cands))


def autotune_keys() -> set:
    """The launch keys the kernels' autotuner has timed so far in this process."""
    try:
        from semitriton.kernels import _common
    except Exception:  # noqa: BLE001 - no triton
        return set()
    return set(_common.timings)


def autotune_since(before: set) -> list:
    """The autotuner's measurements for the keys timed since ``before``
    (``autotune_keys()``), as JSON-able [[{"config", "ms"}, ...] per key]."""
    from semitriton.kernels import _common
    return [[{"config": c, "ms": t} for c, t in _common.timings[k]] for k in _common.timings if k not in before]


def autotune_table(timings: dict) -> str:
    """Markdown of the autotuner's measurements (kernels/_common.timings):
    one row per launch key with every candidate's median ms."""
    if not timings:
        return ""
    out = ["", AUTOTUNE_LEGEND, "", "| key | candidates |", "|---|---|"]
    for key, cands in timings.items():
        out.append(f"| {' '.join(str(k) for k in key)} | {candidates_cell(cands)} |")
    return "\n".join(out) + "\n"
