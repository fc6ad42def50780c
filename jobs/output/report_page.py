"""The report page: ReportData → one self-contained HTML file (inline CSS, inline SVG charts, data-URI thumbnails).

No script, no external resource, and a Content-Security-Policy that forbids both, so the page works offline, from
a file or a mail attachment. Every string from the output (keys, labels, error messages, shard ids, URIs) is
untrusted: an image may be named `<img onerror=...>.jpg`. All of it goes through `_t` (HTML-escaped, quotes
included, so attributes are safe too); the CSP is a second fence, not the first.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from jobs.output.reader import read_pinned
from jobs.output.report import SCORE_BINS, SLOWEST_SHARDS, ReportData, ShardTiming, Thumbnail, gather
from schemas.specs import StorageOptions

log = logging.getLogger(__name__)

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_BAR = "#3b6ea5"
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: left;
  vertical-align: top; } th { background: #f5f5f5; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.facts td:first-child { color: #666; } .muted { color: #777; } code { overflow-wrap: anywhere; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; } figure { margin: 0; width: 170px; }
figure img { width: 160px; height: 160px; object-fit: contain; background: #f3f3f3; display: block; }
figcaption { font-size: 12px; overflow-wrap: anywhere; } .missing { width: 160px; height: 160px; background: #fee;
  font-size: 11px; overflow: hidden; overflow-wrap: anywhere; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
"""


def escape(value: object) -> str:
    """Untrusted text, escaped for HTML content and attribute values alike."""
    return html.escape(str(value), quote=True)


def write_report(uri: str, out: Path, options: StorageOptions | None = None) -> ReportData:
    """Gather the report of the output at `uri` and write it to `out` as one HTML page; returns what it shows."""
    data = read_pinned(uri, options, lambda output: gather(output, options))  # one manifest generation
    out.write_text(render(data), encoding="utf-8")
    log.info("report of %s (%d rows, %d thumbnails) written to %s", data.uri, data.rows,
             sum(len(t) for t in data.thumbnails.values()), out)  # fmt: skip
    return data


def render(data: ReportData) -> str:
    """The whole page as a string."""
    sections = [
        _summary(data),
        _section("labels", "Label distribution", _label_chart(data)),
        _section("confidence", "Confidence (top-1 score)", _histogram(data.score_bins)),
        _section("throughput", "Throughput over time", _throughput(data.timings)),
        _section("errors", "Errors by kind", _errors(data)),
        _section("slowest", f"Slowest shards (of {len(data.timings)})", _slowest(data.timings)),
        _section("uncertain", "Least-confident images of the top labels", _thumbnail_grid(data.thumbnails)),
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        f"<title>bulklabel report: {escape(data.job_id)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )


def _section(ident: str, title: str, body: str) -> str:
    return f"<section id='{ident}'><h2>{escape(title)}</h2>\n{body}\n</section>"


def _summary(data: ReportData) -> str:
    labelled = data.rows - data.errors
    facts = [
        ("output", f"<code>{escape(data.uri)}</code>"),
        ("job", f"<code>{escape(data.job_id)}</code>"),
        ("model", escape(data.model)),
        ("status", escape(data.status) + ("" if data.complete else " (no manifest: the shards committed so far)")),
        ("images", f"<span id='rows'>{data.rows}</span>"),
        ("labelled", f"<span id='labelled'>{labelled}</span>"),
        ("errors", f"<span id='error-rows'>{data.errors}</span>" + _percent(data.errors, data.rows)),
        ("shards", f"<span id='shards'>{data.shards}</span>"
         + (f", <b>{len(data.failed_shards)} failed</b>" if data.failed_shards else "")),
    ]  # fmt: skip
    rows = "".join(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in facts)
    failed = ""
    if data.failed_shards:
        items = "".join(f"<li><code>{escape(s)}</code>: {escape(e)}</li>" for s, e in data.failed_shards)
        failed = f"<h2>Failed shards</h2><ul id='failed'>{items}</ul>"
    generated = data.generated_at.strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"<header><h1>Label job report</h1><p class='muted'>generated {generated}</p>"
        f"<table class='facts'>{rows}</table>{failed}</header>"
    )


