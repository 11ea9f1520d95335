"""Input and output contracts: how each artifact's tensors relate to the shared preprocessing.

One table per direction, keyed by the id a manifest records in ``input.contract`` / ``output.contract``.
The shared preprocessing (`edge_convnext.preprocessing`) ends at float32 RGB NCHW ``[N, 3, 224, 224]``
in [0, 1]; `InputContract.feed` turns that into what one artifact's input takes, and
`OutputContract.log_scores` turns what it returns into logits up to a per-image constant (the one
form every metric compares, see `edge_convnext.metrics.compare`). No format-specific conversion
lives anywhere else: runners look their contract up here.

==================  ==========================================================  ====================
input contract      what the model's input takes                                used by
==================  ==========================================================  ====================
rgb-nchw-unit       float32 ``[1, 3, 224, 224]`` RGB NCHW in [0, 1]              ExecuTorch
rgb-nhwc-unit       float32 ``[1, 224, 224, 3]`` RGB NHWC in [0, 1]              TFLite (MediaPipe:
                    (TFLite metadata: NormalizationOptions mean [0], std [255])  uint8 pixels / 255)
rgb-nhwc-uint8      uint8 ``[1, 224, 224, 3]`` RGB NHWC, pixel values 0..255     (integer-only TFLite)
rgb-image           Core ML image feature, RGB 224x224, 8-bit pixels; the        Core ML (Vision)
                    model scales by 1/255 (``ct.ImageType(scale=1/255)``)
==================  ==========================================================  ====================

==================  ==========================================================
output contract     what the model returns
==================  ==========================================================
probabilities       float32 ``[1, 1000]``, softmax inside the model (sums to 1)
logits              float32 ``[1, 1000]``, unnormalized
classifier          Core ML classifier: ``classLabel`` (string) and a ``{label: probability}``
                    dictionary; runners read the probabilities in class order
==================  ==========================================================

ImageNet mean/std normalization is inside every model: no contract subtracts a mean or divides by a
std outside it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import numpy as np

from edge_convnext.errors import ArtifactError
from edge_convnext.manifest import NUM_CLASSES, TensorSpec
from edge_convnext.metrics import LOG_FLOOR

CROP = 224


@dataclass(frozen=True)
class InputContract:
    """How a model's input relates to the shared preprocessing's float32 NCHW [0, 1] batch."""

    id: str
    shape: tuple[int, ...]
    dtype: str
    layout: str  # "NCHW", "NHWC", or "image" (a Core ML image feature)
    range: tuple[float, float]
    description: str

    def spec(self, name: str) -> TensorSpec:
        return TensorSpec(name, self.shape, self.dtype, self.layout, self.range, self.description, contract=self.id)

    def feed(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[N, 3, 224, 224]`` RGB in [0, 1] -> this contract's batch (``[N, ...]`` of ``shape[1:]``).

        ``rgb-image`` yields float32 NCHW pixel values 0..255 (integers): the form the Core ML
        emulator takes for an image feature and that `to_pil_images` turns into images for Core ML.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (3, CROP, CROP):
            raise ValueError(f"expected float32 [N, 3, {CROP}, {CROP}] in [0, 1], got {x.dtype} {list(x.shape)}")
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        if self.dtype == "uint8" or self.layout == "image":
            # The shared preprocessing's values are k/255 for uint8 pixels k: rint recovers k exactly.
            pixels = np.clip(np.rint(x * np.float32(255.0)), 0, 255)
            return np.ascontiguousarray(pixels, dtype=np.uint8 if self.dtype == "uint8" else np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)


@dataclass(frozen=True)
class OutputContract:
    """What a model returns, and how to read it as logits up to a per-image constant."""

    id: str
    shape: tuple[int, ...]
    dtype: str
    description: str

    def spec(self, name: str) -> TensorSpec:
        return TensorSpec(name, self.shape, self.dtype, "NC", (0.0, 1.0) if self.id != "logits" else None,
                          self.description, contract=self.id)

    @property
    def probabilities(self) -> bool:
        return self.id != "logits"

    def log_scores(self, y: np.ndarray) -> np.ndarray:
        """float32 ``[N, 1000]`` model output -> float32 logits up to a per-image constant.

        For probabilities that is ``log p`` (``log softmax(z) = z - logsumexp(z)``), floored at
        `edge_convnext.metrics.LOG_FLOOR` (log 1e-30) where a probability underflowed.
        """
        y = np.asarray(y, dtype=np.float32)
        if not self.probabilities:
            return y
        with np.errstate(divide="ignore"):
            return np.maximum(np.log(np.maximum(y, 0.0)), np.float32(LOG_FLOOR)).astype(np.float32)


_IN = (
    InputContract("rgb-nchw-unit", (1, 3, CROP, CROP), "float32", "NCHW", (0.0, 1.0),
                  "RGB, float32 NCHW [1, 3, 224, 224], values in [0, 1] (pixel / 255), resized and center-cropped "
                  "by the manifest's preprocessing. Normalization is inside the model: do NOT subtract the "
                  "ImageNet mean or divide by its std"),
    InputContract("rgb-nhwc-unit", (1, CROP, CROP, 3), "float32", "NHWC", (0.0, 1.0),
                  "RGB, float32 NHWC [1, 224, 224, 3], values in [0, 1] (pixel / 255: metadata NormalizationOptions "
                  "mean [0], std [255]). Normalization is inside the model: do NOT apply ImageNet mean/std"),
    InputContract("rgb-nhwc-uint8", (1, CROP, CROP, 3), "uint8", "NHWC", (0.0, 255.0),
                  "RGB, uint8 NHWC [1, 224, 224, 3], pixel values 0..255; scaling and normalization are inside "
                  "the model"),
    InputContract("rgb-image", (1, 3, CROP, CROP), "uint8", "image", (0.0, 255.0),
                  "RGB image 224x224 (CVPixelBuffer / CGImage; Vision scales and crops it); the model scales pixels "
                  "by 1/255 and applies the ImageNet normalization itself"),
)
_OUT = (
    OutputContract("probabilities", (1, NUM_CLASSES), "float32",
                   "float32 [1, 1000] class probabilities (softmax inside the model, sums to 1); index i is line i "
                   "of labels.txt"),
    OutputContract("logits", (1, NUM_CLASSES), "float32",
                   "float32 [1, 1000] unnormalized class logits; index i is line i of labels.txt"),
    OutputContract("classifier", (1, NUM_CLASSES), "float32",
                   "Core ML classifier: 'classLabel' (the top label) and a {label: probability} dictionary over "
                   "the 1000 unique labels (softmax inside the model, float32)"),
)
INPUT_CONTRACTS = MappingProxyType({c.id: c for c in _IN})
OUTPUT_CONTRACTS = MappingProxyType({c.id: c for c in _OUT})
_C = TypeVar("_C", InputContract, OutputContract)


def _known(artifact: Path | str, kind: str, spec: TensorSpec, table: Mapping[str, _C]) -> _C:
    """The contract ``spec`` names in ``table``; `ArtifactError` naming the expected and the actual one."""
    c = table.get(spec.contract or "")
    if c is None:
        raise ArtifactError(
            f"{artifact}: its manifest declares the {kind} contract {spec.contract or '(none)'!r} "
            f"({spec.dtype} {spec.layout} {list(spec.shape)}); this harness knows {sorted(table)}. "
            "Rebuild it with this version's `edge-convnext convert`, or upgrade edge-convnext")
    return c


def input_contract(artifact: Path | str, spec: TensorSpec) -> InputContract:
    """The known contract a manifest's input spec declares; `ArtifactError` naming both when unknown or off."""
    c = _known(artifact, "input", spec, INPUT_CONTRACTS)
    if (tuple(spec.shape), spec.dtype, spec.layout) != (c.shape, c.dtype, c.layout):
        raise ArtifactError(
            f"{artifact}: its manifest's input is {spec.dtype} {spec.layout} {list(spec.shape)}, but contract "
            f"{c.id!r} is {c.dtype} {c.layout} {list(c.shape)}; the manifest is inconsistent. Rebuild it")
    return c


def output_contract(artifact: Path | str, spec: TensorSpec) -> OutputContract:
    """The known contract a manifest's output spec declares; `ArtifactError` naming both when unknown."""
    return _known(artifact, "output", spec, OUTPUT_CONTRACTS)


def check_tensor(artifact: Path | str, contract: InputContract, shape: tuple[int, ...], dtype: str) -> None:
    """Refuse a model whose actual input tensor is not the one its contract describes, naming both."""
    if (tuple(int(d) for d in shape), str(dtype)) != (contract.shape, contract.dtype):
        raise ArtifactError(
            f"{artifact}: the model's input is {dtype} {list(shape)}, but its contract {contract.id!r} expects "
            f"{contract.dtype} {contract.layout} {list(contract.shape)}; rebuild it with `edge-convnext convert`")


def to_pil_images(pixels: np.ndarray) -> list[object]:
    """``rgb-image`` batch (float32 NCHW 0..255) -> PIL RGB images, for Core ML's own ``predict`` on macOS."""
    from PIL import Image

    return [Image.fromarray(np.ascontiguousarray(p.transpose(1, 2, 0)).astype(np.uint8), "RGB") for p in pixels]
