"""Core ML backend and runner.

Fast tier: every ``coreml-*`` recipe built once from the tiny ConvNeXt (synthetic weights, real
calibration images), its package read back on Linux (spec, MIL program, metadata), and run through
the runner (the NumPy emulator off macOS). ``macos`` compares Core ML itself with the emulator;
``full`` builds ConvNeXt-T size.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")

from converters.backends import coreml as backend  # noqa: E402
from converters.backends import coreml_bits as cb  # noqa: E402
from converters.backends import coreml_compress as cc  # noqa: E402
from converters.backends.coreml_bits import Storage  # noqa: E402
from converters.backends.coreml_compress import package_bytes  # noqa: E402
from converters.context import BuildResult  # noqa: E402
from edge_convnext.contract import INPUT_CONTRACTS, OUTPUT_CONTRACTS  # noqa: E402
from edge_convnext.errors import ArtifactError, MissingExtra  # noqa: E402
from edge_convnext.labels import unique_labels  # noqa: E402
from edge_convnext.manifest import Manifest, TensorSpec  # noqa: E402
from edge_convnext.metrics import compare  # noqa: E402
from edge_convnext.preprocessing import preprocess_file  # noqa: E402
from edge_convnext.recipes import ArtifactFormat, RECIPES, get_recipe  # noqa: E402
from edge_convnext.runners import open_runner  # noqa: E402
from edge_convnext.runners import coreml as coreml_runner  # noqa: E402

pytestmark = pytest.mark.convert

COREML_RECIPES = [r.name for r in RECIPES if r.format is ArtifactFormat.COREML]
LOG_P = OUTPUT_CONTRACTS["probabilities"].log_scores
SPEC_VERSION = {"iOS15": 6, "iOS16": 7, "iOS17": 8, "iOS18": 9}
HAS_EMULATOR = importlib.util.find_spec("edge_convnext.coreml_emulator") is not None
needs_emulator = pytest.mark.skipif(
    sys.platform != "darwin" and not HAS_EMULATOR, reason="no Core ML runtime here: not macOS and no emulator")


@dataclasses.dataclass
class Built:
    path: Path
    result: BuildResult
    ctx: object
    calibration_ids: list[str]  # what the calibration stream recorded right after the build


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> tuple[Path, dict[str, Built]]:
    """Artifacts built by the tests so far, so each recipe is converted once per module."""
    return tmp_path_factory.mktemp("coreml"), {}


def unique_context(make_context, subset, recipe_name: str, **kw):
    """``make_context`` with the labels made unique, as the build does (ImageNet names "crane" twice)."""
    ctx = make_context(recipe_name, **kw)
    ctx.labels = unique_labels(ctx.labels, getattr(subset, "wnids", None))
    return ctx


# Fewer images and candidates keep the fast tier fast; the pipeline is the same. p4 keeps a 3-bit and
# grouped palettes (iOS18 storages) among its candidates, so the deployment-target rule is exercised.
FAST_OPTIONS = {"coreml-p4": {"storages": ("lut3", "lut4", "int8", "fp16"), "statistics_images": 8,
                              "held_out_images": 8},
                "coreml-w8a8": {"held_out_images": 8}}


def with_options(ctx, **options):
    ctx.recipe = dataclasses.replace(ctx.recipe, options={**ctx.recipe.options, **options})
    return ctx


@pytest.fixture
def build(builds, make_context, subset):
    outdir, cache = builds

    def get(recipe_name: str, tag: str = "", **options) -> Built:
        key = recipe_name + tag
        if key not in cache:
            # 12 calibration images keep W8A8 fast (the pipeline is the same at any count).
            ctx = unique_context(make_context, subset, recipe_name, calibration_count=12)
            with_options(ctx, **FAST_OPTIONS.get(recipe_name, {}), **options)
            out = outdir / tag / get_recipe(recipe_name).filename
            out.parent.mkdir(exist_ok=True)
            result = backend.build(ctx, out)
            cache[key] = Built(out, result, ctx, list(ctx.calibration_images.used_ids))
        return cache[key]

    return get


def read_back(path: Path):
    from coremltools.converters.mil.frontend.milproto.load import load

    m = ct.models.MLModel(str(path), skip_model_load=True)
    spec = m.get_spec()
    return spec, load(spec, specification_version=spec.specificationVersion, file_weights_dir=m.weights_dir)


def stored_const(prog, prefix: str):
    """The op a compute op reads the weight ``prefix*`` from (a const or a decompressing constexpr)."""
    return next(
        op for op in prog.functions["main"].operations
        if op.name.startswith(prefix) and op.outputs[0].child_ops
        and not any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops)
    )


def tiny_reference(ctx, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(images, the export model's probabilities on them)."""
    x = np.concatenate(list(ctx.calibration_images(n)))
    with torch.no_grad():
        return x, ctx.model(torch.from_numpy(x)).numpy()


def main_ops(prog):
    return [op for op in prog.functions["main"].operations if op.op_type != "const"]


def mil_dtype(var) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


# ---- the package every recipe writes ------------------------------------------------------------


