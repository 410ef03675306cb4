"""Self-contained HTML reports (inline CSS, JS and SVG; no network)."""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
from typing import Optional, Sequence

from ..branches import branch_name
from .analysis import milestone_label

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}h3{font-size:1em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}td.l{white-space:pre}.tok{display:inline-block;padding:2px 4px;margin:1px;border-radius:3px;
font-family:ui-monospace,monospace;white-space:pre;border:1px solid #ccc}
.sub{outline:2px solid #d62728}.att{outline:2px dashed #9467bd}
.btn{margin-right:6px;padding:2px 8px;cursor:pointer}.btn.on{background:#333;color:#fff}
.muted{color:#777;font-size:.85em}details{margin:.4em 0}svg text{font-family:system-ui,sans-serif}
img{max-width:100%}
"""

_JS = """
function fin(v){ return typeof v === 'number' && isFinite(v); }
function colour(v, lo, hi){ if(!fin(v)) return '#eee';
  var x = hi>lo ? (v-lo)/(hi-lo) : 0.5; x=Math.max(0,Math.min(1,x));
  var r=Math.round(255*(1-x)+30*x), g=Math.round(255*(1-x)+90*x), b=Math.round(255*(1-x)+200*x);
  return 'rgb('+r+','+g+','+b+')'; }
function paint(id, stat){ var d = JSON.parse(document.getElementById(id+'-data').textContent);
  var vals = d.stats[stat]; var f = vals.filter(fin); var lo=Math.min.apply(null,f), hi=Math.max.apply(null,f);
  var spans = document.querySelectorAll('#'+id+' .tok');
  for (var i=0;i<spans.length;i++){ var v=vals[i]; spans[i].style.background=colour(v,lo,hi);
    spans[i].style.color = (fin(v) && hi>lo && (v-lo)/(hi-lo)>0.6)?'#fff':'#000';
    spans[i].title = stat+' = '+(fin(v)?v.toPrecision(4):'no path'); }
  var bs = document.querySelectorAll('#'+id+'-btns .btn');
  for (var j=0;j<bs.length;j++){ bs[j].classList.toggle('on', bs[j].dataset.stat===stat); } }
"""

_BR_COL = {"query": "#1f77b4", "key": "#ff7f0e", "value": "#2ca02c", "skip": "#7f7f7f",
           "input": "#000", "output": "#000"}


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    """A number to 3 significant digits; anything else (a token such as
    "007" or " 1.50" included) escaped as it is."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return _e(v)
    v = float(v)
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    return f"{v:.3g}"


def table(rows: Sequence[dict], cols: Optional[Sequence[str]] = None, left: Sequence[str] = ()) -> str:
    if not rows:
        return "<p class=muted>(empty)</p>"
    cols = list(cols or rows[0].keys())
    cls = {c: " class=l" if c in left else "" for c in cols}
    head = "".join(f"<th{cls[c]}>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td{cls[c]}>{_fmt(r.get(c, ''))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _token_strip(a, ident: str) -> str:
    sub = set(a.spans.get("subject", []))
    att = set(a.spans.get("attractor", []))
    toks = "".join(f"<span class='tok{' sub' if i in sub else ''}{' att' if i in att else ''}'>"
                   f"{_e(t)}</span>" for i, t in enumerate(a.tokens))
    btns = "".join(f"<span class=btn data-stat='{s}' onclick=\"paint('{ident}','{s}')\">{s}</span>"
                   for s in a.stats)
    data = json.dumps({"stats": {k: [x if math.isfinite(x) else None for x in v] for k, v in a.stats.items()}})
    first = next(iter(a.stats), "")
    return (f"<div id='{ident}-btns'>colour by: {btns}</div><div id='{ident}'>{toks}</div>"
            f"<script type='application/json' id='{ident}-data'>{data}</script>"
            f"<script>paint('{ident}','{first}')</script>")


def path_svg(a, path) -> str:
    """The path drawn layer by layer: columns are layers, rows are tokens; a
    dot per layer coloured by the branch taken (Q/K/V/skip), with the head.
    Positions past the last token (a scored continuation read after the
    text) get rows of their own, labelled +1, +2, ..."""
    ms = a.milestones(path)
    labels = [repr(tok)[1:-1][:12] for tok in a.tokens]
    last = max([m["position"] for m in ms if m["position"] is not None] + [len(labels) - 1])
    labels += [f"+{i}" for i in range(1, last - len(labels) + 2)]
    T = len(labels)
    cols = len(ms)
    W, H = 90 + 46 * cols, 24 + 18 * T
    parts = [f"<svg width='{W}' height='{H}' xmlns='http://www.w3.org/2000/svg'>"]
    for t, label in enumerate(labels):
        y = 20 + 18 * t
        parts.append(f"<text x='2' y='{y + 4}' font-size='10'>{_e(label)}</text>")
        parts.append(f"<line x1='86' y1='{y}' x2='{W - 4}' y2='{y}' stroke='#eee'/>")
    pts = []
    for c, m in enumerate(ms):
        x = 100 + 46 * c
        y = 20 + 18 * (m["position"] if m["position"] is not None else 0)
        pts.append((x, y, m))
        label = milestone_label(m)
        parts.append(f"<text x='{x - 8}' y='{H - 2}' font-size='9' fill='#777'>{label}</text>")
    parts.append("<polyline fill='none' stroke='#d62728' stroke-width='1.5' points='"
                 + " ".join(f"{x},{y}" for x, y, _ in pts) + "'/>")
    for x, y, m in pts:
        col = _BR_COL.get(m["branch"], "#000")
        tag = {"query": "Q", "key": "K", "value": "V", "skip": "S"}.get(m["branch"], "")
        if m["head"] is not None:
            tag += f"h{m['head']}"
        parts.append(f"<circle cx='{x}' cy='{y}' r='4' fill='{col}'><title>{_e(m)}</title></circle>")
        if tag:
            parts.append(f"<text x='{x + 5}' y='{y - 5}' font-size='9' fill='{col}'>{_e(tag)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _paths_html(a) -> str:
    out = []
    for r, p in enumerate(a.paths):
        src, t = p.source_index, a.source_token(p)
        tok = a.tokens[t] if t is not None else "?"
        steps = table([{"op": s.op, "module": s.module, "index": list(s.index), "weight": s.weight}
                       for s in p.steps], left=("op", "module", "index"))
        out.append(f"<h3>path {r + 1}: weight {_fmt(p.weight)} from token {_e(repr(tok))} "
                   f"(unit {src[-1]})</h3>{path_svg(a, p)}"
                   f"<details><summary>{len(p.steps)} steps</summary>{steps}</details>")
    return "".join(out) or "<p class=muted>no paths</p>"


def _branch_tables(a) -> str:
    br = a.branches
    if br is None:
        return "<p class=muted>no branch attribution (the model was not tracked/patched)</p>"
    rows = []
    for L in br.layers:
        top = br.top_branch(L)[0]
        row = {"layer": L}
        for t, tok in enumerate(a.tokens):
            row[f"{t}:{tok}"] = branch_name(int(top[t]))[0].upper()
        rows.append(row)
    weights = table(a.layer_table(), left=())
    return (f"<h3>branch taken by the top path through each token's position (Q/K/V/S; -: no path)</h3>{table(rows)}"
            f"<h3>mean top-path weight per branch and fraction of tokens taking it</h3>{weights}")


def analysis_section(a, ident: str = "a0") -> str:
    desc = _e(a.description) if a.description else ""
    return (f"<p><b>score</b> {_fmt(a.score)} {desc}</p>{_token_strip(a, ident)}"
            f"<h3>per-token statistics</h3>{table(a.token_table(), left=('token',))}"
            f"{_branch_tables(a)}<h2>top paths</h2>{_paths_html(a)}")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style><script>{_JS}</script></head><body><h1>{_e(title)}</h1>{body}</body></html>")


def analysis_html(a, title: str = "semitriton analysis") -> str:
    meta = "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in a.meta.items())
    return _page(title, f"<ul class=muted>{meta}</ul>{analysis_section(a)}")


def image_tag(png: bytes, alt: str = "") -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'/>"


def report_html(title: str, sections: Sequence[tuple], analyses: Sequence = (), max_examples: int = 20,
                meta: Optional[dict] = None) -> str:
    """``sections``: [(heading, html)] shown first (summary tables, plots);
    then up to ``max_examples`` analyses in collapsible blocks."""
    body = ""
    if meta:
        body += "<ul class=muted>" + "".join(f"<li>{_e(k)}: {_e(v)}</li>" for k, v in meta.items()) + "</ul>"
    body += "".join(f"<h2>{_e(h)}</h2>{content}" for h, content in sections)
    if analyses:
        body += "<h2>examples</h2>"
        for i, a in enumerate(list(analyses)[:max_examples]):
            body += (f"<details{' open' if i == 0 else ''}><summary>{_e(a.description or i)}</summary>"
                     f"{analysis_section(a, f'a{i}')}</details>")
    return _page(title, body)
