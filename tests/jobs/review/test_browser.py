"""The review app in a real browser: Playwright driving Debian's chromium against `bulklabel review serve` over a
review queue that a real label job and `review-queue` made from plant photos. A reviewer goes through 20 images with
the keyboard alone, undoes one, reloads the page, and the corrections table is checked row by row."""

from __future__ import annotations

import re
import shutil

import pytest
from PIL import Image, ImageStat

from jobs.output.corrections import open_queue, read_decisions
from jobs.output.reader import open_output
from jobs.review.decisions import effective
from schemas.review import Decision
from tests.jobs.review.conftest import CLASSES
from tests.jobs.review.test_server import Server
from tests.pages import ARTIFACTS, chromium
from tests.support import PLANTS

pytestmark = pytest.mark.slow


@pytest.fixture
def real_queue(tmp_path, ray_cluster):
    from jobs.curate.queue import run_review_queue_job
    from jobs.label.runner import run_label_job
    from schemas.curation import ReviewQueueJobSpec
    from schemas.specs import LabelJobSpec

    photos = tmp_path / "photos"
    for name in CLASSES:
        (photos / name).mkdir(parents=True)
        for photo in sorted((PLANTS / name).iterdir())[:9]:
            shutil.copy(photo, photos / name / photo.name)
    labels, queue = tmp_path / "labels", tmp_path / "queue"
    model = {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1"}
    run_label_job(LabelJobSpec(input={"uri": str(photos)}, output=str(labels), model=model, top_k=3, num_workers=1),
                  show_progress=False)  # fmt: skip
    run_review_queue_job(ReviewQueueJobSpec(source=str(labels), output=str(queue), size=27, sheet=False),
                         show_progress=False)  # fmt: skip
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASSES) + "\n")
    return queue, classes


def test_a_reviewer_goes_through_twenty_images_by_keyboard_undoes_one_and_reloads(real_queue, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    queue, classes = real_queue
    server = Server(queue, extra=("--classes", str(classes)))
    expected: dict[str, tuple[Decision, str | None]] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
            page.goto(f"{server.base}/?token={server.token}")
            assert "token" not in page.url  # the redirect took it out of the address bar
            page.fill("#reviewer", "ana")
            page.keyboard.press("Enter")
            shown = page.locator("#reason")

            def current() -> str:
                expect(shown).not_to_have_text("")
                return shown.inner_text().split(" — ")[0]

            def press(*keys: str) -> None:
                before = current()
                for key in keys:
                    page.keyboard.press(key)
                expect(shown).not_to_have_text(re.compile(f"^{re.escape(before)} — "), timeout=15_000)  # the next one
                expect(page.locator("body")).to_have_attribute("data-busy", "false")

            for n in range(20):
                key = current()
                if n % 5 == 4:
                    press("x")
                    expected[key] = (Decision.BAD, None)
                elif n % 4 == 1:  # type-ahead search for a class the queue's model does not know
                    target = CLASSES[n % 3]
                    page.keyboard.press("/")
                    page.keyboard.type(target.split("___")[1])  # "Early_blight": one match
                    press("Enter")
                    expected[key] = (Decision.LABEL, target)
                else:  # the model's second suggestion
                    label = page.locator("#choices li").nth(1).locator("span").nth(1).inner_text()
                    press("2")
                    expected[key] = (Decision.LABEL, label)
            last = list(expected)[-1]
            page.keyboard.press("u")  # the 20th decision undone: its image is back
            expect(shown).to_contain_text(last, timeout=15_000)
            del expected[last]
            page.reload()  # the reviewer comes back: the same image, still theirs
            expect(shown).to_contain_text(last, timeout=15_000)
            expect(page.locator("#picture")).to_have_js_property("complete", True)
            assert page.eval_on_selector("#picture", "img => img.naturalWidth") > 100
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "review-app.png"
            page.screenshot(path=str(shot))
            progress = page.locator("#progress").inner_text()
            browser.close()
    finally:
        server.stop()
    assert errors == [], errors
    assert progress.startswith("19 of 27 reviewed · 8 left · you: 19"), progress
    with Image.open(shot) as image:
        stat = ImageStat.Stat(image.convert("L"))
        assert stat.stddev[0] > 20 and len(image.convert("RGB").getcolors(1 << 24) or []) > 1000  # a photo on it
    result = open_queue(str(queue))
    stored = read_decisions(result.storage, result.uri)
    counted = {key: (d.decision, d.label) for key, d in effective(stored).items()}
    assert counted == expected  # row by row: each image's decision as the keys chose it, the undone one gone
    assert [d.decision for d in stored].count(Decision.UNDO) == 1 and len(stored) == 21
    assert all(d.reviewer == "ana" for d in stored)
    labelled = open_output(str(queue.parent / "labels")).to_table(columns=["key", "image_id"]).to_pylist()
    ids = {row["key"]: row["image_id"] for row in labelled}
    assert all(d.image_id == ids[d.key] is not None for d in stored)  # the label output's content ids
