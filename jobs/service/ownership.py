"""Whose jobs a job service holds, as plain logic: the service's own cluster and a view of the others are injected.

Several clusters may share one job store (the default ~/.bulklabel/state serves every cluster a user starts on a
machine), so each record names the cluster whose service holds it (`JobRecord.cluster`, a ClusterId: the GCS
address and Ray's session name). A service
- admits and continues only its own jobs (and records naming no cluster, written before clusters were recorded);
- leaves another cluster's jobs to that cluster's service while that cluster lives, or while it cannot tell;
- marks a running job interrupted only when its cluster is gone: nothing answers at its GCS address, or another
  session does (a new cluster on the same port); a queued job of a gone cluster it takes over;
- records a late success: a job judged lost whose output's manifest proves that its run finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from jobs.service.records import JobRecord, JobState


@dataclass(frozen=True)
class ClusterId:
    """One Ray cluster's life: a new `ray start` on the same address is a new session, so another cluster."""

    gcs_address: str
    session: str

    def __str__(self) -> str:
        return f"{self.gcs_address}/{self.session}"

    @classmethod
    def parse(cls, text: str | None) -> ClusterId | None:
        """The id a record holds as text; None when there is none (or it is not one)."""
        address, sep, session = (text or "").partition("/")
        return cls(address, session) if sep and address and session else None


class Liveness(StrEnum):
    ALIVE = "alive"  # its GCS answers with the same session
    GONE = "gone"  # nothing answers at its address, or another session does
    UNKNOWN = "unknown"  # something answers but would not say which session it is (authentication, a timeout)


def judge(cluster: ClusterId, reachable: bool, session: str | None) -> Liveness:
    """What a probe of the cluster's GCS address means: `reachable` (a TCP connection was accepted) and the
    session name its GCS gave (None when it gave none)."""
    if not reachable:
        return Liveness.GONE
    if session is None:
        return Liveness.UNKNOWN
    return Liveness.ALIVE if session == cluster.session else Liveness.GONE


LivenessProbe = Callable[[ClusterId], Liveness]


class Step(StrEnum):
    """What a service does with a record it finds in the store (`decide`)."""

    KEEP = "keep"  # its own, or nothing to change
    LEAVE = "leave"  # another cluster's, which lives (or cannot be told gone): its service owns it
    REQUEUE = "requeue"  # its own running job after the service restarted: queued to continue
    INTERRUPT = "interrupt"  # running where it cannot continue (its cluster is gone): `resume` queues it again
    ADOPT = "adopt"  # queued on a cluster that is gone: this service takes it
    SUCCEED = "succeed"  # judged lost, but its output's manifest proves its run finished


@dataclass(frozen=True)
class Decision:
    step: Step
    reason: str | None = None  # for the record (last_error, waiting_reason) and the log


def holds(record: JobRecord, ours: ClusterId) -> bool:
    """Whether the service of cluster `ours` holds the job (admits it, cancels it in place)."""
    return record.cluster is None or record.cluster == str(ours)


def decide(
    record: JobRecord,
    ours: ClusterId,
    liveness: LivenessProbe,
    *,
    running_here: bool,
    rebuildable: Callable[[], bool],
    proven: Callable[[], bool],
) -> Decision:
    """What the service of `ours` does with `record`. `running_here`: this service runs it now; `rebuildable()`: its
    spec can be rebuilt from the record (one with credentials cannot); `proven()`: the output's manifest proves the
    job's last run finished. Both are asked only when the answer matters (I/O, parsing)."""
    state, cluster = record.state, ClusterId.parse(record.cluster)
    if state is JobState.QUEUED:
        if holds(record, ours) or cluster is None:
            return Decision(Step.KEEP)
        if liveness(cluster) is Liveness.GONE:
            return Decision(Step.ADOPT, f"taken over from cluster {cluster}, which is gone")
        return Decision(Step.LEAVE, f"queued on cluster {cluster}")
    if state is JobState.RUNNING:
        if holds(record, ours) and record.cluster is not None:
            if running_here:
                return Decision(Step.KEEP)
            if rebuildable():
                return Decision(Step.REQUEUE, "the service restarted")
            return Decision(Step.INTERRUPT, "interrupted: the service restarted and its spec held credentials; "
                                            "`bulklabel resume` it with the spec")  # fmt: skip
        if cluster is not None and liveness(cluster) is not Liveness.GONE:
            return Decision(Step.LEAVE, f"running on cluster {cluster}")
        if proven():
            return Decision(Step.SUCCEED, "its output's manifest shows it finished")
        gone = f"its cluster {cluster} went away" if cluster else "the cluster that ran it is not recorded"
        return Decision(Step.INTERRUPT, f"interrupted: {gone}")
    if state is JobState.INTERRUPTED and proven():
        return Decision(Step.SUCCEED, "its output's manifest shows it finished after it was judged interrupted")
    return Decision(Step.KEEP)


def settled_state(current: JobState, outcome: JobState, proven: Callable[[], bool]) -> JobState | None:
    """The state a run's end moves its record to, or None to leave the record as it is: changed meanwhile by
    someone else (cancelled, interrupted by a service that judged this cluster gone), except a success that the
    output's manifest proves, which is recorded over an interruption."""
    if current is JobState.RUNNING:
        return outcome
    if current is JobState.INTERRUPTED and outcome is JobState.SUCCEEDED and proven():
        return JobState.SUCCEEDED
    return None


def held_elsewhere(record: JobRecord, ours: ClusterId, liveness: LivenessProbe) -> ClusterId | None:
    """The live (or not provably gone) cluster whose service holds this queued or running job, when not `ours`:
    only that service may cancel it in place. None when `ours` may act on it."""
    cluster = ClusterId.parse(record.cluster)
    if not record.state.is_active() or holds(record, ours) or cluster is None:
        return None
    return None if liveness(cluster) is Liveness.GONE else cluster
