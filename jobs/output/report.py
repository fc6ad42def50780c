"""`bulklabel report OUTPUT --out report.html`: what a label output holds, as one self-contained page.

The figures come from the committed rows (DuckDB over the `labels` view of jobs.output.query: only what
jobs.output.reader calls committed) and from the shards' done-markers (timings, attempts, commit times); the
thumbnails from the input itself, read back by each row's `source`: the image file of a loose-file row, or the shard
(tar, plain or gzip, or Parquet) whose record has the row's key, read by the label job's own reader
(workers.io.readers.read_source, with the job's input layout: tar members streamed, never extracted), so every format
the job reads has thumbnails and its keys match. Rendering and writing are jobs.output.report_page's; this module
only gathers typed figures. Driver-side: no torch, no Ray.
"""

from __future__ import annotations

import io
import logging
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import duckdb
from PIL import Image, ImageOps
from pydantic import ValidationError

from jobs.output.markers import read_committed
from jobs.output.query import VIEW, connect
from jobs.output.reader import LabelOutput
from schemas.specs import InputSpec, StorageOptions
from workers.io.readers import StorageByScheme, read_source
from workers.io.rowkeys import shard_kind
from workers.io.storage import StorageError, open_storage

log = logging.getLogger(__name__)

SCORE_BINS = 20  # confidence histogram: 0.05-wide bins of the top-1 score
TOP_LABELS_LISTED = 25  # label distribution: the commonest labels, the rest summed as "other"
THUMB_LABELS = 6  # thumbnails for the commonest labels ...
THUMBS_PER_LABEL = 6  # ... of their least-confident images
THUMB_SIDE = 160
ERROR_EXAMPLES = 3
SLOWEST_SHARDS = 10
_READ_THREADS = 8
# A thumbnail source larger than this is not read back (the job's own max_object_bytes bounds it too).
MAX_THUMB_SOURCE_BYTES = 64 << 20


@dataclass(frozen=True)
class ShardTiming:
    """One committed shard, from its done-marker."""

    shard: str
    rows: int
    errors: int
    seconds: float
    attempt: int
    bytes_read: int
    committed_at: datetime | None


@dataclass(frozen=True)
class ErrorRows:
    """Error rows of one kind (their `error_kind`, a schemas.output.ErrorKind), with a few (key, message) examples."""

    kind: str
    rows: int
    examples: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Thumbnail:
    """A least-confident image of a top label: its JPEG thumbnail, or why there is none."""

    key: str
    source: str
    label: str
    score: float
    runners_up: tuple[tuple[str, float], ...]
    jpeg: bytes | None = None
    problem: str | None = None


@dataclass(frozen=True)
class ReportData:
    """Everything the page shows, gathered from the output (rendered by jobs.output.report_page)."""

    uri: str
    job_id: str
    complete: bool
    status: str  # the manifest's status, or "unfinished" without one
    model: str
    rows: int
    errors: int
    shards: int  # committed shards (files may hold several once compacted)
    labels: tuple[tuple[str, int], ...]  # the commonest, most first
    other_labels: tuple[int, int]  # (distinct labels, rows) not listed
    score_bins: tuple[int, ...]  # SCORE_BINS counts over [0, 1]
    error_kinds: tuple[ErrorRows, ...]
    timings: tuple[ShardTiming, ...]  # every committed shard, by commit time
    failed_shards: tuple[tuple[str, str], ...]
    thumbnails: dict[str, tuple[Thumbnail, ...]] = field(default_factory=dict)  # label → least confident first
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))


def gather(output: LabelOutput, options: StorageOptions | None = None) -> ReportData:
    """The report's figures for an opened output: rows through DuckDB, timings from the done-markers."""
    con = connect(output)
    try:
        rows, errors = con.execute(f"SELECT count(*), count(error) FROM {VIEW}").fetchone()
        labels, other = _label_counts(con)
        bins = _score_bins(con)
        kinds = _error_kinds(con)
        wanted = _least_confident(con, [label for label, _ in labels[:THUMB_LABELS]])
    finally:
        con.close()
    manifest, timings = output.manifest, _timings(output, options)
    return ReportData(
        uri=output.uri,
        job_id=output.job_id,
        complete=output.complete,
        status=manifest.status if manifest else "unfinished",
        model=manifest.model.model_id if manifest else _first_model(output),
        rows=rows,
        errors=errors,
        shards=manifest.totals.shards if manifest else len(timings),
        labels=labels,
        other_labels=other,
        score_bins=bins,
        error_kinds=kinds,
        timings=timings,
        failed_shards=tuple((f.shard, f.error) for f in manifest.failed_shards) if manifest else (),
        thumbnails=_thumbnails(wanted, _source_options(output, options), _max_bytes(output), _layout(output)),
    )


