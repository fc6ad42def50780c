"""Fault injection for tests: make a worker exit, hang, raise or run out of memory at a chosen point.

Off unless BOTH environment variables are set in the driver's environment:
    BULKLABEL_FAULTS='[{"shard": "files-000003", "attempt": 1, "action": "exit", "after_rows": 8}]'
    BULKLABEL_FAULTS_ACKNOWLEDGE=I-AM-TESTING
The second one exists so that a stray BULKLABEL_FAULTS in a production environment does nothing
but log a warning. The driver sends the rules with its job's shards (ShardJob.faults, jobs/label/runner.py), so
faults are scoped to the job that was started with them, and a worker kept from an earlier job (jobs/label/warm.py)
serves a faulted job as a fresh one would. A worker also obeys rules in its own environment: a whole test cluster's
nodes can be slowed that way.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from functools import cache
from typing import Literal

from pydantic import TypeAdapter

from schemas.specs import Spec

log = logging.getLogger(__name__)

FAULTS_ENV = "BULKLABEL_FAULTS"
ACK_ENV = "BULKLABEL_FAULTS_ACKNOWLEDGE"
ACK_VALUE = "I-AM-TESTING"
HANG_SECONDS = 24 * 3600


class InjectedFault(RuntimeError):
    """Raised by an injected `raise` fault."""


class FaultRule(Spec):
    """One fault: where it fires (shard, attempt, rows already labelled) and what it does."""

    shard: str = "*"
    attempt: int | None = None  # None: every attempt
    after_rows: int = 0  # fire once the shard has this many rows labelled
    action: Literal["exit", "hang", "raise", "oom", "slow"]
    seconds: float = 1.0  # for "slow": the pause before each batch (a slow store or model, so a test can act mid-job)
    oom_above: int = 1  # for "oom": batches larger than this run out of memory
    # For "oom": which out-of-memory error is raised: CUDA's torch.OutOfMemoryError, or the plain RuntimeError torch's
    # CPU allocator raises (its real message), which a worker must recognise as out-of-memory too.
    oom_kind: Literal["cuda", "cpu"] = "cuda"

    def matches(self, shard: str, attempt: int, rows: int) -> bool:
        return (
            self.shard in ("*", shard) and (self.attempt is None or self.attempt == attempt) and rows >= self.after_rows
        )


_RULES = TypeAdapter(tuple[FaultRule, ...])


def forwarded_environment() -> dict[str, str]:
    """The fault variables to hand to workers, or nothing when faults are off."""
    if os.environ.get(FAULTS_ENV) and os.environ.get(ACK_ENV) == ACK_VALUE:
        return {FAULTS_ENV: os.environ[FAULTS_ENV], ACK_ENV: ACK_VALUE}
    return {}


def forwarded_rules() -> str:
    """The rules to send with this driver's job (ShardJob.faults) as JSON, or "" when faults are off here."""
    return forwarded_environment().get(FAULTS_ENV, "")


def rules_of(raw: str) -> tuple[FaultRule, ...]:
    """The rules a job was sent with, or, for a job sent none, this process's own (its environment)."""
    return _sent_rules(raw) if raw else active_rules()


@cache
def _sent_rules(raw: str) -> tuple[FaultRule, ...]:
    rules = _RULES.validate_python(json.loads(raw))
    log.warning("FAULT INJECTION ACTIVE for this job: %s", rules)
    return rules


@cache
def active_rules() -> tuple[FaultRule, ...]:
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return ()
    if os.environ.get(ACK_ENV) != ACK_VALUE:
        log.warning("%s is set but %s is not; fault injection stays off", FAULTS_ENV, ACK_ENV)
        return ()
    rules = _RULES.validate_python(json.loads(raw))
    log.warning("FAULT INJECTION ACTIVE: %s", rules)
    return rules


@dataclass(frozen=True)
class FaultPoint:
    """One attempt at one shard and the rules it runs under: what the worker asks at each point a fault can fire."""

    shard: str
    attempt: int
    rules: tuple[FaultRule, ...]

    def between_batches(self, rows: int) -> None:
        inject(self.shard, self.attempt, rows, self.rules)

    def before_predict(self, rows: int, batch_len: int) -> None:
        inject_oom(self.shard, self.attempt, rows, batch_len, self.rules)


def inject(shard: str, attempt: int, rows: int, rules: tuple[FaultRule, ...] | None = None) -> None:
    """Fire the first matching exit/hang/raise rule (called between batches); "slow" rules only pause. `rules`:
    the job's; by default this process's own."""
    for rule in active_rules() if rules is None else rules:
        if rule.action == "slow" and rule.matches(shard, attempt, rows):
            time.sleep(rule.seconds)
            continue
        if rule.action not in ("oom", "slow") and rule.matches(shard, attempt, rows):
            log.warning("injecting %s at shard %s attempt %d after %d rows", rule.action, shard, attempt, rows)
            if rule.action == "exit":
                os._exit(1)
            if rule.action == "hang":
                time.sleep(HANG_SECONDS)
            raise InjectedFault(f"injected failure at shard {shard} attempt {attempt}")


def inject_oom(shard: str, attempt: int, rows: int, batch_len: int, rules: tuple[FaultRule, ...] | None = None) -> None:
    """Raise an out-of-memory error (of the rule's `oom_kind`) for batches above a matching rule's `oom_above`."""
    for rule in active_rules() if rules is None else rules:
        if rule.action == "oom" and rule.matches(shard, attempt, rows) and batch_len > rule.oom_above:
            raise out_of_memory_error(rule.oom_kind, batch_len, rule.oom_above)


def out_of_memory_error(kind: str, batch_len: int, oom_above: int) -> RuntimeError:
    """The error torch raises when an allocation fails on `kind` ("cuda" or "cpu"), marked as injected."""
    if kind == "cpu":  # c10's alloc_cpu.cpp message, as torch 2.x raises it on Linux (a RuntimeError, not an OOM type)
        return RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
            f"allocate {batch_len * 150 << 20} bytes. Error code 12 (Cannot allocate memory) "
            f"(injected: batch of {batch_len} > {oom_above})"
        )
    import torch  # only a worker that injects an OOM needs torch; the driver imports this module too

    return torch.OutOfMemoryError(f"injected: batch of {batch_len} > {oom_above}")
