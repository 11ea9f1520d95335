"""TFLite backend and LiteRT runner: every recipe from the tiny ConvNeXt, checked through the device runner.

Builds share one litert-torch conversion per process (the backend caches it), so each recipe costs
seconds. SQNR floors were measured on this tiny synthetic model (8 evaluation images, 16 calibration
images) and set with a margin of about 6 dB; the synthetic head amplifies small feature errors, so
absolute numbers are far below what trained weights give.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_quantizer")
pytest.importorskip("ai_edge_litert")

import torch  # noqa: E402

from converters.backends import tflite as backend  # noqa: E402
from converters.backends import tflite_metadata as tmd  # noqa: E402
from edge_convnext.contract import INPUT_CONTRACTS, OUTPUT_CONTRACTS  # noqa: E402
from edge_convnext.errors import ArtifactError, MissingExtra  # noqa: E402
from edge_convnext.metrics import center, compare  # noqa: E402
from edge_convnext.preprocessing import preprocess_file  # noqa: E402
from edge_convnext.runners import open_runner  # noqa: E402
from edge_convnext.runners import tflite as runner_mod  # noqa: E402

pytestmark = pytest.mark.convert
REPO = Path(__file__).resolve().parents[1]
EVAL_IMAGES = 8

# recipe -> (SQNR floor in dB, op signatures that must appear in the lowering report). Measured:
# fp32 123 dB, fp16 51.4, dynamic-int8 25.7, int8 (default scope "compute") 25.0, w8a16 25.8.
EXPECT = {
    "tflite-fp32": (90.0, {"CONV_2D float32->float32 w:float32", "FULLY_CONNECTED float32->float32 w:float32"}),
    "tflite-fp16": (45.0, {"DEQUANTIZE float16->float32"}),
    "tflite-dynamic-int8": (20.0, {"FULLY_CONNECTED float32->float32 w:int8", "CONV_2D float32->float32 w:int8"}),
    "tflite-int8": (20.0, {"CONV_2D int8->int8 w:int8", "DEPTHWISE_CONV_2D int8->int8 w:int8",
                           "FULLY_CONNECTED int8->int8 w:int8", "QUANTIZE float32->int8"}),
    "tflite-w8a16": (20.0, {"CONV_2D int16->int16 w:int8", "FULLY_CONNECTED int16->int16 w:int8",
                            "GELU int16->int16", "RSQRT int16->int16"}),
}
# The decomposed LayerNorm and GELU, as they appear when quantized to int8.
LN_GELU_INT8 = {"MEAN int8->int8", "RSQRT int8->int8", "SQUARED_DIFFERENCE int8->int8", "GELU int8->int8"}


@pytest.fixture(scope="module")
def eval_batch(subset, tiny_weights):
    """float32 [8, 3, 224, 224] evaluation images and the torch export model's logits for them."""
    from converters.model import export_model

    x = np.stack([preprocess_file(s.path, tiny_weights.preprocessing) for s in subset.split("evaluation")[:EVAL_IMAGES]])
    with torch.no_grad():
        ref = export_model(tiny_weights.model, tiny_weights.preprocessing, probabilities=False)(torch.from_numpy(x)).numpy()
    return x, ref


def _build(make_context, recipe: str, tmp_path: Path, **options):
    ctx = make_context(recipe)
    if options:
        ctx.recipe = dataclasses.replace(ctx.recipe, options={**ctx.recipe.options, **options})
    out = tmp_path / f"{recipe}.tflite"
    return ctx, out, backend.build(ctx, out)


