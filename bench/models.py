"""The models under test, and a plain torchvision copy of each for the Ray Data reference and the ceiling.

bulklabel loads weights through its own spec; the reference and the ceiling load the same file the way a user
would (torchvision's registry plus `load_state_dict`), so all three run identical weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchModel:
    name: str  # torchvision registry name
    weights: str  # a weights enum name (found offline in torch's cache) or a .pth file path

    def build(self):
        """(backbone with its last Linear replaced by Identity, that Linear): embeddings and logits in one pass."""
        import torch
        from torch import nn
        from torchvision.models import get_model

        if Path(self.weights).suffix == ".pth":
            model = get_model(self.name, weights=None)
            model.load_state_dict(torch.load(self.weights, map_location="cpu", weights_only=True))
        else:
            model = get_model(self.name, weights=self.weights)
        model.eval()
        parent, attr, head = _last_linear(model)
        setattr(parent, attr, nn.Identity())
        return model, head


def _last_linear(model):
    from torch import nn

    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr, head


def random_weights_file(arch: str, folder: Path) -> str:
    """Random weights saved the torchvision way (ResNet weights cannot be downloaded here; speed is the same)."""
    from tests.support import write_torchvision_weights

    existing = sorted(folder.glob(f"{arch}-*.pth"))
    path = existing[0] if existing else write_torchvision_weights(arch, folder)
    log.info("%s weights: %s", arch, path)
    return str(path)
