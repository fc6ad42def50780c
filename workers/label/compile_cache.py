"""Inductor's on-disk cache, made explicit: one stable folder per node, so a compile is paid once per node.

torch.compile's inductor backend keeps what it compiled (FX graphs with their generated C++/Triton kernels, and
AOTAutograd's entries that point at them) under `$TORCHINDUCTOR_CACHE_DIR`, by default a per-user folder in /tmp
that a reboot or a tmp cleaner empties. A worker that compiles points inductor at `$BULKLABEL_COMPILE_CACHE` (default
`~/.cache/bulklabel/inductor`) with the FX-graph cache on, before its first compile: the second worker, pool or job
on the same node compiling the same model (same torch, same shapes) loads the kernels instead of generating and
building them again, in seconds rather than the 20-50 s of a CPU compile. `CacheCounts` tells which it was, from
the counters inductor keeps (torch._dynamo.utils.counters["inductor"]: fxgraph_cache_hit, _miss, _bypass).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

CACHE_ENV = "BULKLABEL_COMPILE_CACHE"
INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"  # what inductor reads, each time it needs the folder (cache_dir_utils.py)

CacheOutcome = Literal["hit", "miss", "partial", "bypass"]


def cache_dir() -> Path:
    """Where this node's compiled kernels live: `$BULKLABEL_COMPILE_CACHE`, else under the user's cache folder
    (`$XDG_CACHE_HOME`, else ~/.cache), bulklabel/inductor."""
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base, "bulklabel", "inductor")


def use_compile_cache() -> Path | None:
    """Point inductor at `cache_dir()` with its FX-graph cache on; returns the folder, or None when it cannot be
    made (a read-only home in a container: inductor then keeps its default per-user folder in /tmp). Process-wide
    (an environment variable, so inductor's compile subprocesses see it too): call it before the first compile."""
    import torch._inductor.config as inductor_config

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("compile cache %s cannot be made (%s); inductor keeps its default folder", folder, exc)
        folder = None
    else:
        os.environ[INDUCTOR_ENV] = str(folder)
    inductor_config.fx_graph_cache = True  # on by default today; the pool's start-up time depends on it
    return folder


@dataclass(frozen=True)
class CacheCounts:
    """Inductor's FX-graph cache counters at one moment; `since` says what a compile between two moments did."""

    hits: int
    misses: int
    bypasses: int

    @classmethod
    def now(cls) -> CacheCounts:
        from torch._dynamo.utils import counters

        inductor = counters["inductor"]
        return cls(inductor["fxgraph_cache_hit"], inductor["fxgraph_cache_miss"], inductor["fxgraph_cache_bypass"])

    def since(self, before: CacheCounts) -> CacheOutcome | None:
        """hit: every graph came from the cache; miss: every graph was compiled; partial: some of each; bypass:
        inductor would not cache them; None: nothing was looked up (another backend, or already compiled)."""
        hits, misses = self.hits - before.hits, self.misses - before.misses
        if hits and misses:
            return "partial"
        if hits or misses:
            return "hit" if hits else "miss"
        return "bypass" if self.bypasses > before.bypasses else None
