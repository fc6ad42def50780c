"""`bulklabel models`: torchvision's classification zoo as this machine has it, from the registry and each weights
entry's own metadata (no hand-kept list): ImageNet top-1/top-5, GFLOPs, parameters, file size, the embedding width a
label job stores, the first torchvision release with the model (torchvision_history.json, read from PyPI's wheels by
deploy/torchvision_history.py), and whether the weights file is here (an offline machine can use only those)."""

from __future__ import annotations

import difflib
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from torchvision import models as tv_models

from schemas.specs import ModelSpec
from workers.models import ModelError, split_head
from workers.ship.history import needs, since
from workers.weights import search_dirs

log = logging.getLogger(__name__)

CPU_BUILD_MAX_PARAMS = 100_000_000  # an architecture built for real to read its width: never the giant ones


@dataclass(frozen=True)
class ZooEntry:
    model: str
    weights: str
    top1: float | None
    top5: float | None
    gflops: float | None
    params_m: float
    file_mb: float | None
    embedding_width: int | None
    since: str  # first torchvision release with the model ("0.5" means that one or earlier)
    here: bool  # the weights file is in a search folder (torch hub's cache, $BULKLABEL_WEIGHTS_DIR)

    def as_dict(self) -> dict:
        return asdict(self)


def zoo(names: list[str] | None = None, max_gflops: float | None = None, offline: bool = False) -> list[ZooEntry]:
    """Every (model, weights) of the registry matching `names` (substrings), best top-1 first."""
    known = tv_models.list_models(module=tv_models)
    wanted = [m for m in known if not names or any(n in m for n in names)]
    if names and not wanted:
        close = sorted({c for n in names for c in difflib.get_close_matches(n, known, n=6, cutoff=0.5)} |
                       {m for n in names for m in known if m.startswith(n.split("_")[0])})  # fmt: skip
        later = [f"{n} needs {needs(n)}" for n in names if needs(n)]
        raise ModelError(f"no model matching {', '.join(names)} in torchvision {torchvision.__version__}"
                         + (f": {'; '.join(later)}" if later else "")
                         + (f"; did you mean {', '.join(close[:12])}?" if close else ""))  # fmt: skip
    folders = search_dirs(ModelSpec(name="resnet50"))
    rows = []
    for name in wanted:
        for entry in tv_models.get_model_weights(name):
            meta = entry.meta
            metrics = meta.get("_metrics", {}).get("ImageNet-1K", {})
            here = any((folder / entry.url.rsplit("/", 1)[-1]).is_file() for folder in folders)
            if max_gflops is not None and (meta.get("_ops") is None or meta["_ops"] > max_gflops):
                continue
            if offline and not here:
                continue
            rows.append((name, entry, metrics, here))
    widths = _widths({name: entry.meta["num_params"] for name, entry, _, _ in rows})
    out = [ZooEntry(model=name, weights=entry.name, top1=metrics.get("acc@1"), top5=metrics.get("acc@5"),
                    gflops=entry.meta.get("_ops"), params_m=round(entry.meta["num_params"] / 1e6, 2),
                    file_mb=entry.meta.get("_file_size"), embedding_width=widths[name], since=since(name), here=here)
           for name, entry, metrics, here in rows]  # fmt: skip
    return sorted(out, key=lambda e: (-(e.top1 or 0), e.gflops or 0))


def _widths(params: dict[str, int]) -> dict[str, int | None]:
    """Each model's embedding width, kept in a cache file per torchvision version: building the architectures
    takes seconds (half a minute for the whole zoo on 2 cores), and they never change within a version."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "bulklabel",
                 f"embedding-widths-torchvision-{torchvision.__version__}.json")  # fmt: skip
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    missing = [name for name in params if name not in known]
    if missing:
        known |= {name: _embedding_width(name, params[name]) for name in missing}
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, sort_keys=True))
        except OSError as exc:  # a read-only home: computed again next time
            log.debug("cannot keep %s: %s", cache, exc)
    return {name: known[name] for name in params}


def _embedding_width(name: str, params: int) -> int | None:
    """The penultimate layer's width, from the architecture built on the meta device (no memory, no weights); one
    whose initialisation reads its own values (RegNet) is built for real when small."""
    for device in ("meta", "cpu"):
        if device == "cpu" and params > CPU_BUILD_MAX_PARAMS:
            return None
        try:
            with torch.device(device), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # GoogLeNet's and Inception's notes on their initialisation
                _, head = split_head(tv_models.get_model(name, weights=None))
            return head.in_features
        except ModelError:  # no Linear head (SqueezeNet): no embedding a label job could store
            return None
        except Exception as exc:  # noqa: BLE001 - an architecture that will not build on meta: try for real
            log.debug("%s on %s: %s", name, device, exc)
    return None
