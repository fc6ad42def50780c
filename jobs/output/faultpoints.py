"""Test-only crash points on the driver side (compaction, table commits): the process SIGKILLs itself at a named point,
or, with `"action": "hang"`, SIGSTOPs itself there (frozen mid-write until the test sends SIGCONT: a writer caught in
the act, for tests of what another writer or a reader does meanwhile; "hang" because the workers read the same rules
and know that action, and a driver's point name never matches a shard).

Off unless the same two variables as workers/faults.py are set (that module imports torch, which the driver must
not): `BULKLABEL_FAULTS='[{"shard": "compact:moved", "action": "exit"}]'` and
`BULKLABEL_FAULTS_ACKNOWLEDGE=I-AM-TESTING`. A rule whose `shard` is the point's name fires there; `attempt`, when
given, is the how-manieth time the point is reached (1-based). A SIGKILL runs no `finally`, no atexit: what a power
cut or the OOM killer leaves.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections import Counter

log = logging.getLogger(__name__)

FAULTS_ENV = "BULKLABEL_FAULTS"  # the names workers/faults.py reads
ACK_ENV = "BULKLABEL_FAULTS_ACKNOWLEDGE"
ACK_VALUE = "I-AM-TESTING"
_reached: Counter[str] = Counter()


def crash_point(point: str) -> None:
    """SIGKILL (or SIGSTOP) this process if an acknowledged fault rule names `point` (and this is the attempt it
    names)."""
    raw = os.environ.get(FAULTS_ENV)
    if not raw or os.environ.get(ACK_ENV) != ACK_VALUE:
        return
    _reached[point] += 1
    for rule in json.loads(raw):
        if rule.get("shard") == point and rule.get("attempt") in (None, _reached[point]):
            stop = rule.get("action") == "hang"
            log.warning("FAULT: %s at %s (time %d)", "SIGSTOP" if stop else "SIGKILL", point, _reached[point])
            os.kill(os.getpid(), signal.SIGSTOP if stop else signal.SIGKILL)
