"""An exported model's sidecar (`<file>.json` beside `plants.onnx` or `plants.pt`): what an app needs to feed the
file and read its outputs, and the parity check the export passed. Pure data: apps may read it without bulklabel."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from schemas.finetune import FinetuneDataSpec
from schemas.specs import ModelSpec, PreprocessSpec, Spec, StorageOptions

SIDECAR_FORMAT_VERSION = 1
PARITY_MAX_PROBABILITY_DIFF = 1e-4  # the export is refused above this (or on any top-1 that differs)


class ExportFormat(StrEnum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"

    @property
    def suffix(self) -> str:
        return ".onnx" if self is ExportFormat.ONNX else ".pt"


class ModelInput(Spec):
    """The one input: a batch of images, preprocessed as a label job does."""

    name: str = "pixels"
    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    channels: Literal["RGB"] = "RGB"
    preprocess: PreprocessSpec = Field(description="Resize the shorter side to resize_size (interpolation, "
                                       "antialiased), centre-crop crop_size, scale to 0..1, subtract mean, divide by "
                                       "std.")  # fmt: skip
    dynamic_batch: bool = True


class ParityCheck(Spec):
    """The exported file against the eager model on sample images, at export time."""

    images: int = Field(ge=1)
    sample_from: str = Field(description="Where the images came from: the artifact's validation split, or --samples.")
    top1_equal: bool
    max_probability_diff: float
    limit: float = PARITY_MAX_PROBABILITY_DIFF
    runtime: str = Field(description="What ran the file: onnxruntime <version>, torch <version>.")

    @property
    def passed(self) -> bool:
        return self.top1_equal and self.max_probability_diff <= self.limit


class ExportSidecar(Spec):
    format_version: Literal[1] = SIDECAR_FORMAT_VERSION
    format: ExportFormat
    file: str = Field(description="The model file's name, beside this sidecar.")
    model_id: str = Field(description="As label outputs record it: `<arch>:<weights>` or `<name>:v<N>`.")
    class_names: list[str]
    input: ModelInput
    outputs: dict[str, str] = Field(description="Output name → what it holds.")
    opset: int | None = Field(default=None, description="ONNX opset (onnx only).")
    exported_with: str = Field(description="torch and exporter versions.")
    parity: ParityCheck


class CompareBackbonesSpec(Spec):
    """`bulklabel compare-backbones`: which pre-trained model suits this labelled set, measured: one embedding pass
    per base, one grouped split for all, a linear probe per base scored on the same held-out images."""

    data: FinetuneDataSpec = Field(description="The labelled images: class folders, or a labels file.")
    bases: tuple[ModelSpec, ...] = Field(min_length=1, description="The pre-trained models compared.")
    budget_ms: float | None = Field(default=None, gt=0, description="Embedding time per image (measured here) a "
                                    "recommended base may take at most.")  # fmt: skip
    seed: int = Field(default=0, description="The split's seed.")
    storage: StorageOptions = StorageOptions()


class BackboneResult(Spec):
    """One base's row of the comparison: its held-out accuracy and cost, or why it could not be measured."""

    model: str
    weights: str | None
    available: bool
    reason: str | None = None  # why not available (weights not on this machine, ...)
    val_accuracy: float | None = None
    val_accuracy_ci95: tuple[float, float] | None = None
    val_images: int | None = None
    ms_per_image: float | None = Field(default=None, description="Read, decode and embed, per image, on this cluster.")
    gflops: float | None = None
    embedding_width: int | None = None
