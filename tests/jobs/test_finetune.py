"""Fine-tune jobs end to end on the session's Ray cluster: train → artifact → label job, resume after a kill,
other architectures, S3. Data sets are a few PlantVillage photos per class, so each job takes seconds of training;
the full-size accuracy run is `python -m bench.finetune`."""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import torch
import yaml
from torchvision.models import get_model

from jobs.cli import main
from jobs.errors import EXIT_BAD_INPUT
from jobs.finetune import ResumeConflict, run_finetune_job, run_storage
from jobs.label.runner import run_label_job
from schemas.finetune import FinetuneJobSpec
from schemas.outcome import Outcome
from schemas.specs import LabelJobSpec, ModelSpec
from tests.support import PLANTS, write_torchvision_weights
from tests.workers.finetune.racers import publish_when_released
from workers.finetune.artifacts import SPLIT_NAME, find_job_artifact, read_card, sha256_of, versions
from workers.finetune.data import Example, FinetuneDataError, plan_data, stratified_split
from workers.io.storage import join, open_storage
from workers.models import build_model

pytestmark = pytest.mark.slow  # Ray Train runs: among the suite's longest

CLASSES = ("Potato___Early_blight", "Potato___healthy")
RESUME_JOB_ID = "resume-test"


@pytest.fixture(scope="module")
def leaves(tmp_path_factory) -> Path:
    """10 photos of each of two PlantVillage classes, a folder per class."""
    root = tmp_path_factory.mktemp("leaves")
    for name in CLASSES:
        (root / name).mkdir()
        for photo in sorted((PLANTS / name).iterdir())[:10]:
            shutil.copy(photo, root / name / photo.name)
    return root


