"""The per-worker fine-tuning loop that Ray Train's TorchTrainer runs on every rank.

Each rank receives only the small job spec and data plan, then builds everything heavy itself: its share of
the images (decoded once, kept in memory), the model (torchvision registry + verified weights, new head), the
optimiser. Every epoch ends in a checkpoint reported to Ray Train; a restarted run (after a worker failure or a
killed driver) continues from the last one. Randomness is seeded per (epoch, rank), so a resumed run draws the
same crops and the same order as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from schemas.finetune import EpochMetrics, FinetuneJobSpec, Recipe, TrainingSpec, TrainingState
from schemas.specs import PreprocessSpec
from workers.finetune.data import (
    AugmentedImages,
    DataPlan,
    DecodedImages,
    EvalImages,
    epoch_order,
    load_images,
    scaled_preprocess,
    shard_of,
    train_cache_preprocess,
)
from workers.io.storage import local_scratch_dir, open_storage
from workers.label.inference import autocast_dtype
from workers.models import build_model

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"  # weights after the last finished epoch
BEST_FILE = "best.safetensors"  # weights of the epoch with the lowest validation loss (what gets published)
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
DECODE_THREADS = 8  # reads overlap on object stores; Pillow decodes release the GIL
MAX_SKIPPED_KEPT = 20


class Classifier(nn.Module):
    """A torchvision backbone (its last Linear replaced by Identity) and a new head for our classes.

    The state dict's keys are `backbone.*` and `head.*`, the split that label jobs load (workers.models).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(job: FinetuneJobSpec, num_classes: int, cache_dir: Path) -> tuple[Classifier, PreprocessSpec]:
    """The base model with verified weights (workers.models) and a freshly initialised head for `num_classes`."""
    torch.manual_seed(job.training.seed)  # the head's (and a random-init backbone's) initial weights
    loaded = build_model(job.base, job.storage, cache_dir)
    head = nn.Linear(loaded.embedding_dim, num_classes)
    model = Classifier(loaded.backbone, head)
    if not job.training.method.trains:
        model.backbone.requires_grad_(False)
    return model, loaded.preprocess


def param_groups(model: Classifier, recipe: Recipe) -> list[dict]:
    """The head and the backbone at the recipe's learning rates (workers.finetune.recipe: for `full` the backbone
    at a fraction of the random head's, so the pre-trained features adapt without being overwritten by its
    gradients; for lp-ft both slow, the head being fitted already)."""
    stage = recipe.stages[-1]
    groups = [{"params": list(model.head.parameters()), "base_lr": stage.head_lr}]
    if stage.backbone_lr is not None:
        groups.append({"params": list(model.backbone.parameters()), "base_lr": stage.backbone_lr})
    for group in groups:
        group["lr"] = group["base_lr"]
    return groups


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up, then cosine decay to zero, as a function of the global step (so resuming needs no state)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def class_weights(plan: DataPlan, mode: str) -> torch.Tensor | None:
    """'balanced': n / (classes x n_class) from the training counts, so rare classes weigh as much as common ones."""
    if mode == "none":
        return None
    counts = torch.tensor(list(plan.counts("train").values()), dtype=torch.float32).clamp(min=1)
    return counts.sum() / (len(counts) * counts)


def next_state(state: TrainingState, metrics: EpochMetrics, confusion: list[list[int]], t: TrainingSpec,
               scored: bool = True) -> TrainingState:  # fmt: skip
    """The state after an epoch: its metrics recorded, the best epoch (lowest validation loss) and early stopping
    decided. Unscored (a refit on every image, with no validation set): each epoch is the newest best."""
    improved = not scored or metrics.val_loss < state.best_val_loss
    without = 0 if improved else state.epochs_without_improvement + 1
    patience_spent = t.early_stopping_patience > 0 and without >= t.early_stopping_patience
    update = {
        "epochs_done": metrics.epoch,
        "history": (*state.history, metrics),
        "train_seconds": state.train_seconds + metrics.seconds,
        "epochs_without_improvement": without,
        "stopped_early": patience_spent and metrics.epoch < t.epochs,
    }
    if improved:
        update |= {"best_val_loss": metrics.val_loss, "best_epoch": metrics.epoch, "best_confusion": confusion}
    return updated(state, **update)


def updated(state: TrainingState, **changes) -> TrainingState:
    """A validated copy of `state` with `changes` (model_copy would not validate them)."""
    return TrainingState.model_validate({**state.model_dump(), **changes})


