"""The driver at scale: `python -m bench.scale --shards 10000,100000` (this module does the work).

A label job of N shards of one 32 px JPEG each, on a cheap real model (mobilenet_v3_small, random weights saved the
torchvision way), so the workers' work per shard is small and the driver's own cost per shard shows: its CPU seconds
and its resident memory, per 1,000 shards, and where its time goes (the phases below, timed by wrapping the runner's
own functions in this process). Then the same job again, all of it committed: what a resume of a finished job pays
to read the markers and the manifest. Input and output in a local folder by default (`--store s3`: SeaweedFS), so
what is measured is the driver, not the network.

Phases: `check` (OutputSession.check: the output listed, every done-marker read), `listing` (the plan's first pass:
the input listed and every shard planned and checked; the dispatching pass streams the same plan again, inside
`dispatch`), `dispatch` (the workers labelling, the driver settling each shard), `complete` (the manifest, and
compaction of the small files).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import tarfile
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bench.cluster import local_ray
from bench.memory import _rss_bytes
from bench.models import random_weights_file
from bench.s3server import s3_server

log = logging.getLogger(__name__)

MODEL = "mobilenet_v3_small"
IMAGE_SIZE = 32
BUCKET = "bench-driver-scale"
MIB = 1 << 20
WARM_UP_SHARDS = 50


@dataclass(frozen=True)
class DriverPoint:
    shards: int
    seconds: float
    driver_cpu_s: float
    rss_growth_mib: float  # the driver's peak RSS during the job less its RSS before it
    phases: dict[str, float]  # phase → seconds (see the module's docstring)
    rerun_seconds: float
    rerun_phases: dict[str, float]

    def per_thousand(self, value: float) -> float:
        return 1000 * value / self.shards


class PhaseTimer:
    """Seconds spent in named functions of the runner, by wrapping them where the runner looks them up."""

    PHASES = {  # phase → (module, attribute path) of what it wraps
        "check": ("jobs.output.session", "OutputSession.check"),
        "listing": ("jobs.label.runner", "_check_plan"),
        "dispatch": ("jobs.label.dispatch", "ShardDispatcher.run"),
        "complete": ("jobs.output.session", "OutputSession.complete"),
    }

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def installed(self) -> Iterator[PhaseTimer]:
        import importlib

        undo = []
        for phase, (module_name, path) in self.PHASES.items():
            owner = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for parent in parents:
                owner = getattr(owner, parent)
            original = getattr(owner, name)
            setattr(owner, name, self._timed(phase, original))
            undo.append((owner, name, original))
        try:
            yield self
        finally:
            for owner, name, original in reversed(undo):
                setattr(owner, name, original)

    def _timed(self, phase: str, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started

        return timed

    def take(self) -> dict[str, float]:
        taken, self.seconds = dict(self.seconds), defaultdict(float)
        return taken


class PeakRss:
    """This process's highest RSS while the block runs, sampled every 0.1 s."""

    def __enter__(self) -> PeakRss:
        self.before = self.peak = _rss_bytes(os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _rss_bytes(os.getpid()))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes(os.getpid()))