@pytest.mark.parametrize("recipe", COREML_RECIPES)
def test_recipe_writes_a_vision_image_classifier(build, recipe):
    b = build(recipe)
    spec, prog = read_back(b.path)
    assert spec.WhichOneof("Type") == "mlProgram"
    (inp,) = spec.description.input
    assert inp.name == "image" and inp.type.WhichOneof("Type") == "imageType"
    img = inp.type.imageType
    assert (img.width, img.height) == (224, 224) and img.WhichOneof("SizeFlexibility") is None
    assert img.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Value("RGB")
    label, probs = spec.description.output
    assert (label.name, label.type.WhichOneof("Type")) == ("classLabel", "stringType")
    assert (probs.name, probs.type.WhichOneof("Type")) == ("probabilities", "dictionaryType")
    assert probs.type.dictionaryType.WhichOneof("KeyType") == "stringKeyType"
    assert spec.description.predictedFeatureName == "classLabel"
    assert spec.description.predictedProbabilitiesName == "probabilities"
    want = BuildResult.for_recipe(get_recipe(recipe), "image", "probabilities")
    assert (b.result.input, b.result.output) == (want.input, want.output)
    assert (b.result.input.contract, b.result.output.contract) == ("rgb-image", "classifier")

    ops = main_ops(prog)
    # ImageType scale=1/255: one float32 mul right after the input, no bias add.
    image = prog.functions["main"].inputs["image"]
    readers = [op for op in ops if any(v is image for v in op.inputs.values())]
    assert [op.op_type for op in readers] == ["mul"] and mil_dtype(image) == "fp32"
    scale = readers[0].inputs["y"].val
    assert np.isclose(float(scale), 1 / 255, rtol=1e-6) and mil_dtype(readers[0].outputs[0]) == "fp32"
    assert not any(c.op_type == "add" for c in readers[0].outputs[0].child_ops)
    # One softmax, in float32 even in fp16 programs, read directly by classify with the 1000 labels.
    (softmax,) = [op for op in ops if op.op_type == "softmax"]
    (classify,) = [op for op in ops if op.op_type == "classify"]
    assert ops[-1] is classify and classify.inputs["probabilities"].op is softmax
    assert mil_dtype(softmax.inputs["x"]) == mil_dtype(softmax.outputs[0]) == "fp32"
    if get_recipe(recipe).options["compute_precision"] == "fp16":
        assert softmax.inputs["x"].op.op_type == "cast"  # from the fp16 logits
    classes = [str(c) for c in getattr(classify.inputs["classes"].val, "ls", classify.inputs["classes"].val)]
    assert classes == b.ctx.labels and len(classes) == 1000 == len(set(classes))
    assert len([c for c in classes if c.startswith("crane (")]) == 2  # ImageNet's two cranes, told apart

    low = b.result.lowering
    assert low["softmax_dtype"] == "fp32" and "1/255" in low["image_preprocessing"]
    assert low["op_histogram"] == backend.op_histogram(prog)
    assert {"conv", "linear", "layer_norm", "gelu", "softmax", "classify"} <= set(low["op_histogram"])
    assert spec.specificationVersion == SPEC_VERSION[low["minimum_deployment_target"]] == low["specification_version"]
    assert low["compute_precision"] == get_recipe(recipe).options["compute_precision"]
    json.dumps(low)  # the manifest stores it as JSON


@pytest.mark.parametrize("recipe", COREML_RECIPES)
def test_metadata_descriptions_and_labels_are_embedded(build, recipe):
    b = build(recipe)
    spec, _ = read_back(b.path)
    meta = dict(spec.description.metadata.userDefined)
    assert json.loads(meta["edge_convnext.manifest"]) == b.ctx.embedded_manifest
    labels = meta["edge_convnext.labels"].split("\n")
    assert labels == b.ctx.labels and len(labels) == 1000 == len(set(labels))
    assert meta["edge_convnext.recipe"] == recipe
    assert meta["com.apple.coreml.model.preview.type"] == "imageClassifier"
    md = spec.description.metadata
    assert md.author == "edge-convnext" and md.versionString
    assert recipe in md.shortDescription and "SYNTHETIC" in md.shortDescription
    assert md.license.startswith("Apache-2.0") and "synthetic" in md.license
    inp = spec.description.input[0].shortDescription
    assert "RGB" in inp and ".centerCrop" in inp and "regionOfInterest" in inp and "do NOT normalize" in inp
    out = {f.name: f.shortDescription for f in spec.description.output}
    assert "class" in out["classLabel"] and "1000 unique labels" in out["probabilities"]
    assert "sums to 1" in out["probabilities"]
    assert set(b.result.embedded) >= {"manifest", "labels", "preview"}


def test_duplicate_labels_are_refused(make_context, tmp_path):
    ctx = make_context("coreml-fp32")
    labels = [f"class {i}" for i in range(1000)]
    labels[517] = labels[134] = "crane"
    ctx.labels = labels
    with pytest.raises(ValueError, match=r"unique labels.*'crane': \[134, 517\]"):
        backend.build(ctx, tmp_path / "dup.mlpackage")
    assert not (tmp_path / "dup.mlpackage").exists()
    with pytest.raises(ValueError, match="1000"):
        backend.check_labels(labels[:999])
    assert backend.check_labels(unique_labels(labels)) == unique_labels(labels)