def _spec(data_uri: str, output: str, **fields) -> FinetuneJobSpec:
    # refit never: these tests check the validation split's figures; refit has its own tests below
    training = {"method": "full", "epochs": 2, "image_size": 96, "batch_size": 8, "refit": "never",
                **fields.pop("training", {})}  # fmt: skip
    base = fields.pop("base", {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"})
    data = {"uri": data_uri, **fields.pop("data", {})}
    return FinetuneJobSpec(data=data, base=base, output=output, training=training, **fields)


def _validation_manifest(artifact: Path, folder: Path) -> tuple[Path, dict[str, str]]:
    """A label-job manifest of the artifact's validation images, and their true classes."""
    with open(artifact / SPLIT_NAME, newline="") as fh:
        truth = {row["key"]: row["label"] for row in csv.DictReader(fh) if row["split"] == "val"}
    manifest = folder / "validation.csv"
    manifest.write_text("key\n" + "".join(f"{key}\n" for key in truth))
    return manifest, truth


def _with_copies(leaves: Path, folder: Path, copies: int) -> tuple[Path, dict[str, str]]:
    """The leaves plus byte-identical copies of the first `copies` photos of each class; {copy: original}."""
    data = folder / "leaves"
    shutil.copytree(leaves, data)
    originals = {}
    for name in CLASSES:
        for photo in sorted((data / name).iterdir())[:copies]:
            copy = photo.with_name(f"copy-{photo.name}")
            shutil.copy(photo, copy)
            originals[str(copy)] = str(photo)
    return data, originals


@pytest.mark.usefixtures("ray_cluster")
def test_default_recipe_fits_the_head_first_keeps_copies_on_one_side_and_labels_with_the_card_accuracy(
    leaves, tmp_path
):
    """The default (lp-ft): head fitted on frozen features (epoch 0), then every layer for at least min_steps; the
    split keeps byte-identical copies with their originals; the artifact labels its validation images with the
    card's accuracy."""
    data, originals = _with_copies(leaves, tmp_path, copies=3)
    spec = _spec(str(data), str(tmp_path / "models" / "leaves"), training={"method": "lp-ft", "min_steps": 6})
    assert FinetuneJobSpec.model_fields["training"].default.method == "lp-ft"  # the default recipe

    summary = run_finetune_job(spec, show_progress=False)

    card, artifact = summary.card, Path(summary.artifact)
    assert (summary.status, artifact, card.artifact_id) == ("succeeded", tmp_path / "models" / "leaves" / "v1",
                                                            "leaves:v1")  # fmt: skip
    assert card.class_names == list(CLASSES) and card.epochs_run == 2
    assert [m.epoch for m in card.metrics.history] == [0, 1, 2]  # epoch 0: the fitted head, before any training
    recipe = card.recipe
    assert [s.name for s in recipe.stages] == ["head", "full"] and recipe.stages[0].steps > 0
    # 20 training images at batch 8 are 3 steps a pass; min_steps 6 over 2 epochs asks for no more.
    assert (recipe.steps_per_epoch, recipe.stages[1].steps, recipe.label_smoothing) == (3, 6, 0.0)
    assert recipe.stages[1].head_lr == recipe.stages[1].backbone_lr == pytest.approx(1e-4)
    assert (card.dataset.train_images, card.dataset.val_images) == (20, 6)
    assert (card.dataset.duplicate_groups, card.dataset.grouped_images) == (6, 12)
    assert card.dataset.groups == 20
    with open(artifact / SPLIT_NAME, newline="") as fh:
        side = {row["key"]: row["split"] for row in csv.DictReader(fh)}
    assert all(side[copy] == side[original] for copy, original in originals.items())
    assert (card.preprocess.resize_size, card.preprocess.crop_size) == (110, 96)  # the preset's 256/224 ratio
    m = card.metrics
    assert sum(map(sum, m.confusion_matrix)) == m.val_images == 6
    assert m.val_accuracy_ci95[0] <= m.val_accuracy <= m.val_accuracy_ci95[1]
    text = "\n".join(summary.lines())
    assert "rough: only 6 validation images" in text and "6 near-duplicate group(s) (12 images)" in text
    assert not (tmp_path / "models" / "leaves" / "_checkpoints").exists()  # removed once published

    manifest, truth = _validation_manifest(artifact, tmp_path)
    # split.csv's keys are the training data's own locations, outside the manifest's folder: allowed by name.
    label_spec = LabelJobSpec(input={"uri": str(manifest), "format": "manifest", "allowed_roots": [str(data)]},
                              output=str(tmp_path / "labels"), model={"name": str(artifact)}, top_k=2,
                              num_workers=1)  # fmt: skip
    assert run_label_job(label_spec, show_progress=False).images == 6
    rows = ds.dataset(tmp_path / "labels", format="parquet").to_table().to_pylist()
    assert {r["model"] for r in rows} == {"leaves:v1"} and {r["label"] for r in rows} <= set(CLASSES)
    accuracy = sum(truth[r["key"]] == r["label"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(card.metrics.val_accuracy)

    again = run_finetune_job(spec, show_progress=False)
    assert (again.status, again.artifact) == (Outcome.ALREADY_COMPLETE, summary.artifact)
    assert set(versions(_local(), spec.output)) == {1}


@pytest.mark.usefixtures("ray_cluster")
def test_linear_probe_is_a_convex_fit_on_one_pass_of_embeddings_and_labels_like_its_card(leaves, tmp_path):
    """linear-probe: one forward pass, an L-BFGS fit of the head in well under a second; the artifact is the base
    model's own backbone with that head, in the usual format, and a label job reproduces the card's accuracy."""
    spec = _spec(str(leaves), str(tmp_path / "models" / "probe"), training={"method": "linear-probe"})

    summary = run_finetune_job(spec, show_progress=False)

    card, artifact = summary.card, Path(summary.artifact)
    assert [(s.name, s.optimizer.split()[0]) for s in card.recipe.stages] == [("head", "L-BFGS")]
    assert 0 < card.recipe.stages[0].steps <= 500 and card.epochs_run == 0
    assert [m.epoch for m in card.metrics.history] == [0] and card.metrics.best_epoch == 0
    assert card.train_seconds < 30  # the embedding pass and the fit; epochs through the backbone took minutes
    from safetensors.torch import load_file

    weights = load_file(str(artifact / card.weights_file))
    imagenet = torch.load(Path(torch.hub.get_dir(), "checkpoints", "mobilenet_v2-b0353104.pth"), weights_only=True)
    assert torch.equal(weights["backbone.features.0.0.weight"], imagenet["features.0.0.weight"])  # frozen
    assert weights["head.weight"].shape == (2, 1280)

    manifest, truth = _validation_manifest(artifact, tmp_path)
    label_spec = LabelJobSpec(input={"uri": str(manifest), "format": "manifest", "allowed_roots": [str(leaves)]},
                              output=str(tmp_path / "labels"), model={"name": str(artifact)}, top_k=2,
                              num_workers=1)  # fmt: skip
    assert run_label_job(label_spec, show_progress=False).images == card.metrics.val_images == 4
    rows = ds.dataset(tmp_path / "labels", format="parquet").to_table().to_pylist()
    accuracy = sum(truth[r["key"]] == r["label"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(card.metrics.val_accuracy)


@pytest.mark.usefixtures("ray_cluster")
def test_a_refitted_linear_probe_saw_every_image_and_its_card_scores_each_one_out_of_fold(leaves, tmp_path):
    """refit (auto: 20 images): the head's L2 chosen by grouped 5-fold cross-validation, the published head fitted on
    all 20 images, and the card's accuracy the out-of-fold one, over all 20 rather than the 4 a split holds out."""
    spec = _spec(str(leaves), str(tmp_path / "models" / "probe"), training={"method": "linear-probe", "refit": "auto"})
    held = _spec(str(leaves), str(tmp_path / "models" / "held"), training={"method": "linear-probe"})

    summary, without = run_finetune_job(spec, show_progress=False), run_finetune_job(held, show_progress=False)

    card, refit = summary.card, summary.card.recipe.refit
    assert without.card.recipe.refit is None and without.card.metrics.val_images == 4
    assert (refit.images, refit.estimate, refit.folds) == (20, "cross-validation", 5)
    assert refit.probe_l2 in refit.probe_l2_grid and refit.cv_accuracy == pytest.approx(card.metrics.val_accuracy)
    assert card.metrics.val_images == sum(map(sum, card.metrics.confusion_matrix)) == 20
    assert card.metrics.val_accuracy_ci95 == refit.cv_accuracy_ci95
    assert "published model trained on all 20 images" in "\n".join(summary.lines())
    from safetensors.torch import load_file

    heads = [load_file(str(Path(s.artifact) / s.card.weights_file))["head.weight"] for s in (summary, without)]
    assert not torch.equal(*heads)  # fitted on 20 images, not on the split's 16


@pytest.mark.usefixtures("ray_cluster")
def test_lp_ft_refits_by_default_on_a_small_set_after_its_validation_run(leaves, tmp_path):
    """The default recipe on 20 images (auto): the validation run, then the recipe again on every image for the
    epochs that run found best; the card keeps the validation run's figures and says what the refit did."""
    spec = _spec(str(leaves), str(tmp_path / "models" / "leaves"),
                 training={"method": "lp-ft", "refit": "auto", "epochs": 2, "min_steps": 3})  # fmt: skip

    summary = run_finetune_job(spec, show_progress=False)

    card, refit = summary.card, summary.card.recipe.refit
    assert (refit.images, refit.estimate, refit.epochs) == (20, "holdout", card.metrics.best_epoch)
    assert card.metrics.val_images == card.dataset.val_images == 4 and card.dataset.train_images == 16
    assert [m.epoch for m in card.metrics.history] == [0, 1, 2]  # the validation run's curve
    assert "published model trained on all 20 images" in "\n".join(summary.lines())
    assert not (tmp_path / "models" / "leaves" / "_checkpoints").exists()


def _planted_holdout(spec: FinetuneJobSpec, best_epoch: int) -> float:
    """A finished validation run's state where a refit keeps it (as if the job was killed after it): returns the
    planted validation accuracy, which no real run on the leaves would give."""
    from workers.finetune.data import scaled_preprocess
    from workers.models import preprocess_of, weights_entry

    epochs = [{"epoch": e, "train_loss": 0.5, "train_accuracy": 0.75, "val_loss": 0.6 - e / 10, "val_accuracy": 0.625,
               "learning_rate": 1e-4, "seconds": 1.0} for e in range(best_epoch + 1)]  # fmt: skip
    state = {
        "epochs_done": best_epoch,
        "history": epochs,
        "best_epoch": best_epoch,
        "best_val_loss": 0.5,
        "best_confusion": [[3, 1], [2, 2]],
        "train_seconds": 2.0,
        "preprocess": scaled_preprocess(preprocess_of(weights_entry(spec.base)), 96).model_dump(),
    }
    folder = Path(spec.output, "_checkpoints", spec.resolved_job_id())
    folder.mkdir(parents=True)
    (folder / "_holdout.json").write_text(json.dumps(state))
    return 0.625


@pytest.mark.parametrize("best_epoch", [0, 1])
@pytest.mark.usefixtures("ray_cluster")
def test_a_refit_after_its_validation_run_trains_on_every_image_for_the_best_epochs(leaves, tmp_path, best_epoch):
    """lp-ft with refit, restarted after its validation run finished (its state planted where the run keeps it):
    that run is not repeated; the card's figures are its held-out ones; the published model is the recipe trained
    on all 20 images for the validation run's best epochs, or for none (its best was the fitted head): the head
    fitted on all 20 on the untouched ImageNet backbone."""
    spec = _spec(str(leaves), str(tmp_path / "models" / "leaves"),
                 training={"method": "lp-ft", "refit": "always", "epochs": 2, "min_steps": 3})  # fmt: skip
    accuracy = _planted_holdout(spec, best_epoch)

    summary = run_finetune_job(spec, show_progress=False)

    card, refit = summary.card, summary.card.recipe.refit
    assert (card.metrics.val_accuracy, card.metrics.best_epoch) == (accuracy, best_epoch)  # the planted run's
    assert (refit.images, refit.estimate, refit.epochs) == (20, "holdout", best_epoch)
    assert (refit.steps > 0) is (best_epoch > 0)
    assert not (tmp_path / "models" / "leaves" / "_checkpoints").exists()
    from safetensors.torch import load_file

    weights = load_file(str(Path(summary.artifact) / card.weights_file))
    imagenet = torch.load(Path(torch.hub.get_dir(), "checkpoints", "mobilenet_v2-b0353104.pth"), weights_only=True)
    frozen = torch.equal(weights["backbone.features.0.0.weight"], imagenet["features.0.0.weight"])
    assert frozen is (best_epoch == 0)


@pytest.mark.fault(
    fault="fine-tune data with photos stored twice (`x.JPG`, `x (1).JPG`) and an unreadable image where the split "
    "would put a class's only validation image",
    injected="class 1: 3 photos each stored twice, byte-identical; class 2: 4 photos and a text file named .JPG "
    "at the key the seeded split picks for validation; a linear-probe fine-tune",
    expected="no validation image has a byte-identical twin in training: class 1 is not validated, named in a "
    "warning and the card (shortfall counted); the unreadable file is left out before the split, so class 2 is "
    "validated on a readable photo; the card's two validation counts agree; macro F1 over validated classes only",
)
@pytest.mark.usefixtures("ray_cluster")
def test_copies_and_an_unreadable_image_never_fake_a_validation_score(leaves, tmp_path, caplog, record_property):
    copied, plain = CLASSES
    data = tmp_path / "data"
    (data / copied).mkdir(parents=True)
    (data / plain).mkdir()
    for photo in sorted((leaves / copied).iterdir())[:3]:
        shutil.copy(photo, data / copied / photo.name)
        shutil.copy(photo, data / copied / f"{photo.stem} (1){photo.suffix}")
    names = [p.name for p in sorted((leaves / plain).iterdir())[:5]]
    keys = [Example(f"{plain}/{n}", "", plain, None) for n in names]
    bad = stratified_split(keys, 0.2, seed=0)[1][0].key.split("/")[1]  # the seeded split's one validation pick
    for name in names:
        (data / plain / name).write_bytes(
            b"<html>not found</html>" if name == bad else (leaves / plain / name).read_bytes()
        )
    spec = _spec(str(data), str(tmp_path / "models" / "twice"), training={"method": "linear-probe"})
    planner = logging.getLogger("workers.finetune.dataplan")  # its warning, whether or not "workers" propagates
    planner.addHandler(caplog.handler)
    try:
        summary = run_finetune_job(spec, show_progress=False)
    finally:
        planner.removeHandler(caplog.handler)

    card, artifact = summary.card, Path(summary.artifact)
    with open(artifact / SPLIT_NAME, newline="") as fh:
        split = [(row["key"], row["split"]) for row in csv.DictReader(fh)]
    digest = {key: sha256_of(Path(key)) for key, _ in split}
    trained = {digest[key] for key, side in split if side == "train"}
    assert not [key for key, side in split if side == "val" and digest[key] in trained]  # no copy validated
    assert str(data / plain / bad) not in dict(split)  # left out before the split, not a validation place
    d, m = card.dataset, card.metrics
    assert d.unvalidated_classes == [copied] and d.val_shortfall == 1
    assert d.val_per_class == {copied: 0, plain: 1} and d.train_per_class == {copied: 6, plain: 3}
    assert d.val_images == m.val_images == 1 and d.skipped_images == 1 and bad in d.skipped_examples[0]
    assert m.macro_f1_classes == [plain] and m.macro_f1 == m.per_class[1].f1
    assert copied in caplog.text and "without a validation image" in caplog.text
    text = "\n".join(summary.lines())
    assert f"not validated: {copied}" in text and "1 image(s) fewer" in text and "1 unreadable left out" in text
    record_property("measured", f"{copied}: 6 training, 0 validation (shortfall {d.val_shortfall}), named in the "
                                f"card and a warning; {plain}: {d.train_per_class[plain]} training + 1 validation, "
                                f"the unreadable file left out; card val images {d.val_images} = metrics "
                                f"{m.val_images}; macro F1 over {m.macro_f1_classes}")  # fmt: skip


def _local():
    from workers.io.storage import LocalStorage

    return LocalStorage()


@pytest.mark.fault(
    fault="a fine-tune run killed after an epoch, then run again",
    injected="SIGKILL to the `bulklabel run` driver (its process group) once the first epoch's checkpoint exists",
    expected="the re-run resumes after the checkpointed epoch, not from scratch; one version published, full history",
)
@pytest.mark.usefixtures("ray_cluster")
def test_a_killed_run_resumes_from_its_last_checkpoint(leaves, ray_cluster, tmp_path, record_property):
    """The driver is killed (SIGKILL, no clean-up) once the first epoch's checkpoint exists; the same job started
    again continues after that epoch instead of starting over."""
    output = tmp_path / "models"
    # A few steps an epoch (the default min_steps, 200, would make this test minutes long): enough that the run is
    # still training when the first epoch's checkpoint appears.
    spec = _spec(str(leaves), str(output), job_id=RESUME_JOB_ID, training={"epochs": 3, "min_steps": 12})
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json", exclude_none=True)))
    snapshot = output / "_checkpoints" / RESUME_JOB_ID / "checkpoint_manager_snapshot.json"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address_info["address"]}  # the session's cluster

    first = subprocess.Popen([sys.executable, "-m", "jobs.cli", "run", str(spec_file), "--quiet"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not snapshot.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert snapshot.exists(), f"no checkpoint within 240 s (driver exit code {first.poll()})"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not (output / "v1").exists()  # killed before it could finish

    summary = run_finetune_job(spec, show_progress=False)

    card = summary.card
    assert summary.status == "succeeded" and card.epochs_run == 3
    assert [m.epoch for m in card.metrics.history] == [1, 2, 3]
    (resumed_after,) = card.resumed_after_epochs
    assert 1 <= resumed_after < 3
    assert f"resumed after epoch(s) [{resumed_after}]" in "\n".join(summary.lines())
    assert sorted(p.name for p in output.iterdir() if p.name.startswith("v")) == ["v1"]
    record_property("measured", f"killed with no v1 published; re-run resumed after epoch {resumed_after} of 3, "
                                f"published v1 with history epochs 1-3")  # fmt: skip


@pytest.mark.parametrize(
    ("arch", "method", "storage_root"),
    [("resnet18", "linear-probe", "local"), ("efficientnet_b0", "full", "s3")],
    indirect=["storage_root"],
)
@pytest.mark.usefixtures("ray_cluster")
def test_other_architectures_fine_tune_end_to_end(arch, method, storage_root, leaves, tmp_path):
    """Generated torchvision-format weights (real ones cannot be downloaded here); data, checkpoints and the
    artifact on the parametrized backend (S3 checkpoints go through Ray Train's pyarrow filesystem). The ResNet is
    ResNet-18, not 50: the same family and head, a quarter of the weights to generate, load and checkpoint."""
    weights = write_torchvision_weights(arch, tmp_path / "weights")
    data = join(storage_root.uri, "data")
    for name in CLASSES:
        for photo in sorted((leaves / name).iterdir())[:4]:
            storage_root.storage.upload_file(str(photo), join(data, name, photo.name))
    spec = _spec(data, join(storage_root.uri, "models"), base={"name": arch, "weights": str(weights)},
                 data={"val_fraction": 0.25}, storage=storage_root.options or {},
                 training={"method": method, "epochs": 1, "image_size": 64, "batch_size": 4,
                           "min_steps": 0})  # one pass: the test is about the architecture, not the recipe  # fmt: skip

    summary = run_finetune_job(spec, show_progress=False)

    card = summary.card
    assert (summary.status, card.architecture, card.base_weights) == ("succeeded", arch, str(weights))
    assert (card.dataset.train_images, card.dataset.val_images, card.training.method) == (6, 2, method)
    assert read_card(summary.artifact, storage_root.options) == card
    loaded = build_model(ModelSpec(name=summary.artifact), storage_root.options, tmp_path / "cache")
    assert (loaded.categories, loaded.head.out_features) == (list(CLASSES), 2)
    assert loaded.embedding_dim == {"resnet18": 512, "efficientnet_b0": 1280}[arch]
    assert not list(storage_root.storage.list(join(storage_root.uri, "models", "_checkpoints", summary.job_id)))


def test_data_problems_fail_before_any_training(leaves, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(leaves, data)
    for photo in sorted((data / CLASSES[1]).iterdir())[1:]:
        photo.unlink()  # one image left in that class

    with pytest.raises(FinetuneDataError, match=rf"too few in: '{CLASSES[1]}' \(1\)"):
        run_finetune_job(_spec(str(data), str(tmp_path / "out")), show_progress=False)

    code = main(["finetune", "--data", str(data), "--base", "mobilenet_v2", "--output", str(tmp_path / "out")])
    assert code == EXIT_BAD_INPUT and "too few in" in capsys.readouterr().err
    assert not (tmp_path / "out" / "v1").exists()


@pytest.mark.fault(
    fault="a fine-tune labels file naming files outside its folder: `/etc/hostname`, a JPEG of another folder",
    injected="labels.csv beside two class folders of photos, plus the key /etc/hostname and the absolute path of a "
    "photo in a sibling folder; `bulklabel run` of a finetune spec; then the same with that folder in allowed_roots",
    expected="refused before any work (exit 2, one line naming both keys), as a label manifest's keys are; with "
    "the folder allowed, only /etc/hostname is refused",
)
def test_a_labels_file_naming_files_outside_its_folder_is_refused(leaves, tmp_path, capsys, record_property):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    shutil.copytree(leaves, data)
    elsewhere.mkdir()
    stray = shutil.copy(sorted((leaves / CLASSES[0]).iterdir())[-1], elsewhere / "other.JPG")
    rows = [f"{p.relative_to(data)},{p.parent.name}" for p in sorted(data.glob("*/*"))]
    (data / "labels.csv").write_text("key,label\n" + "\n".join([*rows, f"/etc/hostname,{CLASSES[1]}",
                                                                  f"{stray},{CLASSES[0]}"]) + "\n")  # fmt: skip
    spec = {"kind": "finetune", "data": {"uri": str(data / "labels.csv")},
            "base": {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}, "output": str(tmp_path / "out")}  # fmt: skip
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    started = time.perf_counter()

    code = main(["run", str(tmp_path / "job.yaml")])

    elapsed, err = time.perf_counter() - started, capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and err.count("\n") == 1, err
    assert "2 key(s) lie outside" in err and "'/etc/hostname'" in err and repr(str(stray)) in err, err
    assert not (tmp_path / "out" / "v1").exists()
    spec["data"]["allowed_roots"] = [str(elsewhere)]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml")]) == EXIT_BAD_INPUT
    allowed = capsys.readouterr().err
    assert "1 key(s) lie outside" in allowed and "/etc/hostname" in allowed and str(stray) not in allowed, allowed
    record_property("measured", f"exit 2 in {elapsed:.1f} s naming both keys, no version written; with the folder in "
                                "allowed_roots: exit 2 naming /etc/hostname alone")  # fmt: skip


def test_a_spec_file_of_kind_finetune_parses_to_a_finetune_job(tmp_path):
    from jobs.kinds import load_job_spec

    (tmp_path / "job.yaml").write_text(
        "kind: finetune\ndata: {uri: ./plants}\nbase: {name: resnet50, weights: IMAGENET1K_V2}\n"
        "output: ./models/plants\ntraining: {method: linear-probe, epochs: 3}\n"
    )
    spec = load_job_spec(tmp_path / "job.yaml")
    assert isinstance(spec, FinetuneJobSpec)
    assert (spec.training.method, spec.training.epochs, spec.artifact_name()) == ("linear-probe", 3, "plants")
    with pytest.raises(ValueError, match="must not overlap"):
        FinetuneJobSpec(data={"uri": str(tmp_path)}, base={"name": "resnet50"}, output=str(tmp_path / "models"))


def test_checkpoints_of_another_spec_are_not_resumed(leaves, tmp_path):
    spec = _spec(str(leaves), str(tmp_path / "out"), job_id="fixed-id")
    run_folder = tmp_path / "out" / "_checkpoints" / "fixed-id"
    run_folder.mkdir(parents=True)
    (run_folder / "_run.json").write_text(json.dumps({"spec": "0" * 64, "data": "1" * 64}))

    with pytest.raises(ResumeConflict, match="from a different spec and data; use another job_id"):
        run_finetune_job(spec, show_progress=False)


def test_s3_checkpoints_go_through_a_pyarrow_filesystem_at_the_spec_endpoint(s3_server, s3_prefix):
    output = join(s3_prefix, "models")
    path, filesystem = run_storage(_spec("s3://data/leaves/", output, storage=s3_server.options()))

    assert path == join(s3_prefix, "models", "_checkpoints").removeprefix("s3://")
    with filesystem.open_output_stream(f"{path}/probe") as out:  # what Ray Train does with it
        out.write(b"written by pyarrow")
    storage = open_storage(output, s3_server.options())
    assert storage.read_bytes(join(output, "_checkpoints", "probe")) == b"written by pyarrow"
    assert run_storage(_spec("/data/leaves", "/models/leaves")) == ("/models/leaves/_checkpoints", None)


@pytest.mark.fault(
    fault="two fine-tunes publishing to one output at the same moment",
    injected="two processes publish two fine-tuned MobileNetV2 models (trained-size weights, real data plan) into one "
    "output, released together, each listing the versions before either claims one; local folder and S3",
    expected="two versions, v1 and v2, each card beside its own weights (sha256 matches) and each loads as its model",
)
def test_two_fine_tunes_publishing_at_the_same_moment_get_two_versions(storage_root, leaves, tmp_path,
                                                                       record_property):  # fmt: skip
    """Before versions were claimed, both were told v1: locally the card of one sat beside the other's weights (the
    artifact then refused to load), on S3 one model replaced the other. Two real fine-tune jobs started together
    took 79 s here (two drivers, two Ray Train starts on 2 cores), so the two publishers are driven directly, each
    in its own process, with what a finished MobileNetV2 run hands to `publish`, and held after listing the versions
    until both have listed: the interleaving that gave both v1, made certain."""
    output = join(storage_root.uri, "models")
    racers = {}
    for job_id, seed in (("race-a", 1), ("race-b", 2)):
        spec = _spec(str(leaves), output, job_id=job_id, storage=storage_root.options or {},
                     training={"epochs": 1, "image_size": 64, "seed": seed})  # fmt: skip
        racers[job_id] = (spec, *_finished_run(spec, tmp_path / job_id))
    context = multiprocessing.get_context("spawn")  # fork would copy this process's torch and Ray threads
    start, listed = context.Barrier(len(racers) + 1), context.Barrier(len(racers))
    processes = {job_id: context.Process(target=publish_when_released, args=(spec, plan, weights, state, start, listed,
                                                                           tmp_path / f"{job_id}.log"))
                 for job_id, (spec, _, plan, weights, state) in racers.items()}  # fmt: skip
    for process in processes.values():
        process.start()
    start.wait(timeout=120)  # both imported and ready: released at the same moment
    released = time.monotonic()
    for process in processes.values():
        process.join(timeout=120)
    seconds = time.monotonic() - released
    assert [p.exitcode for p in processes.values()] == [0, 0]

    found = {job_id: find_job_artifact(storage_root.storage, output, job_id) for job_id in racers}
    assert sorted(f[0].rsplit("/", 1)[-1] if f else "none" for f in found.values()) == ["v1", "v2"]
    published = {job_id: f[0] for job_id, f in found.items()}
    lost = sum((tmp_path / f"{job_id}.log").read_text().count("claimed by another run first") for job_id in racers)
    assert lost == 1  # both tried v1 (they had listed the same versions); one won it, the other took v2
    x = torch.rand(2, 3, 64, 64)
    for job_id, location in published.items():
        card, model = read_card(location, storage_root.options), racers[job_id][1]
        weights = tmp_path / f"{job_id}-published.safetensors"
        weights.write_bytes(storage_root.storage.read_bytes(join(location, card.weights_file)))
        assert card.job_id == job_id and sha256_of(weights) == card.weights_sha256
        loaded = build_model(ModelSpec(name=location), storage_root.options, tmp_path / "cache" / job_id)
        with torch.inference_mode():
            torch.testing.assert_close(loaded.head(loaded.backbone(x)), model(x))
    backend = "s3" if storage_root.uri.startswith("s3://") else "local"
    outcome = ", ".join(f"{j} -> {loc.rsplit('/', 1)[-1]}" for j, loc in sorted(published.items()))
    record_property("measured", f"{backend}: {outcome}; claims lost to the other racer: {lost}; both published "
                                f"{seconds:.1f} s after release; each card's sha256 matches its weights and each loads "
                                "as its own model")  # fmt: skip


def _finished_run(spec: FinetuneJobSpec, folder: Path):
    """What a finished run of `spec` hands to `publish`: a MobileNetV2 classifier (its seed's random weights, the
    size a real run publishes), the real data plan, the best weights file and a one-epoch training state."""
    from schemas.finetune import EpochMetrics, TrainingState
    from schemas.specs import PreprocessSpec
    from workers.finetune.loop import Classifier, save_weights
    from workers.models import split_head

    torch.manual_seed(spec.training.seed)
    backbone, old_head = split_head(get_model("mobilenet_v2", weights=None))
    model = Classifier(backbone, torch.nn.Linear(old_head.in_features, len(CLASSES))).eval()
    folder.mkdir(parents=True)
    save_weights(model.state_dict(), folder / "best.safetensors")
    plan = plan_data(spec.data, open_storage(spec.data.uri), spec.training.seed)
    epoch = EpochMetrics(epoch=1, train_loss=0.6, train_accuracy=0.7, val_loss=0.5, val_accuracy=0.75,
                         learning_rate=1e-3, seconds=2.0)  # fmt: skip
    state = TrainingState(epochs_done=1, history=(epoch,), best_epoch=1, best_val_loss=0.5,
                          best_confusion=((2, 0), (1, 1)), train_seconds=2.0,
                          preprocess=PreprocessSpec(resize_size=73, crop_size=64, mean=(0.485, 0.456, 0.406),
                                                    std=(0.229, 0.224, 0.225)))  # fmt: skip
    return model, plan, folder / "best.safetensors", state


def test_the_fine_tune_driver_imports_no_torch():
    """The job service imports jobs.finetune: torch and torchvision stay in the workers."""
    code = "import sys, jobs.finetune, jobs.cli; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert result.stdout.strip() == "[]"


@pytest.mark.usefixtures("ray_cluster")
def test_a_fine_tune_with_corrections_from_a_reviewed_queue_applies_them_and_its_card_counts_them(leaves, tmp_path):
    from datetime import UTC, datetime

    from starlette.testclient import TestClient

    from jobs.curate.queue import run_review_queue_job
    from jobs.output.corrections import open_queue, record_decision
    from jobs.review.app import build_app
    from jobs.review.apply import pin_corrections
    from jobs.review.images import Pictures
    from jobs.review.items import review_items
    from jobs.review.state import ReviewState
    from schemas.curation import ReviewQueueJobSpec
    from schemas.review import DecisionRecord

    labels, queue_uri = tmp_path / "labels", tmp_path / "queue"
    model = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
    run_label_job(LabelJobSpec(input={"uri": str(leaves)}, output=str(labels), num_workers=1, top_k=3, model=model),
                  show_progress=False)  # fmt: skip
    run_review_queue_job(ReviewQueueJobSpec(source=str(labels), output=str(queue_uri), size=20, sheet=False),
                         show_progress=False)  # fmt: skip
    queue = open_queue(str(queue_uri))
    items = {item.key: item for item in review_items(queue)}
    early, healthy = CLASSES
    moved = sorted(k for k in items if k.startswith(early))[:2]  # a reviewer says these two are healthy leaves
    bad = sorted(k for k in items if k.startswith(healthy))[0]
    kept = sorted(k for k in items if k.startswith(healthy))[1]
    choices = [(k, "label", healthy) for k in moved] + [(bad, "bad", None), (kept, "label", healthy)]
    state = ReviewState(queue, classes=CLASSES)  # reviewed through the app's API, as the page posts
    app = build_app(state, Pictures(queue, None), "t0ken", loopback=True)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for n, (key, decision, label) in enumerate(choices):
            body = {"decision_id": f"decision-{n:03d}", "reviewer": "ana", "key": key, "decision": decision,
                    "label": label}  # fmt: skip
            answer = client.post("/api/decisions", json=body, headers={"authorization": "Bearer t0ken"})
            assert answer.json()["recorded"] == "new", answer.text
    output = tmp_path / "models" / "reviewed"
    argv = ["finetune", "--data", str(leaves), "--base", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--method",
            "linear-probe", "--output", str(output), "--corrections", str(queue_uri), "--quiet"]  # fmt: skip

    assert main(argv) == 0

    card = read_card(str(output / "v1"))
    applied = card.dataset.corrections
    assert (applied.relabelled, applied.dropped, applied.confirmed, applied.not_in_data) == (2, 1, 1, 0), applied
    assert applied.queues == (str(queue_uri),) and applied.decisions == 4 and applied.per_reviewer == {"ana": 4}
    assert card.dataset.train_images + card.dataset.val_images == 19
    assert card.dataset.train_per_class[healthy] + card.dataset.val_per_class[healthy] == 11
    with open(output / "v1" / SPLIT_NAME) as fh:
        split = {row["key"].rsplit("/", 1)[-1]: row["label"] for row in csv.DictReader(fh)}
    assert all(split[key.rsplit("/", 1)[-1]] == healthy for key in moved) and bad.rsplit("/", 1)[-1] not in split
    # The same command again is the same job (its decisions pinned); one more decision makes a new one.
    spec = FinetuneJobSpec(data={"uri": str(leaves)}, base=model, training={"method": "linear-probe"},
                           output=str(output), corrections=[str(queue_uri)])  # fmt: skip
    assert pin_corrections(spec).resolved_job_id() == card.job_id
    record_decision(queue.storage, queue.uri, DecisionRecord(
        decision_id="decision-999", key=kept, image=items[kept].image, reviewer="bo", decision="bad",
        decided_at=datetime.now(UTC)))  # fmt: skip
    assert pin_corrections(spec).resolved_job_id() != card.job_id


def test_ray_train_workers_start_with_the_openmp_wait_policy(leaves, tmp_path, monkeypatch):
    """Ray Train's workers import torch before the loop's module, so the policy workers/__init__.py sets must reach
    them in their start environment, on any cluster: the trainer's worker runtime env carries it (the user's value
    when set)."""
    from jobs.cluster import ClusterResources
    from jobs.finetune import _Run, _trainer

    spec = _spec(str(leaves), str(tmp_path / "model"))
    run = _Run(out=open_storage(str(tmp_path)), spec=spec, job_id="omp", plan=None, recipe=None,
               cluster=ClusterResources(cpus=2, gpus=0), show_progress=False)  # fmt: skip
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert _trainer(run, None).run_config.worker_runtime_env == {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert _trainer(run, None).run_config.worker_runtime_env == {"env_vars": {"OMP_WAIT_POLICY": "ACTIVE"}}
