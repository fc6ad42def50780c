"""`bulklabel review serve` as users run it: a real uvicorn process over loopback. A server SIGKILLed right after it
committed a decision and before it answered, then started again; four reviewers posting 1,000 decisions at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pyarrow as pa
import pytest

from jobs.output.corrections import open_queue, read_decisions
from jobs.output.faultpoints import ACK_ENV, ACK_VALUE, FAULTS_ENV
from jobs.output.results import ComputedResult, commit_result
from schemas.curation import ISSUES_SCHEMA, LabelIssuesJobSpec
from tests.jobs.review.conftest import CLASSES

BULKLABEL = str(Path(sys.executable).with_name("bulklabel"))


class Server:
    """`bulklabel review serve QUEUE --port 0` in its own process; `url` once it listens."""

    def __init__(self, queue: Path, env: dict[str, str] | None = None, extra: tuple[str, ...] = ()):
        # Its log to a file: a pipe nobody reads fills after some hundred decisions and blocks the server.
        self.log = queue.with_name(f"{queue.name}-server-{uuid.uuid4().hex[:6]}.log")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([BULKLABEL, "review", "serve", str(queue), "--port", "0", *extra],
                                            stdout=subprocess.PIPE, stderr=log, text=True,
                                            env={**os.environ, **(env or {})})  # fmt: skip
        line = self.process.stdout.readline()
        assert " at http://127.0.0.1:" in line, line + self.log.read_text()
        url = line.split(" at ", 1)[1].strip()
        self.base, self.token = url.split("/?token=")
        self.client = httpx.Client(base_url=self.base, headers={"authorization": f"Bearer {self.token}"},
                                   timeout=30)  # fmt: skip

    def decide(self, body: dict) -> httpx.Response:
        return self.client.post("/api/decisions", json=body)

    def next(self, reviewer: str) -> dict | None:
        return self.client.post("/api/next", json={"reviewer": reviewer}).json()["item"]

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def _many(root: Path, flagged_photos: Path, count: int) -> Path:
    """A finished issues output of `count` rows over the fixture's photos (each photo under many keys)."""
    photos = sorted(p for p in flagged_photos.rglob("*.JPG"))
    rows = [{"key": f"k{i:05d}.jpg", "image": str(photos[i % len(photos)]), "given_label": CLASSES[i % 3],
             "suggested_label": CLASSES[(i + 1) % 3], "self_confidence": 0.1, "suggested_score": 0.8, "flagged": True,
             "rank": i + 1, "error": None} for i in range(count)]  # fmt: skip
    queue = root / "many"
    spec = LabelIssuesJobSpec(data={"uri": str(flagged_photos)}, base={"name": "mobilenet_v2"}, output=str(queue))
    commit_result(str(queue), None, spec.resolved_job_id(), "label-issues", spec,
                  lambda: ComputedResult(table=pa.Table.from_pylist(rows, schema=ISSUES_SCHEMA)))  # fmt: skip
    return queue


@pytest.mark.fault(
    fault="the review server killed between committing a decision and answering it",
    injected="`bulklabel review serve` SIGKILLed at its 5th decision, right after the decision's file was created; "
    "the reviewer's client retries that decision (same id) on a server started again, then decides 5 more",
    expected="every decision recorded exactly once (the retried one answered `already`); the restarted server "
    "offers the reviewer the first undecided image: nothing lost but the answer in flight",
)
def test_a_killed_server_loses_at_most_the_decision_in_flight(flagged, record_property):
    faults = {FAULTS_ENV: json.dumps([{"shard": "review:decision_written", "action": "exit", "attempt": 5}]),
              ACK_ENV: ACK_VALUE}  # fmt: skip
    server = Server(flagged.queue, faults)
    sent, answers = [], []
    try:
        for n in range(10):
            item = server.next("ana")
            body = {"decision_id": f"ana-{n:06d}", "reviewer": "ana", "key": item["key"], "decision": "label",
                    "label": CLASSES[n % 3]}  # fmt: skip
            sent.append(body)
            try:
                answers.append(server.decide(body).json()["recorded"])
            except httpx.TransportError:  # the server died with the decision in flight: start it again, retry
                assert server.process.wait(timeout=30) == -9
                server.stop()
                server = Server(flagged.queue)
                answers.append(server.decide(body).json()["recorded"])
    finally:
        server.stop()
    assert answers == ["new"] * 4 + ["already"] + ["new"] * 5
    queue = open_queue(str(flagged.queue))
    stored = read_decisions(queue.storage, queue.uri)
    assert sorted(d.decision_id for d in stored) == [b["decision_id"] for b in sent]
    assert [d.key for d in sorted(stored, key=lambda d: d.decision_id)] == list(flagged.keys[:10])
    record_property("measured", "10 decisions, the 5th's answer lost to a SIGKILL: 10 stored, its retry `already`")


def test_four_reviewers_post_a_thousand_decisions_nothing_lost_or_duplicated(tmp_path, flagged, record_property):
    queue = _many(tmp_path, flagged.data, 1000)
    server = Server(queue)
    latencies: list[float] = []
    lock = threading.Lock()
    failures: list[str] = []

    def reviewer(name: str) -> None:
        client = httpx.Client(base_url=server.base, headers={"authorization": f"Bearer {server.token}"}, timeout=30)
        try:
            while (item := client.post("/api/next", json={"reviewer": name}).json()["item"]) is not None:
                body = {"decision_id": uuid.uuid4().hex, "reviewer": name, "key": item["key"], "decision": "label",
                        "label": CLASSES[len(item["key"]) % 3]}  # fmt: skip
                started = time.perf_counter()
                answer = client.post("/api/decisions", json=body)
                took = time.perf_counter() - started
                if answer.status_code != 200 or answer.json()["recorded"] != "new":
                    failures.append(answer.text)
                if item["key"].endswith("7.jpg"):  # a client that retries some anyway
                    assert client.post("/api/decisions", json=body).json()["recorded"] == "already"
                with lock:
                    latencies.append(took)
        finally:
            client.close()

    threads = [threading.Thread(target=reviewer, args=(f"reviewer-{i}",)) for i in range(4)]
    started = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.stop()
    wall = time.perf_counter() - started
    assert failures == []
    result = open_queue(str(queue))
    stored = read_decisions(result.storage, result.uri)
    assert len(stored) == 1000 and len({d.key for d in stored}) == 1000 and len(latencies) == 1000
    p50, p95 = sorted(latencies)[499], sorted(latencies)[949]
    line = (f"4 reviewers, 1000 decisions over loopback in {wall:.1f} s: p50 {p50 * 1000:.1f} ms, p95 "
            f"{p95 * 1000:.1f} ms per decision (load {os.getloadavg()[0]:.2f})")  # fmt: skip
    print(line)
    record_property("measured", line)
