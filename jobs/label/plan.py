"""Turn an input location into a stream of shard tasks, without holding the whole listing.

- tar: every `.tar` (or `.tar.gz`, `.tgz`) object under the prefix is one shard (WebDataset layout); the input may
  also be one shard file, or a brace pattern naming shards (`s3://b/shard-{000000..000099}.tar`, webdataset's
  notation), every one of which must exist;
- parquet: every `.parquet` object under the prefix is one shard whose rows hold image bytes in a column
  (img2dataset's `parquet` output, Hugging Face datasets' `image` struct);
- files: loose images under the prefix, grouped in key order into shards of N keys; on a re-run, keys inside the
  key range of a committed shard form that shard again, and only keys outside every committed range form new ones
  (incremental labelling: input that grew adds shards without shifting the committed ones);
- manifest: a CSV or Parquet file whose key column names the images, validated whole, then read in chunks.

Shard ids are unique by construction (a readable prefix plus a hash of the full key) and stable across runs for
unchanged input, which is what makes resume possible; a repeated id refuses the plan rather than merging shards.
Row keys are unique too, checked before the first task where the input can repeat one (jobs.label.keys): a
manifest's keys, loose files keyed by `name`, a Parquet input's `key_column`; the others are unique by construction
(loose files by path; Parquet rows `<path>#<row>`, workers.io.readers.parquet_row_key). A repeat refuses the plan
naming both rows. (Tar samples are keyed by WebDataset's `__key__` inside the archives, which planning does not
read: a repeat inside one shard is an error row.)
Listings skip only what the spec's `exclude` patterns name, and every skipped object is counted in `PlanStats`.
Fingerprints cover the listed sizes and ETags (or mtimes); manifests are not listed, so manifest shards fingerprint
their keys only.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from itertools import islice
from pathlib import PurePosixPath
from typing import ClassVar

from jobs.errors import BadInput
from jobs.label.keys import find_repeated_key
from schemas.shards import ShardResult, ShardTask
from schemas.specs import LABEL_COLUMN, InputSpec
from workers.io.keys import KeyResolver
from workers.io.rowkeys import PARQUET_SUFFIXES, TAR_SUFFIXES, check_key_column, row_key_of
from workers.io.storage import (
    AccessDenied,
    ObjectInfo,
    Storage,
    StorageError,
    StoreUnavailable,
    classify_s3_error,
    normalise_uri,
    relative_key,
)

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".csv", ".parquet")
_BRACE = re.compile(r"\{([^{}]*)\}")
MAX_BRACE_EXPANSION = 1_000_000
MANIFEST_CHUNK_ROWS = 65_536
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._=-]+")
READABLE_ID_CHARS = 48  # of the key, in the id; the hash of the full key keeps truncated ids apart
ID_HASH_CHARS = 12


class PlanError(BadInput):
    """The input cannot be planned: missing, empty, or not what the spec says (exit 2, before any work)."""


@dataclass
class PlanStats:
    """What planning skipped, for the job summary. Filled while the plan is consumed: read it after the last task.

    excluded: objects matching the spec's `exclude` patterns; not_images: objects of the wrong kind for the format
    (loose files without an image extension, non-`.tar` objects in a tar input); examples: the first few skipped keys.
    """

    MAX_EXAMPLES: ClassVar[int] = 5

    excluded: int = 0
    not_images: int = 0
    examples: list[str] = field(default_factory=list)

    def skip(self, key: str, excluded: bool) -> None:
        if excluded:
            self.excluded += 1
        else:
            self.not_images += 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(key)

    @property
    def skipped(self) -> int:
        return self.excluded + self.not_images


def input_format(spec: InputSpec, storage: Storage, uri: str) -> str:
    """The spec's format, with `auto` decided from the URI or the first listing page."""
    if spec.format != "auto":
        return spec.format
    if has_brace_pattern(uri):
        return "tar"
    if uri.lower().endswith(MANIFEST_SUFFIXES):
        return "manifest"
    for obj in islice(storage.list(uri), 1000):
        if obj.uri.lower().endswith(TAR_SUFFIXES) and not is_excluded(_key_of(uri, obj.uri), spec.exclude):
            return "tar"
    return "files"


