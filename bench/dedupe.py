"""`python -m bench.dedupe`: near-duplicate search at scale, as `bulklabel dedupe` runs it (workers/curate/neighbours:
the search, then the groups), on synthetic embeddings of width 1280 (MobileNetV2's) with planted near-copies.

The embeddings are clustered like a classifier's features (as bench/similar.py's: 1,000 non-negative centres, each
row a centre plus Gaussian noise, then ReLU), so distinct rows of one centre are close (cosine up to about 0.76),
not random vectors' easy case. The last `--planted` rows are replaced by near-copies of other rows (the original
plus a little noise: cosine 0.95-0.99, as resized, re-encoded or cropped photos scored in tests/jobs/curate).
Printed:
- the cosine of the planted pairs and the 99.9th percentile of distinct rows' (a sample), and the threshold used;
- the search's time (exact below workers.curate.neighbours.EXACT_MAX_ROWS rows, IVF above) and the groups' time;
- recall: planted pairs that end up in one group; and the groups found beyond the planted ones;
- peak memory (ru_maxrss) against the embeddings' own size; the load average (a shared 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from workers.curate.neighbours import components, similar_pairs

DIM = 1280
CENTRES = 1000
NOISE = 0.8
CHUNK = 50_000


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)  # KiB on Linux


def embeddings(rows: int, planted: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit rows (float32, generated in chunks), and the planted pairs (original, copy)."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((CENTRES, DIM), dtype=np.float32))
    out = np.empty((rows, DIM), dtype=np.float32)
    for start in range(0, rows, CHUNK):
        stop = min(rows, start + CHUNK)
        block = centres[rng.integers(0, CENTRES, stop - start)]
        block += NOISE * rng.standard_normal(block.shape, dtype=np.float32)
        np.maximum(block, 0, out=block)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    originals = rng.choice(rows - planted, size=planted, replace=False)
    copies = np.arange(rows - planted, rows)
    # Noise of norm 0.14-0.33 on a unit row: cosine 1/sqrt(1 + norm^2), 0.95-0.99.
    noise = (rng.uniform(0.14, 0.33, (planted, 1)) / np.sqrt(DIM)).astype(np.float32)
    near = out[originals] + noise * rng.standard_normal((planted, DIM), dtype=np.float32)
    out[copies] = near / np.linalg.norm(near, axis=1, keepdims=True)
    return out, originals, copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--planted", type=int, default=2_000)
    parser.add_argument("--threshold", type=float, default=0.93)
    parser.add_argument("--method", default="auto", choices=["auto", "exact", "ivf"])
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f}; {args.rows:,} rows x {DIM}, {args.planted:,} planted copies",
          flush=True)  # fmt: skip
    started = time.perf_counter()
    unit, originals, copies = embeddings(args.rows, args.planted, seed=0)
    data_gib, base_gib = unit.nbytes / (1 << 30), _rss_gib()
    planted_cos = np.einsum("ij,ij->i", unit[originals], unit[copies])
    sample = unit[np.random.default_rng(1).choice(args.rows - args.planted, 2000, replace=False)]
    distinct = (sample @ sample.T)[np.triu_indices(len(sample), k=1)]
    generated = time.perf_counter() - started
    print(f"generated in {generated:.0f} s ({data_gib:.2f} GiB of embeddings); planted cosine "
          f"{planted_cos.min():.3f}-{planted_cos.max():.3f}; distinct rows' 99.9th percentile "
          f"{np.quantile(distinct, 0.999):.3f}, max {distinct.max():.3f}; threshold {args.threshold}",
          flush=True)  # fmt: skip
    started = time.perf_counter()
    pairs = similar_pairs(unit, args.threshold, args.method)
    searched = time.perf_counter() - started
    groups = components(args.rows, (pairs.left, pairs.right))
    grouped = time.perf_counter() - started - searched
    recall = float(np.mean(groups[originals] == groups[copies]))
    sizes = np.bincount(groups)
    planted_groups = set(groups[copies].tolist())
    others = sum(1 for g in np.flatnonzero(sizes > 1).tolist() if g not in planted_groups)
    print(f"search ({args.method}): {searched:.1f} s, {len(pairs):,} pairs >= {args.threshold}; groups: "
          f"{grouped:.1f} s; recall of planted pairs {recall:.4f}; {others:,} groups of 2+ beyond the planted; "
          f"peak RSS {_rss_gib():.1f} GiB ({base_gib:.1f} GiB after generating); load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
