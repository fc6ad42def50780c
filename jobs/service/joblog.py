"""Per-job logs: log records of a thread working for a job (or of a process running one) go to that job's log in
the job store, as `bulklabel logs` shows them."""

from __future__ import annotations

import logging
import threading

_current = threading.local()


def set_current_job(job_id: str | None) -> None:
    """Log records from this thread belong to `job_id` (StoreLogHandler writes them to that job's log)."""
    _current.job_id = job_id


class StoreLogHandler(logging.Handler):
    """Writes log records of a job (the thread's current job, or a fixed one) to its log in the job store."""

    def __init__(self, store, job_id: str | None = None):
        super().__init__(logging.INFO)
        self.store, self.job_id = store, job_id
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        job_id = self.job_id or getattr(_current, "job_id", None)
        if job_id is None:
            return
        try:
            self.store.append_log(job_id, self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - a log that cannot be written must not fail the job
            self.handleError(record)
