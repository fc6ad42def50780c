"""Reading a job spec file within limits: its size, plain YAML or JSON only (no python tags), aliases bounded by
what they expand to. Which kind a spec is, and its validation, are the kind registry's (jobs/kinds.py
`load_job_spec`); this module only turns a file into a mapping or one line saying why it cannot.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas.errors import BadInput

MAX_SPEC_BYTES = 1 << 20
# Values in a spec once YAML aliases are expanded, counted as pydantic will walk them. A real spec has tens; a
# "billion laughs" of nested aliases has billions from a few hundred bytes (48 s and 4.5 GB of validation before).
MAX_SPEC_NODES = 10_000


class SpecError(BadInput):
    """A spec file that cannot be read as a job spec: too large, not YAML/JSON, unsafe tags, alias bombs."""


def read_spec_data(path: str | Path) -> dict:
    """A spec file's decoded mapping, read within limits of size and of alias expansion; raises SpecError (one line
    naming the file and the problem). Which kind it is and its validation are jobs.kinds' (`load_job_spec`)."""
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
    return data


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
