"""Every job kind, registered once: its spec class, what it needs from a cluster, how it runs in the CLI's process
and in the job service, its warm pool, and its CLI flags. Nothing outside this module branches on a job's kind: the
CLI, the client, the service and spec parsing look the kind up here, so adding a kind is one `register` call (the
toy kind of tests/jobs/test_kinds.py is one, in the test suite alone).

The record holds functions, imported by each function only when called: the driver that parses a spec loads no
runner, and the service loads a fine-tune's training code only in the Ray task that runs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, TypeAdapter

from jobs.errors import BadInput
from jobs.flags import SpecFlags
from jobs.kind_flags import (
    DEDUPE_SPEC_FLAGS,
    FINETUNE_SPEC_FLAGS,
    LABEL_ISSUES_SPEC_FLAGS,
    LABEL_SPEC_FLAGS,
    REVIEW_QUEUE_SPEC_FLAGS,
    SELF_TRAIN_SPEC_FLAGS,
)
from schemas.curation import DedupeJobSpec, LabelIssuesJobSpec, ReviewQueueJobSpec, SelfTrainJobSpec
from schemas.finetune import FinetuneJobSpec
from schemas.spec_files import read_spec_data
from schemas.specs import LabelJobSpec


class UnknownKind(BadInput):
    """A job kind no module registered (a spec's `kind`, a stored record's)."""


@dataclass(frozen=True)
class ServiceStart:
    """What the job service hands a kind's run when it starts one job."""

    spec: Any
    job_id: str
    state_uri: str  # the job store, for runs that log from another process
    lease: Any = None  # pooled kinds: the job's lease on its model's warm pool (jobs.service.pools.PoolLease)
    placement: Any = None  # pooled kinds: one worker's placement (the job starts on one; the pool grows)
    compiling: Any = None  # the compile decision made at submit (jobs.label.compile_policy.CompileDecision)


def _no_check(spec) -> None:
    """Nothing to check before queueing beyond the spec's own validation."""


def _never_finished(record, storage) -> bool:
    """A kind whose output cannot prove a late success proves none."""
    return False


def _as_given(spec):
    return spec


@dataclass(frozen=True)
class Kind:
    """One job kind. `name` is its specs' `kind` literal and its records' `kind`."""

    name: str
    title: str  # for people: "label job"
    spec_class: type[BaseModel]
    # (spec, ClusterResources, max_workers) → (jobs.service.admission.Needs, the placement its pool is built from or
    # None): what admission reserves for it
    needs: Callable[..., tuple[Any, Any]]
    run_here: Callable[[Any, bool], Any]  # (spec, quiet) → its summary (`.lines()`), in the CLI's own process
    start_in_service: Callable[[ServiceStart], Any]  # → a running job (jobs.service.core.RunningJob)
    # Pooled kinds: (spec, compile decision) → the WorkerSpec of its warm pool; None: it holds its needs itself
    worker_spec: Callable[[Any, Any], Any] | None = None
    # (spec, ClusterResources, max_workers, warm pool keys) → its compile decision, made once at submit
    decide_compile: Callable[..., Any] | None = None
    finished: Callable[[Any, Any], bool] = _never_finished  # (record, storage) → its output proves a late success
    check_submit: Callable[[Any], None] = _no_check  # in the submitting process, before the job is queued
    absolute_locations: Callable[[Any], Any] = _as_given  # its local paths made absolute on the driver
    # Its command (`bulklabel <name>`, `submit <name>`): flags derived from the spec's fields (jobs.flags) and the
    # command's one-line help; None: spec files only (`bulklabel run`, `submit file`)
    flags: SpecFlags | None = None
    command_help: str = ""

    def pool_key(self, spec, compiling=None) -> str | None:
        """The warm pool a job of this kind runs on (None: it runs on none)."""
        return None if self.worker_spec is None else self.worker_spec(spec, compiling).pool_key()


