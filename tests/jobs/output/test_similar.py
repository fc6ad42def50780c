"""`bulklabel similar` through the ANN index (jobs.output.index) on a real label job's output: it agrees with the
exact search, and its cache follows the committed set (a job extended by new input gets a new index)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.output.index import entry_path
from jobs.output.query import KeyNotInOutput, similar
from jobs.output.reader import open_output
from tests.support import IMAGENET_SAMPLE, imagenet_labels

FIRST, ADDED = 8, 4


@dataclass(frozen=True)
class Grown:
    output: Path
    photos: Path
    cache: Path
    first_entry: Path  # the index entry of the first run's committed set
    first_keys: frozenset[str]


def _run(photos: Path, output: Path) -> None:
    from jobs.label.runner import run_label_job
    from schemas.specs import LabelJobSpec

    model = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
    spec = LabelJobSpec(input={"uri": str(photos), "files_per_shard": 4}, output=str(output), model=model,
                        num_workers=1, batch_size=8)  # fmt: skip
    summary = run_label_job(spec, show_progress=False)
    assert summary.status == "succeeded" and summary.errors == 0


@pytest.fixture(scope="module")
def grown(tmp_path_factory, ray_cluster) -> Grown:
    """A job on 8 photos, searched through the index; then 4 more photos in the input and the job run again (it
    labels the new shard only)."""
    root = tmp_path_factory.mktemp("similar")
    photos, output, cache = root / "photos", root / "out", root / "cache"
    photos.mkdir()
    rows = imagenet_labels()
    for row in rows[:FIRST]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / row["file"])
    _run(photos, output)
    first = similar(str(output), rows[0]["file"], k=FIRST, use_index="always", cache_dir=cache)
    first_entry = entry_path(open_output(str(output)), cache)
    for row in rows[FIRST : FIRST + ADDED]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / f"zz-{row['file']}")  # after the last shard's keys
    _run(photos, output)
    return Grown(output, photos, cache, first_entry, frozenset(n.key for n in first))


def test_index_agrees_with_the_exact_search(grown):
    table = open_output(str(grown.output)).to_table(columns=["key"])
    keys = sorted(table.column("key").to_pylist())
    assert len(keys) == FIRST + ADDED
    for key in keys[::3]:
        exact = similar(str(grown.output), key, k=5, use_index="never")
        indexed = similar(str(grown.output), key, k=5, use_index="always", cache_dir=grown.cache)
        assert [n.key for n in indexed] == [n.key for n in exact]
        assert indexed[0].key == key and indexed[0].similarity == pytest.approx(1.0, abs=2e-3)
        for a, b in zip(indexed, exact, strict=True):
            assert (a.label, a.score) == (b.label, b.score)
            assert a.similarity == pytest.approx(b.similarity, abs=2e-3)  # float16 vectors in the index


def test_an_extended_job_gets_a_new_index_and_the_old_one_goes(grown, caplog):
    assert grown.first_keys == {r["file"] for r in imagenet_labels()[:FIRST]}
    key = imagenet_labels()[0]["file"]
    with caplog.at_level(logging.INFO, logger="jobs.output.index"):
        after = similar(str(grown.output), key, k=FIRST + ADDED, use_index="always", cache_dir=grown.cache)
    now = entry_path(open_output(str(grown.output)), grown.cache)
    assert now != grown.first_entry and now.is_dir() and not grown.first_entry.exists()
    assert sum(n.key.startswith("zz-") for n in after) == ADDED  # the new shard's rows are in the new index
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jobs.output.index"):
        again = similar(str(grown.output), key, k=3, use_index="always", cache_dir=grown.cache)
    assert "using the cached index" in caplog.text and [n.key for n in again] == [n.key for n in after[:3]]


def test_auto_uses_the_index_from_the_threshold_on(grown, tmp_path):
    key = imagenet_labels()[1]["file"]
    similar(str(grown.output), key, k=3, index_min_rows=FIRST + ADDED + 1, cache_dir=tmp_path / "below")
    assert not (tmp_path / "below").exists()
    similar(str(grown.output), key, k=3, index_min_rows=FIRST + ADDED, cache_dir=tmp_path / "at")
    assert list((tmp_path / "at" / "similar").iterdir())


def test_index_finds_by_source_uri_and_refuses_unknown_keys(grown):
    key = imagenet_labels()[2]["file"]
    by_uri = similar(str(grown.output), str(grown.photos / key), k=2, use_index="always", cache_dir=grown.cache)
    assert by_uri[0].key == key
    with pytest.raises(KeyNotInOutput, match="no-such.jpg"):
        similar(str(grown.output), "no-such.jpg", k=2, use_index="always", cache_dir=grown.cache)


def test_cli_similar_with_the_index(grown, capsys, monkeypatch):
    monkeypatch.setenv("BULKLABEL_CACHE_DIR", str(grown.cache))
    key = imagenet_labels()[3]["file"]
    assert main(["similar", str(grown.output), key, "-k", "3", "--index", "always"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[1].startswith(key)


@pytest.mark.fault(
    fault="`similar` after the output was deleted and labelled again from other photos under the same names (same "
    "spec, job id and shard file names)",
    injected="a 6-photo job searched through the index; output deleted; 6 other photos copied over the same names; "
    "the job run again",
    expected="the cached index is not reused: `similar` answers with the new photos' neighbours, as the exact "
    "search does",
)
def test_a_relabelled_output_under_the_same_names_gets_a_new_index(tmp_path, ray_cluster, record_property):
    rows = imagenet_labels()
    photos, output, cache = tmp_path / "photos", tmp_path / "out", tmp_path / "cache"
    photos.mkdir()
    names = [f"p{i}.jpg" for i in range(6)]
    for name, row in zip(names, rows[:6], strict=True):
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / name)
    _run(photos, output)
    old = similar(str(output), names[0], k=6, use_index="always", cache_dir=cache)
    old_entry = entry_path(open_output(str(output)), cache)

    shutil.rmtree(output)
    for name, row in zip(names, rows[6:12], strict=True):
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / name)
    _run(photos, output)
    new = similar(str(output), names[0], k=6, use_index="always", cache_dir=cache)
    exact = similar(str(output), names[0], k=6, use_index="never")

    assert [n.key for n in new] == [n.key for n in exact]
    for got, want in zip(new, exact, strict=True):
        assert got.similarity == pytest.approx(want.similarity, abs=2e-3)
        assert got.label == want.label
    stale = [round(n.similarity, 3) for n in old]
    assert [round(n.similarity, 3) for n in new] != stale  # other photos: other similarities
    now = entry_path(open_output(str(output)), cache)
    assert now != old_entry
    # Keyed by each file's stamp, not only the manifest: one data file rewritten in place is a new committed set.
    data = open_output(str(output)).files[0]
    os.utime(data, ns=(os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns + 1))
    assert entry_path(open_output(str(output)), cache) != now
    record_property("measured", f"new index entry; 6/6 neighbours as the exact search (2nd nearest at cosine "
                    f"{new[1].similarity:.3f}; the stale index said {old[1].similarity:.3f})")  # fmt: skip
