"""A job as a typed record with an explicit state machine; every change of state goes through `advance`.

A record's `kind` is a name of jobs.kinds' registry; nothing here depends on which kinds there are. How a run ended
(`schemas.outcome.Outcome`) becomes a job state through one table with no default (`job_state`). Records never
hold credentials: specs enter them through `masked_spec`, and a record whose
spec still holds a secret-looking value is refused when it is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from pydantic import AwareDatetime, BaseModel, Field, SecretStr, field_validator

from jobs.errors import BadInput
from jobs.label.compile_policy import CompileDecision
from schemas.masking import MASK, SECRET_KEY, mask_secrets, unmasked_secrets  # noqa: F401 - re-exported
from schemas.outcome import Outcome
from schemas.specs import Spec

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # as the specs' job_id: safe as a file name and a Ray name


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"  # ended with failed shards within the job's limits
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"  # was running on a cluster that went away; `resume` queues it again

    def is_terminal(self) -> bool:
        """The job ended (a resume may still queue it again, except after success)."""
        return self in _TERMINAL

    def is_active(self) -> bool:
        """Queued or running: the service owns it now."""
        return self in (JobState.QUEUED, JobState.RUNNING)


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.PARTIAL, JobState.FAILED, JobState.CANCELLED})

# The whole state machine. running → queued is a re-admission after a service restart (it counts an attempt when
# it runs again); failed/partial/cancelled/interrupted → queued is `resume`. interrupted → succeeded is a late
# success: the job was judged lost, but its output's manifest proves the run finished (jobs.service.ownership).
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: _TERMINAL | {JobState.INTERRUPTED, JobState.QUEUED},
    JobState.INTERRUPTED: frozenset({JobState.QUEUED, JobState.CANCELLED, JobState.SUCCEEDED}),
    JobState.FAILED: frozenset({JobState.QUEUED}),
    JobState.PARTIAL: frozenset({JobState.QUEUED}),
    JobState.CANCELLED: frozenset({JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
}


# How a run's outcome is recorded. No default: an outcome missing here (a new one, a misspelt status) is an internal
# error, never a success.
_STATE_OF_OUTCOME: Mapping[Outcome, JobState] = MappingProxyType({
    Outcome.SUCCEEDED: JobState.SUCCEEDED,
    Outcome.ALREADY_COMPLETE: JobState.SUCCEEDED,  # nothing was left to do: the job's output is complete
    Outcome.PARTIAL: JobState.PARTIAL,
    Outcome.FAILED: JobState.FAILED,
    Outcome.CANCELLED: JobState.CANCELLED,
})  # fmt: skip


class UnmappedOutcome(Exception):  # noqa: N818 - named for what it is; exit code 4 (jobs.errors: not ours to fix)
    """A run ended with an outcome the state table does not map: a bug, exit code 4."""


def job_state(outcome: Outcome | str) -> JobState:
    """The state a job is recorded in when its run ended with `outcome`; raises UnmappedOutcome for anything else."""
    try:
        return _STATE_OF_OUTCOME[outcome]
    except (KeyError, TypeError):
        raise UnmappedOutcome(f"a job run ended with {outcome!r}, which no job state maps") from None


class IllegalTransition(BadInput):
    """A change of state the state machine does not allow (e.g. resuming a job that succeeded)."""


class Cancellation(StrEnum):
    """Who cancelled a job: its record says so, and both kinds stay cancelled until `resume`."""

    BY_USER = "cancelled by `bulklabel cancel`"
    SERVICE_STOPPED = "the job service was stopped (`bulklabel service stop`)"


class JobProgress(Spec):
    """How far a job is; shards_total is None while its input is still being planned."""

    shards_total: int | None = Field(default=None, ge=0)
    shards_done: int = Field(default=0, ge=0)
    shards_failed: int = Field(default=0, ge=0)
    images: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0, description="Error rows (images that could not be labelled).")
    images_per_s: float = Field(default=0.0, ge=0)
    eta_s: float | None = Field(default=None, ge=0)


class JobRecord(Spec):
    """One job, as the store keeps it: written whole at every change of state."""

    job_id: str = Field(pattern=JOB_ID_PATTERN)
    kind: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$", description="Its job kind's name (jobs.kinds).")
    spec: dict[str, Any] = Field(description="The job spec as JSON, secrets masked (see masked_spec).")
    priority: int = 0
    max_workers: int | None = Field(default=None, ge=1)
    state: JobState = JobState.QUEUED
    submitted_at: AwareDatetime
    started_at: AwareDatetime | None = None
    ended_at: AwareDatetime | None = None
    updated_at: AwareDatetime
    progress: JobProgress = JobProgress()
    waiting_reason: str | None = None
    last_error: str | None = None
    attempts: int = Field(default=0, ge=0, description="Times it went to running.")
    cluster: str | None = Field(
        default=None,
        description="The Ray cluster (GCS address/session, jobs.service.ownership.ClusterId) whose service holds "
        "it: the one it was submitted or resumed on while queued, the one running it since.",
    )
    cancelled_by: Cancellation | None = Field(default=None, description="Why a cancelled job was cancelled.")
    output: str
    seq: int = Field(ge=0, description="Submission order: the FIFO tie-break within a priority.")
    model_key: str | None = None
    compile: CompileDecision | None = Field(
        default=None, description="Label jobs: whether its workers compile, decided at submit (`compile: auto`)."
    )

    @field_validator("spec")
    @classmethod
    def _no_credentials(cls, spec: dict[str, Any]) -> dict[str, Any]:
        leaked = unmasked_secrets(spec)
        if leaked:
            raise ValueError(f"job spec holds unmasked credentials at {', '.join(leaked)}: build it with masked_spec")
        return spec


def new_record(
    job_id: str, kind: str, spec: BaseModel | Mapping, *, output: str, seq: int, now: datetime, **fields
) -> JobRecord:
    """A queued record for a job just submitted; `spec` is masked on the way in."""
    return JobRecord(job_id=job_id, kind=kind, spec=masked_spec(spec), output=output, seq=seq, submitted_at=now,
                     updated_at=now, **fields)  # fmt: skip


# What advance() itself keeps; callers cannot set these through `changes`.
_MANAGED = frozenset({"state", "attempts", "started_at", "ended_at", "updated_at"})


def advance(record: JobRecord, to: JobState, now: datetime, **changes) -> JobRecord:
    """The one function that changes a job's state: checks TRANSITIONS, keeps the timestamps and attempts.

    →running sets started_at, counts an attempt and clears waiting_reason; a terminal state sets ended_at; leaving a
    terminal state (resume) clears ended_at. `changes` are other fields to set at the same time (last_error, cluster).
    """
    if to not in TRANSITIONS[record.state]:
        allowed = ", ".join(sorted(TRANSITIONS[record.state])) or "none"
        raise IllegalTransition(f"job {record.job_id}: cannot go from {record.state} to {to} (allowed: {allowed})")
    if managed := _MANAGED.intersection(changes):
        raise TypeError(f"advance() sets {', '.join(sorted(managed))} itself")
    update: dict[str, Any] = {"state": to, "updated_at": now}
    if to is JobState.RUNNING:
        update |= {"started_at": now, "attempts": record.attempts + 1, "waiting_reason": None}
    if to.is_terminal():
        update["ended_at"] = now
    elif record.state.is_terminal():
        update |= {"ended_at": None, "cancelled_by": None}
    return _replace(record, **(update | changes))


def with_progress(record: JobRecord, progress: JobProgress, now: datetime) -> JobRecord:
    """The record with new progress figures (no change of state)."""
    return _replace(record, progress=progress, updated_at=now)


def with_waiting(record: JobRecord, reason: str | None, now: datetime) -> JobRecord:
    """The record of a queued job with why it waits (from admission), or None once it is not waiting."""
    return _replace(record, waiting_reason=reason, updated_at=now)


def with_owner(record: JobRecord, cluster: str, reason: str, now: datetime) -> JobRecord:
    """The record of a queued job taken over by the service of `cluster` (its own cluster is gone)."""
    return _replace(record, cluster=cluster, waiting_reason=reason, updated_at=now)


def _replace(record: JobRecord, **fields) -> JobRecord:
    """A copy with `fields` changed, validated like a new record (model_copy alone would skip validation)."""
    return JobRecord.model_validate(record.model_dump() | fields)


def masked_spec(given: BaseModel | Mapping) -> dict[str, Any]:
    """The spec as JSON-ready data with every credential replaced by MASK: SecretStr fields wherever they are, and
    the values of secret-looking keys (secret, password, token, access_key, session). Absent (None) values stay
    None, so a record still shows that no key was given."""
    # A spec model or its data as a mapping (of any kind: no kind is told apart here)
    data = _mask_secret_fields(given, given.model_dump(mode="json")) if isinstance(given, BaseModel) else dict(given)
    return mask_secrets(data)  # the one rule for credentials (schemas.masking), as every error message uses it


def _mask_secret_fields(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    for name in type(model).model_fields:
        if name in dumped:
            dumped[name] = _mask_value(getattr(model, name), dumped[name])
    return dumped


def _mask_value(value: Any, dumped: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, BaseModel) and isinstance(dumped, dict):
        return _mask_secret_fields(value, dumped)
    if isinstance(value, list | tuple) and isinstance(dumped, list):
        return [_mask_value(v, d) for v, d in zip(value, dumped, strict=False)]
    if isinstance(value, Mapping) and isinstance(dumped, dict):
        return {k: _mask_value(value.get(k), d) for k, d in dumped.items()}
    return dumped