@pytest.mark.parametrize("recipe", list(EXPECT))
def test_recipe_builds_runs_and_is_faithful(recipe, make_context, tmp_path, eval_batch):
    ctx, out, result = _build(make_context, recipe, tmp_path)
    x, ref = eval_batch
    runner = runner_mod.open(out, threads=2)
    got = runner.run(x)
    assert got.shape == (EVAL_IMAGES, 1000) and got.dtype == np.float32
    fid = compare(ref, got)
    floor, signatures = EXPECT[recipe]
    assert fid.sqnr_db >= floor, f"{recipe}: SQNR {fid.sqnr_db:.1f} dB < {floor} dB"
    if recipe == "tflite-fp32":
        assert fid.max_abs <= 1e-4, fid
    low = result.lowering
    json.dumps(low)  # goes into the manifest as is
    assert signatures <= set(low["ops_by_dtype"]), low["ops_by_dtype"]
    # The interface contract holds for every recipe: float32 NHWC in (MediaPipe's layout), float32
    # probabilities out, the softmax computed in float32 whatever the recipe quantizes.
    assert low["input"]["shape"] == [1, 224, 224, 3] and low["input"]["dtype"] == "float32"
    assert low["output"]["shape"] == [1, 1000] and low["output"]["dtype"] == "float32"
    assert result.input == INPUT_CONTRACTS["rgb-nhwc-unit"].spec("image")
    assert result.output == OUTPUT_CONTRACTS["probabilities"].spec("probabilities")
    assert low["ops_by_dtype"].get("SOFTMAX float32->float32") == 1, low["ops_by_dtype"]
    raw = runner.run_raw(INPUT_CONTRACTS["rgb-nhwc-unit"].feed(x[:1]))
    assert abs(float(raw.sum()) - 1.0) < 1e-5 and raw.min() >= 0
    assert low["xnnpack"]["partitions"] >= 1
    assert result.calibration_used == (16 if ctx.recipe.calibrated else 0)
    assert set(result.embedded) == {"labels.txt", "manifest.json", "model_metadata"}
    assert low["model_metadata"]["input"]["normalization"] == [{"mean": [0.0], "std": [255.0]}]


def test_fp32_is_one_xnnpack_partition_and_quantized_recipes_shrink(make_context, tmp_path):
    _, fp32, r32 = _build(make_context, "tflite-fp32", tmp_path)
    assert r32.lowering["xnnpack"] == {"partitions": 1, "delegated_ops": r32.lowering["ops_total"], "not_delegated": {}}
    assert r32.lowering["quantize_ops"] == r32.lowering["dequantize_ops"] == 0
    for recipe, ratio in (("tflite-fp16", 0.6), ("tflite-dynamic-int8", 0.45), ("tflite-int8", 0.45)):
        _, out, _ = _build(make_context, recipe, tmp_path)
        assert out.stat().st_size < ratio * fp32.stat().st_size, recipe


def test_int8_default_scope_is_int8_compute_in_one_xnnpack_partition(make_context, tmp_path):
    _, _, result = _build(make_context, "tflite-int8", tmp_path)
    low = result.lowering
    assert low["quantization"]["activation_scope"] == backend.DEFAULT_INT8_SCOPE == "compute"
    assert low["xnnpack"]["partitions"] == 1 and low["xnnpack"]["not_delegated"] == {}
    assert low["quantize_ops"] >= 1 and low["dequantize_ops"] >= 1
    # Every conv and FC is int8 -> int8 except the classifier, which is dynamic-range (float logits).
    sigs = low["ops_by_dtype"]
    assert sigs.get("FULLY_CONNECTED float32->float32 w:int8") == 1
    assert sigs["FULLY_CONNECTED int8->int8 w:int8"] == low["ops"]["FULLY_CONNECTED"] - 1
    assert sigs["CONV_2D int8->int8 w:int8"] == low["ops"]["CONV_2D"]
    assert sigs["DEPTHWISE_CONV_2D int8->int8 w:int8"] == low["ops"]["DEPTHWISE_CONV_2D"]
    # LayerNorm pieces and GELU stay float in this scope.
    assert {"GELU", "RSQRT", "SQUARED_DIFFERENCE"} <= set(low["float_compute_ops"])
    assert any("bias" in n for n in result.notes)


