"""Flags derived from the spec fields (jobs.flags) and the label/fine-tune tables (jobs.kind_flags).

The promise: a job typed as flags and the same job written as a spec file are one job (one id, one spec), for every
flag; a flag left off leaves the spec's default; help and choices come from the field, never restated.
"""

from __future__ import annotations

import argparse
import typing
from typing import Literal

import pytest
import yaml
from pydantic import Field

from jobs import kinds
from jobs.cli import _parser, kind_arguments, spec_of
from jobs.flags import Flag, SpecFlags, field_at, spec_data
from jobs.kind_flags import (
    DEDUPE_FLAGS,
    FINETUNE_FLAGS,
    LABEL_FLAGS,
    LABEL_ISSUES_FLAGS,
    REVIEW_QUEUE_FLAGS,
    SELF_TRAIN_FLAGS,
)
from jobs.kinds import load_job_spec
from jobs.service.commands import normalise_argv
from schemas.finetune import FinetuneMethod
from schemas.specs import Spec

# What each kind's required flags are given in every case, as flags and as the spec file's fields.
_BASE = {
    "label": (["--input", "/data/photos", "--output", "/data/labels", "--model", "mobilenet_v2"],
              {"kind": "label", "input": {"uri": "/data/photos"}, "output": "/data/labels",
               "model": {"name": "mobilenet_v2"}}),
    "finetune": (["--data", "/data/plants", "--base", "mobilenet_v2", "--output", "/data/models"],
                 {"kind": "finetune", "data": {"uri": "/data/plants"}, "base": {"name": "mobilenet_v2"},
                  "output": "/data/models"}),
    "dedupe": (["/data/labels", "--out", "/data/dupes"],
               {"kind": "dedupe", "sources": ["/data/labels"], "output": "/data/dupes"}),
    "review-queue": (["/data/labels", "--out", "/data/queue"],
                     {"kind": "review-queue", "source": "/data/labels", "output": "/data/queue"}),
    "label-issues": (["--data", "/data/plants", "--base", "mobilenet_v2", "--out", "/data/issues"],
                     {"kind": "label-issues", "data": {"uri": "/data/plants"}, "base": {"name": "mobilenet_v2"},
                      "output": "/data/issues"}),
    "self-train": (["--data", "/data/plants", "--pool", "/data/pool", "--base", "mobilenet_v2", "--output",
                    "/data/models"],
                   {"kind": "self-train", "data": {"uri": "/data/plants"}, "pool": "/data/pool",
                    "base": {"name": "mobilenet_v2"}, "output": "/data/models"}),
}  # fmt: skip

