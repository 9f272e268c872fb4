"""scores.csv, scores.json and report.html: one static page beside its images (no server, no network).

Per row (a prompt and seed) the groups stand side by side; a click or drag on any thumbnail, or a drag in any
zoom window, moves every column's 100 % crop to the same place (the same fraction of each image, so a 2048²
and a 4096² column show the same spot at their own pixels). The metric table sorts by any column.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from pathlib import Path
from urllib.parse import quote

from urae.eval.scoring import Scores
from urae.io import atomic_path


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"


def _write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_csv(scores: Scores, path: Path) -> None:
    cols = [c["column"] for c in scores.columns() if c["per_image"]]
    set_cols = [c["column"] for c in scores.columns() if not c["per_image"]]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["group", "row", "file", "prompt", "seed", *cols])
    for it in scores.items:
        vals = scores.per_image.get((it.group, it.key), {})
        w.writerow([it.group, it.key, str(it.path), it.prompt or "", it.info.get("seed", ""),
                    *[vals.get(c, "") for c in cols]])
    if set_cols:  # the set distances belong to a whole group: one summary line per group
        w.writerow([])
        w.writerow(["group", "images", *cols, *set_cols])
        for g in scores.groups:
            vals = scores.per_group.get(g, {})
            w.writerow([g, vals.get("images", ""), *[vals.get(c, "") for c in cols + set_cols]])
    _write(path, buf.getvalue())


def write_json(scores: Scores, path: Path, extra: dict | None = None) -> None:
    _write(path, json.dumps({**scores.to_json(), **(extra or {})}, indent=1, ensure_ascii=False) + "\n")


def _src(path: Path, out_dir: Path) -> str:
    return quote(Path(os.path.relpath(Path(path).resolve(), out_dir.resolve())).as_posix())


def _curve_svg(column: str, points: list[tuple[int, float]], lower_is_better: bool) -> str:
    pts = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    if not pts:
        return ""
    w, h, pad = 320, 150, 34
    s0, s1 = min(s for s, _ in pts), max(s for s, _ in pts)
    v0, v1 = min(v for _, v in pts), max(v for _, v in pts)
    if v1 == v0:
        v0, v1 = v0 - 1, v1 + 1
    sx = (w - 2 * pad) / max(s1 - s0, 1)
    sy = (h - 2 * pad) / (v1 - v0)
    xy = [(pad + (s - s0) * sx, h - pad - (v - v0) * sy) for s, v in pts]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5"><title>step {s}: {_fmt(v)}</title></circle>'
                   for (x, y), (s, v) in zip(xy, pts))
    better = "lower is better" if lower_is_better else "higher is better"
    return (f'<figure class="curve" data-column="{html.escape(column)}"><svg width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}"><rect x="{pad}" y="{pad}" width="{w - 2 * pad}" height="{h - 2 * pad}" '
            f'class="frame"/><polyline points="{line}"/>{dots}'
            f'<text x="{pad}" y="{h - 8}">step {s0}</text><text x="{w - pad}" y="{h - 8}" text-anchor="end">'
            f'step {s1}</text><text x="4" y="{pad - 6}">{v1:.6g}</text><text x="4" y="{h - pad + 12}">'
            f'{v0:.6g}</text></svg><figcaption>{html.escape(column)} ({better})</figcaption></figure>')


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}h3{font-size:14px;margin:16px 0 6px}
.note{color:#666;margin:0 0 8px}.scroll{overflow-x:auto}
table.metrics{border-collapse:collapse;background:#fff}
table.metrics th,table.metrics td{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
table.metrics th{cursor:pointer;background:#f0f0f0;user-select:none}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
table.metrics td.best{font-weight:700;background:#e9f6e9}
th[data-dir=asc]::after{content:" ▲"}th[data-dir=desc]::after{content:" ▼"}
.curves{display:flex;flex-wrap:wrap;gap:12px}
.curve{margin:0;background:#fff;border:1px solid #ddd;padding:4px}
.curve svg text{font-size:10px;fill:#555}.curve polyline{fill:none;stroke:#2563eb;stroke-width:1.5}
.curve circle{fill:#2563eb}.curve .frame{fill:none;stroke:#ccc}
.cells{display:flex;gap:12px;overflow-x:auto;padding-bottom:6px}
.cell{flex:0 0 auto;width:ZOOMpx;background:#fff;border:1px solid #ddd;padding:6px}
.cell .name{font-weight:600;margin-bottom:4px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.thumbwrap{position:relative;line-height:0;cursor:crosshair}
.thumb{width:100%;height:auto;display:block;touch-action:none;user-select:none}
.mark{position:absolute;border:2px solid #f43f5e;box-sizing:border-box;pointer-events:none}
.zoom{position:relative;width:ZOOMpx;height:ZOOMpx;overflow:hidden;margin-top:6px;background:#eee;cursor:grab;
touch-action:none}
.zoom img{position:absolute;left:0;top:0;max-width:none;image-rendering:pixelated;user-select:none}
.cell table{font-size:12px;margin-top:4px;width:100%}.cell td:last-child{text-align:right}
details{font-size:12px}pre{white-space:pre-wrap;margin:2px 0}
"""

