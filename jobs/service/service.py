"""The job service: a detached, named Ray actor that queues jobs, admits them as the cluster can hold them, runs them
on warm model pools and keeps every job's record in the job store.

Why a detached actor and not Ray Jobs (the job submission API): a label job's work happens in the worker actors, so
its driver is only dispatch and bookkeeping, and pools shared across jobs need one process that sees every job; Ray
Jobs would give each job its own driver process (no shared pools, 4-7 s of imports each) and needs the dashboard's
job agent, which not every cluster runs. Fine-tunes, which need process isolation, run as Ray tasks of the service.
The job store (a folder or an S3 prefix) is the truth for jobs, the outputs' done-markers for what is committed, so
the service itself holds nothing that cannot be rebuilt: killed, Ray restarts it and it continues the jobs it was
running. Several clusters may share one store: each record names the cluster that holds it, and what a service does
with another cluster's jobs (leave them while it lives, interrupt or take them over once it is gone, record a late
success) is jobs.service.ownership's plain logic. All of the policy is jobs.service.core's plain logic (no Ray):
this module is its shell, a thread running its rounds under a lock, and the Ray-backed parts it is given
(`RayCluster`, warm pools of Ray actors).
"""

from __future__ import annotations

import logging
import socket
import threading

import ray

from jobs.cluster import ClusterResources
from jobs.service.admission import QueuedJob, Resources
from jobs.service.config import ServiceConfig
from jobs.service.core import STOP_WAIT_S, TICK_S, Clock, ClusterFacts, ServiceCore, StartRun, start_in_service
from jobs.service.joblog import StoreLogHandler
from jobs.service.ownership import ClusterId, Liveness, judge

log = logging.getLogger(__name__)

PROBE_CONNECT_S = 3.0  # another cluster's GCS port: refused, or silent this long (its host is down), means gone
PROBE_ANSWER_S = 5.0  # its GCS accepted a connection: how long to wait for its session name


class JobService:
    """The service: jobs.service.core's rounds on a thread, its API calls under the same lock. `actor.py` makes
    it the detached Ray actor; given a fake cluster, pools and runs, it runs without Ray."""

    def __init__(self, config: ServiceConfig, cluster: ClusterFacts | None = None, *, pools=None,
                 clock: Clock | None = None, start_run: StartRun = start_in_service):  # fmt: skip
        if pools is None:
            from jobs.service.pools import WorkerPool  # Ray actors

            pools = WorkerPool
        self.core = ServiceCore(config, cluster or RayCluster(), pools, clock=clock, start_run=start_run)
        self.config, self.store, self.session = config, self.core.store, self.core.session
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._log_handler = StoreLogHandler(self.store)
        logging.getLogger().addHandler(self._log_handler)
        logging.getLogger().setLevel(logging.INFO)
        self._thread = threading.Thread(target=self._loop, name="bulklabel-service", daemon=True)
        self._thread.start()
        log.info("job service up: state %s, cluster session %s", config.state_uri, self.session)

    # --------------------------------------------------------------------------------------- the API (actor calls)

    def submit(self, spec, priority: int = 0, max_workers: int | None = None) -> str:
        # Outside the lock: `compile: auto` may list the input (as far as it takes to decide), and the rounds wait
        # for nothing while it does.
        compiling = self.core.decide_compile(spec, max_workers)
        with self._lock:
            return self.core.submit(spec, priority, max_workers, compiling)

    def list(self) -> list[dict]:
        return [record.model_dump(mode="json") for record in self.store.list()]

    def status(self, job_id: str) -> dict:
        return self.store.get(job_id).model_dump(mode="json")

    def cancel(self, job_id: str) -> dict:
        with self._lock:
            return self.core.cancel(job_id)

    def resume(self, job_id: str, spec=None) -> dict:
        with self._lock:
            return self.core.resume(job_id, spec)

    def logs(self, job_id: str, offset: int = 0) -> tuple[str, int]:
        self.store.get(job_id)  # unknown job: a clear error
        self.store.flush_logs()
        return self.store.read_log(job_id, offset)

    def describe(self) -> dict:
        with self._lock:
            return self.core.describe()

    def stop(self) -> dict:
        """Stop dispatching and release the pools. Running jobs are cancelled (their running shards finish, for at
        most STOP_WAIT_S) and recorded as cancelled by the stop; queued jobs stay queued. Returns what became of
        them (for the CLI)."""
        with self._lock:
            stopping = self.core.stop()
        self._stopping.set()
        self._thread.join(timeout=STOP_WAIT_S + 30)
        self.core.close_pools()
        with self._lock:
            outcome = self.core.stopped(stopping)
        logging.getLogger().removeHandler(self._log_handler)
        self.store.close()
        return outcome

    def _loop(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                self.core.tick()
            self._stopping.wait(TICK_S)
        with self._lock:
            self.core.guarded(self.core.settle_stopped)


# --------------------------------------------------------------------------------------------- cluster facts


class RayCluster:
    """ClusterFacts of the Ray cluster this process is connected to."""

    def identity(self) -> ClusterId:
        """This cluster's life (a new `ray start` is a new session): a service tells its own jobs from those of
        another cluster sharing the store, or of one that went away."""
        return ClusterId(ray.get_runtime_context().gcs_address, ray._private.worker.global_worker.node.session_name)

    def resources(self) -> ClusterResources:
        alive = [node for node in ray.nodes() if node.get("Alive")]
        per_node = tuple((float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0))) for n in alive)
        return ClusterResources(cpus=sum(c for c, _ in per_node), gpus=sum(g for _, g in per_node),
                                nodes=len(alive), node_resources=per_node)  # fmt: skip

    def free(self) -> Resources:
        free = ray.available_resources()
        return Resources(float(free.get("CPU", 0)), float(free.get("GPU", 0)))

    def request(self, waiting: list[QueuedJob]) -> None:
        """Tell the autoscaler what the waiting jobs need (a no-op on a cluster without one)."""
        bundles = [{"CPU": j.needs.per_worker.cpus,
                    **({"GPU": j.needs.per_worker.gpus} if j.needs.per_worker.gpus else {})}
                   for j in waiting for _ in range(j.needs.min_workers)]  # fmt: skip
        try:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles or [])
        except Exception:  # noqa: BLE001 - no autoscaler here
            pass

    def liveness(self, cluster: ClusterId) -> Liveness:
        return probe_cluster(cluster)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def probe_cluster(cluster: ClusterId) -> Liveness:
    """Whether another cluster lives: a TCP connection to its GCS address (refused or silent for PROBE_CONNECT_S:
    gone), then its session name from the GCS's key-value store (another session: a new cluster there, so gone).
    Bounded: Ray's GCS client waits long for an address that does not answer, so it asks from a thread."""
    host, _, port = cluster.gcs_address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_CONNECT_S):
            pass
    except (OSError, ValueError):
        return judge(cluster, reachable=False, session=None)
    answer: list[str] = []

    def ask() -> None:
        try:
            from ray._raylet import GcsClient

            name = GcsClient(address=cluster.gcs_address).internal_kv_get(b"session_name", b"session",
                                                                          timeout=PROBE_ANSWER_S)  # fmt: skip
            if name:
                answer.append(name.decode())
        except Exception as exc:  # noqa: BLE001 - any failure to answer leaves it unknown
            log.info("cluster %s does not say its session: %s", cluster, exc)

    asking = threading.Thread(target=ask, name="bulklabel-probe", daemon=True)
    asking.start()
    asking.join(PROBE_ANSWER_S + 1)
    return judge(cluster, reachable=True, session=answer[0] if answer else None)
