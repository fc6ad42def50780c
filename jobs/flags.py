"""Command-line flags derived from a spec's fields, and the spec built back from them.

A table names each flag's field by its path in the spec (`--top-k` → `top_k`, `--lr` → `training.learning_rate`);
everything else comes from the field: its type, its choices (a `Literal` or an `Enum`), its help (the field's
`description`), whether it is required, and the default the help shows. A flag left off the command line is left out
of the spec (argparse.SUPPRESS), so the spec's own default decides: a job run by flags and the same job written as a
spec file are one job with one id. Booleans are `--x/--no-x`. This module knows no job kind.

Why not a library. pydantic-settings' CLI support (`CliApp`, `cli_parse_args`) derives flags from field names
(`--training.learning_rate`, `--output_options.format`), so keeping the flags users already type (`--lr`, `--workers`,
`--output-format`, `--endpoint-url`) would need an alias on every field, which would then also rename the spec files'
keys; it parses into `BaseSettings` models, which also read environment variables and `.env` files, so a job's
identity could change with the shell it was typed in; and it is not installed here (no new dependency may be added).
Typer and Click describe flags from function signatures, not from a model, so the fields would be restated by hand,
which is the drift this module ends. argparse plus a table of paths is ~150 lines and keeps every flag name.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

_BOOL_WORDS = {"true": True, "false": False}


@dataclass(frozen=True)
class Flag:
    """One flag's field, and what the command line spells differently from a spec file.

    `path`: the field's dotted path in the spec. `none`: a word that stands for null (`--weights none`).
    `metavar`: the value's name in the usage line. `positional`: given without a flag (the table's key is then
    its name in the usage line, `OUTPUT`). `short`: a one-letter spelling besides the long one (`-n`).
    """

    path: str
    none: str | None = None
    metavar: str | None = None
    positional: bool = False
    short: str | None = None


# A table: each flag (its long name; a boolean's positive spelling) → its field's path, or a Flag.
FlagTable = Mapping[str, "str | Flag"]


def _as_flag(entry: str | Flag) -> Flag:
    return entry if isinstance(entry, Flag) else Flag(entry)


def _dest(flag: str) -> str:
    # Its own namespace entry, apart from the command's other arguments (`--quiet`, `--priority`).
    return f"spec:{flag}"


def field_at(spec: type[BaseModel], path: str) -> tuple[FieldInfo, bool]:
    """The field at a dotted path, and whether the spec requires it (every field on the path required).

    Raises KeyError naming the path where a table names a field the spec does not have."""
    model, required, info = spec, True, None
    parts = path.split(".")
    for depth, name in enumerate(parts):
        if model is None or name not in model.model_fields:
            raise KeyError(f"{spec.__name__} has no field {path!r}")
        info = model.model_fields[name]
        required = required and info.is_required()
        model = _model_in(info.annotation) if depth < len(parts) - 1 else None
    return info, required


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *_union_members(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return ()


@dataclass(frozen=True)
class _Shape:
    """How argparse reads a field's value: a converter, its choices, or a boolean switch."""

    convert: Callable[[str], Any] | None
    choices: tuple[str, ...] | None = None
    switch: bool = False
    many: bool = False  # a tuple of values: one or more


def _shape(annotation: Any) -> _Shape:
    """The argparse shape of a field's type: str, int, float, bool, a Literal, an Enum, or a union of those with
    None (left out: a flag cannot give null unless its Flag names a word for it) or with bool (`true`/`false`)."""
    members = [m for m in (_union_members(annotation) or (annotation,)) if m is not type(None)]
    if len(members) == 1 and typing.get_origin(members[0]) is tuple:
        item, *rest = typing.get_args(members[0])
        if rest != [Ellipsis]:
            raise TypeError(f"no command-line form for a field of type {annotation!r} (a fixed-length tuple)")
        one = _shape(typing.get_args(item)[0] if typing.get_origin(item) is typing.Annotated else item)
        if one.switch or one.many:
            raise TypeError(f"no command-line form for a field of type {annotation!r}")
        return _Shape(one.convert, one.choices, many=True)
    if members == [bool]:
        return _Shape(None, switch=True)
    choices: list[str] = []
    convert: Callable[[str], Any] | None = None
    for member in members:
        if typing.get_origin(member) is Literal:
            choices += [str(v) for v in typing.get_args(member)]
        elif isinstance(member, type) and issubclass(member, Enum):
            choices += [str(m.value) for m in member]
        elif member is bool:
            choices += list(_BOOL_WORDS)
        elif member in (str, int, float) and convert is None:
            convert = member
        elif member is SecretStr and convert is None:
            convert = str
        else:
            raise TypeError(f"no command-line form for a field of type {annotation!r}")
    if choices and convert is not None:
        raise TypeError(f"no command-line form for a field of type {annotation!r} (both choices and free values)")
    if choices:
        return _Shape(lambda text: _BOOL_WORDS.get(text, text) if bool in members else text, tuple(choices))
    return _Shape(convert)


