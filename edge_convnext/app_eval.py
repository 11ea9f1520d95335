"""Accuracy as an app sees it: each artifact run through its platform's own image pipeline.

``.tflite`` artifacts run in MediaPipe Tasks' ``ImageClassifier`` itself (the ``mediapipe`` package,
the same C++ graph as on Android and iOS; the optional ``app`` extra). MediaPipe's preprocessing is
never re-implemented here: the photo goes in as an ``mp.Image`` and MediaPipe resizes it, in one of
three modes:

* ``precropped``: the shared preprocessing's 224x224 crop (MediaPipe's resize is then the identity):
  checks the artifact and its metadata, not the app pipeline;
* ``default``: the whole photo, which MediaPipe stretches to 224x224 (aspect ratio not kept);
* ``roi``: the whole photo with ``ImageProcessingOptions(region_of_interest=...)`` set to
  `edge_convnext.roi.center_crop_roi`, which reproduces the reference's resize-256-crop-224 up to
  the resampling filter.

Core ML artifacts run through the Core ML emulator after `edge_convnext.vision_crop` emulates Vision's
``VNImageCropAndScaleOption`` (Vision itself exists only on Apple platforms), in the modes that
module lists. Top-1 agreement is with the stored float reference on the same images.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.errors import EdgeConvNextError, ImageError, MissingExtra, RuntimeUnavailable
from edge_convnext.evaluate import find_artifacts
from edge_convnext.manifest import manifest_path, read_manifest, verify_artifact
from edge_convnext.preprocessing import Preprocessing, crop_uint8, load_rgb
from edge_convnext.progress import Progress
from edge_convnext.reference import REFERENCE_FILE, load_reference
from edge_convnext.roi import center_crop_roi

log = logging.getLogger(__name__)
MEDIAPIPE_MODES = ("precropped", "default", "roi")


@dataclass
class ModeResult:
    """One artifact through one app pipeline mode."""

    recipe: str
    pipeline: str  # "mediapipe" or "vision-emulated"
    mode: str
    images: int = 0
    failed: int = 0
    top1_agreement: float | None = None
    error: str | None = None
    settings: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class AppEvalRun:
    results: list[ModeResult] = field(default_factory=list)
    synthetic: bool = False
    reference: str = ""


class MediaPipeClassifier:
    """MediaPipe's ``ImageClassifier`` on one ``.tflite``: uint8 RGB HWC photo -> top categories."""

    def __init__(self, artifact: Path, max_results: int = 5) -> None:
        try:
            import mediapipe as mp
            from mediapipe.tasks.python import BaseOptions, vision
            from mediapipe.tasks.python.components.containers.rect import RectF
            from mediapipe.tasks.python.vision.core.image_processing_options import ImageProcessingOptions
        except ImportError as e:
            raise MissingExtra("mediapipe", "app", "running an artifact in MediaPipe's ImageClassifier") from e
        self._mp, self._rect, self._options = mp, RectF, ImageProcessingOptions
        try:
            self._clf = vision.ImageClassifier.create_from_options(vision.ImageClassifierOptions(
                base_options=BaseOptions(model_asset_path=str(artifact)), max_results=max_results))
        except (RuntimeError, ValueError) as e:
            raise EdgeConvNextError(f"{artifact}: MediaPipe's ImageClassifier refuses it: {e}") from e

    def classify(self, rgb: np.ndarray, roi: tuple[float, float, float, float] | None = None) -> list[tuple[int, str, float]]:
        """uint8 ``[H, W, 3]`` RGB -> [(index, category name, score)], best first.

        ``roi`` is (left, top, right, bottom), normalized, top-left origin.
        """
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb, dtype=np.uint8))
        opts = None
        if roi is not None:
            left, top, right, bottom = roi
            opts = self._options(region_of_interest=self._rect(left=left, top=top, right=right, bottom=bottom))
        result = self._clf.classify(image, opts)
        return [(c.index, c.category_name, c.score) for c in result.classifications[0].categories]

    def close(self) -> None:
        self._clf.close()

    def __enter__(self) -> MediaPipeClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mediapipe_input(photo: np.ndarray, mode: str, p: Preprocessing) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """(image, roi) to hand MediaPipe for ``mode``: ``photo`` is uint8 ``[H, W, 3]`` RGB."""
    from PIL import Image

    if mode == "precropped":
        return crop_uint8(Image.fromarray(photo), p).transpose(1, 2, 0), None
    if mode == "default":
        return photo, None
    if mode == "roi":
        r = center_crop_roi(photo.shape[1], photo.shape[0], p)
        return photo, (r.left, r.top, r.right, r.bottom)
    raise ValueError(f"unknown MediaPipe mode {mode!r}; use one of {MEDIAPIPE_MODES}")


