"""Top-k class names with probabilities, for scripts on a device: the `Classifier` API and ``edge-convnext classify``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from edge_convnext.errors import ImageError
from edge_convnext.labels import read_labels
from edge_convnext.manifest import manifest_path, read_manifest, verify_artifact
from edge_convnext.metrics import log_softmax, topk
from edge_convnext.preprocessing import Preprocessing, preprocess_file, preprocess_image
from edge_convnext.runners import open_runner


@dataclass
class Prediction:
    image: str
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (class index, name, probability)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "error": self.error,
                "top": [{"index": i, "label": n, "probability": round(p, 6)} for i, n, p in self.top]}

    def text(self) -> str:
        if self.error:
            return f"{self.image}: ERROR {self.error}"
        return "\n".join([f"{self.image}:"] + [f"  {p:7.2%}  {n}  ({i})" for i, n, p in self.top])


# How a camera frame's bytes are ordered. Picamera2's "RGB888" and "XRGB8888" formats are BGR / BGRX in
# memory (libcamera names the 32-bit word, little-endian), so a frame from them is "BGR" / "BGRX" here.
CHANNEL_ORDERS = {"RGB": [0, 1, 2], "BGR": [2, 1, 0], "RGBX": [0, 1, 2], "BGRX": [2, 1, 0]}
ImageInput = Union[str, Path, Image.Image, np.ndarray]


class Classifier:
    """An artifact, its manifest and labels, opened once: ``Classifier(path).classify(photo)`` -> `Prediction`.

    At load the artifact's sha256 is checked against its manifest (`ManifestError` on a mismatch,
    `ArtifactError` for a missing or truncated file, `RuntimeUnavailable` when its runtime is not
    installed); images go through the manifest's preprocessing, the same one `eval` uses.
    """

    def __init__(self, artifact: str | Path, top: int = 5, threads: int | None = None, verify: bool = True) -> None:
        self.artifact = Path(artifact)
        self.manifest = read_manifest(manifest_path(self.artifact))
        if verify:
            verify_artifact(self.artifact, self.manifest)
        self.labels = read_labels(self.artifact.parent / self.manifest.labels.get("file", "labels.txt"))
        self.preprocessing = Preprocessing.from_dict(self.manifest.preprocessing)
        self.top = top
        self._runner = open_runner(self.artifact, self.manifest, threads=threads)

    def classify(self, image: ImageInput, channel_order: str | None = None, top: int | None = None) -> Prediction:
        """Top-k labels with probabilities for one image.

        ``image``: a file path; a PIL image (any mode, converted to RGB); or a uint8 array ``[H, W, 3]``
        (or ``[H, W, 4]`` with an unused 4th byte), for which ``channel_order`` ("RGB", "BGR", "RGBX",
        "BGRX") is required because a camera frame does not say. Raises `ImageError` for an unreadable
        file, ``ValueError`` for an array of the wrong shape, dtype or order.
        """
        name, x = self._prepare(image, channel_order)
        logits = self._runner.run(x[None])
        probs = np.exp(log_softmax(logits))[0]
        idx = topk(logits, min(top or self.top, logits.shape[1]))[0]
        return Prediction(name, [(int(i), self.labels[i] if i < len(self.labels) else f"class {i}", float(probs[i]))
                                 for i in idx])

    def _prepare(self, image: ImageInput, channel_order: str | None) -> tuple[str, np.ndarray]:
        """-> (a display name, float32 CHW ``[3, 224, 224]`` in [0, 1])."""
        if isinstance(image, (str, Path)):
            return str(image), preprocess_file(Path(image), self.preprocessing)
        if isinstance(image, Image.Image):
            return f"<PIL {image.mode} {image.width}x{image.height}>", preprocess_image(image, self.preprocessing)
        if isinstance(image, np.ndarray):
            return f"<array {'x'.join(map(str, image.shape))}>", preprocess_image(
                frame_to_image(image, channel_order), self.preprocessing)
        raise TypeError(f"classify() takes a path, a PIL image or a NumPy array, not {type(image).__name__}")


def frame_to_image(frame: np.ndarray, channel_order: str | None) -> Image.Image:
    """uint8 ``[H, W, 3|4]`` camera frame in ``channel_order`` -> RGB PIL image."""
    if channel_order is None:
        raise ValueError("an array needs channel_order='RGB' or 'BGR' ('BGRX' for 4 bytes per pixel); "
                         "Picamera2's 'RGB888' format is BGR in memory")
    order = CHANNEL_ORDERS.get(channel_order.upper())
    if order is None:
        raise ValueError(f"channel_order {channel_order!r}: use one of {sorted(CHANNEL_ORDERS)}")
    want = 4 if channel_order.upper().endswith("X") else 3
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != want:
        raise ValueError(f"expected a uint8 [H, W, {want}] frame for {channel_order}, got {frame.dtype} {list(frame.shape)}")
    return Image.fromarray(np.ascontiguousarray(frame[:, :, order]), mode="RGB")


def classify(artifact: Path, images: Sequence[Path], top: int = 5, threads: int | None = None,
             verify: bool = True) -> list[Prediction]:
    """`Classifier` over image files, for the CLI: an unreadable image gets an error entry; the others
    are still classified."""
    clf = Classifier(artifact, top=top, threads=threads, verify=verify)
    out = []
    for image in images:
        try:
            out.append(clf.classify(Path(image)))
        except ImageError as e:
            out.append(Prediction(str(image), error=str(e)))
    return out
