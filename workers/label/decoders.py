"""Decoders you can choose (`decoder:` in the spec): bytes → batches of centre-cropped RGB uint8 pixels.

- `pillow`: Pillow decode and resize; pixels identical to torchvision's `weights.transforms()` on the PIL image.
- `torchcodec`: torchcodec's `decode_jpeg` (libjpeg-turbo) and the v2 tensor resize on the CPU; measured on the 200
  ImageNet sample photos: decoded pixels identical to Pillow's (and to torchvision.io.decode_jpeg's, which it
  replaces: torchvision 0.29 deprecates its image decoders for torchcodec), resized ones within 2 grey levels of the
  reference (mean 0.002), and less CPU per photo than Pillow (bench/RESULTS.md, `python -m bench.decode`).
- `pillow-draft`: Pillow, with JPEGs of at least 4x the model's resize decoded at a reduced DCT scale (decode.py's
  DRAFT_KEEP: the measured deviation, up to 15 grey levels, and why 4x); on a 12 MP photo that skips most of the
  decode. Chosen only by name.
- `nvjpeg`: the batch's JPEGs decoded together on the GPU (torchcodec's `decode_jpeg(..., device="cuda")`), resized
  and cropped there, so only compressed bytes cross the bus.
- `auto`: nvjpeg when the worker holds a GPU, torchcodec otherwise. `torchvision`: torchcodec's former name.

Every decoder but Pillow takes only the images its fast path applies to: baseline JPEGs in RGB or greyscale, not
too elongated. PNGs, CMYK, progressive or corrupt JPEGs (and anything else) go to Pillow one image at a time, so a
hostile image is one error row, never a failed batch. A decoder works in two steps: `decode` in the decode threads
(one image), `batch` when a batch is complete (the GPU step; a plain stack on CPU).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from schemas.specs import DecoderChoice, PreprocessSpec
from workers.label.decode import Decoded, decode, open_image, oriented_size

if TYPE_CHECKING:
    import torch

    Pixels = np.ndarray | torch.Tensor  # (n, crop, crop, 3) uint8: numpy on the CPU, a tensor on the GPU

log = logging.getLogger(__name__)

# Above this long/short side ratio the fast paths leave the image to Pillow, which resizes only the part that lands
# in the crop (a 1x60000 JPEG resized whole is gigabytes).
MAX_FAST_ASPECT = 4
_FAST_MODES = ("RGB", "L")


class Decoder(Protocol):
    """Turns image bytes into rows and batches of pixels."""

    name: str

    def decode(self, data: bytes) -> Decoded:
        """One image, in a decode thread: its pixels, an error row, or (batched decoders) the checked bytes."""

    def batch(self, decoded: Sequence[Decoded]) -> tuple[list[Decoded], Pixels | None]:
        """The batch's rows as final (a deferred image may turn out corrupt) and the pixels of the good ones, in row
        order (None when there are none)."""


class PillowDecoder:
    """Pillow, one image per call: exact, any accepted format."""

    name = "pillow"
    reduced_dct = False  # PillowDraftDecoder: large JPEGs at a reduced DCT scale

    def __init__(self, preprocess: PreprocessSpec):
        self.preprocess = preprocess

    def decode(self, data: bytes) -> Decoded:
        return decode(data, self.preprocess, reduced_dct=self.reduced_dct)

    def batch(self, decoded: Sequence[Decoded]) -> tuple[list[Decoded], np.ndarray | None]:
        return list(decoded), stack_cpu(decoded)


def stack_cpu(decoded: Sequence[Decoded]) -> np.ndarray | None:
    pixels = [d.pixels for d in decoded if d.ok]
    return np.stack(pixels) if pixels else None


def fast_jpeg(data: bytes) -> tuple[int, int] | Decoded | None:
    """The oriented (width, height) of a JPEG the fast paths can take; an error row for bytes that are not an image
    at all; None for an image Pillow must decode (another format, CMYK, progressive, elongated)."""
    opened = open_image(data)
    if isinstance(opened, Decoded):
        return opened
    with opened as img:
        if img.format != "JPEG" or img.mode not in _FAST_MODES or img.info.get("progressive"):
            return None
        if max(img.size) > MAX_FAST_ASPECT * min(img.size):
            return None
        try:
            return oriented_size(img)
        except Exception:  # noqa: BLE001 - damaged EXIF: Pillow decides what this image is
            return None


class PillowDraftDecoder(PillowDecoder):
    """Pillow, large JPEGs decoded at a reduced DCT scale (decode.DRAFT_KEEP)."""

    name = "pillow-draft"
    reduced_dct = True


class TorchcodecDecoder:
    """torchcodec's `decode_jpeg` and the v2 uint8 resize on the CPU, Pillow for what that does not apply to."""

    name = "torchcodec"

    def __init__(self, preprocess: PreprocessSpec):
        from workers.vision import torchvision

        self.preprocess = preprocess
        self.pillow = PillowDecoder(preprocess)
        self.interpolation = torchvision.transforms.InterpolationMode(preprocess.interpolation)

    def decode(self, data: bytes) -> Decoded:
        size = fast_jpeg(data)
        if not isinstance(size, tuple):
            return size if isinstance(size, Decoded) else self.pillow.decode(data)
        try:
            image = decode_jpeg_tensor(data, "cpu")
        except RuntimeError:  # libjpeg refused it (truncated, corrupt): Pillow names the error, or copes
            return self.pillow.decode(data)
        crop = resize_crop_tensor(image, self.preprocess, self.interpolation)
        return Decoded(crop.permute(1, 2, 0).numpy(), *size)

    def batch(self, decoded: Sequence[Decoded]) -> tuple[list[Decoded], np.ndarray | None]:
        return list(decoded), stack_cpu(decoded)


