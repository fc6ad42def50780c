"""The Ray Data reference: the batch-inference pipeline Ray's documentation recommends, for the same job.

    read_webdataset (tar shards on S3) → map_batches(decode + resize + crop, tasks)
        → map_batches(Classifier, actor pool) → write_parquet (S3)

It produces what bulklabel produces: per image top-1 label, top-5 indices/labels/scores and the penultimate-layer
embedding, from the same weights, batch size and preprocessing (decode, shorter side to `resize`, centre crop).

How it is tuned (fairly, on a 2-CPU Ray cluster; `RayDataTuning`):
- Read, preprocess and write tasks ask for a fraction of a CPU (`task_cpus`, default 0.25). With whole-CPU tasks and
  an actor holding a CPU, decode runs one task at a time; with an actor asking for every CPU, Ray Data hangs silently
  (the read stage can never be scheduled).
- The actor pool is `ActorPoolStrategy(size=actors)` (not the deprecated `concurrency=`). Each actor asks for
  `actor_cpus` (1.0: one actor plus fractional tasks fit in 2 CPUs) but sets torch's thread count to the cores it may
  really use (`torch_threads`, 2): Ray would otherwise give an actor with num_cpus=1 a single torch thread
  (OMP_NUM_THREADS=1), leaving a core idle whenever decode tasks are not running. Two actors of 0.75 CPU with one
  thread each were measured too (see RESULTS.md); one actor with two threads was faster here.
- The model runs under `torch.inference_mode`, in channels_last, normalising uint8 pixels inside the actor (so the
  object store carries uint8, 4x less than float32 tensors).
- Progress bars are off (they cost a measurable share of 2 cores); everything else is Ray Data's defaults.
- Not by default: bulklabel's allocator setting (`workers.label.inference.keep_freed_memory_for_reuse`), which no Ray
  guide mentions; `reuse_freed_memory=True` (`--raydata-reuse-freed-memory`) gives it to the actors too, to show how
  much of the difference it accounts for.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import numpy as np

from bench.models import BenchModel

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RayDataTuning:
    actors: int = 1
    actor_cpus: float = 1.0
    torch_threads: int = 2
    task_cpus: float = 0.25
    reuse_freed_memory: bool = False


@dataclass(frozen=True)
class Preprocess:
    resize: int = 256
    crop: int = 224


def preprocess_batch(batch: dict[str, np.ndarray], resize: int, crop: int) -> dict[str, np.ndarray]:
    """Decode JPEG bytes, resize the shorter side to `resize`, centre-crop `crop`: uint8 NHWC."""
    from PIL import Image

    images, widths, heights = [], [], []
    for data in batch["jpg"]:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (resize, resize))  # a reduced-size DCT decode when the photo is far larger
            img = img.convert("RGB")
            widths.append(img.width)
            heights.append(img.height)
            scale = resize / min(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
            left, top = (img.width - crop) // 2, (img.height - crop) // 2
            images.append(np.asarray(img.crop((left, top, left + crop, top + crop))))
    return {
        "key": batch["__key__"],
        "source": batch["__url__"],
        "image": np.stack(images),
        "width": np.asarray(widths, np.int32),
        "height": np.asarray(heights, np.int32),
    }


class Classifier:
    """The actor: model resident, one batch per call."""

    def __init__(self, model: BenchModel, torch_threads: int, top_k: int, reuse_freed_memory: bool = False):
        import warnings

        import torch
        from torchvision.models import get_model_weights

        # Ray hands batches over as read-only views; the uint8 → float step copies anyway, so torch's warning is noise.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        torch.set_num_threads(torch_threads)
        if reuse_freed_memory:
            from workers.label.inference import keep_freed_memory_for_reuse

            keep_freed_memory_for_reuse()
        self.torch = torch
        backbone, head = model.build()
        self.backbone = backbone.to(memory_format=torch.channels_last)
        self.head = head
        self.top_k = top_k
        self.categories = np.asarray(get_model_weights(model.name).DEFAULT.meta["categories"], dtype=object)
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            x = (torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float() - self.mean) / self.std
            features = self.backbone(x)
            probs = torch.softmax(self.head(features), dim=1)
            scores, indices = torch.topk(probs, self.top_k, dim=1)
        indices = indices.to(torch.int32).numpy()
        return {
            "key": batch["key"],
            "source": batch["source"],
            "label": self.categories[indices[:, 0]],
            "label_index": indices[:, 0],
            "score": scores[:, 0].numpy(),
            "topk_labels": _rows_of(self.categories[indices]),
            "topk_indices": indices,
            "topk_scores": scores.numpy(),
            "embedding": features.numpy(),
            "width": batch["width"],
            "height": batch["height"],
        }


def _rows_of(matrix: np.ndarray) -> np.ndarray:
    """A 1-D object array of per-row lists: Arrow stores it as list<string> (a 2-D object array gets pickled)."""
    out = np.empty(len(matrix), dtype=object)
    out[:] = [list(row) for row in matrix]
    return out


def run_reference(
    input_uri: str,
    output_uri: str,
    filesystem,
    model: BenchModel,
    batch_size: int,
    tuning: RayDataTuning,
    preprocess: Preprocess = Preprocess(),
    top_k: int = 5,
) -> float:
    """Run the pipeline to completion; returns its wall time in seconds (Ray already running)."""
    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.issue_detectors_config.detectors = []  # its memory warnings are advice for the log, not work
    started = time.perf_counter()
    ds = ray.data.read_webdataset(
        input_uri.removeprefix("s3://"), filesystem=filesystem, decoder=None, suffixes=["jpg"],
        num_cpus=tuning.task_cpus,
    )  # fmt: skip
    ds = ds.map_batches(
        preprocess_batch, batch_size=batch_size, num_cpus=tuning.task_cpus,
        fn_kwargs={"resize": preprocess.resize, "crop": preprocess.crop},
    )  # fmt: skip
    ds = ds.map_batches(
        Classifier, batch_size=batch_size, compute=ActorPoolStrategy(size=tuning.actors), num_cpus=tuning.actor_cpus,
        fn_constructor_kwargs={"model": model, "torch_threads": tuning.torch_threads, "top_k": top_k,
                               "reuse_freed_memory": tuning.reuse_freed_memory},
    )  # fmt: skip
    ds.write_parquet(
        output_uri.removeprefix("s3://"), filesystem=filesystem, compression="zstd",
        ray_remote_args={"num_cpus": tuning.task_cpus},
    )  # fmt: skip
    return time.perf_counter() - started