# Per flag: what is typed (never the field's default) and the value a spec file gives its field.
_SAMPLES = {
    "label": {
        "--input": (["--input", "/data/other"], "/data/other"),
        "--output": (["--output", "/data/labels-2"], "/data/labels-2"),
        "--output-format": (["--output-format", "delta"], "delta"),
        "--compact": (["--compact", "never"], "never"),
        "--target-file-mb": (["--target-file-mb", "64"], 64),
        "--model": (["--model", "resnet18"], "resnet18"),
        "--weights": (["--weights", "none"], None),
        "--weights-dir": (["--weights-dir", "/opt/weights"], "/opt/weights"),
        "--format": (["--format", "tar"], "tar"),
        "--image-field": (["--image-field", "jpg;png"], "jpg;png"),
        "--decoder": (["--decoder", "pillow"], "pillow"),
        "--files-per-shard": (["--files-per-shard", "10"], 10),
        "--top-k": (["--top-k", "3"], 3),
        "--batch-size": (["--batch-size", "8"], 8),
        "--workers": (["--workers", "2"], 2),
        "--device": (["--device", "cpu"], "cpu"),
        "--compile": (["--compile", "true"], True),
        "--embeddings": (["--no-embeddings"], False),
        "--probabilities": (["--probabilities"], True),
        "--shared-storage": (["--shared-storage"], True),
        "--endpoint-url": (["--endpoint-url", "http://127.0.0.1:8333"], "http://127.0.0.1:8333"),
        "--job-id": (["--job-id", "my-job.1"], "my-job.1"),
    },
    "finetune": {
        "--data": (["--data", "/data/leaves"], "/data/leaves"),
        "--base": (["--base", "resnet18"], "resnet18"),
        "--weights": (["--weights", "none"], None),
        "--weights-dir": (["--weights-dir", "/opt/weights"], "/opt/weights"),
        "--output": (["--output", "/data/models-2"], "/data/models-2"),
        "--corrections": (["--corrections", "/data/queue-1", "/data/queue-2"], ["/data/queue-1", "/data/queue-2"]),
        "--method": (["--method", "full"], "full"),
        "--epochs": (["--epochs", "7"], 7),
        "--min-steps": (["--min-steps", "10"], 10),
        "--group-duplicates": (["--no-group-duplicates"], False),
        "--duplicate-cosine": (["--duplicate-cosine", "0.9"], 0.9),
        "--batch-size": (["--batch-size", "16"], 16),
        "--lr": (["--lr", "0.01"], 0.01),
        "--image-size": (["--image-size", "160"], 160),
        "--val-data": (["--val-data", "/data/val"], "/data/val"),
        "--val-fraction": (["--val-fraction", "0.3"], 0.3),
        "--key-column": (["--key-column", "path"], "path"),
        "--label-column": (["--label-column", "class"], "class"),
        "--class-weights": (["--class-weights", "balanced"], "balanced"),
        "--seed": (["--seed", "3"], 3),
        "--refit": (["--refit", "never"], "never"),
        "--workers": (["--workers", "2"], 2),
        "--gpus-per-worker": (["--gpus-per-worker", "1"], 1.0),
        "--endpoint-url": (["--endpoint-url", "http://127.0.0.1:8333"], "http://127.0.0.1:8333"),
        "--job-id": (["--job-id", "tune-1"], "tune-1"),
        "--name": (["--name", "plants"], "plants"),
    },
    "dedupe": {
        "OUTPUT": (["/data/a", "/data/b"], ["/data/a", "/data/b"]),
        "--out": (["--out", "/data/dupes-2"], "/data/dupes-2"),
        "--threshold": (["--threshold", "0.9"], 0.9),
        "--split": (["--split", "/models/plants/v3"], "/models/plants/v3"),
        "--index": (["--index", "ivf"], "ivf"),
        "--endpoint-url": (["--endpoint-url", "http://127.0.0.1:8333"], "http://127.0.0.1:8333"),
        "--job-id": (["--job-id", "dupes-1"], "dupes-1"),
    },
    "review-queue": {
        "OUTPUT": (["/data/other"], "/data/other"),
        "--out": (["--out", "/data/queue-2"], "/data/queue-2"),
        "--strategy": (["--strategy", "diverse"], "diverse"),
        "--size": (["-n", "50"], 50),
        "--per-label": (["--per-label"], True),
        "--sheet": (["--no-sheet"], False),
        "--endpoint-url": (["--endpoint-url", "http://127.0.0.1:8333"], "http://127.0.0.1:8333"),
        "--job-id": (["--job-id", "queue-1"], "queue-1"),
    },
    "label-issues": {
        "--data": (["--data", "/data/leaves"], "/data/leaves"),
        "--base": (["--base", "resnet18"], "resnet18"),
        "--weights": (["--weights", "none"], None),
        "--weights-dir": (["--weights-dir", "/opt/weights"], "/opt/weights"),
        "--out": (["--out", "/data/issues-2"], "/data/issues-2"),
        "--folds": (["--folds", "10"], 10),
        "--seed": (["--seed", "4"], 4),
        "--image-size": (["--image-size", "160"], 160),
        "--key-column": (["--key-column", "path"], "path"),
        "--label-column": (["--label-column", "class"], "class"),
        "--cpus": (["--cpus", "2"], 2.0),
        "--sheet": (["--no-sheet"], False),
        "--endpoint-url": (["--endpoint-url", "http://127.0.0.1:8333"], "http://127.0.0.1:8333"),
        "--job-id": (["--job-id", "issues-1"], "issues-1"),
    },
    "self-train": {
        "--data": (["--data", "/data/leaves"], "/data/leaves"),
        "--pool": (["--pool", "/data/field"], "/data/field"),
        "--base": (["--base", "resnet18"], "resnet18"),
        "--weights": (["--weights", "none"], None),
        "--weights-dir": (["--weights-dir", "/opt/weights"], "/opt/weights"),
        "--output": (["--output", "/data/models-2"], "/data/models-2"),
        "--work": (["--work", "/scratch/st"], "/scratch/st"),
        "--target-precision": (["--target-precision", "0.9"], 0.9),
        "--min-support": (["--min-support", "5"], 5),
        "--duplicate-cosine": (["--duplicate-cosine", "0.9"], 0.9),
        "--method": (["--method", "linear-probe"], "linear-probe"),
        "--epochs": (["--epochs", "7"], 7),
        "--image-size": (["--image-size", "160"], 160),
        "--seed": (["--seed", "3"], 3),
        "--key-column": (["--key-column", "path"], "path"),
        "--label-column": (["--label-column", "class"], "class"),
        "--endpoint-url": (["--endpoint-url", "http://127.0.0.1:8333"], "http://127.0.0.1:8333"),
        "--shared-storage": (["--shared-storage"], True),
        "--job-id": (["--job-id", "st-1"], "st-1"),
    },
}
# A few flags whose other values take another path (a weights name rather than `none`, `auto` rather than a bool).
_MORE = [
    ("label", "--weights", ["--weights", "IMAGENET1K_V1"], "IMAGENET1K_V1"),
    ("label", "--compile", ["--compile", "auto"], "auto"),
    ("finetune", "--method", ["--method", "linear-probe"], "linear-probe"),
    ("finetune", "--weights", ["--weights", "IMAGENET1K_V1"], "IMAGENET1K_V1"),
]
_TABLES = {"label": LABEL_FLAGS, "finetune": FINETUNE_FLAGS, "dedupe": DEDUPE_FLAGS,
           "review-queue": REVIEW_QUEUE_FLAGS, "label-issues": LABEL_ISSUES_FLAGS,
           "self-train": SELF_TRAIN_FLAGS}  # fmt: skip