@pytest.mark.parametrize("scope", ["all", "ln16"])
def test_int8_scopes_quantize_layernorm_and_gelu(scope, make_context, tmp_path, eval_batch):
    _, out, result = _build(make_context, "tflite-int8", tmp_path, int8_scope=scope)
    sigs = set(result.lowering["ops_by_dtype"])
    if scope == "all":
        assert LN_GELU_INT8 <= sigs, sigs
    else:  # LayerNorm pieces in int16, GELU int8
        assert {"GELU int8->int8", "RSQRT int16->int16", "MEAN int16->int16"} <= sigs, sigs
    x, ref = eval_batch
    floor = {"all": 15.0, "ln16": 17.0}[scope]  # measured 20.4 and 23.0 dB
    assert compare(ref, runner_mod.open(out).run(x)).sqnr_db >= floor


def test_graph_ranges_keep_the_build_best_on_held_out_images(make_context, tmp_path, subset):
    """Option ``graph_ranges`` (tflite-int8-all's): every calibrated tensor's range by each estimator in turn,
    the build with the best held-out SQNR kept, then an estimator per op group. Re-measured here, the
    artifact gives the chosen candidate's number on the same held-out images, which are neither
    evaluation nor statistics images."""
    ctx, out, result = _build(make_context, "tflite-int8", tmp_path, int8_scope="all",
                              graph_ranges={"estimators": ("minmax", "percentile 99.99"), "held_out_images": 16,
                                            "per_group": {"estimators": ("minmax", "percentile 99.9"), "passes": 1}})
    rec = result.lowering["quantization"]["graph_ranges"]
    assert set(rec["candidates"]) == {"minmax", "percentile 99.99"} and rec["tensors"] > 100
    sqnr = {k: v["sqnr_db"] for k, v in rec["candidates"].items()}
    assert sqnr["minmax"] != sqnr["percentile 99.99"]  # the ranges did change the build
    assert rec["chosen"] == max(sqnr, key=sqnr.__getitem__)
    assert result.lowering["quantization"]["calibration"]["ranges"] == "per op group"
    group = rec["per_group"]
    assert group["start"] == rec["chosen"] and group["start_sqnr_db"] == sqnr[rec["chosen"]]
    assert sum(g["tensors"] for g in group["groups"].values()) == rec["tensors"]
    assert group["sqnr_db"] >= group["start_sqnr_db"] and group["builds_measured"] > len(group["groups"]) / 2
    moved = {m["group"]: m["estimator"] for m in group["moves"]}
    assert all(g["estimator"] == moved.get(name, rec["chosen"]) for name, g in group["groups"].items())
    held = rec["held_out_image_ids"]
    assert len(held) == 16 and not set(held) & {s.image_id for s in subset.split("evaluation")}
    assert not set(held) & set(ctx.calibration_images.used_ids[:result.calibration_used])
    data = ctx.choice_split(16)
    assert data.held_ids == held
    again = compare(data.reference, runner_mod.open(out).run(np.concatenate(data.held)))
    assert abs(again.sqnr_db - group["sqnr_db"]) < 0.05, (again.sqnr_db, group)


def test_graph_ranges_replace_only_the_chosen_groups_tensors():
    from converters.act_quant import ESTIMATORS, Observation
    from converters.backends.tflite_ranges import with_choice

    obs = Observation()
    g = torch.Generator().manual_seed(0)
    obs.add(torch.linspace(-1.0, 100.0, 10001), per_image=100000, g=g)
    qsvs = {"a": {"min": np.array([-1.0], np.float32), "max": np.array([100.0], np.float32), "other": 1},
            "b": {"min": np.array(-5.0, np.float32), "max": np.array(5.0, np.float32)}}
    ranges = {name: {"a": ESTIMATORS[name].range(obs)} for name in ("percentile 99.99", "minmax")}
    out = with_choice(qsvs, {"g": ["a"]}, ranges, {"g": "percentile 99.99"})
    assert out["b"] is qsvs["b"] and out["a"]["other"] == 1 and out["a"]["max"].shape == (1,)
    assert 99.9 < float(out["a"]["max"][0]) < 100.0 and -1.0 < float(out["a"]["min"][0]) < -0.98
    assert with_choice(qsvs, {"g": ["a"]}, ranges, {"g": "minmax"})["a"]["max"][0] == np.float32(100.0)
    assert with_choice(qsvs, {"g": ["a"]}, ranges, {})["a"] is qsvs["a"]


