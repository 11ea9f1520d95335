"""ExecuTorch backend and runner: every recipe builds from the tiny ConvNeXt, the lowering is what the
report says, the numbers match torch, and bad files fail with errors that name them.

Each recipe is built once per module (``built``); the tests read those artifacts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

from converters.backends import executorch as et_backend  # noqa: E402
from converters.backends.executorch_rewrite import rewrite_for_xnnpack  # noqa: E402
from converters.context import BuildContext, BuildResult  # noqa: E402
from converters.model import export_model  # noqa: E402
from edge_convnext.errors import ArtifactError, RuntimeUnavailable  # noqa: E402
from edge_convnext.contract import INPUT_CONTRACTS, OUTPUT_CONTRACTS  # noqa: E402
from edge_convnext.manifest import TensorSpec  # noqa: E402
from edge_convnext.metrics import center  # noqa: E402
from edge_convnext.metrics import compare  # noqa: E402
from edge_convnext.preprocessing import preprocess_file  # noqa: E402
from edge_convnext.recipes import get_recipe  # noqa: E402
from edge_convnext.runners import executorch as et_runner  # noqa: E402
from edge_convnext.runners import open_runner  # noqa: E402

pytestmark = pytest.mark.convert

RECIPES = ("executorch-xnnpack-fp32", "executorch-xnnpack-int8", "executorch-portable-fp32", "executorch-coreml-fp16")
FP32_TOL = 1e-4  # max abs logit error of an fp32 .pte against the torch export model (tiny logits std ~7)
INT8_SQNR_FLOOR_DB = 17.0  # measured 22.6 dB on these 8 images with 8 calibration images (23.2 with 16)
# What XNNPACK cannot take without the rewrite: ConvNeXt-test has 10 LayerNorms (5 blocks, stem,
# 3 downsampling layers, head) and one global mean with keepdim=False.
FLOAT_ISLANDS = {"aten.native_layer_norm.default": 10, "aten.mean.dim": 1}
CALIBRATION = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory, subset, tiny_weights, tiny_calibration):
    """``built(recipe, **options)`` -> (ctx, result, path): each variant built once per module."""
    cache: dict[tuple, tuple[BuildContext, BuildResult, object]] = {}
    model = export_model(tiny_weights.model, tiny_weights.preprocessing)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def get(name: str, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            recipe = get_recipe(name)
            if options:
                recipe = dataclasses.replace(recipe, options={**recipe.options, **options})
            root = tmp_path_factory.mktemp(name)
            ctx = BuildContext(
                recipe=recipe, model=model,
                example_input=torch.from_numpy(next(iter(tiny_calibration(1)))),
                calibration_images=tiny_calibration, calibration_count=CALIBRATION,
                labels=list(subset.class_names or [f"class {i}" for i in range(1000)]),
                embedded_manifest={"recipe": name, "weights": tiny_weights.identity.to_dict()},
                workdir=root / "work", log=lambda msg: None,
            )
            path = root / recipe.filename
            result = et_backend.build(ctx, path)
            after = model.state_dict()
            assert all(torch.equal(after[k], v) for k, v in state.items()), "build changed ctx.model"
            cache[key] = (ctx, result, path)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def images(subset, tiny_weights):
    """Eight real evaluation images, float32 [8, 3, 224, 224] in [0, 1], and the torch logits."""
    x = np.stack([preprocess_file(s.path, tiny_weights.preprocessing) for s in subset.split("evaluation")[:8]])
    model = export_model(tiny_weights.model, tiny_weights.preprocessing, probabilities=False)
    with torch.no_grad():
        return x, model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_builds(built, name):
    ctx, result, path = built(name)
    assert path.is_file() and path.stat().st_size > 100_000
    assert result.input == INPUT_CONTRACTS["rgb-nchw-unit"].spec("image")
    assert result.output == OUTPUT_CONTRACTS["probabilities"].spec("probabilities")
    assert result.lowering["ops_total"] > 0
    assert set(result.embedded) == {"manifest", "labels", "contract"}
    assert result.calibration_used == (CALIBRATION if ctx.recipe.calibrated else 0)
    want = {"executorch-xnnpack-fp32": ["XnnpackBackend"], "executorch-xnnpack-int8": ["XnnpackBackend"],
            "executorch-portable-fp32": [], "executorch-coreml-fp16": ["CoreMLBackend"]}[name]
    assert et_runner.delegate_backends(path) == want


@pytest.mark.parametrize("name", ["executorch-xnnpack-fp32", "executorch-portable-fp32"])
def test_fp32_matches_torch(built, images, name):
    x, ref = images
    runner = open_runner(built(name)[2])
    got = runner.run(x)
    assert got.shape == (8, 1000) and got.dtype == np.float32
    # The program returns probabilities; the runner gives log p, equal to the logits up to a per-image constant.
    assert np.abs(center(got) - center(ref)).max() <= FP32_TOL
    assert ref.std() > 1.0  # the logits are spread, so the bound means something


def test_int8_sqnr(built, images):
    x, ref = images
    fid = compare(ref, open_runner(built("executorch-xnnpack-int8")[2]).run(x))
    assert fid.sqnr_db >= INT8_SQNR_FLOOR_DB, fid
    assert fid.top1_agreement >= 0.5, fid


def test_the_int8_recipes_as_convert_builds_them(tmp_path):
    """Static and dynamic int8 through the real pipeline (rewrites, float layers, migration, rounding):
    one XNNPACK partition, the scheme the manifest names, and fidelity to the float reference."""
    from conftest import convert_tiny
    from edge_convnext.manifest import read_manifest

    convert_tiny(tmp_path, "executorch-xnnpack-int8,executorch-xnnpack-dynamic-int8", reference_images=8,
                 parity_images=8, calibration_images=16)
    for name, scheme in (("executorch-xnnpack-int8", "PT2E static"), ("executorch-xnnpack-dynamic-int8", "PT2E dynamic")):
        m = read_manifest(tmp_path / f"{name}.json")
        low = m.lowering
        assert low["quantization"]["scheme"].startswith(scheme), name
        assert (low["partitions"], low["ops_outside_total"]) == (1, 0), name
        want = {"fold_layer_scale": 5, "split_depthwise": 5} | ({} if "dynamic" in name else {"channels_first": 9})
        assert low["rewrites"] == want
        assert m.parity["sqnr_db"] >= INT8_SQNR_FLOOR_DB + 10, (name, m.parity)  # static measured 44.9 dB here


def _quantized_graph(gm_model, plan, scope, dynamic=False, ranges=None):
    ctx = types.SimpleNamespace(plan=plan, recipe=types.SimpleNamespace(name="t", options={"int8_scope": scope}),
                                calibration_count=2, calibration_images=lambda n: (np.random.rand(1, 3, 224, 224)
                                                                                   .astype(np.float32) for _ in range(n)),
                                log=lambda m: None, activation_ranges=ranges)
    gm = torch.export.export(gm_model, (torch.rand(1, 3, 224, 224),)).module()
    return et_backend._quantize_int8(gm, ctx, dynamic)[0]


def test_the_annotation_filter_follows_the_plan_and_the_scope(tiny_weights):
    """Float layers keep float weights, quantized ones get int8 weights; with scope 'compute' no residual
    add output is quantized, with 'all' they are."""
    from converters import rewrites
    from converters.quant_plan import QuantPlan

    model = rewrites.apply(export_model(tiny_weights.model, tiny_weights.preprocessing),
                           ["fold_layer_scale", "split_depthwise", "channels_first"])[0]
    plan = QuantPlan.for_model(model, ["stages.*.dwconv.*", "classifier"])
    q = torch.ops.quantized_decomposed

    def weight_quantized(gm):
        out = {}
        for n in gm.graph.nodes:
            if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
                stack = n.meta.get("nn_module_stack") or {}
                name = list(stack.values())[-1][0] if stack else ""
                w = n.args[1]
                out[name] = getattr(w, "target", None) in (q.dequantize_per_channel.default,
                                                            q.dequantize_per_tensor.default)
        return out

    def quantized_residual_adds(gm):  # the block's own add (innermost module: the block) with int8 output
        def block(n):
            stack = n.meta.get("nn_module_stack") or {}
            return bool(stack) and re.fullmatch(r"stages\.\d+\.layers\.\d+", list(stack.values())[-1][0])
        return sum(1 for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor and block(n)
                   and any(u.target is q.quantize_per_tensor.default for u in n.users))

    compute = _quantized_graph(model, plan, "compute")
    wq = weight_quantized(compute)
    assert all(wq[n] for n in plan.quantized), {n: wq.get(n) for n in plan.quantized}
    assert not any(wq.get(n, False) for n in plan.float_layers)
    assert not any(v for k, v in wq.items() if k.endswith("layernorm"))  # ChannelLayerNorm's mean convs stay float
    assert quantized_residual_adds(compute) == 0
    assert quantized_residual_adds(_quantized_graph(model, plan, "all")) > 0
    with pytest.raises(Exception, match="int8_scope"):
        _quantized_graph(model, plan, "everything")


def test_static_int8_takes_the_ranges_chosen_on_the_torch_side(tiny_weights):
    """The observers at every quantized conv/linear input and output hold ``ctx.activation_ranges`` (the
    ranges LiteRT's int8 artifact gets), not the HistogramObserver's: the converted graph's quantize
    parameters are the chosen ranges' (`converters.act_quant.qparams`); float layers get none."""
    from converters import rewrites
    from converters.act_quant import Point, qparams
    from converters.quant_plan import QuantPlan

    model = rewrites.apply(export_model(tiny_weights.model, tiny_weights.preprocessing),
                           ["fold_layer_scale", "split_depthwise", "channels_first"])[0]
    plan = QuantPlan.for_model(model, ["stages.*.dwconv.*", "classifier", "embeddings.patch_embeddings"])
    # Distinct, deliberately odd ranges per point, so a match cannot come from calibration.
    ranges = {Point(n, w): (-0.5 - i / 7, 3.0 + i / 3) for i, (n, w) in
              enumerate((n, w) for n in plan.layers for w in ("input", "output"))}
    gm = _quantized_graph(model, plan, "compute", ranges=ranges)
    q = torch.ops.quantized_decomposed
    seen = {}
    for n in gm.graph.nodes:
        if n.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            continue
        name = et_backend._layer_name(n)
        if name not in plan.quantized:  # a float layer may read a quantized layer's dequantized output
            continue
        src = n.args[0]
        if src.target is q.dequantize_per_tensor.default:
            seen[Point(name, "input")] = tuple(src.args[1:3])
        for u in n.users:
            if u.target is q.quantize_per_tensor.default:
                seen[Point(name, "output")] = tuple(u.args[1:3])
    want = {Point(n, w) for n in plan.quantized for w in ("input", "output")}
    assert set(seen) == want, sorted(map(str, set(seen) ^ want))
    for point, (scale, zp) in seen.items():
        s, z = qparams(*ranges[point])
        assert scale == pytest.approx(s, rel=1e-6) and zp == z, (str(point), scale, zp, s, z)


def test_xnnpack_takes_the_whole_graph_with_the_rewrite(built):
    for name in ("executorch-xnnpack-fp32", "executorch-xnnpack-int8"):
        low = built(name)[1].lowering
        assert low["delegate"] == "XnnpackBackend"
        assert (low["partitions"], low["ops_outside_delegate"]) == (1, {}), name
        rw = low["ln_rewrite"]
        assert rw["applied"] and rw["rewritten"] == {"layer_norms": 10, "means": 1}
        assert rw["with_rewrite"]["ops_outside_total"] == 0
        assert rw["without_rewrite"]["ops_outside_delegate"] == FLOAT_ISLANDS, name
        assert rw["without_rewrite"]["partitions"] > 10


def test_without_rewrite_only_the_float_islands_stay_outside(built):
    """The un-rewritten build: every compute op except LayerNorm and the head's mean is delegated, and
    the dry-run counts the rewritten build reports for it equal its real lowering."""
    plain = built("executorch-xnnpack-fp32", ln_rewrite=False, ln_rewrite_compare=False)[1].lowering
    assert plain["ops_outside_delegate"] == FLOAT_ISLANDS
    assert plain["partitions"] == 11  # each island ends a partition
    assert not plain["ln_rewrite"]["applied"] and plain["ln_rewrite"]["with_rewrite"] is None
    dry_run = built("executorch-xnnpack-fp32")[1].lowering["ln_rewrite"]["without_rewrite"]
    assert dry_run == {k: plain[k] for k in ("partitions", "ops_outside_total", "ops_outside_delegate", "ops_total")}


def test_portable_has_no_delegate(built):
    low = built("executorch-portable-fp32")[1].lowering
    assert low["delegate"] is None and low["partitions"] == 0
    assert low["ops_outside_total"] == low["ops_total"] > 0
    assert low["ops_outside_delegate"]["aten.native_layer_norm.default"] == 10


def test_coreml_exports_here_and_runs_only_emulated(built):
    ctx, result, path = built("executorch-coreml-fp16")
    low = result.lowering
    # One Core ML partition; only the float32 softmax stays outside (portable kernel), by design.
    assert low["delegate"] == "CoreMLBackend" and low["partitions"] == 1
    assert low["ops_outside_delegate"] == {"aten._softmax.default": 1}, low["ops_outside_delegate"]
    # ... as the core op the portable kernels implement, so the program loads on a device.
    from executorch.extension.pybindings import portable_lib

    assert "aten::_softmax.out" in portable_lib._get_operator_names()
    contract = json.loads(et_runner.read_embedded(path)["contract"])
    assert contract["input"]["layout"] == "NCHW" and "do NOT subtract" in contract["input"]["normalization"]
    assert "do NOT apply softmax" in contract["output"]["softmax"]
    assert low["coreml"]["compute_precision"] == "fp16"
    assert any("Apple devices only" in n for n in result.notes)
    from executorch.runtime import Runtime

    if Runtime.get().backend_registry.is_available("CoreMLBackend"):
        pytest.skip("this ExecuTorch runtime has the Core ML backend")
    # Without the backend the program runs emulated (tests/test_executorch_coreml.py); the real runtime refuses it.
    assert open_runner(path).name == "executorch-coreml-emulated"
    with pytest.raises(RuntimeUnavailable, match="Apple devices only") as e:
        et_runner.open(path, emulate=False)
    assert str(path) in str(e.value)
    assert json.loads(et_runner.read_embedded(path)["manifest"]) == ctx.embedded_manifest


def test_embedded_metadata(built):
    ctx, _, path = built("executorch-xnnpack-fp32")
    got = et_runner.read_embedded(path)
    assert json.loads(got["manifest"]) == ctx.embedded_manifest
    assert got["labels"].split("\n") == ctx.labels and len(ctx.labels) == 1000


@pytest.mark.parametrize("damage", ["missing", "empty", "truncated", "garbage", "header-only"])
def test_bad_files_name_the_file(built, tmp_path, damage):
    good = built("executorch-xnnpack-fp32")[2].read_bytes()
    bad = tmp_path / "broken.pte"
    if damage != "missing":
        bad.write_bytes({"empty": b"", "truncated": good[: len(good) // 2], "garbage": bytes(range(256)) * 64,
                         "header-only": good[:64]}[damage])
    with pytest.raises(ArtifactError, match="broken.pte"):
        et_runner.open(bad)
    with pytest.raises(ArtifactError, match="broken.pte"):
        open_runner(bad)


def test_input_contract_is_checked(built):
    path = built("executorch-xnnpack-fp32")[2]
    other = TensorSpec("image", (1, 224, 224, 3), "float32", "NHWC", (0.0, 1.0), contract="rgb-nhwc-unit")
    manifest = types.SimpleNamespace(input=other, output=OUTPUT_CONTRACTS["probabilities"].spec("probabilities"))
    with pytest.raises(ArtifactError, match=r"input is float32 \[1, 3, 224, 224\].*expects float32 NHWC \[1, 224, 224, 3\]"):
        et_runner.open(path, manifest=manifest)  # type: ignore[arg-type]
    unknown = types.SimpleNamespace(input=TensorSpec("image", (1, 3, 224, 224), "float32", "NCHW", contract="bgr-mystery"),
                                    output=manifest.output)
    with pytest.raises(ArtifactError, match=r"input contract 'bgr-mystery'.*knows \['rgb-image'"):
        et_runner.open(path, manifest=unknown)  # type: ignore[arg-type]
    runner = et_runner.open(path)
    with pytest.raises(ValueError, match=r"\[N, 3, 224, 224\]"):
        runner.run(np.zeros((1, 3, 200, 200), np.float32))


def test_threads_resize_invalidates_older_runners(built, images):
    from executorch.extension.pybindings import portable_lib

    path = built("executorch-xnnpack-fp32")[2]
    before = portable_lib._threadpool_get_thread_count()
    other = 1 if before != 1 else 2
    old = et_runner.open(path)
    try:
        one = et_runner.open(path, threads=other)
        assert portable_lib._threadpool_get_thread_count() == other
        np.testing.assert_allclose(center(one.run(images[0][:1])), center(images[1][:1]), atol=FP32_TOL)
        with pytest.raises(ArtifactError, match="threadpool was resized"):
            old.run(images[0][:1])
    finally:
        et_runner.open(path, threads=before)


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first", "head"])
def test_layer_norm_rewrite_keeps_fp32_numerics(data_format):
    """The decomposition is as close to a float64 LayerNorm as torch's own fp32 kernel, for HF ConvNeXt's
    channels-last and channels-first LayerNorms and the head's plain LayerNorm on [N, C]."""
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm

    g = torch.Generator().manual_seed(0)
    c = 96
    if data_format == "head":
        ln, x = torch.nn.LayerNorm(c, eps=1e-12), torch.randn(2, c, generator=g) * 3 + 1
    else:
        ln = ConvNextLayerNorm(c, eps=1e-6, data_format=data_format)
        shape = (1, 14, 14, c) if data_format == "channels_last" else (1, c, 14, 14)
        x = torch.randn(shape, generator=g) * 3 + 1
    with torch.no_grad():
        ln.weight.copy_(torch.randn(c, generator=g) * 0.1 + 1)
        ln.bias.copy_(torch.randn(c, generator=g) * 0.1)
        gm = torch.export.export(ln.eval(), (x,)).module()
        assert rewrite_for_xnnpack(gm).layer_norms == 1
        assert not any("layer_norm" in str(n.target) for n in gm.graph.nodes)
        native, rewritten = ln(x), gm(x)
        exact = ln.double()(x.double())
    err_native = (native.double() - exact).abs().max().item()
    err_rewritten = (rewritten.double() - exact).abs().max().item()
    assert err_rewritten <= max(2 * err_native, 1e-6), (err_rewritten, err_native)


def test_mean_rewrite_only_touches_the_spatial_global_mean():
    class M(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(-2, -1)), x.mean(dim=1), x.mean(dim=(2, 3), keepdim=True)

    x = torch.randn(1, 8, 5, 5)
    gm = torch.export.export(M(), (x,)).module()
    assert rewrite_for_xnnpack(gm).means == 1
    for a, b in zip(gm(x), M()(x)):
        torch.testing.assert_close(a, b)


@pytest.mark.full
def test_full_size_xnnpack_fp32(tmp_path, subset):
    from converters.weights import load_weights

    w = load_weights("random:0")
    model = export_model(w.model, w.preprocessing)
    x = np.stack([preprocess_file(s.path, w.preprocessing) for s in subset.split("evaluation")[:4]])
    recipe = get_recipe("executorch-xnnpack-fp32")
    ctx = BuildContext(
        recipe=recipe, model=model, example_input=torch.from_numpy(x[:1]),
        calibration_images=lambda n: iter(()), calibration_count=0,
        labels=[f"class {i}" for i in range(1000)], embedded_manifest={"recipe": recipe.name},
        workdir=tmp_path / "work", log=lambda msg: None,
    )
    path = tmp_path / recipe.filename
    result = et_backend.build(ctx, path)
    low = result.lowering
    assert (low["partitions"], low["ops_outside_total"]) == (1, 0)
    assert low["ln_rewrite"]["rewritten"] == {"layer_norms": 23, "means": 1}
    assert low["ln_rewrite"]["without_rewrite"]["ops_outside_delegate"] == {
        "aten.native_layer_norm.default": 23, "aten.mean.dim": 1}
    assert 100e6 < path.stat().st_size < 130e6
    with torch.no_grad():
        ref = export_model(w.model, w.preprocessing, probabilities=False)(torch.from_numpy(x)).numpy()
    got = open_runner(path).run(x)
    assert np.abs(center(got) - center(ref)).max() <= recipe.parity_max_abs
