"""The comparison: for each model, bulklabel vs the Ray Data reference vs the ceiling, in one process, same cores."""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
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

log = logging.getLogger(__name__)

BUCKET = "bench"
IDLE_TIMEOUT_S = 60
TOOLS = ("ceiling", "raydata", "bulklabel")


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


# The full run's ceiling passes as many images through the model as the job labels (2,016 and 800), so both are
# measured over windows of similar length: a 7 s window caught this VM's fast moments (run C/D in bench/RESULTS.md).
FULL = (ModelCase("mobilenet_v2", "IMAGENET1K_V1", 2000, 63), ModelCase("resnet50", None, 800, 25))
QUICK = (ModelCase("mobilenet_v2", "IMAGENET1K_V1", 320, 6), ModelCase("resnet50", None, 128, 3))


@dataclass(frozen=True)
class Measurement:
    rate: float  # images/s
    peak_mib: float  # driver + Ray workers RSS


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
        )

    def memory_line(self) -> str:
        return f"{self.name} peak RSS MiB (driver + workers): " + " ".join(
            f"{tool}={self.peak_mib(tool):.0f}" for tool in ("bulklabel", "raydata", "ceiling")
        )


def run_suite(config: SuiteConfig) -> list[ModelResult]:
    """Prepare data, then measure every model `repeat` times; the tools' order rotates between repeats."""
    photos = photo_payloads()
    with tempfile.TemporaryDirectory(prefix="bench-weights-") as weights_dir, s3_server(BUCKET) as server:
        models = {c.name: BenchModel(c.name, c.weights or random_weights_file(c.name, Path(weights_dir)))
                  for c in config.cases}  # fmt: skip
        per_shard = config.images_per_shard
        datasets = {
            c.name: upload_tar_shards(server, f"s3://{BUCKET}/input-{c.name}", photos, c.images, per_shard)
            for c in config.cases
        }
        with local_ray(config.cpus):
            _warm_driver_imports()
            results = [ModelResult(c.name) for c in config.cases]
            for r in range(config.repeat):
                order = TOOLS[r % 3 :] + TOOLS[: r % 3]
                for case, result in zip(config.cases, results, strict=True):
                    run = {}
                    for tool in order:
                        run[tool] = _measure(tool, config, case, models[case.name], datasets[case.name], server, r)
                        _wait_idle(config.cpus)
                    result.runs.append(run)
                    rates = ", ".join(f"{t}={m.rate:.1f} img/s ({m.peak_mib:.0f} MiB)" for t, m in run.items())
                    log.info("run %d/%d %s: %s", r + 1, config.repeat, case.name, rates)
    return results


def _measure(
    tool: str, config: SuiteConfig, case: ModelCase, model: BenchModel, data: Dataset, server: S3Server, run: int
) -> Measurement:
    output = f"s3://{BUCKET}/output-{case.name}-{tool}-{run}-{time.time_ns()}"
    with PeakMemory() as peak:
        if tool == "ceiling":
            rate = run_ceiling(model, photo_payloads()[:64], config.batch_size, case.ceiling_batches, config.cpus)
        elif tool == "raydata":
            seconds = run_reference(data.uri, output, server.pyarrow_fs(), model, config.batch_size, config.raydata)
            rate = data.images / seconds
        else:
            timing = run_bulklabel(server, data.uri, output, model, config.batch_size, config.bulklabel_workers)
            rate = timing.images / timing.seconds
            log.info("bulklabel %s: %.1fs wall = %.1fs start-up and manifest + %.1fs from the first shard's turn "
                     "to the last commit (%.1f img/s), %d shards", case.name, timing.seconds, timing.startup_seconds,
                     timing.steady_seconds, timing.images / timing.steady_seconds, timing.shards)  # fmt: skip
    log.info("%s %s: %.1f img/s, peak %.0f MiB", tool, case.name, rate, peak.mib)
    return Measurement(rate, peak.mib)


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