def test_deployment_targets_are_the_oldest_each_recipe_allows(build):
    recipes = ("coreml-fp32", "coreml-fp16", "coreml-w8")
    targets = {r: build(r).result.lowering["minimum_deployment_target"] for r in recipes}
    assert targets == {"coreml-fp32": "iOS15", "coreml-fp16": "iOS15", "coreml-w8": "iOS16"}
    assert build("coreml-w8a8").result.lowering["minimum_deployment_target"] == "iOS17"
    p4 = build("coreml-p4").result.lowering
    chosen = {Storage.parse(v["storage"]).target for v in p4["weight_compression"]["per_layer"].values()}
    assert p4["minimum_deployment_target"] == ("iOS18" if "iOS18" in chosen else "iOS16")


# ---- weight compression -----------------------------------------------------------------------


def test_compressed_recipes_are_smaller_than_fp16(build):
    size = {r: package_bytes(build(r).path) for r in ("coreml-fp16", "coreml-w8", "coreml-p4")}
    assert size["coreml-w8"] < 0.65 * size["coreml-fp16"]
    assert size["coreml-p4"] < size["coreml-w8"]


def test_w8_stores_int8_weights_and_keeps_small_tensors_fp16(build):
    b = build("coreml-w8")
    _, prog = read_back(b.path)
    hist = b.result.lowering["op_histogram"]
    assert hist.get("constexpr_affine_dequantize", 0) == 19 and "constexpr_lut_to_dense" not in hist
    assert stored_const(prog, "stages_0_layers_0_pwconv1_weight").op_type == "constexpr_affine_dequantize"
    # The stem (the recipe's float layer: normalization folded in), biases, LayerNorm and layer
    # scales stay dense fp16.
    for name in ("embeddings_patch_embeddings_weight", "stages_0_layers_0_pwconv1_bias",
                 "stages_0_layers_0_layernorm_weight", "stages_0_layers_0_layer_scale_parameter"):
        op = stored_const(prog, name)
        assert op.op_type == "const" and op.outputs[0].val.dtype == np.float16, name
    wc = b.result.lowering["weight_compression"]
    assert wc["float_layers"] == ["embeddings.patch_embeddings"] == list(get_recipe("coreml-w8").options["float_layers"])
    assert set(wc["roles"]["stem"]) == {"fp16"} and set(wc["roles"]["pointwise"]) == {"int8"}


def _layer_names(model) -> list[str]:
    from converters.quant_plan import quantizable_layers

    return [n for n, _ in quantizable_layers(model)]


def test_p4_allocates_storage_by_measurement_within_the_budget(build):
    b = build("coreml-p4")
    low = b.result.lowering
    wc = low["weight_compression"]
    params = sum(m.weight.numel() for n, m in b.ctx.model.named_modules() if n in set(_layer_names(b.ctx.model)))
    # the estimate: weights within their budget, which is 4.5 bits per weight at this size ...
    assert wc["weight_bytes"] <= wc["budget_bytes"] <= wc["budget"]["bits_per_weight"] * params / 8
    # ... and the package within the byte cap
    assert low["package_bytes"] <= wc["budget"]["package_bytes"] == 16_000_000
    # every layer measured and stored as allocated; more than one kind of storage chosen
    per_layer = wc["per_layer"]
    assert list(per_layer) == _layer_names(b.ctx.model)
    _, prog = read_back(b.path)
    stored = cc.stored_kinds(prog)
    for name, v in per_layer.items():
        want = v["storage"].rstrip("g") if Storage.parse(v["storage"]).grouped and \
            Storage.parse(v["storage"]).groups(b.ctx.model.get_submodule(name).weight.shape[0]) == 1 else v["storage"]
        assert stored[cc.mil_weight_name(name)] == want, name
        assert v["storage"] in v["alone_end_to_end_sqnr_db"] and v["storage"] in wc["candidates"]
    assert len(wc["storages"]) >= 2
    assert set(wc["candidates"]) == {"lut3", "lut4", "int8", "fp16", "lut3g", "lut4g"}
    # the allocation was checked on the held-out images: errors of separate layers nearly add up
    assert abs(wc["predicted_sqnr_db"] - wc["measured_sqnr_db"]) < 3
    # the package's stored weights (and corrected biases) give what was measured on the torch side
    assert abs(wc["stored_weights_sqnr_db"] - wc["measured_sqnr_db"]) < 0.5
    assert wc["measured_sqnr_db"] > 10


def test_p4_image_ids_are_held_out_calibration_images(build, subset):
    wc = build("coreml-p4").result.lowering["weight_compression"]
    calibration = {s.image_id for s in subset.split("calibration")}
    evaluation = {s.image_id for s in subset.split("evaluation")}
    stats, held = set(wc["statistics_image_ids"]), set(wc["held_out_image_ids"])
    assert len(stats) == 8 and len(held) == 8 == wc["held_out_images"]
    assert stats | held <= calibration and not (stats | held) & evaluation and not stats & held


