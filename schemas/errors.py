"""The error base classes that validation in schemas/ raises, so that schemas imports nothing of the driver: the
driver's taxonomy (jobs/errors.py) builds on them and maps them to exit codes."""

from __future__ import annotations


class BadInput(ValueError):
    """The spec or its input cannot work as given; found before any work started."""
