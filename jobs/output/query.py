"""SQL and nearest neighbours over a label output's committed rows, with DuckDB in process.

`bulklabel query OUTPUT "SQL"` runs the SQL against a view `labels` (a curation job's output: a view named after its
table, `duplicates`, `queue`, `issues`, jobs.output.results; a reviewed one's decisions too, as `corrections`): the
committed rows only (jobs.output.reader decides which files those are), with `embedding` as `FLOAT[d]` so DuckDB's
array functions (`array_cosine_similarity`, `array_distance`) work on it directly. The files are handed to DuckDB as
a pyarrow dataset, local and S3 alike: DuckDB's own S3 support (the httpfs extension) is downloaded on first use,
which an offline machine cannot do, and one path for both keeps what the view shows the same (no globbing of the
output's path, no hive-partition guessing from its folder names).

`bulklabel similar OUTPUT KEY -k 10` is exact (one cosine per committed row, a full scan) below INDEX_MIN_ROWS
committed rows, and goes through an approximate index (jobs.output.index: faiss IVF, built on first use and cached
locally per committed set) from there on; `--index always|never` forces either.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import duckdb

from jobs.errors import BadInput
from jobs.output.corrections import REVIEWED_TABLES, corrections_table, read_decisions
from jobs.output.reader import FilesVanished, LabelOutput, OutputError, files_vanished, read_pinned
from jobs.output.results import ResultOutput, open_result
from jobs.output.tables.lance_index import indexed_vectors, nearest
from schemas.output import LABEL_SCHEMA
from schemas.review import CORRECTIONS_TABLE
from schemas.specs import StorageOptions

log = logging.getLogger(__name__)

FORMATS = ("table", "csv", "json", "parquet")
VIEW = "labels"
_FILES_VIEW = "labels_lists"  # the rows as stored (embedding a variable-size list); `labels` is built on it
_BATCH_ROWS = 10_000
INDEX_CHOICES = ("auto", "always", "never")
# From `python -m bench.similar` (bench/RESULTS.md): at 100,000 rows of width 1280 the exact scan takes 1.6-3 s a query
# on 2 cores (more under load), the index's one-off build 2.5 times that, paid back by the third query, each then
# 15-60 ms; at 300,000 rows exact is 3.5-9 s. Below the threshold nothing is worth caching.
INDEX_MIN_ROWS = 100_000


class QueryError(BadInput):
    """The SQL failed (syntax, unknown column, ...) or asked for an output format that cannot be written."""


class NoEmbeddings(BadInput):
    """A similarity search on an output (or an image) that has no embedding."""


class KeyNotInOutput(BadInput):
    """The key asked for is not among the output's committed rows."""


def connect(output: LabelOutput) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB with the `labels` view over `output`'s committed rows."""
    # Never fetch extensions from the network: a query naming s3:// or https:// itself fails at once, offline too.
    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    source = output.dataset() if output.files else LABEL_SCHEMA.empty_table()
    con.register(_FILES_VIEW, source)
    dim = output.embedding_dim or _probe_embedding_dim(con)
    if dim:
        con.execute(
            f"CREATE VIEW {VIEW} AS SELECT * REPLACE (embedding::FLOAT[{int(dim)}] AS embedding) FROM {_FILES_VIEW}"
        )
    else:  # no embeddings stored (or no rows yet): the column stays a list, all null
        con.execute(f"CREATE VIEW {VIEW} AS SELECT * FROM {_FILES_VIEW}")
    return con


def _probe_embedding_dim(con: duckdb.DuckDBPyConnection) -> int | None:
    """Without a manifest to say the width (an unfinished job), the first stored embedding's length does."""
    row = con.execute(f"SELECT len(embedding) FROM {_FILES_VIEW} WHERE embedding IS NOT NULL LIMIT 1").fetchone()
    return row[0] if row else None


def run_query(
    uri: str,
    sql: str,
    fmt: str = "table",
    out: Path | None = None,
    options: StorageOptions | None = None,
    stream: TextIO | None = None,
) -> int:
    """Run `sql` over the output at `uri`; write the result to `out` (csv, json, parquet) or `stream` (table, csv,
    json: JSON Lines, one object per row). Returns the number of rows written (for `table`, of the result)."""
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "parquet" and out is None:
        raise QueryError("--format parquet writes a file: give it with --out FILE")
    if out is not None and fmt == "table":
        raise QueryError("--out writes csv, json or parquet: add --format csv|json|parquet")
    stream = _Counted(stream or sys.stdout)
    result = open_result(uri, options)
    if result is not None:  # a curation job's table (jobs.output.results), as a view named after it
        return _query_result(result, sql, fmt, out, stream)
    return read_pinned(uri, options, lambda output: _query(output, sql, fmt, out, stream))