_JS = r"""
(function () {
  'use strict';
  var state = {u: 0.5, v: 0.5};
  var cells = Array.prototype.slice.call(document.querySelectorAll('.cell'));
  function clamp(x, lo, hi) { return Math.min(Math.max(x, lo), hi); }
  function place(cell) {
    var img = cell.querySelector('.zoom img'), box = cell.querySelector('.zoom');
    var thumb = cell.querySelector('.thumb'), mark = cell.querySelector('.mark');
    if (!img.naturalWidth) return;
    var s = 1 / (window.devicePixelRatio || 1);  // one image pixel on one screen pixel
    var w = img.naturalWidth * s, h = img.naturalHeight * s, bw = box.clientWidth, bh = box.clientHeight;
    img.style.width = w + 'px'; img.style.height = h + 'px';
    var x = clamp(state.u * w - bw / 2, 0, Math.max(w - bw, 0));
    var y = clamp(state.v * h - bh / 2, 0, Math.max(h - bh, 0));
    img.style.left = (-x) + 'px'; img.style.top = (-y) + 'px';
    cell.dataset.cropX = Math.round(x / s); cell.dataset.cropY = Math.round(y / s);
    var k = thumb.clientWidth / w;
    mark.style.left = (x * k) + 'px'; mark.style.top = (y * k) + 'px';
    mark.style.width = Math.min(bw, w) * k + 'px'; mark.style.height = Math.min(bh, h) * k + 'px';
  }
  function apply() { cells.forEach(place); }
  window.zoomTo = function (u, v) { state.u = clamp(u, 0, 1); state.v = clamp(v, 0, 1); apply(); };
  cells.forEach(function (cell) {
    var thumb = cell.querySelector('.thumb'), box = cell.querySelector('.zoom'), img = box.querySelector('img');
    img.addEventListener('load', function () { place(cell); });
    thumb.addEventListener('load', function () { place(cell); });
    function fromThumb(e) {
      var r = thumb.getBoundingClientRect();
      window.zoomTo((e.clientX - r.left) / r.width, (e.clientY - r.top) / r.height);
    }
    thumb.addEventListener('pointerdown', function (e) {
      e.preventDefault(); thumb.setPointerCapture(e.pointerId); fromThumb(e);
    });
    thumb.addEventListener('pointermove', function (e) { if (e.buttons & 1) fromThumb(e); });
    var drag = null;
    box.addEventListener('pointerdown', function (e) {
      e.preventDefault(); box.setPointerCapture(e.pointerId);
      drag = {x: e.clientX, y: e.clientY, u: state.u, v: state.v};
    });
    box.addEventListener('pointermove', function (e) {
      if (!drag || !(e.buttons & 1)) return;
      var w = img.getBoundingClientRect().width, h = img.getBoundingClientRect().height;
      window.zoomTo(drag.u - (e.clientX - drag.x) / w, drag.v - (e.clientY - drag.y) / h);
    });
    box.addEventListener('pointerup', function () { drag = null; });
  });
  window.addEventListener('resize', apply);
  apply();
  Array.prototype.forEach.call(document.querySelectorAll('table.metrics'), function (table) {
    var heads = table.querySelectorAll('th');
    Array.prototype.forEach.call(heads, function (th, col) {
      th.addEventListener('click', function () {
        var dir = th.dataset.dir === 'asc' ? 'desc' : 'asc';
        Array.prototype.forEach.call(heads, function (h) { delete h.dataset.dir; });
        th.dataset.dir = dir;
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[col].dataset.value, y = b.cells[col].dataset.value;
          var nx = parseFloat(x), ny = parseFloat(y), c;
          if (isNaN(nx) || isNaN(ny)) c = String(x).localeCompare(String(y)); else c = nx - ny;
          return dir === 'asc' ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
"""


