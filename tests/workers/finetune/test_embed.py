"""workers/finetune/embed.py's cache: an embedding pass asked to keep its embeddings reuses them by content on the
next pass (no decode, no forward), and never across models or preprocessing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from schemas.finetune import FinetuneJobSpec
from tests.support import PLANTS
from workers.finetune import embed as embed_module
from workers.finetune.embed import EmbeddingCache, EmbeddingPass


@pytest.fixture
def data(tmp_path):
    for name in ("Potato___healthy", "Potato___Late_blight"):
        (tmp_path / "d" / name).mkdir(parents=True)
        for photo in sorted((PLANTS / name).iterdir())[:3]:
            shutil.copy(photo, tmp_path / "d" / name / photo.name)
    (tmp_path / "d" / "Potato___healthy" / "broken.JPG").write_bytes(b"not an image")
    return tmp_path / "d"


def test_a_second_pass_reuses_the_embeddings_by_content_and_only_for_the_same_model(data, tmp_path, monkeypatch):
    monkeypatch.setenv("BULKLABEL_CACHE_DIR", str(tmp_path / "cache"))
    spec = FinetuneJobSpec(data={"uri": str(data)}, base={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
                           output=str(tmp_path / "out"))  # fmt: skip
    items = [(str(p), 0) for p in sorted(data.rglob("*.JPG"))]
    first = EmbeddingPass(spec, cache=True)
    embedded = first.embed(items)
    before = first.embeddings.copy()
    assert len(embedded.skipped) == 1 and len(list(first.cache.folder.glob("*.npy"))) == 6

    def no_decode(*args):
        raise AssertionError("decoded although the cache had the embedding")

    monkeypatch.setattr(embed_module, "decode", no_decode)
    again = EmbeddingPass(spec, cache=True)
    with pytest.raises(AssertionError, match="decoded although"):  # the broken file is not cached: decoded again
        again.embed(items)
    readable = [item for item in items if not item[0].endswith("broken.JPG")]
    again.embed(readable)
    np.testing.assert_array_equal(again.embeddings, before[[i for i, it in enumerate(items) if it in readable]])
    other = EmbeddingCache.of("mobilenet_v2:IMAGENET1K_V1", first.preprocess.model_copy(update={"crop_size": 160}),
                              "auto")  # fmt: skip
    assert other.folder != first.cache.folder and other.get(embedded.sha256s[0] or embedded.sha256s[1]) is None