def test_allocation_is_the_best_within_the_budget():
    """The knapsack against brute force on random small instances; the budget is never exceeded."""
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(20):
        layers = [f"l{i}" for i in range(5)]
        opts = ["a", "b", "c"]
        nbytes = {n: dict(zip(opts, sorted(rng.integers(100, 5000, 3).tolist()))) for n in layers}
        noise = {n: dict(zip(opts, sorted(rng.random(3).tolist(), reverse=True))) for n in layers}
        budget = int(rng.integers(sum(v["a"] for v in nbytes.values()), sum(v["c"] for v in nbytes.values())))
        got = cb.allocate(noise, nbytes, budget)
        assert got.weight_bytes == sum(nbytes[n][o] for n, o in got.choice.items()) <= budget
        best = min(sum(noise[n][o] for n, o in zip(layers, c)) for c in itertools.product(opts, repeat=5)
                   if sum(nbytes[n][o] for n, o in zip(layers, c)) <= budget)
        # optimal up to the byte resolution (budget / 16384 per layer)
        assert got.predicted_noise <= best + 1e-9 or budget < 16384
    with pytest.raises(ValueError, match="over the budget"):
        cb.allocate({"l": {"a": 1.0}}, {"l": {"a": 100}}, 99)


def test_p4_stores_the_rounded_weights_exactly(make_context, subset, tmp_path):
    """Every storage kind, as coreml_bits rounds it, is what the package stores (read back)."""
    from converters.weight_quant import collect_stats
    from converters.quant_plan import quantizable_layers

    ctx = unique_context(make_context, subset, "coreml-p4")
    layers = quantizable_layers(ctx.model)
    stats = collect_stats(ctx.model, layers, ctx.calibration_images(4))
    kinds = ["lut2", "lut3", "lut4g", "lut6", "int8", "fp16", "lut4", "lut8"]
    storage = {n: Storage.parse(kinds[i % len(kinds)]) for i, (n, _) in enumerate(layers)}
    rounded = {n: cb.round_layer(m, *stats[n].finish(), storage[n]) for n, m in layers}
    model = cb.apply_rounded(ctx.model, rounded)
    mlmodel = backend._convert(model, ctx.example_input, "fp16", "iOS18", ctx.labels)
    weights = cc.weight_roles(mlmodel, [n for n, _ in layers])
    by_const = {w.name: storage[w.layer] for w in weights}
    path = tmp_path / "exact.mlpackage"
    cc.compress_weights(mlmodel, weights, by_const).save(str(path))
    _, prog = read_back(path)
    cc.check_storage(path, prog, weights, by_const)
    stored = cc.stored_weights(prog)
    for n, m in layers:
        got = stored[cc.mil_weight_name(n)].reshape(m.weight.shape)
        want = dict(model.named_modules())[n].weight.detach().numpy().astype(np.float16).astype(np.float32)
        if storage[n].kind == "int8":  # int8 steps times an fp16 scale
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-7, err_msg=n)
        else:  # palettes hold the torch side's fp16 values themselves
            np.testing.assert_array_equal(got, want, err_msg=n)
        if storage[n].kind == "lut":
            assert len(np.unique(got)) <= storage[n].groups(m.weight.shape[0]) * 2 ** storage[n].nbits


def test_a_palette_that_does_not_fit_is_refused():
    fn = cc.exact_palette(2, "w")
    lut, idx = fn(np.array([[0.5, -0.5], [0.25, 0.5]], dtype=np.float16))
    assert lut.tolist() == [-0.5, 0.25, 0.5, 0.5] and idx.tolist() == [2, 0, 1, 2]
    with pytest.raises(ValueError, match="5 distinct values do not fit a 2-bit palette"):
        fn(np.arange(5, dtype=np.float16))


def test_w8a8_is_calibrated_on_real_images(build):
    b = build("coreml-w8a8")
    assert b.result.calibration_used == b.ctx.calibration_count == 12
    # The manifest lists the stream's last pass as the calibration set: it must be the calibration.
    assert len(b.calibration_ids) == 12
    hist = b.result.lowering["op_histogram"]
    assert hist["quantize"] >= 20 and hist["dequantize"] >= 20  # around every conv/linear
    # int8 weights: at least the tiny model's 10 pointwise linears (the recipe keeps the stem, the
    # depthwise and downsampling convs and the classifier float)
    assert hist["constexpr_affine_dequantize"] >= 10
    aq = b.result.lowering["activation_quantization"]
    assert aq["calibration_images"] == 12 and aq["torch_side_fidelity"]["sqnr_db"] > 10
    # the observer was chosen on held-out calibration images, not on the ones that set the ranges
    obs = aq["observer"]
    assert set(obs["candidates"]) == set(cc.W8A8_OBSERVERS) and obs["chosen"] in obs["candidates"]
    assert obs["candidates"][obs["chosen"]]["sqnr_db"] == max(c["sqnr_db"] for c in obs["candidates"].values())
    assert len(aq["held_out_image_ids"]) == 8 and not set(aq["held_out_image_ids"]) & set(b.calibration_ids)


