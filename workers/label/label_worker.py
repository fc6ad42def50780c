"""The label worker: one model replica that turns shard tasks into committed Parquet files.

The driver wraps this class in a Ray actor (`ray.remote(LabelWorker)`); it stays a plain class
so tests can run it in-process (`label_shard_blocking`). It receives only the small job spec and
builds its model and storage clients itself, so nothing heavy is pickled.

Where the time goes, and why it is arranged this way (bench/RESULTS.md has the measurements):
- `label_shard` is async, so Ray lets the dispatcher's second shard start while the first runs: it
  reads and decodes ahead, then waits for its turn, which comes as soon as the first has handed its last batch
  to the model; the model never waits for a shard to open or to commit.
- on CPU, batches run in lanes of one torch thread each (`inference_lanes`), with decode threads
  (Pillow releases the GIL) filling in around them;
- on CPU, glibc keeps freed activations for reuse (`keep_freed_memory_for_reuse`) instead of the
  kernel faulting fresh pages in for every layer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from schemas.shards import ShardJob, ShardResult, ShardTask, WorkerSpec
from workers import faults
from workers.io.readers import ShardSource, StorageByScheme, bounded_map, read_shard
from workers.io.storage import Storage, local_scratch_dir, open_storage
from workers.io.writer import ShardWriter, node_id
from workers.label.decoders import make_decoder
from workers.label.inference import (
    Predictions,
    Predictor,
    PredictorOptions,
    is_out_of_memory,
    keep_freed_memory_for_reuse,
    pick_device,
)
from workers.label.pipeline import Batch, Prefetched, StageClock, Turn, Turns, decoded_batches
from workers.models import build_model

log = logging.getLogger(__name__)

FETCH_THREADS = 16  # concurrent GETs for loose-file shards; object stores reward parallel requests
PREFETCH_BATCHES = 2
# The dispatcher keeps 2 shards in each worker: the running one and the next, which reads and decodes ahead.
SHARD_THREADS = 4
# On CPU, batches run in parallel lanes (threads), each with torch_threads // lanes torch threads: one-thread lanes
# need no barrier between torch's threads per operator, so a core that decode or a neighbour takes for a moment
# does not stall the other. Each lane holds a batch's activations (~1 GB for MobileNetV2 at 32), hence the cap.
MAX_CPU_LANES = 4
MODELS_LOADED = 0  # models this process has built: a warm worker serving its second job still says 1


@dataclass(frozen=True)
class _JobContext:
    job: ShardJob
    stores: StorageByScheme
    input_storage: Storage
    output_storage: Storage
    predictor: Predictor


class LabelWorker:
    """Holds a model resident on its device and labels one shard per call, for any job on that model.

    What belongs to a job (its output, storage, top-k, embeddings, batch size) comes with each shard as a `ShardJob`,
    so the job service keeps workers warm between jobs: a second job on the same model loads nothing.
    """

    def __init__(self, spec: WorkerSpec, torch_threads: int):
        global MODELS_LOADED
        self.spec = spec
        self.scratch = local_scratch_dir()
        self._jobs: dict[str, _JobContext] = {}  # per job id: its storage clients and predictor settings
        loaded = build_model(spec.model, spec.storage, Path(self.scratch, "weights"))
        MODELS_LOADED += 1
        self.loaded = loaded
        self.categories = loaded.categories
        self.model_id = loaded.model_id
        self.preprocess = loaded.preprocess
        self.embedding_dim = loaded.embedding_dim
        self.device = pick_device(spec.model.device)
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()  # before the lanes' threads exist: they share the one arena
        self.lanes, threads = inference_lanes(self.device, torch_threads)
        if threads > 0:
            torch.set_num_threads(threads)
        self._predictors: dict[PredictorOptions, Predictor] = {}
        # Two shards in flight arrive at once: building two Predictors concurrently moves the one shared model
        # (`.to(channels_last)`) from two threads, which segfaulted in torch's Module._apply (ResNet-50, bench).
        self._context_lock = threading.Lock()
        self.decode_pool = ThreadPoolExecutor(spec.decode_threads, thread_name_prefix="decode")
        self.fetch_pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="fetch")
        self.lane_pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="lane")
        self.shard_pool = ThreadPoolExecutor(SHARD_THREADS, thread_name_prefix="shard")
        self.turns = Turns()
        self.shards_labelled = 0
        log.info("worker ready: %s on %s, %d lane(s) of %d torch threads", self.model_id, self.device, self.lanes,
                 torch.get_num_threads())  # fmt: skip

    def describe(self) -> dict:
        """What the driver records in the job manifest, and what the service shows of its pools."""
        compiled = next((p for p in self._predictors.values() if p.compiled and p.compile_seconds is not None), None)
        return {
            "model_id": self.model_id,
            "device": str(self.device),
            "embedding_dim": self.embedding_dim,
            "num_classes": len(self.categories),
            "preprocess": self.preprocess.model_dump(),
            "pid": os.getpid(),
            "node_id": node_id(),
            "models_loaded": MODELS_LOADED,  # in this process: 1 for a worker that never reloaded its model
            "jobs_served": len(self._jobs),
            "shards_labelled": self.shards_labelled,
            # torch.compile's first-batch time (model.compile), None until compiled or when not asked for, and
            # whether inductor's on-disk cache on this node held the kernels (hit: a pool started in seconds)
            "compile_seconds": compiled.compile_seconds if compiled else None,
            "compile_cache": compiled.compile_cache if compiled else None,
        }

    def _context(self, job: ShardJob) -> _JobContext:
        """The job's storage clients and predictor, built on its first shard here and kept for the next ones."""
        with self._context_lock:
            return self._context_locked(job)

    def _context_locked(self, job: ShardJob) -> _JobContext:
        context = self._jobs.get(job.job_id)
        if context is None or context.job != job:
            stores = StorageByScheme(job.storage)
            model = self.spec.model
            options = PredictorOptions(job.top_k, job.embeddings, model.precision, job.probabilities, model.compile,
                                       batch_size=job.batch_size if model.compile else None)  # fmt: skip
            if options not in self._predictors:  # shares the resident model; only what each job keeps differs
                self._predictors[options] = Predictor(self.loaded, self.device, options)
            context = _JobContext(job, stores, stores(job.input.uri), open_storage(job.output, job.storage),
                                  self._predictors[options])  # fmt: skip
            self._jobs[job.job_id] = context
        return context

    async def label_shard(self, task: ShardTask, attempt: int, job: ShardJob) -> ShardResult:
        """Read, decode, predict and commit one shard; returns its done-marker.

        Async so that Ray runs this worker as an asyncio actor, whose calls may overlap: the shard the dispatcher
        queues behind the running one starts reading and decoding at once, so the model does not wait for it.
        Shards hand their batches to the model in arrival order (see `Turns`): the next one's batches queue behind
        this one's last, so its commit overlaps the next shard's predictions. The work runs on threads.
        """
        turn = self.turns.take()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.shard_pool, self._label_shard, task, attempt, job, turn)

    def label_shard_blocking(self, task: ShardTask, attempt: int, job: ShardJob) -> ShardResult:
        """`label_shard` for in-process callers (tests, a plain loop)."""
        return self._label_shard(task, attempt, job, self.turns.take())

    def _label_shard(self, task: ShardTask, attempt: int, job: ShardJob, turn: Turn) -> ShardResult:
        context = self._context(job)
        writer = ShardWriter(task, self.categories, self.model_id, job.job_id)
        clock = StageClock()  # where the shard's time goes, for its done-marker
        with turn:
            source = ShardSource(context.input_storage, job.input, self.fetch_pool, context.stores, self.scratch)
            records = read_shard(source, task)
            decoder = make_decoder(job.decoder, self.preprocess, self.device)
            decoded = decoded_batches(records, decoder, self.decode_pool, job.batch_size, clock)
            with Prefetched(decoded, PREFETCH_BATCHES) as batches:  # reading starts now, before our turn
                turn.wait()
                started = time.perf_counter()  # the shard's own time: from its turn to its commit
                bytes_read = 0
                point = faults.FaultPoint(task.shard_id, attempt, faults.rules_of(job.faults))
                for batch, preds in self._predicted(clock.timed("wait", batches), point, writer, turn,
                                                    clock.timing("infer", context.predictor)):  # fmt: skip
                    with clock.stage("write"):
                        writer.add(
                            batch.meta,
                            preds.topk_indices if preds else None,
                            preds.topk_scores if preds else None,
                            preds.embeddings if preds else None,
                            preds.probabilities if preds else None,
                        )
                    bytes_read += batch.bytes_read
            stats = {"bytes_read": bytes_read, "seconds": round(time.perf_counter() - started, 3),
                     "stages": clock.stages()}  # the writer adds its commit to "write"  # fmt: skip
            result = writer.commit(context.output_storage, job.output, self.scratch, attempt, stats)
        self.shards_labelled += 1
        log.info("shard %s: %d rows, %d errors, %.1fs", task.shard_id, result.rows, result.errors, result.seconds)
        return result

    def _predicted(
        self, batches: Iterator[Batch], point: faults.FaultPoint, writer: ShardWriter, turn: Turn, predictor: Predictor
    ) -> Iterator[tuple[Batch, Predictions | None]]:  # fmt: skip
        """(batch, predictions) in batch order, up to `lanes` batches in the model at once.

        The turn ends as soon as the shard's last batch is handed to the lanes, not when the shard commits: the next
        shard's batches queue behind it, so no lane idles while this shard's last (often short) batch finishes and
        its Parquet file is written. Measured on 2 cores, MobileNetV2, 100-image shards: a quarter of the CPU sat idle
        at shard ends before.
        """

        def submitted() -> Iterator[tuple[Batch, int]]:
            rows = 0  # the shard's rows before this batch
            for batch in batches:
                point.between_batches(writer.rows)
                yield batch, rows
                rows += len(batch.meta)
            turn.end()

        def run(item: tuple[Batch, int]) -> tuple[Batch, Predictions | None]:
            batch, rows = item
            if batch.pixels is None:
                return batch, None
            return batch, self._predict(predictor, batch.pixels, point, rows)

        if self.lanes == 1:
            return map(run, submitted())
        # Twice the lanes in flight: a lane that finishes a short batch takes the next one instead of waiting for
        # its neighbour's batch, which comes first in order.
        return bounded_map(self.lane_pool, run, submitted(), window=2 * self.lanes)

    def _predict(self, predictor: Predictor, pixels: np.ndarray, point: faults.FaultPoint, rows: int) -> Predictions:
        """Predict a batch; out of memory (on any device), split it in halves and try again, down to single images."""
        try:
            point.before_predict(rows, len(pixels))
            return predictor(pixels)
        except (torch.OutOfMemoryError, RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc) or len(pixels) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(pixels) // 2
            log.warning("shard %s: out of memory on a batch of %d; splitting it", point.shard, len(pixels))
            first = self._predict(predictor, pixels[:half], point, rows)
            second = self._predict(predictor, pixels[half:], point, rows + half)
            return Predictions(
                topk_indices=np.concatenate([first.topk_indices, second.topk_indices]),
                topk_scores=np.concatenate([first.topk_scores, second.topk_scores]),
                embeddings=None if first.embeddings is None else np.concatenate([first.embeddings, second.embeddings]),
                probabilities=None
                if first.probabilities is None
                else np.concatenate([first.probabilities, second.probabilities]),
            )

    def close(self) -> None:
        for pool in (self.shard_pool, self.lane_pool, self.decode_pool, self.fetch_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.scratch, ignore_errors=True)


def inference_lanes(device: torch.device, torch_threads: int) -> tuple[int, int]:
    """(lanes, torch threads per lane) for a worker allowed `torch_threads` cores; one lane on a GPU."""
    if device.type != "cpu" or torch_threads < 2:
        return 1, torch_threads
    lanes = min(MAX_CPU_LANES, torch_threads)
    return lanes, torch_threads // lanes