def _percent(part: int, whole: int) -> str:
    return f" ({100 * part / whole:.1f} %)" if whole else ""


# ----------------------------------------------------------------------------------------------- charts (SVG)


def _label_chart(data: ReportData) -> str:
    """Horizontal bars, one per listed label, the count at the end of each."""
    if not data.labels:
        return "<p class='muted'>No labelled images.</p>"
    top = max(n for _, n in data.labels)
    row, left, width = 20, 230, 520
    parts = []
    for i, (label, n) in enumerate(data.labels):
        y, w = i * row, max(1.0, width * n / top)
        parts.append(
            f"<g class='label-bar' data-label='{escape(label)}' data-count='{n}'>"
            f"<text x='{left - 6}' y='{y + 14}' text-anchor='end'>{escape(_short(label, 34))}</text>"
            f"<rect x='{left}' y='{y + 3}' width='{w:.1f}' height='{row - 6}' fill='{_BAR}'/>"
            f"<text x='{left + w + 4:.1f}' y='{y + 14}'>{n}</text></g>"
        )
    svg = _svg(left + width + 60, row * len(data.labels), parts)
    distinct, rows = data.other_labels
    other = f"<p class='muted'>and {distinct} more label(s) on {rows} image(s)</p>" if distinct else ""
    return svg + other


def _histogram(bins: Sequence[int]) -> str:
    if not sum(bins):
        return "<p class='muted'>No labelled images.</p>"
    height, bar, left, bottom = 180, 32, 40, 30
    top = max(bins)
    parts = [f"<text x='{left - 6}' y='14' text-anchor='end'>{top}</text>",
             f"<text x='{left - 6}' y='{height}' text-anchor='end'>0</text>"]  # fmt: skip
    for i, n in enumerate(bins):
        h = height * n / top
        x = left + i * bar
        lo, hi = i / SCORE_BINS, (i + 1) / SCORE_BINS
        parts.append(
            f"<rect class='score-bin' data-count='{n}' x='{x + 2}' y='{height - h:.1f}' width='{bar - 4}' "
            f"height='{h:.1f}' fill='{_BAR}'><title>{lo:.2f}-{hi:.2f}: {n}</title></rect>"
        )
        if i % 4 == 0:
            parts.append(f"<text x='{x}' y='{height + 16}'>{lo:.1f}</text>")
    parts.append(f"<text x='{left + SCORE_BINS * bar}' y='{height + 16}' text-anchor='end'>1.0</text>")
    return _svg(left + SCORE_BINS * bar + 10, height + bottom, parts)


def _throughput(timings: Sequence[ShardTiming]) -> str:
    """Images committed over time: a cumulative line from the first shard's start (its commit minus its seconds)."""
    timed = [t for t in timings if t.committed_at is not None]
    if not timed:
        return "<p class='muted'>No done-marker carries a commit time.</p>"
    start = min(t.committed_at.timestamp() - t.seconds for t in timed)
    points, total = [(0.0, 0)], 0
    for t in timed:
        total += t.rows
        points.append((t.committed_at.timestamp() - start, total))
    span = max(points[-1][0], 1e-3)
    width, height, left, top = 700, 180, 50, 8
    xy = " ".join(f"{left + width * s / span:.1f},{top + height - height * n / total:.1f}" for s, n in points)
    svg = _svg(left + width + 20, top + height + 30, [
        f"<polyline id='cumulative' fill='none' stroke='{_BAR}' stroke-width='2' points='{xy}'/>",
        f"<text x='{left - 6}' y='{top + 4}' text-anchor='end'>{total}</text>",
        f"<text x='{left - 6}' y='{top + height}' text-anchor='end'>0</text>",
        f"<text x='{left}' y='{top + height + 18}'>0 s</text>",
        f"<text x='{left + width}' y='{top + height + 18}' text-anchor='end'>{span:.1f} s</text>",
    ])  # fmt: skip
    first = datetime.fromtimestamp(start).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    busy = sum(t.seconds for t in timed)
    return (
        f"{svg}<p>{total} images in {len(timed)} shards over {span:.1f} s from {first}: "
        f"<b>{total / span:.1f} images/s</b> overall, {total / busy if busy else 0:.1f} images/s per worker-second "
        f"inside shards.</p>"
    )