def test_w8a8_float_layers_stay_float_in_the_program(build):
    floats = ("embeddings.patch_embeddings", "stages.2.layers.1.pwconv1")
    b = build("coreml-w8a8", tag="float", float_layers=floats)
    _, prog = read_back(b.path)
    stored = cc.stored_kinds(prog)
    ops = {op.inputs["weight"].op.name: op for op in main_ops(prog) if op.op_type in ("conv", "linear")}
    for name in _layer_names(b.ctx.model):
        kind = stored[cc.mil_weight_name(name)]
        assert kind == ("fp16" if name in floats else "int8"), name
    for name in floats:  # float weights, and an input that no dequantize op feeds
        (op,) = [o for k, o in ops.items() if cc._COMPRESSED_SUFFIX.sub("", k) == cc.mil_weight_name(name)]
        assert op.inputs["x"].op.op_type != "dequantize", name
    aq = b.result.lowering["activation_quantization"]
    assert aq["float_layers"] == list(floats)
    assert np.isfinite(aq["float_layers_effect"]["gain_db"])


def test_w8a8_quantizes_a_centred_input_once_on_the_chosen_ranges(tiny_weights, tiny_calibration):
    """A `Shift` is quantized after it, not before (no quantizer reads GELU's output); the chosen ranges
    set the layers' quantizers and the ones re-quantizing their outputs after a permute or DropPath."""
    import torch

    from converters.act_quant import Point, observe, static_points
    from converters.centering import center_inputs
    from converters.model import export_model

    from converters import rewrites

    # As the recipe: the layer scale folded, so pwconv2's output reaches the add through a permute and DropPath only
    model = rewrites.apply(export_model(tiny_weights.model, tiny_weights.preprocessing).eval(), ["fold_layer_scale"])[0]
    images = list(tiny_calibration(4))
    pw2 = [n for n, _ in model.named_modules() if n.endswith("pwconv2")]
    centred = center_inputs(model, {n: 1.0 for n in pw2})
    obs = observe(centred, static_points(pw2), images)
    ranges = {p: (o.lo * 0.5, o.hi * 0.5) for p, o in obs.items()}  # not what an observer would compute
    q = cc.quantize_w8a8(centred, torch.from_numpy(images[0]), images, scope="no_residual_add", ranges=ranges)
    quantized = {str(n.args[0]): n for n in q.model.graph.nodes
                 if n.op == "call_function" and "quantize_per_tensor" in str(n.target)}
    assert quantized and not [k for k in quantized if k.startswith("gelu")]

    def scale(node) -> float:
        return float(getattr(q.model, str(node.args[1].target)))

    subs = [n for n in q.model.graph.nodes if n.op == "call_function" and str(n.name).startswith("sub")]
    assert len(subs) == len(pw2)
    for sub, name in zip(subs, pw2):
        lo, hi = ranges[Point(name, "input")]
        assert scale(quantized[sub.name]) == pytest.approx(max(abs(lo), abs(hi)) / 127.5, rel=1e-5)
    for name in pw2:
        lo, hi = ranges[Point(name, "output")]
        layer = name.replace(".", "_")
        # its own quantizer, then the permute back to NCHW's and the DropPath's: one grid, no second rounding
        chain = [layer, *[str(u) for u in q.model.graph.nodes if str(u) in quantized and str(u).startswith("permute")
                          and str(u.args[0]).startswith("dequantize") and _reads(u, quantized[layer])],
                 f"{layer[: -len('pwconv2')]}drop_path"]
        assert len(chain) == 3 and all(k in quantized for k in chain), chain
        for k in chain:
            assert scale(quantized[k]) == pytest.approx(max(abs(lo), abs(hi)) / 127.5, rel=1e-5), k


def test_w8a8_quantizes_a_centred_output_before_its_shift_back(tiny_weights, tiny_calibration):
    """A centred ``pwconv1`` output (`center_outputs`: the floored pre-GELU range) is quantized once, by the
    layer's own quantizer on its centred range; GELU reads it shifted back in float, with no quantizer between."""
    import torch

    from converters import rewrites
    from converters.act_quant import Point, observe, static_points
    from converters.centering import center_inputs, center_outputs
    from converters.model import export_model

    model = rewrites.apply(export_model(tiny_weights.model, tiny_weights.preprocessing).eval(), ["fold_layer_scale"])[0]
    images = list(tiny_calibration(4))
    pw1 = [n for n, _ in model.named_modules() if n.endswith("pwconv1")]
    pw2 = [n.replace("pwconv1", "pwconv2") for n in pw1]
    # A negative centre: the restore is still an add, and the rounding before it stays.
    centred = center_outputs(center_inputs(model, {n: 1.0 for n in pw2}), {n: -0.75 for n in pw1})
    obs = observe(centred, static_points(pw1), images)
    ranges = {p: (o.lo * 0.5, o.hi * 0.5) for p, o in obs.items()}
    q = cc.quantize_w8a8(centred, torch.from_numpy(images[0]), images, scope="all", ranges=ranges)
    nodes = list(q.model.graph.nodes)
    gelus = [n for n in nodes if n.op == "call_function" and str(n.name).startswith("gelu")]
    assert len(gelus) == len(pw1)
    for gelu, name in zip(gelus, pw1):
        add = gelu.args[0]  # GELU reads the shift back ...
        assert add.op == "call_function" and str(add.name).startswith("add") and add.args[1] == -0.75, add
        deq = add.args[0]  # ... of the dequantized output of the layer's own quantizer
        assert str(deq.name).startswith("dequantize"), deq
        quant = deq.args[0]
        assert "quantize_per_tensor" in str(quant.target) and quant.args[0].target == name
        lo, hi = ranges[Point(name, "output")]
        assert float(getattr(q.model, str(quant.args[1].target))) == pytest.approx(max(abs(lo), abs(hi)) / 127.5, rel=1e-5)


