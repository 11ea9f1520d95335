"""Compute the float PyTorch reference logits of the evaluation split and store them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.model import ReferenceClassifier
from converters.weights import LoadedWeights
from edge_convnext.dataset import SPLIT_RULE, ImageNetSubset, Sample, ids_sha256
from edge_convnext.errors import EdgeConvNextError, ImageError, WeightsError, first_line
from edge_convnext.info import package_versions
from edge_convnext.preprocessing import Preprocessing, preprocess_file
from edge_convnext.progress import Progress
from edge_convnext.reference import REFERENCE_FILE, StoredReference, load_reference, save_reference

log = logging.getLogger(__name__)
BATCH = 16


def reference_samples(subset: ImageNetSubset, limit: int | None) -> list[Sample]:
    ev = subset.split("evaluation")
    return ev[:limit] if limit else ev


def ensure_reference(
    weights: LoadedWeights, subset: ImageNetSubset, out_dir: Path, limit: int | None = None,
    ray: str | None = None, threads: int | None = None, shard_images: int = 256, ray_cpus: int | None = None,
) -> StoredReference:
    """Reuse ``out_dir/reference.npz`` when it matches these weights, preprocessing and images, else compute it
    (on a Ray cluster with ``ray``: see `compute_reference`)."""
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
    ref = compute_reference(weights, samples, meta, ray=ray, threads=threads, shard_images=shard_images,
                            ray_cpus=ray_cpus)
    save_reference(path, ref)
    return ref


@dataclass
class ReferenceRows:
    """Float logits float32 ``[len(ids), 1000]`` of the images that could be read, in order, with their labels."""

    ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)


def compute_reference(weights: LoadedWeights, samples: list[Sample], meta: dict[str, Any],
                      ray: str | None = None, threads: int | None = None, shard_images: int = 256,
                      ray_cpus: int | None = None) -> StoredReference:
    """Float logits of transformers' model on the shared preprocessing; unreadable images are skipped.

    ``ray``: a cluster address (or "local") to compute shards of ``shard_images`` as Ray tasks of
    ``threads`` torch threads (default 1); each worker loads the weights from their recorded source
    and must find the same sha256. Shards are multiples of the batch, so every batch is the local one.
    """
    t0 = time.perf_counter()
    if ray is None:
        model = ReferenceClassifier(weights.model, weights.preprocessing).eval()
        with Progress(len(samples), "float reference") as progress:
            rows = _rows(model, weights.preprocessing, samples, progress.advance)
    else:
        rows = _rows_on_ray(weights, samples, ray, threads or 1, shard_images, ray_cpus)
    meta = meta | {"failed_images": rows.failed_ids, "seconds": round(time.perf_counter() - t0, 2)}
    return StoredReference(np.concatenate(rows.logits).astype(np.float32), rows.ids, np.asarray(rows.labels), meta)


def _rows(model: torch.nn.Module, pre: Preprocessing, samples: Sequence[Sample],
          on_batch: Callable[[int, int], None] | None = None) -> ReferenceRows:
    rows = ReferenceRows()
    with torch.inference_mode():
        for start in range(0, len(samples), BATCH):
            chunk = samples[start : start + BATCH]
            xs = []
            for s in chunk:
                try:
                    xs.append(preprocess_file(s.path, pre))
                    rows.ids.append(s.image_id)
                    rows.labels.append(s.label)
                except ImageError as e:
                    log.warning("%s", e)
                    rows.failed_ids.append(s.image_id)
            if xs:
                rows.logits.append(model(torch.from_numpy(np.stack(xs))).numpy())
            if on_batch:
                on_batch(len(chunk), len(chunk) - len(xs))
    return rows


def _reference_task(source: str, sha256: str, pre: dict[str, Any], samples: list[Sample], threads: int,
                    load_threads: int) -> ReferenceRows:
    """Runs on a Ray worker with the [convert] extra: load the weights, check them, compute one shard.

    The weights load with the driver's torch thread count: synthetic weights fit their head with a
    forward pass and an SVD, whose float rounding depends on it (measured: random:0:convnext-test has
    another sha256 at 1 thread than at 2). Checkpoint files do not depend on it.
    """
    from converters.weights import load_weights

    torch.set_num_threads(load_threads)
    weights = load_weights(source, Preprocessing.from_dict(pre))
    torch.set_num_threads(threads)
    if weights.identity.sha256 != sha256:
        raise WeightsError(f"{source}: this worker loaded weights with sha256 {weights.identity.sha256[:12]}…, the "
                           f"driver {sha256[:12]}…; every worker must see the same checkpoint")
    return _rows(ReferenceClassifier(weights.model, weights.preprocessing).eval(), weights.preprocessing, samples)


def _rows_on_ray(weights: LoadedWeights, samples: list[Sample], address: str, threads: int, shard_images: int,
                 ray_cpus: int | None) -> ReferenceRows:
    from edge_convnext.distributed import RayExecutor

    size = max(BATCH, -(-shard_images // BATCH) * BATCH)
    shards = [samples[i : i + size] for i in range(0, len(samples), size)]
    ident, pre = weights.identity, weights.preprocessing.to_dict()
    parts: list[ReferenceRows | None] = [None] * len(shards)
    with RayExecutor(address, num_cpus=ray_cpus) as ex:
        calls = [(ident.source, ident.sha256, pre, s, threads, torch.get_num_threads()) for s in shards]
        for i, r in ex.map(_reference_task, calls, [len(s) for s in shards], threads, "float reference --ray"):
            if isinstance(r, Exception):  # a reference must be complete: no shard is dropped
                raise EdgeConvNextError(f"float reference, images {i * size}-{i * size + len(shards[i]) - 1}: "
                                        f"{type(r).__name__}: {first_line(r)}") from r
            parts[i] = r
    rows = ReferenceRows()
    for r in parts:
        assert r is not None
        rows.ids += r.ids
        rows.labels += r.labels
        rows.logits += r.logits
        rows.failed_ids += r.failed_ids
    return rows


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
