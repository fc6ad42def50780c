"""Fault injection for tests: make a worker exit, hang, raise or run out of memory at a chosen point.

Off unless BOTH environment variables are set in the driver's environment:
    BULKLABEL_FAULTS='[{"shard": "files-000003", "attempt": 1, "action": "exit", "after_rows": 8}]'
    BULKLABEL_FAULTS_ACKNOWLEDGE=I-AM-TESTING
The second one exists so that a stray BULKLABEL_FAULTS in a production environment does nothing
but log a warning. The driver forwards both to its workers (jobs/runner.py), so faults are scoped
to the job that was started with them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from functools import cache
from typing import Literal

import torch
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
    action: Literal["exit", "hang", "raise", "oom"]
    oom_above: int = 1  # for "oom": batches larger than this run out of memory

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


def inject(shard: str, attempt: int, rows: int) -> None:
    """Fire the first matching exit/hang/raise rule (called between batches)."""
    for rule in active_rules():
        if rule.action != "oom" and rule.matches(shard, attempt, rows):
            log.warning("injecting %s at shard %s attempt %d after %d rows", rule.action, shard, attempt, rows)
            if rule.action == "exit":
                os._exit(1)
            if rule.action == "hang":
                time.sleep(HANG_SECONDS)
            raise InjectedFault(f"injected failure at shard {shard} attempt {attempt}")


def inject_oom(shard: str, attempt: int, rows: int, batch_len: int) -> None:
    """Raise torch's out-of-memory error for batches above a matching rule's `oom_above`."""
    for rule in active_rules():
        if rule.action == "oom" and rule.matches(shard, attempt, rows) and batch_len > rule.oom_above:
            raise torch.OutOfMemoryError(f"injected: batch of {batch_len} > {rule.oom_above}")
