"""A curation job's output (schemas.curation): one table of findings, written and read through the output protocol.

The phases a label run goes through, for one computed table instead of shards:
    writer lease taken      (jobs.output.lease) one writer at a time; another job's output refused at once
    check and claim         (jobs.output.ownership) foreign files and another job's output refused before any write;
                            `_owner.json` created
    already complete?       a manifest of this job: nothing is written again (a re-run or `resume` after the end)
    partials removed        uploads of a killed run
    data, then sheet        `data/part-<table>.parquet` and `sheet.html`, each written whole (atomic rename/PUT)
    manifest last           `_job.json`, a ResultManifest: the one switch that makes the rows visible
A run killed anywhere before the manifest leaves no visible rows, and its re-run (deterministic) writes the same
files again under the same names: never a lost or duplicated row. Readers (`open_result`, `bulklabel query`) read
the files the manifest names and nothing else. Driver-side: no torch, no Ray.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ValidationError

from jobs.output.errors import OutputConflict, OutputError, UnsupportedSchemaVersion
from jobs.output.faultpoints import crash_point
from jobs.output.lease import LeaseRecord, Writer, WriterKind, acquire
from jobs.output.listing import list_output
from jobs.output.manifest import read_raw
from jobs.output.ownership import check_output, claim_output
from jobs.output.partials import remove_partials
from schemas.curation import RESULT_SCHEMA_VERSION, TABLE_SCHEMAS, ResultFile, ResultManifest, ResultSource
from schemas.layout import LAYOUT_VERSION, SHEET_NAME, data_name, manifest_uri
from schemas.outcome import Outcome
from schemas.specs import StorageOptions
from workers.io.storage import Storage, join, normalise_uri, open_storage

if TYPE_CHECKING:
    import pyarrow.dataset as ds

log = logging.getLogger(__name__)

WAIT_S = 10.0  # for another run of the same job to let go of the output


@dataclass(frozen=True)
class ComputedResult:
    """What a curation job computed, ready to commit: its table, an HTML sheet, its figures and what it read."""

    table: pa.Table
    sources: tuple[ResultSource, ...] = ()
    figures: dict | None = None
    sheet: bytes | None = None


def read_result_manifest(storage: Storage, output: str) -> ResultManifest | None:
    """The curation manifest at `output` (None: there is none). A label job's manifest, a damaged one or one of an
    unknown table or a newer schema version raises OutputError naming it."""
    uri = manifest_uri(output)
    raw = read_raw(storage, uri)
    if raw is None:
        return None
    if raw.get("kind", "label") == "label":
        raise OutputError(f"{uri} is a label job's manifest, not a curation job's")
    version = raw.get("schema_version")
    if not isinstance(version, int) or not 1 <= version <= RESULT_SCHEMA_VERSION:
        raise UnsupportedSchemaVersion(f"{uri} was written in result schema version {version!r}; this bulklabel "
                                       f"reads version {RESULT_SCHEMA_VERSION}")  # fmt: skip
    try:
        manifest = ResultManifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise OutputError(f"job manifest {uri} is damaged: {'.'.join(map(str, err['loc']))}: {err['msg']}") from exc
    if manifest.table not in TABLE_SCHEMAS:
        raise OutputError(f"{uri} names table {manifest.table!r}, which this bulklabel does not know")
    if any(f.name.startswith(("/", "../")) or "://" in f.name or "/../" in f.name for f in manifest.files):
        raise OutputError(f"job manifest {uri} is damaged: it lists a file outside the output")
    return manifest


def completed(output: str, options: StorageOptions | None, job_id: str) -> ResultManifest | None:
    """The manifest of `job_id` at `output` when that job has committed there already (read without the lease: a
    manifest is written last and whole), else None."""
    output = normalise_uri(output).rstrip("/")
    try:
        manifest = read_result_manifest(open_storage(output, options), output)
    except OutputError:  # not a curation output of ours: commit_result says why, under the lease
        return None
    return manifest if manifest is not None and manifest.job_id == job_id else None


def commit_result(output: str, options: StorageOptions | None, job_id: str, kind: str, spec: BaseModel,
                  compute: Callable[[], ComputedResult]) -> tuple[ResultManifest, bool]:  # fmt: skip
    """Run `compute` and commit what it returns at `output` for `job_id`, under the output's lease.

    Returns the manifest and whether this run wrote it (False: an earlier run of the job had, and nothing was
    computed). Raises OutputConflict for another job's output or foreign files, before `compute` runs.
    """
    output = normalise_uri(output).rstrip("/")
    storage = open_storage(output, options)
    started = datetime.now(UTC)

    def refuse(holder: LeaseRecord) -> None:
        if holder.job_id != job_id:
            raise OutputConflict(f"output {output} belongs to job {holder.job_id!r}, not {job_id!r} (written now by "
                                 f"its {holder.describe()}): use a new output prefix")  # fmt: skip

    lease = acquire(storage, output, Writer(WriterKind.CURATION_JOB, job_id), WAIT_S,
                    advice="run the job again once that writer has finished", refuse=refuse)  # fmt: skip
    try:
        listing = list_output(storage, output)
        check_output(storage, output, job_id, "refuse", listing)
        if listing.has_manifest:
            earlier = read_result_manifest(storage, output)
            if earlier is not None and earlier.job_id == job_id:
                log.info("output %s: job %s is complete already (%d rows)", output, job_id, earlier.rows)
                return earlier, False
        claim_output(storage, output, job_id)
        remove_partials(storage, output, listing)
        result = compute()
        table_name = _table_of(result.table)
        lease.ensure_held()
        name = data_name(table_name)
        storage.write_bytes(join(output, name), _parquet(result.table))
        if result.sheet is not None:
            storage.write_bytes(join(output, SHEET_NAME), result.sheet)
        crash_point("result:data_written")
        lease.ensure_held()
        manifest = ResultManifest(
            job_id=job_id, kind=kind, status=Outcome.SUCCEEDED, table=table_name, layout_version=LAYOUT_VERSION,
            spec=json.loads(spec.model_dump_json()), sources=result.sources,
            files=(ResultFile(name=name, rows=result.table.num_rows),),
            sheet=SHEET_NAME if result.sheet is not None else None, figures=result.figures or {},
            started_at=started, finished_at=datetime.now(UTC),
        )  # fmt: skip
        storage.write_bytes(manifest_uri(output), manifest.model_dump_json(indent=2).encode())
        log.info("output %s: %s committed, %d rows", output, table_name, manifest.rows)
        return manifest, True
    finally:
        lease.release()


def _table_of(table: pa.Table) -> str:
    """The name of the known table whose schema `table` has (the schema is the contract readers check)."""
    for name, schema in TABLE_SCHEMAS.items():
        if table.schema.equals(schema, check_metadata=False):
            return name
    raise TypeError(f"no result table has the schema {table.schema}")


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


@dataclass(frozen=True)
class ResultOutput:
    """A committed curation output: its manifest and the URIs of its table's files."""

    uri: str
    manifest: ResultManifest
    files: tuple[str, ...]
    storage: Storage
    options: StorageOptions | None = None  # how it was opened: the outputs it names are read the same way

    @property
    def schema(self) -> pa.Schema:
        return TABLE_SCHEMAS[self.manifest.table]

    def to_table(self) -> pa.Table:
        """The committed rows, read whole (a curation table is one row per image: small beside its inputs)."""
        tables = [pq.read_table(io.BytesIO(self.storage.read_bytes(uri)), schema=self.schema) for uri in self.files]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()

    def dataset(self) -> ds.Dataset:
        import pyarrow.dataset as ds  # here: it imports pandas (jobs/output/reader.py)

        return ds.dataset(self.to_table())


def open_result(uri: str, options: StorageOptions | None = None) -> ResultOutput | None:
    """The committed curation output at `uri`; None when `uri` holds no curation job's output (a label output, or
    nothing). A curation run that has not finished (no manifest: its rows are visible only once it completes) is an
    OutputError saying so."""
    uri = normalise_uri(uri).rstrip("/")
    storage = open_storage(uri, options)
    try:
        raw = read_raw(storage, manifest_uri(uri))
    except OutputError:  # not a manifest at all: the label output's reader says what it is
        return None
    if raw is None:
        if any(storage.exists(join(uri, data_name(table))) for table in TABLE_SCHEMAS):
            raise OutputError(f"output {uri}: its curation job has not finished (no manifest yet): its rows show "
                              "once it completes (run it again, or `bulklabel resume` it)")  # fmt: skip
        return None
    if raw.get("kind", "label") == "label":
        return None
    manifest = read_result_manifest(storage, uri)
    assert manifest is not None
    return ResultOutput(uri, manifest, tuple(join(uri, f.name) for f in manifest.files), storage, options)
