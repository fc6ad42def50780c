"""`python -m bench.predict`: `bulklabel predict` on a few photos, the whole command as a user runs it (a fresh
process: Python, torch and the model loaded, the photos decoded and labelled), best and median of `--runs`, and the
same through `load_model` in a warm process (what an app pays per call once the model is loaded). Prints the load
average: on a shared 2-core machine a busy neighbour doubles the figures."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    args = parser.parse_args()
    photos = [str(p) for p in sorted(IMAGENET.glob("*.JPEG"))[: args.photos]]
    command = [str(Path(sys.executable).with_name("bulklabel")), "predict", *photos, "--model", args.model,
               "--weights", args.weights]  # fmt: skip
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    walls = []
    for _ in range(args.runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        walls.append(time.perf_counter() - started)
    print(f"bulklabel predict, {len(photos)} photos, {args.model}: best {min(walls):.2f} s, median "
          f"{statistics.median(walls):.2f} s of {args.runs} runs (whole command, fresh process)")  # fmt: skip
    from workers.ship.predict import load_model

    started = time.perf_counter()
    with load_model(args.model, args.weights) as model:
        loaded = time.perf_counter() - started
        calls = []
        for _ in range(args.runs):
            started = time.perf_counter()
            model.predict(photos)
            calls.append(time.perf_counter() - started)
    print(f"load_model: {loaded:.2f} s (torch imported already); predict({len(photos)} photos): median "
          f"{statistics.median(calls) * 1000:.0f} ms")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
