"""Pages in a real browser: headless Chromium (Debian's, installed by deploy/setup.sh) rendering a self-contained
HTML page offline, its DOM parsed back, screenshots checked and kept under test-artifacts/."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from tests.conftest import PROJECT_ROOT

ARTIFACTS = PROJECT_ROOT / "test-artifacts"
CHROMIUM_NOTE = PROJECT_ROOT / ".venv" / ".chromium-unavailable"  # deploy/setup.sh: why apt could not install it


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if CHROMIUM_NOTE.exists():
        pytest.skip(f"chromium could not be installed by deploy/setup.sh: {CHROMIUM_NOTE.read_text().strip()}")
    pytest.fail("chromium is not installed: run `bash deploy/setup.sh` (it installs Debian's chromium)")


def render(page: Path, tmp_path: Path, *args: str) -> str:
    """Headless Chromium on `page` (file://), offline; returns its stdout (the DOM, for --dump-dom)."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-default-apps", "--disable-sync", "--no-first-run",
               "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
               "--virtual-time-budget=5000", *args, page.as_uri()]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot_kept(page: Path, tmp_path: Path, name: str, height: int) -> Path:
    """A 1280-wide screenshot of `page` at test-artifacts/<name>.png (the page copied beside it), checked to show
    text and photos, not a blank page."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    shot.unlink(missing_ok=True)
    render(page, tmp_path, f"--screenshot={shot}", f"--window-size=1280,{height}")
    with Image.open(shot) as image:
        assert image.size == (1280, height)
        stat = ImageStat.Stat(image.convert("L"))
        colours = len(image.convert("RGB").getcolors(1 << 24) or [])
    assert stat.stddev[0] > 20 and colours > 1000, (stat.stddev, colours)
    shutil.copy(page, ARTIFACTS / f"{name}.html")
    return shot


class Dom(HTMLParser):
    """The elements of a dumped DOM as (tag, attributes), and its text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k.replace("_", "-")) == v
                                                                   for k, v in attrs.items())]  # fmt: skip


# A probe script added to a copy of a page (its CSP removed): each image's decoded size, and whether anything from
# the data ran as code.
PROBE = """<script>
window.addEventListener('load', () => {
  for (const img of document.images) img.setAttribute('data-natural', img.naturalWidth + 'x' + img.naturalHeight);
  document.body.setAttribute('data-pwned', String(window.__pwned || 0));
  document.body.setAttribute('data-probed', 'yes');
});
</script>"""
