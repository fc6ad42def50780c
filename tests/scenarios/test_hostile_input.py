"""Bad inputs through a whole job: each becomes a correct label or an error row, never a crash."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from jobs.label.runner import run_label_job
from schemas.specs import LabelJobSpec
from tests.support import IMAGENET_SAMPLE, imagenet_labels
from workers.io.storage import join, open_storage

pytestmark = pytest.mark.usefixtures("ray_cluster")
PHOTO = IMAGENET_SAMPLE / "n01440764_tench.JPEG"


def _png(img: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG", **params)
    return buffer.getvalue()


def _hostile_files() -> dict[str, tuple[bytes, bool]]:
    """name → (content, should it be labelled)."""
    photo = Image.open(PHOTO).convert("RGB")
    jpeg, cmyk, rotated, gif = io.BytesIO(), io.BytesIO(), io.BytesIO(), io.BytesIO()
    photo.save(jpeg, "JPEG")
    photo.convert("CMYK").save(cmyk, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(rotated, "JPEG", exif=exif)
    photo.save(gif, "GIF", save_all=True, append_images=[photo.rotate(90)])
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE)
    deep = Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], False),
        "zero-bytes.jpg": (b"", False),
        "page.jpg": (b"<!DOCTYPE html><html><body>Not found</body></html>", False),
        "notes.jpg": (b"shopping list: eggs, milk\n", False),
        "cmyk.jpg": (cmyk.getvalue(), True),
        "deep-16bit.png": (_png(deep), True),
        "palette-transparent.png": (_png(palette, transparency=0), True),
        "animated.gif": (gif.getvalue(), True),
        "exif-rotated.jpg": (rotated.getvalue(), True),
        "one-pixel.png": (_png(Image.new("RGB", (1, 1), (200, 30, 30))), True),
        "bomb-20000x20000.png": (_png(Image.new("1", (20000, 20000))), False),
        "good.jpg": (jpeg.getvalue(), True),
    }


def _spec(input_uri: Path | str, out: Path, decoder: str = "auto", **input_fields) -> LabelJobSpec:
    return LabelJobSpec(
        input={"uri": str(input_uri), **input_fields},
        output=str(out),
        model={"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"},
        num_workers=1,
        batch_size=4,
        decoder=decoder,
    )


def _rows(out: Path) -> dict[str, dict]:
    return {r["key"]: r for r in ds.dataset(out, format="parquet").to_table().to_pylist()}


@pytest.mark.fault(
    fault="bad image files: truncated, zero-byte, HTML and text named .jpg, CMYK, 16-bit PNG, palette+transparency, "
    "animated GIF, EXIF-rotated, 1x1, 20000x20000 bomb",
    injected="a folder of generated files next to a real photo",
    expected="decodable ones labelled (rotation applied), the rest error rows; the job succeeds",
)
@pytest.mark.parametrize("decoder", ["auto", "pillow"])  # auto: torchcodec on these CPU workers, Pillow fallback
def test_bad_image_files_become_rows(tmp_path, record_property, decoder):
    folder = tmp_path / "in"
    folder.mkdir()
    files = _hostile_files()
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    summary = run_label_job(_spec(folder, tmp_path / "out", decoder=decoder), show_progress=False)
    rows = {r["key"]: r for r in ds.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()}
    assert summary.status == "succeeded" and rows.keys() == files.keys()
    for name, (_, labelled) in files.items():
        assert (rows[name]["error"] is None) == labelled, (name, rows[name]["error"])
        assert (rows[name]["label"] is not None) == labelled
    assert rows["good.jpg"]["label"] == "tench"
    assert (rows["exif-rotated.jpg"]["width"], rows["exif-rotated.jpg"]["height"]) == (
        rows["good.jpg"]["height"],
        rows["good.jpg"]["width"],
    )
    assert "refused" in rows["bomb-20000x20000.png"]["error"]
    assert "HTML" in rows["page.jpg"]["error"]
    assert rows["notes.jpg"]["error"].startswith("not an image")  # was KeyError: 'MPO'
    errors = sum(1 for r in rows.values() if r["error"])
    record_property("measured", f"{len(rows)}/{len(files)} rows, {errors} error rows, job succeeded")


def _member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data)
    tar.addfile(info, io.BytesIO(data) if data else None)


@pytest.mark.fault(
    fault="hostile tar members: `../../etc/passwd`, a symlink, a nested directory, duplicate keys",
    injected="a WebDataset tar built with those members",
    expected="names are only keys (nothing extracted); the link and the duplicate become error rows",
)
def test_hostile_tar_members_are_rows_not_files(tmp_path, record_property):
    folder = tmp_path / "in"
    folder.mkdir()
    photo = PHOTO.read_bytes()
    with tarfile.open(folder / "00000.tar", "w") as tar:
        _member(tar, "../../etc/passwd.jpg", photo)
        _member(tar, "link.jpg", kind=tarfile.SYMTYPE, link="/etc/shadow")
        _member(tar, "nested", kind=tarfile.DIRTYPE)
        _member(tar, "nested/deeper/leaf.jpg", photo)
        _member(tar, "dup.jpg", photo)
        _member(tar, "dup.jpg", photo)
    before = set(tmp_path.parent.iterdir())
    summary = run_label_job(_spec(folder, tmp_path / "out"), show_progress=False)
    table = ds.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()
    by_key = {}
    for row in table:
        by_key.setdefault(row["key"], []).append(row)
    assert summary.status == "succeeded"
    assert sorted(by_key) == ["../../etc/passwd", "dup", "link", "nested/deeper/leaf"]
    assert by_key["../../etc/passwd"][0]["label"] == "tench" and by_key["nested/deeper/leaf"][0]["label"] == "tench"
    assert "not a regular file" in by_key["link"][0]["error"]
    assert [r["error"] is None for r in by_key["dup"]] == [True, False]
    assert set(tmp_path.parent.iterdir()) == before  # nothing extracted beside the test folder
    record_property("measured", f"{len(table)} rows for 5 image members: passwd and nested labelled, "
                                "link and second duplicate error rows")  # fmt: skip


@pytest.mark.fault(
    fault="a manifest line naming another store than the manifest's (a local path in an S3 manifest), one missing",
    injected="an S3 CSV manifest: 2 S3 photos, 1 local photo and 1 missing local path under an allowed root",
    expected="each key read through its own scheme's storage; the missing one is a row; the job succeeds",
)
def test_manifest_keys_of_another_scheme_are_read_and_a_bad_one_is_a_row(s3_server, s3_prefix, tmp_path,
                                                                         record_property):  # fmt: skip
    photos = [IMAGENET_SAMPLE / r["file"] for r in imagenet_labels()[:3]]
    storage = open_storage(s3_prefix, s3_server.options())
    for photo in photos[:2]:
        storage.upload_file(str(photo), join(s3_prefix, photo.name))
    local = tmp_path / "local"
    local.mkdir()
    (local / photos[2].name).write_bytes(photos[2].read_bytes())
    keys = [photos[0].name, photos[1].name, str(local / photos[2].name), str(local / "gone.jpg")]
    storage.write_bytes(join(s3_prefix, "manifest.csv"), ("key\n" + "\n".join(keys) + "\n").encode())
    spec = _spec(join(s3_prefix, "manifest.csv"), tmp_path / "out", allowed_roots=[str(local)])
    spec = spec.model_copy(update={"storage": s3_server.options()})

    summary = run_label_job(spec, show_progress=False)

    rows = _rows(tmp_path / "out")
    assert (summary.status, summary.images, summary.errors) == ("succeeded", 4, 1) and rows.keys() == set(keys)
    assert [rows[k]["label"] is not None for k in keys] == [True, True, True, False]
    assert rows[keys[3]]["error"] == f"missing: {keys[3]} does not exist"
    record_property("measured", "4/4 rows in 1 shard: 2 S3 and 1 local photo labelled, the missing path an error row "
                                "(before: the shard failed 5 times on 'no bucket', all 4 lost)")  # fmt: skip


@pytest.mark.fault(
    fault="a tar member far larger than any image (a hostile or mistaken shard)",
    injected="a tar of 3 photos and one member above max_object_bytes",
    expected="the big member is an error row, never read into memory; the photos labelled; the job succeeds",
)
def test_tar_member_above_the_size_cap_is_an_error_row(tmp_path, record_property):
    folder = tmp_path / "in"
    folder.mkdir()
    photos = [IMAGENET_SAMPLE / r["file"] for r in imagenet_labels()[:3]]
    cap = max(p.stat().st_size for p in photos)
    big = photos[0].read_bytes() + bytes(cap)  # decodable (trailing bytes are ignored), but above the cap
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for i, photo in enumerate(photos):
            _member(tar, f"{i}.jpg", photo.read_bytes())
        _member(tar, "big.jpg", big)

    summary = run_label_job(_spec(folder, tmp_path / "out", max_object_bytes=cap), show_progress=False)

    rows = _rows(tmp_path / "out")
    assert (summary.status, summary.errors, sorted(rows)) == ("succeeded", 1, ["0", "1", "2", "big"])
    assert all(rows[k]["label"] is not None for k in ("0", "1", "2"))
    assert rows["big"]["error"] == f"refused: member 'big.jpg' is {len(big)} bytes, above max_object_bytes={cap}"
    record_property("measured", f"3/3 photos labelled, the {len(big)}-byte member an error row (cap {cap})")
