"""workers/ship/zoo.py: `bulklabel models` lists torchvision's registry with its own metadata, and this machine's
weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision import models as tv_models

from jobs.cli import main
from workers.models import ModelError
from workers.ship.zoo import zoo


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A fresh widths cache; torch's hub (where the weights are) stays where it was: it follows XDG_CACHE_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(Path(torch.hub.get_dir()).parent))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_every_weights_entry_of_the_registry_is_listed_with_its_metadata():
    rows = zoo(["resnet", "mobilenet"])
    registry = {(m, w.name) for m in tv_models.list_models(module=tv_models) if "resnet" in m or "mobilenet" in m
                for w in tv_models.get_model_weights(m)}  # fmt: skip
    assert {(r.model, r.weights) for r in rows} == registry
    by = {(r.model, r.weights): r for r in rows}
    r50 = by[("resnet50", "IMAGENET1K_V2")]
    assert (r50.top1, r50.embedding_width, r50.params_m) == (80.858, 2048, 25.56) and r50.gflops == 4.089
    assert by[("mobilenet_v2", "IMAGENET1K_V1")].here  # the one ImageNet file this machine has (deploy/setup.sh)
    assert [r.top1 for r in rows] == sorted((r.top1 for r in rows), reverse=True)


def test_filters_by_cost_and_by_what_is_here_and_names_a_missing_model_with_its_neighbours():
    assert all(r.gflops <= 0.5 for r in zoo(["mobilenet", "resnet"], max_gflops=0.5))
    assert [(r.model, r.weights) for r in zoo(["mobilenet_v2"], offline=True)] == [("mobilenet_v2", "IMAGENET1K_V1")]
    with pytest.raises(ModelError, match=r"no model matching efficientnet5 .*did you mean .*efficientnet_b5"):
        zoo(["efficientnet5"])


def test_the_models_command_prints_a_table_or_json(capsys):
    assert main(["models", "mobilenet_v2", "--json"]) == 0
    rows = {row["weights"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"IMAGENET1K_V1", "IMAGENET1K_V2"} and rows["IMAGENET1K_V1"]["here"] is True
    assert rows["IMAGENET1K_V2"]["here"] is False and rows["IMAGENET1K_V1"]["embedding_width"] == 1280
    assert main(["models", "mobilenet_v2", "--offline"]) == 0
    assert "1 here (usable offline)" in capsys.readouterr().out


def test_the_history_has_every_model_of_the_pinned_torchvision_with_its_first_release():
    """Generated from PyPI's wheels (deploy/torchvision_history.py): a new pin without a new history fails here."""
    import torchvision

    from workers.ship.history import history, since

    pinned = ".".join(torchvision.__version__.split(".")[:2])
    assert history()["releases"][-1] == pinned
    assert set(tv_models.list_models(module=tv_models)) <= set(history()["models"])
    assert (since("efficientnet_b0"), since("efficientnet_v2_s"), since("mobilenet_v3_large")) == (
        "0.11",
        "0.13",
        "0.9",
    )
    assert {r.since for r in zoo(["maxvit"])} == {"0.14"}


def test_a_model_this_torchvision_lacks_is_named_with_the_release_that_has_it(monkeypatch):
    """The seed's `module 'torchvision.models' has no attribute 'efficientnet...'`: an older torchvision (its
    registry faked without the EfficientNets) says which release has the model, in one line."""
    from workers import models

    monkeypatch.setattr(models, "classification_models", lambda: ["resnet50", "mobilenet_v2"])
    with pytest.raises(ModelError, match=r"model 'efficientnet_v2_s' is not in this torchvision \(.*\): it needs "
                                         r"torchvision >= 0\.13$"):  # fmt: skip
        models.check_model_name("efficientnet_v2_s")
    with pytest.raises(ModelError, match="unknown model 'efficientnet'; torchvision classification models are"):
        models.check_model_name("efficientnet")
