"""``edge-convnext eval``: run artifacts on the evaluation split and compare with the stored reference.

Per artifact: top-1/top-5 against the labels, top-1 agreement and top-5 overlap with the float
reference, logits SQNR, cosine, KL(reference || artifact), max abs error, images counted and failed,
and runtime seconds per image. Needs NumPy, Pillow and the artifact's runtime: no torch, no Ray.

The work is shards (`edge_convnext.shards`): locally one shard per artifact, run in-process; with
``--ray`` many, run as Ray tasks (`edge_convnext.distributed`). Either way the shards' logits are
concatenated in image order and every metric is computed once (`merge_shards`), so the numbers do not
depend on how the work was split. ``--results DIR`` keeps finished shards (`edge_convnext.shard_store`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_convnext.dataset import ImageNetSubset, Sample, load_subset
from edge_convnext.errors import ArtifactError, EdgeConvNextError, ManifestError
from edge_convnext.fileio import display_path
from edge_convnext.manifest import Manifest, manifest_path, read_manifest
from edge_convnext.metrics import Fidelity, accuracy, compare
from edge_convnext.preprocessing import Preprocessing
from edge_convnext.progress import Progress
from edge_convnext.recipes import RECIPES, ArtifactFormat
from edge_convnext.reference import REFERENCE_FILE, StoredReference, load_reference
from edge_convnext.shard_store import ShardStore
from edge_convnext.shards import ArtifactJob, Shard, ShardResult, ShardSettings, decode_crop, host_identity, plan_shards, run_shard, shard_key

log = logging.getLogger(__name__)
_RECIPE_ORDER = {r.name: i for i, r in enumerate(RECIPES)}


@dataclass(frozen=True)
class EvalOptions:
    data: Path | None = None
    ground_truth: Path | None = None
    reference: Path | None = None
    limit: int | None = None
    threads: int | None = None
    verify: bool = True
    budget_s: float | None = None  # per artifact: stop after this many seconds, report the images done
    results: Path | None = None  # keep finished shards here; a rerun computes only what is missing
    ray: str | None = None  # run shards as Ray tasks: a cluster address, or "local" to start one here
    shard_images: int = 256  # images per shard with --ray (rounded up to a multiple of the batch)
    ray_cpus: int | None = None  # CPUs of the local Ray cluster (default: all cores)
    ray_retries: int = 3  # times a shard whose worker died is retried before it is reported as failed
    decode_threads: int = 1  # local eval: threads decoding the next images during inference (0: inline)


@dataclass
class ArtifactResult:
    """One artifact's evaluation. ``status``: "ok", "not runnable here" or "error" (see ``reason``)."""

    recipe: str
    path: str
    format: str
    precision: str
    status: str
    reason: str | None = None
    runner: str | None = None
    emulated: bool = False
    size_bytes: int = 0
    images: int = 0
    failed: int = 0
    failed_ids: list[str] = field(default_factory=list)
    top1: float | None = None
    top5: float | None = None
    reference_top1: float | None = None
    reference_top5: float | None = None
    fidelity: Fidelity | None = None
    seconds_per_image: float | None = None  # inside the runtime
    images_per_second: float | None = None  # throughput of the image loop: decoding, preprocessing, inference
    wall_seconds: float = 0.0
    stopped_by_budget: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["fidelity"] = self.fidelity.to_dict() if self.fidelity else None
        return d


@dataclass
class EvalRun:
    results: list[ArtifactResult]
    weights: dict[str, Any]
    synthetic: bool
    data: str
    reference: str
    requested_images: int
    shards: dict[str, int] = field(default_factory=dict)  # computed, reused, failed, corrupted (recomputed)

    @property
    def errors(self) -> list[ArtifactResult]:
        return [r for r in self.results if r.status == "error"]


