"""`bulklabel review-queue` on a real label output (tests/jobs/curate/conftest.py): the order each measure gives,
per-label and diverse queues, a top-k-only output, and the contact sheet in headless Chromium with real thumbnails."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.cli import main
from jobs.curate.queue import run_review_queue_job
from jobs.errors import BadInput
from jobs.output.reader import open_output
from jobs.output.results import open_result
from schemas.curation import ReviewQueueJobSpec
from tests.pages import PROBE, Dom, render, screenshot_kept


def _queue(out) -> list[dict]:
    return open_result(str(out)).to_table().to_pylist()


def _labelled(planted) -> list[dict]:
    rows = open_output(str(planted.out)).to_table().to_pylist()
    return sorted((r for r in rows if r["label"] is not None), key=lambda r: r["key"])


def test_a_margin_queue_is_the_images_by_margin_on_their_full_softmax(planted, tmp_path):
    summary = run_review_queue_job(ReviewQueueJobSpec(source=str(planted.out), output=str(tmp_path / "q"), size=10))
    queue = _queue(tmp_path / "q")
    rows = _labelled(planted)
    p = np.sort(np.asarray([r["probabilities"] for r in rows]), axis=1)
    margin = 1 - (p[:, -1] - p[:, -2])
    expected = [rows[i]["key"] for i in sorted(range(len(rows)), key=lambda i: (-margin[i], i))[:10]]
    assert [r["key"] for r in queue] == expected and [r["rank"] for r in queue] == list(range(1, 11))
    assert np.allclose([r["uncertainty"] for r in queue], sorted(margin, reverse=True)[:10], atol=1e-6)
    assert {r["measured_on"] for r in queue} == {"probabilities"} and "corrupt.jpg" not in {r["key"] for r in queue}
    assert summary.manifest.figures["ranked"] == len(rows) == len(planted.originals) + len(planted.copies)


def test_per_label_and_diverse_queues_spread_over_labels_and_copies(planted, tmp_path):
    run_review_queue_job(ReviewQueueJobSpec(source=str(planted.out), output=str(tmp_path / "per"), size=12,
                                            per_label=True, sheet=False))  # fmt: skip
    per = _queue(tmp_path / "per")
    assert len(per) == 12 and len({r["label"] for r in per}) == 12  # more than 12 labels predicted: one each
    run_review_queue_job(ReviewQueueJobSpec(source=str(planted.out), output=str(tmp_path / "div"), size=15,
                                            strategy="diverse", sheet=False))  # fmt: skip
    diverse = {r["key"] for r in _queue(tmp_path / "div")}
    pairs = [(c, o) for c, o in planted.copies.items() if c in diverse and o in diverse]
    assert pairs == [] and len(diverse) == 15  # never an image and its near-copy: the cover took one of them


def test_a_top_k_only_output_is_ranked_on_its_top_k_and_diverse_needs_embeddings(planted, tmp_path):
    run_review_queue_job(ReviewQueueJobSpec(source=str(planted.bare), output=str(tmp_path / "q"), strategy="entropy",
                                            sheet=False))  # fmt: skip
    queue = _queue(tmp_path / "q")
    assert len(queue) == 3 and {r["measured_on"] for r in queue} == {"topk"}
    assert all(0 <= r["uncertainty"] <= 1 for r in queue)
    with pytest.raises(BadInput, match="has no embeddings"):
        run_review_queue_job(ReviewQueueJobSpec(source=str(planted.bare), output=str(tmp_path / "d"),
                                                strategy="diverse"))  # fmt: skip


def test_the_sheet_shows_every_queued_image_in_chromium_and_a_screenshot_is_kept(planted, tmp_path):
    out = tmp_path / "q"
    assert (
        main(["review-queue", str(planted.out), "--out", str(out), "-n", "24", "--strategy", "least-confidence"]) == 0
    )
    queue = _queue(out)
    sheet = out / "sheet.html"
    dom = Dom(render(sheet, tmp_path, "--dump-dom"))  # as shipped: CSP on, no script
    assert not dom.find("script")
    figures = dom.find("figure")
    assert [int(f["data-rank"]) for f in figures] == list(range(1, 25))
    probed = tmp_path / "probed.html"
    probed.write_text(sheet.read_text().replace("<meta http-equiv='Content-Security-Policy'", "<meta name='x'")
                      .replace("</body>", PROBE + "</body>"))  # fmt: skip
    images = Dom(render(probed, tmp_path, "--dump-dom")).find("img")
    assert [a["data-key"] for a in images] == [r["key"] for r in queue]
    sizes = [tuple(map(int, a["data-natural"].split("x"))) for a in images]
    assert all(0 < w <= 160 and 0 < h <= 160 and max(w, h) == 160 for w, h in sizes), sizes  # real thumbnails
    screenshot_kept(sheet, tmp_path, "review-queue", 1800)
