"""A finished label-issues output over real plant photos, written through the result protocol (no job run: these
tests are about reviewing it), and the review app over it."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.output.corrections import open_queue
from jobs.output.results import ComputedResult, commit_result
from schemas.curation import ISSUES_SCHEMA, LabelIssuesJobSpec
from tests.support import PLANTS

CLASSES = ("Potato___Early_blight", "Potato___healthy", "Potato___Late_blight")
PER_CLASS = 8
TOKEN = "test-token-0123456789abcdef"


@dataclass(frozen=True)
class Flagged:
    data: Path
    queue: Path
    keys: tuple[str, ...]  # in review order


def write_issues(root: Path, per_class: int = PER_CLASS) -> Flagged:
    """`per_class` photos of each class, every one flagged as a likely label error suggesting the next class."""
    data = root / "data"
    rows = []
    for c, name in enumerate(CLASSES):
        (data / name).mkdir(parents=True)
        for photo in sorted((PLANTS / name).iterdir())[:per_class]:
            shutil.copy(photo, data / name / photo.name)
            key = f"{name}/{photo.name}"
            rows.append({"key": key, "image": str(data / key), "given_label": name,
                         "suggested_label": CLASSES[(c + 1) % len(CLASSES)], "self_confidence": 0.01 * len(rows),
                         "suggested_score": 0.9, "flagged": True, "rank": len(rows) + 1, "error": None})  # fmt: skip
    queue = root / "issues"
    spec = LabelIssuesJobSpec(data={"uri": str(data)}, base={"name": "mobilenet_v2"}, output=str(queue))
    commit_result(str(queue), None, spec.resolved_job_id(), "label-issues", spec,
                  lambda: ComputedResult(table=pa.Table.from_pylist(rows, schema=ISSUES_SCHEMA)))  # fmt: skip
    return Flagged(data, queue, tuple(r["key"] for r in rows))


@pytest.fixture
def flagged(tmp_path) -> Flagged:
    return write_issues(tmp_path)


def app_over(queue: Path | str, lease_s: float = 120.0, loopback: bool = True, options=None):
    from jobs.review.app import build_app
    from jobs.review.images import Pictures
    from jobs.review.state import ReviewState

    result = open_queue(str(queue), options)
    state = ReviewState(result, lease_s=lease_s)
    return build_app(state, Pictures(result, options), TOKEN, loopback=loopback), state