_CASES = [(kind, flag, *sample) for kind, samples in _SAMPLES.items() for flag, sample in samples.items()] + _MORE


def _path(table, flag: str) -> str:
    entry = table[flag]
    return entry.path if isinstance(entry, Flag) else entry


def _spec_file(tmp_path, kind: str, path: str | None = None, value=None):
    """The spec file a user would write: the kind's required fields, and `value` at `path` (label output options
    in the `output: {uri: ...}` form the README shows)."""
    data = yaml.safe_load(yaml.safe_dump(_BASE[kind][1]))
    if path is not None:
        if path.startswith("output_options."):
            data["output"] = {"uri": data["output"], path.split(".", 1)[1]: value}
        else:
            *parents, leaf = path.split(".")
            node = data
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value  # a required field's sample replaces its base value
    file = tmp_path / f"{kind}.yaml"
    file.write_text(yaml.safe_dump(data))
    return load_job_spec(file)


def _by_flags(kind: str, typed: list[str], replaces: str | None = None):
    base = list(_BASE[kind][0])
    if replaces in base:  # a required flag's sample replaces the base value
        del base[base.index(replaces) : base.index(replaces) + 2]
    elif replaces is not None and not replaces.startswith("-"):  # a positional's: the base's first word
        base = base[1:]
    return spec_of(_parser().parse_args([kind, *base, *typed]))


def test_every_flag_of_the_tables_has_a_sample():
    """A flag added to a table without a case here fails this test, so the id test below covers every flag."""
    assert {kind: set(samples) for kind, samples in _SAMPLES.items()} == {k: set(t) for k, t in _TABLES.items()}
    assert len(_SAMPLES["label"]) + len(_SAMPLES["finetune"]) == 48  # 48 flags of issue 22 less the two --quiet, and
    # --corrections (issue 24) and --refit (issue 25)
    assert len(_SAMPLES["dedupe"]) + len(_SAMPLES["review-queue"]) + len(_SAMPLES["label-issues"]) == 29
    assert len(_SAMPLES["self-train"]) == 19


