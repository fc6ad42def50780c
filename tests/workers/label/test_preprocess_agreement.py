"""The pixels that reach the model are those of torchvision's `weights.transforms()` on the decoded PIL image: sizes
computed as torchvision computes them (the resized long side truncated, the crop offset rounded), the same
interpolation and antialiasing. Checked on real photos of odd sizes with MobileNetV2's real ImageNet weights: pixels
within 1 grey level (Pillow: identical; the tensor decoders: within the deviation they state), top-1 equal, scores
within 1e-3. Reduced-DCT decoding (pillow-draft) keeps top-1 and the wider bounds it states (workers/label/decode.py,
DRAFT_KEEP), which is why `auto` never chooses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.models import MobileNet_V2_Weights
from torchvision.transforms import functional as F

from schemas.specs import ModelSpec, PreprocessSpec, StorageOptions
from tests.support import IMAGENET_SAMPLE
from workers.label.decode import DRAFT_KEEP, crop_offsets, resized_size
from workers.label.decoders import NvjpegDecoder, PillowDecoder, PillowDraftDecoder, TorchcodecDecoder
from workers.label.inference import Predictor, PredictorOptions
from workers.models import build_model

REAL_WEIGHTS = Path(torch.hub.get_dir(), "checkpoints", "mobilenet_v2-b0353104.pth")
WEIGHTS = MobileNet_V2_Weights.IMAGENET1K_V1
WEIGHTS_PRESET = PreprocessSpec(resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
COMMON_SIZES = {(500, 375), (375, 500), (500, 333), (333, 500)}
# Grey levels from the reference, as stated in workers/label/decoders.py (measured on all 200 sample photos).
MAX_DEVIATION = {"pillow": 0, "pillow-draft": 15, "torchcodec": 2, "batched-on-cpu": 2}
# Largest change of a top-5 score from the reference's: 1e-3 for every decoder `auto` may choose; reduced-DCT decoding
# measured 0.0034 on the one sample photo it reduces.
MAX_SCORE_CHANGE = {"pillow-draft": 5e-3}


def _odd_photos(count: int = 16) -> list[Path]:
    """Photos whose sizes make rounding matter: not the common 500x375/500x333, spread from the smallest (upscaled)
    to the largest, including ones where rounding the long side (or flooring the crop offset) would differ."""
    sized = []
    for path in sorted(IMAGENET_SAMPLE.glob("*.JPEG")):
        with Image.open(path) as img:
            if img.size not in COMMON_SIZES:
                sized.append((img.size, path))
    sized.sort()
    step = max(1, len(sized) // count)
    return [path for _, path in sized[::step]][:count]


def _large_photos() -> list[Path]:
    """The sample's photos large enough for reduced-DCT decoding (a short side of 2 x DRAFT_KEEP x 256 or more)."""
    large = []
    for path in sorted(IMAGENET_SAMPLE.glob("*.JPEG")):
        with Image.open(path) as img:
            if min(img.size) >= 2 * DRAFT_KEEP * 256:
                large.append(path)
    return large


PHOTOS = sorted(set(_odd_photos()) | set(_large_photos()))


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    if not REAL_WEIGHTS.is_file():
        pytest.skip(f"{REAL_WEIGHTS} missing: run `python -m jobs.offline_weights`")
    return build_model(ModelSpec(name="mobilenet_v2", weights="IMAGENET1K_V1"), StorageOptions(),
                       tmp_path_factory.mktemp("cache"))  # fmt: skip


@pytest.fixture(scope="module")
def reference(mobilenet):
    """weights.transforms() on each decoded, oriented RGB PIL image, and the model's probabilities on those."""
    preset = WEIGHTS.transforms()
    tensors = []
    for path in PHOTOS:
        with Image.open(path) as img:
            tensors.append(preset(ImageOps.exif_transpose(img).convert("RGB")))
    batch = torch.stack(tensors)
    with torch.inference_mode():
        probs = torch.softmax(mobilenet.head(mobilenet.backbone(batch)), dim=1)
    return batch, probs.numpy()


