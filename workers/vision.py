"""torchvision, imported without importing torch._dynamo: every worker module takes torchvision from here.

`import torchvision` runs `torchvision.ops.roi_align`, whose one top-level `from torch._dynamo.utils import
is_compile_supported` imports all of TorchDynamo (about 1.5 s of CPU on the 2-core reference machine, as much as
`import torch` itself) although no label or fine-tune worker uses roi_align, and torch.compile imports it when it
is asked to. A worker process starting (a new pool, a retry after a killed worker, a Ray Train worker) paid that
every time. Here that one name is bound to a function that imports the real one on its first call, and the placeholder
module is removed at once, so `import torch._dynamo` and torch.compile later get the real package.
"""

from __future__ import annotations

import functools
import sys
import types

import torch  # before the placeholder: torch's own import must see the real package

_TARGET = "torch._dynamo.utils"


def _is_compile_supported(device_type):
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


def _import_without_dynamo() -> types.ModuleType:
    if "torchvision" in sys.modules or _TARGET in sys.modules:
        import torchvision  # already imported, or dynamo already loaded: nothing to save

        return torchvision
    placeholder = types.ModuleType(_TARGET, "stands in for torch._dynamo.utils while torchvision is imported")
    placeholder.is_compile_supported = _is_compile_supported  # type: ignore[attr-defined]
    sys.modules[_TARGET] = placeholder
    try:
        import torchvision
    finally:
        if sys.modules.get(_TARGET) is placeholder:
            del sys.modules[_TARGET]
    return torchvision


torchvision = _import_without_dynamo()
models = torchvision.models


def transforms_v2() -> types.ModuleType:
    """torchvision.transforms.v2 (the torchvision decoder's resize, fine-tune augmentation), imported on first use,
    without TorchDynamo: its `tv_tensors` decorates a function with `torch.compiler.disable` at import, which
    imports all of dynamo (1.7 s of CPU measured here, on every label worker's first batch and every `predict`).
    During that import the decorator is `_disabled_once_compiling`; torch's own is back right after."""
    if "torch._dynamo" in sys.modules or "torchvision.transforms.v2" in sys.modules:
        from torchvision.transforms import v2

        return v2
    real = torch.compiler.disable
    torch.compiler.disable = _disabled_once_compiling
    try:
        from torchvision.transforms import v2
    finally:
        torch.compiler.disable = real
    return v2


def _disabled_once_compiling(fn=None, recursive: bool = True, *, reason: str | None = None):
    """`torch.compiler.disable` deferred: until TorchDynamo is imported nothing can be compiling, so the function runs
    as it is; from then on, through the real decorator (made once, on the first call after)."""
    if fn is None:
        return functools.partial(_disabled_once_compiling, recursive=recursive, reason=reason)
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(fn, recursive=recursive, reason=reason)
        return disabled(*args, **kwargs)

    return wrapper
