"""Label outputs the curation tests read: real MobileNetV2 label jobs on the session's Ray cluster, made once per
test process. `planted`: 40 ImageNet photos, nine planted near-copies of some (halved in size, re-encoded at JPEG
quality 35, cropped 4%), a byte-identical copy and a corrupt file, labelled with probabilities and embeddings.
`bare`: three photos labelled without embeddings or probabilities (top-k only)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.support import IMAGENET_SAMPLE, imagenet_labels

ORIGINALS = 40
# (original's index among the originals, how it was copied)
PLANTED = [(3, "half"), (7, "q35"), (11, "crop"), (15, "half"), (19, "q35"), (23, "crop"), (27, "half"), (31, "q35"),
           (35, "crop")]  # fmt: skip
EXACT_OF = 5  # `exact-copy.JPEG` has the bytes of this original


@dataclass(frozen=True)
class Planted:
    photos: Path
    out: Path  # the label output
    originals: tuple[str, ...]  # keys
    copies: dict[str, str]  # copy's key → its original's key (the exact copy among them)
    bare: Path  # a label output without embeddings or probabilities


def _copy(source: Path, target: Path, how: str) -> None:
    with Image.open(source) as image:
        image = image.convert("RGB")
        w, h = image.size
        if how == "half":
            image.resize((w // 2, h // 2)).save(target, quality=75)
        elif how == "q35":
            image.save(target, quality=35)
        else:
            image.crop((int(w * 0.04), int(h * 0.04), w, h)).save(target, quality=75)


def _label(photos: Path, out: Path, **options) -> None:
    from jobs.label.runner import run_label_job
    from schemas.specs import LabelJobSpec

    model = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
    spec = LabelJobSpec(input={"uri": str(photos), "files_per_shard": 16}, output=str(out), model=model,
                        batch_size=16, **options)  # fmt: skip
    summary = run_label_job(spec, show_progress=False)
    assert summary.status == "succeeded", summary.lines()


@pytest.fixture(scope="session")
def planted(tmp_path_factory, ray_cluster) -> Planted:
    root = tmp_path_factory.mktemp("curation")
    photos = root / "photos"
    photos.mkdir()
    originals = [IMAGENET_SAMPLE / row["file"] for row in imagenet_labels()[:ORIGINALS]]
    for file in originals:
        shutil.copy(file, photos / file.name)
    copies = {}
    for index, how in PLANTED:
        name = f"copy-{how}-{originals[index].stem}.jpg"
        _copy(originals[index], photos / name, how)
        copies[name] = originals[index].name
    shutil.copy(originals[EXACT_OF], photos / "exact-copy.JPEG")
    copies["exact-copy.JPEG"] = originals[EXACT_OF].name
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG" * 10)
    _label(photos, root / "out", probabilities=True)
    bare_photos = root / "bare-photos"
    bare_photos.mkdir()
    for file in originals[:3]:
        shutil.copy(file, bare_photos / file.name)
    _label(bare_photos, root / "bare", embeddings=False)
    return Planted(photos, root / "out", tuple(f.name for f in originals), copies, root / "bare")
