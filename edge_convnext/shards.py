"""The unit of evaluation work: one artifact on one range of images (a shard), run by `run_shard`.

The local eval is one shard per artifact run in-process; ``eval --ray`` runs many shards as Ray tasks
(`edge_convnext.distributed`). Both call `run_shard`, and both merge the same way
(`edge_convnext.evaluate.merge_shards`): a shard returns its raw logits, and every metric is computed
once over the concatenated logits of all shards, so sharded and local numbers are bit-identical.
Needs NumPy, Pillow and the artifact's runtime only (no Ray, no torch).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.dataset import Sample, ids_sha256
from edge_convnext.errors import ArtifactError, EdgeConvNextError, ImageError, ManifestError, RuntimeUnavailable
from edge_convnext.info import version
from edge_convnext.manifest import Manifest, manifest_path, read_manifest, verify_artifact
from edge_convnext.prefetch import prefetched
from edge_convnext.preprocessing import Preprocessing, crop_uint8, load_rgb, to_unit_float
from edge_convnext.recipes import ArtifactFormat
from edge_convnext.runners import Runner, open_runner

log = logging.getLogger(__name__)
BATCH = 8  # images per runner call; shard boundaries are multiples of it so batches match the local run
PREFETCH_BATCHES = 2  # batches decoded ahead of the one running: 16 images, about 10 MB of float32 input

# The distribution whose kernels produce a format's numbers (the first one installed is used).
_RUNTIME_DISTS = {
    ArtifactFormat.TFLITE: ("ai-edge-litert", "tflite-runtime"),
    ArtifactFormat.EXECUTORCH: ("executorch",),
    ArtifactFormat.COREML: ("coremltools",),
}


@dataclass(frozen=True)
class ArtifactJob:
    """One artifact as the driver read it from its manifest; ``sha256`` is checked again where it runs."""

    path: str
    recipe: str
    format: str
    precision: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Shard:
    """``samples`` are positions ``start .. start + len(samples) - 1`` of the evaluation list."""

    job: ArtifactJob
    start: int
    samples: tuple[Sample, ...]

    @property
    def label(self) -> str:
        return f"{self.job.recipe} images {self.start}-{self.start + len(self.samples) - 1}"


@dataclass(frozen=True)
class ShardSettings:
    """What besides the shard decides its numbers: preprocessing (`Preprocessing.to_dict`) and threads."""

    preprocessing: dict[str, Any]
    threads: int | None = None
    verify: bool = True


@dataclass
class ShardResult:
    """``logits`` float32 ``[len(ids), 1000]`` for the images that ran (``ids``, in shard order).

    ``status``: "ok", "not runnable here" or "error" (``reason``). ``identity`` is the runtime, its
    version, the thread count and the CPU that produced the logits (`host_identity`).
    """

    status: str
    reason: str | None = None
    runner: str | None = None
    emulated: bool = False
    ids: list[str] = field(default_factory=list)
    logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 1000), np.float32))
    failed_ids: list[str] = field(default_factory=list)
    run_seconds: float = 0.0  # inside the runtime
    wall_seconds: float = 0.0  # the whole call: loading and checking the artifact included
    loop_seconds: float = 0.0  # the image loop alone (decoding, preprocessing and inference, overlapped)
    stopped_by_budget: bool = False
    identity: dict[str, Any] = field(default_factory=dict)


def plan_shards(job: ArtifactJob, samples: list[Sample], shard_images: int | None) -> list[Shard]:
    """Split ``samples`` into shards of ``shard_images`` (rounded up to a multiple of `BATCH`); None: one shard."""
    if not shard_images or shard_images >= len(samples):
        return [Shard(job, 0, tuple(samples))]
    size = -(-shard_images // BATCH) * BATCH
    return [Shard(job, i, tuple(samples[i : i + size])) for i in range(0, len(samples), size)]


@functools.lru_cache(maxsize=1)
def cpu_signature() -> str:
    """The CPU's model and ISA flags, hashed: runtimes pick kernels (AVX2, AVX-512, NEON dot) by them."""
    text = platform.processor() or ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = ("model name", "flags", "Features", "CPU part")
        text += "\n".join(sorted({ln.split(":", 1)[1].strip() for ln in lines if ln.split(":")[0].strip() in keep}))
    except OSError:  # not Linux: the machine name and processor string stand in
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def host_identity(fmt: ArtifactFormat, threads: int | None) -> dict[str, Any]:
    """Runtime distribution and version, threads actually used, machine and CPU signature of this process."""
    dists = _RUNTIME_DISTS[fmt]
    dist = next((d for d in dists if version(d)), dists[0])
    return {"runtime": dist, "version": version(dist), "threads": threads or os.cpu_count() or 1,
            "machine": platform.machine(), "cpu": cpu_signature()}


