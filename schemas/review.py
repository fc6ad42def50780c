"""Review: the decisions people take on a review queue (or a label-issues result), as data.

Each decision is one immutable record, stored once under its queue's output as `corrections/<decision id>.parquet`
(jobs.output.corrections). The id is made by the client before it sends the decision, so a request retried after a
lost answer finds its file there and records nothing twice. Which decision counts for an image (the latest, undos
applied) is jobs.review.decisions; what a fine-tune made of them goes on its card as `CorrectionsApplied`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

import pyarrow as pa
from pydantic import Field, model_validator

from schemas.specs import Spec, not_blank

CORRECTIONS_SCHEMA_VERSION = 1
DECISION_ID_PATTERN = r"^[A-Za-z0-9_-]{8,64}$"  # a file name on every store: no dot, no slash
REVIEWER_PATTERN = r"^[\w .@+-]{1,64}$"


class Decision(StrEnum):
    """What a reviewer decided about one image."""

    LABEL = "label"  # its label is `label` (the given one kept, a suggestion, or another class)
    BAD = "bad"  # not usable for training (not a subject, blurred, a duplicate): a fine-tune leaves it out
    SKIP = "skip"  # no decision: it stays in the queue, for another reviewer or later
    UNDO = "undo"  # the decision `undoes` no longer counts: the image goes back to the queue

    @property
    def decides(self) -> bool:
        """Whether it takes the image out of the queue (a label or a bad image)."""
        return self in (Decision.LABEL, Decision.BAD)


class BadReason(StrEnum):
    NOT_A_SUBJECT = "not-a-subject"
    BLURRED = "blurred"
    DUPLICATE = "duplicate"
    OTHER = "other"


class DecisionRecord(Spec):
    """One decision, as the review app receives it and as it is stored."""

    decision_id: str = Field(pattern=DECISION_ID_PATTERN, description="Made by the client: a retry sends it again.")
    key: Annotated[str, not_blank("key")] = Field(description="The queue row's key.")
    image: Annotated[str, not_blank("image")] = Field(description="The image's location, as the queue names it.")
    image_id: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$",
        description="sha256 of the image's bytes (a label output's `image_id`): joins the decision to labels "
        "wherever the image moved.",
    )  # fmt: skip
    reviewer: str = Field(pattern=REVIEWER_PATTERN)
    decision: Decision
    label: str | None = Field(default=None, max_length=200, description="The label chosen (decision `label`).")
    previous_label: str | None = Field(
        default=None, max_length=200, description="The label the image had when it was shown (given, else predicted)."
    )
    bad_reason: BadReason | None = None
    undoes: str | None = Field(default=None, pattern=DECISION_ID_PATTERN, description="The decision an undo cancels.")
    decided_at: datetime = Field(description="When the server recorded it (UTC).")

    @model_validator(mode="after")
    def _fields_of_its_decision(self) -> DecisionRecord:
        if (self.decision is Decision.LABEL) != bool(self.label and self.label.strip()):
            raise ValueError("a `label` decision needs a label, and only it has one")
        if (self.decision is Decision.UNDO) != (self.undoes is not None):
            raise ValueError("an `undo` decision names the decision it undoes (undoes), and only it does")
        if self.bad_reason is not None and self.decision is not Decision.BAD:
            raise ValueError("bad_reason goes with a `bad` decision only")
        return self

    def row(self) -> dict:
        return self.model_dump(mode="python")


CORRECTIONS_TABLE = "corrections"
CORRECTIONS_SCHEMA = pa.schema(
    [
        pa.field("decision_id", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.string(), nullable=False),
        pa.field("image_id", pa.string()),
        pa.field("reviewer", pa.string(), nullable=False),
        pa.field("decision", pa.string(), nullable=False),  # a Decision's value
        pa.field("label", pa.string()),
        pa.field("previous_label", pa.string()),
        pa.field("bad_reason", pa.string()),
        pa.field("undoes", pa.string()),
        pa.field("decided_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ],
    metadata={"bulklabel.corrections_schema_version": str(CORRECTIONS_SCHEMA_VERSION)},
)


class Corrections(Spec):
    """The decisions that count, as a fine-tune applies them: per image location, its new label or its drop."""

    queues: tuple[str, ...]
    decisions: int = 0
    labels: dict[str, str] = Field(default_factory=dict, description="Image location → the label decided.")
    bad: dict[str, str] = Field(default_factory=dict, description="Image location → why it is bad.")
    keys: dict[str, str] = Field(default_factory=dict, description="Queue key → image location, to match by key.")
    reviewers: dict[str, str] = Field(default_factory=dict, description="Image location → who decided it.")
