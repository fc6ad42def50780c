"""Every table format (jobs.output.tables): a real label job's driver SIGKILLed just before or just after a shard's
table commit, then run again, leaves exactly one row per image in the table."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from jobs.output.reader import open_output
from tests.scenarios.test_interruptions import _finish, _start_in
from tests.support import IMAGENET_SAMPLE, imagenet_labels


def _table_keys(out: Path, fmt: str) -> list[str]:
    if fmt == "delta":
        from deltalake import DeltaTable

        return sorted(DeltaTable(str(out / "table")).to_pyarrow_table(columns=["key"])["key"].to_pylist())
    if fmt == "lance":
        import lance

        if not (out / "table").exists():
            return []
        return sorted(lance.dataset(str(out / "table")).to_table(columns=["key"])["key"].to_pylist())
    from pyiceberg.catalog import load_catalog

    from jobs.output.tables.iceberg import CATALOG_NAME, catalog_properties
    from schemas.specs import OutputOptions

    catalog = load_catalog(CATALOG_NAME, **catalog_properties(str(out), OutputOptions(format="iceberg"), None))
    if not catalog.table_exists(("bulklabel", "labels")):
        return []
    return sorted(
        catalog.load_table(("bulklabel", "labels")).scan(selected_fields=("key",)).to_arrow()["key"].to_pylist()
    )


def _engine_keys(out: Path, fmt: str) -> dict[str, list[str]]:
    """The table's keys as two engines read it: DuckDB and Polars."""
    import duckdb
    import polars as pl

    if fmt == "delta":
        from deltalake import DeltaTable

        frame = pl.read_delta(str(out / "table"), columns=["key"])
        dataset = DeltaTable(str(out / "table")).to_pyarrow_dataset()
    elif fmt == "lance":
        import lance

        dataset = lance.dataset(str(out / "table"))
        frame = pl.scan_pyarrow_dataset(dataset).select("key").collect()
    else:
        from pyiceberg.catalog import load_catalog

        from jobs.output.tables.iceberg import CATALOG_NAME, catalog_properties
        from schemas.specs import OutputOptions

        catalog = load_catalog(CATALOG_NAME, **catalog_properties(str(out), OutputOptions(format="iceberg"), None))
        iceberg = catalog.load_table(("bulklabel", "labels"))
        frame = pl.scan_iceberg(iceberg).select("key").collect()
        dataset = iceberg.scan(selected_fields=("key",)).to_arrow()
    con = duckdb.connect()
    con.register("labels", dataset)
    return {"duckdb": sorted(k for (k,) in con.execute("SELECT key FROM labels").fetchall()),
            "polars": sorted(frame["key"].to_list())}  # fmt: skip


def _folder_keys(output: Path) -> list[str]:
    return sorted(open_output(str(output)).to_table(columns=["key"])["key"].to_pylist())


def _label_script(photos: Path, out: Path, fmt: str) -> str:
    model = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
    # table_commit_seconds 0: Iceberg commits each shard as it comes (the kill lands on the 3rd shard's commit)
    output = {"uri": str(out), "format": fmt, **({"table_commit_seconds": 0} if fmt == "iceberg" else {})}
    spec = {"input": {"uri": str(photos), "files_per_shard": 2}, "output": output,
            "model": model, "num_workers": 1, "batch_size": 2}  # fmt: skip
    return (f"from jobs.label.runner import run_label_job; from schemas.specs import LabelJobSpec; "
            f"print(run_label_job(LabelJobSpec.model_validate({spec!r}), show_progress=False).status)")  # fmt: skip


@pytest.mark.fault(
    fault="a job into a table output (Delta, Iceberg, Lance): the driver SIGKILLed after a shard's done-marker, just "
    "before that shard's table commit (or just after it); then the job run again",
    injected="SIGKILL of the driver at its 3rd table commit (jobs/output/faultpoints.py `table:commit` / "
    "`table:committed`), 12 photos in 6 shards",
    expected="the re-run appends the shards whose markers have no commit in the table (Delta: application "
    "transaction; Iceberg: the ids in a snapshot summary; Lance: in transaction properties) and skips the others: "
    "the table holds exactly one row per image, as the folder does, read back by DuckDB and by Polars",
)
@pytest.mark.parametrize("point", ["table:commit", "table:committed"])
@pytest.mark.parametrize("fmt", ["delta", "iceberg", "lance"])
def test_a_job_into_a_table_killed_between_marker_and_table_commit_then_rerun(tmp_path, ray_cluster_env,
                                                                            record_property, fmt, point):  # fmt: skip
    """The killed driver and its re-run join the session's cluster (the fault point kills the driver alone)."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    for row in imagenet_labels()[:12]:
        shutil.copy(IMAGENET_SAMPLE / row["file"], photos / row["file"])
    command = [sys.executable, "-c", _label_script(photos, out, fmt)]
    faults = {"BULKLABEL_FAULTS": json.dumps([{"shard": point, "attempt": 3, "action": "exit"}]),
              "BULKLABEL_FAULTS_ACKNOWLEDGE": "I-AM-TESTING"}  # fmt: skip
    driver = _start_in(command, {**ray_cluster_env, **faults})
    try:
        driver.communicate(timeout=300)
    finally:
        driver.kill()  # a no-op once it has ended
    assert driver.returncode == -9  # SIGKILL
    markers = len(list((out / "_done").glob("*.json")))
    in_table = len(set(_table_keys(out, fmt)))
    committed = 2 if point == "table:commit" else 3  # shards whose table commits were made before the kill
    assert in_table == 2 * committed and markers >= 3 and not (out / "_job.json").exists()
    assert "succeeded" in _finish(command, ray_cluster_env)  # the re-run is a plain run
    keys = _table_keys(out, fmt)
    assert keys == sorted(p.name for p in photos.iterdir()) == _folder_keys(out)  # each image once, none lost
    assert _engine_keys(out, fmt) == {"duckdb": keys, "polars": keys}  # as DuckDB and Polars read the table
    record_property("measured", f"{fmt}: killed at {point} with {markers} shard markers and {in_table} rows in the "
                    f"table; re-run: {len(keys)}/12 rows in the table, each once, as DuckDB and Polars "
                    "read it")  # fmt: skip
