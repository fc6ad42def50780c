"""A curation job's contact sheet: one self-contained HTML page of thumbnails in order (rank, key, top-3 with
scores, given label, the job's note), built as `bulklabel report`'s page is: no script, no external resource, a CSP
forbidding both, every string from the data escaped (jobs.output.report_page)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from jobs.output.report import Thumbnail
from jobs.output.report_page import CSP, STYLE, escape, picture

_SHEET_STYLE = """
figure.item { width: 180px; } .rank { font-weight: 600; } .given { color: #555; }
.disagree { color: #a33; font-weight: 600; }
"""


@dataclass(frozen=True)
class SheetItem:
    thumb: Thumbnail  # its JPEG, or why there is none
    rank: int
    top: tuple[tuple[str, float], ...]  # the model's top classes with scores, best first
    given: str | None = None  # the input's own label
    note: str = ""  # what put it here ("margin 0.931", "suggested: healthy")


def contact_sheet(title: str, facts: Mapping[str, object], items: Sequence[SheetItem]) -> str:
    """The page as a string."""
    rows = "".join(f"<tr><td>{escape(k)}</td><td><code>{escape(v)}</code></td></tr>" for k, v in facts.items())
    grid = "".join(_figure(item) for item in items) or "<p class='muted'>Nothing to show.</p>"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
        f"<title>{escape(title)}</title><style>{STYLE}{_SHEET_STYLE}</style></head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n<table class='facts'>{rows}</table>\n"
        f"<section id='items'><div class='grid'>{grid}</div></section>\n</body></html>\n"
    )


def _figure(item: SheetItem) -> str:
    thumb = item.thumb
    top = "<br>".join(f"{escape(label)} {score:.3f}" for label, score in item.top)
    given = ""
    if item.given is not None:
        differs = bool(item.top) and item.top[0][0] != item.given
        given = f"<br><span class='{'disagree' if differs else 'given'}'>given: {escape(item.given)}</span>"
    note = f"<br><span class='muted'>{escape(item.note)}</span>" if item.note else ""
    return (f"<figure class='item' data-rank='{item.rank}'>{picture(thumb)}<figcaption><span class='rank'>#{item.rank}"
            f"</span> <code>{escape(thumb.key)}</code><br>{top}{given}{note}</figcaption></figure>")  # fmt: skip
