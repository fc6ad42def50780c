"""Refit's plain logic: grouped folds, out-of-fold scores, the recipe on every image, and when a job refits."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from schemas.finetune import REFIT_MAX_IMAGES, FinetuneJobSpec, Recipe, Stage
from workers.finetune.refit import FOLDS, folds_for, grouped_folds, l2_grid, refit_recipe, score_out_of_fold


def test_grouped_folds_keep_each_group_in_one_fold_and_spread_every_class():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [40, 25, 12])
    groups = np.arange(len(labels))
    groups[1:4] = groups[0]  # a group of four photos of one leaf
    groups[41:43] = groups[40]
    groups[rng.choice(np.flatnonzero(labels == 2), 2, replace=False)] = 70  # two byte-identical images
    folds = grouped_folds(labels, groups, FOLDS, seed=0)

    assert set(folds.tolist()) == set(range(FOLDS))
    for group in np.unique(groups):
        assert len(set(folds[groups == group].tolist())) == 1, group
    for label in (0, 1, 2):
        per_fold = np.bincount(folds[labels == label], minlength=FOLDS)
        assert per_fold.max() - per_fold.min() <= 4, (label, per_fold)  # the group of four is the widest gap
    assert np.array_equal(folds, grouped_folds(labels, groups, FOLDS, seed=0))  # seeded
    assert not np.array_equal(folds, grouped_folds(labels, groups, FOLDS, seed=1))


def test_fewer_folds_where_a_class_has_fewer_groups_than_five():
    labels = np.repeat([0, 1], [10, 6])
    groups = np.arange(16)
    groups[11:14] = 10  # class 1: groups {10,11,12,13}, {14}, {15}: three groups
    assert folds_for(labels, groups) == 3
    assert folds_for(labels, np.arange(16)) == FOLDS
    assert folds_for(np.array([0, 1]), np.array([0, 1])) == 2  # never below two


def test_out_of_fold_scores_count_only_readable_rows():
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    scores = score_out_of_fold(probabilities, labels, np.array([0, 1, 2]))  # row 3: unreadable
    assert (scores.correct, scores.images, scores.confusion) == (2, 3, ((1, 0), (1, 1)))
    assert scores.accuracy == pytest.approx(2 / 3)
    assert scores.log_loss == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.4)) / 3)


def test_the_l2_grid_holds_the_specs_own_penalty():
    assert l2_grid(1.0) == (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    assert 7.0 in l2_grid(7.0) and list(l2_grid(7.0)) == sorted(l2_grid(7.0))


def test_the_refit_recipe_covers_every_image_as_often_per_epoch_for_the_chosen_epochs():
    full = Stage(name="full", optimizer="AdamW", steps=200, head_lr=1e-4, backbone_lr=1e-4)
    recipe = Recipe(method="lp-ft", train_images=80, stages=(Stage(name="head", optimizer="L-BFGS", steps=40), full),
                    epochs=5, steps_per_epoch=40, samples_per_epoch=1280, warmup_steps=20, label_smoothing=0.0,
                    notes="")  # fmt: skip
    again = refit_recipe(recipe, all_images=100, epochs=2, world_size=1, batch_size=32)
    # 1280 samples over 80 images: 16 passes an epoch; over 100 images 1600 samples, 50 steps of 32
    assert (again.train_images, again.epochs, again.samples_per_epoch, again.steps_per_epoch) == (100, 2, 1600, 50)
    assert again.stages[1].steps == again.total_steps == 100 and again.warmup_steps == 20
    assert again.stages[0] == recipe.stages[0]
    two_ranks = refit_recipe(recipe.model_copy(update={"samples_per_epoch": 640}), 100, 2, world_size=2, batch_size=32)
    assert two_ranks.samples_per_epoch == 800  # per rank, as the recipe counts it
    odd = refit_recipe(recipe.model_copy(update={"samples_per_epoch": 80}), 97, 1, world_size=1, batch_size=32)
    assert odd.samples_per_epoch % 32 != 1  # never a last batch of one image (batch norm)


def _job(**training) -> FinetuneJobSpec:
    return FinetuneJobSpec(data={"uri": "/data/leaves"}, base={"name": "mobilenet_v2"}, output="/models/leaves",
                           training=training)  # fmt: skip


@pytest.mark.parametrize(
    ("training", "images", "refits"),
    [
        ({}, REFIT_MAX_IMAGES - 1, True),  # the default: auto, lp-ft
        ({}, REFIT_MAX_IMAGES, False),
        ({"method": "linear-probe"}, 10, True),
        ({"method": "full"}, 10, False),  # auto leaves full alone: no frozen embeddings to cross-validate on
        ({"refit": "always"}, 100_000, True),
        ({"refit": "never"}, 10, False),
    ],
)
def test_when_a_job_refits(training, images, refits):
    assert _job(**training).refits(images) is refits


def test_auto_keeps_a_given_validation_set_apart():
    spec = FinetuneJobSpec(data={"uri": "/data/leaves", "validation_uri": "/data/val"}, base={"name": "mobilenet_v2"},
                           output="/models/leaves")  # fmt: skip
    assert not spec.refits(10)


def test_refit_always_refuses_what_it_cannot_do_in_one_line():
    with pytest.raises(ValidationError, match="method full has none"):
        _job(method="full", refit="always")
    with pytest.raises(ValidationError, match="drop one of them"):
        FinetuneJobSpec(data={"uri": "/data/leaves", "validation_uri": "/data/val"}, base={"name": "mobilenet_v2"},
                        output="/models/leaves", training={"refit": "always"})  # fmt: skip


def test_refit_is_part_of_the_job_id():
    assert _job(refit="never").resolved_job_id() != _job().resolved_job_id()
