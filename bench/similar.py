"""`python -m bench.similar`: exact vs ANN index for `bulklabel similar`, to place the row count where the index
takes over (jobs.output.query.INDEX_MIN_ROWS) and to choose its lists and probes (jobs.output.index).

For each size: synthetic embeddings of width 1280 (MobileNetV2's) written as real label-output Parquet files (the
LABEL_SCHEMA, 10,000 rows a file); then
- exact: the product's exact search (DuckDB, one cosine per row over the files), median of 3 queries;
- index: build time (two scans: a training sample, then every row), size on disk, cold query (load the cached
  entry memory-mapped + search) and warm query (search only) at several nprobe, median of 20 queries;
- recall@10 of the index against the true top 10 (numpy, float64, computed while the data is generated).
The embeddings are clustered like a classifier's features: 1,000 non-negative centres, each row a centre plus
Gaussian noise, then ReLU (uniform random vectors would be no test for an IVF index: they have no neighbours).
The machine is shared: `os.getloadavg()` is printed before each size.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from jobs.output.index import lists_for, open_index, probes_for
from jobs.output.query import _similar_exact
from jobs.output.reader import LabelOutput
from schemas.output import LABEL_SCHEMA, ErrorKind

log = logging.getLogger("bench.similar")

DIM = 1280
CENTRES = 1000
NOISE = 0.8
ROWS_PER_FILE = 10_000
QUERIES = 50  # for recall@10
K = 10
NPROBES = (8, 16, 32, 48, 64, 128)


def _chunk(rng: np.random.Generator, centres: np.ndarray, rows: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centres), rows)
    vectors = centres[labels] + noise * rng.standard_normal((rows, DIM), dtype=np.float32)
    return np.maximum(vectors, 0, out=vectors), labels


def _table(start: int, vectors: np.ndarray, labels: np.ndarray) -> pa.Table:
    n = len(vectors)
    keys = pa.array([f"img-{start + i:08d}.jpg" for i in range(n)])
    offsets = pa.array(np.arange(0, (n + 1) * DIM, DIM, dtype=np.int32))
    columns = {
        "key": keys,
        "source": pa.array([f"/bench/img-{start + i:08d}.jpg" for i in range(n)]),
        "shard": pa.array([f"bench-{start // ROWS_PER_FILE:05d}"] * n),
        "label": pa.array([f"class-{c}" for c in labels]),
        "label_index": pa.array(labels.astype(np.int32)),
        "score": pa.array(np.full(n, 0.5, np.float32)),
        "embedding": pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1))),
        "model": pa.array(["bench:synthetic"] * n),
        "job_id": pa.array(["bench"] * n),
        "error_kind": pa.array([ErrorKind.NONE.value] * n),
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in LABEL_SCHEMA}, schema=LABEL_SCHEMA)


def make_output(
    folder: Path, rows: int, centres: int = CENTRES, noise: float = NOISE, seed: int = 0
) -> tuple[LabelOutput, list[str], list[set[str]]]:
    """Write `rows` synthetic rows as Parquet files; returns the output, the query keys and each query's true top-K
    keys."""
    folder.mkdir(parents=True)
    files = []

    def write(start: int, table: pa.Table) -> None:
        path = folder / f"part-{start // ROWS_PER_FILE:05d}.parquet"
        pq.write_table(table, path, compression="zstd")
        files.append(str(path))

    keys, truth = synthetic_rows(write, rows, centres, noise, seed)
    return LabelOutput(str(folder), "bench", False, None, tuple(files), pafs.LocalFileSystem()), keys, truth


def synthetic_rows(
    write: Callable[[int, pa.Table], None], rows: int, centres: int = CENTRES, noise: float = NOISE, seed: int = 0
) -> tuple[list[str], list[set[str]]]:
    """Hand `write` `rows` synthetic label rows, ROWS_PER_FILE at a time; returns the query keys and each query's
    true top-K keys."""
    rng = np.random.default_rng(seed)
    centre_vectors = np.abs(rng.standard_normal((centres, DIM), dtype=np.float32))
    queries = None
    best_sims = best_ids = None
    for start in range(0, rows, ROWS_PER_FILE):
        vectors, labels = _chunk(rng, centre_vectors, min(ROWS_PER_FILE, rows - start), noise)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        if queries is None:
            picks = rng.choice(len(unit), QUERIES, replace=False)
            queries, query_ids = unit[picks].astype(np.float64), picks
        sims = queries @ unit.T.astype(np.float64)
        ids = np.broadcast_to(np.arange(start, start + len(unit)), sims.shape)
        if best_sims is not None:
            sims, ids = np.hstack([best_sims, sims]), np.hstack([best_ids, ids])
        top = np.argsort(-sims, axis=1)[:, :K]
        best_sims, best_ids = np.take_along_axis(sims, top, 1), np.take_along_axis(ids, top, 1)
        write(start, _table(start, vectors, labels))
    keys = [f"img-{i:08d}.jpg" for i in query_ids]
    truth = [{f"img-{i:08d}.jpg" for i in row} for row in best_ids]
    return keys, truth


def median_s(fn, args_list) -> float:
    times = []
    for args in args_list:
        started = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _cold_query(output: LabelOutput, cache: Path, key: str) -> None:
    """What a `similar` command pays once the index is cached: open the entry (memory-mapped), find, search."""
    index = open_index(output, cache)
    index.search(index.row_of(key)[0], K)


def bench_size(rows: int, work: Path, centres: int, noise: float) -> dict:
    print(f"\n== {rows:,} rows x {DIM}; load average {os.getloadavg()}", flush=True)
    started = time.perf_counter()
    output, keys, truth = make_output(work / f"out-{rows}", rows, centres, noise)
    data_gb = sum(os.path.getsize(f) for f in output.files) / 1e9
    print(f"data: {len(output.files)} files, {data_gb:.2f} GB, written in {time.perf_counter() - started:.0f} s")
    exact_hits: list[set[str]] = []
    exact_s = median_s(lambda key: exact_hits.append({n.key for n in _similar_exact(output, key, K)}),
                        [(key,) for key in keys[:3]])  # fmt: skip
    print(f"exact (DuckDB scan): {exact_s * 1000:.0f} ms/query; agrees with numpy: {exact_hits == truth[:3]}")

    cache = work / f"cache-{rows}"
    started = time.perf_counter()
    index = open_index(output, cache)  # nothing cached yet: builds
    build_s = time.perf_counter() - started
    index_mb = sum(p.stat().st_size for p in index.path.iterdir()) / 1e6
    print(f"index build: {build_s:.1f} s (nlist {lists_for(rows)}), {index_mb:.0f} MB on disk; load {os.getloadavg()}")
    cold_s = median_s(_cold_query, [(output, cache, key) for key in keys[:5]])
    result = {"rows": rows, "exact_ms": exact_s * 1000, "build_s": build_s, "index_mb": index_mb,
              "cold_ms": cold_s * 1000, "nprobe": {}, "default": probes_for(lists_for(rows))}  # fmt: skip
    rows_of = [index.row_of(key)[0] for key in keys]
    default = probes_for(lists_for(rows))
    for nprobe in sorted({*NPROBES, default}):
        warm_s = median_s(lambda r, p=nprobe: index.search(r, K, p), [(r,) for r in rows_of[:20]])
        found = [{hit[0] for hit in index.search(r, K, nprobe)} for r in rows_of]
        recall = statistics.mean(len(hits & true) / K for hits, true in zip(found, truth, strict=True))
        result["nprobe"][nprobe] = (warm_s * 1000, recall)
        print(f"index nprobe {nprobe:>3}: {warm_s * 1000:7.2f} ms/query warm, recall@10 {recall:.3f}"
              + ("  <- default" if nprobe == default else ""))  # fmt: skip
    print(f"index cold (load the cached entry + search, nprobe {default}): {cold_s * 1000:.0f} ms/query")
    shutil.rmtree(work / f"out-{rows}")
    shutil.rmtree(cache)
    return result


def run_sizes(prog: str, description: str, default_sizes: str, bench: Callable[..., dict], argv: list[str] | None
              ) -> tuple[argparse.Namespace, list[dict]]:  # fmt: skip
    """The command line every similar bench shares: parse it, run `bench(rows, work, centres, noise)` per size in a
    scratch folder (removed unless --work names one), and return the arguments and results."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--sizes", default=default_sizes, help="row counts, comma-separated")
    parser.add_argument("--centres", type=int, default=CENTRES, help="clusters of the synthetic embeddings")
    parser.add_argument("--noise", type=float, default=NOISE, help="noise around each centre (harder: larger)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-similar-"))
    print(f"{prog}: width {DIM}, {args.centres} clusters, noise {args.noise}, k={K}, {QUERIES} recall queries; cpus "
          f"{os.cpu_count()}; load average {os.getloadavg()}")  # fmt: skip
    try:
        return args, [bench(int(size), work, args.centres, args.noise) for size in args.sizes.split(",")]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    _, results = run_sizes("python -m bench.similar", __doc__.splitlines()[0], "10000,100000,300000,1000000",
                           bench_size, argv)  # fmt: skip
    print("\nrows       exact ms  build s  index MB  cold ms  nprobe: warm ms/recall@10 (* default)")
    for r in results:
        marks = {p: "*" if p == r["default"] else "" for p in r["nprobe"]}
        cells = "  ".join(f"{p}{marks[p]}: {ms:.1f}/{rec:.3f}" for p, (ms, rec) in r["nprobe"].items())
        print(f"{r['rows']:>9,}  {r['exact_ms']:8.0f}  {r['build_s']:7.1f}  {r['index_mb']:8.0f}  {r['cold_ms']:7.0f}  "
              f"{cells}")  # fmt: skip
    print(f"load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