_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add a kind; its spec class must say the same `kind` (it tells specs apart when they are parsed)."""
    field = kind.spec_class.model_fields.get("kind")
    if field is None or field.default != kind.name:
        raise TypeError(f"{kind.spec_class.__name__} must have `kind: Literal[{kind.name!r}] = {kind.name!r}`")
    if kind.name in _KINDS:
        raise TypeError(f"job kind {kind.name!r} is registered already")
    _KINDS[kind.name] = kind
    return kind


@contextmanager
def registered(kind: Kind) -> Iterator[Kind]:
    """A kind registered for the length of the block (tests)."""
    register(kind)
    try:
        yield kind
    finally:
        _KINDS.pop(kind.name, None)


def kinds() -> tuple[Kind, ...]:
    return tuple(_KINDS.values())


def get(name: str) -> Kind:
    """The kind called `name`; an unknown one is one line naming those there are."""
    try:
        return _KINDS[str(name)]
    except KeyError:
        raise UnknownKind(f"unknown job kind {name!r}; known: {', '.join(sorted(_KINDS))}") from None


def kind_of(spec) -> Kind:
    """The kind of a parsed spec."""
    return get(spec.kind)


# ------------------------------------------------------------------------------------------------- specs


@functools.cache
def _adapter(classes: tuple[type[BaseModel], ...]) -> TypeAdapter:
    # The union of every registered kind, told apart by `kind`; cached per set of kinds (a test may add one).
    if len(classes) == 1:
        return TypeAdapter(classes[0])
    return TypeAdapter(Annotated[Union[classes], Field(discriminator="kind")])  # noqa: UP007 - a runtime tuple


def _union() -> TypeAdapter:
    return _adapter(tuple(kind.spec_class for kind in _KINDS.values()))


def parse_job_spec(data: dict):
    """Validate a decoded spec of any registered kind; raises pydantic.ValidationError naming each bad field."""
    known = _KINDS.get(data.get("kind")) if isinstance(data, dict) else None
    # A known kind validates as its own class, so errors name `batch_size`, not `label.batch_size`; a missing or
    # unknown kind goes through the union, whose error lists the kinds there are.
    return known.spec_class.model_validate(data) if known else _union().validate_python(data)


def load_job_spec(path: str | Path):
    """Load a spec of any kind from a YAML or JSON file (schemas.spec_files.read_spec_data: its limits and errors)."""
    return parse_job_spec(read_spec_data(path))


def absolute_locations(spec):
    """The spec with its local paths made absolute on the driver, as its kind says (jobs.locations)."""
    return kind_of(spec).absolute_locations(spec)


def job_spec_json_schema() -> dict:
    """JSON Schema of every job kind, for editors and CI validation."""
    return _union().json_schema()


# --------------------------------------------------------------------------------------- the label job


def _label_needs(spec, cluster, max_workers):
    from jobs.service.runs import label_needs

    return label_needs(spec, cluster, max_workers)


def _run_label_here(spec, quiet: bool):
    from jobs.label.runner import run_label_job

    return run_label_job(spec, show_progress=not quiet)


def _start_label(start: ServiceStart):
    from jobs.service.runs import LabelJobRun

    return LabelJobRun(start)


def _label_worker_spec(spec, compiling):
    from jobs.service.runs import label_worker_spec

    return label_worker_spec(spec, compiling)


def _label_compile(spec, cluster, max_workers, warm_pools):
    from jobs.service.runs import label_compile

    return label_compile(spec, cluster, max_workers, warm_pools)


def _label_finished(record, storage) -> bool:
    from jobs.service.runs import label_finished

    return label_finished(record, storage)


def _check_label(spec) -> None:
    """Checked where the job is submitted, so a bad model name or top_k fails now, not on the cluster."""
    from jobs.cluster import ensure_ray
    from jobs.label.placement import refuse_unshared_local_paths
    from schemas.catalog import class_names
    from workers.finetune.artifacts import card_of

    refuse_unshared_local_paths(spec, ensure_ray())  # local paths other nodes cannot see: refused now
    classes = len(class_names(spec.model, card_of(spec.model, spec.storage)))
    if spec.top_k > classes and "top_k" in spec.model_fields_set:
        raise BadInput(f"top_k={spec.top_k} exceeds the {classes} classes of model {spec.model.name!r}")


def _label_locations(spec):
    from jobs.locations import label_locations

    return label_locations(spec)


# ------------------------------------------------------------------------------------------ the fine-tune


def _finetune_needs(spec, cluster, max_workers):
    from jobs.service.runs import finetune_needs

    return finetune_needs(spec, cluster), None


def _run_finetune_here(spec, quiet: bool):
    from jobs.finetune import run_finetune_job

    return run_finetune_job(spec, show_progress=not quiet)


def _start_finetune(start: ServiceStart):
    from jobs.service.runs import TaskJobRun

    return TaskJobRun(start, _run_finetune_here)


def _finetune_locations(spec):
    from jobs.locations import finetune_locations
    from jobs.review.apply import pin_corrections

    # Its review decisions pinned too (as `bulklabel finetune` does): the service's job id says which it applies.
    return pin_corrections(finetune_locations(spec))


# ------------------------------------------------------------------------------------- the curation jobs


def _curation_needs(spec, cluster, max_workers):
    from jobs.service.runs import curation_needs

    return curation_needs(), None


def _curation_task(run_here: Callable[[Any, bool], Any]) -> Callable[[ServiceStart], Any]:
    """A curation kind's start in the service: its run as a Ray task on a CPU."""

    def start(service_start: ServiceStart):
        from jobs.service.runs import CURATION_CPUS, TaskJobRun

        return TaskJobRun(service_start, run_here, cpus=CURATION_CPUS)

    return start


