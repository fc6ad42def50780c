"""Which torchvision release has which classification model: torchvision_history.json, read from PyPI's wheels by
deploy/torchvision_history.py. The registry knows only the installed release's models; this names the release a
missing one needs ("efficientnet_v2_s needs torchvision >= 0.13")."""

from __future__ import annotations

import functools
import json
from pathlib import Path

HISTORY = Path(__file__).with_name("torchvision_history.json")


@functools.cache
def history() -> dict:
    """{"releases": [...], "models": {name: {"since": "0.13", "removed_after": None}}}."""
    return json.loads(HISTORY.read_text())


def since(name: str) -> str:
    """The first torchvision release with model `name` ("?" for one the history does not know)."""
    return history()["models"].get(name, {}).get("since", "?")


def needs(name: str) -> str | None:
    """The torchvision releases that have model `name` (">= 0.13", "0.5-0.12"); None: no release had it."""
    entry = history()["models"].get(name)
    if entry is None:
        return None
    removed = entry["removed_after"]
    return f"torchvision {entry['since']}-{removed}" if removed else f"torchvision >= {entry['since']}"
