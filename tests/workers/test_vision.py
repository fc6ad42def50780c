"""workers.vision: torchvision imported without TorchDynamo, and nothing of torch or torchvision lost by it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

_CHECK = textwrap.dedent(
    """
    import json, sys
    from workers.vision import torchvision
    without = "torch._dynamo" not in sys.modules
    import torch
    from torchvision.ops import roi_align
    boxes = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    pooled = roi_align(torch.rand(1, 3, 8, 8), boxes, output_size=2).shape
    supported = roi_align.__globals__["is_compile_supported"]("cpu")  # the placeholder's name, called
    import torch._dynamo.utils
    real = torch._dynamo.utils.is_compile_supported("cpu")
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")(torch.ones(2)).tolist()
    print(json.dumps({"without": without, "pooled": list(pooled), "supported": supported, "real": real,
                      "compiled": compiled, "stub_left": type(torch._dynamo.utils).__name__,
                      "dynamo_file": torch._dynamo.utils.__file__}))
    """
)


def test_torchvision_comes_without_dynamo_and_dynamo_still_works_after():
    done = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["without"], "importing torchvision through workers.vision loaded torch._dynamo"
    assert seen["pooled"] == [1, 3, 2, 2]
    assert seen["supported"] == seen["real"]  # the placeholder's function forwards to the real one
    assert seen["compiled"] == [3.0, 3.0]  # torch.compile imports the real TorchDynamo afterwards
    assert seen["dynamo_file"].endswith("torch/_dynamo/utils.py")


def test_torchvision_already_imported_is_returned_as_is():
    done = subprocess.run(
        [sys.executable, "-c", "import torchvision, workers.vision as v; print(v.torchvision is torchvision)"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("True"), done.stderr[-3000:]
