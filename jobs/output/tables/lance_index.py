"""The ANN index of a Lance output's embeddings (IVF_PQ, cosine), built at the end of the job, and the search that
`bulklabel similar` runs through it.

Lance keeps the index inside the dataset (a commit of its own), so every reader of the dataset (LanceDB, FiftyOne,
`similar`) gets it, and rows appended later (a resumed job) are searched exactly beside it until the next job end
folds them in (`optimize_indices`). Parameters come from `python -m bench.lance_similar` (bench/RESULTS.md):
- built from INDEX_MIN_ROWS embeddings on: there a flat scan takes a quarter of a second a query (the index 10-55 ms),
  and the build (~1 s per 1,000 rows on 2 cores, most of it PQ training) costs a few percent of labelling them;
- an IVF partition per ROWS_PER_PARTITION rows, and PQ sub-vectors of 16 dimensions (1280: 80 codes of 8 bits);
- a query probes PROBE_FRACTION of the partitions (at least MIN_PROBES) and re-ranks the best MIN_REFINED candidates
  of the PQ codes on their stored float32 vectors, so the similarities it prints are exact and the order is the
  exact search's.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from jobs.output.tables.sink import object_store_options
from schemas.layout import join, table_uri
from schemas.specs import StorageOptions
from workers.io.storage import open_storage

log = logging.getLogger(__name__)

COLUMN, INDEX_NAME, METRIC = "embedding", "embedding_idx", "cosine"
INDEX_MIN_ROWS = 30_000
# 8-bit PQ codebooks need 256 training vectors (fewer, and Lance leaves every row unindexed); below that 4-bit ones
# (16 centroids) serve an index forced onto a small output (tests), never one that `auto` would build.
PQ_MIN_ROWS, PQ4_MIN_ROWS = 256, 16
SUB_VECTOR_DIMS = 16
ROWS_PER_PARTITION = 4096
MAX_PARTITIONS = 4096
PROBE_FRACTION = 0.25
MIN_PROBES = 16
MIN_REFINED = 2000  # candidates re-ranked on their vectors (k=10: 200 x k); all of them in a small output


def partitions_for(rows: int) -> int:
    """One partition per ROWS_PER_PARTITION rows. Not sqrt(rows), as for faiss (jobs.output.index): k-means over
    sqrt(n) centroids made the build O(n^1.5), 33 s at 30,000 rows on 2 cores, while a query's cost hardly moves
    with the rows a partition holds (PQ codes are 80 bytes)."""
    return max(1, min(MAX_PARTITIONS, rows // ROWS_PER_PARTITION))


def sub_vectors_for(width: int) -> int:
    """The number of PQ codes: width / 16 where 16 divides it, else the largest divisor of width below that."""
    target = max(1, width // SUB_VECTOR_DIMS)
    return next(d for d in range(target, 0, -1) if width % d == 0)


def probes_for(partitions: int) -> int:
    return min(partitions, max(MIN_PROBES, math.ceil(partitions * PROBE_FRACTION)))


def _index(dataset):
    return next((index for index in dataset.describe_indices() if COLUMN in index.field_names), None)


def has_index(dataset) -> bool:
    return _index(dataset) is not None


def vector_rows(dataset) -> int:
    return dataset.count_rows(filter=f"{COLUMN} IS NOT NULL")


def indexed_vectors(output: str, options: StorageOptions | None = None):
    """The Lance dataset of a label output when it has a vector index, else None (no Lance table, or no index):
    one listing of the table's index folder, and `lance` imported only when there is one."""
    indices = join(table_uri(output), "_indices")
    if next(iter(open_storage(output, options).list(indices + "/")), None) is None:
        return None
    import lance

    dataset = lance.dataset(table_uri(output), storage_options=object_store_options(table_uri(output), options))
    return dataset if has_index(dataset) else None


def index_vectors(dataset, min_rows: int = INDEX_MIN_ROWS):
    """Build the index when the dataset has `min_rows` vectors and none yet; fold rows appended since into an
    existing one. Returns the dataset at its new version (the same one when nothing was done)."""
    index = _index(dataset)
    if index is not None:
        new = dataset.count_rows() - index.num_rows_indexed  # rows appended since (it counts null vectors too)
        if new > 0:
            dataset.optimize.optimize_indices(index_names=[index.name])
            log.info("vector index of %s: %d new rows folded in", dataset.uri, new)
        return dataset
    rows = vector_rows(dataset)
    if rows < max(min_rows, PQ4_MIN_ROWS):
        log.info("no vector index for %s: %d embeddings, an index from %d on", dataset.uri, rows, min_rows)
        return dataset
    width = dataset.schema.field(COLUMN).type.list_size
    partitions, codes = partitions_for(rows), sub_vectors_for(width)
    dataset = dataset.create_index(COLUMN, "IVF_PQ", name=INDEX_NAME, metric=METRIC, num_partitions=partitions,
                                   num_sub_vectors=codes, num_bits=8 if rows >= PQ_MIN_ROWS else 4)  # fmt: skip
    log.info("vector index of %s: IVF_PQ over %d embeddings, %d partitions, %d codes", dataset.uri, rows, partitions,
             codes)  # fmt: skip
    return dataset


def nearest(dataset, vector: np.ndarray, k: int, columns: list[str], nprobes: int | None = None,
            refined: int = MIN_REFINED):  # fmt: skip
    """The `k` rows nearest `vector` by cosine (a pyarrow table with `_distance`, 1 - cosine), through the index
    when the dataset has one (probing `nprobes` partitions, default probes_for; the best `refined` candidates
    re-ranked on their vectors), else by a flat scan."""
    query = {"column": COLUMN, "q": np.asarray(vector, np.float32), "k": k, "metric": METRIC}
    index = _index(dataset)
    if index is not None:  # the partitions it was built with (its stats would also copy out every centroid)
        partitions = partitions_for(index.num_rows_indexed)
        query |= {"nprobes": nprobes or probes_for(partitions), "refine_factor": math.ceil(refined / k)}
    # No filter for the null vectors (error rows): Lance leaves them out of a search by itself, and a prefilter on
    # the vector column would read every vector, which the index is there to avoid.
    return dataset.to_table(columns=columns, nearest=query)
