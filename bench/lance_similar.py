"""`python -m bench.lance_similar`: `bulklabel similar` on a Lance output, flat scan against the IVF_PQ index that a
label job builds at its end (jobs.output.tables.lance_index): where the index pays (INDEX_MIN_ROWS), what it costs to
build, and its recall@10 against the exact top 10 at each probe count.

For each size: the synthetic embeddings of bench.similar (width 1280, clustered like a classifier's features) as a
real Lance output's dataset (the label rows, the embedding a fixed-size float32 vector, appended a file's rows at a
time as the sink appends shards); then
- flat: Lance's exact cosine scan (what `similar` runs on a Lance output without an index), median of 5 queries;
- index: build time (the product's parameters), then per nprobe the median query time of 20 queries (the best
  MIN_REFINED candidates re-ranked on their stored vectors, as the product queries) and recall@10 over 50 queries
  against numpy's exact top 10 (float64, computed while the data is generated).
The machine is shared: the load average is printed before each size.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.similar import K, median_s, run_sizes, synthetic_rows
from jobs.output.tables.lance import as_vectors
from jobs.output.tables.lance_index import MIN_REFINED, index_vectors, nearest, partitions_for, probes_for

log = logging.getLogger("bench.lance_similar")

NPROBES = (4, 8, 16, 32, 64)
REFINED = (100, 500, 2000, 5000)  # candidates re-ranked on their stored vectors (the product: MIN_REFINED)


def _write_dataset(uri: str, rows: int, centres: int, noise: float) -> tuple[list[str], list[set[str]]]:
    import lance

    def write(start: int, table: pa.Table) -> None:
        vectors = as_vectors(table, len(table["embedding"][0]))
        lance.write_dataset(vectors, uri, mode="append" if start else "create")

    return synthetic_rows(write, rows, centres, noise)


def _vector_of(dataset, key: str) -> np.ndarray:
    row = dataset.to_table(columns=["embedding"], filter=f"key = '{key}'")
    return np.asarray(row["embedding"][0].values, np.float32)


def _median_ms(fn, args_list) -> float:
    return median_s(fn, args_list) * 1000


def bench_size(rows: int, work: Path, centres: int, noise: float) -> dict:
    import lance

    print(f"\n== {rows:,} rows; load average {os.getloadavg()}", flush=True)
    uri = str(work / f"lance-{rows}")
    started = time.perf_counter()
    keys, truth = _write_dataset(uri, rows, centres, noise)
    dataset = lance.dataset(uri)
    print(f"data: {dataset.count_rows():,} rows in {len(dataset.get_fragments())} fragments, written in "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    queries = [_vector_of(dataset, key) for key in keys]

    def top(ds, q, nprobe=None, refined=MIN_REFINED) -> set[str]:
        return set(nearest(ds, q, K, ["key"], nprobe, refined)["key"].to_pylist())

    flat_ms = _median_ms(lambda q: top(dataset, q), [(q,) for q in queries[:5]])
    flat_recall = statistics.mean(len(top(dataset, q) & t) / K for q, t in zip(queries[:5], truth, strict=False))
    print(f"flat (Lance exact scan): {flat_ms:.0f} ms/query, recall@10 {flat_recall:.3f}", flush=True)

    started = time.perf_counter()
    indexed = index_vectors(dataset, min_rows=0)
    build_s = time.perf_counter() - started
    partitions = partitions_for(rows)
    result = {"rows": rows, "flat_ms": flat_ms, "build_s": build_s, "partitions": partitions,
              "default": probes_for(partitions), "nprobe": {}, "refined": {}}  # fmt: skip
    print(f"index build: {build_s:.1f} s ({partitions} partitions); load {os.getloadavg()}", flush=True)
    for nprobe in sorted({p for p in NPROBES if p <= partitions} | {result["default"]}):
        ms = _median_ms(lambda q, p=nprobe: top(indexed, q, p), [(q,) for q in queries[:20]])
        recall = statistics.mean(len(top(indexed, q, nprobe) & t) / K for q, t in zip(queries, truth, strict=True))
        result["nprobe"][nprobe] = (ms, recall)
        print(f"index nprobe {nprobe:>3}: {ms:7.2f} ms/query, recall@10 {recall:.3f}"
              + ("  <- default" if nprobe == result["default"] else ""), flush=True)  # fmt: skip
    default = result["default"]
    for refined in REFINED:  # at the default probes: how many re-ranked candidates the recall needs
        ms = _median_ms(lambda q, r=refined: top(indexed, q, default, r), [(q,) for q in queries[:20]])
        found = [top(indexed, q, default, refined) for q in queries]
        recall = statistics.mean(len(hits & t) / K for hits, t in zip(found, truth, strict=True))
        result["refined"][refined] = (ms, recall)
        print(f"index nprobe {default}, {refined} re-ranked: {ms:7.2f} ms/query, recall@10 {recall:.3f}", flush=True)
    shutil.rmtree(uri)
    return result


def main(argv: list[str] | None = None) -> int:
    _, results = run_sizes("python -m bench.lance_similar", __doc__.splitlines()[0], "10000,30000,100000,1000000",
                           bench_size, argv)  # fmt: skip
    print("\nrows       flat ms  build s  partitions  nprobe: ms/recall@10 (* default)")
    for r in results:
        cells = "  ".join(f"{p}{'*' if p == r['default'] else ''}: {ms:.1f}/{rec:.3f}"
                          for p, (ms, rec) in r["nprobe"].items())  # fmt: skip
        print(f"{r['rows']:>9,}  {r['flat_ms']:7.0f}  {r['build_s']:7.1f}  {r['partitions']:10d}  {cells}")
        print("           re-ranked at the default probes: "
              + "  ".join(f"{n}: {ms:.1f}/{rec:.3f}" for n, (ms, rec) in r["refined"].items()))  # fmt: skip
    print(f"load average at the end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
