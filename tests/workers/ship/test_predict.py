"""workers/ship/predict.py: a model in process gives a label job's answers (the same decode, preprocessing and
forward pass), for a zoo model and a fine-tuned artifact; bad input is one line."""

from __future__ import annotations

import json
import shutil

import pyarrow.dataset as ds
import pytest

from jobs.cli import main
from jobs.label.runner import run_label_job
from schemas.specs import LabelJobSpec
from tests.support import IMAGENET_SAMPLE
from tests.workers.finetune.test_artifacts import PLAN, STATE, _job, _trained
from workers.finetune.artifacts import publish
from workers.io.storage import LocalStorage
from workers.ship.predict import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for photo in sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:12]:
        shutil.copy(photo, folder / photo.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("models")
    _, weights = _trained(root, seed=3)
    location, _ = publish(LocalStorage(), _job(str(root)), "ft-test", PLAN, weights, STATE)
    return location


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("which", ["zoo", "artifact"])
def test_predict_gives_a_label_jobs_top_k_and_scores(photos, artifact, tmp_path, which):
    name, weights = ("mobilenet_v2", "IMAGENET1K_V1") if which == "zoo" else (artifact, None)
    spec = LabelJobSpec(input={"uri": str(photos)}, output=str(tmp_path / "out"), model={"name": name,
                        "weights": weights}, top_k=3, num_workers=1)  # fmt: skip
    run_label_job(spec, show_progress=False)
    rows = {r["key"]: r for r in ds.dataset(tmp_path / "out" / "data", format="parquet").to_table().to_pylist()}

    with load_model(name, weights, top_k=3) as model:
        predictions = model.predict(sorted(photos.iterdir()))

    assert len(predictions) == len(rows) == 13
    for p in predictions:
        row = rows[p.source.rsplit("/", 1)[-1]]
        assert (p.error is None) == (row["error"] is None), (p, row["error"])
        if p.error:
            continue
        assert [label for label, _ in p.topk] == row["topk_labels"], p.source
        assert [score for _, score in p.topk] == pytest.approx(row["topk_scores"], abs=1e-5)
        assert (p.image_id, p.width, p.height) == (row["image_id"], row["width"], row["height"])


def test_the_predict_command_prints_json_and_says_which_image_failed(photos, capsys):
    images = [str(photos / "n01440764_tench.JPEG"), str(photos / "broken.jpg")]
    code = main(["predict", *images, "--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--top-k", "2",
                 "--json"])  # fmt: skip
    tench, broken = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert code == 1  # one image could not be read
    assert tench["label"] == "tench" and len(tench["topk"]) == 2 and tench["error"] is None
    assert broken["label"] is None and broken["error"]


@pytest.mark.parametrize(("model", "says"), [("resnet5000", "resnet5000"), ("/no/such/artifact", "/no/such/artifact")])
def test_a_bad_model_is_one_line_naming_it(photos, capsys, model, says):
    assert main(["predict", str(photos / "n01440764_tench.JPEG"), "--model", model]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
