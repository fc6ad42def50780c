"""Per-shard Parquet writer with a commit protocol that never shows a reader a partial file.

Commit order for shard S of an output prefix O:
1. write the Parquet file locally, upload it to `O/_tmp/S.<attempt>.<nonce>.partial`
   (not a .parquet name, so `O/*.parquet` globs never match it);
2. move it to `O/data/part-S.parquet` (local: os.replace; S3: server-side copy, itself atomic);
3. write `O/_done/S.json`, the shard's done-marker with its row counts, error kinds (schemas.output.ErrorKind, as
   the rows' `error_kind` column), key range, the data file's name relative to O and size (a resume checks the file
   is still there at that size; a copied output reads whole) and the node that wrote it.
The names are schemas.layout's, which the driver reads by (the driver's modules are never imported here).
A crash between steps leaves at worst a stray temp object, or a complete data file that the
retry overwrites byte-for-byte with the same rows: never a duplicate, never a half file.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from datetime import UTC, datetime
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.layout import data_name, join, marker_uri, temp_uri
from schemas.output import LABEL_SCHEMA, ErrorKind, error_kind_of
from schemas.shards import MARKER_FORMAT, ShardResult, ShardTask
from workers.io.storage import Storage

log = logging.getLogger(__name__)

PARQUET_COMPRESSION = "zstd"
# Few distinct values each: dictionary pages pay.
DICTIONARY_COLUMNS = ["shard", "model", "job_id", "label", "error_kind", "given_label"]


class RowMeta(NamedTuple):
    """What a row knows before the model: from the reader (key, source, given label, sidecar) and the decode
    threads (size, error, image id). The first five fields are positional, as older callers build them."""

    key: str
    source: str
    width: int | None
    height: int | None
    error: str | None
    image_id: str | None = None  # sha256 hex of the image bytes
    given_label: str | None = None
    sidecar: str | None = None  # JSON text


class ShardWriter:
    """Collects one shard's rows column by column, then commits them as one Parquet file."""

    def __init__(self, task: ShardTask, categories: list[str], model_id: str, job_id: str):
        self.task = task
        self.categories = np.asarray(categories, dtype=object)
        self.model_id = model_id
        self.job_id = job_id
        self._columns: dict[str, list] = {name: [] for name in RowMeta._fields}
        self._indices: list[np.ndarray] = []  # (n, k) per batch; -1 rows for errors
        self._scores: list[np.ndarray] = []
        self._embeddings: list[np.ndarray | None] = []
        self._probabilities: list[np.ndarray | None] = []
        self._ok: list[np.ndarray] = []

    @property
    def rows(self) -> int:
        return len(self._columns["key"])

    def add(self, meta: list[tuple], indices, scores, embeddings, probabilities=None) -> None:
        """Append a batch. `meta` is a RowMeta (or its first five fields as a tuple) per row; arrays cover the
        rows without error, in order (None when the whole batch failed, or the column is not kept)."""
        rows = [row if isinstance(row, RowMeta) else RowMeta(*row) for row in meta]
        ok = np.array([row.error is None for row in rows], dtype=bool)
        for row in rows:
            for name, value in zip(RowMeta._fields, row, strict=True):
                self._columns[name].append(value)
        self._ok.append(ok)
        self._indices.append(indices)
        self._scores.append(scores)
        self._embeddings.append(embeddings)
        self._probabilities.append(probabilities)

    def to_table(self) -> pa.Table:
        ok = np.concatenate(self._ok) if self._ok else np.zeros(0, dtype=bool)
        n = len(ok)
        indices = _stack([a for a in self._indices if a is not None], np.int32)
        scores = _stack([a for a in self._scores if a is not None], np.float32)
        embeds = [e for e in self._embeddings if e is not None]
        embeddings = np.concatenate(embeds) if embeds else None
        probs = [p for p in self._probabilities if p is not None]
        probabilities = np.concatenate(probs).astype(np.float32, copy=False) if probs else None
        top1 = indices[:, 0] if indices.size else np.zeros(0, np.int32)
        label_index = _scatter(top1, ok, pa.int32())
        columns = {
            "key": pa.array(self._columns["key"], pa.string()),
            "source": pa.array(self._columns["source"], pa.string()),
            "shard": pa.array([self.task.shard_id] * n, pa.string()),
            "label": _scatter(self.categories[top1] if top1.size else np.zeros(0, object), ok, pa.string()),
            "label_index": label_index,
            "score": _scatter(scores[:, 0] if scores.size else np.zeros(0, np.float32), ok, pa.float32()),
            "topk_labels": _scatter_lists(self.categories[indices] if indices.size else None, ok, pa.string()),
            "topk_indices": _scatter_lists(indices if indices.size else None, ok, pa.int32()),
            "topk_scores": _scatter_lists(scores if scores.size else None, ok, pa.float32()),
            # Embeddings disabled (no batch carried any): null for every row, not an empty list.
            "embedding": (
                _scatter_lists(embeddings, ok, pa.float32())
                if embeddings is not None
                else pa.nulls(n, pa.list_(pa.float32()))
            ),
            "width": pa.array(self._columns["width"], pa.int32()),
            "height": pa.array(self._columns["height"], pa.int32()),
            "error": pa.array(self._columns["error"], pa.string()),
            "error_kind": pa.array([error_kind_of(e).value for e in self._columns["error"]], pa.string()),
            "image_id": pa.array(self._columns["image_id"], pa.string()),
            "given_label": pa.array(self._columns["given_label"], pa.string()),
            "sidecar": pa.array(self._columns["sidecar"], pa.string()),
            "probabilities": (
                _scatter_lists(probabilities, ok, pa.float32())
                if probabilities is not None
                else pa.nulls(n, pa.list_(pa.float32()))
            ),
            "model": pa.array([self.model_id] * n, pa.string()),
            "job_id": pa.array([self.job_id] * n, pa.string()),
        }
        return pa.Table.from_arrays([columns[f.name] for f in LABEL_SCHEMA], schema=LABEL_SCHEMA)

    def commit(self, storage: Storage, output: str, scratch_dir: str, attempt: int, stats: dict) -> ShardResult:
        """Write, publish and mark the shard done; returns the marker's content."""
        started = time.perf_counter()
        table = self.to_table()
        shard_id = self.task.shard_id
        local = os.path.join(scratch_dir, f"{shard_id}.{uuid.uuid4().hex[:8]}.parquet")
        pq.write_table(table, local, compression=PARQUET_COMPRESSION, use_dictionary=DICTIONARY_COLUMNS)
        data_bytes = os.path.getsize(local)
        temp = temp_uri(output, shard_id, attempt, uuid.uuid4().hex[:8])
        try:
            storage.upload_file(local, temp)
        finally:
            os.unlink(local)
        final = data_name(shard_id)
        storage.move(temp, join(output, final))
        if stats.get("stages") is not None:  # the commit, up to the marker, is the shard's write stage too
            stats = {**stats, "stages": stats["stages"].plus("write", time.perf_counter() - started)}
        result = ShardResult(
            shard_id=shard_id,
            job_id=self.job_id,
            fingerprint=self.task.fingerprint(),
            data=final,
            rows=table.num_rows,
            errors=table.num_rows - int(pc.sum(table["error"].is_null()).as_py() or 0),
            attempt=attempt,
            committed_at=datetime.now(UTC),
            marker_format=MARKER_FORMAT,
            data_bytes=data_bytes,
            first_key=self.task.keys[0] if self.task.keys else None,
            last_key=self.task.keys[-1] if self.task.keys else None,
            **error_counts(self._columns["key"], self._columns["error"]),
            host=socket.gethostname(),
            node_id=node_id(),
            **stats,
        )
        storage.write_bytes(marker_uri(output, shard_id), result.model_dump_json().encode())
        return result


