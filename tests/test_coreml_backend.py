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
from converters.backends.coreml_compress import package_bytes  # noqa: E402
from converters.context import BuildResult  # noqa: E402
from edge_convnext.errors import ArtifactError, MissingExtra  # noqa: E402
from edge_convnext.manifest import Manifest, TensorSpec, standard_input, standard_output  # noqa: E402
from edge_convnext.metrics import compare  # noqa: E402
from edge_convnext.recipes import ArtifactFormat, RECIPES, get_recipe  # noqa: E402
from edge_convnext.runners import open_runner  # noqa: E402
from edge_convnext.runners import coreml as coreml_runner  # noqa: E402

pytestmark = pytest.mark.convert

COREML_RECIPES = [r.name for r in RECIPES if r.format is ArtifactFormat.COREML]
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


@pytest.fixture
def build(builds, make_context):
    outdir, cache = builds

    def get(recipe_name: str) -> Built:
        if recipe_name not in cache:
            # 12 calibration images keep W8A8 fast (the pipeline is the same at any count) and differ
            # from the 8 images the build-time checks read.
            ctx = make_context(recipe_name, calibration_count=12)
            out = outdir / get_recipe(recipe_name).filename
            result = backend.build(ctx, out)
            cache[recipe_name] = Built(out, result, ctx, list(ctx.calibration_images.used_ids))
        return cache[recipe_name]

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
    x = np.concatenate(list(ctx.calibration_images(n)))
    with torch.no_grad():
        return x, ctx.model(torch.from_numpy(x)).numpy()


# ---- the package every recipe writes ------------------------------------------------------------


@pytest.mark.parametrize("recipe", COREML_RECIPES)
def test_recipe_writes_a_contract_package(build, recipe):
    b = build(recipe)
    spec, prog = read_back(b.path)
    assert spec.WhichOneof("Type") == "mlProgram"
    (inp,), (out,) = spec.description.input, spec.description.output
    assert (inp.name, list(inp.type.multiArrayType.shape)) == ("image", [1, 3, 224, 224])
    assert (out.name, list(out.type.multiArrayType.shape)) == ("logits", [1, 1000])
    float32 = ct.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT32
    assert inp.type.multiArrayType.dataType == float32 and out.type.multiArrayType.dataType == float32
    assert b.result.input == standard_input() and b.result.output == standard_output()

    low = b.result.lowering
    assert low["op_histogram"] == backend.op_histogram(prog)
    assert {"conv", "linear", "layer_norm", "gelu"} <= set(low["op_histogram"])
    assert spec.specificationVersion == SPEC_VERSION[low["minimum_deployment_target"]] == low["specification_version"]
    assert low["compute_precision"] == get_recipe(recipe).options["compute_precision"]
    json.dumps(low)  # the manifest stores it as JSON


@pytest.mark.parametrize("recipe", ["coreml-fp16", "coreml-w8a8"])
def test_metadata_and_labels_are_embedded(build, recipe):
    b = build(recipe)
    spec, _ = read_back(b.path)
    meta = dict(spec.description.metadata.userDefined)
    assert json.loads(meta["edge_convnext.manifest"]) == b.ctx.embedded_manifest
    labels = meta["edge_convnext.labels"].split("\n")
    assert labels == b.ctx.labels and len(labels) == 1000
    assert meta["edge_convnext.recipe"] == recipe
    md = spec.description.metadata
    assert md.author and md.versionString and recipe in md.shortDescription and "SYNTHETIC" in md.shortDescription
    assert "[0, 1]" in spec.description.input[0].shortDescription
    assert "logits" in spec.description.output[0].shortDescription
    assert set(b.result.embedded) >= {"manifest", "labels"}


def test_deployment_targets_are_the_oldest_each_recipe_allows(build):
    recipes = ("coreml-fp32", "coreml-fp16", "coreml-w8")
    targets = {r: build(r).result.lowering["minimum_deployment_target"] for r in recipes}
    assert targets == {"coreml-fp32": "iOS15", "coreml-fp16": "iOS15", "coreml-w8": "iOS16"}
    assert build("coreml-w8a8").result.lowering["minimum_deployment_target"] == "iOS17"
    p4 = build("coreml-p4").result.lowering
    chosen = p4["weight_compression"]["lut_granularity"]["chosen"]
    assert p4["minimum_deployment_target"] == {"per_tensor": "iOS16", "per_grouped_channel": "iOS18"}[chosen]


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
    # The stem (normalization folded in), biases, LayerNorm and layer scales stay dense fp16.
    for name in ("embeddings_patch_embeddings_weight", "stages_0_layers_0_pwconv1_bias",
                 "stages_0_layers_0_layernorm_weight", "stages_0_layers_0_layer_scale_parameter"):
        op = stored_const(prog, name)
        assert op.op_type == "const" and op.outputs[0].val.dtype == np.float16, name
    roles = b.result.lowering["weight_compression"]["roles"]
    assert roles["stem"]["storage"].startswith("fp16") and roles["pointwise"]["storage"].startswith("int8")


