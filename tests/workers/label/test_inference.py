"""workers.label.inference: device and precision choice, and the Predictor's outputs on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from schemas.specs import PreprocessSpec
from workers.faults import out_of_memory_error
from workers.label.inference import (
    Predictor,
    PredictorOptions,
    autocast_dtype,
    is_out_of_memory,
    pick_device,
    static_piece,
)
from workers.models import LoadedModel

PRE = PreprocessSpec(resize_size=20, crop_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _tiny(num_classes: int = 3, dim: int = 8) -> LoadedModel:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(dim, num_classes)
    return LoadedModel(backbone, head, [f"c{i}" for i in range(num_classes)], PRE, "tiny:random")


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, PRE.crop_size, PRE.crop_size, 3), dtype=np.uint8)


def test_pick_device():
    # cpu on a machine without CUDA (the test machine); cuda where torch sees a GPU.
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize(
    ("device", "precision", "expected"),
    [
        ("cpu", "auto", None),
        ("cpu", "fp32", None),
        ("cuda", "auto", torch.bfloat16),
        ("cuda", "fp32", None),
        ("cuda", "fp16", torch.float16),
        ("cpu", "fp16", torch.float16),
        ("cpu", "bf16", torch.bfloat16),
        ("cuda", "bf16", torch.bfloat16),
    ],
)
def test_autocast_dtype(device, precision, expected):
    assert autocast_dtype(torch.device(device), precision) == expected


def test_predictor_outputs():
    predictor = Predictor(
        _tiny(num_classes=5), torch.device("cpu"), PredictorOptions(precision="auto", top_k=2, embeddings=True)
    )
    out = predictor(_pixels(4))
    assert out.topk_indices.shape == out.topk_scores.shape == (4, 2)
    assert out.topk_indices.dtype == np.int32 and out.topk_scores.dtype == np.float32
    assert out.embeddings.shape == (4, 8) and out.embeddings.dtype == np.float32
    assert (np.diff(out.topk_scores, axis=1) <= 0).all()
    assert ((out.topk_indices >= 0) & (out.topk_indices < 5)).all()


def test_predictor_matches_reference_normalisation():
    """uint8 NHWC in → the same logits as the plain torchvision-style float pipeline."""
    loaded = _tiny(num_classes=4)
    pixels = _pixels(3)
    predictor = Predictor(loaded, torch.device("cpu"), PredictorOptions(precision="fp32", top_k=4, embeddings=True))
    out = predictor(pixels)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(PRE.mean).view(1, 3, 1, 1)) / torch.tensor(PRE.std).view(1, 3, 1, 1)
    with torch.no_grad():
        features = loaded.backbone(x.contiguous())
        probs = torch.softmax(loaded.head(features), dim=1)
    np.testing.assert_allclose(out.embeddings, features.numpy(), rtol=1e-4, atol=1e-5)
    expected_scores, expected_indices = torch.topk(probs, 4, dim=1)
    np.testing.assert_allclose(out.topk_scores, expected_scores.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(out.topk_indices, expected_indices.numpy())
    np.testing.assert_allclose(out.topk_scores.sum(axis=1), 1.0, rtol=1e-5)


def test_embeddings_disabled_returns_none():
    predictor = Predictor(_tiny(), torch.device("cpu"), PredictorOptions(precision="auto", top_k=1, embeddings=False))
    out = predictor(_pixels(2))
    assert out.embeddings is None
    assert out.topk_indices.shape == (2, 1)


def test_top_k_capped_at_number_of_classes():
    predictor = Predictor(
        _tiny(num_classes=3), torch.device("cpu"), PredictorOptions(precision="auto", top_k=10, embeddings=True)
    )
    assert predictor.top_k == 3
    out = predictor(_pixels(2))
    assert out.topk_indices.shape == out.topk_scores.shape == (2, 3)
    assert sorted(out.topk_indices[0].tolist()) == [0, 1, 2]


def test_cpu_bf16_autocast_runs():
    predictor = Predictor(_tiny(), torch.device("cpu"), PredictorOptions(precision="bf16", top_k=2, embeddings=True))
    assert predictor.amp_dtype == torch.bfloat16
    out = predictor(_pixels(2))
    assert out.embeddings.dtype == np.float32 and out.topk_scores.dtype == np.float32
    assert np.isfinite(out.topk_scores).all()


def test_a_real_cpu_allocation_failure_is_recognised_as_out_of_memory():
    """On CPU torch raises a plain RuntimeError, not torch.OutOfMemoryError: it must still count as out of memory."""
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 62, dtype=torch.uint8)  # 4 EiB: refused by the allocator at once, nothing is touched
    assert not isinstance(info.value, torch.OutOfMemoryError)
    assert "DefaultCPUAllocator: can't allocate memory" in str(info.value)
    assert is_out_of_memory(info.value)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (out_of_memory_error("cpu", 32, 1), True),  # what the fault injection raises matches the real one
        (out_of_memory_error("cuda", 32, 1), True),
        (MemoryError(), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x3)"), False),
        (ValueError("DefaultCPUAllocator: can't allocate memory"), False),  # only torch's RuntimeError form
    ],
)
def test_is_out_of_memory(error, expected):
    assert is_out_of_memory(error) is expected


@pytest.mark.gpu
def test_a_real_cuda_allocation_failure_is_recognised_as_out_of_memory():
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 60, dtype=torch.uint8, device="cuda")
    assert is_out_of_memory(info.value)


# ------------------------------------------------------------------------------------------- compile: static shapes


def _recording(predictor: Predictor, attribute: str) -> list[tuple[int, ...]]:
    """The shapes each call of the predictor's `attribute` (its compiled or its eager backbone) receives."""
    inner, shapes = getattr(predictor, attribute), []

    def recording(x):
        shapes.append(tuple(x.shape))
        return inner(x)

    setattr(predictor, attribute, recording)
    return shapes


