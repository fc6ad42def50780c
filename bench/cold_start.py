"""A cold `bulklabel label`, from the command to its first committed shard: `python -m bench.cold_start [--runs N]`.

Ray is up first (a `ray start --head --num-cpus 2` cluster, bench.warm.service_cluster); then each run is the
command a user types, as a new process: `bulklabel -v label` on 16 sample photos (MobileNetV2, the offline
ImageNet weights, shards of 4 images in batches of 4, so the first shard is one small batch) into a new output.
Nothing is warm but the page cache: the worker is a new process that imports torch and loads the model.

Each run prints, in seconds from the command's start: the CLI ready (its first log line: Python and the CLI's
imports), the output checked and claimed, the worker's process up (Ray's core worker constructed, `import ray`
done; 0 where Ray had started it ahead, idle), its actor's creation begun, the worker built (its actor creation
finished: torch and torchvision imported, the model loaded, the lanes started), the driver told so, and the first
shard committed (its one batch decoded, predicted, written).
The load average is printed first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.data import IMAGENET_SAMPLE

CLI = str(Path(sys.executable).with_name("bulklabel"))
PHOTOS = 16
_LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)")
_RAY_LINE = re.compile(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) I \d+ \d+\] (.*)")


def _stamp(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _driver_marks(stderr: str) -> dict[str, float]:
    """When the CLI logged its first line, claimed the output, and heard that its first worker was ready."""
    marks: dict[str, float] = {}
    for line in stderr.splitlines():
        match = _LOG_LINE.search(line)
        if not match:
            continue
        message = match.group(2)
        marks.setdefault("cli_ready", _stamp(match.group(1)))
        if message.startswith("claimed output"):
            marks.setdefault("claimed", _stamp(match.group(1)))
        if re.match(r"\d+ worker\(s\): ", message):
            marks.setdefault("driver_told", _stamp(match.group(1)))
    return marks


def _worker_marks(ray_logs: Path, after: float) -> dict[str, float]:
    """From Ray's core-worker logs, the first actor created after `after`: when its process was up (`import ray`
    done: a new process, or one Ray started ahead, idle), when its creation began, and when it finished (the
    worker built)."""
    found: dict[str, float] = {}
    for log in sorted(ray_logs.glob("python-core-worker-*.log")):
        lines = [m for m in map(_RAY_LINE.search, log.read_text(errors="replace").splitlines()) if m]
        up = next((_stamp(m.group(1)) for m in lines if "Constructing CoreWorkerProcess" in m.group(2)), None)
        began = next((_stamp(m.group(1)) for m in lines if "Creating actor" in m.group(2)), None)
        built = next((_stamp(m.group(1)) for m in lines if "Actor creation task finished" in m.group(2)), None)
        if None in (up, began, built) or began < after or (found and began > found["actor_creating"]):
            continue
        found = {"process_up": max(up, after), "actor_creating": began, "worker_built": built}
    return found


def _first_commit(output: Path) -> float | None:
    times = []
    for marker in output.rglob("*.json"):
        try:
            committed = json.loads(marker.read_text()).get("committed_at")
        except (OSError, ValueError, AttributeError):
            continue
        if committed:
            times.append(datetime.datetime.fromisoformat(committed).timestamp())
    return min(times, default=None)


def run_once(cluster_address: str, temp_dir: str, photos: Path, output: Path) -> dict[str, float]:
    """One cold command; each mark in seconds from its start."""
    env = {**os.environ, "RAY_ADDRESS": cluster_address}
    command = [CLI, "-v", "label", "--input", str(photos), "--output", str(output), "--model", "mobilenet_v2",
               "--weights", "IMAGENET1K_V1", "--files-per-shard", "4", "--batch-size", "4", "--quiet"]  # fmt: skip
    started = time.time()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"bulklabel label exited {done.returncode}: {done.stderr[-2000:]}")
    marks = _driver_marks(done.stderr) | _worker_marks(Path(temp_dir, "session_latest", "logs"), started)
    first = _first_commit(output)
    if first is not None:
        marks["first_commit"] = first
    marks["exited"] = ended
    return {name: at - started for name, at in sorted(marks.items(), key=lambda item: item[1])}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    from bench.warm import service_cluster

    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as folder, service_cluster(cpus=2) as cluster:
        photos = Path(folder, "photos")
        photos.mkdir()
        for photo in sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:PHOTOS]:
            shutil.copy(photo, photos / photo.name)
        for run in range(1, args.runs + 1):
            marks = run_once(cluster.address, cluster.temp_dir, photos, Path(folder, f"out-{run}"))
            print(f"run {run}: " + "  ".join(f"{name} {seconds:.2f}" for name, seconds in marks.items()))


if __name__ == "__main__":
    main()