def test_p4_palettizes_pointwise_weights_and_records_the_lut_choice(build):
    b = build("coreml-p4")
    _, prog = read_back(b.path)
    assert b.result.lowering["op_histogram"].get("constexpr_lut_to_dense") == 10  # the pointwise linears
    assert stored_const(prog, "stages_2_layers_1_pwconv2_weight").op_type == "constexpr_lut_to_dense"
    assert stored_const(prog, "classifier_weight").op_type == "constexpr_affine_dequantize"
    assert stored_const(prog, "embeddings_patch_embeddings_weight").op_type == "const"
    choice = b.result.lowering["weight_compression"]["lut_granularity"]
    assert choice["mode"] == "auto" and choice["chosen"] in ("per_tensor", "per_grouped_channel")
    for candidate in ("per_tensor", "per_grouped_channel"):
        assert np.isfinite(choice[candidate]["sqnr_db"]) and choice[candidate]["bytes"] > 0


def test_w8a8_is_calibrated_on_real_images(build):
    b = build("coreml-w8a8")
    assert b.result.calibration_used == b.ctx.calibration_count == 12
    # The manifest lists the stream's last pass as the calibration set: it must be the calibration.
    assert len(b.calibration_ids) == 12
    hist = b.result.lowering["op_histogram"]
    assert hist["quantize"] >= 20 and hist["dequantize"] >= 20  # around every conv/linear
    assert hist["constexpr_affine_dequantize"] >= 20  # int8 weights
    aq = b.result.lowering["activation_quantization"]
    assert aq["calibration_images"] == 12 and aq["torch_side_fidelity"]["sqnr_db"] > 10


# ---- the runner -------------------------------------------------------------------------------


@needs_emulator
@pytest.mark.parametrize(("recipe", "min_sqnr"), [("coreml-fp32", 80.0), ("coreml-fp16", 35.0), ("coreml-w8a8", 12.0)])
def test_runner_follows_the_float_model(build, recipe, min_sqnr):
    b = build(recipe)
    runner = open_runner(b.path)
    expected = ("coreml", False) if sys.platform == "darwin" else ("coreml-emulated", True)
    assert (runner.name, runner.emulated) == expected
    x, ref = tiny_reference(b.ctx)
    got = runner.run(x)
    assert got.shape == (4, 1000) and got.dtype == np.float32
    fid = compare(ref, got)
    assert fid.sqnr_db > min_sqnr
    if recipe == "coreml-fp32":
        assert fid.max_abs <= get_recipe(recipe).parity_max_abs


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


def test_runner_checks_the_input_contract(build):
    b = build("coreml-fp16")
    manifest = Manifest(
        recipe="coreml-fp16", format="coreml", precision="fp16", file=b.path.name,
        input=TensorSpec("image", (1, 3, 256, 256), "float32", "NCHW"), output=standard_output(),
        preprocessing={}, weights={}, labels={}, toolchain={}, created="",
    )
    if sys.platform != "darwin" and not HAS_EMULATOR:
        pytest.skip("no Core ML runtime here: not macOS and no emulator")
    with pytest.raises(ArtifactError, match=r"\(1, 3, 224, 224\).*\(1, 3, 256, 256\)"):
        coreml_runner.open(b.path, manifest)


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


def _full_context(make_context, recipe: str, **options):
    from converters.weights import load_weights

    ctx = make_context(recipe, weights=load_weights("random:0"), calibration_count=32)
    if options:
        ctx.recipe = dataclasses.replace(ctx.recipe, options={**ctx.recipe.options, **options})
    return ctx


@pytest.mark.full
def test_full_size_fp16_builds_55_mb_and_runs(make_context, tmp_path):
    ctx = _full_context(make_context, "coreml-fp16")
    out = tmp_path / "coreml-fp16.mlpackage"
    result = backend.build(ctx, out)
    size = package_bytes(out)
    assert 54e6 < size < 60e6  # 28.6 M fp16 parameters + program
    assert result.lowering["op_histogram"]["layer_norm"] == 23
    if sys.platform != "darwin" and not HAS_EMULATOR:
        pytest.skip("built and checked; no Core ML runtime here to run it")
    x, ref = tiny_reference(ctx, n=2)
    fid = compare(ref, open_runner(out).run(x))
    assert fid.top1_agreement == 1.0 and fid.sqnr_db > 30


@pytest.mark.full
def test_full_size_p4_fits_16_mb(make_context, tmp_path):
    # Per-tensor only: the grouped candidate adds minutes of k-means and the same size within 0.1 MB.
    ctx = _full_context(make_context, "coreml-p4", lut_granularity="per_tensor")
    out = tmp_path / "coreml-p4.mlpackage"
    result = backend.build(ctx, out)
    assert package_bytes(out) <= 16_000_000
    assert not result.notes
