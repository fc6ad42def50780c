"""jobs.service.store on both backends (a local folder and the real SeaweedFS server), through `storage_root`."""

from __future__ import annotations

import json
import logging
import pickle
import re
import threading
from datetime import UTC, datetime, timedelta

import pytest

from jobs.service import store as store_module
from jobs.service.records import JobProgress, JobState, advance, new_record, with_progress
from jobs.service.store import CorruptRecord, JobStore, UnknownJob, default_state_uri, new_job_id
from schemas.specs import LabelJobSpec
from workers.io.storage import join

T0 = datetime(2026, 12, 2, 1, 43, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(**storage) -> LabelJobSpec:
    return LabelJobSpec(input={"uri": "s3://photos/in"}, output="s3://labels/out", model={"name": "mobilenet_v2"},
                        storage=storage)  # fmt: skip


def make(store: JobStore, job_id: str, priority: int = 0, **storage):
    s = spec(**storage)
    return new_record(job_id, "label", s, output=s.output, seq=store.next_seq(), now=T0, priority=priority)


@pytest.fixture
def store(storage_root) -> JobStore:
    return JobStore(storage_root.uri, storage_root.options)


def test_put_then_get_roundtrips_and_a_new_store_sees_it(store, storage_root):
    record = advance(make(store, "label-a"), JobState.RUNNING, T0)
    store.put(record)
    assert store.get("label-a") == record
    assert JobStore(storage_root.uri, storage_root.options).get("label-a") == record


def test_unknown_and_malformed_job_ids(store):
    with pytest.raises(UnknownJob, match=r"no job 'nope' in the job store at .*`bulklabel list` shows the jobs"):
        store.get("nope")
    for bad in ("../escape", "a/b", ".hidden", "x\n"):
        with pytest.raises(UnknownJob, match="not a job id"):
            store.get(bad)
    # The service raises it in its actor and Ray pickles it to the caller: it must come back whole.
    with pytest.raises(UnknownJob) as raised:
        store.get("nope")
    again = pickle.loads(pickle.dumps(raised.value))
    assert str(again) == str(raised.value) and again.args[0] == "nope" and isinstance(again, KeyError)


def test_list_is_in_submission_order_and_filters_by_state(store):
    records = [make(store, f"job-{name}") for name in "cab"]  # seq 0, 1, 2 in this order
    records[1] = advance(records[1], JobState.RUNNING, T0)
    for record in reversed(records):
        store.put(record)

    assert [r.job_id for r in store.list()] == ["job-c", "job-a", "job-b"]
    assert [r.job_id for r in store.list(states=[JobState.RUNNING])] == ["job-a"]
    assert [r.job_id for r in store.list(states={"queued"})] == ["job-c", "job-b"]


def test_index_follows_state_changes_not_progress(store, storage_root):
    record = make(store, "job-1", priority=3)
    store.put(record)
    index_uri = join(storage_root.uri, "index.json")
    written = json.loads(storage_root.storage.read_bytes(index_uri))
    assert written["jobs"]["job-1"]["state"] == "queued" and written["jobs"]["job-1"]["priority"] == 3

    store.put(with_progress(record, JobProgress(shards_done=1), T0))
    assert storage_root.storage.read_bytes(index_uri) == json.dumps(written, indent=1, sort_keys=True).encode()

    store.put(advance(record, JobState.CANCELLED, T0))
    assert store.index()["job-1"].state is JobState.CANCELLED


def test_index_is_rebuilt_from_the_records_when_missing_or_stale(store, storage_root):
    for name in ("job-1", "job-2"):
        store.put(make(store, name))
    # A writer that died between a record and the index: job-3's record exists, the index does not name it.
    orphan = make(store, "job-3")
    storage_root.storage.write_bytes(store.record_uri("job-3"), orphan.model_dump_json().encode())
    assert list(store.index()) == ["job-1", "job-2", "job-3"]

    storage_root.storage.delete(join(storage_root.uri, "index.json"))
    assert list(JobStore(storage_root.uri, storage_root.options).index()) == ["job-1", "job-2", "job-3"]


def test_a_new_writer_repairs_a_state_the_index_missed(store, storage_root):
    record = make(store, "job-1")
    store.put(record)
    # The record moved on but the writer died before the index followed (same job ids: readers cannot tell).
    running = advance(record, JobState.RUNNING, T0)
    storage_root.storage.write_bytes(store.record_uri("job-1"), running.model_dump_json().encode())

    writer = JobStore(storage_root.uri, storage_root.options)
    writer.put(make(writer, "job-2"))

    index = json.loads(storage_root.storage.read_bytes(join(storage_root.uri, "index.json")))["jobs"]
    assert index["job-1"]["state"] == "running" and index["job-2"]["seq"] == 1


def test_next_seq_continues_after_the_last_stored_job(store, storage_root):
    assert [store.next_seq() for _ in range(3)] == [0, 1, 2]  # handed out, never stored: not reused here
    store.put(make(store, "job-1"))  # seq 3
    assert JobStore(storage_root.uri, storage_root.options).next_seq() == 4


def test_a_corrupt_record_is_skipped_in_list_and_named(store, storage_root, caplog):
    store.put(make(store, "job-good"))
    bad_uri = store.record_uri("job-bad")
    storage_root.storage.write_bytes(bad_uri, b'{"job_id": "job-bad", "state": "runn')
    storage_root.storage.write_bytes(store.record_uri("job-other"), make(store, "job-good").model_dump_json().encode())

    with caplog.at_level(logging.WARNING, logger="jobs.service.store"):
        assert [r.job_id for r in store.list()] == ["job-good"]
    assert bad_uri in caplog.text and store.record_uri("job-other") in caplog.text
    with pytest.raises(CorruptRecord, match="not a valid job record"):
        store.get("job-bad")
    with pytest.raises(CorruptRecord, match="another job"):
        store.get("job-other")


def test_temporary_and_foreign_files_are_not_records(store, storage_root):
    store.put(make(store, "job-1"))
    for name in (".job-2.json.1a2b3c4d.tmp", "notes.txt", "job-3.json.bak"):
        storage_root.storage.write_bytes(join(storage_root.uri, "jobs", name), b"{")
    assert [r.job_id for r in store.list()] == ["job-1"] and list(store.index()) == ["job-1"]


def test_a_reader_never_sees_half_a_record(store, storage_root):
    record = make(store, "job-1")
    store.put(record)
    reader, seen, stop = JobStore(storage_root.uri, storage_root.options), [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(reader.get("job-1").progress.shards_done)  # raises CorruptRecord on a torn read

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for done in range(1, 41):
            store.put(with_progress(record, JobProgress(shards_done=done, images=done * 1000), T0))
    finally:
        stop.set()
        thread.join()
    assert seen and seen == sorted(seen) and reader.get("job-1").progress.shards_done == 40


def test_stored_files_hold_no_key_material(store, storage_root):
    key_id, secret = "AKIAEXAMPLEKEYID0001", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET0001"
    record = make(store, "job-1", endpoint_url="http://127.0.0.1:1", access_key_id=key_id, secret_access_key=secret)
    store.put(advance(record, JobState.RUNNING, T0))
    store.append_log("job-1", "started\n")
    store.close()

    stored = b"".join(storage_root.storage.read_bytes(o.uri) for o in storage_root.storage.list(storage_root.uri))
    assert b"job-1" in stored and b"***" in stored
    assert key_id.encode() not in stored and secret.encode() not in stored


def test_logs_append_and_read_from_an_offset(storage_root):
    store = JobStore(storage_root.uri, storage_root.options)
    store.put(make(store, "job-1"))
    assert store.read_log("job-1") == ("", 0)
    store.append_log("job-1", "line one\n")
    store.append_log("job-1", "zwei: ü\n")
    store.flush_logs()

    text, offset = store.read_log("job-1")
    assert text == "line one\nzwei: ü\n" and offset == len(text.encode())
    assert store.read_log("job-1", offset) == ("", offset)
    store.append_log("job-1", "three\n")
    assert store.read_log("job-1", offset) == ("three\n", offset + 6)
    with pytest.raises(UnknownJob):
        store.read_log("job-none")


def test_reading_a_log_never_splits_a_character(storage_root):
    store = JobStore(storage_root.uri, storage_root.options)
    store.put(make(store, "job-1"))
    store.append_log("job-1", "ab€c")  # € is 3 bytes: 61 62 e2 82 ac 63
    store.flush_logs()
    parts, offset = [], 0
    for _ in range(3):
        text, offset = store.read_log("job-1", offset, max_bytes=4)  # 4 bytes would end inside the €
        parts.append(text)
    assert parts == ["ab", "€c", ""] and offset == 6


def test_s3_logs_upload_on_flush_interval_and_continue_after_a_restart(request):
    s3_prefix, server = request.getfixturevalue("s3_prefix"), request.getfixturevalue("s3_server")
    clock = FakeClock()
    writer = JobStore(s3_prefix, server.options(), clock=clock)
    writer.put(make(writer, "job-1"))
    reader = JobStore(s3_prefix, server.options())

    writer.append_log("job-1", "first\n")
    assert reader.read_log("job-1") == ("", 0)  # buffered locally, not uploaded yet
    assert writer.read_log("job-1")[0] == "first\n"  # the writer reads its own spool
    clock.now += store_module.LOG_FLUSH_S
    writer.append_log("job-1", "second\n")
    assert reader.read_log("job-1")[0] == "first\nsecond\n"
    writer.close()

    restarted = JobStore(s3_prefix, server.options(), clock=clock)
    restarted.append_log("job-1", "third\n")
    restarted.close_log("job-1")
    assert reader.read_log("job-1")[0] == "first\nsecond\nthird\n"


def test_job_ids_are_readable_sortable_and_unused(store, monkeypatch):
    job_id = new_job_id("label", T0)
    assert re.fullmatch(r"label-20261202-0143-[0-9a-f]{4}", job_id)
    assert new_job_id("finetune", T0 + timedelta(minutes=1)) > new_job_id("finetune", T0)

    store.put(make(store, "label-20261202-0143-aaaa"))
    draws = iter(["aaaa", "bbbb"])
    monkeypatch.setattr(store_module.secrets, "token_hex", lambda n: next(draws))
    assert store.new_job_id("label", T0) == "label-20261202-0143-bbbb"


def test_default_state_location(monkeypatch, tmp_path):
    monkeypatch.setenv("BULKLABEL_STATE", "s3://team/state")
    assert default_state_uri() == "s3://team/state"
    monkeypatch.delenv("BULKLABEL_STATE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_uri() == str(tmp_path / ".bulklabel" / "state")


def test_the_writer_lists_a_state_by_reading_only_those_records(store, storage_root, monkeypatch):
    for name in ("job-1", "job-2", "job-3"):
        record = make(store, name)
        store.put(record if name == "job-2" else advance(record, JobState.CANCELLED, T0))
    reads = []
    read_bytes = store._storage.read_bytes
    monkeypatch.setattr(store._storage, "read_bytes", lambda uri: reads.append(uri) or read_bytes(uri))

    assert [r.job_id for r in store.list([JobState.QUEUED])] == ["job-2"]
    assert reads == [store.record_uri("job-2")]
    reader = JobStore(storage_root.uri, storage_root.options)  # not a writer: reads every record to know
    assert [r.job_id for r in reader.list([JobState.QUEUED])] == ["job-2"]


def test_the_writer_also_sees_records_another_writer_added(store, storage_root):
    # Two clusters' services share a store: each one's index must not hide the other's new jobs for ever.
    store.put(make(store, "job-mine"))
    other = JobStore(storage_root.uri, storage_root.options)
    other.put(make(other, "job-theirs"))
    assert [r.job_id for r in store.list([JobState.QUEUED])] == ["job-mine", "job-theirs"]
    store.put(advance(store.get("job-theirs"), JobState.RUNNING, T0))  # now in the writer's index
    assert [r.job_id for r in store.list([JobState.RUNNING])] == ["job-theirs"]