def _compiled(batch_size: int | None = None, num_classes: int = 3) -> Predictor:
    # Dynamo's `eager` backend: inductor's C++ compile takes minutes; what is tested is the calls' shapes.
    options = PredictorOptions(precision="fp32", top_k=3, embeddings=True, compile=True, compile_backend="eager",
                               batch_size=batch_size)  # fmt: skip
    return Predictor(_tiny(num_classes=num_classes), torch.device("cpu"), options)


def test_compiled_predictor_runs_one_shape_the_short_last_batch_eager_and_matches_eager():
    """compile: every compiled call has the first batch's size; the short last batch runs through the uncompiled
    backbone instead of being padded (padding computed images nobody asked for); outputs equal the eager
    predictor's."""
    eager = Predictor(_tiny(num_classes=5), torch.device("cpu"), PredictorOptions(precision="fp32", top_k=3,
                                                                                   embeddings=True))  # fmt: skip
    compiled = _compiled(num_classes=5)
    compiled.chunk = None  # as on a GPU: the static size is the batch's
    compiled_shapes, eager_shapes = _recording(compiled, "backbone"), _recording(compiled, "eager_backbone")
    for n in (8, 8, 3):
        pixels = _pixels(n)
        got, want = compiled(pixels), eager(pixels)
        np.testing.assert_array_equal(got.topk_indices, want.topk_indices)
        np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-5)
        assert len(got.embeddings) == n
    crop = PRE.crop_size
    assert (compiled_shapes, eager_shapes) == ([(8, 3, crop, crop)] * 2, [(3, 3, crop, crop)])
    assert compiled.compile_seconds is not None and compiled.compile_seconds >= 0


def test_compiled_predictor_on_cpu_splits_a_batch_into_equal_pieces_within_the_chunk():
    compiled = _compiled()
    compiled.chunk = 4
    compiled_shapes, eager_shapes = _recording(compiled, "backbone"), _recording(compiled, "eager_backbone")
    out = compiled(_pixels(12))  # 3 x 4: nothing padded, nothing left over
    assert out.embeddings.shape == (12, 8)
    assert [shape[0] for shape in compiled_shapes] == [4, 4, 4] and eager_shapes == []
    eager = Predictor(_tiny(), torch.device("cpu"), PredictorOptions(precision="fp32", top_k=1, embeddings=True))
    np.testing.assert_allclose(out.embeddings, eager(_pixels(12)).embeddings, atol=1e-5)


def test_a_jobs_short_first_batch_runs_eager_and_its_first_whole_batch_compiles():
    """With the job's batch size given, the graph's shape is known before any batch: a 3-image first call (a small
    first shard) runs eager and compiles nothing, so the lanes' first whole batch is the one that compiles."""
    compiled = _compiled(batch_size=8)
    compiled.chunk = None
    compiled_shapes, eager_shapes = _recording(compiled, "backbone"), _recording(compiled, "eager_backbone")
    compiled(_pixels(3))
    assert compiled.compile_seconds is None and compiled_shapes == [] and len(eager_shapes) == 1
    compiled(_pixels(8))
    assert compiled.compile_seconds is not None and [shape[0] for shape in compiled_shapes] == [8]


@pytest.mark.parametrize(
    ("images", "chunk", "piece"),
    [
        (32, None, 32),  # a GPU: the whole batch
        (5, 10, 5),  # fits in one chunk
        (32, 10, 8),  # MobileNetV2's chunk: 4 x 8, where pieces of 10 padded 32 images to 40
        (32, 15, 8),  # ResNet-50's: 4 x 8, where 15s padded 32 to 45
        (64, 48, 32),
        (50, 10, 10),
        (37, 10, 10),  # prime: 3 x 10 compiled, 7 eager (a divisor of 1 would run 37 one-image graphs)
    ],
)
def test_static_piece(images, chunk, piece):
    assert static_piece(images, chunk) == piece
    assert piece <= (chunk or images)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: pinned, non-blocking copies need a GPU")
def test_gpu_predictor_copies_through_a_pinned_buffer():
    predictor = Predictor(_tiny(), torch.device("cuda"), PredictorOptions(precision="auto", top_k=1, embeddings=True))
    first = predictor(_pixels(4))
    assert predictor._pinned.buffer.is_pinned()
    np.testing.assert_allclose(predictor(_pixels(4)).embeddings, first.embeddings, atol=1e-2)  # bf16
