"""`bulklabel compact` on a real label job's 100-shard output (MobileNetV2, tiny photos, one per shard): the same rows
in one file of the target size; the job run again finds nothing to do, and extended with new images it labels only
those, keeping the compacted file."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from jobs.label.runner import run_label_job
from jobs.output.reader import open_output
from schemas.outcome import Outcome
from schemas.specs import LabelJobSpec

SHARDS = 100


def _photos(folder: Path, count: int, start: int = 0) -> None:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img-{i:03d}.jpg", quality=80)


def _rows(output: Path) -> dict[str, tuple]:
    table = open_output(str(output)).to_table(columns=["key", "label", "embedding"])
    return {k: (label, tuple(e)) for k, label, e in zip(*(table[c].to_pylist() for c in table.column_names),
                                                           strict=True)}  # fmt: skip


@pytest.fixture
def spec(tmp_path, ray_cluster) -> LabelJobSpec:
    _photos(tmp_path / "in", SHARDS)
    return LabelJobSpec(input={"uri": str(tmp_path / "in"), "files_per_shard": 1},
                        output={"uri": str(tmp_path / "out"), "compact": "never"},
                        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}, num_workers=1,
                        batch_size=1)  # fmt: skip


def test_compacting_a_real_100_shard_output_then_resuming_and_extending_it(spec, tmp_path, capsys):
    out = Path(spec.output)
    assert run_label_job(spec, show_progress=False).images == SHARDS
    before = _rows(out)
    assert len(list((out / "data").glob("part-*.parquet"))) == SHARDS

    assert main(["compact", str(out), "--target-mb", "1"]) == 0
    assert f"{SHARDS} data files -> 1 (generation 1" in capsys.readouterr().out
    files = list((out / "data").glob("*.parquet"))
    assert [p.name for p in files] == ["compact-1-00000.parquet"] and files[0].stat().st_size <= 1 << 20
    assert _rows(out) == before
    assert duckdb.sql(f"SELECT count(DISTINCT key) FROM read_parquet('{out}/data/**')").fetchall() == [(SHARDS,)]

    again = run_label_job(spec, show_progress=False)  # resume after compaction: every shard is done
    assert (again.status, again.images_this_run) == (Outcome.ALREADY_COMPLETE, 0)

    _photos(Path(spec.input.uri), 3, start=SHARDS)  # new input: labelled alone, the compacted rows kept
    extended = run_label_job(spec, show_progress=False)
    assert (extended.status, extended.images, extended.images_this_run) == ("succeeded", SHARDS + 3, 3)
    after = _rows(out)
    assert len(after) == SHARDS + 3 and {k: after[k] for k in before} == before
    assert (out / "data" / "compact-1-00000.parquet").exists()
    manifest = json.loads((out / "_job.json").read_text())
    assert manifest["generation"] == 1 and manifest["totals"]["rows"] == SHARDS + 3
