"""The driver: specs in, shard plans, scheduling on Ray, commit and lifecycle of jobs.

The job service's Python API, as the CLI uses it: `from jobs import submit, wait` (loaded on first use, so that
`import jobs.output.query` does not pay for Ray).
"""

from __future__ import annotations

_API = ("submit", "list_jobs", "job_status", "wait", "cancel", "resume", "logs", "service_status", "stop_service")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from jobs.service import client

        return getattr(client, name)
    raise AttributeError(f"module 'jobs' has no attribute {name!r}")
