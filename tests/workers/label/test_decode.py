"""workers.label.decode and workers.label.decoders: every input becomes either a 224x224x3 uint8 crop plus the original
(oriented)
size, or an error string for that one row, whichever decoder runs (each test runs on every decoder: the batched GPU
decoder's path runs on the CPU here). Inputs are built with Pillow/numpy, plus real photos from the ImageNet sample."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from schemas.specs import PreprocessSpec
from workers.label.decode import ACCEPTED_FORMATS, Decoded, _check_openers
from workers.label.decoders import NvjpegDecoder, PillowDecoder, PillowDraftDecoder, TorchcodecDecoder

# Same folder as tests.support.IMAGENET_SAMPLE; not imported from there because tests.support imports torch (~5 s).
IMAGENET_SAMPLE = Path(__file__).resolve().parents[4] / "shared" / "data" / "imagenet-sample"

SPEC = PreprocessSpec(resize_size=256, crop_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CROP = 224
RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 200, 0), (255, 255, 255)
DECODERS = ("pillow", "pillow-draft", "torchcodec", "batched-on-cpu")
# Largest difference from torchvision's weights.transforms() on the decoded PIL image, measured on the 200 ImageNet
# sample photos: Pillow's path is the reference's own resize; the tensor resize differs by rounding (mean 0.002);
# reduced-DCT decoding by up to 15 levels on the photos it reduces (workers/label/decode.py, DRAFT_KEEP).
MAX_DEVIATION = {"pillow": 0, "pillow-draft": 15, "torchcodec": 2, "batched-on-cpu": 2}


def _build(name: str):
    if name == "pillow":
        return PillowDecoder(SPEC)
    if name == "pillow-draft":
        return PillowDraftDecoder(SPEC)
    if name == "torchcodec":
        return TorchcodecDecoder(SPEC)
    import torch

    return NvjpegDecoder(SPEC, torch.device("cpu"))


@pytest.fixture(params=DECODERS, scope="module")
def decode(request):
    """One image through a decoder's both steps (per image, then per batch), as the pipeline runs them."""
    decoder = _build(request.param)

    def run(data: bytes, spec: PreprocessSpec = SPEC) -> Decoded:
        assert spec is SPEC
        rows, pixels = decoder.batch([decoder.decode(data)])
        row = rows[0]
        return Decoded(np.asarray(pixels[0]) if row.ok else None, row.width, row.height, row.error)

    run.decoder_name = request.param
    return run


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def halves(size: tuple[int, int], left: tuple, right: tuple, mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half is `right`."""
    width, height = size
    img = Image.new(mode, size, left)
    img.paste(right, (width // 2, 0, width, height))
    return img


def assert_ok(result: Decoded, width: int, height: int) -> np.ndarray:
    assert result.error is None
    assert (result.width, result.height) == (width, height)
    assert isinstance(result.pixels, np.ndarray)
    assert result.pixels.shape == (CROP, CROP, 3)
    assert result.pixels.dtype == np.uint8
    return result.pixels


def assert_colour(region: np.ndarray, colour: tuple, tolerance: int) -> None:
    """Every pixel of `region` within `tolerance` of `colour` in every channel."""
    diff = np.abs(region.astype(int) - np.array(colour, dtype=int))
    assert diff.max() <= tolerance, f"expected {colour}±{tolerance}, got a pixel off by {diff.max()}"


def _reference(img: Image.Image) -> np.ndarray:
    """torchvision's own Resize(256) + CenterCrop(224) (bilinear, antialiased) on the RGB image: what decode() must
    give (the transforms of weights.transforms(), before the float conversion)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    img = F.resize(img.convert("RGB"), [256], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return np.asarray(F.center_crop(img, [CROP])).astype(int)


# ------------------------------------------------------------------------------------------------ good images


def test_rgb_jpeg_reports_original_size_and_centre_crop_keeps_left_and_right(decode):
    pixels = assert_ok(decode(encode(halves((400, 300), RED, BLUE), "JPEG", quality=95)), 400, 300)

    # 400x300 → 341x256; the crop starts at x=58, so the red/blue edge (x=170.5) lands at crop column ~112.
    assert_colour(pixels[:, :100], RED, 12)
    assert_colour(pixels[:, 125:], BLUE, 12)


def test_grayscale_png_becomes_three_equal_channels(decode):
    img = Image.new("L", (300, 280), 77)
    img.paste(200, (150, 0, 300, 280))

    pixels = assert_ok(decode(encode(img, "PNG")), 300, 280)

    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert (pixels[:, :100] == 77).all()
    assert (pixels[:, 125:] == 200).all()


def test_cmyk_jpeg_colours_are_not_inverted(decode):
    img = halves((300, 260), (0, 255, 255, 0), (255, 255, 0, 0), mode="CMYK")  # red | blue
    assert Image.open(io.BytesIO(encode(img, "JPEG", quality=95))).mode == "CMYK"

    pixels = assert_ok(decode(encode(img, "JPEG", quality=95)), 300, 260)

    assert_colour(pixels[:, :95], RED, 20)
    assert_colour(pixels[:, 130:], BLUE, 20)


def test_rgba_png_is_composited_on_white(decode):
    img = halves((300, 300), (0, 0, 0, 0), (*GREEN, 255), mode="RGBA")  # transparent *black* | opaque green

    pixels = assert_ok(decode(encode(img, "PNG")), 300, 300)

    assert (pixels[:, :100] == WHITE).all()  # not black: the colour under alpha 0 must not show
    assert (pixels[:, 125:] == GREEN).all()


def test_half_transparent_rgba_is_blended_with_white(decode):
    pixels = assert_ok(decode(encode(Image.new("RGBA", (50, 40), (255, 0, 0, 128)), "PNG")), 50, 40)
    assert_colour(pixels, (255, 127, 127), 2)


def test_palette_png_with_transparency_is_composited_on_white(decode):
    img = Image.new("P", (300, 300), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))  # index 0 black (transparent), index 1 blue
    img.paste(1, (150, 0, 300, 300))
    data = encode(img, "PNG", transparency=0)
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode == "P" and "transparency" in reopened.info

    pixels = assert_ok(decode(data), 300, 300)

    assert (pixels[:, :100] == WHITE).all()
    assert (pixels[:, 125:] == BLUE).all()


def test_16_bit_greyscale_png_is_scaled_not_clipped(decode):
    grey = np.full((120, 160), 40000, dtype=np.uint16)
    grey[:, 80:] = 10000
    data = encode(Image.fromarray(grey), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")

    pixels = assert_ok(decode(data), 160, 120)

    assert (pixels[:, :100] == 40000 >> 8).all()  # 156, not 255
    assert (pixels[:, 125:] == 10000 >> 8).all()  # 39


def test_animated_gif_uses_the_first_frame(decode):
    frames = [Image.new("RGB", (60, 50), RED), Image.new("RGB", (60, 50), BLUE), Image.new("RGB", (60, 50), GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3

    pixels = assert_ok(decode(data), 60, 50)

    assert (pixels == RED).all()


def _exif_jpeg(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_6_swaps_size_and_rotates_pixels(decode):
    stored = Image.new("RGB", (300, 200), RED)
    stored.paste(BLUE, (0, 100, 300, 200))  # top half red, bottom half blue, as stored

    upright = assert_ok(decode(_exif_jpeg(stored, 1)), 300, 200)
    assert_colour(upright[:95], RED, 12)  # control: without rotation, red is on top
    assert_colour(upright[130:], BLUE, 12)

    rotated = assert_ok(decode(_exif_jpeg(stored, 6)), 200, 300)
    # Orientation 6: the stored top row is the displayed right edge, so red is right and blue left, full height.
    assert_colour(rotated[:, :95], BLUE, 12)
    assert_colour(rotated[:, 130:], RED, 12)


@pytest.mark.parametrize("size", [(1, 1), (3, 2), (10, 5), (2, 300)], ids=str)
def test_images_smaller_than_the_crop_are_upscaled(size, decode):
    width, height = size
    img = Image.new("RGB", size, (10, 20, 30))
    if width >= 10:
        img.paste(BLUE, (width // 2, 0, width, height))

    pixels = assert_ok(decode(encode(img, "PNG")), width, height)

    if width >= 10:
        # 10x5 → 512x256, crop from x=144; the edge (x=256) blends over ~one source pixel (51 px) around column 112.
        assert (pixels[:, :80] == (10, 20, 30)).all()
        assert (pixels[:, 145:] == BLUE).all()
    else:
        assert (pixels == (10, 20, 30)).all()


def test_extreme_aspect_ratio_is_cropped_without_resizing_the_whole_strip(decode):
    """A 1x20000 PNG is a few hundred bytes; resizing it whole to 256 px wide means a 256x5,120,000 RGB image (4 GB,
    ~20 s). Only the centre matters, so this must be quick, and the crop must come from the middle of the strip."""
    strip = np.zeros((20000, 1), dtype=np.uint8)
    strip[9000:11000] = 123
    strip[11000:] = 255
    data = encode(Image.fromarray(strip), "PNG")
    assert len(data) < 2000

    started = time.monotonic()
    pixels = assert_ok(decode(data), 1, 20000)
    assert time.monotonic() - started < 2.0

    assert (pixels == 123).all()


@pytest.mark.parametrize("size", [(60, 1500), (2000, 90)], ids=str)
def test_long_strip_crop_matches_resizing_the_whole_image(size, decode):
    """The crop of a long image (resized in part, see above) has the pixels a whole-image resize would give."""
    rng = np.random.default_rng(7)
    small = Image.fromarray(rng.integers(0, 256, (size[1] // 10, size[0] // 10, 3), dtype=np.uint8))
    img = small.resize(size, Image.Resampling.BICUBIC)  # smooth content, so a misplaced crop shows

    pixels = assert_ok(decode(encode(img, "PNG")), *size)

    expected = _reference(img)
    assert np.abs(pixels.astype(int) - expected).max() <= 2
    assert np.abs(pixels.astype(int) - np.roll(expected, 3, axis=(0, 1))).mean() > 5  # the comparison can fail


@pytest.mark.parametrize("orientation, reported", [(1, (2000, 1500)), (6, (1500, 2000))])
def test_large_jpeg_reports_original_size(orientation, reported, decode):
    img = halves((2000, 1500), RED, BLUE)
    img.paste(GREEN, (0, 0, 2000, 40))  # a band along the stored top edge (7 px after resize): outside the crop
    data = _exif_jpeg(img, orientation)

    pixels = assert_ok(decode(data), *reported)

    if orientation == 1:
        assert_colour(pixels[:, :100], RED, 15)
        assert_colour(pixels[:, 125:], BLUE, 15)
    else:  # stored left half (red) is the displayed top
        assert_colour(pixels[:100], RED, 15)
        assert_colour(pixels[125:], BLUE, 15)
    assert not (np.abs(pixels.astype(int) - GREEN).max(axis=-1) < 60).any()


@pytest.mark.parametrize(
    "name, mode",
    [
        ("n01440764_tench.JPEG", "RGB"),
        ("n02692877_airship.JPEG", "L"),
        ("n03908714_pencil_sharpener.JPEG", "L"),
    ],
)
def test_real_photos(name, mode, decode):
    path = IMAGENET_SAMPLE / name
    with Image.open(path) as img:
        assert img.mode == mode
        size = img.size

    pixels = assert_ok(decode(path.read_bytes()), *size)

    assert pixels.std() > 10  # a real picture, not a flat fill
    if mode == "L":
        assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    with Image.open(path) as img:
        expected = _reference(img)
    assert np.abs(pixels.astype(int) - expected).max() <= max(1, MAX_DEVIATION[decode.decoder_name])


# ----------------------------------------------------------------------------------------------- errors as rows


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of all-black rows, streamed through zlib: ~200 KB for 20000x20000."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(1)
    rows = b"\0" * (1 + (width + 7) // 8) * 100  # 100 rows of filter byte + packed bits
    assert height % 100 == 0
    idat = b"".join(compressor.compress(rows) for _ in range(height // 100)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _truncated_real_jpeg() -> bytes:
    data = (IMAGENET_SAMPLE / "n01440764_tench.JPEG").read_bytes()
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    return data[: len(data) // 2]


ERROR_CASES = {
    "empty": (lambda: b"", "empty"),
    "truncated-jpeg": (_truncated_real_jpeg, "truncated"),
    "truncated-png": (_truncated_png, ""),
    "html": (lambda: b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>", "HTML"),
    "json": (lambda: b' {"error": "AccessDenied"}', "text"),
    "random": (lambda: np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), ""),
    "jpeg-header-only": (lambda: b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", ""),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_an_error_row_not_an_exception(case, decode):
    make, expected_text = ERROR_CASES[case]

    result = decode(make())

    assert isinstance(result, Decoded)
    assert result.pixels is None and result.width is None and result.height is None
    assert isinstance(result.error, str) and result.error
    assert expected_text.lower() in result.error.lower()


def test_decompression_bomb_is_refused_quickly(decode):
    data = _bomb_png(20000, 20000)  # 400 Mpixels, over Pillow's hard limit (2 x MAX_IMAGE_PIXELS)
    assert len(data) < 300_000
    with Image.open(io.BytesIO(_bomb_png(64, 100))) as small:  # the same builder makes images Pillow can read
        small.load()
        assert small.size == (64, 100)

    started = time.monotonic()
    result = decode(data)

    assert time.monotonic() - started < 2.0
    assert result.pixels is None
    assert "refused" in result.error.lower() and "decompression" in result.error.lower()


@pytest.mark.parametrize(
    "content",
    [b"hello, this is a text file saved as x.jpg\n", b"key,label\na.jpg,cat\n", b"\x00\x01\x02 binary junk " * 20],
    ids=["text", "csv", "binary"],
)
def test_content_no_format_accepts_is_not_an_image_not_a_key_error(content, decode):
    """Every file that no accepted format recognises used to end in KeyError: 'MPO' (a format with no opener)."""
    result = decode(content)

    assert result.pixels is None and result.error.startswith("not an image: ")
    assert "KeyError" not in result.error and "MPO" not in result.error
    if content.startswith((b"hello", b"key")):
        assert "text" in result.error


def test_every_accepted_format_has_an_opener_and_a_missing_one_is_named():
    assert set(ACCEPTED_FORMATS) <= set(Image.OPEN)
    with pytest.raises(ImportError, match="MPO"):
        _check_openers(("JPEG", "MPO"))


def test_multi_picture_jpeg_decodes_through_the_jpeg_opener(decode):
    first, second = Image.new("RGB", (320, 240), RED), Image.new("RGB", (320, 240), BLUE)
    data = encode(first, "MPO", save_all=True, append_images=[second])
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "MPO"  # what Pillow reports for it, though "MPO" is not an opener

    pixels = assert_ok(decode(data), 320, 240)
    assert_colour(pixels, RED, tolerance=8)


def test_formats_that_are_not_photos_are_refused_not_interpreted(decode):
    """EPS would make Pillow run Ghostscript; only photo formats are opened."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    result = decode(eps)
    assert result.pixels is None and result.error


def test_images_above_pillows_pixel_limit_are_refused_before_decoding(decode):
    # 12000 x 8000 = 96 Mpx: between Pillow's warning limit and its error limit, where it would decode anyway.
    big = encode(Image.new("1", (12000, 8000)), "PNG")
    started = time.perf_counter()
    result = decode(big)
    assert result.pixels is None and "refused" in result.error
    assert time.perf_counter() - started < 1.0
