"""Compute the float PyTorch reference logits of the evaluation split and store them."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.model import ReferenceClassifier
from converters.weights import LoadedWeights
from edge_convnext.dataset import SPLIT_RULE, ImageNetSubset, Sample, ids_sha256
from edge_convnext.errors import ImageError
from edge_convnext.info import package_versions
from edge_convnext.preprocessing import preprocess_file
from edge_convnext.progress import Progress
from edge_convnext.reference import REFERENCE_FILE, StoredReference, load_reference, save_reference

log = logging.getLogger(__name__)
BATCH = 16


def reference_samples(subset: ImageNetSubset, limit: int | None) -> list[Sample]:
    ev = subset.split("evaluation")
    return ev[:limit] if limit else ev


def ensure_reference(
    weights: LoadedWeights, subset: ImageNetSubset, out_dir: Path, limit: int | None = None
) -> StoredReference:
    """Reuse ``out_dir/reference.npz`` when it matches these weights, preprocessing and images, else compute it."""
    path = Path(out_dir) / REFERENCE_FILE
    samples = reference_samples(subset, limit)
    meta = _meta(weights, subset, samples)
    if path.exists():
        try:
            old = load_reference(path)
            if all(old.meta.get(k) == meta[k] for k in ("weights_sha256", "preprocessing", "image_ids_sha256")):
                log.info("reusing %s (%d images)", path, len(old.image_ids))
                return old
        except Exception as e:  # a stale or broken file is simply recomputed
            log.info("recomputing %s: %s", path, e)
    ref = compute_reference(weights, samples, meta)
    save_reference(path, ref)
    return ref


def compute_reference(weights: LoadedWeights, samples: list[Sample], meta: dict[str, Any]) -> StoredReference:
    """Float logits of transformers' model on the shared preprocessing; unreadable images are skipped."""
    model = ReferenceClassifier(weights.model, weights.preprocessing).eval()
    ids: list[str] = []
    labels: list[int] = []
    logits: list[np.ndarray] = []
    failed: list[str] = []
    t0 = time.perf_counter()
    with Progress(len(samples), "float reference") as progress, torch.inference_mode():
        for start in range(0, len(samples), BATCH):
            chunk = samples[start : start + BATCH]
            xs = []
            for s in chunk:
                try:
                    xs.append(preprocess_file(s.path, weights.preprocessing))
                    ids.append(s.image_id)
                    labels.append(s.label)
                except ImageError as e:
                    log.warning("%s", e)
                    failed.append(s.image_id)
            if xs:
                logits.append(model(torch.from_numpy(np.stack(xs))).numpy())
            progress.advance(len(chunk), failed=len(chunk) - len(xs))
    meta = meta | {"failed_images": failed, "seconds": round(time.perf_counter() - t0, 2)}
    return StoredReference(np.concatenate(logits).astype(np.float32), ids, np.asarray(labels), meta)


def _meta(weights: LoadedWeights, subset: ImageNetSubset, samples: list[Sample]) -> dict[str, Any]:
    return {
        "weights": weights.identity.to_dict(),
        "weights_sha256": weights.identity.sha256,
        "synthetic": weights.identity.synthetic,
        "preprocessing": weights.preprocessing.to_dict(),
        "model": "transformers ConvNextForImageClassification, float32, normalization (x - mean) / std",
        "data": subset.description,
        "split": "evaluation",
        "split_rule": SPLIT_RULE,
        "image_ids_sha256": ids_sha256(samples),
        "toolchain": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