def _curation_finished(record, storage) -> bool:
    from jobs.service.runs import curation_finished

    return curation_finished(record, storage)


def _run_dedupe_here(spec, quiet: bool):
    from jobs.curate.dedupe import run_dedupe_job

    return run_dedupe_job(spec)


def _run_review_queue_here(spec, quiet: bool):
    from jobs.curate.queue import run_review_queue_job

    return run_review_queue_job(spec)


def _run_label_issues_here(spec, quiet: bool):
    from jobs.curate.issues import run_label_issues_job

    return run_label_issues_job(spec)


def _label_issues_needs(spec, cluster, max_workers):
    from jobs.service.runs import finetune_needs

    return finetune_needs(spec.finetune_spec(), cluster), None  # its embedding actor's, as a fine-tune's pass


def _start_label_issues(start: ServiceStart):
    from jobs.service.runs import TaskJobRun

    return TaskJobRun(start, _run_label_issues_here)  # the task holds nothing: its embedding actor holds the CPUs


def _run_self_train_here(spec, quiet: bool):
    from jobs.curate.selftrain import run_self_train_job

    return run_self_train_job(spec, show_progress=not quiet)


def _self_train_needs(spec, cluster, max_workers):
    from jobs.service.runs import finetune_needs

    return finetune_needs(spec.finetune_spec(), cluster), None  # its steps run one at a time: a fine-tune's most


def _start_self_train(start: ServiceStart):
    from jobs.service.runs import TaskJobRun

    return TaskJobRun(start, _run_self_train_here)  # its steps' own workers hold the CPUs


def _curation_locations(spec):
    from jobs.locations import curation_locations

    return curation_locations(spec)


LABEL = register(
    Kind(
        name="label",
        title="label job",
        spec_class=LabelJobSpec,
        needs=_label_needs,
        run_here=_run_label_here,
        start_in_service=_start_label,
        worker_spec=_label_worker_spec,
        decide_compile=_label_compile,
        finished=_label_finished,
        check_submit=_check_label,
        absolute_locations=_label_locations,
        flags=LABEL_SPEC_FLAGS,
        command_help="label the images under --input, write Parquet to --output",
    )  # fmt: skip
)
FINETUNE = register(
    Kind(
        name="finetune",
        title="fine-tune job",
        spec_class=FinetuneJobSpec,
        needs=_finetune_needs,
        run_here=_run_finetune_here,
        start_in_service=_start_finetune,
        absolute_locations=_finetune_locations,
        flags=FINETUNE_SPEC_FLAGS,
        command_help="fine-tune a torchvision model on labelled images → <output>/vN/",
    )  # fmt: skip
)


def _table_kind(name: str, title: str, spec_class: type[BaseModel], run_here, flags: SpecFlags, command_help: str):
    """A curation kind that reads outputs and writes one table: one task on a CPU, its manifest proves it ended."""
    return Kind(name=name, title=title, spec_class=spec_class, needs=_curation_needs, run_here=run_here,
                start_in_service=_curation_task(run_here), finished=_curation_finished,
                absolute_locations=_curation_locations, flags=flags, command_help=command_help)  # fmt: skip


DEDUPE = register(_table_kind(
    "dedupe", "dedupe job", DedupeJobSpec, _run_dedupe_here, DEDUPE_SPEC_FLAGS,
    "exact and near-duplicate images across label outputs (and leakage across a split) → a table",
))  # fmt: skip
REVIEW_QUEUE = register(_table_kind(
    "review-queue", "review queue", ReviewQueueJobSpec, _run_review_queue_here, REVIEW_QUEUE_SPEC_FLAGS,
    "the images of a label output a person should review first → a ranked table and sheet.html",
))  # fmt: skip
LABEL_ISSUES = register(
    Kind(
        name="label-issues",
        title="label-issues job",
        spec_class=LabelIssuesJobSpec,
        needs=_label_issues_needs,
        run_here=_run_label_issues_here,
        start_in_service=_start_label_issues,
        finished=_curation_finished,
        absolute_locations=_curation_locations,
        flags=LABEL_ISSUES_SPEC_FLAGS,
        command_help="labels of a labelled set that are likely wrong (cross-validated probes, confident learning)",
    )  # fmt: skip
)
SELF_TRAIN = register(
    Kind(
        name="self-train",
        title="self-training job",
        spec_class=SelfTrainJobSpec,
        needs=_self_train_needs,
        run_here=_run_self_train_here,
        start_in_service=_start_self_train,
        absolute_locations=_curation_locations,
        flags=SELF_TRAIN_SPEC_FLAGS,
        command_help="fine-tune, pseudo-label a pool at a held-out precision, fine-tune again → the next version",
    )  # fmt: skip
)