def decode_jpeg_tensor(data: bytes, device: str):
    """(3, h, w) uint8, EXIF orientation applied (as Pillow's exif_transpose), greyscale expanded to RGB."""
    return decode_jpeg_batch([data], device)[0]


def resize_crop_tensor(image, preprocess: PreprocessSpec, interpolation):
    """torchvision's Resize(resize_size, antialias=True) then CenterCrop(crop_size) on a (3, h, w) uint8 tensor."""
    from workers.vision import transforms_v2

    F = transforms_v2().functional

    resized = F.resize(image, [preprocess.resize_size], interpolation=interpolation, antialias=True)
    return F.center_crop(resized, [preprocess.crop_size])


class NvjpegDecoder:
    """The batch's fast-path JPEGs decoded together on the GPU and resized there; the rest through Pillow."""

    name = "nvjpeg"

    def __init__(self, preprocess: PreprocessSpec, device: torch.device):
        from workers.vision import torchvision

        self.preprocess = preprocess
        self.device = device
        self.pillow = PillowDecoder(preprocess)
        self.interpolation = torchvision.transforms.InterpolationMode(preprocess.interpolation)

    def decode(self, data: bytes) -> Decoded:
        size = fast_jpeg(data)
        if isinstance(size, tuple):
            return Decoded(None, *size, jpeg=data)  # decoded with the batch, on the GPU
        return size if isinstance(size, Decoded) else self.pillow.decode(data)

    def batch(self, decoded: Sequence[Decoded]) -> tuple[list[Decoded], Pixels | None]:
        import torch

        rows = list(decoded)
        deferred = [i for i, d in enumerate(rows) if d.jpeg is not None]
        crops = dict(zip(deferred, self._gpu_crops([rows[i].jpeg for i in deferred]), strict=True))
        for i, crop in list(crops.items()):
            if crop is None:  # the GPU refused it: Pillow decides (pixels or the error row)
                rows[i] = self.pillow.decode(rows[i].jpeg)
                del crops[i]
            else:
                rows[i] = Decoded(None, rows[i].width, rows[i].height)
        pixels = [
            crops[i] if i in crops else torch.tensor(d.pixels).to(self.device, non_blocking=True)  # Pillow's: read-only
            for i, d in enumerate(rows)
            if d.ok
        ]
        return rows, (torch.stack(pixels) if pixels else None)

    def _gpu_crops(self, jpegs: list[bytes]) -> list:
        """(crop, crop, 3) uint8 tensors on the GPU, None for each image the GPU could not decode. One batched call;
        if it fails (one corrupt image fails them all), one call per image."""
        if not jpegs:
            return []
        try:
            images = decode_jpeg_batch(jpegs, self.device)
        except RuntimeError:
            images = []
            for data in jpegs:
                try:
                    images.append(decode_jpeg_batch([data], self.device)[0])
                except RuntimeError:
                    images.append(None)
        return [
            None if image is None else resize_crop_tensor(image, self.preprocess, self.interpolation).permute(1, 2, 0)
            for image in images
        ]


def decode_jpeg_batch(jpegs: list[bytes], device) -> list:
    """torchcodec's decode_jpeg on a list (one call: on a GPU, nvjpeg decodes them together). It applies the EXIF
    orientation and expands greyscale to RGB, as torchvision.io.decode_jpeg(mode=RGB, apply_exif_orientation=True)
    did: the same pixels on all 200 sample photos and the oriented test images (tests/workers/label/test_decode.py)."""
    import torch
    from torchcodec.decoders import decode_jpeg

    raws = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]  # a copy: read-only bytes warn
    return decode_jpeg(raws, mode="RGB", device=device)


def resolve_choice(choice: DecoderChoice, device_type: str, gpu_decode_available: bool) -> str:
    """The decoder a worker on `device_type` uses for `choice`: auto → nvjpeg on a GPU that can decode JPEGs, else
    torchcodec; nvjpeg without a GPU falls back to torchcodec (logged), since the spec cannot know the workers;
    torchvision is torchcodec's former name."""
    on_gpu = device_type == "cuda" and gpu_decode_available
    if choice == "auto":
        return "nvjpeg" if on_gpu else "torchcodec"
    if choice == "nvjpeg" and not on_gpu:
        _warn_no_gpu_decoder(device_type)
        return "torchcodec"
    return "torchcodec" if choice == "torchvision" else choice


@functools.cache
def _warn_no_gpu_decoder(device_type: str) -> None:
    """Once per process: the choice is resolved for every shard."""
    log.warning("decoder nvjpeg asked for on a worker without a CUDA JPEG decoder (%s): using torchcodec", device_type)


def gpu_decode_available() -> bool:
    """Whether torch sees a CUDA device (torchcodec decodes JPEGs there with the nvJPEG it ships)."""
    import torch

    return torch.cuda.is_available()


_CPU_DECODERS = {"pillow": PillowDecoder, "pillow-draft": PillowDraftDecoder, "torchcodec": TorchcodecDecoder}


def make_decoder(choice: DecoderChoice, preprocess: PreprocessSpec, device: torch.device) -> Decoder:
    """The decoder for a worker's `device`, built in the worker (see `resolve_choice`)."""
    name = resolve_choice(choice, device.type, device.type == "cuda" and gpu_decode_available())
    if name == "nvjpeg":
        return NvjpegDecoder(preprocess, device)
    return _CPU_DECODERS[name](preprocess)
