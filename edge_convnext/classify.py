"""``edge-convnext classify``: top-k class names with probabilities, for scripts on a device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.errors import ImageError
from edge_convnext.labels import read_labels
from edge_convnext.manifest import manifest_path, read_manifest, verify_artifact
from edge_convnext.metrics import log_softmax, topk
from edge_convnext.preprocessing import Preprocessing, preprocess_file
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


def classify(artifact: Path, images: Sequence[Path], top: int = 5, threads: int | None = None,
             verify: bool = True) -> list[Prediction]:
    """Run ``artifact`` on each image with the preprocessing recorded in its manifest.

    Labels come from the ``labels.txt`` the manifest names, beside the artifact. An unreadable image
    gets an error entry; the others are still classified.
    """
    artifact = Path(artifact)
    m = read_manifest(manifest_path(artifact))
    if verify:
        verify_artifact(artifact, m)
    labels = read_labels(artifact.parent / m.labels.get("file", "labels.txt"))
    pre = Preprocessing.from_dict(m.preprocessing)
    runner = open_runner(artifact, m, threads=threads)
    out = []
    for image in images:
        try:
            x = preprocess_file(Path(image), pre)[None]
        except ImageError as e:
            out.append(Prediction(str(image), error=str(e)))
            continue
        logits = runner.run(x)
        probs = np.exp(log_softmax(logits))[0]
        idx = topk(logits, min(top, logits.shape[1]))[0]
        out.append(Prediction(str(image), [(int(i), labels[i] if i < len(labels) else f"class {i}",
                                            float(probs[i])) for i in idx]))
    return out