@pytest.mark.parametrize(("kind", "flag", "typed", "value"), _CASES, ids=[f"{c[0]}{c[1]}={c[3]}" for c in _CASES])
def test_a_job_by_flags_is_the_job_of_its_spec_file(tmp_path, kind, flag, typed, value):
    by_flags = _by_flags(kind, typed, replaces=flag)
    by_file = _spec_file(tmp_path, kind, _path(_TABLES[kind], flag), value)
    assert by_flags.resolved_job_id() == by_file.resolved_job_id()
    assert by_flags.model_dump(mode="json") == by_file.model_dump(mode="json")
    # The value is not the default, so the flag is seen to reach its field.
    assert by_flags.model_dump(mode="json") != _spec_file(tmp_path, kind).model_dump(mode="json")


@pytest.mark.parametrize("kind", list(_BASE))
def test_absent_flags_leave_the_spec_defaults(tmp_path, kind):
    args = _parser().parse_args([kind, *_BASE[kind][0]])
    given = spec_data(args, _TABLES[kind])
    assert given == {k: v for k, v in _BASE[kind][1].items() if k != "kind"}  # only what was typed
    by_flags, by_file = spec_of(args), _spec_file(tmp_path, kind)
    assert by_flags.model_dump(mode="json") == by_file.model_dump(mode="json")
    assert by_flags.model_fields_set == by_file.model_fields_set - {"kind"}  # check_top_k sees no top_k given
    assert by_flags.resolved_job_id() == by_file.resolved_job_id()


@pytest.mark.parametrize("kind", list(_BASE))
def test_submit_takes_the_same_flags_and_builds_the_same_spec(kind):
    typed = _merged(kind)
    run = spec_of(_parser().parse_args([kind, *typed]))
    args = _parser().parse_args(normalise_argv(["submit", kind, *typed, "--priority", "3"]))
    assert (args.build(args), args.priority) == (run, 3)


def _merged(kind: str) -> list[str]:
    """Every sample at once (the required flags by their samples)."""
    return [item for sample in _SAMPLES[kind].values() for item in sample[0]]


@pytest.mark.parametrize("kind", ["label", "finetune"])
def test_help_is_the_field_description_and_shows_its_default(kind):
    parser = argparse.ArgumentParser()
    flags = kinds.get(kind).flags
    kind_arguments(parser, flags)
    spec = flags.spec
    for flag in _TABLES[kind]:
        info, _ = field_at(spec, _path(_TABLES[kind], flag))
        action = parser._option_string_actions[flag]
        assert info.description, f"{flag}: its field has no description"
        assert action.help.startswith(info.description.replace("%", "%%").rstrip()), flag
    # The default shown is the field's, read from it: a changed spec default changes the help with it.
    assert parser._option_string_actions["--batch-size"].help.endswith(
        f"(default: {_default(spec, flags, '--batch-size')})"
    )


def _default(spec, flags, flag: str):
    return field_at(spec, _path(flags.table, flag))[0].default


# ------------------------------------------------------------------------------------- the derivation itself


class _Inner(Spec):
    mode: Literal["fast", "exact"] = Field(default="fast", description="How hard to try.")
    level: int = Field(default=3, ge=0, description="How much.")


class _Toy(Spec):
    where: str = Field(description="Where it goes.")
    inner: _Inner = _Inner()
    method: FinetuneMethod = Field(default=FinetuneMethod.LP_FT, description="An enum's values are the choices.")
    loud: bool = Field(default=False, description="Say more.")
    weights: str | None = Field(default="DEFAULT", description="Weights.")
    compile: Literal["auto"] | bool = Field(default=False, description="A literal or a bool.")


_TOY_FLAGS = {"--where": "where", "--mode": "inner.mode", "--level": "inner.level", "--method": "method",
              "--loud": "loud", "--weights": Flag("weights", none="none"), "--compile": "compile"}  # fmt: skip
_TOY = SpecFlags(_Toy, _TOY_FLAGS)


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy", exit_on_error=False)
    _TOY.add_to(parser)
    return parser