def find_artifacts(paths: Sequence[Path]) -> list[Path]:
    """Artifacts named directly, or every artifact with a manifest inside the given directories."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.suffix in {f.ext for f in ArtifactFormat}:
            found.append(p)
        elif p.is_dir():
            inside = [q for q in p.iterdir() if q.suffix in {f.ext for f in ArtifactFormat} and not q.name.startswith(".")]
            found.extend(sorted(inside, key=lambda q: (_RECIPE_ORDER.get(q.stem, 99), q.name)))
        else:
            raise ArtifactError(f"{p}: not an artifact (.mlpackage/.tflite/.pte) or a directory of them")
    if not found:
        raise ArtifactError(f"no artifacts in {', '.join(map(str, paths))}; run `edge-convnext convert` first")
    return found


def evaluate_paths(paths: Sequence[Path], opts: EvalOptions) -> EvalRun:
    if opts.ray is not None and opts.budget_s is not None:
        raise EdgeConvNextError("--budget is refused with --ray: a time budget per artifact has no meaning when its "
                                "shards run on many workers at once; use --limit N to evaluate the first N images")
    artifacts = find_artifacts(paths)
    ref_path = opts.reference or artifacts[0].parent / REFERENCE_FILE
    reference = load_reference(ref_path)
    subset = load_subset(opts.data, opts.ground_truth)
    ids = reference.image_ids[: opts.limit] if opts.limit else reference.image_ids
    samples = samples_for(ids, subset, ref_path)
    pre = Preprocessing.from_dict(reference.meta["preprocessing"])
    # With --ray a task reserves one Ray CPU per runtime thread, so the thread count must be explicit there.
    threads = opts.threads if opts.ray is None else (opts.threads or 1)
    settings = ShardSettings(pre.to_dict(), threads, opts.verify)
    prepared = [prepare_job(a, reference) for a in artifacts]
    jobs = [p for p in prepared if isinstance(p, ArtifactJob)]
    executor: ShardExecutor
    if opts.ray is None:
        executor = LocalExecutor(ImageCache(samples, pre), opts.budget_s, opts.decode_threads)
        plans = {j.path: plan_shards(j, samples, None) for j in jobs}
    else:
        from edge_convnext.distributed import RayExecutor  # Ray loads only here: the local path never imports it

        executor = RayExecutor(opts.ray, num_cpus=opts.ray_cpus, retries=opts.ray_retries)
        plans = {j.path: plan_shards(j, samples, opts.shard_images) for j in jobs}
    store = ShardStore(opts.results) if opts.results else None
    counts: Counter[str] = Counter()
    with executor:
        done = run_shards([s for j in jobs for s in plans[j.path]], settings, executor, store, counts)
    results = [merge_shards(p, plans[p.path], [done[id(s)] for s in plans[p.path]], reference)
               if isinstance(p, ArtifactJob) else p for p in prepared]
    counts["failed"] = sum(r.status == "error" for r in done.values())
    if store:
        counts["corrupted"] = len(store.corrupted)
    return EvalRun(results, reference.weights, bool(reference.meta.get("synthetic")), subset.description,
                   display_path(ref_path), len(samples), dict(counts))


def samples_for(ids: list[str], subset: ImageNetSubset, ref_path: Path) -> list[Sample]:
    by_id = {s.image_id: s for s in subset.samples}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ManifestError(
            f"{ref_path}: {len(missing)} reference image(s) are not in {subset.description}, e.g. {missing[:3]}; "
            "evaluate on the data the reference was computed on (--data)"
        )
    return [by_id[i] for i in ids]


class ImageCache:
    """Decoded, cropped evaluation images (uint8), decoded once and shared by all artifacts of a local run.

    At most ``max_images`` crops are kept (150 KB each): the full 50,000-image validation set would
    need 7.5 GB, so past that images are decoded again for each artifact instead.
    """

    def __init__(self, samples: list[Sample], p: Preprocessing, max_images: int = 4096) -> None:
        self.samples = samples
        self.p = p
        self.max_images = max_images
        self._crops: dict[str, np.ndarray | None] = {}

    def get(self, s: Sample) -> np.ndarray | None:
        if s.image_id in self._crops:
            return self._crops[s.image_id]
        crop = decode_crop(s, self.p)
        if len(self._crops) < self.max_images:
            self._crops[s.image_id] = crop
        return crop


def prepare_job(path: Path, reference: StoredReference) -> ArtifactJob | ArtifactResult:
    """The artifact's manifest facts for its shards, or its error result (unreadable manifest, other weights)."""
    fmt = ArtifactFormat.from_path(str(path))
    try:
        m = read_manifest(manifest_path(path))
        _check_same_weights(path, m, reference)
    except EdgeConvNextError as e:
        return ArtifactResult(recipe=path.stem, path=str(path), format=fmt.key, precision="?", status="error",
                              reason=str(e))
    return ArtifactJob(str(path), m.recipe, fmt.key, m.precision, m.sha256, m.size_bytes)


class ShardExecutor(Protocol):
    """Runs shards: in this process (`LocalExecutor`) or as Ray tasks (`edge_convnext.distributed.RayExecutor`)."""

    def __enter__(self) -> ShardExecutor: ...

    def __exit__(self, *exc: object) -> None: ...

    def identity(self, fmt: ArtifactFormat, threads: int | None) -> dict[str, Any]:
        """`edge_convnext.shards.host_identity` where the shards will run (keys the stored results)."""
        ...

    def run(self, shards: list[Shard], settings: ShardSettings) -> Iterator[tuple[int, ShardResult]]:
        """(position in ``shards``, result) as each finishes; a shard that cannot be run is an "error" result."""
        ...


