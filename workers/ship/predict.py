"""A model in your own process: `load_model(...).predict([...])`, and `bulklabel predict`. No Ray, no job, no output.

The same parts as a label job's worker, so the answers are a label job's: the weights resolved and verified as
`workers.models.build_model` does (a torchvision name with its weights, or a fine-tuned artifact's folder), the same
decoder choice (`auto`: torchvision's JPEG path on CPU, Pillow for everything else), the same resize and crop
(`workers.label.decode`), the same forward pass, softmax and top-k (`workers.label.inference.Predictor`).

    from workers.ship.predict import load_model
    model = load_model("models/plants/v3")               # or load_model("resnet50", weights="IMAGENET1K_V2")
    for p in model.predict(["leaf1.jpg", "s3://bucket/leaf2.jpg"]):
        print(p.source, p.label, p.score, p.topk, p.error)
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from schemas.specs import DecoderChoice, ModelSpec, StorageOptions
from workers.io.readers import StorageByScheme
from workers.io.storage import StorageError
from workers.label.decode import Decoded
from workers.label.decoders import make_decoder
from workers.label.inference import Predictor, PredictorOptions, pick_device
from workers.models import LoadedModel, build_model

log = logging.getLogger(__name__)

BATCH = 32  # images per forward pass


@dataclass(frozen=True)
class Prediction:
    """One image's answer: its top-k (label, score) best first, its embedding, or why it could not be read."""

    source: str  # the path or URI given (`<bytes N>` for bytes)
    topk: tuple[tuple[str, float], ...] = ()
    embedding: np.ndarray | None = field(default=None, repr=False)  # the penultimate layer, float32
    image_id: str | None = None  # sha256 of the bytes, as label outputs record it
    width: int | None = None
    height: int | None = None
    error: str | None = None

    @property
    def label(self) -> str | None:
        return self.topk[0][0] if self.topk else None

    @property
    def score(self) -> float | None:
        return self.topk[0][1] if self.topk else None

    def as_dict(self) -> dict:
        """JSON-ready (no embedding: `--json` prints labels, not vectors)."""
        return {"source": self.source, "label": self.label, "score": self.score,
                "topk": [{"label": label, "score": score} for label, score in self.topk], "image_id": self.image_id,
                "width": self.width, "height": self.height, "error": self.error}  # fmt: skip


class Model:
    """A loaded model; `predict` any number of images (read, decoded and run in batches of BATCH)."""

    def __init__(self, loaded: LoadedModel, spec: ModelSpec, storage: StorageOptions, top_k: int,
                 embeddings: bool, decoder: DecoderChoice, scratch: str | None = None):  # fmt: skip
        self.loaded, self.spec = loaded, spec
        self.device = pick_device(spec.device)
        options = PredictorOptions(top_k=top_k, embeddings=embeddings, precision=spec.precision)
        self._predictor = Predictor(loaded, self.device, options)
        self._decoder = make_decoder(decoder, loaded.preprocess, self.device)
        self.storage = storage
        self._stores = StorageByScheme(storage)
        self._scratch = scratch

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def categories(self) -> list[str]:
        return self.loaded.categories

    def predict(self, images: Iterable[str | Path | bytes]) -> list[Prediction]:
        """Each image's prediction, in order; an image that cannot be read or decoded is a Prediction with `error`."""
        out: list[Prediction] = []
        batch: list[tuple[str, bytes | None, str | None]] = []
        for n, image in enumerate(images):
            batch.append(self._read(n, image))
            if len(batch) == BATCH:
                out += self._run(batch)
                batch = []
        return out + (self._run(batch) if batch else [])

    def pixels(self, images: Iterable[str | Path | bytes]) -> tuple[np.ndarray | None, list[str]]:
        """The readable images decoded, resized and cropped as a label job's decoder does ((n, crop, crop, 3) uint8,
        None when none is readable), and "<source>: <why>" for each that is not."""
        batch = [self._read(n, image) for n, image in enumerate(images)]
        rows, pixels = self._decoded(batch)
        bad = [f"{source}: {row.error}" for (source, _, _), row in zip(batch, rows, strict=True) if not row.ok]
        if pixels is not None and not isinstance(pixels, np.ndarray):  # a GPU decoder's tensor
            pixels = pixels.cpu().numpy()
        return pixels, bad

    def close(self) -> None:
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, n: int, image: str | Path | bytes) -> tuple[str, bytes | None, str | None]:
        if isinstance(image, bytes):
            return f"<bytes {n}>", image, None
        source = str(image)
        try:
            return source, self._stores(source).read_bytes(source), None
        except (OSError, StorageError) as exc:
            return source, None, f"cannot read {source}: {type(exc).__name__}: {exc}"

    def _decoded(self, batch: Sequence[tuple[str, bytes | None, str | None]]):
        decoded = [self._decoder.decode(data) if data is not None else Decoded(None, error=error)
                   for _, data, error in batch]  # fmt: skip
        return self._decoder.batch(decoded)

    def _run(self, batch: Sequence[tuple[str, bytes | None, str | None]]) -> list[Prediction]:
        rows, pixels = self._decoded(batch)
        result = self._predictor(pixels) if pixels is not None else None
        out, i = [], 0
        for (source, data, _), row in zip(batch, rows, strict=True):
            image_id = hashlib.sha256(data).hexdigest() if data is not None else None
            if not row.ok:
                out.append(Prediction(source, image_id=image_id, error=row.error))
                continue
            topk = tuple((self.categories[int(c)], float(s))
                         for c, s in zip(result.topk_indices[i], result.topk_scores[i], strict=True))  # fmt: skip
            embedding = result.embeddings[i] if result.embeddings is not None else None
            out.append(Prediction(source, topk, embedding, image_id, row.width, row.height))
            i += 1
        return out


def load_model(name: str, weights: str | None = "DEFAULT", *, weights_dir: str | None = None, top_k: int = 5,
               embeddings: bool = True, device: str = "cpu", decoder: DecoderChoice = "auto",
               storage: StorageOptions | None = None) -> Model:  # fmt: skip
    """A zoo model (`"resnet50"`, weights `"IMAGENET1K_V2"`, `"DEFAULT"` or a file) or a fine-tuned artifact's
    version folder (local or s3://; `weights` is then ignored), ready to `predict`. Bad names fail here, in one line."""
    from schemas.catalog import is_artifact_location

    if is_artifact_location(name):
        weights = None
    elif weights == "DEFAULT":
        weights = _default_weights(name)
    spec = ModelSpec(name=name, weights=weights, weights_dir=weights_dir, device=device, compile=False)
    storage = storage or StorageOptions()
    scratch = tempfile.mkdtemp(prefix="bulklabel-predict-")
    try:
        loaded = build_model(spec, storage, Path(scratch, "weights"))
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Model(loaded, spec, storage, top_k, embeddings, decoder, scratch)


def _default_weights(name: str) -> str:
    from torchvision import models as tv_models

    from workers.models import check_model_name

    check_model_name(name)
    return tv_models.get_model_weights(name).DEFAULT.name