def test_choices_come_from_the_literal_and_the_enum():
    parser = _toy_parser()
    assert parser._option_string_actions["--mode"].metavar == "{fast,exact}"
    assert typing.get_args(_Inner.model_fields["mode"].annotation) == ("fast", "exact")
    assert parser._option_string_actions["--method"].metavar == "{" + ",".join(m.value for m in FinetuneMethod) + "}"
    assert parser._option_string_actions["--compile"].metavar == "{auto,true,false}"
    with pytest.raises(argparse.ArgumentError, match=r"--mode: invalid choice: 'slow' \(choose from fast, exact\)"):
        parser.parse_args(["--where", "x", "--mode", "slow"])


def test_the_toy_spec_by_flags_nested_booleans_and_none():
    parser = _toy_parser()
    toy = _TOY.build(parser.parse_args(["--where", "x", "--mode", "exact", "--level", "5", "--loud",
                                        "--weights", "none", "--compile", "true", "--method", "full"]))  # fmt: skip
    assert toy == _Toy(where="x", inner={"mode": "exact", "level": 5}, loud=True, weights=None, compile=True,
                       method="full")  # fmt: skip
    assert _TOY.build(parser.parse_args(["--where", "x", "--no-loud", "--compile", "auto"])).compile == "auto"
    assert _TOY.build(parser.parse_args(["--where", "x", "--no-loud"])).loud is False


def test_absent_toy_flags_are_left_out_so_the_spec_default_decides():
    args = _toy_parser().parse_args(["--where", "x"])
    assert spec_data(args, _TOY.table) == {"where": "x"}
    assert _TOY.build(args).model_fields_set == {"where"}
    with pytest.raises(SystemExit):
        _toy_parser().parse_args([])  # --where is required: its field has no default


def test_toy_help_is_the_description_with_the_default():
    parser = _toy_parser()
    assert parser._option_string_actions["--level"].help == "How much. (default: 3)"
    assert parser._option_string_actions["--loud"].help == "Say more. (default: no)"
    assert parser._option_string_actions["--method"].help.endswith("(default: lp-ft)")
    assert parser._option_string_actions["--where"].required


def test_a_table_naming_a_missing_field_or_an_unreadable_type_fails_when_the_parser_is_built():
    with pytest.raises(KeyError, match="inner.speed"):
        SpecFlags(_Toy, {"--speed": "inner.speed"}).add_to(argparse.ArgumentParser())

    class Pairs(Spec):
        items: tuple[str, str] = Field(default=("a", "b"), description="A fixed-length tuple has no flag form.")

    with pytest.raises(TypeError, match="no command-line form"):
        SpecFlags(Pairs, {"--items": "items"}).add_to(argparse.ArgumentParser())


def test_a_tuple_field_takes_one_or_more_values_as_a_positional_or_a_flag():
    class Listy(Spec):
        items: tuple[str, ...] = Field(min_length=1, description="What to read.")
        tags: tuple[str, ...] = Field(default=(), description="Tags.")

    flags = SpecFlags(Listy, {"ITEM": Flag("items", positional=True, metavar="ITEM"), "--tags": "tags",
                              "--count": Flag("tags", short="-t")})  # fmt: skip
    parser = argparse.ArgumentParser()
    flags.add_to(parser)
    assert flags.build(parser.parse_args(["a", "b", "--tags", "x", "y"])) == Listy(items=("a", "b"), tags=("x", "y"))
    assert flags.build(parser.parse_args(["a", "-t", "z"])).tags == ("z",)
    assert flags.build(parser.parse_args(["a"])).tags == ()  # absent: the spec's default


@pytest.mark.parametrize("command", [["label"], ["finetune"], ["submit", "label"], ["submit", "finetune"]], ids=str)
def test_every_job_command_prints_its_help(command, capsys):
    """argparse formats help only when asked: a field description it cannot format would fail here, not at use."""
    with pytest.raises(SystemExit) as ended:
        _parser().parse_args([*command, "--help"])
    assert ended.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 32)" in out and "--endpoint-url" in out