def _query_result(result: ResultOutput, sql: str, fmt: str, out: Path | None, stream: _Counted) -> int:
    con = duckdb.connect(config={"autoinstall_known_extensions": False})
    try:
        con.register(result.manifest.table, result.to_table())
        if result.manifest.table in REVIEWED_TABLES:  # and the decisions people took on it
            con.register(CORRECTIONS_TABLE, corrections_table(read_decisions(result.storage, result.uri)))
        return _execute(con, sql, fmt, out, stream, result.manifest.table)
    except duckdb.Error as exc:
        raise QueryError(f"query failed: {exc}") from exc
    finally:
        con.close()


def _execute(con: duckdb.DuckDBPyConnection, sql: str, fmt: str, out: Path | None, stream: _Counted,
             view: str) -> int:  # fmt: skip
    rel = con.sql(sql)
    if rel is None:
        raise QueryError(f"the SQL returned no result: give a query (SELECT ..., SUMMARIZE {view}, ...)")
    if fmt == "table":
        text = f"{rel}\n"  # rendered whole before anything is written: a retry never prints twice
        stream.write(text)
        return len(rel)
    if fmt == "parquet":
        rel.write_parquet(str(out), compression="zstd")
        return len(rel)
    if out is not None:
        with open(out, "w", newline="") as fh:
            return _write_rows(rel, fmt, fh)
    return _write_rows(rel, fmt, stream)


def _query(output: LabelOutput, sql: str, fmt: str, out: Path | None, stream: _Counted) -> int:
    if not output.complete:
        log.warning("output %s has no manifest (job running or interrupted): querying the %d shard(s) committed so "
                    "far", output.uri, len(output.files))  # fmt: skip
    con = connect(output)
    try:
        return _execute(con, sql, fmt, out, stream, VIEW)
    except duckdb.Error as exc:
        if files_vanished(exc):  # the output, not the SQL: read_pinned reads the new generation
            if stream.written:  # rows already streamed cannot be taken back: no silent duplicates
                raise OutputError(f"output {output.uri} was compacted while its rows were streamed ({stream.written} "
                                  "lines written): run the query again") from exc  # fmt: skip
            raise FilesVanished(f"output {output.uri}: a data file vanished while it was read: {exc}") from exc
        raise QueryError(f"query failed: {exc}") from exc
    finally:
        con.close()


class _Counted:
    """A text stream that counts what went through it, so a read retried on a new generation never repeats rows."""

    def __init__(self, stream: TextIO):
        self.stream, self.written = stream, 0

    def write(self, text: str) -> int:
        self.written += text.count("\n")
        return self.stream.write(text)


def _write_rows(rel: duckdb.DuckDBPyRelation, fmt: str, fh: TextIO) -> int:
    """Stream the result in batches as CSV (lists and structs as JSON text) or JSON Lines."""
    writer = csv.writer(fh) if fmt == "csv" else None
    if writer:
        writer.writerow(rel.columns)
    count = 0
    for batch in rel.to_arrow_reader(_BATCH_ROWS):
        for row in batch.to_pylist():
            if writer:
                writer.writerow(_csv_value(v) for v in row.values())
            else:
                fh.write(json.dumps(row, default=str) + "\n")
            count += 1
    return count


def _csv_value(value: object) -> object:
    return json.dumps(value, default=str) if isinstance(value, list | dict | tuple) else value


# ----------------------------------------------------------------------------------------------- similar


@dataclass(frozen=True)
class Neighbour:
    key: str
    label: str | None
    score: float | None
    similarity: float


def similar(
    uri: str,
    key: str,
    k: int = 10,
    options: StorageOptions | None = None,
    *,
    use_index: str = "auto",
    index_min_rows: int = INDEX_MIN_ROWS,
    cache_dir: Path | None = None,
) -> list[Neighbour]:
    """The `k` committed rows whose embeddings are nearest `key`'s by cosine similarity, most similar first (the
    image itself first, at ~1.0). `key` is a row's key, else the URI of the image file it came from (`source`), else
    its `image_id` where the rows have one.

    `use_index`: "auto" searches exactly below `index_min_rows` committed rows and through the cached ANN index
    (jobs.output.index) from there on; "always" and "never" force one or the other.
    """
    if k < 1:
        raise BadInput(f"-k must be at least 1, not {k}")
    if use_index not in INDEX_CHOICES:
        raise BadInput(f"unknown index choice {use_index!r}: use one of {', '.join(INDEX_CHOICES)}")

    def search(output: LabelOutput) -> list[Neighbour]:
        return _similar(output, key, k, use_index, index_min_rows, cache_dir, options)

    return read_pinned(uri, options, search)


def _similar(
    output: LabelOutput,
    key: str,
    k: int,
    use_index: str,
    index_min_rows: int,
    cache_dir: Path | None,
    options: StorageOptions | None,
) -> list[Neighbour]:
    if output.manifest is not None and not output.manifest.embeddings:
        raise NoEmbeddings(f"output {output.uri} has no embeddings: its job ran with embeddings: false")
    if use_index != "never":
        vectors = indexed_vectors(output.uri, options)
        if vectors is not None:
            return _similar_lance(output, vectors, key, k)
    rows = output.manifest.totals.rows if output.manifest else output.dataset().count_rows()
    if use_index == "always" or (use_index == "auto" and rows >= index_min_rows):
        return _similar_indexed(output, key, k, cache_dir, options)
    return _similar_exact(output, key, k)


