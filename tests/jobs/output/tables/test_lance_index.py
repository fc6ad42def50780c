"""jobs.output.tables.lance_index: the IVF_PQ index a Lance output gets at the end of its job, and `similar` through
it, on a real label job over the ImageNet sample; its parameters and the cases without an index, without Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from jobs.output import query
from jobs.output.query import similar
from jobs.output.tables import lance_index
from jobs.output.tables.lance_index import (
    index_vectors,
    indexed_vectors,
    nearest,
    partitions_for,
    probes_for,
    sub_vectors_for,
)
from tests.jobs.output.test_compact import write_output
from tests.support import IMAGENET_SAMPLE, imagenet_labels

FIRST = 150  # photos of the first run; the rest of the sample (51) is added for the second


def test_parameters_follow_the_rows_and_the_width():
    assert [sub_vectors_for(w) for w in (1280, 2048, 512, 576, 1000, 7)] == [80, 128, 32, 36, 50, 1]
    assert [partitions_for(n) for n in (300, 30_000, 1_000_000, 10**9)] == [1, 7, 244, lance_index.MAX_PARTITIONS]
    assert probes_for(1) == 1 and probes_for(244) == 61 and probes_for(20) == min(20, lance_index.MIN_PROBES)


def _vectors(path: Path, rows: int, width: int = 64, seed: int = 0) -> np.ndarray:
    """`rows` clustered vectors (20 centres) in a Lance dataset at `path`, the third row null (an error row)."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((20, width), dtype=np.float32))
    vectors = np.maximum(centres[rng.integers(0, 20, rows)] + 0.3 * rng.standard_normal((rows, width), np.float32), 0)
    column = pa.array([None if i == 2 else list(v) for i, v in enumerate(vectors)], pa.list_(pa.float32(), width))
    lance.write_dataset(pa.table({"key": [f"k{i:04d}" for i in range(rows)], "embedding": column}), str(path),
                        mode="append" if path.exists() else "create")  # fmt: skip
    return vectors


def _exact(vectors: np.ndarray, query: np.ndarray, k: int, skip: int = 2) -> list[str]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ (query / np.linalg.norm(query))
    sims[skip] = -2  # the null row
    return [f"k{i:04d}" for i in np.argsort(-sims, kind="stable")[:k]]


def test_the_index_is_built_from_its_threshold_and_later_rows_are_folded_in(tmp_path):
    path = tmp_path / "table"
    vectors = _vectors(path, 600)
    dataset = index_vectors(lance.dataset(str(path)), min_rows=1000)
    assert not lance_index.has_index(dataset)  # 599 vectors: below the threshold
    dataset = index_vectors(dataset, min_rows=500)
    assert lance_index.has_index(dataset)
    found = nearest(dataset, vectors[0], 10, ["key"])
    assert found["key"].to_pylist() == _exact(vectors, vectors[0], 10)  # re-ranked on the stored vectors
    assert "k0002" not in found["key"].to_pylist()

    more = _vectors(path, 100, seed=1)  # appended after the index (a resumed job's rows): searched beside it
    dataset = lance.dataset(str(path))
    assert "k0000" in nearest(dataset, more[0], 3, ["key"])["key"].to_pylist()  # the new row keys again from k0000
    index_vectors(dataset, min_rows=500)
    assert lance.dataset(str(path)).describe_indices()[0].num_rows_indexed == 700


def test_outputs_without_an_index_have_no_indexed_vectors(tmp_path):
    write_output(str(tmp_path / "parquet"), tmp_path, shards=2)
    assert indexed_vectors(str(tmp_path / "parquet")) is None
    write_output(str(tmp_path / "lance"), tmp_path, shards=2, fmt="lance")  # 10 vectors: no index
    assert (tmp_path / "lance" / "table").is_dir() and indexed_vectors(str(tmp_path / "lance")) is None


def _label(photos: Path, out: Path) -> None:
    from jobs.label.runner import run_label_job
    from schemas.specs import LabelJobSpec

    spec = LabelJobSpec(input={"uri": str(photos), "files_per_shard": 25}, output={"uri": str(out), "format": "lance"},
                        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}, num_workers=1,
                        batch_size=16)  # fmt: skip
    assert run_label_job(spec, show_progress=False).status == "succeeded"


@pytest.mark.usefixtures("ray_cluster")
def test_similar_through_a_label_jobs_lance_index_finds_the_exact_neighbours(tmp_path, monkeypatch):
    """The ImageNet sample labelled into a Lance output whose index the job builds (its threshold lowered to the
    sample's size), then grown by a second run whose rows the index takes in; `similar` searches through the index
    and returns the exact search's neighbours, similarities included."""
    monkeypatch.setattr(lance_index, "INDEX_MIN_ROWS", 100)
    searched = []
    monkeypatch.setattr(query, "_similar_lance", lambda *a, _f=query._similar_lance: searched.append(1) or _f(*a))
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    rows = imagenet_labels()
    for row in rows[:FIRST]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / row["file"])
    _label(photos, out)
    assert lance.dataset(str(out / "table")).describe_indices()[0].num_rows_indexed == FIRST
    for row in rows[FIRST:]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / f"zz-{row['file']}")  # new shards after the first run's
    _label(photos, out)
    dataset = indexed_vectors(str(out))
    assert dataset is not None and dataset.describe_indices()[0].num_rows_indexed == len(rows)

    keys = sorted(dataset.to_table(columns=["key"])["key"].to_pylist())
    for key in keys[:: len(keys) // 12]:
        exact = similar(str(out), key, k=10, use_index="never")
        indexed = similar(str(out), key, k=10)  # auto: the output has an index
        assert [n.key for n in indexed] == [n.key for n in exact]
        assert indexed[0].key == key and indexed[0].similarity == pytest.approx(1.0, abs=1e-5)
        for a, b in zip(indexed, exact, strict=True):
            assert (a.label, a.score) == (b.label, b.score) and a.similarity == pytest.approx(b.similarity, abs=1e-5)
    assert len(searched) == 13


def test_vector_index_never_leaves_the_index_out(tmp_path):
    from jobs.output.tables import sink_for
    from schemas.specs import OutputOptions

    on = sink_for(str(tmp_path), "j", OutputOptions(format="lance"), None)
    off = sink_for(str(tmp_path), "j", OutputOptions(format="lance", vector_index="never"), None)
    assert (on.index, off.index) == (True, False)