def seed_for(seed: int, epoch: int, rank: int) -> int:
    """One generator seed per (run seed, epoch, rank): the same draws whether or not the run was resumed."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63)


@dataclass
class EpochTotals:
    """Sums over a pass, all-reduced across ranks before they become means."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += float(loss) * len(labels)
        self.correct += int((logits.argmax(1) == labels).sum())
        self.count += len(labels)

    def all_reduce(self, device: torch.device) -> EpochTotals:
        """The sums over every rank (on `device`: NCCL reduces only GPU tensors)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self
        tensor = torch.tensor([self.loss_sum, self.correct, self.count], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return EpochTotals(float(tensor[0]), int(tensor[1]), int(tensor[2]))

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.count)


class Normalise:
    """uint8 NCHW → normalised float, exactly as the label path's Predictor does it (mean and std x 255)."""

    def __init__(self, preprocess: PreprocessSpec, device: torch.device):
        self.mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1) * 255
        self.device = device

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.to(self.device, non_blocking=True).float() - self.mean) / self.std


# -------------------------------------------------------------------------------------------- checkpoints


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_checkpoint(folder: Path, model: Classifier, best: dict, optimizer, state: TrainingState) -> None:
    """Current weights, best weights, optimiser state and loop state into `folder`."""
    save_weights(model.state_dict(), folder / MODEL_FILE)
    save_weights(best, folder / BEST_FILE)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / STATE_FILE).write_text(state.model_dump_json(indent=1))


def read_checkpoint(folder: Path, model: Classifier, optimizer) -> tuple[TrainingState, dict]:
    """Restore model and optimiser in place from a checkpoint folder; returns (loop state, best weights)."""
    model.load_state_dict(load_weights(folder / MODEL_FILE))
    # Optimiser state dicts hold only tensors and numbers, so the safe loader takes them.
    optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    state = TrainingState.model_validate_json((folder / STATE_FILE).read_text())
    return state, load_weights(folder / BEST_FILE)


def read_state(folder: Path) -> TrainingState:
    """The loop state alone (what the driver reads from the final checkpoint)."""
    return TrainingState.model_validate_json((folder / STATE_FILE).read_text())


# ----------------------------------------------------------------------------------------------- the loop


def train_loop(config: dict) -> None:
    """Ray Train's `train_loop_per_worker`: config holds the job spec, data plan and recipe (small, picklable),
    lp-ft's fitted head (`probe`, a workers.finetune.embed.ProbeFit) and the worker settings (torch threads,
    progress bar, log level)."""
    import ray.train

    job: FinetuneJobSpec = config["spec"]
    plan: DataPlan = config["plan"]
    _configure_logging(config.get("log_level", logging.INFO))
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))
    context = ray.train.get_context()
    worker = FinetuneWorker(job, plan, context.get_world_rank(), context.get_world_size(), config)
    try:
        worker.run(ray.train.get_checkpoint())
    finally:
        worker.close()


def _configure_logging(level: int) -> None:
    # Ray Train workers start with only Ray's handlers; our per-epoch lines go to stderr, which Ray forwards to
    # the driver's console.
    logger = logging.getLogger("workers")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