def _similar_lance(output: LabelOutput, dataset, key: str, k: int) -> list[Neighbour]:
    """Through the vector index of the output's Lance dataset: the query row is found (and checked) in the committed
    files, as the exact search finds it; its neighbours come from the index, re-ranked on their stored vectors."""
    con = connect(output)
    try:
        column = _query_row(con, key, output)
        query = con.execute(f"SELECT embedding FROM {VIEW} WHERE {column} = $key AND embedding IS NOT NULL "
                            "ORDER BY key LIMIT 1", {"key": key}).fetchone()[0]  # fmt: skip
    finally:
        con.close()
    found = nearest(dataset, query, k, ["key", "label", "score"]).to_pylist()
    hits = [Neighbour(r["key"], r["label"], r["score"], 1.0 - r["_distance"]) for r in found]
    return sorted(hits, key=lambda n: (-round(n.similarity, 6), n.key))  # ties by key, as the exact search orders


def _similar_exact(output: LabelOutput, key: str, k: int) -> list[Neighbour]:
    """One cosine per committed row: a full scan in DuckDB."""
    con = connect(output)
    try:
        column = _query_row(con, key, output)
        rows = con.execute(
            f"""WITH q AS (SELECT embedding AS e FROM {VIEW} WHERE {column} = $key AND embedding IS NOT NULL
                           ORDER BY key LIMIT 1)
                SELECT key, label, score, array_cosine_similarity(embedding, q.e) AS similarity
                FROM {VIEW}, q WHERE embedding IS NOT NULL
                ORDER BY similarity DESC, key LIMIT $k""",
            {"key": key, "k": k},
        ).fetchall()
    finally:
        con.close()
    return [Neighbour(*row) for row in rows]


def _similar_indexed(
    output: LabelOutput, key: str, k: int, cache_dir: Path | None, options: StorageOptions | None = None
) -> list[Neighbour]:
    from jobs.output.index import open_index  # faiss is loaded only when an index is used

    if output.files:
        index = open_index(output, cache_dir, options)
        found = index.row_of(key)
        if found is not None:
            row, column = found
            if column != "key":
                log.info("similar: %r is the %s of row %s", key, column, index.rows.column("key")[row].as_py())
            return [Neighbour(*hit) for hit in index.search(row, k)]
    con = connect(output)  # not among the indexed rows: say why as the exact search would
    try:
        _query_row(con, key, output)
    finally:
        con.close()
    raise NoEmbeddings(f"{key!r} has no embedding")  # (only reached if the index and the rows disagree)


def _query_row(con: duckdb.DuckDBPyConnection, key: str, output: LabelOutput) -> str:
    """The column that names `key` (key, source or image_id), after checking the row has an embedding; raises
    NoEmbeddings or KeyNotInOutput. Only the row's own embedding is read: a scan of every embedding (to ask whether
    the output has any) is made only when the row has none."""
    if not output.files:
        raise NoEmbeddings(f"output {output.uri} has no embeddings (no committed files)")
    column = _key_column(con, key, output)
    found = con.execute(
        f"SELECT count(*), count(embedding), any_value(error) FROM {VIEW} WHERE {column} = ?", [key]
    ).fetchone()
    if found[1] == 0:
        if con.execute(f"SELECT count(embedding) FROM {VIEW}").fetchone()[0] == 0:
            raise NoEmbeddings(f"output {output.uri} has no embeddings ({len(output.files)} committed file(s))")
        raise NoEmbeddings(f"{key!r} has no embedding: it was not labelled ({found[2]})")
    if found[0] > 1:
        log.warning("%d rows have %s %r; searching from the first of them", found[0], column, key)
    return column


def _key_column(con: duckdb.DuckDBPyConnection, key: str, output: LabelOutput) -> str:
    names = {row[0] for row in con.execute(f"DESCRIBE {VIEW}").fetchall()}
    for column in (c for c in ("key", "source", "image_id") if c in names):
        if con.execute(f"SELECT 1 FROM {VIEW} WHERE {column} = ? LIMIT 1", [key]).fetchone():
            return column
    total, examples = con.execute(f"SELECT count(*), list(key ORDER BY key)[1:3] FROM {VIEW}").fetchone()
    raise KeyNotInOutput(
        f"{key!r} is not a key (or image file{', image id' if 'image_id' in names else ''}) of output {output.uri} "
        f"({total} committed rows" + (f"; keys look like {', '.join(examples)}" if examples else "") + ")"
    )


def format_neighbours(neighbours: list[Neighbour]) -> str:
    """An aligned table: key, label, score, similarity."""
    width = max([len(n.key) for n in neighbours] + [3])
    lines = [f"{'key':<{width}}  {'label':<24} {'score':>6} {'similarity':>10}"]
    for n in neighbours:
        score = f"{n.score:6.3f}" if n.score is not None else f"{'-':>6}"
        lines.append(f"{n.key:<{width}}  {n.label or '-':<24} {score} {n.similarity:10.4f}")
    return "\n".join(lines)
