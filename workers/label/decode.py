"""Image bytes → a centre-cropped RGB uint8 array, plus the original size, or an error message.

Everything here runs in decode threads: Pillow releases the GIL while it decodes and resizes, so
threads overlap with the model. Hostile input (truncated, not an image, decompression bombs) must
become an error string for one row, never an exception that ends the shard.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from schemas.specs import PreprocessSpec

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
# EXIF orientations that swap width and height.
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
# Only formats that are photos; Pillow would also open EPS (running Ghostscript) and other exotica. These are the
# names of Pillow's *openers*, each registered by the plugin imported above (checked below). Multi-picture JPEGs
# (MPO, from stereo and some phone cameras) come through the JPEG opener: "MPO" has no opener of its own, and naming
# it here made every file that no earlier format accepted (a text file called x.jpg) fail with KeyError: 'MPO'.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_PLUGINS = (JpegImagePlugin, PngImagePlugin, WebPImagePlugin, GifImagePlugin, BmpImagePlugin, TiffImagePlugin)


def _check_openers(formats: tuple[str, ...]) -> None:
    """Fail at import, naming them, if any accepted format has no registered opener (Image.open would raise a bare
    KeyError on the first file that earlier formats reject)."""
    missing = [name for name in formats if name not in Image.OPEN]
    if missing:
        raise ImportError(f"Pillow {Image.__version__} registers no opener for {missing}: fix ACCEPTED_FORMATS")


_check_openers(ACCEPTED_FORMATS)
# Pillow only warns between its limit and twice that; we refuse at its limit (~89 megapixels).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# Above this long/short side ratio only the part of the image that lands in the crop is resized.
_MAX_WHOLE_RESIZE_ASPECT = 4
# Reduced-DCT decoding keeps at least this many times the model's resize on the short side. Measured against
# weights.transforms() on the sample's photos (bench/RESULTS.md, "Reduced-DCT decoding"): keeping 1x (a 600 px photo
# decoded at 300 px for a 256 px resize) deviated by up to 57 grey levels (mean 1.7) and moved MobileNetV2's scores by
# up to 0.067; keeping 2x, by up to 15 levels and 0.0034, top-1 unchanged. So only photos of 4x the resize (1,024 px
# for 256) are reduced, and `auto` never reduces: 0.0034 is outside the 1e-3 that the exact decoders keep.
DRAFT_KEEP = 2


@dataclass(frozen=True)
class Decoded:
    """A decoded image ready for batching (`pixels` is crop x crop x 3 uint8), or why it could not be.

    A batched decoder (nvjpeg) leaves `pixels` None and keeps the checked JPEG in `jpeg` for the batch step."""

    pixels: np.ndarray | None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    jpeg: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `resize`, computed as torchvision computes it
    (`_compute_resized_output_size`): the long side is truncated, not rounded (600x399 → 384x256, where rounding
    384.96 gives 385)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize * long / short)
    return (resize, new_long) if width <= height else (new_long, resize)


def crop_offsets(width: int, height: int, crop: int) -> tuple[int, int]:
    """(left, top) of torchvision's centre crop of an image at least `crop` in both sides: the offset is rounded
    half to even (Python's round), where floor division shifts odd margins by one pixel."""
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def pad_ltrb(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """torchvision's centre-crop padding for an image smaller than the crop: the odd pixel goes right/bottom."""
    dw, dh = max(0, crop - width), max(0, crop - height)
    return dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2


def decode(data: bytes, preprocess: PreprocessSpec, reduced_dct: bool = False) -> Decoded:
    """Decode, orient, convert to RGB, resize the shorter side and centre-crop one image, exactly as torchvision's
    `weights.transforms()` does on the decoded PIL image (the same Pillow resize, sizes and offsets).

    `reduced_dct`: a JPEG at least 2 x DRAFT_KEEP times the resize on its short side is decoded at 1/2, 1/4 or 1/8
    scale (libjpeg's DCT scaling, through Pillow's `draft`), keeping at least DRAFT_KEEP times the resize; sizes and
    offsets stay those of the full image, the pixels deviate (see DRAFT_KEEP)."""
    opened = open_image(data)
    if isinstance(opened, Decoded):
        return opened
    try:
        with opened as img:
            width, height = oriented_size(img)
            if reduced_dct:
                draft(img, preprocess.resize_size)
            img = ImageOps.exif_transpose(img)
            pixels = _resize_crop(to_rgb(img), preprocess, (width, height))
    except Image.DecompressionBombError as exc:
        return Decoded(None, error=f"refused: {exc}")
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt input; each is one bad row
        return Decoded(None, error=_describe(exc, data))
    return Decoded(pixels, width, height)


def open_image(data: bytes) -> Image.Image | Decoded:
    """The image opened lazily (header only), or the error row for bytes that are not an image we accept."""
    if not data:
        return Decoded(None, error="empty object (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        return Decoded(None, error=f"refused: {exc}")
    except Exception as exc:  # noqa: BLE001 - see decode()
        return Decoded(None, error=_describe(exc, data))
    if img.width * img.height > MAX_PIXELS:
        img.close()
        return Decoded(None, error=f"refused: {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
    return img


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, after the EXIF orientation."""
    return (img.height, img.width) if exif_orientation(img) in _TRANSPOSED_ORIENTATIONS else img.size


def exif_orientation(img: Image.Image) -> int:
    return img.getexif().get(_EXIF_ORIENTATION_TAG, 1)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode; transparency is composited on white, 16-bit greys are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(img, dtype=np.uint32) >> 8
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def draft(img: Image.Image, resize: int) -> None:
    """Ask libjpeg for the smallest DCT scale that keeps the short side at least DRAFT_KEEP x `resize` (a no-op for
    other formats and for JPEGs too small to reduce)."""
    if img.format != "JPEG":
        return
    short = min(img.size)
    if short >= 2 * DRAFT_KEEP * resize:
        factor = DRAFT_KEEP * resize / short
        img.draft(img.mode, (math.ceil(img.width * factor), math.ceil(img.height * factor)))


def _resize_crop(img: Image.Image, preprocess: PreprocessSpec, full_size: tuple[int, int]) -> np.ndarray:
    """`full_size`: the image's (width, height) before any DCT reduction, which the resize and crop geometry follow."""
    width, height = img.size
    size = resized_size(*full_size, preprocess.resize_size)
    crop = preprocess.crop_size
    resample = _RESAMPLE[preprocess.interpolation]
    if min(size) >= crop and max(size) > _MAX_WHOLE_RESIZE_ASPECT * min(size):
        # A long strip (a 1x20000 PNG is a few hundred bytes) would become a huge intermediate (256x5,120,000 RGB,
        # 4 GB): resize only the source box that lands in the centre crop. Ordinary photos keep the whole-image
        # resize, whose rounding a box resize does not reproduce exactly (measured: within 2 grey levels).
        left, top = crop_offsets(*size, crop)
        sx, sy = width / size[0], height / size[1]
        box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
        return np.asarray(img.resize((crop, crop), resample, box=box), dtype=np.uint8)
    if size != img.size:  # torchvision returns the image untouched when it already has the size
        img = img.resize(size, resample)
    if min(size) < crop:  # only for resize_size < crop_size presets: zero padding, like torchvision's CenterCrop
        left, top, right, bottom = pad_ltrb(*size, crop)
        padded = Image.new("RGB", (size[0] + left + right, size[1] + top + bottom), (0, 0, 0))
        padded.paste(img, (left, top))
        img, size = padded, padded.size
    left, top = crop_offsets(*size, crop)
    return np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def _describe(exc: Exception, data: bytes) -> str:
    text = _looks_like_text(data)
    if isinstance(exc, UnidentifiedImageError):  # Pillow's message names only an anonymous BytesIO
        what = "content looks like HTML/text" if text else f"content is none of {', '.join(ACCEPTED_FORMATS)}"
        return f"not an image: {what}"
    return f"{type(exc).__name__}: {exc}" + (" (content looks like HTML/text, not an image)" if text else "")


def _looks_like_text(data: bytes) -> bool:
    """Markup or JSON, or a head that is printable UTF-8 text (an error page, a CSV, a note saved as .jpg)."""
    head = data[:512]
    if head.lstrip()[:1] in (b"<", b"{", b"["):
        return True
    text = head.decode("utf-8", errors="ignore")
    return len(text) >= len(head) - 3 and all(c.isprintable() or c in "\t\r\n" for c in text)