def _svg(width: float, height: float, parts: Iterable[str]) -> str:
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' height='{height:.0f}' "
        f"viewBox='0 0 {width:.0f} {height:.0f}'>{''.join(parts)}</svg>"
    )


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------------- tables


def _errors(data: ReportData) -> str:
    if not data.error_kinds:
        return "<p class='muted'>No error rows.</p>"
    rows = []
    for kind in data.error_kinds:
        examples = "".join(
            f"<li><code>{escape(key)}</code>: {escape(_short(message, 300))}</li>" for key, message in kind.examples
        )
        rows.append(
            f"<tr class='error-kind' data-kind='{escape(kind.kind)}' data-count='{kind.rows}'><td>"
            f"<b>{escape(kind.kind)}</b>"
            f"</td><td class='n'>{kind.rows}</td><td><ul>{examples}</ul></td></tr>"
        )
    return f"<table><tr><th>kind</th><th>rows</th><th>examples</th></tr>{''.join(rows)}</table>"


def _slowest(timings: Sequence[ShardTiming]) -> str:
    if not timings:
        return "<p class='muted'>No done-markers.</p>"
    slow = sorted(timings, key=lambda t: (-t.seconds, t.shard))[:SLOWEST_SHARDS]
    rows = "".join(
        f"<tr class='slow-shard'><td><code>{escape(t.shard)}</code></td><td class='n'>{t.seconds:.2f}</td>"
        f"<td class='n'>{t.rows}</td><td class='n'>{t.rows / t.seconds if t.seconds else 0:.1f}</td>"
        f"<td class='n'>{t.errors}</td><td class='n'>{t.attempt}</td><td class='n'>{t.bytes_read / 1e6:.1f}</td>"
        f"<td>{t.committed_at.strftime('%H:%M:%S') if t.committed_at else '-'}</td></tr>"
        for t in slow
    )
    head = "".join(
        f"<th>{h}</th>" for h in ("shard", "seconds", "rows", "rows/s", "errors", "attempt", "MB read", "committed")
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def _thumbnail_grid(thumbnails: dict[str, tuple[Thumbnail, ...]]) -> str:
    if not thumbnails:
        return "<p class='muted'>No labelled images.</p>"
    blocks = []
    for label, thumbs in thumbnails.items():
        figures = "".join(_figure(t) for t in thumbs)
        blocks.append(f"<h3 data-label='{escape(label)}'>{escape(label)}</h3><div class='grid'>{figures}</div>")
    return "\n".join(blocks)


def picture(thumb: Thumbnail) -> str:
    """The thumbnail as a data-URI image, or a box saying why there is none; keyed by `data-key`."""
    if thumb.jpeg is not None:
        src = "data:image/jpeg;base64," + base64.b64encode(thumb.jpeg).decode("ascii")
        return f"<img class='thumb' alt='{escape(thumb.key)}' data-key='{escape(thumb.key)}' src='{src}'>"
    return f"<div class='missing' data-key='{escape(thumb.key)}'>no thumbnail: {escape(thumb.problem)}</div>"


def _figure(thumb: Thumbnail) -> str:
    others = ", ".join(f"{escape(label)} {score:.2f}" for label, score in thumb.runners_up)
    return (
        f"<figure>{picture(thumb)}<figcaption><code>{escape(thumb.key)}</code><br>{thumb.score:.3f}"
        f"{f' · then {others}' if others else ''}</figcaption></figure>"
    )
