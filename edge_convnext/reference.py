"""Stored float reference logits (``reference.npz`` beside the artifacts).

``convert`` computes the float PyTorch logits of the evaluation split once and stores them with the
image ids, labels and the weights' identity, so a device compares its artifacts without torch.
Read with ``allow_pickle=False``: the file holds only arrays and one JSON string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.errors import ManifestError
from edge_convnext.fileio import atomic_path

REFERENCE_FILE = "reference.npz"


@dataclass
class StoredReference:
    """``logits`` float32 ``[N, 1000]``; ``image_ids`` and ``labels`` (int64 ``[N]``) align with its rows."""

    logits: np.ndarray
    image_ids: list[str]
    labels: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.image_ids)
        if self.logits.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError(f"reference rows disagree: {self.logits.shape[0]} logits, {n} ids, {len(self.labels)} labels")
        self._row = {i: r for r, i in enumerate(self.image_ids)}

    def rows(self, ids: list[str]) -> np.ndarray:
        missing = [i for i in ids if i not in self._row]
        if missing:
            raise KeyError(f"{len(missing)} image(s) have no stored reference logits, e.g. {missing[:3]}")
        return np.asarray([self._row[i] for i in ids], dtype=np.int64)

    @property
    def weights(self) -> dict[str, Any]:
        return dict(self.meta.get("weights", {}))


def save_reference(path: Path, ref: StoredReference) -> None:
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                logits=ref.logits.astype(np.float32),
                image_ids=np.asarray(ref.image_ids, dtype=np.str_),
                labels=ref.labels.astype(np.int64),
                meta=np.asarray(json.dumps(ref.meta)),
            )


def load_reference(path: Path) -> StoredReference:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return StoredReference(
                logits=z["logits"].astype(np.float32),
                image_ids=[str(s) for s in z["image_ids"]],
                labels=z["labels"].astype(np.int64),
                meta=json.loads(str(z["meta"])),
            )
    except FileNotFoundError as e:
        raise ManifestError(
            f"{path}: no stored reference logits; run `edge-convnext convert` (or `edge-convnext reference`) "
            "on a build host to write them beside the artifacts"
        ) from e
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable reference file ({e}); re-run `edge-convnext reference`") from e
