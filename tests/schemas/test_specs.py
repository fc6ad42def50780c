"""Job specs refuse bad input before any work starts, naming the field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from jobs.kinds import job_spec_json_schema, load_job_spec, parse_job_spec
from schemas.spec_files import MAX_SPEC_BYTES, SpecError
from schemas.specs import LabelJobSpec

BASE = {"kind": "label", "input": {"uri": "s3://in/photos"}, "output": "s3://out/run-1", "model": {"name": "resnet50"}}


def _error_locations(data: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_job_spec(data)
    return [".".join(map(str, e["loc"])) for e in info.value.errors()]


def test_minimal_spec_gets_sensible_defaults():
    spec = parse_job_spec(BASE)
    assert isinstance(spec, LabelJobSpec)
    assert (spec.top_k, spec.batch_size, spec.model.weights, spec.input.format) == (5, 32, "DEFAULT", "auto")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batch_size": -1}, "batch_size"),
        ({"top_k": 0}, "top_k"),
        ({"colour": "blue"}, "colour"),
        ({"model": {"name": "resnet50", "wieghts": "x"}}, "model.wieghts"),
        ({"input": {"uri": "s3://in/photos", "format": "zip"}}, "input.format"),
        ({"input": {"uri": "s3://in/photos", "files_per_shard": 0}}, "input.files_per_shard"),
        ({"job_id": "../escape"}, "job_id"),
        ({"storage": {"access_key_id": "AKIA"}}, "storage"),
    ],
)
def test_bad_fields_are_named(change, field):
    assert field in _error_locations({**BASE, **change})


@pytest.mark.parametrize("output", ["s3://in/photos/labels", "s3://in"])
def test_output_overlapping_input_is_refused(output):
    with pytest.raises(ValidationError, match="must not overlap"):
        parse_job_spec({**BASE, "output": output})


def test_sibling_prefix_is_not_overlap():
    assert parse_job_spec({**BASE, "output": "s3://in/photos-labels"}).output == "s3://in/photos-labels"


def test_specs_are_frozen():
    spec = parse_job_spec(BASE)
    with pytest.raises(ValidationError):
        spec.top_k = 3


def test_job_id_is_stable_and_ignores_runtime_knobs():
    a = parse_job_spec(BASE)
    b = parse_job_spec({**BASE, "batch_size": 64, "num_workers": 4})
    c = parse_job_spec({**BASE, "top_k": 3})
    assert a.resolved_job_id() == b.resolved_job_id() != c.resolved_job_id()
    assert parse_job_spec({**BASE, "job_id": "nightly-7"}).resolved_job_id() == "nightly-7"
    # What changes the rows changes the id; an option left at its default (one added in a later version) does not.
    assert parse_job_spec({**BASE, "probabilities": True}).resolved_job_id() != a.resolved_job_id()
    spelled_out = {**BASE, "input": {**BASE["input"], "label_column": "label"}}
    assert parse_job_spec(spelled_out).resolved_job_id() == a.resolved_job_id()


def test_secrets_never_appear_in_dumps_or_errors():
    spec = parse_job_spec({**BASE, "storage": {"access_key_id": "AKIASECRET", "secret_access_key": "hunter2hunter2"}})
    dumped = spec.model_dump_json() + repr(spec) + str(spec)
    assert "hunter2hunter2" not in dumped and "AKIASECRET" not in dumped


def test_yaml_and_json_files_load(tmp_path):
    (tmp_path / "job.yaml").write_text(
        "kind: label\ninput: {uri: s3://in/photos, format: tar}\noutput: s3://out/x\nmodel: {name: vgg16}\n"
    )
    (tmp_path / "job.json").write_text(json.dumps(BASE))
    assert load_job_spec(tmp_path / "job.yaml").input.format == "tar"
    assert load_job_spec(tmp_path / "job.json").model.name == "resnet50"
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_job_spec(tmp_path / "list.yaml")


def test_json_schema_exports_every_field():
    schema = json.dumps(job_spec_json_schema())
    for field in ("top_k", "files_per_shard", "max_failed_shards", "weights_dir"):
        assert field in schema


# A "billion laughs": nine levels of nine aliases, 9**9 (387 million) strings once expanded, in a few hundred bytes.
# Before the limits, validating one of these took 48 s and 4.5 GB and its errors printed 1.5 GB.
ALIAS_BOMB = "".join(
    [
        "kind: label\noutput: s3://out/x\nmodel: {name: resnet50}\n",
        'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n',
        *(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)),
        "input: {uri: s3://in/photos, extensions: *a8}\n",
    ]
)


def _load_text(tmp_path, text: str, name: str = "job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_job_spec(path)


def test_alias_bomb_is_refused_in_milliseconds_and_kilobytes(tmp_path):
    import time
    import tracemalloc

    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(SpecError, match="aliases expand to more than") as info:
        _load_text(tmp_path, ALIAS_BOMB)
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.5 and peak < 5 << 20, (elapsed, peak)
    assert str(tmp_path / "job.yaml") in str(info.value) and "\n" not in str(info.value)


def test_modest_aliases_still_load(tmp_path):
    text = "kind: label\noutput: s3://out/x\nmodel: {name: resnet50}\n"
    text += "input: {uri: s3://in/p, exclude: &skip ['*.tmp', .thumbs], allowed_roots: [s3://in/extra]}\n"
    text += "x: *skip\n"  # an unknown field: only checks the alias is expanded before validation refuses it
    with pytest.raises(ValidationError, match="x"):
        _load_text(tmp_path, text)
    text = text.replace("x: *skip\n", "").replace("allowed_roots: [s3://in/extra]", "extensions: &e [jpg, png]")
    assert _load_text(tmp_path, text).input.extensions == ("jpg", "png")


def test_recursive_alias_is_refused(tmp_path):
    with pytest.raises(SpecError, match="aliases expand"):
        _load_text(tmp_path, "kind: label\nloop: &x [*x]\n")


def test_python_tags_are_refused_in_one_line(tmp_path):
    text = "kind: !!python/object/apply:os.system ['touch pwned']\n"
    with pytest.raises(SpecError, match="python tags are not allowed") as info:
        _load_text(tmp_path, text)
    assert "line 1" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "pwned").exists()


def test_oversized_spec_file_is_refused_unread(tmp_path):
    with pytest.raises(SpecError, match="larger than 1 MiB"):
        _load_text(tmp_path, "kind: label\n" + "#" * MAX_SPEC_BYTES + "\n")


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("deep.yaml", "a: " + "[" * 5000, "not a valid YAML job spec"),
        ("deep.json", "[" * 200_000, "nested too deeply"),
        ("bad.json", '{"kind": "label",', "not valid JSON"),
        ("tabs.yaml", "kind: label\n\tinput: x\n", "not a valid YAML job spec"),
        ("digits.yaml", "kind: label\nbatch_size: " + "9" * 100_000 + "\n", "a value cannot be read"),
    ],
)
def test_malformed_files_are_one_line_spec_errors(tmp_path, name, text, problem):
    with pytest.raises(SpecError, match=problem) as info:
        _load_text(tmp_path, text, name)
    assert "\n" not in str(info.value)


def test_missing_and_binary_spec_files_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="cannot read job spec"):
        load_job_spec(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"kind: \xff\xfe label\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_job_spec(tmp_path / "bin.yaml")