def _help(info: FieldInfo, flag: Flag, switch: bool) -> str:
    text = (info.description or "").rstrip()
    if flag.none:
        text += f" '{flag.none}': null."
    if not info.is_required() and info.default is not None and not switch:
        default = info.default.value if isinstance(info.default, Enum) else info.default
        text += f" (default: {str(default).lower() if isinstance(default, bool) else default})"
    elif switch and not info.is_required():
        text += f" (default: {'yes' if info.default else 'no'})"
    return text.strip().replace("%", "%%")  # argparse formats help with %


def add_flags(parser: argparse.ArgumentParser, spec: type[BaseModel], table: FlagTable) -> None:
    """Add one argument per table entry, each derived from its field; none sets a default (see the module doc)."""
    for name, entry in table.items():
        flag = _as_flag(entry)
        info, required = field_at(spec, flag.path)
        shape = _shape(info.annotation)
        common = {"dest": _dest(name), "default": argparse.SUPPRESS, "help": _help(info, flag, shape.switch)}
        if shape.switch:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **common)
            continue
        words = (*shape.choices, *((flag.none,) if flag.none else ())) if shape.choices else None
        metavar = flag.metavar or ("{" + ",".join(words) + "}" if words else name.lstrip("-").upper())
        many = {"nargs": "+" if required else "*"} if shape.many else {}
        if flag.positional:
            dest = common.pop("dest")
            parser.add_argument(dest, metavar=metavar, type=_reader(shape, flag), **many, **common)
            continue
        names = (flag.short, name) if flag.short else (name,)
        parser.add_argument(*names, required=required, metavar=metavar, type=_reader(shape, flag), **many, **common)


def _reader(shape: _Shape, flag: Flag) -> Callable[[str], Any]:
    """The flag's text as the spec's value: a choice checked as typed (`--compile true` is the choice, True the
    value), the `none` word as null, else the field type's converter (pydantic checks the rest)."""

    def read(text: str) -> Any:
        if flag.none and text.lower() == flag.none:
            return None
        if shape.choices is not None and text not in shape.choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(shape.choices)})")
        return shape.convert(text) if shape.convert else text

    # argparse names the converter in its error ("invalid int value: 'x'").
    read.__name__ = getattr(shape.convert, "__name__", "str") if shape.choices is None else "choice"
    return read


def spec_data(args: argparse.Namespace, table: FlagTable) -> dict[str, Any]:
    """The spec's data from the flags given on the command line, nested by each flag's path; absent flags absent."""
    given = vars(args)
    data: dict[str, Any] = {}
    for name, entry in table.items():
        if _dest(name) not in given:
            continue
        *parents, leaf = _as_flag(entry).path.split(".")
        node = data
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = given[_dest(name)]
    return data


def spec_from_flags(args: argparse.Namespace, spec: type[BaseModel], table: FlagTable) -> BaseModel:
    """The spec the command line describes; raises pydantic.ValidationError naming each bad field."""
    return spec.model_validate(spec_data(args, table))


@dataclass(frozen=True)
class SpecFlags:
    """A spec class and its flag table: what a command needs to take a job from flags (label, finetune, submit)."""

    spec: type[BaseModel]
    table: FlagTable

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        add_flags(parser, self.spec, self.table)

    def build(self, args: argparse.Namespace) -> BaseModel:
        return spec_from_flags(args, self.spec, self.table)