def _label_counts(con: duckdb.DuckDBPyConnection) -> tuple[tuple[tuple[str, int], ...], tuple[int, int]]:
    counts = con.execute(
        f"SELECT label, count(*) AS n FROM {VIEW} WHERE error IS NULL AND label IS NOT NULL "
        "GROUP BY label ORDER BY n DESC, label"
    ).fetchall()
    rest = counts[TOP_LABELS_LISTED:]
    return tuple(counts[:TOP_LABELS_LISTED]), (len(rest), sum(n for _, n in rest))


def _score_bins(con: duckdb.DuckDBPyConnection) -> tuple[int, ...]:
    found = dict(
        con.execute(
            f"SELECT least(floor(score * {SCORE_BINS})::INT, {SCORE_BINS - 1}) AS b, count(*) FROM {VIEW} "
            "WHERE error IS NULL AND score IS NOT NULL GROUP BY b"
        ).fetchall()
    )
    return tuple(found.get(i, 0) for i in range(SCORE_BINS))


def _error_kinds(con: duckdb.DuckDBPyConnection) -> tuple[ErrorRows, ...]:
    # The rows' own kind (schemas.output.ErrorKind, as the done-markers count them too); files of label schema 1
    # have no error_kind column: the text before the error's first ':' stands for it there.
    rows = con.execute(
        f"""SELECT coalesce(nullif(error_kind, ''), nullif(left(trim(split_part(error, ':', 1)), 80), ''), 'error')
                       AS kind, count(*) AS n,
                   list([key, error] ORDER BY key)[1:{ERROR_EXAMPLES}] AS examples
            FROM {VIEW} WHERE error IS NOT NULL GROUP BY kind ORDER BY n DESC, kind"""
    ).fetchall()
    return tuple(ErrorRows(kind, n, tuple((key, error) for key, error in examples)) for kind, n, examples in rows)


def _least_confident(con: duckdb.DuckDBPyConnection, labels: list[str]) -> list[Thumbnail]:
    if not labels:
        return []
    rows = con.execute(
        f"""SELECT key, source, label, score, topk_labels[2:3], topk_scores[2:3] FROM (
                SELECT *, row_number() OVER (PARTITION BY label ORDER BY score, key) AS r FROM {VIEW}
                WHERE error IS NULL AND label IN (SELECT unnest($labels))
            ) WHERE r <= {THUMBS_PER_LABEL}""",
        {"labels": labels},
    ).fetchall()
    rank = {label: i for i, label in enumerate(labels)}  # the commonest label first, as the distribution lists them
    rows.sort(key=lambda row: (rank[row[2]], row[3], row[0]))
    return [
        Thumbnail(key, source, label, score, tuple(zip(others or [], scores or [], strict=True)))
        for key, source, label, score, others, scores in rows
    ]


def _first_model(output: LabelOutput) -> str:
    table = output.dataset().head(1, columns=["model"]) if output.files else None
    return table.column("model")[0].as_py() if table is not None and table.num_rows else "-"


def _timings(output: LabelOutput, options: StorageOptions | None) -> tuple[ShardTiming, ...]:
    """The committed shards' done-markers (a moved output's markers name its old place: then none are trusted)."""
    try:
        done = read_committed(open_storage(output.uri, options), output.uri, output.job_id).done
    except StorageError as exc:
        log.warning("done-markers of %s unreadable (%s): the report has no timings", output.uri, exc)
        return ()
    timings = [
        ShardTiming(m.shard_id, m.rows, m.errors, m.seconds, m.attempt, m.bytes_read, m.committed_at)
        for m in done.values()
    ]
    far_past = datetime.min.replace(tzinfo=UTC)
    return tuple(sorted(timings, key=lambda t: (t.committed_at or far_past, t.shard)))


def _source_options(output: LabelOutput, options: StorageOptions | None) -> StorageOptions | None:
    """The input's storage options: the command's, else the job's own (its endpoint; secrets are masked there)."""
    if options is not None and options.endpoint_url:
        return options
    spec_storage = (output.manifest.spec.get("storage") or {}) if output.manifest else {}
    endpoint = spec_storage.get("endpoint_url")
    return StorageOptions(endpoint_url=endpoint) if endpoint else options


def _layout(output: LabelOutput) -> InputSpec | None:
    """The job's input layout (image field or column, key column, row keys), so shards read back as the job read
    them; None without a manifest, or from a spec this version no longer reads (then the defaults)."""
    spec_input = (output.manifest.spec.get("input") or {}) if output.manifest else {}
    try:
        return InputSpec.model_validate(spec_input) if spec_input else None
    except ValidationError:
        return None


def _max_bytes(output: LabelOutput) -> int:
    spec_input = (output.manifest.spec.get("input") or {}) if output.manifest else {}
    return min(int(spec_input.get("max_object_bytes") or MAX_THUMB_SOURCE_BYTES), MAX_THUMB_SOURCE_BYTES)


# ----------------------------------------------------------------------------------------------- thumbnails


