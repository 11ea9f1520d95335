"""The .tflite artifacts in MediaPipe Tasks' own ImageClassifier (the consumer Android and iOS apps use).

MediaPipe is the real package (``mediapipe``, the same C++ graph as on the phones), never a
re-implementation. Photos are pre-cropped by the shared preprocessing, so MediaPipe's own resize is
the identity and its answer must equal the harness's.
"""

from __future__ import annotations

import dataclasses
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mediapipe")
pytest.importorskip("litert_torch")

from converters.backends import tflite as backend  # noqa: E402
from edge_convnext.app_eval import MediaPipeClassifier, mediapipe_input  # noqa: E402
from edge_convnext.classify import classify  # noqa: E402
from edge_convnext.errors import EdgeConvNextError  # noqa: E402
from edge_convnext.preprocessing import CONVNEXT_HF, load_rgb, preprocess_image  # noqa: E402
from edge_convnext.runners import tflite as runner_mod  # noqa: E402

pytestmark = pytest.mark.convert
TFLITE_RECIPES = ["tflite-fp32", "tflite-fp16", "tflite-dynamic-int8", "tflite-int8", "tflite-int8-all", "tflite-w8a16"]


def _photos(samples_dir: Path) -> list[Path]:
    photos = sorted(p for p in samples_dir.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    assert len(photos) >= 8
    return photos


def _all_categories(clf: MediaPipeClassifier, photo: Path) -> list[tuple[int, str, float]]:
    x, roi = mediapipe_input(np.asarray(load_rgb(photo)), "precropped", CONVNEXT_HF)
    return clf.classify(x, roi)


@pytest.mark.parametrize("recipe", TFLITE_RECIPES)
def test_every_tflite_recipe_loads_in_mediapipe_and_agrees_with_the_runner(recipe, make_context, tmp_path, samples_dir):
    ctx = make_context(recipe)
    graph = ctx.recipe.options.get("graph_ranges")
    if graph:  # tflite-int8-all: one range estimator, no search (2 minutes less); ranges change no op, tensor or
        # metadata MediaPipe reads. The search itself is tested in test_tflite_backend and test_quant_choices.
        narrow = {k: v for k, v in graph.items() if k != "per_group"} | {"estimators": ("percentile 99.99",)}
        ctx.recipe = dataclasses.replace(ctx.recipe, options={**ctx.recipe.options, "graph_ranges": narrow})
    out = tmp_path / f"{recipe}.tflite"
    backend.build(ctx, out)
    runner = runner_mod.open(out, threads=2)
    with MediaPipeClassifier(out, max_results=-1) as clf:
        for photo in _photos(samples_dir)[:3]:
            cats = _all_categories(clf, photo)
            names = [c[1] for c in cats]
            assert len(cats) == 1000 and len(set(names)) == 1000  # every class, each name once
            assert abs(sum(c[2] for c in cats) - 1.0) < 1e-3  # probabilities, not logits
            want = int(np.argmax(runner.run(preprocess_image(load_rgb(photo))[None])[0]))
            assert cats[0][0] == want and cats[0][1] == ctx.labels[want], (photo.name, cats[0], want)


def test_mediapipe_itself_refuses_what_the_build_refuses(make_context, tmp_path):
    """The build's metadata checks mirror MediaPipe: a deflated associated file is refused by MediaPipe too."""
    ctx = make_context("tflite-fp32")
    out = tmp_path / "ok.tflite"
    backend.build(ctx, out)
    data = out.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        start = min(i.header_offset for i in z.infolist())
        files = {n: z.read(n) for n in z.namelist()}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            z.writestr(name, content)
    deflated = tmp_path / "deflated.tflite"
    deflated.write_bytes(data[:start] + buf.getvalue())
    with pytest.raises(EdgeConvNextError, match="refuses it"):
        MediaPipeClassifier(deflated).close()
    from converters.backends import tflite_metadata as tmd

    with pytest.raises(tmd.MetadataError, match="compressed"):
        tmd.validate(deflated.read_bytes(), 1000, "deflated.tflite")


@pytest.fixture(scope="module")
def full_tflite(tmp_path_factory, subset):
    """Full-size ConvNeXt-T (synthetic random:0) tflite-fp32 and tflite-int8, with manifests, as convert writes them."""
    from converters.build import ConvertOptions, convert

    out = tmp_path_factory.mktemp("full_tflite")
    report = convert(ConvertOptions(weights="random:0", recipes="tflite-fp32,tflite-int8", out=out,
                                    reference_images=8, parity_images=4, calibration_images=32), echo=lambda s: None)
    assert report.ok, [o.error for o in report.outcomes]
    return out


# Float: the same kernels, the same numbers. int8: LiteRT's own kernels disagree with each other by about the
# int8 error (full-size tflite-int8, one photo, top-1 probability: XNNPACK 0.258, builtin 0.244, reference
# 0.213; MediaPipe's runtime 0.220), so the app sees the harness's class with a probability within that spread.
PROBABILITY_TOLERANCE = {"tflite-fp32": 1e-4, "tflite-int8": 0.1}


@pytest.mark.full
@pytest.mark.parametrize("recipe", ["tflite-fp32", "tflite-int8"])
def test_full_size_mediapipe_top1_equals_classify(full_tflite, recipe, samples_dir):
    """MediaPipe gives the harness's top-1 class, by index and label, with the harness's probability (within
    the kernels' spread). Within that spread two int8 runtimes may also order a near tie differently (the
    full-size test build's Egyptian cat: harness 0.407 / 0.290 for classes 87 / 678, MediaPipe 0.358 / 0.361),
    so for int8 one photo may have another top-1, if the harness's class is within the spread of it there."""
    artifact = full_tflite / f"{recipe}.tflite"
    tolerance = PROBABILITY_TOLERANCE[recipe]
    photos = _photos(samples_dir)
    harness = classify(artifact, photos, top=1)
    swapped = []
    with MediaPipeClassifier(artifact, max_results=-1) as clf:
        for photo, pred in zip(photos, harness):
            cats = _all_categories(clf, photo)
            assert abs(sum(c[2] for c in cats) - 1.0) < 1e-3
            (index, label, probability), = pred.top
            mine = next(c for c in cats if c[0] == index)
            assert mine[1] == label and abs(mine[2] - probability) < tolerance, (photo.name, mine, pred.top)
            if cats[0][0] != index:
                assert cats[0][2] - mine[2] < tolerance, (photo.name, cats[:2], pred.top)
                swapped.append(photo.name)
    assert len(swapped) <= (1 if recipe == "tflite-int8" else 0), swapped


@pytest.mark.full
def test_full_size_mediapipe_roi_reproduces_the_reference_crop(full_tflite, samples_dir):
    """With the region of interest, MediaPipe sees the reference's crop (up to its bilinear resize)."""
    artifact = full_tflite / "tflite-fp32.tflite"
    runner = runner_mod.open(artifact, threads=2)
    agree = {"roi": 0, "precropped": 0}
    photos = _photos(samples_dir)
    with MediaPipeClassifier(artifact, max_results=1) as clf:
        for photo in photos:
            rgb = np.asarray(load_rgb(photo))
            want = int(np.argmax(runner.run(preprocess_image(load_rgb(photo))[None])[0]))
            for mode in agree:
                agree[mode] += clf.classify(*mediapipe_input(rgb, mode, CONVNEXT_HF))[0][0] == want
    assert agree["precropped"] == len(photos)
    assert agree["roi"] >= len(photos) - 2, agree  # bilinear vs bicubic resampling may flip a close call