def shard_key(shard: Shard, settings: ShardSettings, identity: dict[str, Any]) -> str:
    """sha256 naming a shard's numbers: artifact sha256, image ids, preprocessing and `host_identity`."""
    spec = {"artifact_sha256": shard.job.sha256, "images": ids_sha256(list(shard.samples)),
            "preprocessing": settings.preprocessing, "identity": identity}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


CropFn = Callable[[Sample], "np.ndarray | None"]
ProgressFn = Callable[[int, int], None]  # (images done, of which failed)
OpenFn = Callable[[Path, Manifest, "int | None"], Runner]


def _open(path: Path, m: Manifest, threads: int | None) -> Runner:
    return open_runner(path, m, threads=threads)


def decode_crop(s: Sample, p: Preprocessing) -> np.ndarray | None:
    """uint8 ``[224, 224, 3]`` crop of one image, or None (logged) when it cannot be read."""
    try:
        return crop_uint8(load_rgb(s.path), p)
    except ImageError as e:  # counted as failed; the run goes on
        log.warning("%s", e)
        return None


@dataclass
class _Batch:
    """One batch as the runtime gets it: float32 ``[len(ok), 3, 224, 224]`` in [0, 1], or None if none decoded."""

    size: int
    ok_ids: list[str]
    failed_ids: list[str]
    x: np.ndarray | None


def _prepare(chunk: tuple[Sample, ...], crop: CropFn) -> _Batch:
    """Decode and preprocess one batch (the shared preprocessing); unreadable images are listed, not raised."""
    crops = [(s, crop(s)) for s in chunk]
    ok = [(s, c) for s, c in crops if c is not None]
    x = to_unit_float(np.stack([c for _, c in ok])) if ok else None
    return _Batch(len(chunk), [s.image_id for s, _ in ok], [s.image_id for s, c in crops if c is None], x)


def run_shard(shard: Shard, settings: ShardSettings, crop: CropFn | None = None,
              on_batch: ProgressFn | None = None, budget_s: float | None = None,
              opener: OpenFn | None = None, decode_threads: int = 1) -> ShardResult:
    """Open the shard's artifact once (sha256 checked), run its images through the shared preprocessing.

    ``crop`` maps a sample to its uint8 crop (default: decode it here); ``budget_s`` stops after that
    many seconds with the images done (``stopped_by_budget``); ``opener`` loads the runner (default
    `open_runner`; Ray workers keep the last one). ``decode_threads`` threads decode and preprocess
    the next `PREFETCH_BATCHES` batches while the runtime runs the current one (0: one after the
    other in this thread); the batches, and so the logits, are the same either way. Never raises for
    the artifact's faults: they come back as the result's status and reason.
    """
    t_start = time.perf_counter()
    job = shard.job
    path = Path(job.path)
    fmt = ArtifactFormat.from_path(job.path)
    result = ShardResult(status="error", identity=host_identity(fmt, settings.threads))
    pre = Preprocessing.from_dict(settings.preprocessing)
    crop = crop or (lambda s: decode_crop(s, pre))
    try:
        m = read_manifest(manifest_path(path))
        if not path.exists():
            raise ArtifactError(f"{path}: manifest exists but the artifact is missing; rebuild it")
        if m.sha256 != job.sha256:
            raise ManifestError(f"{path}: its manifest here says sha256 {m.sha256[:12]}… but the run was planned "
                                f"for {job.sha256[:12]}…; every worker must see the same artifact files")
        if settings.verify:
            verify_artifact(path, m)
        runner = (opener or _open)(path, m, settings.threads)
    except RuntimeUnavailable as e:
        result.status, result.reason = "not runnable here", str(e)
        return result
    except EdgeConvNextError as e:
        result.reason = str(e)
        return result
    result.runner, result.emulated = runner.name, runner.emulated

    got: list[np.ndarray] = []
    chunks = [shard.samples[i : i + BATCH] for i in range(0, len(shard.samples), BATCH)]
    t_loop = time.perf_counter()
    with contextlib.closing(prefetched(chunks, lambda c: _prepare(c, crop), PREFETCH_BATCHES, decode_threads)) as batches:
        for batch in batches:
            if budget_s is not None and result.ids and time.perf_counter() - t_start > budget_s:
                result.stopped_by_budget = True
                break
            result.failed_ids += batch.failed_ids
            if batch.x is not None:
                t0 = time.perf_counter()
                try:
                    got.append(runner.run(batch.x))
                except Exception as e:  # a runtime crash on the artifact is its result, not ours
                    result.reason = f"{path}: the runtime failed while running it: {type(e).__name__}: {e}"
                    return result
                result.run_seconds += time.perf_counter() - t0
                result.ids += batch.ok_ids
            if on_batch:
                on_batch(batch.size, len(batch.failed_ids))
    result.loop_seconds = time.perf_counter() - t_loop
    if got:
        result.logits = np.concatenate(got).astype(np.float32, copy=False)
    result.wall_seconds = time.perf_counter() - t_start
    result.status = "ok"
    return result
