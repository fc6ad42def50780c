"""The label worker: one model replica that turns shard tasks into committed Parquet files.

The driver wraps this class in a Ray actor (`ray.remote(LabelWorker)`); it stays a plain class
so tests can run it in-process. It receives only the small job spec and builds its model and
storage clients itself, so nothing heavy is pickled.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from schemas.shards import ShardResult, ShardTask
from schemas.specs import LabelJobSpec
from workers import faults
from workers.inference import Predictions, Predictor, pick_device
from workers.models import build_model
from workers.pipeline import decoded_batches, prefetch
from workers.readers import read_shard
from workers.storage import local_scratch_dir, open_storage
from workers.writer import ShardWriter

log = logging.getLogger(__name__)

FETCH_THREADS = 16  # concurrent GETs for loose-file shards; object stores reward parallel requests
PREFETCH_BATCHES = 2


class LabelWorker:
    """Holds a model resident on its device and labels one shard per call."""

    def __init__(self, spec: LabelJobSpec, job_id: str, torch_threads: int):
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.spec = spec
        self.job_id = job_id
        self.scratch = local_scratch_dir()
        self.input_storage = open_storage(spec.input.uri, spec.storage)
        self.output_storage = open_storage(spec.output, spec.storage)
        loaded = build_model(spec.model, spec.storage, Path(self.scratch, "weights"))
        self.categories = loaded.categories
        self.model_id = loaded.model_id
        self.preprocess = loaded.preprocess
        self.embedding_dim = loaded.embedding_dim
        self.device = pick_device(spec.model.device)
        self.predictor = Predictor(loaded, self.device, spec.model.precision, spec.top_k, spec.embeddings)
        self.decode_pool = ThreadPoolExecutor(spec.decode_threads, thread_name_prefix="decode")
        self.fetch_pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="fetch")
        log.info("worker ready: %s on %s, %d torch threads", self.model_id, self.device, torch.get_num_threads())

    def describe(self) -> dict:
        """What the driver records in the job manifest."""
        return {
            "model_id": self.model_id,
            "device": str(self.device),
            "embedding_dim": self.embedding_dim,
            "num_classes": len(self.categories),
            "preprocess": self.preprocess.model_dump(),
            "pid": os.getpid(),
        }

    def label_shard(self, task: ShardTask, attempt: int) -> ShardResult:
        """Read, decode, predict and commit one shard; returns its done-marker."""
        started = time.perf_counter()
        spec = self.spec
        writer = ShardWriter(task, self.categories, self.model_id, self.job_id)
        records = read_shard(self.input_storage, task, spec.input.extensions, self.fetch_pool)
        batches = decoded_batches(records, self.preprocess, self.decode_pool, spec.batch_size)
        bytes_read = 0
        for batch in prefetch(batches, PREFETCH_BATCHES):
            faults.inject(task.shard_id, attempt, writer.rows)
            preds = self._predict(batch.pixels, task, attempt, writer.rows) if batch.pixels is not None else None
            writer.add(
                batch.meta,
                preds.topk_indices if preds else None,
                preds.topk_scores if preds else None,
                preds.embeddings if preds else None,
            )
            bytes_read += batch.bytes_read
        stats = {"bytes_read": bytes_read, "seconds": round(time.perf_counter() - started, 3)}
        result = writer.commit(self.output_storage, spec.output, self.scratch, attempt, stats)
        log.info("shard %s: %d rows, %d errors, %.1fs", task.shard_id, result.rows, result.errors, result.seconds)
        return result

    def _predict(self, pixels: np.ndarray, task: ShardTask, attempt: int, rows: int) -> Predictions:
        """Predict a batch; out of device memory, split it in halves and try again, down to single images."""
        try:
            faults.inject_oom(task.shard_id, attempt, rows, len(pixels))
            return self.predictor(pixels)
        except torch.OutOfMemoryError:
            if len(pixels) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(pixels) // 2
            log.warning("shard %s: out of memory on a batch of %d; splitting it", task.shard_id, len(pixels))
            first = self._predict(pixels[:half], task, attempt, rows)
            second = self._predict(pixels[half:], task, attempt, rows + half)
            return Predictions(
                topk_indices=np.concatenate([first.topk_indices, second.topk_indices]),
                topk_scores=np.concatenate([first.topk_scores, second.topk_scores]),
                embeddings=None if first.embeddings is None else np.concatenate([first.embeddings, second.embeddings]),
            )

    def close(self) -> None:
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.scratch, ignore_errors=True)