def test_per_group_search_keeps_only_moves_that_gain():
    """Coordinate descent over op groups (tflite_ranges.choose_per_group) on a known, separable score:
    it finds each group's best estimator, skips candidates reported as already built (None), and keeps
    no move that gains less than min_gain."""
    from converters.backends.tflite_ranges import choose_per_group

    cost = {"a": {"x": 0.0, "y": -1.0, "z": -0.5}, "b": {"x": 0.0, "y": 0.02, "z": -2.0}, "c": {"x": 0.0}}
    calls = []

    def score(choice):
        calls.append(dict(choice))
        if choice["c"] != "x":
            return None  # e.g. a RESHAPE group: builds the same artifact
        return 10.0 - sum(cost[g].get(e, 0.0) for g, e in choice.items())

    lines = []
    out = choose_per_group(["a", "b", "c"], ["x", "y", "z"], "x", 10.0, score, passes=2, min_gain=0.05, log=lines.append)
    # Progress: one line per group and pass, saying where the search is and what the group holds.
    progress = [ln for ln in lines if ", group " in ln]
    assert len(progress) == 6 and "pass 1, group 1/3: a: now y (11.00" in progress[0], lines
    assert "pass 2, group 3/3: c: kept x (13.00" in progress[-1], lines
    assert out.choice == {"a": "y", "b": "z", "c": "x"}  # b's y gains 0.02 < min_gain: not taken
    assert out.score == 13.0 and out.start_score == 10.0
    assert [m[:2] for m in out.moves] == [("a", "y"), ("b", "z")]
    assert out.measured == sum(1 for c in calls if c["c"] == "x")  # None answers are not counted
    assert len(calls) == 2 * 3 * 2  # two passes (the first changed something) of 3 groups x 2 other estimators


def test_tensor_groups_follow_the_writing_op_and_its_module(make_context, tmp_path):
    from converters.backends.tflite_ranges import tensor_groups

    ctx, out, result = _build(make_context, "tflite-fp32", tmp_path)
    model = backend._convert_fp32(ctx)[0]
    from ai_edge_litert.interpreter import Interpreter

    names = [d["name"] for d in Interpreter(model_content=model).get_tensor_details() if d["name"]]
    groups = tensor_groups(model, names)
    assert sum(map(len, groups.values())) == len(set(names))
    # The stem's LayerNorm, the blocks', the downsampling ones and the final norm are four roles.
    rsqrt = [g for g in groups if g.startswith("RSQRT in ")]
    assert len(rsqrt) == 4 and all(g.endswith("LayerNorm") for g in rsqrt), sorted(groups)
    assert "FULLY_CONNECTED in ExportClassifier/ConvNextStage/ConvNextLayer/Linear" in groups, sorted(groups)
    assert "INPUT" in groups and "CONSTANT" in groups


def test_unknown_graph_range_estimator_is_refused(make_context, tmp_path):
    with pytest.raises(backend.TFLiteBuildError, match="unknown range estimators"):
        _build(make_context, "tflite-int8", tmp_path, int8_scope="all", graph_ranges={"estimators": ("p99",)})


def test_unknown_int8_scope_is_refused(make_context, tmp_path):
    with pytest.raises(backend.TFLiteBuildError, match="int8_scope"):
        _build(make_context, "tflite-int8", tmp_path, int8_scope="everything")