def plan_shards(
    spec: InputSpec, storage: Storage, stats: PlanStats | None = None, committed: Iterable[ShardResult] = ()
) -> Iterator[ShardTask]:
    """Shard tasks for the input, streamed; raises PlanError before yielding if there is nothing to do.

    `committed`: the done-markers of earlier runs of this job, so loose files keep their committed shards (see the
    module's docstring). `stats` counts what was skipped. Storage outages and denied access are not PlanErrors:
    StoreUnavailable and AccessDenied leave as they are (infrastructure, exit 3).
    """
    with _input_errors(spec.uri):
        uri = normalise_uri(spec.uri)
        fmt = input_format(spec, storage, uri)
    stats = stats if stats is not None else PlanStats()
    _refuse_repeated_keys(spec, storage, uri, fmt)
    if fmt == "tar" and has_brace_pattern(uri):
        tasks = _pattern_shards(storage, uri)
    elif fmt in ("tar", "parquet"):
        tasks = _tar_shards(spec, storage, uri, stats, fmt)
    elif fmt == "files":
        tasks = _file_shards(spec, storage, uri, stats, committed)
    else:
        tasks = _manifest_shards(spec, storage, uri)
    tasks = _refuse_repeated_ids(tasks)
    first = next(tasks, None)
    if first is None:
        raise PlanError(_nothing_to_do(spec, fmt, stats))
    log.info("planning %s input %s", fmt, spec.uri)
    yield first
    yield from tasks


def _nothing_to_do(spec: InputSpec, fmt: str, stats: PlanStats) -> str:
    if fmt == "manifest":
        return f"manifest {spec.uri} lists no keys in column {spec.manifest_column!r}"
    wanted = {"tar": "tar shards", "parquet": "parquet shards"}.get(fmt, f"images ({', '.join(spec.extensions)})")
    skipped = ""
    if stats.skipped:
        skipped = (f"; skipped {stats.excluded} excluded by `exclude` and {stats.not_images} of another kind, e.g. "
                   f"{', '.join(stats.examples)}")  # fmt: skip
    return f"input {spec.uri} holds no {wanted}{skipped}; check the path and the input format ({fmt})"


@contextmanager
def _input_errors(uri: str) -> Iterator[None]:
    """A missing input or bucket is the user's to fix (PlanError); an outage or denied access is not."""
    try:
        yield
    except (StoreUnavailable, AccessDenied):
        raise
    except FileNotFoundError as exc:  # ObjectMissing included
        raise PlanError(f"input {uri} does not exist") from exc
    except StorageError as exc:
        raise PlanError(f"input {uri}: {exc}") from exc


def _refuse_repeated_ids(tasks: Iterator[ShardTask]) -> Iterator[ShardTask]:
    """Pass tasks through, refusing a shard id seen before: two inputs under one id would lose one of them."""
    seen: dict[str, str] = {}
    for task in tasks:
        first_key = task.keys[0] if task.keys else ""
        if task.shard_id in seen:
            raise PlanError(
                f"two shards of the input would share the id {task.shard_id}: {seen[task.shard_id]!r} and "
                f"{first_key!r}; rename one of them (please report this: ids carry a hash of the key)"
            )
        seen[task.shard_id] = first_key
        yield task


def _refuse_repeated_keys(spec: InputSpec, storage: Storage, uri: str, fmt: str) -> None:
    """Refuse an input two of whose rows would share a row key (the output could not tell them apart: `similar`
    and every join would mix them), naming both, before the first task. Only inputs that can repeat one are read
    for it (see the module's docstring); a manifest's keys are checked in the manifest's own pass."""
    if fmt == "files" and spec.row_key == "name":
        label = "loose file"

        def rows() -> Iterator[tuple[str, str]]:
            for base, key, _ in _listing(storage, uri, spec, PlanStats()):
                if key.rsplit(".", 1)[-1].lower() in spec.extensions:
                    yield row_key_of(key, spec.row_key), join_uri(base, key)
    elif fmt == "parquet" and spec.key_column is not None and not has_brace_pattern(uri):
        label = f"parquet key_column {spec.key_column!r}"

        def rows() -> Iterator[tuple[str, str]]:
            for base, key, _ in _listing(storage, uri, spec, PlanStats()):
                if key.lower().endswith(PARQUET_SUFFIXES):
                    yield from _parquet_ids(storage, join_uri(base, key), spec.key_column)
    else:
        return
    repeated = find_repeated_key(rows)
    if repeated is not None:
        raise PlanError(
            f"input {spec.uri}: two rows would share the key {repeated.key!r} ({label}): {repeated.first} and "
            f"{repeated.second}; every row needs its own key"
            + ("; use row_key: path" if fmt == "files" else "; name a column whose ids are unique, or unset it")
        )