class FinetuneWorker:
    """One rank's training: data, model, optimiser, and the epoch loop with checkpoints."""

    def __init__(self, job: FinetuneJobSpec, plan: DataPlan, rank: int, world_size: int, config: dict):
        import ray.train.torch

        self.job, self.plan, self.rank, self.world_size = job, plan, rank, world_size
        self.recipe: Recipe = config["recipe"]
        self.probe = config.get("probe")  # lp-ft: the head fitted on frozen features, where training starts
        # A refit trains on every image for the epochs its validation run chose: nothing is held out to score.
        self.scored = not config.get("refit", False)
        self.show_progress = bool(config.get("show_progress", False)) and rank == 0
        self.scratch = local_scratch_dir()
        self.device = ray.train.torch.get_device()
        self.amp_dtype = autocast_dtype(self.device, job.base.precision)
        model, preset = build_classifier(job, len(plan.class_names), Path(self.scratch, "weights"))
        if self.probe is not None:
            with torch.no_grad():
                model.head.weight.copy_(torch.tensor(self.probe.head.weight))  # a copy: Ray's arrays are read-only
                model.head.bias.copy_(torch.tensor(self.probe.head.bias))
        self.crop = job.training.image_size or preset.crop_size
        self.preprocess = scaled_preprocess(preset, self.crop)  # evaluation's, the card's and label jobs'
        self.train_images, self.val_images = self._load_data()
        self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        self.optimizer = torch.optim.AdamW(param_groups(self.plain_model, self.recipe),
                                           weight_decay=job.training.weight_decay)  # fmt: skip
        weights = class_weights(plan, job.training.class_weights)
        self.loss_fn = nn.CrossEntropyLoss(
            weight=weights.to(self.device) if weights is not None else None,
            label_smoothing=self.recipe.label_smoothing,
        )
        self.normalise = Normalise(self.preprocess, self.device)
        # The same steps on every rank (DDP all-reduces each one); a small set repeats within an epoch.
        self.samples_per_epoch = self.recipe.samples_per_epoch
        self.steps_per_epoch = self.recipe.steps_per_epoch

    @property
    def plain_model(self) -> Classifier:
        """The model without its DDP wrapper (for evaluation and state dicts)."""
        return getattr(self.model, "module", self.model)

    def _load_data(self) -> tuple[DecodedImages, DecodedImages]:
        started = time.perf_counter()
        storage = open_storage(self.job.data.uri, self.job.storage)
        train_pre = train_cache_preprocess(self.preprocess)
        train = load_images(shard_of(self.plan.train, self.rank, self.world_size), storage, train_pre, DECODE_THREADS)
        val = load_images(shard_of(self.plan.val, self.rank, self.world_size), storage, self.preprocess, DECODE_THREADS)
        if not len(train):
            raise RuntimeError(f"rank {self.rank}: none of its {len(train.skipped)} training images could be read")
        log.info(
            "rank %d: %d training + %d validation images decoded in %.1fs (%d skipped)",
            self.rank, len(train), len(val), time.perf_counter() - started, len(train.skipped) + len(val.skipped),
        )  # fmt: skip
        return train, val

    def run(self, checkpoint) -> None:
        """Train from the start, or from `checkpoint`, until the last epoch or early stopping."""
        import ray.train
        from ray.train import Checkpoint

        state, best = TrainingState(preprocess=self.preprocess), {}
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                state, best = read_checkpoint(Path(folder), self.plain_model, self.optimizer)
            if not state.finished(self.job.training.epochs):
                state = updated(state, resumed_after_epochs=(*state.resumed_after_epochs, state.epochs_done))
            log.info("resuming from the checkpoint after epoch %d", state.epochs_done)
        skipped = self._all_skipped()
        state = updated(state, skipped_images=len(skipped), skipped_examples=skipped[:MAX_SKIPPED_KEPT])
        if self.probe is not None and not state.history and self.scored:
            state, best = self._evaluate_fitted_head(state)
        while not state.finished(self.job.training.epochs):
            epoch = state.epochs_done + 1
            started = time.perf_counter()
            train = self._train_epoch(epoch)
            val, confusion = self._evaluate() if self.scored else (EpochTotals(), [])
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=train.loss,
                train_accuracy=train.accuracy,
                val_loss=val.loss,
                val_accuracy=val.accuracy,
                learning_rate=self.optimizer.param_groups[0]["lr"],
                seconds=round(time.perf_counter() - started, 2),
            )
            if not self.scored or metrics.val_loss < state.best_val_loss:
                best = {k: v.detach().cpu().clone() for k, v in self.plain_model.state_dict().items()}
            state = next_state(state, metrics, confusion, self.job.training, self.scored)
            self._report(state)
            folder = self._write_checkpoint(state, best)
            checkpoint = Checkpoint.from_directory(str(folder)) if folder else None
            ray.train.report(metrics.model_dump(), checkpoint=checkpoint)
            if folder:
                shutil.rmtree(folder, ignore_errors=True)  # report() has copied it to the run's storage

    def _evaluate_fitted_head(self, state: TrainingState) -> tuple[TrainingState, dict]:
        """Epoch 0 of lp-ft: the fitted head on the untouched backbone, scored like every epoch after it, so the
        run publishes it when no fine-tuned epoch reaches a lower validation loss."""
        started = time.perf_counter()
        val, confusion = self._evaluate()
        metrics = EpochMetrics(epoch=0, train_loss=self.probe.train_loss, train_accuracy=self.probe.train_accuracy,
                               val_loss=val.loss, val_accuracy=val.accuracy, learning_rate=0.0,
                               seconds=round(self.probe.seconds + time.perf_counter() - started, 2))  # fmt: skip
        best = {k: v.detach().cpu().clone() for k, v in self.plain_model.state_dict().items()}
        state = next_state(state, metrics, confusion, self.job.training)
        self._report(state)
        return state, best

    def _report(self, state: TrainingState) -> None:
        if self.rank != 0:
            return
        m = state.history[-1]
        flag = " *" if state.best_epoch == m.epoch else ""
        val = f"val loss {m.val_loss:.4f} acc {m.val_accuracy:.3f}{flag}" if self.scored else "refit: nothing held out"
        log.info("epoch %d/%d: train loss %.4f acc %.3f | %s | lr %.2e | %.1fs", m.epoch, self.job.training.epochs,
                 m.train_loss, m.train_accuracy, val, m.learning_rate, m.seconds)  # fmt: skip
        if state.stopped_early:
            log.info("early stop: no lower validation loss for %d epochs", state.epochs_without_improvement)

    def _write_checkpoint(self, state: TrainingState, best: dict) -> Path | None:
        """Rank 0 writes the checkpoint (the ranks hold identical weights); the others report none."""
        if self.rank != 0:
            return None
        folder = Path(tempfile.mkdtemp(prefix="ckpt-", dir=self.scratch))
        write_checkpoint(folder, self.plain_model, best, self.optimizer, state)
        return folder

    def _train_epoch(self, epoch: int) -> EpochTotals:
        t = self.job.training
        torch.manual_seed(seed_for(t.seed, epoch, self.rank))  # augmentation and dropout draws of this epoch
        generator = torch.Generator().manual_seed(seed_for(t.seed, epoch, self.rank))
        order = epoch_order(len(self.train_images), self.samples_per_epoch, generator)
        dataset = AugmentedImages(self.train_images, self.crop, t.min_crop_scale)
        loader = DataLoader(dataset, batch_size=t.batch_size, sampler=order, num_workers=0)
        self._set_mode(training=True)
        total_steps = self.recipe.total_steps
        warmup_steps = self.recipe.warmup_steps
        totals = EpochTotals()
        bar = self._progress_bar(epoch, len(loader))
        for step, (pixels, labels) in enumerate(loader):
            factor = lr_factor((epoch - 1) * self.steps_per_epoch + step, total_steps, warmup_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            labels = labels.to(self.device)
            with self._autocast():
                logits = self.model(self.normalise(pixels))
                loss = self.loss_fn(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            totals.add(loss.detach(), logits.detach(), labels)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return totals.all_reduce(self.device)

    @torch.inference_mode()
    def _evaluate(self) -> tuple[EpochTotals, list[list[int]]]:
        """Validation loss, accuracy and confusion matrix over every rank's share of the validation images."""
        model = self.plain_model.eval()  # unwrapped: evaluation needs no gradient sync between ranks
        n = len(self.plan.class_names)
        confusion = torch.zeros(n, n, dtype=torch.int64)
        totals = EpochTotals()
        loader = DataLoader(EvalImages(self.val_images), batch_size=self.job.training.batch_size, num_workers=0)
        for pixels, labels in loader:
            labels = labels.to(self.device)
            with self._autocast():
                logits = model(self.normalise(pixels)).float()
            totals.add(self.loss_fn(logits, labels), logits, labels)
            for true, pred in zip(labels.cpu().tolist(), logits.argmax(1).cpu().tolist(), strict=True):
                confusion[true, pred] += 1
        if dist.is_available() and dist.is_initialized():
            confusion = confusion.to(self.device)
            dist.all_reduce(confusion)
        return totals.all_reduce(self.device), confusion.cpu().tolist()

    def _set_mode(self, training: bool) -> None:
        self.model.train(training)
        if not self.job.training.method.trains:
            # A frozen backbone keeps its batch-norm statistics and runs without dropout.
            self.plain_model.backbone.eval()

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _progress_bar(self, epoch: int, steps: int):
        """A bar over the epoch's steps, drawn by the driver (Ray's tqdm), or None."""
        if not self.show_progress:
            return None
        from ray.experimental import tqdm_ray

        return tqdm_ray.tqdm(desc=f"epoch {epoch}/{self.job.training.epochs}", total=steps, unit="step")

    def _all_skipped(self) -> list[str]:
        """Every rank's unreadable images, gathered so rank 0's checkpoint (and the card) counts them all."""
        mine = self.train_images.skipped + self.val_images.skipped
        if not (dist.is_available() and dist.is_initialized()):
            return mine
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        return [item for part in gathered for item in part]

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)
