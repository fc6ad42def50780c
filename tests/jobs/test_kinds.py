"""jobs.kinds: the one registry of job kinds. A toy kind, defined and registered here alone, runs through the CLI's
parser and commands and through the service core: adding a kind touches no other module."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import pytest
from pydantic import ValidationError

from jobs import cli, kinds
from jobs.errors import EXIT_BAD_INPUT, exit_code_for
from jobs.flags import SpecFlags
from jobs.kinds import Kind, ServiceStart, UnknownKind
from jobs.service.admission import Needs, Resources
from jobs.service.commands import normalise_argv
from jobs.service.core import ServiceCore
from jobs.service.records import JobProgress, JobState
from jobs.service.runs import RunEnd
from schemas.curation import DedupeJobSpec, LabelIssuesJobSpec, ReviewQueueJobSpec, SelfTrainJobSpec
from schemas.finetune import FinetuneJobSpec
from schemas.outcome import Outcome
from schemas.specs import LabelJobSpec, Spec
from tests.jobs.service.core_fakes import FakeCluster, Harness

# ------------------------------------------------------------------------------------------------ a toy kind


class ToySpec(Spec):
    """Writes `words` words to `output`."""

    kind: Literal["toy"] = "toy"
    output: str
    words: int = 3
    job_id: str | None = None

    def resolved_job_id(self) -> str:
        return self.job_id or "toy-" + hashlib.sha256(self.output.encode()).hexdigest()[:12]


class ToySummary:
    def __init__(self, spec: ToySpec):
        self.status, self.spec = Outcome.SUCCEEDED, spec

    def lines(self) -> list[str]:
        return [f"toy job {self.spec.resolved_job_id()}: {self.spec.words} words in {self.spec.output}"]


def run_toy(spec: ToySpec) -> ToySummary:
    Path(spec.output).write_text(" ".join(["toy"] * spec.words))
    return ToySummary(spec)


class ToyRun:
    """The toy in the service: done at once (a real kind would run in a thread or a Ray task)."""

    def __init__(self, start: ServiceStart):
        summary = run_toy(start.spec)
        self._end = RunEnd(summary.status, tuple(summary.lines()))

    def outcome(self) -> RunEnd:
        return self._end

    def cancel(self) -> None:
        pass

    def progress(self) -> JobProgress:
        return JobProgress(shards_total=1, shards_done=1)


TOY = Kind(
    name="toy",
    title="toy job",
    spec_class=ToySpec,
    needs=lambda spec, cluster, max_workers: (Needs.gang(Resources(1.0, 0.0), 1), None),
    run_here=lambda spec, quiet: run_toy(spec),
    start_in_service=ToyRun,
    flags=SpecFlags(ToySpec, {"--output": "output", "--words": "words", "--job-id": "job_id"}),
    command_help="write some words",
)


@pytest.fixture
def toy():
    with kinds.registered(TOY) as kind:
        yield kind


def test_a_toy_kind_runs_from_a_spec_file_through_the_cli(toy, tmp_path, capsys):
    spec = tmp_path / "toy.yaml"
    spec.write_text(json.dumps({"kind": "toy", "output": str(tmp_path / "words.txt"), "words": 4}))
    assert cli.main(["run", str(spec)]) == 0
    assert (tmp_path / "words.txt").read_text() == "toy toy toy toy"
    assert "4 words in" in capsys.readouterr().out
    # `submit` reads it through the same parser (the service is not asked here)
    args = cli._parser().parse_args(normalise_argv(["submit", str(spec)]))
    assert args.build(args) == ToySpec(output=str(tmp_path / "words.txt"), words=4)
    # its schema is in the spec schema, and a bad field of it is one line naming the field, exit 2
    assert cli.main(["schema"]) == 0 and '"toy"' in capsys.readouterr().out
    spec.write_text(json.dumps({"kind": "toy", "output": "x", "words": "many"}))
    assert cli.main(["run", str(spec)]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith(f"invalid job spec {spec}: words: ")


def test_a_toy_kind_gets_its_command_and_submit_command_from_its_flags(toy, tmp_path, capsys):
    out = str(tmp_path / "words.txt")
    assert cli.main(["toy", "--output", out, "--words", "2"]) == 0
    assert Path(out).read_text() == "toy toy" and "2 words in" in capsys.readouterr().out
    args = cli._parser().parse_args(normalise_argv(["submit", "toy", "--output", out]))
    assert args.build(args) == ToySpec(output=out)  # --words absent: the spec's default decides
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["toy", "--output", out, "--words", "many"])
    assert "--words: invalid int value: 'many'" in capsys.readouterr().err


def test_a_toy_kind_runs_through_the_service_core(toy, tmp_path):
    h = Harness(tmp_path / "state", FakeCluster(nodes=[(2.0, 0.0)]))
    core = ServiceCore(h.config, h.cluster, h.new_pool, store=h.store, clock=h.clock)  # runs start as their kind's
    job = core.submit(ToySpec(output=str(tmp_path / "words.txt")))
    h.rounds(core, 2)
    record = h.store.get(job)
    assert record.kind == "toy" and record.state is JobState.SUCCEEDED and record.model_key is None
    assert (tmp_path / "words.txt").read_text() == "toy toy toy" and h.pools_made == []
    assert "3 words in" in h.store.read_log(job, 0)[0]
    # A new service rebuilds its spec from the record by the registry, and runs it again when resubmitted.
    again = ServiceCore(h.config, h.cluster, h.new_pool, store=h.store, clock=h.clock)
    assert again._spec_of(record) == ToySpec(output=str(tmp_path / "words.txt"))


def test_a_kind_not_registered_is_one_line_naming_the_kinds_there_are(tmp_path):
    known = r"unknown job kind 'toy'; known: dedupe, finetune, label, label-issues, review-queue, self-train"
    with pytest.raises(UnknownKind, match=known) as unknown:
        kinds.get("toy")
    assert exit_code_for(unknown.value) == EXIT_BAD_INPUT
    with pytest.raises(ValidationError, match="'label', 'finetune'"):
        kinds.parse_job_spec({"kind": "toy", "output": "x"})


# ----------------------------------------------------------------------------------------------- the registry


def test_every_kind_is_registered_with_its_spec_class():
    assert {kind.name: kind.spec_class for kind in kinds.kinds()} == {
        "label": LabelJobSpec, "finetune": FinetuneJobSpec, "dedupe": DedupeJobSpec, "review-queue": ReviewQueueJobSpec,
        "label-issues": LabelIssuesJobSpec, "self-train": SelfTrainJobSpec}  # fmt: skip
    for kind in kinds.kinds():  # the spec class's own `kind` literal is the registry's key
        assert kind.spec_class.model_fields["kind"].default == kind.name


def test_a_kind_is_registered_once_and_must_name_its_spec_classes_kind(toy):
    with pytest.raises(TypeError, match="'toy' is registered already"):
        kinds.register(TOY)

    class Mislabelled(ToySpec):
        kind: Literal["other"] = "other"

    with pytest.raises(TypeError, match=r"Mislabelled must have `kind: Literal\['toy2'\]"):
        kinds.register(Kind("toy2", "toy", Mislabelled, TOY.needs, TOY.run_here, TOY.start_in_service))


def test_only_pooled_kinds_have_a_pool_key(tmp_path):
    label = LabelJobSpec(input={"uri": str(tmp_path / "in")}, output=str(tmp_path / "out"), model={"name": "resnet50"})
    tune = FinetuneJobSpec(data={"uri": str(tmp_path / "in")}, base={"name": "resnet50"}, output=str(tmp_path / "m"))
    assert kinds.kind_of(label).pool_key(label) and kinds.kind_of(tune).pool_key(tune) is None
