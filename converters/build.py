"""``edge-convnext convert``: build recipes into ``<out>/<recipe>.<ext>`` with manifests and parity.

For each recipe: build into a temporary path -> run it with the host's runtime on a few evaluation
images against the stored float reference -> refuse a float artifact beyond its bound -> rename it into
place and write ``<recipe>.json``. Once per run: ``labels.txt`` and ``reference.npz``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters import accuracy_target
from converters.accuracy_target import AccuracyTarget
from converters.backends import get_builder
from converters.calibration import DEFAULT_CALIBRATION_IMAGES, CalibrationStream
from converters.context import BuildContext, BuildResult
from converters.model import export_model
from converters.prepare import Preparation, PreparedModel
from converters.quant_plan import QuantPlan
from edge_convnext import bench
from converters.reference import ensure_reference
from converters.weights import LoadedWeights, load_weights
from edge_convnext.dataset import SPLIT_RULE, ImageNetSubset, Sample, ids_sha256, image_directory, load_subset
from edge_convnext.errors import EdgeConvNextError, RuntimeUnavailable
from edge_convnext.fileio import atomic_path, sha256_path
from edge_convnext.info import package_versions
from edge_convnext.labels import LABELS_FILE, write_labels
from edge_convnext.labels import unique_labels
from edge_convnext.manifest import Manifest, manifest_path, stamp, write_manifest
from edge_convnext.metrics import compare
from edge_convnext.preprocessing import Preprocessing, preprocess_file
from edge_convnext.progress import fmt_seconds
from edge_convnext.recipes import Recipe, get_recipe, select_recipes
from edge_convnext.reference import StoredReference
from edge_convnext.runners import open_runner

log = logging.getLogger(__name__)
DEFAULT_PARITY_IMAGES = 8


class ParityError(EdgeConvNextError):
    """A float artifact's logits are further from the reference than its recipe allows."""


@dataclass(frozen=True)
class ConvertOptions:
    weights: str | None = None
    recipes: str = "all"
    out: Path = Path("artifacts")
    data: Path | None = None
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    calibration: Path | None = None  # a directory of the user's own images instead of the calibration split
    parity_images: int = DEFAULT_PARITY_IMAGES
    reference_images: int | None = None  # None: the whole evaluation split
    preprocessing: Preprocessing | None = None
    threads: int | None = None
    fail_fast: bool = False
    target: AccuracyTarget | None = None  # --min-sqnr / --min-agreement: float layers until it is met


@dataclass
class Outcome:
    recipe: Recipe
    ok: bool
    seconds: float
    manifest: Manifest | None = None
    error: str | None = None


@dataclass
class ConvertReport:
    weights: dict[str, Any]
    out: Path
    outcomes: list[Outcome] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outcomes)


