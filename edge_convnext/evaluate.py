"""``edge-convnext eval``: run artifacts on the evaluation split and compare with the stored reference.

Per artifact: top-1/top-5 against the labels, top-1 agreement and top-5 overlap with the float
reference, logits SQNR, cosine, KL(reference || artifact), max abs error, images counted and failed,
and runtime seconds per image. Needs NumPy, Pillow and the artifact's runtime: no torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.dataset import ImageNetSubset, Sample, load_subset
from edge_convnext.errors import ArtifactError, EdgeConvNextError, ImageError, ManifestError, RuntimeUnavailable
from edge_convnext.fileio import display_path
from edge_convnext.manifest import Manifest, manifest_path, read_manifest, verify_artifact
from edge_convnext.metrics import Fidelity, accuracy, compare
from edge_convnext.preprocessing import Preprocessing, crop_uint8, load_rgb, to_unit_float
from edge_convnext.progress import Progress
from edge_convnext.recipes import RECIPES, ArtifactFormat
from edge_convnext.reference import REFERENCE_FILE, StoredReference, load_reference
from edge_convnext.runners import open_runner

log = logging.getLogger(__name__)
BATCH = 8
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
    seconds_per_image: float | None = None
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
    artifacts = find_artifacts(paths)
    ref_path = opts.reference or artifacts[0].parent / REFERENCE_FILE
    reference = load_reference(ref_path)
    subset = load_subset(opts.data, opts.ground_truth)
    ids = reference.image_ids[: opts.limit] if opts.limit else reference.image_ids
    samples = samples_for(ids, subset, ref_path)
    pre = Preprocessing.from_dict(reference.meta["preprocessing"])
    images = ImageCache(samples, pre)
    results = [evaluate_artifact(a, reference, images, opts) for a in artifacts]
    return EvalRun(results, reference.weights, bool(reference.meta.get("synthetic")), subset.description,
                   display_path(ref_path), len(samples))


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
    """Decoded, cropped evaluation images (uint8, decoded once and shared by all artifacts)."""

    def __init__(self, samples: list[Sample], p: Preprocessing) -> None:
        self.samples = samples
        self.p = p
        self._crops: dict[str, np.ndarray | None] = {}
        self.errors: dict[str, str] = {}

    def get(self, s: Sample) -> np.ndarray | None:
        if s.image_id not in self._crops:
            try:
                self._crops[s.image_id] = crop_uint8(load_rgb(s.path), self.p)
            except ImageError as e:  # counted as failed; the run goes on
                log.warning("%s", e)
                self.errors[s.image_id] = str(e)
                self._crops[s.image_id] = None
        return self._crops[s.image_id]


def evaluate_artifact(path: Path, reference: StoredReference, images: ImageCache, opts: EvalOptions) -> ArtifactResult:
    t_start = time.perf_counter()
    fmt = ArtifactFormat.from_path(str(path))
    result = ArtifactResult(recipe=path.stem, path=str(path), format=fmt.key, precision="?", status="error")
    try:
        m = read_manifest(manifest_path(path))
        result.recipe, result.precision, result.size_bytes = m.recipe, m.precision, m.size_bytes
        if not path.exists():
            raise ArtifactError(f"{path}: manifest exists but the artifact is missing; rebuild it")
        if opts.verify:
            verify_artifact(path, m)
        _check_same_weights(path, m, reference)
        runner = open_runner(path, m, threads=opts.threads)
    except RuntimeUnavailable as e:
        result.status, result.reason = "not runnable here", str(e)
        return result
    except EdgeConvNextError as e:
        result.reason = str(e)
        return result
    result.runner, result.emulated = runner.name, runner.emulated

    got: list[np.ndarray] = []
    kept: list[str] = []
    run_seconds = 0.0
    with Progress(len(images.samples), f"eval {result.recipe}") as progress:
        for start in range(0, len(images.samples), BATCH):
            if opts.budget_s is not None and kept and time.perf_counter() - t_start > opts.budget_s:
                result.stopped_by_budget = True
                break
            chunk = images.samples[start : start + BATCH]
            crops = [(s, images.get(s)) for s in chunk]
            ok = [(s, c) for s, c in crops if c is not None]
            result.failed_ids += [s.image_id for s, c in crops if c is None]
            if ok:
                x = to_unit_float(np.stack([c for _, c in ok]))
                t0 = time.perf_counter()
                try:
                    got.append(runner.run(x))
                except Exception as e:  # a runtime crash on the artifact is its result, not ours
                    result.reason = f"{path}: the runtime failed while running it: {type(e).__name__}: {e}"
                    return result
                run_seconds += time.perf_counter() - t0
                kept += [s.image_id for s, _ in ok]
            progress.advance(len(chunk), failed=len(chunk) - len(ok))

    result.failed = len(result.failed_ids)
    result.images = len(kept)
    result.wall_seconds = round(time.perf_counter() - t_start, 3)
    if not kept:
        result.reason = "no image could be read"
        return result
    logits = np.concatenate(got)
    rows = reference.rows(kept)
    ref_logits, labels = reference.logits[rows], reference.labels[rows]
    result.top1, result.top5 = accuracy(logits, labels)
    result.reference_top1, result.reference_top5 = accuracy(ref_logits, labels)
    result.fidelity = compare(ref_logits, logits)
    result.seconds_per_image = run_seconds / len(kept)
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