def _decoder(name: str, preprocess):
    if name == "pillow":
        return PillowDecoder(preprocess)
    if name == "pillow-draft":
        return PillowDraftDecoder(preprocess)
    if name == "torchcodec":
        return TorchcodecDecoder(preprocess)
    return NvjpegDecoder(preprocess, torch.device("cpu"))


def test_the_photos_exercise_truncation_and_offset_rounding():
    sizes = []
    for path in PHOTOS:
        with Image.open(path) as img:
            sizes.append(img.size)
    truncated = [s for s in sizes if resized_size(*s, 256) != _rounded_size(*s, 256)]
    rounded_offset = [s for s in sizes if crop_offsets(*resized_size(*s, 256), 224) != _floored(*s)]
    assert truncated and rounded_offset, sizes
    assert any(min(s) < 224 for s in sizes)  # upscaled ones too


def _rounded_size(width: int, height: int, resize: int) -> tuple[int, int]:
    scale = resize / min(width, height)
    return round(width * scale), round(height * scale)


def _floored(width: int, height: int) -> tuple[int, int]:
    w, h = resized_size(width, height, 256)
    return (w - 224) // 2, (h - 224) // 2


@pytest.mark.parametrize("size", [(600, 399), (399, 600), (500, 376), (86, 108), (257, 1000), (1000, 257), (3, 2)])
def test_sizes_and_offsets_are_torchvisions(size):
    width, height = size
    expected_h, expected_w = F._compute_resized_output_size((height, width), [256])
    assert resized_size(width, height, 256) == (expected_w, expected_h)
    crop_top = int(round((expected_h - 224) / 2.0)) if expected_h >= 224 else None
    if crop_top is not None and expected_w >= 224:
        assert crop_offsets(expected_w, expected_h, 224) == (int(round((expected_w - 224) / 2.0)), crop_top)


@pytest.mark.parametrize("decoder", list(MAX_DEVIATION))
def test_pixels_and_scores_agree_with_weights_transforms(decoder, mobilenet, reference):
    ref_batch, ref_probs = reference
    dec = _decoder(decoder, mobilenet.preprocess)
    rows, pixels = dec.batch([dec.decode(path.read_bytes()) for path in PHOTOS])
    assert all(row.ok for row in rows), [row.error for row in rows]
    pixels = np.asarray(pixels)

    # The reference is normalised floats: back to grey levels, exactly invertible up to float rounding.
    mean = torch.tensor(WEIGHTS.transforms().mean).view(1, 3, 1, 1)
    std = torch.tensor(WEIGHTS.transforms().std).view(1, 3, 1, 1)
    ref_levels = ((ref_batch * std + mean) * 255).permute(0, 2, 3, 1).numpy()
    deviation = np.abs(pixels.astype(np.float64) - ref_levels).max()
    assert deviation <= MAX_DEVIATION[decoder] + 1e-3, deviation
    assert deviation <= 1 + 1e-3 or decoder != "pillow"

    predictor = Predictor(mobilenet, torch.device("cpu"), PredictorOptions(precision="fp32", top_k=5, embeddings=False))
    out = predictor(pixels)
    assert (out.topk_indices[:, 0] == ref_probs.argmax(axis=1)).all()
    ref_scores = np.take_along_axis(ref_probs, out.topk_indices.astype(np.int64), axis=1)
    assert np.abs(out.topk_scores - ref_scores).max() < MAX_SCORE_CHANGE.get(decoder, 1e-3)


def test_reduced_dct_decoding_reduces_the_large_photos_and_only_those():
    """pillow-draft decodes a large photo at a reduced scale (its pixels differ from the exact decode's), and every
    other photo exactly as Pillow does."""
    exact, reduced = PillowDecoder(WEIGHTS_PRESET), PillowDraftDecoder(WEIGHTS_PRESET)
    large = set(_large_photos())
    assert large, "no sample photo is large enough to be decoded at a reduced scale"
    for path in PHOTOS:
        data = path.read_bytes()
        same = np.array_equal(exact.decode(data).pixels, reduced.decode(data).pixels)
        assert same is (path not in large), path.name
