"""jobs.service.ownership: whose jobs a service holds, decided with an injected view of the other clusters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from jobs.service.ownership import (
    ClusterId,
    Liveness,
    Step,
    decide,
    held_elsewhere,
    holds,
    judge,
    settled_state,
)
from jobs.service.records import JobRecord, JobState, new_record
from schemas.specs import LabelJobSpec

T0 = datetime(2026, 12, 6, 23, 0, tzinfo=UTC)
OURS = ClusterId("10.0.0.1:6379", "session_2026-12-06_22-00-00_000001_100")
OTHER = ClusterId("10.0.0.1:6380", "session_2026-12-06_22-30-00_000002_200")


def record(state: JobState, cluster: ClusterId | str | None) -> JobRecord:
    spec = LabelJobSpec(input={"uri": "/data/in"}, output="/data/out", model={"name": "mobilenet_v2"})
    base = new_record("label-20261206-2300-abcd", "label", spec, output=spec.output, seq=0, now=T0)
    return base.model_copy(update={"state": state, "cluster": None if cluster is None else str(cluster)})


def view(liveness: Liveness):
    asked: list[ClusterId] = []

    def probe(cluster: ClusterId) -> Liveness:
        asked.append(cluster)
        return liveness

    probe.asked = asked
    return probe


def never(*_):
    raise AssertionError("not to be asked here")


def test_cluster_id_roundtrips_through_the_record_text():
    assert ClusterId.parse(str(OURS)) == OURS
    for text in (None, "", "no-session", "/session_x", "10.0.0.1:6379/"):
        assert ClusterId.parse(text) is None


@pytest.mark.parametrize(
    ("reachable", "session", "expected"),
    [
        (False, None, Liveness.GONE),  # nothing listens at its GCS address
        (True, OTHER.session, Liveness.ALIVE),
        (True, "session_2026-12-07_01-00-00_000003_300", Liveness.GONE),  # a new cluster on the same port
        (True, None, Liveness.UNKNOWN),  # it answers but will not say (authentication, a timeout)
    ],
)
def test_judge_reads_a_probe(reachable, session, expected):
    assert judge(OTHER, reachable, session) is expected


def test_a_running_job_of_another_live_cluster_is_left_to_it():
    # Case 6 of issue 21: a command against cluster B marked cluster A's live job interrupted.
    probe = view(Liveness.ALIVE)
    decision = decide(record(JobState.RUNNING, OTHER), OURS, probe, running_here=False, rebuildable=never,
                      proven=never)  # fmt: skip
    assert decision.step is Step.LEAVE and str(OTHER) in decision.reason
    assert probe.asked == [OTHER]


def test_a_running_job_of_a_cluster_that_cannot_be_told_gone_is_left_too():
    decision = decide(record(JobState.RUNNING, OTHER), OURS, view(Liveness.UNKNOWN), running_here=False,
                      rebuildable=never, proven=never)  # fmt: skip
    assert decision.step is Step.LEAVE


def test_a_running_job_of_a_gone_cluster_is_interrupted_naming_it_unless_its_output_proves_it_finished():
    gone = decide(record(JobState.RUNNING, OTHER), OURS, view(Liveness.GONE), running_here=False, rebuildable=never,
                  proven=lambda: False)  # fmt: skip
    assert gone.step is Step.INTERRUPT and gone.reason == f"interrupted: its cluster {OTHER} went away"
    finished = decide(record(JobState.RUNNING, OTHER), OURS, view(Liveness.GONE), running_here=False,
                      rebuildable=never, proven=lambda: True)  # fmt: skip
    assert finished.step is Step.SUCCEED


def test_own_running_jobs_continue_after_a_restart_unless_their_spec_cannot_be_rebuilt():
    mine = record(JobState.RUNNING, OURS)
    probe = view(Liveness.GONE)
    assert decide(mine, OURS, probe, running_here=True, rebuildable=never, proven=never).step is Step.KEEP
    requeue = decide(mine, OURS, probe, running_here=False, rebuildable=lambda: True, proven=never)
    assert requeue.step is Step.REQUEUE
    secret = decide(mine, OURS, probe, running_here=False, rebuildable=lambda: False, proven=never)
    assert secret.step is Step.INTERRUPT and "credentials" in secret.reason
    assert probe.asked == []  # its own cluster is never probed


def test_queued_jobs_belong_to_their_cluster_until_it_is_gone():
    assert decide(record(JobState.QUEUED, OURS), OURS, never, running_here=False, rebuildable=never,
                  proven=never).step is Step.KEEP  # fmt: skip
    assert decide(record(JobState.QUEUED, None), OURS, never, running_here=False, rebuildable=never,
                  proven=never).step is Step.KEEP  # fmt: skip
    left = decide(record(JobState.QUEUED, OTHER), OURS, view(Liveness.ALIVE), running_here=False, rebuildable=never,
                  proven=never)  # fmt: skip
    adopted = decide(record(JobState.QUEUED, OTHER), OURS, view(Liveness.GONE), running_here=False,
                     rebuildable=never, proven=never)  # fmt: skip
    assert left.step is Step.LEAVE and adopted.step is Step.ADOPT and str(OTHER) in adopted.reason


def test_an_interrupted_job_whose_output_proves_it_finished_is_recorded_succeeded():
    for proven, step in ((True, Step.SUCCEED), (False, Step.KEEP)):
        decision = decide(record(JobState.INTERRUPTED, OTHER), OURS, never, running_here=False, rebuildable=never,
                          proven=lambda p=proven: p)  # fmt: skip
        assert decision.step is step


def test_ended_jobs_are_kept_without_asking_anything():
    for state in (JobState.SUCCEEDED, JobState.FAILED, JobState.PARTIAL, JobState.CANCELLED):
        assert decide(record(state, OTHER), OURS, never, running_here=False, rebuildable=never,
                      proven=never).step is Step.KEEP  # fmt: skip


def test_a_run_that_ends_after_its_record_was_changed_elsewhere():
    assert settled_state(JobState.RUNNING, JobState.CANCELLED, never) is JobState.CANCELLED
    # Late success over an interruption: only with the manifest's proof.
    assert settled_state(JobState.INTERRUPTED, JobState.SUCCEEDED, lambda: True) is JobState.SUCCEEDED
    assert settled_state(JobState.INTERRUPTED, JobState.SUCCEEDED, lambda: False) is None
    assert settled_state(JobState.INTERRUPTED, JobState.PARTIAL, never) is None
    assert settled_state(JobState.CANCELLED, JobState.SUCCEEDED, never) is None


def test_only_the_holding_cluster_cancels_a_live_job_in_place():
    running = record(JobState.RUNNING, OTHER)
    assert not holds(running, OURS) and holds(record(JobState.RUNNING, None), OURS)
    assert held_elsewhere(running, OURS, view(Liveness.ALIVE)) == OTHER
    assert held_elsewhere(running, OURS, view(Liveness.GONE)) is None
    assert held_elsewhere(record(JobState.RUNNING, OURS), OURS, never) is None
    assert held_elsewhere(record(JobState.CANCELLED, OTHER), OURS, never) is None
