"""workers.label.decoders: which decoder a worker uses for each spec choice, and the nvjpeg path on a real GPU (skipped
without one; its batched logic also runs on the CPU in test_decode.py and test_pipeline.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from schemas.specs import PreprocessSpec
from tests.support import IMAGENET_SAMPLE
from workers.label.decoders import (
    NvjpegDecoder,
    PillowDecoder,
    PillowDraftDecoder,
    TorchcodecDecoder,
    _warn_no_gpu_decoder,
    make_decoder,
    resolve_choice,
)

SPEC = PreprocessSpec(resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.mark.parametrize(
    ("choice", "device", "gpu_decode", "expected"),
    [
        ("auto", "cpu", False, "torchcodec"),  # never pillow-draft: its scores move by more than 1e-3
        ("auto", "cuda", True, "nvjpeg"),
        ("auto", "cuda", False, "torchcodec"),  # a GPU that cannot decode JPEGs
        ("nvjpeg", "cpu", False, "torchcodec"),  # the spec cannot know the workers: fall back, logged
        ("nvjpeg", "cuda", True, "nvjpeg"),
        ("pillow", "cuda", True, "pillow"),
        ("pillow-draft", "cpu", False, "pillow-draft"),
        ("torchcodec", "cuda", True, "torchcodec"),
        ("torchvision", "cpu", False, "torchcodec"),  # its former name: older specs run, with the same pixels
    ],
)
def test_resolve_choice(choice, device, gpu_decode, expected):
    assert resolve_choice(choice, device, gpu_decode) == expected


def test_make_decoder_on_this_machine(caplog):
    cpu = torch.device("cpu")
    assert isinstance(make_decoder("pillow", SPEC, cpu), PillowDecoder)
    assert isinstance(make_decoder("pillow-draft", SPEC, cpu), PillowDraftDecoder)
    assert isinstance(make_decoder("torchcodec", SPEC, cpu), TorchcodecDecoder)
    assert isinstance(make_decoder("torchvision", SPEC, cpu), TorchcodecDecoder)
    _warn_no_gpu_decoder.cache_clear()  # said once per process: this test must see it
    with caplog.at_level(logging.WARNING, logger="workers.label.decoders"):
        assert isinstance(make_decoder("nvjpeg", SPEC, cpu), TorchcodecDecoder)
    assert "using torchcodec" in caplog.text
    assert make_decoder("auto", SPEC, cpu).name == "torchcodec"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: nvjpeg decodes on the GPU only")
def test_nvjpeg_on_the_gpu_agrees_with_pillow():
    photos = [p.read_bytes() for p in sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[:32]]
    gpu, pillow = NvjpegDecoder(SPEC, torch.device("cuda")), PillowDecoder(SPEC)
    rows, pixels = gpu.batch([gpu.decode(d) for d in photos])
    _, reference = pillow.batch([pillow.decode(d) for d in photos])
    assert all(r.ok for r in rows) and pixels.device.type == "cuda"
    diff = np.abs(pixels.cpu().numpy().astype(int) - reference.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 16  # nvjpeg's IDCT and upsampling differ from libjpeg-turbo's
