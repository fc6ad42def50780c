"""The comparison: for each model, bulklabel vs the Ray Data reference vs the ceiling, in one process, same cores."""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.bulklabel_run import run_bulklabel
from bench.ceiling import run_ceiling
from bench.cluster import local_ray
from bench.data import Dataset, photo_payloads, upload_tar_shards
from bench.memory import PeakMemory
from bench.models import BenchModel, random_weights_file
from bench.raydata_reference import RayDataTuning, run_reference
from bench.s3server import S3Server, s3_server
from bench.warm import describe, job_service, private_state_dir, run_warm, service_cluster

log = logging.getLogger(__name__)

BUCKET = "bench"
IDLE_TIMEOUT_S = 60
TOOLS = ("ceiling", "raydata", "bulklabel")
# After the rotating tools, in this order: the warm job on an eager pool, then on a compiled one (--compiled). The
# compiled pool's ratio is against the same eager ceiling: compiling is how a job goes past it.
WARM_TOOLS = ("warm", "compiled_warm")


@dataclass(frozen=True)
class ModelCase:
    name: str
    weights: str | None  # enum name; None = random weights generated for the run (throughput is the same)
    images: int
    ceiling_batches: int


@dataclass(frozen=True)
class SuiteConfig:
    cases: tuple[ModelCase, ...]
    batch_size: int = 32
    images_per_shard: int = 100
    cpus: int = 2
    repeat: int = 1
    bulklabel_workers: int = 0  # 0 = bulklabel's own default placement
    raydata: RayDataTuning = RayDataTuning()
    warm: bool = False  # also the same job through the job service on a warm pool (bench/warm.py)
    compiled: bool = False  # warm mode: also on a warm pool of torch.compile'd workers (`compiled_warm`)


# The full run's ceiling passes as many images through the model as the job labels (2,016 and 800), so both are
# measured over windows of similar length: a 7 s window caught this VM's fast moments (run C/D in bench/RESULTS.md).
FULL = (ModelCase("mobilenet_v2", "IMAGENET1K_V1", 2000, 63), ModelCase("resnet50", None, 800, 25))
QUICK = (ModelCase("mobilenet_v2", "IMAGENET1K_V1", 320, 6), ModelCase("resnet50", None, 128, 3))


@dataclass(frozen=True)
class Measurement:
    rate: float  # images/s
    peak_mib: float  # driver + Ray workers RSS
    first_commit_s: float | None = None  # job start (call or submit) to the first committed shard
    service_mib: float | None = None  # warm: the service's and its pool workers' RSS after the job


@dataclass
class ModelResult:
    name: str
    runs: list[dict[str, Measurement]] = field(default_factory=list)

    def median_rate(self, tool: str) -> float:
        return statistics.median(run[tool].rate for run in self.runs)

    def median_ratio(self, tool: str, other: str) -> float:
        """The median over runs of the ratio within each run (the machine is noisy; ratios across runs mislead)."""
        return statistics.median(run[tool].rate / run[other].rate for run in self.runs)

    def peak_mib(self, tool: str) -> float:
        return max(run[tool].peak_mib for run in self.runs)

    def line(self) -> str:
        return (
            f"{self.name}: bulklabel={self.median_rate('bulklabel'):.1f} raydata={self.median_rate('raydata'):.1f} "
            f"ceiling={self.median_rate('ceiling'):.1f} vs_raydata={self.median_ratio('bulklabel', 'raydata'):.2f} "
            f"vs_ceiling={self.median_ratio('bulklabel', 'ceiling'):.2f}"
        ) + "".join(self._warm_fields(tool) for tool in WARM_TOOLS if tool in self.runs[0])

    def _warm_fields(self, tool: str) -> str:
        return f" {tool}={self.median_rate(tool):.1f} {tool}_vs_ceiling={self.median_ratio(tool, 'ceiling'):.2f}"

    def warm_line(self) -> str:
        """Warm against cold in the same runs: rates, time to the first committed shard, the service's memory."""
        first = {t: statistics.median(run[t].first_commit_s for run in self.runs) for t in ("warm", "bulklabel")}
        return (
            f"{self.name} warm vs cold: warm={self.median_rate('warm'):.1f} cold={self.median_rate('bulklabel'):.1f} "
            f"ceiling={self.median_rate('ceiling'):.1f} img/s (warm/cold={self.median_ratio('warm', 'bulklabel'):.2f});"
            f" first committed shard warm={first['warm']:.1f}s cold={first['bulklabel']:.1f}s; service + pool RSS "
            f"{max(run['warm'].service_mib for run in self.runs):.0f} MiB"
        )

    def memory_line(self) -> str:
        return f"{self.name} peak RSS MiB (driver + workers): " + " ".join(
            f"{tool}={self.peak_mib(tool):.0f}"
            for tool in ("bulklabel", "raydata", "ceiling", *WARM_TOOLS)
            if tool in self.runs[0]
        )


@dataclass(frozen=True)
class _Case:
    """One model's inputs: the model, its dataset and (warm mode) the warm-up job's smaller one."""

    model: BenchModel
    data: Dataset
    warmup: Dataset | None


