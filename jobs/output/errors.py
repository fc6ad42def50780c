"""What is wrong with an output, as errors of the user's move to fix (exit 2, jobs.errors): one module, so the
reader, the ownership check and the manifest raise the same classes without importing each other."""

from __future__ import annotations

from jobs.errors import BadInput


class OutputConflict(BadInput):
    """The output prefix belongs to another job, holds files bulklabel did not write, or an unusable layout."""


class OutputError(BadInput):
    """The location is not a readable bulklabel label output (none there, damaged, or not a label job's)."""


class UnsupportedSchemaVersion(OutputError):
    """The output was written with a schema version this bulklabel cannot read (newer, or unknown)."""
