"""The embedding pass: one forward pass of the frozen base model over every image of a fine-tune job.

Its results serve three things, each of which would otherwise need its own pass:
- the near-duplicate groups of the split (content sha256 of each image's bytes, embedding cosine);
- the linear probe: a convex fit on the embeddings (workers.finetune.probe), the whole `linear-probe` method;
- lp-ft's first stage: that fitted head, handed to the training workers as their starting head.

The embeddings are computed here, by the training side's own model code, rather than by a label job writing them
to a scratch output: the split needs each image's sha256 (which label rows do not carry) and the preprocessing of
the run's crop size (a label job uses the preset's, or an artifact's card), and the embeddings stay in this
actor's memory between the calls instead of going through Parquet. The forward pass is the label path's: its
decoder, its normalisation (mean and std x 255 on uint8), the backbone in eval mode; so a `linear-probe` artifact
labels exactly as it was fitted (the tests check that a label job reproduces the card's accuracy).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from schemas.finetune import FinetuneJobSpec
from schemas.specs import PreprocessSpec
from workers.finetune.dataplan import _OBJECT_ERRORS
from workers.finetune.grouping import Groups, near_duplicate_groups
from workers.finetune.probe import balanced_weights, fit_linear_head
from workers.finetune.results import Embedded, LinearHead, ProbeFit
from workers.io.storage import local_scratch_dir, open_storage
from workers.label.decode import decode
from workers.label.inference import autocast_dtype
from workers.models import build_model

log = logging.getLogger(__name__)

BATCH = 64
CACHE_ENV = "BULKLABEL_CACHE_DIR"  # where EmbeddingCache keeps its files (else $XDG_CACHE_HOME/bulklabel)
READ_THREADS = 8  # reads overlap on object stores; Pillow decodes release the GIL


class EmbeddingCache:
    """Embeddings kept on this node by image content: `<cache>/embeddings/<model key>/<sha256>.npy`, one small file
    per image, written whole (a temporary, then a rename). The key covers what decides an embedding (the model id,
    its preprocessing, its precision), so a changed model or crop never reads another's. Opt-in (compare-backbones):
    a fine-tune of 40 million images must not leave 200 GB behind. Delete the folder at any time."""

    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def of(cls, model_id: str, preprocess: PreprocessSpec, precision: str) -> EmbeddingCache:
        key = hashlib.sha256(f"{model_id}|{preprocess.model_dump_json()}|{precision}".encode()).hexdigest()[:24]
        root = Path(os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                       "bulklabel"))  # fmt: skip
        return cls(root / "embeddings" / key)

    def get(self, sha256: str) -> np.ndarray | None:
        try:
            return np.load(self.folder / f"{sha256}.npy", allow_pickle=False)
        except (OSError, ValueError):  # absent, or a file cut short: embedded again
            return None

    def put(self, rows: dict[str, np.ndarray]) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for sha256, row in rows.items():
                tmp = self.folder / f".{sha256}.{os.getpid()}.tmp.npy"
                np.save(tmp, row.astype(np.float32), allow_pickle=False)
                os.replace(tmp, self.folder / f"{sha256}.npy")
        except OSError as exc:  # a full or read-only disk costs the next run its reuse, never this one its result
            log.warning("embedding cache %s not written: %s", self.folder, exc)


class EmbeddingPass:
    """Holds the frozen base model and, after `embed`, every image's embedding (a Ray actor on the driver's side,
    a plain object in tests)."""

    def __init__(self, job: FinetuneJobSpec, threads: int = 1, cache: bool = False):
        from workers.finetune.data import scaled_preprocess

        torch.set_num_threads(max(1, threads))
        self.job = job
        self.device = torch.device("cuda" if job.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")
        self.scratch = local_scratch_dir()
        loaded = build_model(job.base, job.storage, Path(self.scratch, "weights"))
        self.backbone = loaded.backbone.eval().to(self.device)
        self.preprocess: PreprocessSpec = scaled_preprocess(
            loaded.preprocess, job.training.image_size or loaded.preprocess.crop_size
        )
        self.amp_dtype = autocast_dtype(self.device, job.base.precision)
        self.cache = EmbeddingCache.of(loaded.model_id, self.preprocess, job.base.precision) if cache else None
        self.embeddings = np.zeros((0, loaded.embedding_dim), np.float32)
        self.labels = np.zeros(0, np.int64)

    def embed(self, items: list[tuple[str, int]], forward: bool = True) -> Embedded:
        """Read, hash, decode and (with `forward`) embed every (uri, class index); unreadable images get a zero row.
        Without `forward` the rows stay zero: the pass only finds the unreadable images."""
        from workers.finetune.loop import Normalise

        started = time.perf_counter()
        storage = open_storage(self.job.data.uri, self.job.storage)
        normalise = Normalise(self.preprocess, self.device)
        out = np.zeros((len(items), self.embeddings.shape[1]), np.float32)
        sha256s: list[str | None] = [None] * len(items)
        skipped: list[str] = []
        with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="embed-read") as pool:
            for start in range(0, len(items), BATCH):
                chunk = items[start : start + BATCH]
                pixels, rows = [], []
                for offset, (digest, decoded, problem) in enumerate(pool.map(lambda i: self._read(storage, i), chunk)):
                    if problem:
                        skipped.append(problem)
                        continue
                    sha256s[start + offset] = digest
                    if isinstance(decoded, np.ndarray) and decoded.ndim == 1:  # the cache had its embedding
                        out[start + offset] = decoded
                        continue
                    pixels.append(torch.from_numpy(np.ascontiguousarray(decoded.transpose(2, 0, 1))))
                    rows.append(start + offset)
                if pixels and forward:
                    out[rows] = self._forward(normalise(torch.stack(pixels)))
                    if self.cache is not None:
                        self.cache.put({sha256s[r]: out[r] for r in rows})
        self.embeddings, self.labels = out, np.array([label for _, label in items], np.int64)
        seconds = time.perf_counter() - started
        log.info("embedding pass: %d images (%d unreadable) in %.1fs", len(items), len(skipped), seconds)
        return Embedded(tuple(sha256s), tuple(skipped), out.shape[1], seconds, self.preprocess)

    def _read(self, storage, item: tuple[str, int]) -> tuple[str | None, np.ndarray | None, str | None]:
        uri = item[0]
        try:
            data = storage.read_bytes(uri)
        except _OBJECT_ERRORS as exc:
            return None, None, f"{uri}: cannot read: {type(exc).__name__}: {exc}"
        digest = hashlib.sha256(data).hexdigest()
        cached = self.cache.get(digest) if self.cache is not None else None
        if cached is not None:  # the same bytes were decoded and embedded by this model before: only hashed now
            return digest, cached, None
        decoded = decode(data, self.preprocess)
        if decoded.pixels is None:
            return None, None, f"{uri}: {decoded.error}"
        return digest, decoded.pixels, None

    @torch.inference_mode()
    def _forward(self, batch: torch.Tensor) -> np.ndarray:
        if self.amp_dtype is None:
            return self.backbone(batch).float().cpu().numpy()
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            return self.backbone(batch).float().cpu().numpy()

    def readable(self) -> list[bool]:
        """Per row, whether its image was read (an unreadable row's embedding is all zero)."""
        return (np.abs(self.embeddings).sum(1) > 0).tolist()

    def groups(self, count: int, sha256s: tuple[str | None, ...], threshold: float) -> Groups:
        """Near-duplicate groups among the first `count` images (the ones the split divides)."""
        return near_duplicate_groups(self.labels[:count], sha256s[:count], self.embeddings[:count], threshold)

    def fit(self, train: list[int], val: list[int], num_classes: int, smoothing: float, l2: float | None = None
            ) -> ProbeFit:  # fmt: skip
        """The convex fit of a head on the embeddings of rows `train`, scored on rows `val` (unreadable rows, all
        zero, are left out of both), with L2 penalty `l2` (default: the spec's probe_l2)."""
        started = time.perf_counter()
        readable = np.abs(self.embeddings).sum(1) > 0
        train = [i for i in train if readable[i]]
        val = [i for i in val if readable[i]]
        t = self.job.training
        labels = self.labels[train]
        weights = balanced_weights(labels, num_classes) if t.class_weights == "balanced" else None
        head = fit_linear_head(self.embeddings[train], labels, num_classes, t.probe_l2 if l2 is None else l2, weights)
        counts = np.bincount(labels, minlength=num_classes).clip(min=1)
        class_w = None if weights is None else torch.tensor(len(labels) / (num_classes * counts), dtype=torch.float32)
        train_loss, train_acc, _ = _score(head, self.embeddings[train], labels, num_classes, smoothing, class_w)
        val_loss, val_acc, confusion = _score(head, self.embeddings[val], self.labels[val], num_classes, smoothing,
                                              class_w)  # fmt: skip
        seconds = time.perf_counter() - started
        log.info("linear probe: %d L-BFGS iterations in %.2fs; train acc %.3f, val acc %.3f", head.iterations,
                 seconds, train_acc, val_acc)  # fmt: skip
        return ProbeFit(head, train_loss, train_acc, val_loss, val_acc, confusion, seconds)

    def out_of_sample(self, folds: np.ndarray, num_classes: int, l2s: tuple[float, ...]) -> tuple[np.ndarray, float]:
        """Each readable row's class probabilities from a probe fitted on the other folds' rows (`folds[i]`: row
        i's fold), so no image is scored by a probe that saw it; unreadable rows (all zero) get a zero row. The
        probes' L2 penalty is the one of `l2s` whose out-of-sample log-likelihood of the given labels is best
        (noisy labels want more than a fine-tune's). Returns the probabilities and that penalty. What confident
        learning needs (workers.curate.confident)."""
        started = time.perf_counter()
        readable = np.abs(self.embeddings).sum(1) > 0
        best: tuple[float, np.ndarray, float] | None = None
        for l2 in l2s:
            probs = self._cross_validated(folds, readable, num_classes, l2)
            given = probs[readable, self.labels[readable]]
            loss = float(-np.log(np.clip(given, 1e-12, 1.0)).mean())
            log.info("probes with L2 %g: out-of-sample log loss %.4f", l2, loss)
            if best is None or loss < best[0]:
                best = (loss, probs, l2)
        log.info("out-of-sample probabilities: %d folds x %d penalties in %.2fs; L2 %g chosen",
                 len(np.unique(folds[readable])), len(l2s), time.perf_counter() - started, best[2])  # fmt: skip
        return best[1], best[2]

    def _cross_validated(self, folds: np.ndarray, readable: np.ndarray, num_classes: int, l2: float) -> np.ndarray:
        out = np.zeros((len(self.labels), num_classes), np.float64)
        for fold in np.unique(folds[readable]):
            held = readable & (folds == fold)
            fitted = readable & ~held
            head = fit_linear_head(self.embeddings[fitted], self.labels[fitted], num_classes, l2)
            logits = head.logits(self.embeddings[held]).astype(np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            out[held] = probs / probs.sum(axis=1, keepdims=True)
        return out

    def artifact_weights(self, head: LinearHead) -> bytes:
        """The safetensors state dict (`backbone.*`, `head.*`) of the base model with `head`: what label jobs load."""
        from safetensors.torch import save

        state = {f"backbone.{k}": v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        state |= {"head.weight": torch.from_numpy(head.weight.copy()), "head.bias": torch.from_numpy(head.bias.copy())}
        return save(state)

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def _score(head: LinearHead, x: np.ndarray, y: np.ndarray, n: int, smoothing: float, class_w: torch.Tensor | None
           ) -> tuple[float, float, tuple[tuple[int, ...], ...]]:  # fmt: skip
    """(loss as the training loop computes it, accuracy, confusion matrix) of `head` on rows `x`."""
    confusion = np.zeros((n, n), np.int64)
    if not len(y):
        return 0.0, 0.0, tuple(map(tuple, confusion.tolist()))
    logits = torch.from_numpy(head.logits(x))
    target = torch.from_numpy(y)
    loss = torch.nn.functional.cross_entropy(logits, target, weight=class_w, label_smoothing=smoothing)
    predicted = logits.argmax(1).numpy()
    np.add.at(confusion, (y, predicted), 1)
    return float(loss), float((predicted == y).mean()), tuple(map(tuple, confusion.tolist()))


def weights_file(data: bytes, folder: Path) -> Path:
    """`data` (safetensors bytes) as a file in `folder`, for `publish`."""
    path = folder / "best.safetensors"
    with io.FileIO(path, "w") as fh:
        fh.write(data)
    return path
