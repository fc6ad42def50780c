"""How a job run ended, as one enum shared by every job kind.

Runners, the CLI and the job service compare outcomes by identity, never by string: a status string that nobody
maps (a new kind's, or a misspelt one) used to fall through to "succeeded". Every consumer maps an `Outcome` through
an explicit table with no default, so an unmapped outcome is an internal error rather than a silent success.
"""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    """The end of one job run; the values are what summaries and manifests have always written."""

    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ALREADY_COMPLETE = "already_complete"