def _parquet_ids(storage: Storage, uri: str, column: str) -> Iterator[tuple[str, str]]:
    """(id, 'file#row') of each row of a Parquet file's key column, read alone (the images are not read)."""
    import pyarrow.parquet as pq

    with _input_errors(uri), _arrow_file(storage, uri) as fh:
        try:
            parquet = pq.ParquetFile(fh)
            check_key_column(uri, column, parquet.schema_arrow.names)
            row = 0
            for batch in parquet.iter_batches(batch_size=MANIFEST_CHUNK_ROWS, columns=[column]):
                for value in batch.column(0).to_pylist():
                    if value is None or value == "":
                        raise PlanError(f"{uri}#{row}: its key column {column!r} is empty; every row needs an id")
                    yield str(value), f"{uri}#{row}"
                    row += 1
        except ValueError as exc:  # ParquetLayoutError, or not Parquet at all (pyarrow's ArrowInvalid)
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"input {uri}: {exc}") from exc


def _arrow_file(storage: Storage, uri: str):
    """A seekable Arrow file of `uri`: Parquet's footer and one column are read by ranges, not the whole object."""
    import pyarrow as pa

    if not uri.startswith("s3://"):
        return pa.OSFile(uri)
    from jobs.output.reader import fs_path, pyarrow_filesystem  # (the reader's S3 settings: endpoint, keys)

    return pyarrow_filesystem(uri, getattr(storage, "_options", None)).open_input_file(fs_path(uri))


# ------------------------------------------------------------------------------------------------ listings


