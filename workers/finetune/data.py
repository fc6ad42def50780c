"""Labelled images inside the training workers: decoded once into memory, and the datasets drawn from them.

Each training worker reads and decodes its share of the plan (workers.finetune.dataplan) once, keeps it in memory
as uint8 tensors, and draws augmented crops from it every epoch. Fine-tune sets are small (hundreds to thousands of
images: ~200 KB each at 256 px), so decoding once instead of every epoch takes the JPEG decoder off the training
loop's critical path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from schemas.specs import PreprocessSpec
from workers.finetune.dataplan import (  # noqa: F401 - re-exported: the planning half of the data, torch-free
    _OBJECT_ERRORS,
    MAX_NAMED_PROBLEMS,
    DataPlan,
    Example,
    FinetuneDataError,
    dataset_fingerprint,
    list_examples,
    plan_data,
    stratified_split,
)
from workers.io.storage import Storage
from workers.label.decode import decode
from workers.vision import transforms_v2

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- decoded images


@dataclass
class DecodedImages:
    """Images decoded once: `pixels[i]` is a uint8 CHW tensor of class `labels[i]`; unreadable ones are skipped."""

    pixels: list[torch.Tensor]
    labels: list[int]
    skipped: list[str]  # "<uri>: <reason>"

    def __len__(self) -> int:
        return len(self.pixels)


def load_images(
    items: Sequence[tuple[str, int]], storage: Storage, preprocess: PreprocessSpec, threads: int
) -> DecodedImages:
    """Read and decode `items` ((uri, class) pairs) with the label path's decoder: EXIF rotation, RGB, resize of
    the shorter side, centre crop. Pillow releases the GIL while decoding, so threads overlap reads and decodes."""

    def load(item: tuple[str, int]) -> tuple[torch.Tensor | None, int, str | None]:
        uri, label = item
        try:
            data = storage.read_bytes(uri)
        except _OBJECT_ERRORS as exc:
            return None, label, f"{uri}: cannot read: {type(exc).__name__}: {exc}"
        decoded = decode(data, preprocess)
        if decoded.pixels is None:
            return None, label, f"{uri}: {decoded.error}"
        # HWC → CHW (what torchvision transforms expect) as one copy, which also makes decode's read-only array
        # writable.
        return torch.from_numpy(np.ascontiguousarray(decoded.pixels.transpose(2, 0, 1))), label, None

    out = DecodedImages([], [], [])
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="finetune-decode") as pool:
        for pixels, label, error in pool.map(load, items):
            if error is not None:
                out.skipped.append(error)
            else:
                out.pixels.append(pixels)
                out.labels.append(label)
    for problem in out.skipped[:MAX_NAMED_PROBLEMS]:
        log.warning("skipped unreadable image %s", problem)
    return out


def scaled_preprocess(preset: PreprocessSpec, crop_size: int) -> PreprocessSpec:
    """The preset's evaluation preprocessing at another crop size, keeping its resize/crop ratio (224 from 256
    becomes 160 from 183). A model trained on smaller crops is evaluated, and later labels, at that scale: with
    MobileNetV2 on the plants set, training at 160 and evaluating at 224 gave 0.82 validation accuracy where
    224/224 gave 0.96, since batch-norm statistics and object sizes learnt at one scale do not carry to another."""
    resize = max(crop_size, round(crop_size * preset.resize_size / preset.crop_size))
    return preset.model_copy(update={"resize_size": resize, "crop_size": crop_size})


def train_cache_preprocess(eval_preprocess: PreprocessSpec) -> PreprocessSpec:
    """How training images are cached: the square the evaluation crop is cut from (256 for a 224 crop), from which
    random crops are drawn, as torchvision's recipes do."""
    side = eval_preprocess.resize_size
    return eval_preprocess.model_copy(update={"resize_size": side, "crop_size": side})


class AugmentedImages(Dataset):
    """Training view: a random resized crop and a horizontal flip of each cached image, uint8 CHW.

    Randomness comes from torch's global generator, which the training loop seeds per epoch and rank, so a
    resumed run draws the same crops as an uninterrupted one.
    """

    def __init__(self, images: DecodedImages, crop_size: int, min_scale: float):
        self.images = images
        v2 = transforms_v2()
        self.transform = v2.Compose(
            [v2.RandomResizedCrop(crop_size, scale=(min_scale, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images.pixels[index]), self.images.labels[index]


class EvalImages(Dataset):
    """Validation view: the cached eval crops as they are (the label path's preprocessing, no augmentation)."""

    def __init__(self, images: DecodedImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images.pixels[index], self.images.labels[index]


def epoch_order(local_count: int, length: int, generator: torch.Generator) -> list[int]:
    """A shuffled order of this rank's `local_count` images, wrapped or cut to `length`.

    DDP needs the same number of steps on every rank, so each rank's order has the longest shard's length.
    """
    if local_count == 0:
        return []
    order: list[int] = []
    while len(order) < length:
        order += torch.randperm(local_count, generator=generator).tolist()
    return order[:length]


def shard_of(items: Sequence, rank: int, world_size: int) -> list:
    """Rank `rank`'s share of `items`: every world_size-th item, so shards differ in size by at most one."""
    return list(items[rank::world_size])