def test_embedded_labels_and_manifest(make_context, tmp_path):
    ctx, out, result = _build(make_context, "tflite-fp32", tmp_path)
    with zipfile.ZipFile(out) as z:  # TFLite Support layout: a zip after the flatbuffer
        assert sorted(z.namelist()) == ["labels.txt", "manifest.json"]
        start = min(i.header_offset for i in z.infolist())
    files = runner_mod.read_embedded(out)
    assert files["labels.txt"].decode().splitlines() == ctx.labels
    assert json.loads(files["manifest.json"]) == ctx.embedded_manifest
    assert runner_mod.embedded_labels(out) == ctx.labels
    assert runner_mod.embedded_manifest(out) == ctx.embedded_manifest
    # Without the zip (a tool that rewrites the flatbuffer drops it), the metadata entries still serve.
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(out.read_bytes()[:start])
    assert runner_mod.embedded_labels(bare) == ctx.labels
    assert runner_mod.open(bare).run(ctx.example_input.numpy()).shape == (1, 1000)


def test_model_metadata_is_the_official_schema_mediapipe_reads(make_context, tmp_path):
    """TFLITE_METADATA per metadata_schema.fbs: general info, RGB image input normalized by 255, labels on the output."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as mfb

    ctx, out, _ = _build(make_context, "tflite-fp32", tmp_path)
    md = tmd.read_model_metadata(out.read_bytes())
    assert md.name.decode().startswith("ConvNeXt-Tiny") and md.version and md.author and md.license
    assert b"SYNTHETIC" in md.description and md.minParserVersion == b"1.0.0"
    (sg,) = md.subgraphMetadata
    (image,), (scores,) = sg.inputTensorMetadata, sg.outputTensorMetadata
    assert image.content.contentPropertiesType == mfb.ContentProperties.ImageProperties
    assert image.content.contentProperties.colorSpace == mfb.ColorSpaceType.RGB
    (norm,) = image.processUnits
    assert (list(norm.options.mean), list(norm.options.std)) == ([0.0], [255.0])
    (labels,) = scores.associatedFiles
    assert (labels.name, labels.type) == (b"labels.txt", mfb.AssociatedFileType.TENSOR_AXIS_LABELS)
    assert [f.name for f in sg.associatedFiles] == [b"manifest.json"]
    with zipfile.ZipFile(out) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert z.read("labels.txt").decode().splitlines() == ctx.labels
    assert len(set(ctx.labels)) == 1000 and "crane (n02012849)" in ctx.labels


def test_metadata_a_consumer_would_refuse_is_never_written(make_context, tmp_path, monkeypatch):
    """A deflated zip entry, a label count that does not match the output or a repeated label fails the build."""
    def deflated_zip(files):
        import io

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in files.items():
                z.writestr(name, data)
        return buf.getvalue()

    monkeypatch.setattr(tmd, "stored_zip", deflated_zip)
    with pytest.raises(tmd.MetadataError, match="compressed.*uncompressed"):
        _build_atomically(make_context, "tflite-fp32", tmp_path / "deflated.tflite")
    assert not (tmp_path / "deflated.tflite").exists()
    monkeypatch.undo()

    ctx = make_context("tflite-fp32")
    ctx.labels = ctx.labels[:999]
    with pytest.raises(tmd.MetadataError, match="999 labels but the output has 1000"):
        _build_atomically(make_context, "tflite-fp32", tmp_path / "short.tflite", ctx)
    assert not (tmp_path / "short.tflite").exists()
    ctx.labels = ctx.labels[:998] + ["crane", "crane"]
    with pytest.raises(tmd.MetadataError, match="repeats labels \\['crane'\\]"):
        _build_atomically(make_context, "tflite-fp32", tmp_path / "dup.tflite", ctx)
    assert not (tmp_path / "dup.tflite").exists()


def _build_atomically(make_context, recipe: str, final: Path, ctx=None):
    """Build as `convert` does: into a temporary path renamed into place only on success."""
    from edge_convnext.fileio import atomic_path

    ctx = ctx or make_context(recipe)
    with atomic_path(final) as tmp:
        return backend.build(ctx, tmp)


def test_short_tensor_names():
    from converters.backends.tflite_flatbuffer import short_tensor_name

    long = ("converters.model.ExportClassifier/transformers.models.convnext.modeling_convnext.ConvNextStage_3/"
            "torch.nn.modules.linear.Linear_pwconv2")
    assert short_tensor_name(f"{long};;{long};1") == "ExportClassifier/ConvNextStage_3/Linear_pwconv2;1"
    assert short_tensor_name("serving_default_args_0") == "serving_default_args_0"


def test_runner_does_not_import_torch(make_context, tmp_path):
    """The Raspberry Pi install has numpy, pillow and ai-edge-litert only."""
    ctx, out, _ = _build(make_context, "tflite-int8", tmp_path)
    np.save(tmp_path / "x.npy", ctx.example_input.numpy())
    code = f"""
