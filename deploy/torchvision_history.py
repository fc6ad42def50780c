"""Maintainer script: which torchvision release first had each classification model, read from PyPI's wheels.

    python -m deploy.torchvision_history WHEEL_DIR     # writes workers/ship/torchvision_history.json

torchvision's registry knows only its own version's models, so "efficientnet_v2_s is not in 0.12: it needs 0.13" can
only come from the releases themselves. Fetch one wheel per minor release (`pip download torchvision==0.X.Y --no-deps
--only-binary=:all: --python-version ... --platform ...`) into WHEEL_DIR, then run this: it parses each wheel's
`torchvision/models/*.py` (no import: old wheels do not load on today's Python) for the public builder functions
(`@register_model()` from 0.14, each module's `__all__` before), and records each model's first and last release.
Run it again when the torchvision pin moves; tests/workers/ship/test_zoo.py fails until the pinned one is in.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "workers" / "ship" / "torchvision_history.json"
WHEEL = re.compile(r"torchvision-(\d+)\.(\d+)\.(\d+)-")


def builders(source: str) -> set[str]:
    """The classification model builders a torchvision/models module defines: registered ones, else `__all__`'s
    lower-case functions."""
    tree = ast.parse(source)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    registered = {name for name, node in functions.items()
                  if any("register_model" in ast.unparse(d) for d in node.decorator_list)}  # fmt: skip
    if registered or any("register_model" in ast.unparse(d) for n in functions.values() for d in n.decorator_list):
        return registered
    exported: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            exported |= {e.value for e in getattr(node.value, "elts", []) if isinstance(e, ast.Constant)}
    return {name for name in exported if name in functions and name.islower()}


def models_of(wheel: Path) -> set[str]:
    out: set[str] = set()
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[:2] == ["torchvision", "models"] and parts[2].endswith(".py"):
                if parts[2].startswith("_") or parts[2] in ("utils.py", "feature_extraction.py"):
                    continue
                out |= builders(archive.read(name).decode())
    return out


def main(argv: list[str]) -> int:
    wheels = sorted(
        Path(argv[0]).glob("torchvision-*.whl"), key=lambda p: tuple(map(int, WHEEL.search(p.name).groups()))
    )
    history: dict[str, dict[str, str | None]] = {}
    releases = []
    for wheel in wheels:
        major, minor, _ = WHEEL.search(wheel.name).groups()
        release = f"{major}.{minor}"
        releases.append(release)
        present = models_of(wheel)
        for model in present:
            history.setdefault(model, {"since": release, "last": release})["last"] = release
    latest = releases[-1]
    models = {m: {"since": h["since"], "removed_after": None if h["last"] == latest else h["last"]}
              for m, h in sorted(history.items())}  # fmt: skip
    OUT.write_text(json.dumps({"releases": releases, "models": models}, indent=1) + "\n")
    print(f"{len(models)} models over torchvision {releases[0]}-{latest}: {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
