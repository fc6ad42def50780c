"""jobs.service.records: the state machine table, advance's bookkeeping, masking of credentials."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.errors import EXIT_INTERNAL, exit_code_for
from jobs.service.records import (
    MASK,
    TRANSITIONS,
    IllegalTransition,
    JobProgress,
    JobRecord,
    JobState,
    UnmappedOutcome,
    advance,
    job_state,
    masked_spec,
    new_record,
    with_progress,
    with_waiting,
)
from schemas.outcome import Outcome
from schemas.specs import LabelJobSpec

T0 = datetime(2026, 12, 2, 1, 43, tzinfo=UTC)
KEY_ID, SECRET = "AKIAEXAMPLEKEYID0001", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYSECRET0001"


def label_spec(**storage) -> LabelJobSpec:
    return LabelJobSpec(input={"uri": "s3://photos/in"}, output="s3://labels/run-7", model={"name": "resnet50"},
                        storage=storage)  # fmt: skip


def record(state: JobState = JobState.QUEUED, **fields) -> JobRecord:
    spec = label_spec()
    base = new_record("label-20261202-0143-3f9a", "label", spec, output=spec.output, seq=0, now=T0)
    return base.model_copy(update={"state": state, **fields})


def test_states_split_into_terminal_and_active():
    assert {s for s in JobState if s.is_terminal()} == {"succeeded", "partial", "failed", "cancelled"}
    assert {s for s in JobState if s.is_active()} == {"queued", "running"}
    assert not JobState.INTERRUPTED.is_terminal() and not JobState.INTERRUPTED.is_active()


@pytest.mark.parametrize("start", list(JobState))
def test_advance_follows_the_table_exactly(start):
    for to in JobState:
        if to in TRANSITIONS[start]:
            assert advance(record(start), to, T0).state is to
        else:
            with pytest.raises(IllegalTransition, match=f"from {start} to {to}"):
                advance(record(start), to, T0)


def test_succeeded_is_final_and_resume_applies_to_the_other_ends():
    assert TRANSITIONS[JobState.SUCCEEDED] == frozenset()
    for state in (JobState.FAILED, JobState.PARTIAL, JobState.CANCELLED, JobState.INTERRUPTED):
        assert JobState.QUEUED in TRANSITIONS[state]


def test_running_counts_an_attempt_sets_started_and_clears_the_wait():
    waiting = with_waiting(record(), "needs 1 worker of 2 CPU, 0 CPU free", T0)
    t1, t2 = T0 + timedelta(seconds=5), T0 + timedelta(seconds=60)

    running = advance(waiting, JobState.RUNNING, t1, cluster="session_2026")
    assert (running.attempts, running.started_at, running.waiting_reason) == (1, t1, None)
    assert running.cluster == "session_2026"
    assert running.updated_at == t1 and running.ended_at is None

    requeued = advance(running, JobState.QUEUED, t2)  # service restarted: re-admitted
    again = advance(requeued, JobState.RUNNING, t2)
    assert again.attempts == 2 and again.started_at == t2


def test_terminal_states_set_ended_at_and_resume_clears_it():
    t1, t2 = T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
    failed = advance(advance(record(), JobState.RUNNING, T0), JobState.FAILED, t1, last_error="WorkersLost: gone")
    assert failed.ended_at == t1 and failed.last_error == "WorkersLost: gone"

    resumed = advance(failed, JobState.QUEUED, t2)
    assert resumed.ended_at is None and resumed.state is JobState.QUEUED and resumed.attempts == 1

    interrupted = advance(advance(resumed, JobState.RUNNING, t2), JobState.INTERRUPTED, t2)
    assert interrupted.ended_at is None  # not an end: resume continues it


def test_advance_leaves_the_original_untouched_and_refuses_state_in_changes():
    original = record()
    advance(original, JobState.RUNNING, T0)
    assert original.state is JobState.QUEUED and original.attempts == 0
    for managed in ({"state": JobState.FAILED}, {"attempts": 7}, {"ended_at": T0}):
        with pytest.raises(TypeError, match="advance\\(\\) sets"):
            advance(original, JobState.RUNNING, T0, **managed)


def test_changes_are_validated():
    with pytest.raises(ValidationError):
        advance(record(), JobState.RUNNING, T0, priority="high")
    with pytest.raises(ValidationError):
        with_progress(record(), {"shards_done": "many"}, T0)


def test_progress_updates_do_not_change_state():
    progress = JobProgress(shards_total=10, shards_done=3, images=3000, images_per_s=41.5, eta_s=170.0)
    updated = with_progress(record(JobState.RUNNING), progress, T0 + timedelta(seconds=9))
    assert updated.progress == progress and updated.state is JobState.RUNNING
    assert updated.updated_at == T0 + timedelta(seconds=9)


def test_timestamps_must_carry_a_timezone():
    with pytest.raises(ValidationError):
        record().model_validate(record().model_dump() | {"submitted_at": datetime(2026, 12, 2)})


def test_record_roundtrips_through_json():
    original = advance(record(priority=10, max_workers=3, model_key="resnet50/IMAGENET1K_V2/cpu/fp32"),
                       JobState.RUNNING, T0)  # fmt: skip
    assert JobRecord.model_validate_json(original.model_dump_json()) == original


def test_masked_spec_masks_secretstr_fields_and_keeps_absent_ones_none():
    spec = label_spec(endpoint_url="http://127.0.0.1:8333", access_key_id=KEY_ID, secret_access_key=SECRET)

    masked = masked_spec(spec)

    assert masked["storage"] == {"endpoint_url": "http://127.0.0.1:8333", "region": None, "access_key_id": MASK,
                                 "secret_access_key": MASK}  # fmt: skip
    assert masked["input"]["uri"] == "s3://photos/in" and masked["model"]["name"] == "resnet50"
    assert masked_spec(label_spec())["storage"]["access_key_id"] is None


def test_masked_spec_masks_secret_looking_keys_in_plain_data():
    raw = {"storage": {"aws_session_token": "FwoGZXIvYXdzEJr", "Password": "hunter2", "api_token": None},
           "nested": [{"client_secret": "s3cr3t", "name": "ok"}], "top_k": 5}  # fmt: skip

    masked = masked_spec(raw)

    assert masked == {"storage": {"aws_session_token": MASK, "Password": MASK, "api_token": None},
                      "nested": [{"client_secret": MASK, "name": "ok"}], "top_k": 5}  # fmt: skip


def test_a_record_refuses_a_spec_with_credentials_in_it():
    spec = label_spec(access_key_id=KEY_ID, secret_access_key=SECRET)
    leaky = spec.model_dump(mode="json") | {"storage": {"access_key_id": KEY_ID, "secret_access_key": SECRET}}
    with pytest.raises(ValidationError, match="unmasked credentials at spec.storage.access_key_id"):
        JobRecord.model_validate(record().model_dump() | {"spec": leaky})

    stored = new_record("j1", "label", spec, output=spec.output, seq=1, now=T0).model_dump_json()
    assert KEY_ID not in stored and SECRET not in stored


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_outcome_maps_to_the_job_state_of_its_name(outcome):
    expected = JobState.SUCCEEDED if outcome is Outcome.ALREADY_COMPLETE else JobState(outcome.value)
    assert job_state(outcome) is expected


@pytest.mark.parametrize("status", ["succeded", "already-complete", "done", None])
def test_an_outcome_the_table_does_not_map_is_an_internal_error_never_a_success(status):
    # service/kinds.py recorded any status it did not know as succeeded.
    with pytest.raises(UnmappedOutcome, match="which no job state maps") as raised:
        job_state(status)
    assert exit_code_for(raised.value) == EXIT_INTERNAL


def test_job_ids_must_be_safe_file_names():
    for bad in ("../etc/passwd", "a/b", "", ".hidden"):
        with pytest.raises(ValidationError):
            record().model_validate(record().model_dump() | {"job_id": bad})


def test_the_pure_modules_import_neither_torch_nor_ray():
    import subprocess
    import sys

    code = ("import sys, jobs.service.records, jobs.service.store, jobs.service.admission, jobs.service.ownership, "
            "jobs.service.core, jobs.kinds, jobs.label.ledger; "
            "print(sorted(m for m in ('torch', 'torchvision', 'ray') if m in sys.modules))")  # fmt: skip
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"
