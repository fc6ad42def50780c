"""Job specs refuse bad input before any work starts, naming the field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas.specs import LabelJobSpec, job_spec_json_schema, load_job_spec, parse_job_spec

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