def test_w8a8_float_layers_read_and_write_float_activations(tiny_weights, tiny_calibration):
    """A float layer gets no quantizer of its own, and the ones the tool puts around it for GELU, the permute
    and DropPath go too: with the first block's layers float, nothing in it is rounded to 8 bits."""
    import torch

    from converters import rewrites
    from converters.model import export_model

    model = rewrites.apply(export_model(tiny_weights.model, tiny_weights.preprocessing).eval(), ["fold_layer_scale"])[0]
    images = list(tiny_calibration(2))
    blocks = [n.rsplit(".", 1)[0] for n, _ in model.named_modules() if n.endswith(".dwconv")]
    first, second = blocks[0], blocks[1]
    floats = tuple(f"{first}.{leaf}" for leaf in ("dwconv", "pwconv1", "pwconv2"))
    q = cc.quantize_w8a8(model, torch.from_numpy(images[0]), images, floats, scope="no_residual_add")
    names = [str(n) for n in q.model.graph.nodes]
    quantized = [str(n.args[0]) for n in q.model.graph.nodes
                 if n.op == "call_function" and "quantize_per_tensor" in str(n.target)]

    def in_block(prefix: str) -> list[str]:
        p = prefix.replace(".", "_")
        inside = set(names[names.index(f"{p}_dwconv"): names.index(f"{p}_drop_path") + 1])
        return [k for k in quantized if k in inside]

    assert in_block(first) == [] and len(in_block(second)) >= 4  # pwconv1 in and out, pwconv2 in and out


def _reads(node, quantize) -> bool:
    """Whether fx ``node`` reads the dequantized value of ``quantize`` (through one dequantize)."""
    deq = node.args[0]
    return any(a is quantize for a in deq.args)


def _ids(node) -> set[str]:
    """Every string under a manifest key ending in ``image_ids``."""
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out |= set(v) if k.endswith("image_ids") and isinstance(v, list) else _ids(v)
    elif isinstance(node, list):
        for v in node:
            out |= _ids(v)
    return out


def test_manifests_record_only_calibration_images(tmp_path, subset):
    """Through ``convert``: every image id a Core ML manifest records for a choice or a statistic is a
    calibration image, never an evaluation one; W8A8's held-out images did not set its ranges."""
    from conftest import convert_tiny

    convert_tiny(tmp_path, "coreml-w8,coreml-w8a8", reference_images=8, parity_images=2, calibration_images=8)
    calibration = {s.image_id for s in subset.split("calibration")}
    evaluation = {s.image_id for s in subset.split("evaluation")}
    for recipe in ("coreml-w8", "coreml-w8a8"):
        m = json.loads((tmp_path / f"{recipe}.json").read_text())
        recorded = _ids(m["lowering"]) | set((m.get("calibration") or {}).get("image_ids", []))
        assert recorded and recorded <= calibration and not recorded & evaluation, recipe
    aq = json.loads((tmp_path / "coreml-w8a8.json").read_text())
    held = set(aq["lowering"]["activation_quantization"]["held_out_image_ids"])
    assert held and not held & set(aq["calibration"]["image_ids"])
    assert not held & set(aq["lowering"]["weight_rounding"]["image_ids"])
    # Symmetric activations: every quantized pwconv2 input centred, by a sub the program runs in front of it
    centred = aq["lowering"]["activation_ranges"]["centered_inputs"]
    assert centred["symmetric"] and centred["centers"] and all(k.endswith(".pwconv2") for k in centred["centers"])
    assert aq["lowering"]["op_histogram"].get("sub", 0) >= len(centred["centers"])
    assert aq["lowering"]["activation_quantization"]["ranges"].startswith("the conv/linear inputs' and outputs' ranges")


# ---- the runner -------------------------------------------------------------------------------


