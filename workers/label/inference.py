"""Batched forward passes: uint8 pixels in, top-k classes and embeddings out."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from workers.label.compile_cache import CacheCounts, CacheOutcome, use_compile_cache
from workers.models import LoadedModel

log = logging.getLogger(__name__)

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_KEEP_UP_TO = 1 << 30
# glibc gives each thread beyond the first its own arena, made of heaps of at most 64 MB: a larger block (a CPU
# activation of a whole batch: MobileNetV2's first layers are 154 MB at 32 images) is a fresh mmap every time, its
# pages faulted in and zeroed by the kernel, whatever mallopt says. Keeping each activation under this keeps it in
# the heap, reused batch after batch.
CPU_ACTIVATION_BUDGET = 48 << 20


# How torch reports a failed allocation where it raises a plain RuntimeError rather than torch.OutOfMemoryError: its
# CPU allocator (c10/core/impl/alloc_cpu.cpp, "can't allocate memory" on POSIX, "not enough memory" on Windows), MPS,
# and CUDA in builds before OutOfMemoryError existed.
_OOM_MESSAGES = (
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    "MPS backend out of memory",
    "CUDA out of memory",
    "CUDA error: out of memory",
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure on any device, which a smaller batch may avoid: CUDA's
    torch.OutOfMemoryError, the RuntimeError of torch's CPU (and MPS) allocator, or Python's MemoryError."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(message in str(exc) for message in _OOM_MESSAGES)


@dataclass(frozen=True)
class Predictions:
    """Per image: top-k class indices and probabilities, and the embedding (None when not kept)."""

    topk_indices: np.ndarray  # (n, k) int32
    topk_scores: np.ndarray  # (n, k) float32
    embeddings: np.ndarray | None  # (n, d) float32
    probabilities: np.ndarray | None = None  # (n, classes) float32, the full softmax, when asked for


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of handing it back to the kernel.

    A CPU forward pass allocates and frees activations of tens to hundreds of MB per layer. By default glibc serves
    each from a fresh mmap() (above its 32 MB threshold, and always from threads' own small arenas), so the kernel
    faults in and zeroes every page again for every layer of every batch: measured on this project's 2-core VMs,
    ~240,000 page faults per MobileNetV2 batch of 32 and 40% of its CPU time spent in the kernel. One arena and a
    high mmap threshold keep that memory in the heap, ready for the next batch (peak RSS is unchanged: the memory
    was needed anyway). Process-wide, so only for worker processes that run models. Returns whether it applied
    (False off glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = all(
            libc.mallopt(param, value)
            for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, _KEEP_UP_TO), (_M_TRIM_THRESHOLD, _KEEP_UP_TO))
        )
    except (OSError, AttributeError):
        applied = False
    if not applied:
        log.info("not glibc (or mallopt refused): CPU inference keeps the default allocator")
    return applied


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 on GPU by default; fp32 on CPU, where bf16 without native support is several times slower."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "auto": torch.bfloat16}[precision]


def cpu_chunk_size(backbone: torch.nn.Module, crop: int, budget: int = CPU_ACTIVATION_BUDGET) -> int:
    """Images per forward call such that no module's output exceeds `budget` bytes (one image probed)."""
    largest = [1]

    def record(_module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel() * output.element_size())

    hooks = [m.register_forward_hook(record) for m in backbone.modules()]
    try:
        with torch.inference_mode():
            backbone(torch.zeros(1, 3, crop, crop).contiguous(memory_format=torch.channels_last))
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, budget // largest[0])


@dataclass(frozen=True)
class PredictorOptions:
    """What a predictor keeps of each batch and how it runs the model: shared by every job asking the same."""

    top_k: int
    embeddings: bool  # keep the penultimate layer's vectors
    precision: str = "auto"  # "auto" (bf16 autocast on a GPU), "fp32", "bf16"
    probabilities: bool = False  # keep the whole softmax row
    compile: bool = False  # torch.compile the backbone, static shapes
    compile_backend: str = "inductor"
    # compile: the job's batch size, which sets the compiled graph's shape (static_piece); else the first call's
    batch_size: int | None = None


