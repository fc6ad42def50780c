"""`format: lance`: every committed shard's rows also appended to a Lance dataset (pylance) at `<output>/table`, the
embedding as a fixed-size float32 vector (what LanceDB, FiftyOne and Lance's vector indexes take), exactly once.

Exactly once: each append carries the job and shard ids as Lance transaction properties, in the same atomic commit
as its rows. Before each append the dataset is opened at its latest version and the transactions of versions not
seen yet are read, so a shard already there (a re-run, a retried shard, a driver killed after its commit) is
skipped, and one whose commit a killed driver did not make is appended by the next run's `start`. Lance rebases a
concurrent append rather than failing it, so two writers could both add a shard: the output's writer lease
(jobs.output.lease) is what keeps one writer per output, as for the folder itself.

The vector's width is the first embedding's. Shards before one (all error rows) wait: they are appended once the
width is known, or at the end of the job (embeddings off: a plain float list column).

At the end of the job (`finish`, under the lease) the embeddings get an IVF_PQ index once there are enough of them
(jobs.output.tables.lance_index), a commit of its own; a later run folds the rows it added into it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from jobs.output.faultpoints import crash_point
from jobs.output.reader import pyarrow_filesystem
from jobs.output.tables import lance_index
from jobs.output.tables.sink import object_store_options, shard_rows, table_properties
from schemas.layout import table_uri
from schemas.shards import ShardResult
from schemas.specs import LanceNamespace, StorageOptions

if TYPE_CHECKING:
    from jobs.output.lease import Lease

log = logging.getLogger(__name__)

TX_JOB, TX_SHARD = "bulklabel.job_id", "bulklabel.shard"


def as_vectors(rows: pa.Table, width: int | None) -> pa.Table:
    """`rows` with its embedding column as fixed_size_list<float32, width> (None: left a plain list)."""
    if width is None:
        return rows
    index = rows.schema.get_field_index("embedding")
    vectors = pc.cast(rows["embedding"], pa.list_(pa.float32(), width))
    return rows.set_column(index, pa.field("embedding", vectors.type), vectors)


def _width(rows: pa.Table) -> int | None:
    lengths = pc.list_value_length(rows["embedding"]).drop_null()
    return int(lengths[0].as_py()) if len(lengths) else None


class _Location:
    """Where the dataset is: a URI (`<output>/table`), or a table of a namespace server, connected on first use."""

    def __init__(self, uri: str | None, namespace: LanceNamespace | None):
        self.uri, self.namespace, self._client = uri, namespace, None

    def kwargs(self, create: bool = False) -> dict:
        if self.namespace is None:
            return {}
        if self._client is None:
            import lance_namespace

            self._client = lance_namespace.connect("rest", {"uri": self.namespace.uri, **self.namespace.properties})
        if create and len(self.namespace.table_id) > 1:  # the table's namespace first (it may exist already)
            from lance_namespace import CreateNamespaceRequest
            from lance_namespace.errors import NamespaceAlreadyExistsError

            try:
                self._client.create_namespace(CreateNamespaceRequest(id=list(self.namespace.table_id[:-1])))
            except NamespaceAlreadyExistsError:
                pass
        return {"namespace_client": self._client, "table_id": list(self.namespace.table_id)}


class LanceSink:
    """The Lance dataset of one label output. Args: the output URI, the job id, the job's storage options."""

    def __init__(self, output: str, job_id: str, storage_options: StorageOptions | None = None, index: bool = True,
                 namespace: LanceNamespace | None = None):  # fmt: skip
        self.output = output
        self.index = index  # build (or extend) the vector index at the end of the job
        self.job_id = job_id
        self.namespace = namespace
        if namespace is None:
            self.uri = table_uri(output)
            self._lance_options = object_store_options(self.uri, storage_options)
        else:  # the namespace says where the dataset lives (an object store the job's S3 options reach)
            self.uri = f"{namespace.uri} ({'/'.join(namespace.table_id)})"
            self._lance_options = object_store_options("s3://", storage_options)
        self._where = _Location(self.uri if namespace is None else None, namespace)
        self._filesystem = pyarrow_filesystem(output, storage_options)
        self._seen = 0  # versions whose transactions were read
        self._committed: set[str] = set()  # this job's shards the dataset holds
        self._waiting: dict[str, tuple[ShardResult, str | None]] = {}  # before the vector width is known

    def commit_shards(self, results: Iterable[ShardResult], locations: dict[str, str] | None = None) -> int:
        return sum(self.commit_shard(r, (locations or {}).get(r.shard_id)) for r in results)

    def commit_shard(self, result: ShardResult, location: str | None = None) -> bool:
        """Append one shard's rows with its ids as transaction properties, unless the dataset's latest version has
        them. True if appended (False too when it waits for the vector width)."""
        dataset = self._latest()
        if result.shard_id in self._committed:
            log.debug("shard %s is in dataset %s already", result.shard_id, self.uri)
            return False
        rows = shard_rows(self.output, self._filesystem, result, location)
        width = self._dataset_width(dataset) if dataset is not None else _width(rows)
        if dataset is None and width is None:
            self._waiting[result.shard_id] = (result, location)
            return False
        appended = self._append(result, as_vectors(rows, width), create=dataset is None)
        if dataset is None and self._waiting:  # the width is known now: the shards that waited for it
            appended += self.commit_shards([r for r, _ in self._waiting.values()],
                                           {s: loc for s, (_, loc) in self._waiting.items() if loc})  # fmt: skip
            self._waiting.clear()
        return bool(appended)

    def flush(self) -> int:
        """Nothing queued: each shard is committed as it comes."""
        return 0

    def finish(self, target_bytes: int, compact: bool, lease: Lease | None = None) -> None:
        """Shards still waiting (no shard had an embedding: embeddings off, or every image failed) go in as plain
        lists; with `compact`, small fragments are merged (Lance's compact_files: a commit of its own)."""
        if self._waiting and self._latest() is None:
            waiting, self._waiting = list(self._waiting.values()), {}
            first, location = waiting[0]
            self._append(first, shard_rows(self.output, self._filesystem, first, location), create=True)
            self.commit_shards([r for r, _ in waiting[1:]], {r.shard_id: loc for r, loc in waiting[1:] if loc})
        dataset = self._latest()
        if compact and dataset is not None and len(dataset.get_fragments()) > 1:
            if lease is not None:
                lease.ensure_held()
            metrics = dataset.optimize.compact_files(target_rows_per_fragment=1 << 20)
            log.info("dataset %s compacted: %s", self.uri, metrics)
        if self.index and dataset is not None and self._dataset_width(dataset) is not None:
            if lease is not None:
                lease.ensure_held()
            lance_index.index_vectors(self._latest(), lance_index.INDEX_MIN_ROWS)

    def _append(self, result: ShardResult, rows: pa.Table, create: bool) -> int:
        import lance

        crash_point("table:commit")
        properties = {TX_JOB: self.job_id, TX_SHARD: result.shard_id}
        if create:  # the dataset's schema metadata says what its rows are, as the other formats' properties do
            rows = rows.replace_schema_metadata({**(rows.schema.metadata or {}),
                                                 **{k.encode(): v.encode() for k, v in
                                                    table_properties(rows, self.job_id).items()}})  # fmt: skip
        lance.write_dataset(rows, self._where.uri, mode="create" if create else "append",
                            transaction_properties=properties, storage_options=self._lance_options,
                            **self._where.kwargs(create))  # fmt: skip
        crash_point("table:committed")
        self._committed.add(result.shard_id)
        return 1

    def _latest(self):
        """The dataset at its latest version (None before it exists), the new versions' shards recorded."""
        import lance

        try:
            dataset = lance.dataset(self._where.uri, storage_options=self._lance_options, **self._where.kwargs())
        except (FileNotFoundError, ValueError):
            return None
        except Exception as exc:  # the namespace's TableNotFoundError (lance_namespace is imported only with one)
            if type(exc).__name__ != "TableNotFoundError":
                raise
            return None
        for version in range(self._seen + 1, dataset.latest_version + 1):
            transaction = dataset.read_transaction(version)
            props = (transaction.transaction_properties or {}) if transaction else {}
            if props.get(TX_JOB) == self.job_id and TX_SHARD in props:
                self._committed.add(props[TX_SHARD])
        self._seen = max(self._seen, dataset.latest_version)
        return dataset

    @staticmethod
    def _dataset_width(dataset) -> int | None:
        kind = dataset.schema.field("embedding").type
        return kind.list_size if pa.types.is_fixed_size_list(kind) else None