class LocalExecutor:
    """One shard after another in this process, with a progress line per artifact and `ImageCache` crops.

    ``decode_threads`` decode the next images while the runtime runs (`run_shard`).
    """

    def __init__(self, images: ImageCache, budget_s: float | None = None, decode_threads: int = 1) -> None:
        self.images = images
        self.budget_s = budget_s
        self.decode_threads = decode_threads

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def identity(self, fmt: ArtifactFormat, threads: int | None) -> dict[str, Any]:
        return host_identity(fmt, threads)

    def run(self, shards: list[Shard], settings: ShardSettings) -> Iterator[tuple[int, ShardResult]]:
        for i, shard in enumerate(shards):
            with Progress(len(shard.samples), f"eval {shard.job.recipe}", rate_unit="images") as progress:
                yield i, run_shard(shard, settings, crop=self.images.get, on_batch=progress.advance,
                                   budget_s=self.budget_s, decode_threads=self.decode_threads)


def run_shards(shards: list[Shard], settings: ShardSettings, executor: ShardExecutor, store: ShardStore | None,
               counts: Counter[str]) -> dict[int, ShardResult]:
    """Every shard's result, keyed by ``id(shard)``: from ``store`` when finished before, else from ``executor``.

    Each newly finished shard is stored as soon as it arrives, so a crash loses only the shards in flight.
    """
    done: dict[int, ShardResult] = {}
    pending: list[Shard] = []
    identities: dict[str, dict[str, Any]] = {}
    for s in shards:
        cached = None
        if store is not None:
            if s.job.format not in identities:
                identities[s.job.format] = executor.identity(ArtifactFormat.from_path(s.job.path), settings.threads)
            cached = store.load(s, shard_key(s, settings, identities[s.job.format]))
        if cached is not None:
            done[id(s)] = cached
            counts["reused"] += 1
        else:
            pending.append(s)
    for i, r in executor.run(pending, settings):
        s = pending[i]
        done[id(s)] = r
        counts["computed"] += 1
        if store is not None:
            store.save(s, shard_key(s, settings, r.identity), r)
    return done


def merge_shards(job: ArtifactJob, shards: list[Shard], parts: list[ShardResult], reference: StoredReference) -> ArtifactResult:
    """One artifact's result from its shards' logits, in image order; metrics computed once over all of them.

    A failed shard fails the artifact (named with its image range, never dropped); shards produced by
    different runtimes, threads or CPUs (`host_identity`) are refused rather than mixed.
    """
    result = ArtifactResult(recipe=job.recipe, path=job.path, format=job.format, precision=job.precision,
                            status="error", size_bytes=job.size_bytes)
    result.runner = next((p.runner for p in parts if p.runner), None)
    result.emulated = any(p.emulated for p in parts)
    result.wall_seconds = round(sum(p.wall_seconds for p in parts), 3)
    bad = [(s, p) for s, p in zip(shards, parts) if p.status != "ok"]
    if bad:
        if all(p.status == "not runnable here" for _, p in bad):
            result.status = "not runnable here"
        result.reason = bad[0][1].reason if len(parts) == 1 else "; ".join(
            [f"{len(bad)} of {len(parts)} shards failed"] + [f"{s.label}: {p.reason}" for s, p in bad[:3]])
        return result
    kinds = {json.dumps(p.identity, sort_keys=True) for p in parts}
    if len(kinds) > 1:
        result.reason = (f"its shards ran on different runtimes, thread counts or CPUs ({'; '.join(sorted(kinds))}); "
                         "numbers from different kernels are not merged. Use one kind of worker, or a fresh --results DIR")
        return result
    result.failed_ids = [i for p in parts for i in p.failed_ids]
    result.failed = len(result.failed_ids)
    kept = [i for p in parts for i in p.ids]
    result.images = len(kept)
    result.stopped_by_budget = any(p.stopped_by_budget for p in parts)
    if not kept:
        result.reason = "no image could be read"
        return result
    logits = np.concatenate([p.logits for p in parts if len(p.ids)])
    rows = reference.rows(kept)
    ref_logits, labels = reference.logits[rows], reference.labels[rows]
    result.top1, result.top5 = accuracy(logits, labels)
    result.reference_top1, result.reference_top5 = accuracy(ref_logits, labels)
    result.fidelity = compare(ref_logits, logits)
    result.seconds_per_image = sum(p.run_seconds for p in parts) / len(kept)
    loop = sum(p.loop_seconds for p in parts)  # with --ray: one worker's throughput, not the cluster's
    result.images_per_second = round(len(kept) / loop, 2) if loop > 0 else None
    result.status = "ok"
    return result


def _check_same_weights(path: Path, m: Manifest, reference: StoredReference) -> None:
    want = reference.meta.get("weights_sha256")
    have = m.weights.get("sha256")
    if want and have and want != have:
        raise ManifestError(
            f"{path}: built from weights {m.weights.get('source')} (sha256 {have[:12]}…) but the reference logits "
            f"are for {reference.weights.get('source')} (sha256 {want[:12]}…); rebuild, or pass the matching --reference"
        )