def is_excluded(key: str, patterns: Iterable[str]) -> bool:
    """Whether `key` (relative to the input) matches an `exclude` pattern: fnmatch, case-sensitive, against the
    whole key (`*` crosses `/`: 'raw/*' is everything under raw/) or against any one path part, folder or file
    name ('.thumbs' skips every .thumbs folder, '.DS_Store' every such file). A pattern ending in `/` names a
    folder at that place of the key: 'raw/' is 'raw/*'."""
    parts = key.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            if fnmatchcase(key, pattern + "*"):
                return True
        elif fnmatchcase(key, pattern) or any(fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def _key_of(uri: str, object_uri: str) -> str:
    return relative_key(uri, object_uri) if object_uri != uri else PurePosixPath(object_uri).name


def _listing(storage: Storage, uri: str, spec: InputSpec, stats: PlanStats) -> Iterator[tuple[str, str, ObjectInfo]]:
    """(base, key, object) for each object under `uri` in key order, keys relative to base, excluded ones counted.

    The base is `uri`, or its folder when `uri` names one object (a single tar or image as the input)."""
    base = uri
    with _input_errors(uri):
        for obj in storage.list(uri):
            if obj.uri == uri:
                base = uri.rsplit("/", 1)[0]
            key = relative_key(base, obj.uri)
            if is_excluded(key, spec.exclude):
                stats.skip(key, excluded=True)
            else:
                yield base, key, obj


def _tar_shards(spec: InputSpec, storage: Storage, uri: str, stats: PlanStats, fmt: str) -> Iterator[ShardTask]:
    """One shard per tar (or parquet) object; a single such file as the input is one shard, any other single file
    refuses the plan at once (it is no shard, and would otherwise fail on every worker try)."""
    suffixes = TAR_SUFFIXES if fmt == "tar" else PARQUET_SUFFIXES
    for base, key, obj in _listing(storage, uri, spec, stats):
        if key.lower().endswith(suffixes):
            yield ShardTask(
                shard_id=shard_id_for(key), kind=fmt, base_uri=base, keys=(key,), sizes=(obj.size,),
                etags=(obj.etag,),
            )  # fmt: skip
        elif obj.uri == uri:
            raise PlanError(f"input {uri} is one file but not a {fmt} shard ({', '.join(suffixes)})")
        else:
            stats.skip(key, excluded=False)


def has_brace_pattern(uri: str) -> bool:
    return _BRACE.search(uri) is not None


def expand_braces(pattern: str) -> list[str]:
    """webdataset's (and bash's) brace notation: `{000..099}` is a zero-padded range (as wide as its first bound),
    `{a,b}` alternatives; several groups multiply out, in order. Nested braces are not supported."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if ".." in body and "," not in body:
        first, _, last = body.partition("..")
        if not (first.isdigit() and last.isdigit()):
            raise PlanError(f"brace range {{{body}}} in {pattern!r} is not two numbers")
        step = 1 if int(last) >= int(first) else -1
        choices = [f"{n:0{len(first)}d}" for n in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], expand_braces(pattern[match.end() :])
    if len(choices) * len(tail) > MAX_BRACE_EXPANSION:
        raise PlanError(f"{pattern!r} names more than {MAX_BRACE_EXPANSION} shards")
    return [head + choice + rest for choice in choices for rest in tail]


def _pattern_shards(storage: Storage, uri: str) -> Iterator[ShardTask]:
    """The shards a brace pattern names, found by listing the folder above its first brace once (not one request
    per name); a name that does not exist refuses the plan before any work, naming it."""
    base = uri[: _BRACE.search(uri).start()].rsplit("/", 1)[0]
    wanted = {relative_key(base, name) for name in expand_braces(uri)}
    found: dict[str, ShardTask] = {}
    with _input_errors(uri):
        for obj in storage.list(base):
            key = relative_key(base, obj.uri)
            if key in wanted:
                found[key] = ShardTask(shard_id=shard_id_for(key), kind="tar", base_uri=base, keys=(key,),
                                       sizes=(obj.size,), etags=(obj.etag,))  # fmt: skip
    missing = sorted(wanted - found.keys())
    if missing:
        raise PlanError(f"input pattern {uri}: {len(missing)} of its {len(wanted)} shards do not exist (first: "
                        f"{join_uri(base, missing[0])})")  # fmt: skip
    yield from (found[key] for key in sorted(found))


def join_uri(base: str, key: str) -> str:
    return f"{base.rstrip('/')}/{key}"


def _readable(text: str) -> str:
    """A file-name-safe rendering of a key, for people reading ids: 'a/cam 1/x' → 'a__cam_1__x'."""
    safe = _UNSAFE_ID_CHARS.sub("_", text.replace("/", "__")).lstrip("._-")[:READABLE_ID_CHARS]
    return safe or "shard"  # keys of non-ASCII names only: the hash alone tells them apart


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:ID_HASH_CHARS]


def shard_id_for(key: str) -> str:
    """The id of a tar shard: its key, made readable and safe, plus a hash of the full key, so that keys differing
    only in characters the readable part drops ('a b.tar', 'a_b.tar', '中国.tar') still get distinct ids:
    'a/b/00001.tar' → 'a__b__00001-<sha256[:12]>'."""
    suffix = next((s for s in (*TAR_SUFFIXES, *PARQUET_SUFFIXES) if key.lower().endswith(s)), "")
    return f"{_readable(key[: len(key) - len(suffix)])}-{_key_hash(key)}"


def files_shard_id(first_key: str) -> str:
    """The id of a loose-files shard, from its first key (unique within a listing)."""
    return f"files-{_readable(first_key)}-{_key_hash(first_key)}"


# ------------------------------------------------------------------------------------------------ loose files


@dataclass(frozen=True)
class _Range:
    first: str
    last: str
    shard_id: str


def _committed_ranges(committed: Iterable[ShardResult]) -> list[_Range]:
    """The key ranges of committed loose-files shards, in key order; overlapping ranges are refused."""
    ranges = sorted(
        (_Range(m.first_key, m.last_key, m.shard_id) for m in committed
         if m.shard_id.startswith("files-") and m.first_key is not None and m.last_key is not None),
        key=lambda r: r.first,
    )  # fmt: skip
    for before, after in zip(ranges, ranges[1:], strict=False):
        if after.first <= before.last:
            raise PlanError(
                f"committed shards {before.shard_id} and {after.shard_id} claim overlapping key ranges "
                f"({before.first!r}..{before.last!r} and {after.first!r}..{after.last!r}); their markers are damaged"
            )
    return ranges


def _file_shards(
    spec: InputSpec, storage: Storage, uri: str, stats: PlanStats, committed: Iterable[ShardResult]
) -> Iterator[ShardTask]:
    def images() -> Iterator[tuple[str, str, ObjectInfo]]:
        for item in _listing(storage, uri, spec, stats):
            if item[1].rsplit(".", 1)[-1].lower() in spec.extensions:
                yield item
            else:
                stats.skip(item[1], excluded=False)

    yield from _group_files(images(), spec.files_per_shard, _committed_ranges(committed))


def _group_files(items: Iterable[tuple[str, str, ObjectInfo]], size: int, ranges: list[_Range]) -> Iterator[ShardTask]:
    """Keys in key order → shards: inside committed range r, shard r again under its id; elsewhere chunks of `size`,
    cut where a committed range begins. A committed range with no keys left yields nothing (the runner notices the
    shard is gone)."""
    fresh: list = []  # keys outside every committed range, not yet a shard
    inside: list = []  # keys of ranges[r]
    r = 0
    for item in items:
        key = item[1]
        while r < len(ranges) and ranges[r].last < key:
            if inside:
                yield _files_task(inside, ranges[r].shard_id)
                inside = []
            r += 1
        if r < len(ranges) and ranges[r].first <= key:
            if fresh:
                yield _files_task(fresh)
                fresh = []
            inside.append(item)
        else:
            fresh.append(item)
            if len(fresh) == size:
                yield _files_task(fresh)
                fresh = []
    if fresh:
        yield _files_task(fresh)
    if inside:
        yield _files_task(inside, ranges[r].shard_id)


def _files_task(items: list[tuple[str, str, ObjectInfo]], shard_id: str | None = None) -> ShardTask:
    keys = tuple(key for _, key, _ in items)
    return ShardTask(
        shard_id=shard_id or files_shard_id(keys[0]), kind="files", base_uri=items[0][0], keys=keys,
        sizes=tuple(obj.size for _, _, obj in items), etags=tuple(obj.etag for _, _, obj in items),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ manifests


def _manifest_shards(spec: InputSpec, storage: Storage, uri: str) -> Iterator[ShardTask]:
    """Validate every key first (a key outside the allowed locations refuses the job), then stream the shards."""
    base = uri.rsplit("/", 1)[0]
    resolver = KeyResolver(base, spec.allowed_roots)
    with _local_copy(storage, uri) as local:
        _check_manifest_keys(spec, uri, local, resolver)
        rows = ((resolver.resolve(key), label) for _, key, label in _manifest_rows(spec, uri, local))
        index = 0
        while chunk := tuple(islice(rows, spec.files_per_shard)):
            keys, labels = zip(*chunk, strict=True)
            has_labels = any(labels)  # a shard none of whose rows has a label fingerprints as before labels existed
            yield ShardTask(shard_id=f"manifest-{index:06d}", kind="files", base_uri=base, keys=keys,
                            labels=labels if has_labels else ())  # fmt: skip
            index += 1


def _check_manifest_keys(spec: InputSpec, uri: str, local: str, resolver: KeyResolver) -> None:
    """One pass over the whole manifest (about a second per million keys): refuse it if any key lies outside."""
    outside, first = 0, None
    for where, key, _ in _manifest_rows(spec, uri, local):
        if resolver.resolve(key) is None:
            outside += 1
            first = first or (where, key)
    if outside:
        number, key = first
        where = _row_label(uri, number)
        shown = key if len(key) <= 200 else key[:200] + "…"
        raise PlanError(
            f"manifest {uri}: {outside} key(s) lie outside the manifest's folder {resolver.base} and the allowed "
            f"roots (first: {where}: {shown!r}); move those images under {resolver.base}, or name their location "
            "in the input's allowed_roots"
        )

    def rows() -> Iterator[tuple[str, str]]:  # each key as its row is keyed (a local copy: read twice at most)
        for number, key, _ in _manifest_rows(spec, uri, local):
            yield row_key_of(resolver.resolve(key), spec.row_key), _row_label(uri, number)

    repeated = find_repeated_key(rows)
    if repeated is not None:
        raise PlanError(
            f"manifest {uri}: {repeated.first} and {repeated.second} name the same row key {repeated.key!r}; each "
            "image once" + (" (row_key: name keys by the file name alone)" if spec.row_key == "name" else "")
        )


def _manifest_rows(spec: InputSpec, uri: str, local: str) -> Iterator[tuple[int, str, str]]:
    """(row number as `_row_label` shows it, key, label or '') for each non-empty key of the manifest's key column,
    read in chunks."""
    import pyarrow as pa

    try:
        number, batches = _manifest_batches(spec, uri, local)
        for batch in batches:
            keys = batch.column(0).cast(pa.string()).to_pylist()  # a Parquet column of numbers too
            labels = batch.column(1).cast(pa.string()).to_pylist() if batch.num_columns > 1 else [None] * len(keys)
            for key, label in zip(keys, labels, strict=True):
                if key:
                    yield number, key, label or ""
                number += 1
    except (pa.ArrowException, OSError) as exc:  # not CSV or Parquet after all, or damaged
        raise PlanError(f"manifest {uri} cannot be read: {exc}") from exc


def _row_label(uri: str, number: int) -> str:
    return f"row {number}" if uri.lower().endswith(".parquet") else f"line {number}"


def _manifest_batches(spec: InputSpec, uri: str, local: str) -> tuple[int, Iterable]:
    """The first row's number (CSV: its line, after the header) and batches holding the key column, then the label
    column where there is one."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    column = spec.manifest_column
    if uri.lower().endswith(".parquet"):
        reader = pq.ParquetFile(local)
        names = reader.schema_arrow.names
        _check_column(uri, column, names)
        columns = [column, *_label_column(spec, uri, names)]
        return 1, reader.iter_batches(batch_size=MANIFEST_CHUNK_ROWS, columns=columns)
    names = pacsv.open_csv(local).schema.names
    _check_column(uri, column, names)
    columns = [column, *_label_column(spec, uri, names)]
    # Keys and labels are text whatever they look like ('0001' is not 1), and only those columns are parsed.
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(columns, pa.string()), include_columns=columns)
    read = pacsv.ReadOptions(block_size=1 << 22)
    return 2, pacsv.open_csv(local, read_options=read, convert_options=convert)  # line 1: the header