def convert(opts: ConvertOptions, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> ConvertReport:
    """Build the selected recipes; a failing recipe is reported and the others still build."""
    recipes = select_recipes(opts.recipes)
    builders = {r.format: get_builder(r.format) for r in recipes}  # a missing extra fails before any work
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    weights = load_weights(opts.weights, opts.preprocessing)
    report = ConvertReport(weights.identity.to_dict(), out, warnings=list(weights.warnings))
    echo(_weights_banner(weights))
    subset = load_subset(opts.data)
    calibration_samples = _calibration_samples(subset, opts)  # a bad --calibration DIR fails before any work
    labels = _labels(weights, subset)
    write_labels(out / LABELS_FILE, labels)

    echo(f"float reference: evaluation split of {subset.description}")
    reference = ensure_reference(weights, subset, out, opts.reference_images)
    calibration = CalibrationStream(calibration_samples, weights.preprocessing)
    model = export_model(weights.model, weights.preprocessing)
    preparation = Preparation(model, calibration, opts.calibration_images)
    if any(preparation.makes_choices(r) for r in recipes) or (opts.target and any(r.quantized for r in recipes)):
        preparation.held_out()  # split once, before any backend calibrates: held-out images set nothing
    example = torch.from_numpy(next(iter(calibration(1))))
    toolchain = package_versions()

    for i, recipe in enumerate(recipes, 1):
        echo(f"[{i}/{len(recipes)}] {recipe.name}: building ({recipe.description})")
        t0 = time.perf_counter()
        try:
            preparation.log = lambda msg, name=recipe.name: echo(f"    {name}: {msg}")
            prepared = preparation.prepare(recipe)
            m = _build_one(recipe, builders[recipe.format], weights, subset, labels, reference, calibration,
                           prepared, preparation, model, example, toolchain, opts, echo)
            outcome = Outcome(recipe, True, time.perf_counter() - t0, manifest=m)
            echo(f"[{i}/{len(recipes)}] {recipe.name}: done in {fmt_seconds(outcome.seconds)}, "
                 f"{m.size_bytes / 1e6:.1f} MB, parity {_parity_text(m.parity)}")
        except Exception as e:  # one recipe's failure must not stop the others
            if not isinstance(e, EdgeConvNextError):
                log.debug("%s", traceback.format_exc())
            outcome = Outcome(recipe, False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
            echo(f"[{i}/{len(recipes)}] {recipe.name}: FAILED after {fmt_seconds(outcome.seconds)}: {outcome.error}")
            if opts.fail_fast:
                report.outcomes.append(outcome)
                break
        report.outcomes.append(outcome)
    return report


def _build_one(
    recipe: Recipe,
    builder: Callable[[BuildContext, Path], BuildResult],
    weights: LoadedWeights,
    subset: ImageNetSubset,
    labels: list[str],
    reference: StoredReference,
    calibration: CalibrationStream,
    prepared: PreparedModel,
    preparation: Preparation,
    float_model: torch.nn.Module,
    example: torch.Tensor,
    toolchain: dict[str, str],
    opts: ConvertOptions,
    echo: Callable[[str], None],
) -> Manifest:
    model = prepared.model
    final = Path(opts.out) / recipe.filename
    planned = BuildResult.for_recipe(recipe)  # the backend's result replaces these specs
    manifest = Manifest(
        recipe=recipe.name,
        format=recipe.format.key,
        precision=recipe.precision,
        description=recipe.description,
        file=recipe.filename,
        input=planned.input,
        output=planned.output,
        preprocessing=weights.preprocessing.to_dict(),
        weights=weights.identity.to_dict(),
        labels={"file": LABELS_FILE, "count": len(labels), "sha256": sha256_path(Path(opts.out) / LABELS_FILE)},
        toolchain=toolchain,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        calibration=_calibration_plan(recipe, subset, calibration.samples, opts),
    )
    workdir = Path(tempfile.mkdtemp(prefix=f"edge-convnext-{recipe.name}-"))
    try:
        ctx = BuildContext(
            recipe=recipe,
            model=model,
            float_model=float_model,
            plan=prepared.plan,
            activation_ranges=prepared.activation_ranges,
            held_out=preparation.held_out() if preparation.makes_choices(recipe) else None,
            example_input=example,
            calibration_images=calibration,
            calibration_count=min(opts.calibration_images, preparation.statistics_images),
            labels=labels,
            embedded_manifest=manifest.embedded_dict(),
            workdir=workdir,
            log=lambda msg: echo(f"    {recipe.name}: {msg}"),
        )
        with atomic_path(final) as tmp:
            target_record = None
            if opts.target is not None and recipe.quantized:
                result, prepared, target_record = _build_to_target(recipe, builder, ctx, tmp, manifest, prepared,
                                                                   preparation, opts)
            else:
                result = builder(ctx, tmp)
            manifest.input, manifest.output = result.input, result.output
            manifest.lowering, manifest.embedded, manifest.notes = result.lowering, result.embedded, result.notes
            # what happened before the backend: rewrites, float layers, smoothing, rounding, ranges
            manifest.lowering.update(prepared.lowering_records())
            if target_record is not None:
                manifest.lowering["accuracy_target"] = target_record
            if manifest.calibration is not None:
                manifest.calibration["count"] = result.calibration_used
                manifest.calibration["image_ids"] = list(calibration.used_ids[: result.calibration_used])
            stamp(tmp, manifest)
            manifest.parity = _parity(tmp, final, manifest, reference, subset, opts)
            if manifest.parity.get("passed") is False:
                raise ParityError(
                    f"{recipe.name}: max abs logit error {manifest.parity['max_abs']:.3g} exceeds the bound "
                    f"{recipe.parity_max_abs:g} against the float reference; the artifact was not written"
                )
        write_manifest(manifest_path(final), manifest)
        return manifest
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _build_to_target(recipe: Recipe, builder: Callable[[BuildContext, Path], BuildResult], ctx: BuildContext,
                     out: Path, manifest: Manifest, prepared: PreparedModel, preparation: Preparation,
                     opts: ConvertOptions) -> tuple[BuildResult, PreparedModel, dict[str, Any]]:
    """Build ``recipe`` to ``opts.target`` (`converters.accuracy_target`): candidates are built beside the
    work directory, measured with the host's runner on the held-out calibration images, and the chosen one
    moves to ``out``. Returns its backend result, the prepared model it came from, and the manifest record."""
    assert opts.target is not None
    scheme = accuracy_target.check_supported(recipe.name, preparation.scheme(recipe))
    data = preparation.held_out()
    x = np.concatenate(data.held)
    candidates = Path(tempfile.mkdtemp(prefix=f"edge-convnext-{recipe.name}-target-"))
    built: list[tuple[Path, BuildResult, Manifest]] = []

    def build_and_measure(plan: QuantPlan, model: torch.nn.Module) -> tuple[Path, np.ndarray]:
        path = candidates / f"candidate-{len(built)}{recipe.format.ext}"
        work = candidates / f"work-{len(built)}"
        result = builder(dataclasses.replace(ctx, model=model, plan=plan, workdir=work), path)
        m = dataclasses.replace(manifest, input=result.input, output=result.output)
        stamp(path, m)
        write_manifest(manifest_path(path), m)
        built.append((path, result, m))
        return path, open_runner(path, m, threads=opts.threads).run(x)

    try:
        plan, model, path, record = accuracy_target.search(
            opts.target, prepared.plan, prepared.float_model, prepared.model, scheme,
            preparation.simulation_ranges(prepared, scheme), data, build_and_measure, ctx.log)
        first, chosen = built[0], next(b for b in built if b[0] == path)
        before_ms = bench.latency_ms(first[0], opts.threads) if chosen is not first else None
        after_ms = bench.latency_ms(chosen[0], opts.threads) if chosen is not first else None
        record["cost"] = {
            "bytes": chosen[2].size_bytes - first[2].size_bytes,
            "latency_ms": {"without": before_ms, "with": after_ms,
                           "how": "median batch-1 latency, each artifact in a fresh process on this build host "
                                  "(a loaded build machine: compare with edge-convnext bench)"}
            if chosen is not first else None,
        }
        shutil.move(str(path), str(out))
    finally:
        shutil.rmtree(candidates, ignore_errors=True)
    return chosen[1], dataclasses.replace(prepared, plan=plan, model=model), record


def _parity(artifact: Path, final: Path, m: Manifest, reference: StoredReference, subset: ImageNetSubset,
            opts: ConvertOptions) -> dict[str, Any]:
    """Run the fresh ``artifact`` (still at its temporary path) on the first evaluation images."""
    recipe_bound = get_recipe(m.recipe).parity_max_abs
    try:
        runner = open_runner(artifact, m, threads=opts.threads)
    except RuntimeUnavailable as e:
        return {"status": "not runnable here", "reason": str(e).replace(str(artifact), str(final))}
    ids = reference.image_ids[: opts.parity_images]
    by_id = {s.image_id: s for s in subset.samples}
    p = Preprocessing.from_dict(m.preprocessing)
    x = np.stack([preprocess_file(by_id[i].path, p) for i in ids])
    t0 = time.perf_counter()
    got = runner.run(x)
    seconds = (time.perf_counter() - t0) / len(ids)
    fid = compare(reference.logits[reference.rows(ids)], got)
    out: dict[str, Any] = {"status": "measured", "runner": runner.name, "emulated": runner.emulated,
                           "split": "evaluation", "image_ids": ids, **fid.to_dict(),
                           "seconds_per_image": round(seconds, 4)}
    if recipe_bound is not None:
        out["max_abs_bound"] = recipe_bound
        out["passed"] = fid.max_abs <= recipe_bound
    return out


def _calibration_samples(subset: ImageNetSubset, opts: ConvertOptions) -> list[Sample]:
    """The user's ``--calibration DIR`` images, else the data's calibration split (never evaluation images)."""
    return image_directory(opts.calibration) if opts.calibration else subset.split("calibration")


def _calibration_plan(recipe: Recipe, subset: ImageNetSubset, samples: list[Sample],
                      opts: ConvertOptions) -> dict[str, Any] | None:
    """What the manifest records of the calibration set (``samples``: the run's, from `_calibration_samples`)."""
    if not recipe.calibrated:
        return None
    if opts.calibration:
        return {"set": "user", "dir": str(opts.calibration), "rule": "every image under the directory, sorted by "
                "relative path", "requested": opts.calibration_images, "images_available": len(samples),
                "split_ids_sha256": ids_sha256(samples)}
    return {"set": "calibration", "rule": SPLIT_RULE, "requested": opts.calibration_images,
            "data": subset.description, "split_ids_sha256": subset.ids_sha256("calibration")}


def _labels(weights: LoadedWeights, subset: ImageNetSubset) -> list[str]:
    """The one labels list every artifact of a run shares (``labels.txt``), made unique (`unique_labels`)."""
    n = weights.model.config.num_labels
    wnids = subset.wnids if subset.wnids and len(subset.wnids) == n else None
    if weights.labels and len(weights.labels) == n:
        return unique_labels(weights.labels, wnids)
    if subset.class_names and len(subset.class_names) == n:
        return unique_labels(subset.class_names, wnids)
    raise EdgeConvNextError(
        "no class names: the weights' config has none and the data directory has no synset_words.txt; "
        "pass --data with a labels/synset_words.txt"
    )


def _weights_banner(w: LoadedWeights) -> str:
    ident = w.identity
    if ident.synthetic:
        bar = "!" * 78
        return (f"{bar}\n!! weights: {ident.source} -- {ident.description}\n"
                f"!! sha256 {ident.sha256[:16]}  (artifacts are real conversions; accuracy numbers are not ImageNet accuracy)\n{bar}")
    return f"weights: {ident.source} ({ident.description}), sha256 {ident.sha256[:16]}"


def _parity_text(p: dict[str, Any] | None) -> str:
    if not p or p.get("status") != "measured":
        return (p or {}).get("status", "n/a")
    return f"max|d| {p['max_abs']:.2g}, SQNR {p['sqnr_db']:.1f} dB, top-1 agree {100 * p['top1_agreement']:.0f}% ({p['runner']})"