@dataclass(frozen=True)
class _Cluster:
    roots: tuple[int, ...] = ()  # where Ray's workers descend from, besides this process (a `ray start` raylet)
    state_uri: str = ""  # the job service's store (warm mode)


def run_suite(config: SuiteConfig) -> list[ModelResult]:
    """Prepare data, then measure every model `repeat` times; the tools' order rotates between repeats (the warm
    job, when asked for, comes last)."""
    photos = photo_payloads()
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as weights_dir, s3_server(BUCKET) as server:
        cases = {c.name: _prepare(c, config, server, photos, Path(weights_dir)) for c in config.cases}
        with _cluster(config) as cluster:
            _warm_driver_imports()
            results = [ModelResult(c.name) for c in config.cases]
            for r in range(config.repeat):
                order = TOOLS[r % 3 :] + TOOLS[: r % 3] + _warm_tools(config)
                for case, result in zip(config.cases, results, strict=True):
                    run = {}
                    for tool in order:
                        run[tool] = _measure(tool, config, case, cases[case.name], server, r, cluster)
                        _wait_idle(config.cpus)
                    result.runs.append(run)
                    rates = ", ".join(f"{t}={m.rate:.1f} img/s ({m.peak_mib:.0f} MiB)" for t, m in run.items())
                    log.info("run %d/%d %s: %s", r + 1, config.repeat, case.name, rates)
    return results


def _warm_tools(config: SuiteConfig) -> tuple[str, ...]:
    return WARM_TOOLS if config.compiled else ("warm",) if config.warm else ()


def _prepare(case: ModelCase, config: SuiteConfig, server: S3Server, photos: list[bytes], weights_dir: Path) -> _Case:
    model = BenchModel(case.name, case.weights or random_weights_file(case.name, weights_dir))
    per_shard = config.images_per_shard
    data = upload_tar_shards(server, f"s3://{BUCKET}/input-{case.name}", photos, case.images, per_shard)
    # Two shards: the warm-up job runs long enough for its pool to grow to every worker the timed job will use.
    warmup = None
    if config.warm or config.compiled:
        warmup = upload_tar_shards(server, f"s3://{BUCKET}/warmup-{case.name}", photos, 2 * per_shard, per_shard)
    return _Case(model, data, warmup)


@contextmanager
def _cluster(config: SuiteConfig) -> Iterator[_Cluster]:
    """A private `ray.init` cluster; in warm mode a `ray start` one, since the job service lives on such a cluster."""
    if not (config.warm or config.compiled):
        with local_ray(config.cpus):
            yield _Cluster()
        return
    state = private_state_dir()
    try:
        with service_cluster(config.cpus) as cluster:
            yield _Cluster((cluster.raylet_pid,), state)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _measure(tool: str, config: SuiteConfig, case: ModelCase, inputs: _Case, server: S3Server, run: int,
             cluster: _Cluster) -> Measurement:  # fmt: skip
    output = f"s3://{BUCKET}/output-{case.name}-{tool}-{run}-{time.time_ns()}"
    model, data, extra = inputs.model, inputs.data, {}
    with PeakMemory(cluster.roots) as peak:
        if tool == "ceiling":
            rate = run_ceiling(model, photo_payloads()[:64], config.batch_size, case.ceiling_batches, config.cpus)
        elif tool == "raydata":
            seconds = run_reference(data.uri, output, server.pyarrow_fs(), model, config.batch_size, config.raydata)
            rate = data.images / seconds
        elif tool in WARM_TOOLS:
            with job_service(cluster.state_uri):
                warm = run_warm(server, inputs.warmup.uri, data.uri, output, model, config.batch_size,
                                config.bulklabel_workers, compile=tool == "compiled_warm")  # fmt: skip
            log.info("%s", describe(case.name if tool == "warm" else f"{case.name} (compiled)", warm))
            rate = warm.images / warm.seconds
            extra = {"first_commit_s": warm.first_commit_seconds,
                     "service_mib": warm.service_mib + sum(warm.workers_mib)}  # fmt: skip
        else:
            timing = run_bulklabel(server, data.uri, output, model, config.batch_size, config.bulklabel_workers)
            rate = timing.images / timing.seconds
            extra = {"first_commit_s": timing.first_commit_seconds}
            log.info("bulklabel %s: %.1fs wall = %.1fs start-up and manifest + %.1fs from the first shard's turn "
                     "to the last commit (%.1f img/s), %d shards; first commit at %.1fs", case.name, timing.seconds,
                     timing.startup_seconds, timing.steady_seconds, timing.images / timing.steady_seconds,
                     timing.shards, timing.first_commit_seconds)  # fmt: skip
    log.info("%s %s: %.1f img/s, peak %.0f MiB", tool, case.name, rate, peak.mib)
    return Measurement(rate, peak.mib, **extra)


def _warm_driver_imports() -> None:
    """Import what the driver needs before any clock starts (a long-running driver has these loaded)."""
    import ray.data
    import torchvision  # noqa: F401

    import jobs.label.runner  # noqa: F401

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data"):  # Ray Data sets its loggers up on import; quieten them after that
        logging.getLogger(name).setLevel(logging.WARNING)


def _wait_idle(cpus: int) -> None:
    """Wait until the previous measurement's actors have released their CPUs."""
    import ray

    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # exiting processes still use CPU for a moment after releasing their resources