import sys, numpy as np
from edge_convnext.runners import open_runner
from edge_convnext.runners.tflite import read_embedded
r = open_runner({str(out)!r}, threads=1)
y = r.run(np.load({str(tmp_path / 'x.npy')!r}))
assert y.shape == (1, 1000) and y.dtype == np.float32, (y.shape, y.dtype)
assert sorted(read_embedded({str(out)!r})) == ["labels.txt", "manifest.json"]
assert "torch" not in sys.modules, "the LiteRT runner imported torch"
print(r.name, int(y.argmax()))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "litert"


def test_open_runner_dispatches_and_matches_build_check(make_context, tmp_path):
    ctx, out, result = _build(make_context, "tflite-fp32", tmp_path)
    r = open_runner(out, threads=2)
    assert r.name == "litert" and r.emulated is False
    with torch.no_grad():
        want = np.log(ctx.model(ctx.example_input).numpy())
    np.testing.assert_allclose(center(r.run(ctx.example_input.numpy())), center(want), atol=1e-4)
    with pytest.raises(ValueError, match=r"\[N, 3, 224, 224\]"):
        r.run(np.zeros((1, 224, 224, 3), np.float32))


def test_corrupted_truncated_and_missing_files(make_context, tmp_path):
    _, out, _ = _build(make_context, "tflite-fp32", tmp_path)
    data = out.read_bytes()
    cases = {
        "missing.tflite": None,
        "empty.tflite": b"",
        "truncated.tflite": data[: len(data) // 3],
        "garbage.tflite": b"\x00" * 4 + b"TFL3" + bytes(range(256)) * 8,
        "notflite.tflite": b"PK\x03\x04 this is a zip, not a model",
    }
    for name, content in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(ArtifactError, match=name):
            runner_mod.open(p)
        with pytest.raises(ArtifactError, match=name):
            open_runner(p)
    with pytest.raises(ArtifactError, match="notflite.tflite"):
        runner_mod.read_embedded(tmp_path / "notflite.tflite")


def test_wrong_input_contract_is_refused(tmp_path):
    """A model whose input is not [1, 3, 224, 224] (or its NHWC form) is refused, naming both shapes."""
    import litert_torch

    path = tmp_path / "small.tflite"
    litert_torch.convert(_Head(channels_last=False).eval(), (torch.rand(1, 3, 64, 64),)).export(str(path))
    with pytest.raises(ArtifactError, match=r"small.tflite: the model's input is float32 \[1, 3, 64, 64\], but its "
                       r"contract 'rgb-nhwc-unit' expects float32 NHWC \[1, 224, 224, 3\]"):
        runner_mod.open(path)


def test_nchw_nhwc_and_integer_io_models_are_fed_by_their_contract(tmp_path, subset, tiny_weights):
    """The runner follows the manifest's contracts: NCHW or NHWC input, logits output, int8 I/O (de)quantized."""
    import litert_torch
    from ai_edge_quantizer import quantizer, recipe

    head = _Head(channels_last=True).eval()
    nhwc = tmp_path / "nhwc.tflite"
    litert_torch.convert(head, (torch.rand(1, 224, 224, 3),)).export(str(nhwc))
    x = np.stack([preprocess_file(s.path, tiny_weights.preprocessing) for s in subset.split("calibration")[:4]])
    with torch.no_grad():
        want = head(torch.from_numpy(x.transpose(0, 2, 3, 1).copy())).numpy()
    logits_nhwc = types.SimpleNamespace(input=INPUT_CONTRACTS["rgb-nhwc-unit"].spec("x"),
                                        output=OUTPUT_CONTRACTS["logits"].spec("y"))
    r = runner_mod.open(nhwc, logits_nhwc)
    assert r.input_contract.layout == "NHWC"
    np.testing.assert_allclose(r.run(x), want, atol=1e-4)
    nchw = tmp_path / "nchw.tflite"
    litert_torch.convert(_Head(channels_last=False).eval(), (torch.rand(1, 3, 224, 224),)).export(str(nchw))
    logits_nchw = types.SimpleNamespace(input=INPUT_CONTRACTS["rgb-nchw-unit"].spec("x"), output=logits_nhwc.output)
    np.testing.assert_allclose(runner_mod.open(nchw, logits_nchw).run(x), want, atol=1e-4)
    with pytest.raises(ArtifactError, match="expects float32 NCHW"):
        runner_mod.open(nhwc, logits_nchw)

    q = quantizer.Quantizer(str(nhwc), recipe.static_wi8_ai8())  # quantizes the input/output tensors too
    sig = q.calibrate({"serving_default": [{"args_0": xi.transpose(1, 2, 0)[None].copy()} for xi in x]})
    int8 = tmp_path / "nhwc_int8.tflite"
    int8.write_bytes(bytes(q.quantize(sig).quantized_model))
    r8 = runner_mod.open(int8, logits_nhwc)
    assert r8._in["dtype"] == np.int8 and r8._out["dtype"] == np.int8
    assert compare(want, r8.run(x)).sqnr_db > 20


class _Head(torch.nn.Module):
    """A small image -> 1000 logits model (strided conv, pooling, linear)."""

    def __init__(self, channels_last: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.channels_last = channels_last
        self.conv = torch.nn.Conv2d(3, 8, 8, stride=8)
        self.fc = torch.nn.Linear(8, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_missing_interpreter_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    p = tmp_path / "m.tflite"
    p.write_bytes(b"\x00" * 4 + b"TFL3")
    with pytest.raises(MissingExtra, match=r"edge-convnext\[litert\]"):
        runner_mod.open(p)


@pytest.mark.full
def test_full_size_fp32(tmp_path, subset):
    """ConvNeXt-T (synthetic random:0) -> tflite-fp32: size and parity with torch on real images."""
    from converters.context import BuildContext
    from converters.calibration import CalibrationStream
    from converters.model import export_model
    from converters.weights import load_weights
    from edge_convnext.recipes import get_recipe

    w = load_weights("random:0")
    model = export_model(w.model, w.preprocessing)
    cal = CalibrationStream(subset.split("calibration"), w.preprocessing)
    ctx = BuildContext(recipe=get_recipe("tflite-fp32"), model=model,
                       example_input=torch.from_numpy(next(iter(cal(1)))), calibration_images=cal,
                       calibration_count=0, labels=[f"class {i}" for i in range(1000)],
                       embedded_manifest={"recipe": "tflite-fp32"}, workdir=tmp_path / "work", log=lambda m: None)
    out = tmp_path / "tflite-fp32.tflite"
    result = backend.build(ctx, out)
    size = out.stat().st_size
    assert 105e6 < size < 125e6, size  # 28.6 M float32 parameters
    assert result.lowering["xnnpack"]["partitions"] == 1
    x = np.stack([preprocess_file(s.path, w.preprocessing) for s in subset.split("evaluation")[:4]])
    with torch.no_grad():
        ref = export_model(w.model, w.preprocessing, probabilities=False)(torch.from_numpy(x)).numpy()
    assert compare(ref, runner_mod.open(out, threads=2).run(x)).max_abs <= 1e-3
