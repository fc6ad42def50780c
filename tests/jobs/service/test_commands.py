"""jobs.service.commands' formatting: what `status`, `list` and `service stop` print of a record."""

from __future__ import annotations

from datetime import UTC, datetime

from jobs.service.commands import format_jobs, format_status, format_stopped
from jobs.service.records import Cancellation, JobProgress, JobState, advance, new_record, with_progress
from schemas.specs import LabelJobSpec

T0 = datetime(2026, 12, 6, 23, 0, tzinfo=UTC)


def cancelled(by: Cancellation):
    spec = LabelJobSpec(input={"uri": "/data/in"}, output="/data/out", model={"name": "mobilenet_v2"})
    record = advance(new_record("label-a", "label", spec, output=spec.output, seq=0, now=T0), JobState.RUNNING,
                     T0)  # fmt: skip
    record = with_progress(record, JobProgress(shards_total=16, shards_done=7, images=14), T0)
    return advance(record, JobState.CANCELLED, T0, cancelled_by=by)


def test_a_cancelled_job_shows_how_far_of_the_whole_it_got_and_who_cancelled_it():
    record = cancelled(Cancellation.SERVICE_STOPPED)
    status = format_status(record)
    assert status.startswith("label-a cancelled: shards 7/16,"), status
    assert "  cancelled: the job service was stopped (`bulklabel service stop`); `bulklabel resume label-a` " in status
    row = format_jobs([record]).splitlines()[1].split()
    assert row[2:5] == ["cancelled", "0", "7/16"], row


def test_service_stop_says_what_became_of_each_job():
    said = format_stopped([cancelled(Cancellation.SERVICE_STOPPED)], ["label-b"])
    assert said.splitlines() == [
        "job service stopped",
        "  label-a: cancelled at 7/16 shards; `bulklabel resume label-a` continues it",
        "  1 queued job(s) stay queued and start with the next service: label-b",
    ]
