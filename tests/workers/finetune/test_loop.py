"""workers.finetune.loop: the pieces of the per-worker loop that need no Ray (the loop itself runs in tests/jobs)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from schemas.finetune import EpochMetrics, FinetuneJobSpec, TrainingSpec, TrainingState
from schemas.specs import PreprocessSpec
from workers.finetune.data import DataPlan
from workers.finetune.loop import (
    Classifier,
    EpochTotals,
    Normalise,
    build_classifier,
    class_weights,
    lr_factor,
    next_state,
    param_groups,
    read_checkpoint,
    seed_for,
    write_checkpoint,
)
from workers.finetune.recipe import plan_recipe
from workers.label.inference import Predictor, PredictorOptions
from workers.models import LoadedModel

REAL_WEIGHTS = Path(torch.hub.get_dir(), "checkpoints", "mobilenet_v2-b0353104.pth")


def job(method: str = "full", weights: str | None = "IMAGENET1K_V1", **training) -> FinetuneJobSpec:
    return FinetuneJobSpec(
        data={"uri": "/data/plants"},
        base={"name": "mobilenet_v2", "weights": weights},
        output="/models/plants",
        training={"method": method, **training},
    )


@pytest.fixture(scope="module")
def pretrained_mobilenet(tmp_path_factory) -> tuple[Classifier, PreprocessSpec]:
    if not REAL_WEIGHTS.is_file():
        pytest.skip(f"{REAL_WEIGHTS} missing: run `python -m jobs.offline_weights`")
    return build_classifier(job(), 3, tmp_path_factory.mktemp("cache"))


def test_classifier_keeps_the_pretrained_backbone_and_adds_a_head_for_our_classes(pretrained_mobilenet):
    model, preprocess = pretrained_mobilenet
    imagenet = torch.load(REAL_WEIGHTS, weights_only=True)
    assert torch.equal(model.backbone.features[0][0].weight, imagenet["features.0.0.weight"])
    assert (model.head.in_features, model.head.out_features) == (1280, 3)
    assert (preprocess.resize_size, preprocess.crop_size) == (256, 224)
    model.eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 3)


def test_head_initialisation_is_seeded(tmp_path):
    first, _ = build_classifier(job(weights=None, seed=3), 4, tmp_path)
    again, _ = build_classifier(job(weights=None, seed=3), 4, tmp_path)
    other, _ = build_classifier(job(weights=None, seed=4), 4, tmp_path)
    assert torch.equal(first.head.weight, again.head.weight)
    assert torch.equal(first.backbone.features[0][0].weight, again.backbone.features[0][0].weight)
    assert not torch.equal(first.head.weight, other.head.weight)


def test_full_trains_the_backbone_slower_and_linear_probe_freezes_it(tmp_path):
    full = job("full", weights=None, learning_rate=1e-3, backbone_lr_scale=0.1)
    model, _ = build_classifier(full, 2, tmp_path)
    groups = param_groups(model, plan_recipe(full.training, 100, 1, 500))
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4])
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    lp_ft = job("lp-ft", weights=None, learning_rate=1e-3, backbone_lr_scale=0.1)
    groups = param_groups(model, plan_recipe(lp_ft.training, 100, 1, 500))
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1e-4])  # the fitted head moves as slowly

    probe = job("linear-probe", weights=None)
    model, _ = build_classifier(probe, 2, tmp_path)
    assert [p.shape for p in model.parameters() if p.requires_grad] == [(2, 1280), (2,)]
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_learning_rate_warms_up_then_follows_a_cosine_to_zero():
    factors = [lr_factor(step, total_steps=100, warmup_steps=10) for step in range(100)]
    assert factors[:3] == pytest.approx([0.1, 0.2, 0.3])
    assert factors[9] == pytest.approx(1.0) and factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(0.5, abs=0.01)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    assert factors[-1] < 0.001
    assert lr_factor(0, total_steps=10, warmup_steps=0) == pytest.approx(1.0)


def test_balanced_class_weights_make_every_class_weigh_the_same():
    plan = DataPlan(class_names=("a", "b"), train=((("x"), 0),) * 30 + (("y", 1),) * 10, val=(), fingerprint="f",
                    split_rows=())  # fmt: skip
    weights = class_weights(plan, "balanced")
    assert weights.tolist() == pytest.approx([40 / 60, 40 / 20])
    assert float(weights[0] * 30) == pytest.approx(float(weights[1] * 10))
    assert class_weights(plan, "none") is None


def _epoch(n: int, val_loss: float) -> EpochMetrics:
    return EpochMetrics(epoch=n, train_loss=1, train_accuracy=0.5, val_loss=val_loss, val_accuracy=0.5,
                        learning_rate=1e-3, seconds=2)  # fmt: skip


def test_best_epoch_is_the_lowest_validation_loss_and_patience_stops_early():
    spec = TrainingSpec(epochs=10, early_stopping_patience=2)
    state = TrainingState()
    for n, loss in enumerate([0.9, 0.5, 0.6, 0.55], start=1):
        state = next_state(state, _epoch(n, loss), [[n, 0], [0, 1]], spec)
    assert (state.best_epoch, state.best_val_loss, state.best_confusion) == (2, 0.5, ((2, 0), (0, 1)))
    assert state.stopped_early and state.finished(10) and state.epochs_done == 4
    assert state.train_seconds == 8 and [m.epoch for m in state.history] == [1, 2, 3, 4]

    no_patience = TrainingSpec(epochs=10, early_stopping_patience=0)
    state = TrainingState()
    for n in range(1, 6):
        state = next_state(state, _epoch(n, n), [[1]], no_patience)
    assert not state.stopped_early and state.best_epoch == 1


def test_checkpoint_restores_model_optimiser_and_state(tmp_path):
    spec = job(weights=None)
    model, _ = build_classifier(spec, 2, tmp_path / "cache")
    optimizer = torch.optim.AdamW(param_groups(model, plan_recipe(spec.training, 10, 1, 500)))
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    best = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    state = next_state(TrainingState(), _epoch(1, 0.4), [[1, 0], [0, 1]], spec.training)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_checkpoint(folder, model, best, optimizer, state)

    fresh, _ = build_classifier(job(weights=None, seed=9), 2, tmp_path / "cache")
    fresh_optimizer = torch.optim.AdamW(param_groups(fresh, plan_recipe(spec.training, 10, 1, 500)))
    restored, restored_best = read_checkpoint(folder, fresh, fresh_optimizer)

    assert restored == state
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(),
                                                  strict=True))  # fmt: skip
    assert torch.equal(restored_best["head.weight"], best["head.weight"])
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1


def test_evaluation_normalises_exactly_like_the_label_path(pretrained_mobilenet):
    """The card's accuracy must be what a label job measures: same normalisation, same logits."""
    model, preprocess = pretrained_mobilenet
    model.eval()
    pixels = np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    normalise = Normalise(preprocess, torch.device("cpu"))
    with torch.inference_mode():
        ours = torch.softmax(model(normalise(torch.from_numpy(pixels).permute(0, 3, 1, 2))), 1)
    loaded = LoadedModel(model.backbone, model.head, ["a", "b", "c"], preprocess, "test:v1")
    label_path = Predictor(loaded, torch.device("cpu"), PredictorOptions(precision="fp32", top_k=3, embeddings=False))(
        pixels
    )
    ours_sorted = ours.sort(dim=1, descending=True)
    np.testing.assert_array_equal(label_path.topk_indices, ours_sorted.indices.numpy())
    np.testing.assert_allclose(label_path.topk_scores, ours_sorted.values.numpy(), atol=1e-5)


def test_epoch_totals_average_over_images():
    totals = EpochTotals()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    totals.add(torch.tensor(0.5), logits[:2], torch.tensor([0, 0]))
    totals.add(torch.tensor(2.0), logits[2:], torch.tensor([0]))
    assert (totals.count, totals.correct) == (3, 2)
    assert totals.loss == pytest.approx((0.5 * 2 + 2.0) / 3) and totals.accuracy == pytest.approx(2 / 3)
    assert totals.all_reduce(torch.device("cpu")) is totals  # no process group: nothing to reduce


def test_seeds_differ_per_epoch_and_rank_and_stay_in_range():
    seeds = {seed_for(7, epoch, rank) for epoch in range(1, 50) for rank in range(8)}
    assert len(seeds) == 49 * 8
    assert all(0 <= s < 2**63 for s in seeds) and not math.isnan(float(seed_for(2**40, 10**6, 3)))
