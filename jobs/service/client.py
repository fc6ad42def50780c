"""Talk to the job service from anywhere: the CLI, a notebook, another program (`from jobs import submit, ...`).

The service is found by name on the cluster and started on first use. Without a cluster to join ($RAY_ADDRESS, or a
`ray start` on this machine), a local one is started with `ray start --head` so that jobs outlive this process (a
private `ray.init()` cluster would die with it).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import ray
from ray.exceptions import RayActorError, RayTaskError

from jobs.cluster import find_cluster
from jobs.errors import InfrastructureError
from jobs.kinds import kind_of
from jobs.service.config import SERVICE_NAME, SERVICE_NAMESPACE, ServiceConfig
from jobs.service.records import JobRecord, JobState

log = logging.getLogger(__name__)

_CALL_TRIES = 20  # a service that is being restarted by Ray answers again within seconds
_CALL_RETRY_S = 1.0
_started_here = False  # this process started the local cluster: nodes join it only by hand, so no autoscaler


class ServiceNotRunning(InfrastructureError):
    """No job service on this cluster (and the command does not start one)."""


def connect() -> None:
    """Join the cluster the service runs on: $RAY_ADDRESS, the latest `ray start` here, or a new local one."""
    if ray.is_initialized():
        return
    choice = find_cluster()  # an unreachable $RAY_ADDRESS fails here in one line; a stale `ray start` is forgotten
    address = choice.address
    if address is None:
        _start_local_cluster()
        address = "auto"  # the address file that `ray start` just wrote
    ray.init(address=address, namespace=SERVICE_NAMESPACE, log_to_driver=False, configure_logging=False)


def _start_local_cluster() -> None:
    """A local Ray cluster that lives on after this process (`ray stop` ends it)."""
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray")
    if ray_cli is None:
        raise InfrastructureError("no `ray` command next to this Python; cannot start a local cluster")
    global _started_here
    log.info("starting a local Ray cluster for the job service (`ray stop` ends it)")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    subprocess.run([ray_cli, "start", "--head", "--disable-usage-stats"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _started_here = True


def service(start: bool = True, config: ServiceConfig | None = None) -> ray.actor.ActorHandle:
    """The service's actor handle; started (detached, restarted by Ray if it dies) when it is not running."""
    connect()
    try:
        return ray.get_actor(SERVICE_NAME, namespace=SERVICE_NAMESPACE)
    except ValueError:
        if not start:
            raise ServiceNotRunning("no bulklabel job service on this cluster (`bulklabel service start`)") from None
    from jobs.service.actor import JobServiceActor

    # On the local cluster this process just started no node will join: a job it can never hold fails at once.
    config = config or ServiceConfig(autoscaler=not _started_here)
    log.info("starting the job service (state: %s)", config.state_uri)
    return JobServiceActor.options(
        name=SERVICE_NAME, namespace=SERVICE_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote(config)


def _call(method: str, *args, start: bool = False, retry: bool = True):
    """Call the service; while Ray restarts a killed service, calls that only read are retried."""
    for attempt in range(_CALL_TRIES if retry else 1):
        handle = service(start=start)
        try:
            return ray.get(getattr(handle, method).remote(*args))
        except RayTaskError as exc:
            if isinstance(exc.cause, Exception):  # the service's own answer (no such job, no such transition)
                raise exc.cause from None
            raise
        except RayActorError:
            if attempt == _CALL_TRIES - 1 or not retry:
                raise
            time.sleep(_CALL_RETRY_S)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------- the API


def submit(spec, priority: int = 0, max_workers: int | None = None) -> str:
    """Queue a job (a LabelJobSpec or FinetuneJobSpec); returns its id at once. Checked here first: a bad model
    name or top_k fails now, not on the cluster."""
    kind = kind_of(spec)
    spec = kind.absolute_locations(spec)
    connect()
    kind.check_submit(spec)
    return _call("submit", spec, priority, max_workers, start=True, retry=False)


def list_jobs() -> list[JobRecord]:
    return [JobRecord.model_validate(r) for r in _call("list", start=True)]


def job_status(job_id: str) -> JobRecord:
    return JobRecord.model_validate(_call("status", job_id, start=True))


def cancel(job_id: str) -> JobRecord:
    return JobRecord.model_validate(_call("cancel", job_id, start=True))


def resume(job_id: str, spec=None) -> JobRecord:
    return JobRecord.model_validate(_call("resume", job_id, spec, start=True))


def logs(job_id: str, offset: int = 0) -> tuple[str, int]:
    return _call("logs", job_id, offset, start=True)


def service_status() -> dict:
    return _call("describe", start=False)


def stop_service() -> tuple[list[JobRecord], list[str]]:
    """Stop the service; returns the records of the jobs it was running (now cancelled by the stop) and the ids of
    the queued jobs it leaves queued."""
    handle = service(start=False)
    outcome = ray.get(handle.stop.remote())
    ray.kill(handle, no_restart=True)
    return [JobRecord.model_validate(r) for r in outcome["stopped"]], list(outcome["queued"])


def wait(job_id: str, on_update: Callable[[JobRecord], None] | None = None, poll_s: float = 1.0) -> JobRecord:
    """Block until the job ends (or is interrupted); `on_update` sees each record as it changes."""
    last = None
    while True:
        record = job_status(job_id)
        if on_update and record != last:
            on_update(record)
        last = record
        if record.state.is_terminal() or record.state is JobState.INTERRUPTED:
            return record
        time.sleep(poll_s)
