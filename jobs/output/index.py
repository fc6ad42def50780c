"""An approximate nearest-neighbour index of a label output's embeddings, for `bulklabel similar` on large outputs.

faiss-cpu (a PyPI wheel, in process, no server) rather than DuckDB's vss extension, which DuckDB downloads on
first use and an offline machine cannot. The index is IVF with float16 vectors (`IVF<nlist>,SQfp16`, inner product
on L2-normalised embeddings: cosine): half the bytes of the float32 rows, similarities within ~1e-3 of exact,
and read back memory-mapped, so a query touches only the lists it probes. nlist and nprobe come from
`python -m bench.similar` (bench/RESULTS.md), as does the row count above which `similar` uses the index at all.

Built lazily, on the first `similar` that needs it, and cached in a local folder (`$BULKLABEL_CACHE_DIR`, else
`$XDG_CACHE_HOME/bulklabel`, else `~/.cache/bulklabel`), never beside the output: the output prefix holds only
files bulklabel's writer owns (a foreign file there would refuse the job's resume). An entry is keyed by the
output's URI and by what its rows were built from: the job id, the manifest's generation and finish time, and every
committed file's name, size and ETag (S3) or mtime in ns (local), from one listing. Names alone are not enough: an
output deleted and labelled again from other photos has the same job id and file names. A resumed, extended,
compacted or relabelled output gets a new index; entries of the same output's older committed sets are removed
when the new one is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.output.reader import LabelOutput
from schemas.specs import StorageOptions
from workers.io.storage import open_storage

log = logging.getLogger(__name__)

INDEX_FORMAT = 2  # bump when what an entry holds changes: older entries are then rebuilt, never misread
# From bench.similar (bench/RESULTS.md, "similar: exact vs ANN index"): sqrt(n) lists of about sqrt(n) rows, and a
# quarter of them probed (at least 48): recall@10 1.000 on well-clustered embeddings and ~0.95 on diffuse ones
# (20,000 clusters), where 48 probes gave 0.71-0.81. A probe costs far less than the exact scan's Parquet reads.
LIST_FACTOR = 1.0
MIN_LISTS, MAX_LISTS = 1, 4096
PROBE_FRACTION = 0.25
MIN_PROBES = 48
TRAIN_PER_LIST = 40  # k-means training rows per list (faiss warns below 39)
_BATCH_ROWS = 8192
_ID_COLUMNS = ("key", "source", "image_id")  # what a query may name an image by (image_id where the rows have one)
_ROW_COLUMNS = ("key", "source", "label", "score")


# A neighbour: its row's key, top-1 label and score, and the cosine similarity to the query.
Hit = tuple[str, str | None, float | None, float]


def cache_root() -> Path:
    """Where index entries live (see the module docstring)."""
    if os.environ.get("BULKLABEL_CACHE_DIR"):
        return Path(os.environ["BULKLABEL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bulklabel"


def committed_set_key(output: LabelOutput, options: StorageOptions | None = None) -> str:
    """Identifies what the committed rows were built from (see the module docstring): one listing of the output
    gives each file's size and ETag or mtime, so a file written again under its old name changes the key."""
    stamps = {o.uri: (o.size, o.etag) for o in open_storage(output.uri, options).list(output.uri)}
    manifest = output.manifest
    identity = json.dumps([
        INDEX_FORMAT, output.job_id, manifest.generation if manifest else None,
        manifest.finished_at.isoformat() if manifest else None,
        [(uri, *stamps.get(uri, (None, ""))) for uri in output.files],
    ])  # fmt: skip
    return hashlib.sha256(identity.encode()).hexdigest()[:20]


def _output_key(output: LabelOutput) -> str:
    return hashlib.sha256(output.uri.encode()).hexdigest()[:16]


def entry_path(output: LabelOutput, root: Path | None = None, options: StorageOptions | None = None) -> Path:
    """The cache folder of `output`'s index at its current committed set."""
    return (root or cache_root()) / "similar" / f"{_output_key(output)}-{committed_set_key(output, options)}"


class EmbeddingIndex:
    """A built (or cached) index: faiss ids are row numbers of `rows` (key, source, label, score[, image_id])."""

    def __init__(self, index: faiss.Index, rows: pa.Table, path: Path):
        self.index, self.rows, self.path = index, rows, path

    @property
    def size(self) -> int:
        return self.index.ntotal

    def row_of(self, name: str) -> tuple[int, str] | None:
        """(id, column) of the first row whose key, source or image_id is `name`, in that order; None if none."""
        for column in _ID_COLUMNS:
            if column not in self.rows.column_names:
                continue
            found = pc.indices_nonzero(pc.equal(self.rows.column(column), name))
            if len(found):
                return found[0].as_py(), column
        return None

    def search(self, row: int, k: int, nprobe: int | None = None) -> list[Hit]:
        """The `k` rows nearest row `row`, most similar first (ties by key, as the exact search orders them);
        `nprobe` lists searched (default: probes_for the index's lists)."""
        query = self.index.reconstruct(row).reshape(1, -1)
        ivf = faiss.extract_index_ivf(self.index)
        ivf.nprobe = nprobe or probes_for(ivf.nlist)
        extra = min(self.size, k + 16)  # a margin so ties at the k-th place are cut by key, not by list order
        sims, ids = self.index.search(query, extra)
        found = [(float(s), int(i)) for s, i in zip(sims[0], ids[0], strict=True) if i >= 0]
        keys = self.rows.column("key")
        found.sort(key=lambda pair: (-round(pair[0], 5), keys[pair[1]].as_py()))
        labels, scores = self.rows.column("label"), self.rows.column("score")
        return [(keys[i].as_py(), labels[i].as_py(), scores[i].as_py(), s) for s, i in found[:k]]


