"""The load row's driver, run as its own process against a `ray start` cluster ($RAY_ADDRESS): submits every job of
a plan at once through the Python API (`from jobs import submit, ...`), polls `status` and `list` until every job
ends, and writes each job's final record and every call's latency as JSON. Its own process: the test session's Ray
connection (tests/conftest.py's `ray_cluster`) is one cluster, this is another.

    python -m tests.scenarios.stress_driver PLAN.json RESULT.json
"""

from __future__ import annotations

import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

SUBMIT_THREADS = 16  # "at once": as many submits in flight as a burst of users or a script's thread pool makes
POLL_GAP_S = 0.2
DEADLINE_S = 600.0


def main(plan_path: str, result_path: str) -> None:
    from jobs import job_status, list_jobs, submit
    from schemas.specs import LabelJobSpec

    plan = json.loads(open(plan_path).read())
    specs = [LabelJobSpec.model_validate(spec) for spec in plan["specs"]]
    first = submit(specs[0])  # connects (and starts the service) once: the burst measures the service, not ray.init
    with ThreadPoolExecutor(SUBMIT_THREADS) as pool:
        jobs = [first, *pool.map(submit, specs[1:])]
    latencies: dict[str, list[float]] = {"status": [], "list": []}
    records: dict[str, dict] = {}
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        started = time.monotonic()
        listed = list_jobs()
        latencies["list"].append(time.monotonic() - started)
        records = {r.job_id: r.model_dump(mode="json") for r in listed if r.job_id in set(jobs)}
        for job in random.sample(jobs, 3):
            started = time.monotonic()
            job_status(job)
            latencies["status"].append(time.monotonic() - started)
        if len(records) == len(jobs) and all(r["state"] not in ("queued", "running") for r in records.values()):
            break
        time.sleep(POLL_GAP_S)
    with open(result_path, "w") as fh:
        json.dump({"jobs": jobs, "records": records, "latencies": latencies}, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
