"""``report.html``: one self-contained static page (inline CSS, JS and SVG; previews by relative link).

It opens from a file share or an e-mail attachment's folder: no server, nothing fetched from the
internet. Every value from the run is escaped; paths in links are percent-encoded. The gallery's
items travel as JSON in the page and are shown a page at a time with lazily loaded images.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable
from urllib.parse import quote

from .data import SCORE_BINS, ReportData
from .previews import prompt_colour

__all__ = ["render_page"]

GALLERY_PAGE = 24
_SECTIONS = (
    ("most", "Most detections"),
    ("failures", "Failures with an image"),
    ("sample", "A sample"),
)
_CONFIG_SHOWN = ("input", "output", "engine", "threshold", "mask_threshold", "max_detections", "dtype")

_CSS = (
    "body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1c1c1c;"
    "background:#f6f6f4}"
    "header{background:#23313f;color:#fff;padding:14px 24px}header h1{margin:0;font-size:20px}"
    "header p{margin:4px 0 0;color:#c9d3dc}nav{padding:8px 24px;background:#e9ecef}"
    "nav a{margin-right:16px}main{padding:8px 24px 40px;max-width:1280px}"
    "section{margin-top:20px}h2{font-size:17px;border-bottom:1px solid #ccc}"
    "table{border-collapse:collapse}"
    "td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #e1e1e1;vertical-align:top}"
    "td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}"
    ".bad{color:#a4161a;font-weight:600}.ok{color:#2b7a0b;font-weight:600}"
    ".cards{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}"
    ".sw{display:inline-block;width:10px;height:10px;margin-right:6px;border:1px solid #0003}"
    "details{margin:6px 0;background:#fff;padding:6px 10px;border:1px solid #ddd}"
    "summary{cursor:pointer}"
    "code,.path{font-family:ui-monospace,Consolas,monospace;font-size:12px}"
    "pre{white-space:pre-wrap;margin:4px 0;font-size:12px}"
    ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:10px}"
    "figure{margin:0;background:#fff;border:1px solid #ddd;padding:4px}"
    "figure img{width:100%;height:auto;display:block;background:#ddd;min-height:60px}"
    "figcaption{font-size:12px;overflow-wrap:anywhere}.pager{margin:8px 0}"
    ".pager button{margin-right:8px}svg text{font-size:11px;fill:#333}"
)

_JS = """
(function(){
  var data = JSON.parse(document.getElementById('gallery-data').textContent);
  var PAGE = PAGE_SIZE;
  document.querySelectorAll('.gallery').forEach(function(sec){
    var items = data[sec.dataset.section] || [];
    var grid = sec.querySelector('.grid'), info = sec.querySelector('.page-info');
    var prev = sec.querySelector('.prev'), next = sec.querySelector('.next');
    var pages = Math.max(1, Math.ceil(items.length / PAGE)), page = 0;
    function show(){
      grid.textContent = '';
      items.slice(page * PAGE, (page + 1) * PAGE).forEach(function(it){
        var fig = document.createElement('figure'), a = document.createElement('a');
        var img = document.createElement('img'), cap = document.createElement('figcaption');
        a.href = it.href; img.src = it.href; img.loading = 'lazy'; img.decoding = 'async'; img.alt = it.path;
        a.appendChild(img); fig.appendChild(a);
        var p = document.createElement('div'); p.className = 'path'; p.textContent = it.path;
        cap.appendChild(p); cap.appendChild(document.createTextNode(it.caption));
        fig.appendChild(cap); grid.appendChild(fig);
      });
      info.textContent = items.length
        ? 'page ' + (page + 1) + ' of ' + pages + ' (' + items.length + ' images)' : 'no previews';
      prev.disabled = page === 0; next.disabled = page >= pages - 1;
    }
    prev.addEventListener('click', function(){ if (page > 0) { page--; show(); } });
    next.addEventListener('click', function(){ if (page < pages - 1) { page++; show(); } });
    show();
  });
})();
""".replace("PAGE_SIZE", str(GALLERY_PAGE))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(value: int | float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if digits else f"{int(value):,}"


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _href(rel: str) -> str:
    return quote(rel, safe="/")


def _rows(pairs: Iterable[tuple[str, str, str]]) -> str:
    """Table rows (label, html value, element id)."""
    return "".join(f'<tr><th>{_e(k)}</th><td id="{_e(i)}">{v}</td></tr>' for k, v, i in pairs)


def _summary(d: ReportData) -> str:
    session = d.session
    code = session.exit_code if session else None
    code_html = "-" if code is None else f'<span class="{"ok" if code == 0 else "bad"}">{code}</span>'
    prompts = ", ".join(_e(p.prompt) for p in d.prompts) or "-"
    run = [
        ("exit code (latest session)", code_html, "exit-code"),
        ("started", _e(_when(session.started if session else d.first_started)), "started"),
        ("ended", _e(_when(session.ended if session else d.last_finished)), "ended"),
        ("wall time", _e(session.elapsed if session and session.elapsed else "-"), "wall-time"),
        ("images per second of wall time", _e(_n(d.images_per_s, 2)), "images-per-s"),
        ("device", _e("; ".join(d.devices) or "-"), "device"),
        ("model", _e(d.model_id), "model"),
        ("prompts", prompts, "prompts"),
    ]
    run += [(k.replace("_", " "), _e(d.config.get(k, "-")), f"config-{k}") for k in _CONFIG_SHOWN]
    run += [("run id", _e(d.run_id), "run-id"), ("batchseg", _e(d.version), "version")]
    shown = [(s, n) for s, n in d.counts.items() if n or s in ("ok", "error", "timeout", "crashed")]
    counts = "".join(
        f'<tr><th>{_e(s)}</th><td class="n" id="count-{_e(s)}">{_n(n)}</td></tr>' for s, n in shown
    )
    counts += f'<tr><th>images</th><td class="n" id="total-images">{_n(d.total)}</td></tr>'
    counts += f'<tr><th>detections</th><td class="n" id="total-detections">{_n(d.detections)}</td></tr>'
    return (
        '<section id="summary"><h2>Summary</h2><div class="cards">'
        f"<table>{_rows(run)}</table><table><tr><th>status</th><th class=n>images</th></tr>{counts}</table>"
        "</div></section>"
    )


def _failures(d: ReportData) -> str:
    if not d.failures:
        return '<section id="failures"><h2>Failures</h2><p class="ok">No image failed.</p></section>'
    parts = [
        f'<section id="failures"><h2>Failures: <span id="failure-total">{_n(d.failure_total)}</span></h2>'
    ]
    for g in d.failures:
        messages = "".join(
            f"<pre>{_e(m) or '(no message)'}</pre><small>{_n(c)} image(s)</small>" for m, c in g.messages
        )
        paths = "".join(f'<li class="path">{_e(p)}</li>' for p in g.paths)
        more = g.count - len(g.paths)
        tail = f"<p>and {_n(more)} more: see manifest/images.parquet</p>" if more > 0 else ""
        kind = _e(g.error_type or "(no type)")
        parts.append(
            f'<details open class="failure-group" data-status="{_e(g.status)}" data-type="{kind}"'
            f' data-count="{g.count}"><summary><b>{_e(g.status)}</b> {kind}: {_n(g.count)}'
            f"</summary>{messages}<ul>{paths}</ul>{tail}</details>"
        )
    return "".join(parts) + "</section>"


def _score_svg(d: ReportData) -> str:
    width, height, pad = 640, 180, 28
    totals = [sum(p.score_hist[b] for p in d.prompts) for b in range(SCORE_BINS)]
    top = max(totals + [1])
    bar = (width - 2 * pad) / SCORE_BINS
    parts = [f'<svg id="score-histogram" width="{width}" height="{height}" role="img" aria-label="scores">']
    for b in range(SCORE_BINS):
        y = float(height - pad)
        for k, p in enumerate(d.prompts):
            count = p.score_hist[b]
            if not count:
                continue
            h = count / top * (height - 2 * pad)
            y -= h
            colour = _hex(prompt_colour(k, len(d.prompts)))
            lo, hi = b / SCORE_BINS, (b + 1) / SCORE_BINS
            parts.append(
                f'<rect x="{pad + b * bar:.1f}" y="{y:.1f}" width="{bar - 1:.1f}" height="{h:.1f}"'
                f' fill="{colour}">'
                f"<title>{_e(p.prompt)}: {count:,} with score {lo:.2f}-{hi:.2f}</title></rect>"
            )
    axis = height - pad
    parts.append(f'<line x1="{pad}" y1="{axis}" x2="{width - pad}" y2="{axis}" stroke="#333"/>')
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = pad + tick * (width - 2 * pad)
        parts.append(f'<text x="{x:.1f}" y="{axis + 14}" text-anchor="middle">{tick:g}</text>')
    parts.append(f'<text x="{pad}" y="{pad - 8}">{top:,} detections (tallest bar)</text></svg>')
    return "".join(parts)


def _count_svg(d: ReportData) -> str:
    width, height, pad = 640, 150, 28
    top = max([n for _, n in d.count_hist] + [1])
    bar = (width - 2 * pad) / len(d.count_hist)
    parts = [
        f'<svg id="count-histogram" width="{width}" height="{height}" role="img" aria-label="per image">'
    ]
    for k, (label, n) in enumerate(d.count_hist):
        h = n / top * (height - 2 * pad)
        x = pad + k * bar
        parts.append(
            f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{bar - 4:.1f}" height="{h:.1f}"'
            ' fill="#4a6fa5">'
            f"<title>{n:,} images with {label} detections</title></rect>"
            f'<text x="{x + bar / 2:.1f}" y="{height - pad + 14}" text-anchor="middle">{_e(label)}</text>'
            f'<text x="{x + bar / 2:.1f}" y="{height - pad - h - 3:.1f}" text-anchor="middle">{n:,}</text>'
        )
    return "".join(parts) + "</svg>"


def _detections(d: ReportData) -> str:
    rows = []
    for k, p in enumerate(d.prompts):
        colour = _hex(prompt_colour(k, len(d.prompts)))
        rows.append(
            f'<tr class="prompt-row" data-prompt="{_e(p.prompt)}">'
            f'<th><span class="sw" style="background:{colour}">'
            f'</span>{_e(p.prompt)}</th><td class="n det-count">{_n(p.detections)}</td>'
            f'<td class="n det-images">{_n(p.images)}</td><td class="n">{_n(p.mean_score, 3)}</td></tr>'
        )
    table = (
        "<table><tr><th>prompt</th><th class=n>detections</th><th class=n>images with one</th>"
        f"<th class=n>mean score</th></tr>{''.join(rows)}</table>"
    )
    if d.classes:
        table += (
            "<h3>Detections per class</h3><table><tr><th>class</th><th class=n>detections</th>"
            "<th class=n>images with one</th></tr>"
            + "".join(
                f'<tr class="class-row"><th>{_e(name)}</th><td class="n">{_n(count)}</td>'
                f'<td class="n">{_n(images)}</td></tr>'
                for name, count, images in d.classes
            )
            + "</table>"
        )
    return (
        f'<section id="detections"><h2>Detections per prompt</h2>{table}'
        f"<h3>Scores</h3>{_score_svg(d)}<h3>Detections per image (ok images)</h3>{_count_svg(d)}</section>"
    )


def _gallery(d: ReportData) -> str:
    parts = ['<section id="gallery"><h2>Previews</h2>']
    for key, title in _SECTIONS:
        parts.append(
            f'<div class="gallery" data-section="{key}" id="gallery-{key}"><h3>{_e(title)}</h3>'
            '<div class="pager"><button class="prev" type="button">previous</button>'
            '<button class="next" type="button">next</button><span class="page-info"></span></div>'
            '<div class="grid"></div></div>'
        )
    parts.append(
        "<noscript>The gallery needs JavaScript; the previews are in previews/.</noscript></section>"
    )
    return "".join(parts)


def _gallery_json(d: ReportData) -> str:
    data = {
        key: [{"path": it.path, "href": _href(it.preview), "caption": it.caption} for it in items]
        for key, items in d.gallery.items()
    }
    # Inside a script element "</script" or "<!--" would change how the page parses: no < > & at all.
    text = json.dumps(data, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _files(d: ReportData) -> str:
    links = [
        ("manifest/images.parquet", "one row per image"),
        ("manifest/detections.parquet", "one row per detection"),
    ]
    links += [(log, "run log" + (" (latest)" if i == 0 else "")) for i, log in enumerate(d.logs)]
    items = "".join(f'<li><a href="{_href(rel)}">{_e(rel)}</a> {_e(what)}</li>' for rel, what in links)
    return f'<section id="files"><h2>Files</h2><ul>{items}</ul></section>'


def render_page(d: ReportData) -> str:
    """The whole report as one HTML string."""
    name = d.output_dir.name
    body = "".join([_summary(d), _failures(d), _detections(d), _gallery(d), _files(d)])
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>batchseg report: {_e(name)}</title><style>{_CSS}</style></head><body>"
        f"<header><h1>batchseg report: {_e(name)}</h1><p>run {_e(d.run_id)}; written "
        f"{_e(_when(time.time()))}</p></header>"
        '<nav><a href="#summary">Summary</a><a href="#failures">Failures</a>'
        '<a href="#detections">Detections</a>'
        '<a href="#gallery">Previews</a><a href="#files">Files</a></nav>'
        f"<main>{body}</main>"
        f'<script type="application/json" id="gallery-data">{_gallery_json(d)}</script>'
        f"<script>{_JS}</script></body></html>"
    )