def _check_column(uri: str, column: str, names: list[str]) -> None:
    if column not in names:
        raise PlanError(f"manifest {uri} has no column {column!r}; it has {names}")


def _label_column(spec: InputSpec, uri: str, names: list[str]) -> list[str]:
    """The manifest's label column, as a list of none or one: the default is used where present, a name the spec
    gives must be there."""
    column = spec.label_column
    if column is None or (column == LABEL_COLUMN and (column not in names or column == spec.manifest_column)):
        return []
    if column == spec.manifest_column:
        raise PlanError(f"manifest {uri}: label_column and manifest_column are both {column!r}")
    _check_column(uri, column, names)
    return [column]


@contextmanager
def _local_copy(storage: Storage, uri: str) -> Iterator[str]:
    """The manifest copied to a local temporary file (Arrow reads local files in chunks), removed afterwards."""
    with _input_errors(uri):
        if not storage.exists(uri):
            raise PlanError(f"manifest {uri} does not exist")
    with tempfile.NamedTemporaryFile(suffix=PurePosixPath(uri).suffix) as local:
        with _input_errors(uri), storage.open_read(uri) as src:
            try:
                while chunk := src.read(1 << 20):
                    local.write(chunk)
            except StorageError:
                raise
            except Exception as exc:  # noqa: BLE001 - a connection dropped mid-body: classified like any S3 call
                error = classify_s3_error(exc, "read", uri) if uri.startswith("s3://") else None
                if error is None:
                    raise
                raise error from exc
        local.flush()
        yield local.name
