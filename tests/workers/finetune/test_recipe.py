"""workers.finetune.recipe, grouping, probe and the Wilson interval: the policy of the default recipe and of an
honest split, as plain logic (no Ray)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from schemas.finetune import FinetuneDataSpec, TrainingSpec
from tests.workers.finetune.test_data import examples
from workers.finetune.artifacts import wilson_interval
from workers.finetune.dataplan import grouped_split, stratified_split
from workers.finetune.grouping import near_duplicate_groups
from workers.finetune.probe import fit_linear_head
from workers.finetune.recipe import label_smoothing_for, plan_recipe


def test_a_tiny_set_gets_min_steps_by_repeating_within_its_epochs():
    recipe = plan_recipe(TrainingSpec(), train_images=130, world_size=1, probe_iterations=500)
    # 130 images at batch 32: 5 steps a pass; 5 epochs would be 25 steps, min_steps 200 asks for 40 an epoch.
    assert (recipe.epochs, recipe.steps_per_epoch, recipe.total_steps) == (5, 40, 200)
    assert recipe.samples_per_epoch == 40 * 32 and recipe.warmup_steps == 20
    assert [s.name for s in recipe.stages] == ["head", "full"] and recipe.label_smoothing == 0.0
    assert "repeated to reach min_steps 200" in recipe.notes


def test_a_large_set_is_seen_once_an_epoch_and_gets_label_smoothing():
    recipe = plan_recipe(TrainingSpec(method="full"), train_images=200_000, world_size=4, probe_iterations=500)
    assert recipe.steps_per_epoch == 50_000 // 32 + 1 and recipe.samples_per_epoch == 50_000
    assert [s.name for s in recipe.stages] == ["full"] and recipe.label_smoothing == 0.1
    full = recipe.stages[0]
    assert (full.head_lr, full.backbone_lr) == pytest.approx((1e-3, 1e-4))
    assert [label_smoothing_for(TrainingSpec(), n) for n in (999, 5_000, 10_000)] == [0.0, 0.05, 0.1]
    assert label_smoothing_for(TrainingSpec(label_smoothing=0.2), 10) == 0.2


def test_min_steps_zero_is_the_old_fixed_epoch_count():
    recipe = plan_recipe(TrainingSpec(method="full", min_steps=0), train_images=130, world_size=1,
                         probe_iterations=500)  # fmt: skip
    assert (recipe.steps_per_epoch, recipe.samples_per_epoch) == (5, 130)
    assert plan_recipe(TrainingSpec(method="linear-probe"), 130, 1, 500).total_steps == 0


def test_copies_and_near_copies_of_one_class_form_groups_and_different_classes_never_do():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 32)).astype(np.float32)
    embeddings = np.stack([base[0], base[0] + 0.01, base[1], base[2], base[3], base[3] + 0.01, base[4], base[5]])
    labels = [0, 0, 0, 1, 1, 0, 1, 1]  # image 5 is a near copy of image 4 but of another class
    sha = ["a", "b", "c", "d", "e", "f", "c", None]  # image 6 has image 2's bytes (another class: still joined)
    groups = near_duplicate_groups(labels, sha, embeddings, threshold=0.99)
    ids = groups.ids
    assert ids[0] == ids[1] and ids[2] == ids[6] and ids[4] != ids[5]
    assert len({ids[i] for i in (0, 2, 3, 4, 5, 7)}) == 6
    assert (groups.count, groups.duplicate_groups, groups.grouped_images) == (6, 2, 4)
    assert near_duplicate_groups(labels, [None] * 8, None, 0.99).count == 8


def test_the_grouped_split_keeps_groups_whole_and_equals_the_plain_split_without_duplicates():
    items = examples({"a": 20, "b": 10})
    singletons = list(range(len(items)))
    assert grouped_split(items, singletons, 0.2, seed=3) == stratified_split(items, 0.2, seed=3)

    group_ids = [i // 4 for i in range(len(items))]  # groups of four images, within a class
    train, val = grouped_split(items, group_ids, 0.2, seed=3)
    side = {e.key: "val" for e in val} | {e.key: "train" for e in train}
    for group in set(group_ids):
        assert len({side[e.key] for e, g in zip(items, group_ids, strict=True) if g == group}) == 1
    assert sum(e.label == "a" for e in val) == 4 and sum(e.label == "b" for e in val) <= 2
    assert FinetuneDataSpec(uri="/d").group_duplicates  # on by default

    one_blob = [0] * 20 + list(range(1, 11))  # class a's embeddings cannot tell its images apart
    train, val = grouped_split(items, one_blob, 0.2, seed=3)
    # Never split ungrouped (that validated copies of training images): class a stays in training whole.
    assert sum(e.label == "a" for e in val) == 0 and sum(e.label == "b" for e in val) == 2 and len(train) == 28
    # ... unless its identical-content groups (here every image alone) fit: then those keep copies together.
    train, val = grouped_split(items, one_blob, 0.2, seed=3, content_ids=list(range(30)))
    assert sum(e.label == "a" for e in val) == 4 and len(train) + len(val) == 30
    pairs = [i // 2 for i in range(20)] + list(range(10, 20))  # class a: every photo stored twice, 4 wanted
    train, val = grouped_split(items, one_blob, 0.2, seed=3, content_ids=pairs)
    side = {e.key: "val" for e in val} | {e.key: "train" for e in train}
    assert sum(e.label == "a" for e in val) == 4 and all(side[items[2 * i].key] == side[items[2 * i + 1].key]
                                                         for i in range(10))  # fmt: skip


def test_wilson_interval_is_honest_for_small_and_perfect_scores():
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and 0.69 < low < 0.73  # 10/10 is no proof of 100 %
    low, high = wilson_interval(80, 100)
    assert (round(low, 3), round(high, 3)) == (0.711, 0.867)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_the_convex_fit_separates_classes_in_well_under_a_second():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 64)) * 2
    labels = np.repeat(np.arange(3), 40)
    x = (centres[labels] + rng.normal(size=(120, 64))).astype(np.float32) + 5  # offset: the fit must centre
    started = time.perf_counter()
    head = fit_linear_head(x[::2], labels[::2], 3)
    assert time.perf_counter() - started < 2
    assert head.weight.shape == (3, 64) and head.bias.shape == (3,) and 0 < head.iterations <= 500
    assert (head.logits(x[1::2]).argmax(1) == labels[1::2]).mean() > 0.9
    stronger = fit_linear_head(x[::2], labels[::2], 3, l2=100.0)
    assert np.abs(stronger.weight).sum() < np.abs(head.weight).sum()  # l2 shrinks the weights


@pytest.mark.parametrize(
    ("method", "fits_probe", "needs_embeddings", "trains", "trains_from_probe"),
    [("lp-ft", True, True, True, True), ("full", False, False, True, False),
     ("linear-probe", True, True, False, False)],
)  # fmt: skip
def test_each_method_says_what_it_does(method, fits_probe, needs_embeddings, trains, trains_from_probe):
    m = TrainingSpec(method=method).method
    assert (m.fits_probe, m.needs_embeddings, m.trains, m.trains_from_probe) == (
        fits_probe, needs_embeddings, trains, trains_from_probe)  # fmt: skip
    recipe = plan_recipe(TrainingSpec(method=method), 130, 1, 500)
    assert [s.name for s in recipe.stages] == ["head"] * fits_probe + ["full"] * trains