def _metric_table(scores: Scores) -> str:
    cols = [c for c in scores.columns()]
    head = "<th>group</th><th>images</th>" + "".join(
        f'<th title="{html.escape(c["metric"])}: {html.escape(c["model"] or "no weights")}; '
        f'{"lower" if c["lower_is_better"] else "higher"} is better">{html.escape(c["column"])} '
        f'{"↓" if c["lower_is_better"] else "↑"}</th>' for c in cols)
    best = {}
    for c in cols:
        vals = [scores.per_group[g].get(c["column"]) for g in scores.groups]
        vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        if len(vals) > 1:
            best[c["column"]] = min(vals) if c["lower_is_better"] else max(vals)
    body = []
    for g in scores.groups:
        vals = scores.per_group.get(g, {})
        tds = [f'<td data-value="{html.escape(g)}">{html.escape(g)}</td>',
               f'<td data-value="{vals.get("images", 0)}">{vals.get("images", 0)}</td>']
        for c in cols:
            v = vals.get(c["column"])
            num = v if isinstance(v, (int, float)) and math.isfinite(v) else ""
            cls = ' class="best"' if num != "" and best.get(c["column"]) == v else ""
            tds.append(f'<td data-value="{num}"{cls}>{_fmt(v)}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return (f'<div class="scroll"><table class="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}'
            f'</tbody></table></div>')


def _cell(scores: Scores, it, out_dir: Path) -> str:
    src = _src(it.path, out_dir)
    vals = scores.per_image.get((it.group, it.key), {})
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in vals.items())
    name = html.escape(it.group)
    return (f'<div class="cell" data-group="{name}"><div class="name" title="{name}">{name}</div>'
            f'<div class="thumbwrap"><img class="thumb" src="{src}" alt="{name}" draggable="false">'
            f'<div class="mark"></div></div><div class="zoom"><img src="{src}" alt="{name} at 100%" '
            f'draggable="false"></div><table>{rows}</table></div>')


def write_html(scores: Scores, path: Path, title: str, note: str = "", curves: dict | None = None,
               zoom: int = 320) -> None:
    out_dir = path.parent
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if note:
        parts.append(f'<p class="note">{html.escape(note)}</p>')
    if curves:
        lower = {c["column"]: c["lower_is_better"] for c in scores.columns()}
        figs = "".join(_curve_svg(col, pts, lower.get(col, False)) for col, pts in curves.items())
        parts.append(f'<h2>Validation over training</h2><div class="curves">{figs}</div>')
    parts.append('<h2>Metrics <span class="note">(click a column to sort; mean over each group\'s images; '
                 '@tiles: native-resolution tiles)</span></h2>')
    parts.append(_metric_table(scores))
    settings = "".join(
        f'<details><summary>{html.escape(g)}</summary><pre>{html.escape(json.dumps(scores.settings[g], indent=1))}'
        f'</pre></details>' for g in scores.groups if scores.settings.get(g))
    if settings:
        parts.append(f"<h2>Settings per column</h2>{settings}")
    parts.append('<h2>Images <span class="note">(click or drag a thumbnail, or drag a 100 % view: every column '
                 'follows)</span></h2>')
    by_row: dict[str, dict[str, object]] = {}
    for it in scores.items:
        by_row.setdefault(it.key, {})[it.group] = it
    for key in scores.rows():
        cells = "".join(_cell(scores, by_row[key][g], out_dir) for g in scores.groups if g in by_row[key])
        parts.append(f'<section class="row"><h3>{html.escape(key)}</h3><div class="cells">{cells}</div></section>')
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width"><link rel="icon" href="data:,">'
            f'<style>{_CSS.replace("ZOOM", str(zoom))}</style></head><body>{"".join(parts)}'
            f'<script>{_JS}</script></body></html>\n')
    _write(path, page)


def write_all(scores: Scores, out_dir: Path, title: str, note: str = "", curves: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(scores, out_dir / "scores.csv")
    write_json(scores, out_dir / "scores.json", {"curves": curves} if curves else None)
    write_html(scores, out_dir / "report.html", title, note, curves)
    return out_dir / "report.html"