@needs_emulator
@pytest.mark.parametrize(("recipe", "min_sqnr"), [("coreml-fp32", 80.0), ("coreml-fp16", 35.0), ("coreml-w8a8", 12.0)])
def test_runner_follows_the_float_model(build, recipe, min_sqnr):
    b = build(recipe)
    runner = open_runner(b.path)
    expected = ("coreml", False) if sys.platform == "darwin" else ("coreml-emulated", True)
    assert (runner.name, runner.emulated) == expected
    x, probs = tiny_reference(b.ctx)
    got = runner.run(x)  # log p in class order
    assert got.shape == (4, 1000) and got.dtype == np.float32
    np.testing.assert_allclose(np.exp(got.astype(np.float64)).sum(axis=1), 1.0, atol=1e-4)
    fid = compare(LOG_P(probs), got)
    assert fid.sqnr_db > min_sqnr
    if recipe == "coreml-fp32":
        assert fid.max_abs <= get_recipe(recipe).parity_max_abs


@pytest.mark.skipif(not HAS_EMULATOR, reason="the Core ML emulator package is not installed")
@pytest.mark.parametrize("recipe", COREML_RECIPES)
def test_emulated_probabilities_sum_to_one_in_class_order(build, recipe):
    from edge_convnext.coreml_emulator import CoreMLEmulator

    b = build(recipe)
    emu = CoreMLEmulator(b.path)
    assert emu.class_labels == b.ctx.labels
    x, probs = tiny_reference(b.ctx, n=2)
    pixels = INPUT_CONTRACTS["rgb-image"].feed(x)
    for i in range(len(x)):
        out = emu.predict({"image": pixels[i : i + 1]})
        p = out["probabilities"]
        assert p.shape == (1000,) and p.dtype == np.float32 and (p >= 0).all()
        assert abs(float(p.astype(np.float64).sum()) - 1.0) < 1e-5  # one softmax, not two
        assert str(out["classLabel"]) == b.ctx.labels[int(np.argmax(p))]
        if recipe == "coreml-fp32":
            np.testing.assert_allclose(p, probs[i], atol=1e-6, rtol=1e-3)


@pytest.mark.skipif(not HAS_EMULATOR, reason="the Core ML emulator package is not installed")
def test_emulated_classification_of_a_photo(build, samples_dir, tiny_weights):
    from edge_convnext.coreml_emulator import CoreMLEmulator

    b = build("coreml-fp32")
    photo = samples_dir / "n02123045_tabby.JPEG"
    x = preprocess_file(photo, tiny_weights.preprocessing)[None]
    with torch.no_grad():
        probs = b.ctx.model(torch.from_numpy(x)).numpy()[0]
    out = CoreMLEmulator(b.path).predict({"image": INPUT_CONTRACTS["rgb-image"].feed(x)})
    assert str(out["classLabel"]) == b.ctx.labels[int(np.argmax(probs))]
    assert int(np.argmax(out["probabilities"])) == int(np.argmax(probs))