def error_counts(keys: list[str], errors: list[str | None]) -> dict:
    """`error_kinds` (ErrorKind value → rows) and `error_examples` (kind → one key) of a shard, for its done-marker:
    the same kinds as its rows' `error_kind` column."""
    kinds: dict[str, int] = {}
    examples: dict[str, str] = {}
    for key, error in zip(keys, errors, strict=True):
        if error is not None:
            kind: ErrorKind = error_kind_of(error)
            kinds[kind.value] = kinds.get(kind.value, 0) + 1
            examples.setdefault(kind.value, key)
    return {"error_kinds": kinds, "error_examples": examples}


def node_id() -> str | None:
    """The Ray node this process runs on (None outside Ray, as in-process tests run the writer)."""
    try:
        import ray  # here, not at the top: the writer runs without Ray in tests and on the driver's compaction path

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except ImportError:
        return None


def _stack(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros((0, 0), dtype)


def _scatter(values: np.ndarray, ok: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A column with `values` at the ok rows and null at the error rows."""
    if ok.all():
        return pa.array(values, type_)
    full = np.empty(len(ok), dtype=object)
    full[ok] = list(values)
    full[~ok] = None
    return pa.array(full.tolist(), type_)


def _scatter_lists(matrix: np.ndarray | None, ok: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list column built from a (rows_ok, width) matrix without per-row Python lists; null at error rows."""
    width = 0 if matrix is None else matrix.shape[1]
    flat = pa.array([] if matrix is None else matrix.reshape(-1), value_type)
    lengths = np.where(ok, width, 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())
    mask = pa.array(~ok) if not ok.all() else None
    return pa.ListArray.from_arrays(offsets, flat, type=pa.list_(value_type), mask=mask)