def open_index(output: LabelOutput, root: Path | None = None, options: StorageOptions | None = None) -> EmbeddingIndex:
    """The index of `output` at its committed set: from the cache, else built now (and cached)."""
    path = entry_path(output, root, options)
    if (path / "index.faiss").exists():
        log.info("similar: using the cached index %s", path)
        return _load(path)
    started = time.perf_counter()
    built = build(output, path)
    log.info("similar: indexed %d rows of %s in %.1f s (cached in %s)", built.size, output.uri,
             time.perf_counter() - started, path)  # fmt: skip
    _prune(path)
    return built


def _load(path: Path) -> EmbeddingIndex:
    index = faiss.read_index(str(path / "index.faiss"), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    return EmbeddingIndex(index, pq.read_table(path / "rows.parquet"), path)


def build(output: LabelOutput, path: Path, nlist: int | None = None) -> EmbeddingIndex:
    """Index every committed row that has an embedding; written to a temporary folder, then renamed to `path`
    (two processes building at once: one rename wins, the other's entry is dropped)."""
    total = output.dataset().count_rows(filter=pc.field("embedding").is_valid())
    if total == 0:
        raise ValueError(f"output {output.uri} has no embeddings to index")
    nlist = nlist or lists_for(total)
    sample = _training_sample(output, total, nlist * TRAIN_PER_LIST)
    dim = sample.shape[1]
    index = faiss.index_factory(dim, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
    index.train(sample)
    del sample
    tables = []
    for rows, vectors in _batches(output):
        index.add(vectors)
        tables.append(rows)
    faiss.extract_index_ivf(index).make_direct_map()
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    faiss.write_index(index, str(temp / "index.faiss"))
    pq.write_table(pa.concat_tables(tables), temp / "rows.parquet")
    try:
        temp.rename(path)
    except OSError:  # another process cached the same committed set first: use its entry
        shutil.rmtree(temp, ignore_errors=True)
    return _load(path)


def lists_for(rows: int) -> int:
    """IVF lists for `rows` vectors (see LIST_FACTOR)."""
    return int(min(MAX_LISTS, max(MIN_LISTS, round(LIST_FACTOR * math.sqrt(rows)), 1), max(1, rows // 39)))


def probes_for(nlist: int) -> int:
    """IVF lists probed per query (see PROBE_FRACTION)."""
    return min(nlist, max(MIN_PROBES, round(PROBE_FRACTION * nlist)))


def _batches(output: LabelOutput) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """(rows, L2-normalised float32 embeddings) of the committed rows with an embedding, in scan order."""
    columns = [*_ROW_COLUMNS, *(c for c in _ID_COLUMNS if c not in _ROW_COLUMNS), "embedding"]
    present = [c for c in columns if c in output.dataset().schema.names]
    scanner = output.dataset().scanner(columns=present, filter=pc.field("embedding").is_valid(),
                                       batch_size=_BATCH_ROWS)  # fmt: skip
    for batch in scanner.to_batches():
        if batch.num_rows == 0:
            continue
        embedding = batch.column("embedding")
        values = embedding.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        vectors = np.ascontiguousarray(values.reshape(batch.num_rows, -1))
        faiss.normalize_L2(vectors)
        yield pa.Table.from_batches([batch.drop_columns(["embedding"])]), vectors


def _training_sample(output: LabelOutput, total: int, wanted: int) -> np.ndarray:
    """An evenly spaced sample of about `wanted` vectors (every n-th row: the scan order follows the shards, so a
    prefix would train on the first shards' images only)."""
    step = max(1, total // max(wanted, 1))
    parts, seen = [], 0
    for _, vectors in _batches(output):
        first = (-seen) % step
        parts.append(vectors[first::step])
        seen += len(vectors)
    return np.ascontiguousarray(np.concatenate(parts))


def _prune(current: Path) -> None:
    """Remove the entries of the same output at older committed sets (a temporary folder, perhaps another process's
    build in progress, is left alone)."""
    prefix = current.name.split("-", 1)[0]
    for entry in current.parent.iterdir():
        if entry.name.startswith(prefix + "-") and entry != current:
            log.info("similar: removing the index of an older committed set, %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
