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


_CHECK_V2 = textwrap.dedent(
    """
    import json, sys
    import torch
    from workers.vision import transforms_v2
    v2 = transforms_v2()
    without = "torch._dynamo" not in sys.modules
    from torchvision import tv_tensors
    image = tv_tensors.Image(torch.randint(0, 255, (3, 40, 30), dtype=torch.uint8))
    resized = v2.functional.resize(image, [20], antialias=True)  # goes through tv_tensors.wrap, the decorated one
    kept = type(resized).__name__
    def step(x):
        return v2.functional.resize(tv_tensors.Image(x), [10], antialias=True).float().mean()
    eager = float(step(image.as_subclass(torch.Tensor)))
    compiled = float(torch.compile(step, backend="eager")(image.as_subclass(torch.Tensor)))
    print(json.dumps({"without": without, "kept": kept, "shape": list(resized.shape), "eager": eager,
                      "compiled": compiled, "real_disable": torch.compiler.disable.__module__}))
    """
)


def test_transforms_v2_comes_without_dynamo_and_compiles_the_same_after():
    done = subprocess.run([sys.executable, "-c", _CHECK_V2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["without"], "importing transforms.v2 through workers.vision loaded torch._dynamo"
    assert seen["kept"] == "Image" and seen["shape"] == [3, 26, 20]  # tv_tensors.wrap ran, undecorated
    assert seen["compiled"] == seen["eager"]  # under torch.compile, through the real decorator
    assert seen["real_disable"] == "torch.compiler"  # torch's own decorator is back