def test_runner_refuses_missing_and_corrupted_packages(build, tmp_path):
    missing = tmp_path / "nothing.mlpackage"
    with pytest.raises(ArtifactError, match="nothing.mlpackage"):
        coreml_runner.open(missing)
    not_a_package = tmp_path / "file.mlpackage"
    not_a_package.write_bytes(b"not a package")
    with pytest.raises(ArtifactError, match="file.mlpackage"):
        coreml_runner.open(not_a_package)
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(build("coreml-fp16").path, broken)
    model_file = next(broken.rglob("model.mlmodel"))
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="broken.mlpackage"):
        coreml_runner.open(broken)


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of package ``src`` whose spec ``edit(spec)`` changed (program and weights kept)."""
    m = ct.models.MLModel(str(src), skip_model_load=True)
    spec = m.get_spec()
    edit(spec)
    ct.models.MLModel(spec, weights_dir=m.weights_dir, skip_model_load=True).save(str(dst))
    return dst


def _to_multiarray(spec) -> None:
    f = spec.description.input[0]
    f.type.ClearField("imageType")
    f.type.multiArrayType.shape.extend([1, 3, 224, 224])
    f.type.multiArrayType.dataType = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32


def _to_bgr(spec) -> None:
    spec.description.input[0].type.imageType.colorSpace = ct.proto.FeatureTypes_pb2.ImageFeatureType.BGR


def _to_256(spec) -> None:
    img = spec.description.input[0].type.imageType
    img.width = img.height = 256


def _not_a_classifier(spec) -> None:
    spec.description.predictedFeatureName = ""


@pytest.mark.skipif(sys.platform != "darwin" and not HAS_EMULATOR, reason="no Core ML runtime here")
@pytest.mark.parametrize(("edit", "actual"), [
    (_to_multiarray, r"multiArray FLOAT32 \[1, 3, 224, 224\]"),
    (_to_bgr, "image BGR 224x224"),
    (_to_256, "image RGB 256x256"),
    (_not_a_classifier, r"predictedFeatureName ''"),
])
def test_runner_refuses_a_package_off_the_classifier_contract(build, tmp_path, edit, actual):
    path = _edited_copy(build("coreml-fp16").path, tmp_path / "off.mlpackage", edit)
    expected = "RGB 224x224 image feature" if edit is not _not_a_classifier else "expected a classifier"
    with pytest.raises(ArtifactError, match=rf"off\.mlpackage.*{actual}.*") as info:
        coreml_runner.open(path)
    assert expected in str(info.value)


def _manifest(path: Path, input_spec: TensorSpec, output_spec: TensorSpec) -> Manifest:
    return Manifest(
        recipe="coreml-fp16", format="coreml", precision="fp16", file=path.name,
        input=input_spec, output=output_spec, preprocessing={}, weights={}, labels={}, toolchain={}, created="",
    )


def test_runner_checks_the_manifest_contract(build):
    if sys.platform != "darwin" and not HAS_EMULATOR:
        pytest.skip("no Core ML runtime here: not macOS and no emulator")
    b = build("coreml-fp16")
    image, classifier = INPUT_CONTRACTS["rgb-image"].spec("image"), OUTPUT_CONTRACTS["classifier"].spec("probabilities")
    assert coreml_runner.open(b.path, _manifest(b.path, image, classifier)).io.input_name == "image"
    old = _manifest(b.path, INPUT_CONTRACTS["rgb-nchw-unit"].spec("image"), OUTPUT_CONTRACTS["logits"].spec("logits"))
    with pytest.raises(ArtifactError, match=r"'rgb-nchw-unit' -> 'logits'.*'rgb-image' -> 'classifier'"):
        coreml_runner.open(b.path, old)
    bigger = dataclasses.replace(image, shape=(1, 3, 256, 256))
    with pytest.raises(ArtifactError, match=r"\[1, 3, 256, 256\].*\[1, 3, 224, 224\]"):
        coreml_runner.open(b.path, _manifest(b.path, bigger, classifier))
    renamed = dataclasses.replace(classifier, name="scores")
    with pytest.raises(ArtifactError, match=r"'image' -> 'probabilities'.*'image' -> 'scores'"):
        coreml_runner.open(b.path, _manifest(b.path, image, renamed))


def test_runner_without_coremltools_names_the_extra(build, monkeypatch):
    path = build("coreml-fp16").path
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "coremltools" else real(name, *a))
    with pytest.raises(MissingExtra, match=r"coreml-runtime"):
        coreml_runner.open(path)


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML's own runtime (MLModel.predict) exists only on macOS")
@pytest.mark.skipif(not HAS_EMULATOR, reason="the Core ML emulator package is not installed")
@pytest.mark.parametrize(("recipe", "min_sqnr"), [("coreml-fp32", 80.0), ("coreml-fp16", 35.0),
                                              ("coreml-p4", 30.0), ("coreml-w8a8", 25.0)])
def test_emulator_matches_core_ml_on_macos(build, recipe, min_sqnr):
    # Same program, same weights: only the arithmetic differs (and, for W8A8, rounding flips at
    # the int8 boundaries that it causes), so the two must agree far more closely than either
    # agrees with the float model.
    b = build(recipe)
    x, _ = tiny_reference(b.ctx)
    real = coreml_runner.open(b.path, emulate=False, compute_units="CPU_ONLY").run(x)
    emulated = coreml_runner.open(b.path, emulate=True).run(x)
    fid = compare(real, emulated)
    assert fid.top1_agreement >= 0.75
    assert fid.sqnr_db > min_sqnr


# ---- full size (ConvNeXt-T, synthetic weights) --------------------------------------------------


def _full_context(make_context, subset, recipe: str, **options):
    from converters.weights import load_weights

    ctx = unique_context(make_context, subset, recipe, weights=load_weights("random:0"), calibration_count=32)
    if options:
        ctx.recipe = dataclasses.replace(ctx.recipe, options={**ctx.recipe.options, **options})
    return ctx


@pytest.mark.full
def test_full_size_fp16_builds_55_mb_and_runs(make_context, subset, tmp_path):
    ctx = _full_context(make_context, subset, "coreml-fp16")
    out = tmp_path / "coreml-fp16.mlpackage"
    result = backend.build(ctx, out)
    size = package_bytes(out)
    assert 54e6 < size < 60e6  # 28.6 M fp16 parameters + program
    assert result.lowering["op_histogram"]["layer_norm"] == 23
    if sys.platform != "darwin" and not HAS_EMULATOR:
        pytest.skip("built and checked; no Core ML runtime here to run it")
    x, probs = tiny_reference(ctx, n=2)
    fid = compare(LOG_P(probs), open_runner(out).run(x))
    assert fid.top1_agreement == 1.0 and fid.sqnr_db > 30


@pytest.mark.full
def test_full_size_p4_fits_16_mb(make_context, subset, tmp_path):
    # Per-tensor only: the grouped candidate adds minutes of k-means and the same size within 0.1 MB.
    # Few images: the budget is what this checks, not the choice (measured with the recipe's 16 + 32:
    # README); with the recipe's images this test took 9 minutes beside another job, with these 2.
    ctx = _full_context(make_context, subset, "coreml-p4", lut_granularity="per_tensor",
                        statistics_images=4, held_out_images=8)
    out = tmp_path / "coreml-p4.mlpackage"
    result = backend.build(ctx, out)
    assert package_bytes(out) <= 16_000_000
    assert not result.notes
