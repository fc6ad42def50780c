"""jobs/backbones.py: compare-backbones measures each base on one split of the labelled set; a base without weights
here is reported unavailable; the recommendation is plain logic."""

from __future__ import annotations

import shutil

import pytest

from jobs.backbones import compare_backbones, recommend
from jobs.cli import main
from schemas.ship import BackboneResult, CompareBackbonesSpec
from tests.support import PLANTS


def row(model: str, acc: float, ci: tuple[float, float], ms: float, gflops: float) -> BackboneResult:
    return BackboneResult(model=model, weights="DEFAULT", available=True, val_accuracy=acc, val_accuracy_ci95=ci,
                          val_images=40, ms_per_image=ms, gflops=gflops)  # fmt: skip


BIG = row("resnet50", 0.92, (0.80, 0.97), 40.0, 4.1)
SMALL = row("mobilenet_v2", 0.88, (0.75, 0.95), 8.0, 0.3)
POOR = row("squeeze", 0.60, (0.45, 0.74), 3.0, 0.35)
NONE = BackboneResult(model="efficientnet_b0", weights="DEFAULT", available=False, reason="not here")


def test_the_cheapest_base_not_measurably_worse_than_the_best_is_recommended():
    assert recommend([BIG, SMALL, POOR, NONE], None)[0] is SMALL  # its interval reaches the best's lower bound
    assert recommend([BIG, POOR], None)[0] is BIG  # the cheaper one is measurably worse
    assert recommend([BIG, SMALL, POOR], budget_ms=5)[0] is POOR  # the only one within the budget
    assert recommend([NONE], None) == (None, "no base measured")
    assert recommend([BIG], budget_ms=1) == (None, "none within 1 ms per image")


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_bases_are_measured_on_one_split_and_one_without_weights_is_unavailable(tmp_path):
    data = tmp_path / "plants"
    for name in ("Potato___Early_blight", "Potato___healthy", "Potato___Late_blight"):
        (data / name).mkdir(parents=True)
        for photo in sorted((PLANTS / name).iterdir())[:10]:
            shutil.copy(photo, data / name / photo.name)
    spec = CompareBackbonesSpec(data={"uri": str(data)}, bases=[{"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
                                                                {"name": "efficientnet_b0"}])  # fmt: skip
    result = compare_backbones(spec)
    measured, missing = result.rows
    assert measured.available and 0.5 < measured.val_accuracy <= 1 and measured.val_images == 6
    assert measured.val_accuracy_ci95[0] < measured.val_accuracy <= measured.val_accuracy_ci95[1]
    assert measured.embedding_width == 1280 and measured.gflops == pytest.approx(0.301) and measured.ms_per_image > 0
    assert not missing.available and "efficientnet_b0_rwightman" in missing.reason
    assert result.recommended is measured
    lines = result.lines()
    assert lines[2].startswith("mobilenet_v2:IMAGENET1K_V1") and "unavailable: weights file" in lines[3]
    assert lines[-1] == "recommended: mobilenet_v2 (the best held-out accuracy)"


def test_a_misspelt_base_is_one_line_before_any_work(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    assert main(["compare-backbones", "--data", str(tmp_path), "--bases", "mobilenet_v2,resnet5000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet5000" in err[0]
