"""The training recipe, decided on the driver from the spec and the size of the data: plain logic, no torch.

One default has to serve a few dozen images and hundreds of thousands. What changes with size:
- steps: at least `min_steps` optimizer steps. Five epochs of 130 images at batch 32 are 20 steps, far too few for
  a new head (the card said 0.97 on validation; photos it had not seen scored 0.70). A small set is therefore seen
  several times within each epoch (an epoch stays one evaluation and one checkpoint), a large one once.
- stages (lp-ft): the new head is first fitted on the frozen features (a convex fit: the linear probe), then every
  layer trains at a low learning rate from there. Starting from a fitted head instead of a random one keeps the
  first steps from pushing large gradients into the pre-trained features (Kumar et al., ICLR 2022, "Fine-Tuning
  can Distort Pretrained Features"); and the fitted head is evaluated first, so the run publishes it when no
  fine-tuned epoch beats it on validation loss.
- label smoothing: 0 under SMALL training images (on tiny sets it flattens every score: top scores of 0.38-0.56
  were seen), 0.05 up to LARGE, 0.1 beyond, where it calibrates.
"""

from __future__ import annotations

import math

from schemas.finetune import Recipe, Stage, TrainingSpec

SMALL, LARGE = 1_000, 10_000
PROBE_MAX_ITERATIONS = 500  # L-BFGS iterations; the plants embeddings (480 x 1280) converge in under 100
LBFGS = "L-BFGS on frozen embeddings (multinomial logistic regression, convex)"
ADAMW = "AdamW, linear warm-up then cosine decay"


def label_smoothing_for(training: TrainingSpec, train_images: int) -> float:
    """The spec's label smoothing, or one for the data's size."""
    if training.label_smoothing is not None:
        return training.label_smoothing
    return 0.0 if train_images < SMALL else 0.05 if train_images < LARGE else 0.1


def samples_per_rank(train_images: int, world_size: int, batch_size: int) -> int:
    """Every rank takes the same number of steps (DDP all-reduces each one): the longest shard's length, less one
    when that would leave a last batch of one image (which breaks batch norm in training mode)."""
    per_rank = math.ceil(train_images / world_size)
    if per_rank % batch_size == 1 and per_rank > 1:
        per_rank -= 1
    return per_rank


def plan_recipe(training: TrainingSpec, train_images: int, world_size: int, probe_iterations: int) -> Recipe:
    """What a run of `training` on `train_images` images over `world_size` ranks does."""
    smoothing = label_smoothing_for(training, train_images)
    head_stage = Stage(name="head", optimizer=LBFGS, steps=probe_iterations)
    if not training.method.trains:
        return Recipe(method=training.method, train_images=train_images, stages=(head_stage,), epochs=0,
                      steps_per_epoch=0, samples_per_epoch=0, warmup_steps=0, label_smoothing=smoothing,
                      notes="one forward pass for embeddings, then a convex fit of the head")  # fmt: skip
    per_rank = samples_per_rank(train_images, world_size, training.batch_size)
    one_pass = math.ceil(per_rank / training.batch_size)
    steps_per_epoch = max(one_pass, math.ceil(training.min_steps / training.epochs))
    samples = per_rank if steps_per_epoch == one_pass else steps_per_epoch * training.batch_size
    head_lr, backbone_lr = _learning_rates(training)
    total = steps_per_epoch * training.epochs
    trained = Stage(name="full", optimizer=ADAMW, steps=total, head_lr=head_lr, backbone_lr=backbone_lr)
    passes = samples / max(1, per_rank)
    notes = f"{training.epochs} epochs of {steps_per_epoch} steps ({passes:.1f} passes over the data each)"
    if steps_per_epoch > one_pass:
        notes += f", repeated to reach min_steps {training.min_steps}"
    if training.method.trains_from_probe:
        notes = "head fitted on frozen features first, then every layer from it: " + notes
    return Recipe(
        method=training.method,
        train_images=train_images,
        stages=(head_stage, trained) if training.method.trains_from_probe else (trained,),
        epochs=training.epochs,
        steps_per_epoch=steps_per_epoch,
        samples_per_epoch=samples,
        warmup_steps=round(training.warmup_epochs * steps_per_epoch),
        label_smoothing=smoothing,
        notes=notes,
    )


def _learning_rates(training: TrainingSpec) -> tuple[float, float]:
    """(head, backbone) peak learning rates. full: the random head at learning_rate, the backbone at a fraction of
    it; lp-ft: the head is fitted already, so it moves as slowly as the backbone."""
    backbone = training.learning_rate * training.backbone_lr_scale
    return (backbone if training.method.trains_from_probe else training.learning_rate), backbone