def _settings(mode: str) -> str:
    return {
        "precropped": "input already resized (shortest edge 256, bicubic) and center-cropped to 224 by the app",
        "default": "whole photo, no ImageProcessingOptions (MediaPipe stretches it to 224x224)",
        "roi": "whole photo, ImageProcessingOptions(region_of_interest=RectF(center_crop_roi(W, H)))",
    }[mode]


def evaluate_apps(paths: Sequence[Path], data: Path | None = None, limit: int | None = None,
                  modes: Sequence[str] = MEDIAPIPE_MODES, verify: bool = True) -> AppEvalRun:
    """Every ``.tflite`` (MediaPipe) and ``.mlpackage`` (emulated Vision) among ``paths`` in each mode."""
    from edge_convnext.dataset import load_subset

    artifacts = find_artifacts(paths)
    ref_path = artifacts[0].parent / REFERENCE_FILE
    reference = load_reference(ref_path)
    subset = load_subset(data)
    by_id = {s.image_id: s for s in subset.samples}
    ids = reference.image_ids[:limit] if limit else reference.image_ids
    pre = Preprocessing.from_dict(reference.meta["preprocessing"])
    want = np.argmax(reference.logits[reference.rows(ids)], axis=1)
    run = AppEvalRun(synthetic=bool(reference.meta.get("synthetic")), reference=str(ref_path))
    photos: dict[str, np.ndarray | None] = {}

    def photo(i: str) -> np.ndarray | None:
        if i not in photos:
            try:
                photos[i] = np.asarray(load_rgb(by_id[i].path), dtype=np.uint8)
            except ImageError as e:  # counted as failed; the run goes on
                log.warning("%s", e)
                photos[i] = None
        return photos[i]

    for artifact in artifacts:
        m = read_manifest(manifest_path(artifact))
        if verify:
            verify_artifact(artifact, m)
        if m.format == "tflite":
            for mode in modes:
                run.results.append(_mediapipe_mode(artifact, m.recipe, mode, ids, want, photo, pre))
        elif m.format == "coreml":
            run.results.extend(_vision_modes(artifact, m, ids, want, photo, pre))
    return run


def _mediapipe_mode(artifact: Path, recipe: str, mode: str, ids: Sequence[str], want: np.ndarray,
                    photo: Callable[[str], np.ndarray | None], pre: Preprocessing) -> ModeResult:
    res = ModeResult(recipe, "mediapipe", mode, settings=_settings(mode))
    agree = []
    try:
        with MediaPipeClassifier(artifact, max_results=1) as clf, Progress(len(ids), f"mediapipe {recipe} {mode}") as pr:
            for i, ref_top in zip(ids, want):
                im = photo(i)
                if im is None:
                    res.failed += 1
                else:
                    x, roi = mediapipe_input(im, mode, pre)
                    agree.append(clf.classify(x, roi)[0][0] == int(ref_top))
                pr.advance(1, failed=int(im is None))
    except EdgeConvNextError as e:
        res.error = str(e)
        return res
    res.images = len(agree)
    res.top1_agreement = float(np.mean(agree)) if agree else None
    return res


def _vision_modes(artifact: Path, m: Any, ids: Sequence[str], want: np.ndarray,
                  photo: Callable[[str], np.ndarray | None], pre: Preprocessing) -> list[ModeResult]:
    from edge_convnext import vision_crop
    from edge_convnext.runners import open_runner

    try:
        runner = open_runner(artifact, m)
    except RuntimeUnavailable as e:
        return [ModeResult(m.recipe, "vision-emulated", "-", error=f"not runnable here: {e}")]
    out = []
    for mode, (settings, prepare) in vision_crop.APP_MODES.items():
        res = ModeResult(m.recipe, "vision-emulated", mode, settings=settings)
        agree = []
        with Progress(len(ids), f"vision {m.recipe} {mode}") as pr:
            for i, ref_top in zip(ids, want):
                im = photo(i)
                if im is None:
                    res.failed += 1
                else:
                    x = prepare(im, pre)[None]
                    agree.append(int(np.argmax(runner.run(x)[0])) == int(ref_top))
                pr.advance(1, failed=int(im is None))
        res.images = len(agree)
        res.top1_agreement = float(np.mean(agree)) if agree else None
        out.append(res)
    return out


def table(run: AppEvalRun) -> str:
    """Markdown table of the run (agreement with the float reference's top-1)."""
    lines = ["| recipe | pipeline | mode | images | top-1 agreement | settings |", "|---|---|---|---|---|---|"]
    for r in run.results:
        agree = f"{100 * r.top1_agreement:.1f}%" if r.top1_agreement is not None else f"ERROR: {r.error}"
        lines.append(f"| {r.recipe} | {r.pipeline} | {r.mode} | {r.images} | {agree} | {r.settings} |")
    if run.synthetic:
        lines.append("\nSynthetic weights: agreement with the float reference, not ImageNet accuracy.")
    return "\n".join(lines)
