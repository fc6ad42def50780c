"""A job spec of any kind: the union of every kind (told apart by `kind`), validated from a decoded mapping or read
from a YAML/JSON file within limits, and its JSON Schema.

Apart from schemas/specs.py because it sits above every kind's module (schemas/finetune.py builds on specs.py), so
no spec module imports another one back.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Union

from pydantic import Field, TypeAdapter

from schemas.errors import BadInput
from schemas.finetune import FinetuneJobSpec
from schemas.specs import LabelJobSpec, Spec


@functools.cache
def _job_kinds() -> dict[str, type[Spec]]:
    """Every job spec class by its `kind`."""
    return {"label": LabelJobSpec, "finetune": FinetuneJobSpec}


@functools.cache
def _job_spec_type():
    """The union of every job kind, told apart by `kind`."""
    return Annotated[Union[tuple(_job_kinds().values())], Field(discriminator="kind")]


@functools.cache
def _job_adapter() -> TypeAdapter:
    return TypeAdapter(_job_spec_type())


def __getattr__(name: str):
    # `JobSpec` (the union of every job kind) is a module attribute built on first use, see _job_spec_type.
    if name == "JobSpec":
        return _job_spec_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_job_spec(data: dict) -> LabelJobSpec | FinetuneJobSpec:
    """Validate a decoded spec of any kind; raises pydantic.ValidationError naming each bad field."""
    known = _job_kinds().get(data.get("kind")) if isinstance(data, dict) else None
    # A known kind validates as its own class, so errors name `batch_size`, not `label.batch_size`; a missing or
    # unknown kind goes through the union, whose error lists the kinds there are.
    return known.model_validate(data) if known else _job_adapter().validate_python(data)


MAX_SPEC_BYTES = 1 << 20
# Values in a spec once YAML aliases are expanded, counted as pydantic will walk them. A real spec has tens; a
# "billion laughs" of nested aliases has billions from a few hundred bytes (48 s and 4.5 GB of validation before).
MAX_SPEC_NODES = 10_000


class SpecError(BadInput):
    """A spec file that cannot be read as a job spec: too large, not YAML/JSON, unsafe tags, alias bombs."""


def load_job_spec(path: str | Path) -> LabelJobSpec | FinetuneJobSpec:
    """Load a spec from a YAML or JSON file, within limits of size and of alias expansion; raises SpecError (one
    line naming the file and the problem) or pydantic.ValidationError."""
    text = _read_spec_text(Path(path))
    try:
        data = json.loads(text) if str(path).endswith(".json") else _load_yaml(text)
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a job spec") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job spec must be a mapping, got {type(data).__name__}")
    return parse_job_spec(data)


def _read_spec_text(path: Path) -> str:
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError(f"cannot read job spec {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: larger than {MAX_SPEC_BYTES >> 20} MiB; a job spec is a few hundred bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _load_yaml(text: str):
    """Plain YAML only (the safe loader: no python tags), with aliases bounded by what they expand to."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml also caps nesting depth at 1000
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node)
        if size > MAX_SPEC_NODES:
            raise SpecError(f"its aliases expand to more than {MAX_SPEC_NODES} values; a job spec has tens")
        return _construct(loader, node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context
        if isinstance(exc, yaml.constructor.ConstructorError) and "python/" in (problem or ""):
            problem = f"python tags are not allowed, a job spec is plain YAML ({problem})"
        raise SpecError(f"not a valid YAML job spec: {problem}{where}") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"not a valid YAML job spec: {exc}") from None
    finally:
        loader.dispose()


def _construct(loader, node):
    try:
        return loader.construct_document(node)
    except (ValueError, OverflowError) as exc:  # e.g. an integer of 500,000 digits (Python's int conversion limit)
        raise SpecError(f"a value cannot be read: {exc}") from None


def _expanded_size(root) -> int:
    """How many values the node graph holds once every alias is expanded (each shared node counted once per use),
    computed once per distinct node, so a bomb is measured in microseconds rather than expanded. A recursive alias
    counts as unbounded."""
    import yaml

    sizes: dict[int, int] = {}
    stack: list[tuple[object, bool]] = [(root, False)]
    on_path: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        children = [v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode) else node.value
        if children_done:
            on_path.discard(key)
            sizes[key] = min(1 + sum(sizes[id(c)] for c in children), MAX_SPEC_NODES + 1)
            continue
        if key in sizes:
            continue
        if key in on_path:
            return MAX_SPEC_NODES + 1
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def job_spec_json_schema() -> dict:
    """JSON Schema of every job kind, for editors and CI validation."""
    return _job_adapter().json_schema()
