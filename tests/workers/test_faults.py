"""workers.faults: rules sent with a job win over the process's own, and stay off without the acknowledgement."""

from __future__ import annotations

import json

import pytest

from schemas.shards import ShardJob
from schemas.specs import LabelJobSpec
from workers import faults

SLOW = json.dumps([{"action": "slow", "seconds": 0.0}])
RAISE_ON_B = json.dumps([{"shard": "b", "attempt": 1, "action": "raise", "after_rows": 4}])


@pytest.fixture(autouse=True)
def _fresh_rules():
    faults.active_rules.cache_clear()
    yield
    faults.active_rules.cache_clear()


def test_a_driver_with_faults_armed_sends_them_with_its_job(monkeypatch):
    spec = LabelJobSpec(input={"uri": "/in"}, output="/out", model={"name": "mobilenet_v2"})
    assert ShardJob.of(spec, "j", faults.forwarded_rules()).faults == ""  # off: nothing sent
    monkeypatch.setenv(faults.FAULTS_ENV, RAISE_ON_B)
    assert faults.forwarded_rules() == ""  # set but not acknowledged: still nothing
    monkeypatch.setenv(faults.ACK_ENV, faults.ACK_VALUE)
    assert ShardJob.of(spec, "j", faults.forwarded_rules()).faults == RAISE_ON_B


def test_the_jobs_rules_fire_in_a_worker_whose_own_environment_has_none(monkeypatch):
    monkeypatch.delenv(faults.FAULTS_ENV, raising=False)
    point = faults.FaultPoint("b", 1, faults.rules_of(RAISE_ON_B))
    point.between_batches(rows=3)  # too early
    faults.FaultPoint("a", 1, point.rules).between_batches(rows=8)  # another shard
    faults.FaultPoint("b", 2, point.rules).between_batches(rows=8)  # another attempt
    with pytest.raises(faults.InjectedFault, match="shard b attempt 1"):
        point.between_batches(rows=4)


def test_a_job_sent_no_rules_runs_under_the_workers_own(monkeypatch):
    monkeypatch.setenv(faults.FAULTS_ENV, json.dumps([{"action": "oom", "oom_above": 2, "oom_kind": "cpu"}]))
    monkeypatch.setenv(faults.ACK_ENV, faults.ACK_VALUE)
    point = faults.FaultPoint("a", 1, faults.rules_of(""))
    point.before_predict(rows=0, batch_len=2)
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):
        point.before_predict(rows=0, batch_len=3)
    assert faults.rules_of(SLOW)[0].action == "slow"  # a job's own rules replace them