class Predictor:
    """Holds a model resident on its device and runs batches through it.

    On a GPU, host batches go through a reused pinned buffer (per thread) and copy without blocking, so the copy
    overlaps the work queued before it; the model runs channels_last under bf16 autocast (`precision: auto`). With
    `compile`, the backbone is `torch.compile`d with static shapes: a batch runs in equal pieces of one size
    (`static_piece`: the batch itself on a GPU, a divisor of it within the CPU chunk) and whatever is left over (a
    job's short last batch) through the same backbone uncompiled, so nothing is padded and no second graph is
    compiled. The first call compiles; `compile_seconds` says how long it took,
    `compile_cache` whether inductor's on-disk cache on this node (workers.label.compile_cache) supplied the kernels.
    """

    def __init__(self, loaded: LoadedModel, device: torch.device, options: PredictorOptions):
        self.device = device
        self.top_k = min(options.top_k, len(loaded.categories))
        self.keep_embeddings = options.embeddings
        self.keep_probabilities = options.probabilities
        self.amp_dtype = autocast_dtype(device, options.precision)
        self.backbone = loaded.backbone.to(device, memory_format=torch.channels_last).eval()
        self.head = loaded.head.to(device).eval()
        pre = loaded.preprocess
        # Normalisation constants pre-scaled by 1/255, so uint8 → normalised float is one fused step.
        self.mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1) * 255
        # On CPU a batch runs through the backbone in chunks small enough for the allocator to reuse their memory
        # (CPU_ACTIVATION_BUDGET): measured 1.5x faster per image for MobileNetV2 than whole batches of 32.
        self.chunk = cpu_chunk_size(self.backbone, pre.crop_size) if device.type == "cpu" else None
        self.compiled = options.compile
        self.eager_backbone = self.backbone  # the compiled graph's leftovers run here (static_piece)
        self.piece = static_piece(options.batch_size, self.chunk) if options.batch_size else None
        self.compile_seconds: float | None = None
        self.compile_cache: CacheOutcome | None = None
        self._first_call = threading.Lock()  # the first (compiling) call runs alone; lanes wait for its graph
        self._pinned = threading.local()
        if options.compile:
            compile_backend = options.compile_backend
            if compile_backend == "inductor":
                use_compile_cache()  # before the first compile: the node's kernels from an earlier worker
            # Freezing (weights as constants: batch norm folded into the convolutions, weights prepacked) is what
            # makes inductor pay on CPU: measured on the 2-core VM, two lanes of MobileNetV2 ran at 0.90x eager
            # compiled without it and 1.12x with it (bench/RESULTS.md). The worker never trains, so it is safe.
            freezing = {"freezing": True} if compile_backend == "inductor" and device.type == "cpu" else None
            self.backbone = torch.compile(self.backbone, dynamic=False, backend=compile_backend, options=freezing)

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray | torch.Tensor) -> Predictions:
        """Predict a (n, h, w, 3) uint8 batch: a numpy array, or a tensor (a GPU decoder's, already on the device)."""
        # The first call with a whole compiled piece compiles; a shorter one runs eager (static_piece).
        if self.compiled and self.compile_seconds is None and len(pixels) >= (self.piece or 0):
            with self._first_call:
                if self.compile_seconds is None:
                    started, before = time.perf_counter(), CacheCounts.now()
                    result = self._predict(pixels)
                    self.compile_seconds = round(time.perf_counter() - started, 2)
                    self.compile_cache = CacheCounts.now().since(before)
                    log.info("compiled the backbone in %.1f s (first batch included; on-disk cache: %s)",
                             self.compile_seconds, self.compile_cache or "not used")  # fmt: skip
                    return result
        return self._predict(pixels)

    def _predict(self, pixels: np.ndarray | torch.Tensor) -> Predictions:
        batch = self._to_device(pixels)
        # NHWC → NCHW as a view: the strides are already channels_last, so no copy is made.
        x = (batch.permute(0, 3, 1, 2).float() - self.mean) / self.std
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        )
        with autocast:
            features = self._features(x)
            logits = self.head(features)
        probs = torch.softmax(logits.float(), dim=1)
        scores, indices = torch.topk(probs, self.top_k, dim=1)
        return Predictions(
            topk_indices=indices.to(torch.int32).cpu().numpy(),
            topk_scores=scores.cpu().numpy(),
            embeddings=features.float().cpu().numpy() if self.keep_embeddings else None,
            probabilities=probs.cpu().numpy() if self.keep_probabilities else None,
        )

    def _to_device(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        batch = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels)
        if self.device.type != "cuda" or batch.device.type == "cuda":
            return batch.to(self.device)
        # A pinned buffer per thread, reused while the shape holds: the previous copy from it has finished, since
        # that batch's results were copied back (which waits for the stream) before this call.
        buffer = getattr(self._pinned, "buffer", None)
        if buffer is None or buffer.shape != batch.shape:
            buffer = self._pinned.buffer = torch.empty(batch.shape, dtype=batch.dtype, pin_memory=True)
        buffer.copy_(batch)
        return buffer.to(self.device, non_blocking=True)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled:
            return self._static_features(x)
        if self.chunk and len(x) > self.chunk:
            return torch.cat([self.backbone(part) for part in x.tensor_split(-(-len(x) // self.chunk))])
        return self.backbone(x)

    def _static_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone compiled on equal pieces of one size (the compiled graph's); the images left over, fewer than
        a piece, through the eager backbone. Padding them to a piece instead computed 30% (MobileNetV2) to 50%
        (ResNet-50) more images per shard than it labelled (bench/RESULTS.md, compiled pools)."""
        if self.piece is None:
            self.piece = static_piece(len(x), self.chunk)
        whole = len(x) - len(x) % self.piece
        compiled = x[:whole].split(self.piece) if whole else ()  # (an empty tensor splits into one empty piece)
        pieces = [self.backbone(part.contiguous(memory_format=torch.channels_last)) for part in compiled]
        if whole < len(x):
            pieces.append(self.eager_backbone(x[whole:]))
        return torch.cat(pieces)


def static_piece(images: int, chunk: int | None) -> int:
    """The compiled graph's batch size for batches of `images`: the batch itself where it fits in one chunk (always
    on a GPU, which has none); else the largest divisor of the batch within the chunk, so that a whole batch runs as
    equal compiled pieces (32 images in a chunk of 10 or 15: 4 x 8). Where that divisor is under half the chunk (37
    images: 1), pieces of the eager split's size run compiled and the few images left over run eager."""
    if chunk is None or images <= chunk:
        return images
    divisor = max(d for d in range(1, chunk + 1) if images % d == 0)
    return divisor if 2 * divisor >= chunk else -(-images // -(-images // chunk))