def _thumbnails(
    wanted: list[Thumbnail], options: StorageOptions | None, max_bytes: int, layout: InputSpec | None = None
) -> dict[str, tuple[Thumbnail, ...]]:
    """Each wanted image's thumbnail (made_from_sources), by label, in the order of `wanted` (least confident
    first within a label)."""
    result: dict[str, list[Thumbnail]] = {}
    for thumb in made_from_sources(wanted, options, max_bytes, layout):
        result.setdefault(thumb.label, []).append(thumb)
    return {label: tuple(thumbs) for label, thumbs in result.items()}


def thumbnails_of(
    output: LabelOutput, wanted: list[Thumbnail], options: StorageOptions | None = None, side: int = THUMB_SIDE
) -> list[Thumbnail]:
    """`wanted` (images of `output`'s rows) with their thumbnails (at most `side` pixels a side), read back as the
    job read its input, in order."""
    return made_from_sources(wanted, _source_options(output, options), _max_bytes(output), _layout(output), side)


def made_from_sources(
    wanted: list[Thumbnail],
    options: StorageOptions | None,
    max_bytes: int,
    layout: InputSpec | None = None,
    side: int = THUMB_SIDE,
) -> list[Thumbnail]:
    """Read each wanted image back from its source (each shard in one pass) and make its thumbnail, in order."""
    stores = StorageByScheme(options)
    by_source: dict[str, list[tuple[int, Thumbnail]]] = {}
    for i, thumb in enumerate(wanted):
        by_source.setdefault(thumb.source, []).append((i, thumb))
    with ThreadPoolExecutor(_READ_THREADS) as pool:
        made = [one for batch in pool.map(lambda s: _from_source(stores, s, by_source[s], max_bytes, layout, side),
                                          by_source) for one in batch]  # fmt: skip
    return [thumb for _, thumb in sorted(made, key=lambda pair: pair[0])]


def _from_source(
    stores: StorageByScheme,
    source: str,
    thumbs: list[tuple[int, Thumbnail]],
    max_bytes: int,
    layout: InputSpec | None = None,
    side: int = THUMB_SIDE,
) -> list[tuple[int, Thumbnail]]:
    try:
        if shard_kind(source) is not None:
            blobs = _shard_records(stores, source, {t.key for _, t in thumbs}, max_bytes, layout)
        else:
            blobs = {t.key: _read_object(stores, source, max_bytes) for _, t in thumbs}
    except (StorageError, OSError, ValueError, tarfile.TarError) as exc:  # the input moved, or is unreachable
        problem = f"cannot read {source}: {type(exc).__name__}: {exc}"
        return [(i, replace(t, problem=problem)) for i, t in thumbs]
    return [(i, _made(t, blobs.get(t.key), side)) for i, t in thumbs]


def _made(thumb: Thumbnail, blob: bytes | str | None, side: int) -> Thumbnail:
    jpeg, problem = _thumbnail(blob, side)
    return replace(thumb, jpeg=jpeg, problem=problem)


def _read_object(stores: StorageByScheme, uri: str, max_bytes: int) -> bytes | str:
    data = stores(uri).read_bytes(uri)
    return data if len(data) <= max_bytes else f"{uri} is {len(data)} bytes, above {max_bytes}"


def _shard_records(
    stores: StorageByScheme, source: str, keys: set[str], max_bytes: int, layout: InputSpec | None
) -> dict[str, bytes | str]:
    """The records of the shard `source` (tar or Parquet) whose keys are in `keys`, in one pass."""
    base, name = _shard_location(source, next(iter(keys)))
    layout = (layout or InputSpec(uri=base)).model_copy(update={"max_object_bytes": max_bytes})
    found: dict[str, bytes | str] = {}
    for record in read_source(stores(source), base, name, layout):
        if record.key in keys and record.key not in found:
            found[record.key] = record.data if record.data is not None else (record.error or "unreadable")
            if len(found) == len(keys):
                break
    return found


def _shard_location(source: str, key: str) -> tuple[str, str]:
    """(base, shard key) as the job planned `source`: a Parquet row's key names its file relative to the input
    (workers.io.readers.parquet_row_key), which the reader keys its rows by; a tar's samples are keyed by their
    members alone, so its folder serves."""
    relative = key.rpartition("#")[0]
    if relative and source.endswith("/" + relative):
        return source[: -len(relative) - 1], relative
    base, _, name = source.rpartition("/")
    return base, name


def _thumbnail(blob: bytes | str | None, side: int = THUMB_SIDE) -> tuple[bytes | None, str | None]:
    """(JPEG bytes, None), or (None, why not): the image as stored may since have changed or become unreadable."""
    if blob is None:
        return None, "not found in its source any more"
    if isinstance(blob, str):
        return None, blob
    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.draft("RGB", (side * 2, side * 2))  # JPEG: decode at a reduced scale, much faster
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((side, side))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return buffer.getvalue(), None
