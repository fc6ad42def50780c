"""`_failed.json`: the record that a run of the job failed and why, removed by a later run that completes."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from schemas.layout import failed_uri
from schemas.output import JobFailure
from workers.io.storage import ObjectMissing, Storage

log = logging.getLogger(__name__)


def write_failure(storage: Storage, output: str, failure: JobFailure) -> None:
    storage.write_bytes(failed_uri(output), failure.model_dump_json(indent=2).encode())


def read_failure(storage: Storage, output: str) -> JobFailure | None:
    """The failure record of the last failed run, or None; an unreadable one is logged and ignored (it is advice)."""
    try:
        return JobFailure.model_validate_json(storage.read_bytes(failed_uri(output)))
    except ObjectMissing:
        return None
    except ValidationError as exc:
        log.warning("failure record %s is unreadable: %s", failed_uri(output), exc.errors()[0]["msg"])
        return None


def remove_failure(storage: Storage, output: str) -> None:
    storage.delete(failed_uri(output))