def write_one_image_shards(folder: Path, shards: int) -> None:
    """`shards` tar files of one 32 px JPEG each (noise, so each decodes as a photo would)."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        with tarfile.open(folder / f"{i:07d}.tar", "w") as tar:
            info = tarfile.TarInfo(f"{i:08d}.jpg")
            info.size = len(jpeg)
            tar.addfile(info, io.BytesIO(jpeg))


def run_driver_scale(sizes: list[int], store: str, cpus: int = 2) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-driver-scale-", dir="/tmp") as work:
        weights = random_weights_file(MODEL, Path(work))
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(s3_server(BUCKET)) if store == "s3" else None
            stack.enter_context(local_ray(cpus))
            import jobs.label.runner  # noqa: F401 - imported before any clock starts

            _measure(Path(work), WARM_UP_SHARDS, weights, server)  # one-off costs (imports, first job) left out
            points = [_measure(Path(work), size, weights, server) for size in sizes]
    return [_line(p) for p in points] + _growth(points)


def _measure(work: Path, shards: int, weights: str, server) -> DriverPoint:
    from jobs.label.runner import run_label_job
    from schemas.outcome import Outcome
    from schemas.specs import LabelJobSpec

    folder = work / f"in-{shards}"
    write_one_image_shards(folder, shards)
    source, output, storage = str(folder), str(work / f"out-{shards}"), {}
    if server is not None:
        source, output, storage = _upload(server, folder, shards), f"s3://{BUCKET}/out-{shards}", server.options()
    spec = LabelJobSpec(input={"uri": source, "format": "tar"}, output=output, storage=storage, top_k=5,
                        model={"name": MODEL, "weights": weights, "device": "cpu"}, batch_size=32)  # fmt: skip
    timer = PhaseTimer()
    with timer.installed():
        cpu, started = time.process_time(), time.perf_counter()
        with PeakRss() as rss:
            summary = run_label_job(spec, show_progress=False)
        seconds, driver_cpu = time.perf_counter() - started, time.process_time() - cpu
        if summary.status is not Outcome.SUCCEEDED or summary.images != shards:
            raise RuntimeError(f"the bench job did not label every image: {summary.lines()}")
        phases = timer.take()
        again = time.perf_counter()
        rerun = run_label_job(spec, show_progress=False)
        rerun_seconds = time.perf_counter() - again
        if rerun.status is not Outcome.ALREADY_COMPLETE:
            raise RuntimeError(f"the finished job ran again: {rerun.lines()}")
        rerun_phases = timer.take()
    point = DriverPoint(shards, seconds, driver_cpu, (rss.peak - rss.before) / MIB, phases, rerun_seconds,
                        rerun_phases)  # fmt: skip
    log.info("%s", _line(point))
    return point


def _upload(server, folder: Path, shards: int) -> str:
    from workers.io.storage import open_storage

    uri = f"s3://{BUCKET}/in-{shards}"
    storage = open_storage(uri, server.options())
    for path in sorted(folder.iterdir()):
        storage.upload_file(str(path), f"{uri}/{path.name}")
    return uri


def _phases(phases: dict[str, float]) -> str:
    return " ".join(f"{name}={phases.get(name, 0.0):.2f}s" for name in PhaseTimer.PHASES if name in phases)


def _line(p: DriverPoint) -> str:
    return (f"driver {p.shards} shards: seconds={p.seconds:.1f} driver_cpu_s={p.driver_cpu_s:.1f} "
            f"({p.per_thousand(p.driver_cpu_s):.2f} per 1000 shards) rss_growth_mib={p.rss_growth_mib:.0f} "
            f"({p.per_thousand(p.rss_growth_mib):.1f} per 1000 shards) {_phases(p.phases)}; "
            f"rerun of the finished job: seconds={p.rerun_seconds:.1f} {_phases(p.rerun_phases)}")  # fmt: skip


def _growth(points: list[DriverPoint]) -> list[str]:
    """Per-1,000-shard figures of the largest size against the smallest: at most 1.0 is linear or better."""
    if len(points) < 2:
        return []
    small, large = points[0], points[-1]
    ratio = lambda f: f(large) / f(small) if f(small) else float("nan")  # noqa: E731
    return [f"driver growth {small.shards} -> {large.shards} shards (per shard; 1.0 = linear): "
            f"cpu={ratio(lambda p: p.per_thousand(p.driver_cpu_s)):.2f} "
            f"rss={ratio(lambda p: p.per_thousand(p.rss_growth_mib)):.2f} "
            f"listing={ratio(lambda p: p.per_thousand(p.phases.get('listing', 0))):.2f} "
            f"check_on_rerun={ratio(lambda p: p.per_thousand(p.rerun_phases.get('check', 0))):.2f} "
            f"complete={ratio(lambda p: p.per_thousand(p.phases.get('complete', 0))):.2f}"]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="10000,100000", help="comma-separated plan sizes, smallest first")
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    for line in run_driver_scale([int(n) for n in args.shards.split(",")], args.store, args.cpus):
        print(line, flush=True)
    load = os.getloadavg()
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
