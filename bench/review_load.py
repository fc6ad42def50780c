"""`python -m bench.review_load`: reviewers posting decisions to `bulklabel review serve` over loopback, as a page
does.

A label-issues output of `--items` rows (the plants sample's photos, each under many keys) is committed through the
result protocol; the server runs as users run it (its own process, uvicorn); `--reviewers` threads each ask for an
image (`/api/next`) and decide it (`/api/decisions`, a fresh id) until the queue is empty. Printed: the wall time,
decisions per second, the latency of a decision (p50, p95, p99: the request that commits it, a Parquet file created
with create-if-absent and fsynced), of asking for the next image, and the count read back (every decision once),
with the load average (a shared 2-core machine: a busy neighbour doubles a latency).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import pyarrow as pa

from jobs.output.corrections import open_queue, read_decisions
from jobs.output.results import ComputedResult, commit_result
from schemas.curation import ISSUES_SCHEMA, LabelIssuesJobSpec

PLANTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "plants"


def queue_of(root: Path, items: int) -> Path:
    photos = sorted(p for p in PLANTS.rglob("*.JPG"))[:200]
    classes = sorted({p.parent.name for p in photos})
    rows = [{"key": f"k{i:06d}.jpg", "image": str(photos[i % len(photos)]), "given_label": photos[i % len(photos)]
             .parent.name, "suggested_label": classes[i % len(classes)], "self_confidence": 0.1,
             "suggested_score": 0.8, "flagged": True, "rank": i + 1, "error": None} for i in range(items)]  # fmt: skip
    queue = root / "queue"
    spec = LabelIssuesJobSpec(data={"uri": str(PLANTS)}, base={"name": "mobilenet_v2"}, output=str(queue))
    commit_result(str(queue), None, spec.resolved_job_id(), "label-issues", spec,
                  lambda: ComputedResult(table=pa.Table.from_pylist(rows, schema=ISSUES_SCHEMA)))  # fmt: skip
    return queue


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--reviewers", type=int, default=4)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="review-load-") as tmp:
        queue = queue_of(Path(tmp), args.items)
        bulklabel = str(Path(sys.executable).with_name("bulklabel"))
        with open(Path(tmp) / "server.log", "w") as log:
            server = subprocess.Popen([bulklabel, "review", "serve", str(queue), "--port", "0"], stdout=subprocess.PIPE,
                                      stderr=log, text=True)  # fmt: skip
        base, token = server.stdout.readline().split(" at ", 1)[1].strip().split("/?token=")
        decide: list[float] = []
        ask: list[float] = []
        lock = threading.Lock()

        def reviewer(name: str) -> None:
            with httpx.Client(base_url=base, headers={"authorization": f"Bearer {token}"}, timeout=60) as client:
                while True:
                    started = time.perf_counter()
                    item = client.post("/api/next", json={"reviewer": name}).json()["item"]
                    asked = time.perf_counter()
                    if item is None:
                        return
                    body = {"decision_id": uuid.uuid4().hex, "reviewer": name, "key": item["key"], "decision": "label",
                            "label": item["given_label"]}  # fmt: skip
                    answer = client.post("/api/decisions", json=body)
                    answer.raise_for_status()
                    with lock:
                        ask.append(asked - started)
                        decide.append(time.perf_counter() - asked)

        threads = [threading.Thread(target=reviewer, args=(f"r{i}",)) for i in range(args.reviewers)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
        server.terminate()
        server.wait(timeout=60)
        result = open_queue(str(queue))
        stored = read_decisions(result.storage, result.uri)
    print(
        f"{args.reviewers} reviewers, {len(decide)} decisions in {wall:.1f} s ({len(decide) / wall:.0f}/s); "
        f"read back: {len(stored)} decisions, {len({d.key for d in stored})} images"
    )
    for name, values in (("decision", decide), ("next image", ask)):
        print(
            f"{name}: p50 {percentile(values, 0.5) * 1000:.1f} ms, p95 {percentile(values, 0.95) * 1000:.1f} ms, "
            f"p99 {percentile(values, 0.99) * 1000:.1f} ms"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
