"""``edge-convnext layers``: the per-layer error report, on tiny artifacts of every format.

The report rebuilds the float model from the manifest, reads each artifact layer by layer (TFLite:
its own tensors and ops; ExecuTorch: its XNNPACK payload; Core ML: the emulator's intermediates) and
measures on calibration images. These tests check that the layers are the plan's, in network order,
that a TFLite layer alone agrees with the torch fake-quant simulation, which images it uses, the JSON
schema and the plot.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import convert_tiny  # noqa: E402

pytestmark = pytest.mark.convert

QUANTIZED = ("tflite-int8", "tflite-dynamic-int8", "executorch-xnnpack-int8", "coreml-w8a8")
EXT = {"tflite": ".tflite", "executorch": ".pte", "coreml": ".mlpackage"}
IMAGES = 4


def _path(built, recipe):
    return built / f"{recipe}{EXT[recipe.split('-')[0]]}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    for pkg in ("litert_torch", "executorch", "coremltools"):
        pytest.importorskip(pkg)
    return convert_tiny(tmp_path_factory.mktemp("layers"), ",".join(("tflite-fp32",) + QUANTIZED),
                        reference_images=8, parity_images=2, calibration_images=16)


@pytest.fixture(scope="module")
def report(built):
    """``report(recipe)``: the layer report of a tiny artifact on 4 calibration images, computed once."""
    from converters.layer_report import layer_report

    cache = {}

    def get(recipe):
        if recipe not in cache:
            cache[recipe] = layer_report(_path(built, recipe), images=IMAGES, threads=2)
        return cache[recipe]

    return get


def _float_model(built, recipe):
    from converters.layer_report import calibration_samples, rebuild_float_model
    from edge_convnext.manifest import read_manifest

    m = read_manifest(built / f"{recipe}.json")
    return m, rebuild_float_model(m, calibration_samples(m, None)[0])


@pytest.mark.parametrize("recipe", QUANTIZED)
def test_layers_are_the_plans_quantized_layers_in_network_order(built, report, recipe):
    from converters.quant_plan import quantizable_layers

    rep = report(recipe)
    _, fm = _float_model(built, recipe)
    expected = [n for n, _ in quantizable_layers(fm.model) if n not in fm.plan.float_layers]
    assert [r.name for r in rep.quantized] == expected
    assert [r.name for r in rep.rows] == [n for n, _ in quantizable_layers(fm.model)]
    assert [d["name"] for d in rep.to_dict()["layers"]] == expected
    for r in rep.quantized:  # int8 layers: a finite, plausible error at every depth
        assert r.output_sqnr_db is not None and 10 < r.output_sqnr_db < 80, (r.name, r.output_sqnr_db)
        assert r.own_sqnr_db is not None and 10 < r.own_sqnr_db < 80, (r.name, r.own_sqnr_db)
        assert r.alone is not None and r.alone.images == IMAGES and 0 < r.noise_share < 10
    # the first layer has no error upstream of it: its accumulated error is its own (Core ML: up to its fp16
    # compute, which the artifact's run has and the float32 simulation of the layer alone has not)
    # (the recipes keep the stem float, float16-stored in LiteRT: the first quantized layer sees its small error)
    first = rep.quantized[0]
    tolerance = 2.0 if recipe.startswith("coreml") else 0.5
    assert abs(first.output_sqnr_db - first.own_sqnr_db) < tolerance


def test_tflite_layer_alone_agrees_with_the_torch_fake_quant_simulation(built, report):
    """Each int8 layer's own op in LiteRT (QUANTIZE -> op -> DEQUANTIZE) against `act_quant.simulate` of the
    same scheme (the artifact's int8 weights and bias, its input/output scales): within 0.1 dB end to end."""
    from converters.act_quant import Point, simulate
    from converters.layer_artifacts import TFLiteLayers
    from converters.layer_report import _LOG_P, choose_images
    from edge_convnext.metrics import compare

    rep = report("tflite-int8")
    m, fm = _float_model(built, "tflite-int8")
    src = TFLiteLayers(_path(built, "tflite-int8"), m, fm.model, 2)
    from converters.layer_report import calibration_samples

    _, xs, _ = choose_images(m, calibration_samples(m, None)[0], IMAGES)
    x = torch.from_numpy(xs)
    with torch.no_grad():
        ref = _LOG_P(fm.model(x).numpy())
    for row in rep.quantized:
        st = src.layers[row.name]
        sim = copy.deepcopy(fm.model)
        layer = dict(sim.named_modules())[row.name]
        with torch.no_grad():
            layer.weight.copy_(st.weight.reshape(layer.weight.shape))
            layer.bias.copy_(st.bias)
        if st.output is None:  # the dynamic-range classifier: per-row input, float output
            ctx = simulate(sim, "static", [row.name], {}, dynamic_layers=[row.name])
        else:
            grid = lambda q: ((q.qmin - q.zero_point) * q.scale, (q.qmax - q.zero_point) * q.scale)  # noqa: E731
            ctx = simulate(sim, "static", [row.name], {Point(row.name, "input"): grid(st.input),
                                                        Point(row.name, "output"): grid(st.output)})
        with ctx, torch.no_grad():
            simulated = compare(ref, _LOG_P(sim(x).numpy()))
        assert abs(simulated.sqnr_db - row.alone.sqnr_db) <= 0.1, (row.name, simulated.sqnr_db, row.alone.sqnr_db)


def test_dynamic_range_convs_quantize_each_image_as_a_whole(built, report):
    """LiteRT's dynamic-range CONV_2D quantizes its input per image, FULLY_CONNECTED per row (pixel): the
    stored scheme says so, and simulating it reproduces the op alone."""
    from converters.layer_artifacts import DynamicQuant

    rep = report("tflite-dynamic-int8")
    kinds = {r.name: r.stored["input"]["rows_over_last_dims"] for r in rep.quantized}
    # the recipe quantizes its linears only (stem and downsampling convs stay float): one row per pixel
    assert kinds["stages.0.layers.0.pwconv1"] == 1 and set(kinds.values()) == {1}
    # a conv's input [N, C, H, W]: one range per image, so scaling one image leaves the other's rounding alone
    x = torch.randn(2, 3, 4, 4)
    y = DynamicQuant(3).fake(x, conv=True)
    x2 = x.clone()
    x2[1] *= 100
    assert torch.equal(DynamicQuant(3).fake(x2, conv=True)[0], y[0]) and not torch.equal(y, x)
    assert (y[0] - x[0]).abs().max() <= (x[0].max() - x[0].min()) / 255 / 2 + 1e-6


def test_images_are_calibration_images_that_set_nothing(built, report, subset):
    from converters.layer_report import used_image_ids
    from edge_convnext.manifest import read_manifest

    for recipe in ("tflite-int8", "coreml-w8a8"):
        images = report(recipe).images
        ids = set(images["ids"])
        assert len(ids) == IMAGES
        assert ids <= {s.image_id for s in subset.split("calibration")}
        assert not ids & {s.image_id for s in subset.split("evaluation")}
        assert not ids & used_image_ids(read_manifest(built / f"{recipe}.json"))


def test_json_schema_markdown_and_plot(built, report, tmp_path):
    from converters.layer_report import SCHEMA, plot

    rep = report("tflite-int8")
    text = json.dumps(rep.to_dict(), allow_nan=False)  # strict JSON: identical tensors are null, never Infinity
    d = json.loads(text)
    assert d["schema"] == SCHEMA and d["recipe"] == "tflite-int8" and d["format"] == "tflite"
    assert {"count", "ids", "from", "note"} <= set(d["images"])
    assert {"output", "alone", "float model", "images", "artifact"} <= set(d["how"])
    e = d["end_to_end"]
    assert {"artifact", "intermediates", "intermediates_vs_artifact", "all_layers_alone"} <= set(e)
    assert e["intermediates_vs_artifact"].startswith("identical")  # the multi-output copy runs the same kernels
    for layer in d["layers"]:
        assert set(layer) == {"index", "name", "storage", "stored", "output_sqnr_db", "own_sqnr_db", "alone"}
        assert set(layer["alone"]) == {"sqnr_db", "top1_agreement", "max_abs", "noise_share"}
        assert layer["stored"]["weights"] == "int8/channel" and layer["stored"]["input"] is not None
    assert d["float_layers"] and all(f["reason"].startswith("float_layers") for f in d["float_layers"])
    assert f"| `{rep.quantized[0].name}` |" in rep.markdown()
    plot(rep, tmp_path / "layers.png")
    from PIL import Image

    with Image.open(tmp_path / "layers.png") as img:
        assert img.format == "PNG" and img.size[0] >= 1000


def test_cli_writes_every_output_and_says_when_nothing_is_quantized(built, tmp_path, capsys):
    from edge_convnext.cli import main

    out = tmp_path / "r"
    rc = main(["layers", str(_path(built, "tflite-int8")), "--images", "2", "--json", f"{out}.json",
               "--markdown", f"{out}.md", "--plot", f"{out}.png", "--threads", "2"])
    assert rc == 0
    assert "stages.0.layers.0.pwconv1" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["images"]["count"] == 2
    assert out.with_suffix(".md").read_text().startswith("### `edge-convnext layers` tflite-int8")
    assert out.with_suffix(".png").stat().st_size > 10_000

    rc = main(["layers", str(built / "tflite-fp32.tflite"), "--json", str(tmp_path / "f.json")])
    assert rc == 0 and "nothing in it is quantized" in capsys.readouterr().out
    assert json.loads((tmp_path / "f.json").read_text())["layers"] == []
    from converters.layer_report import NothingQuantized, layer_report

    with pytest.raises(NothingQuantized, match="float recipe"):
        layer_report(built / "tflite-fp32.tflite")


def test_executorch_payload_holds_the_layers_and_its_emulation_tracks_the_runtime(built, report):
    """The XNNPACK payload's weights pair with the float model's layers (float ones exactly, int8 ones within
    rounding), and the emulated subgraph lands as far from float as the real runtime does."""
    from converters.layer_artifacts import XnnpackLayers
    from edge_convnext.metrics import sqnr_db

    rep = report("executorch-xnnpack-int8")
    e = rep.end_to_end
    assert abs(e["intermediates"]["sqnr_db"] - e["artifact"]["sqnr_db"]) <= 2.0, e
    assert e["artifact"]["runtime"] == "executorch"
    m, fm = _float_model(built, "executorch-xnnpack-int8")
    src = XnnpackLayers(_path(built, "executorch-xnnpack-int8"), m, fm.model)
    modules = dict(fm.model.named_modules())
    for name, st in src.layers.items():
        w = modules[name].weight.detach().numpy()
        if st.quantized:
            assert st.input is not None and st.output is not None and 30 < sqnr_db(w, st.weight.numpy()) < 80
        else:
            assert np.array_equal(w, st.weight.numpy()), name  # float layers: the float weights, bit for bit


def test_coreml_reads_the_emulators_own_intermediates(built, report):
    rep = report("coreml-w8a8")
    assert rep.end_to_end["intermediates_vs_artifact"].startswith("identical")
    _, fm = _float_model(built, "coreml-w8a8")
    # the plan's float layers (stem, depthwise, downsampling, classifier) stay fp16, every other is int8
    assert [r.name for r in rep.quantized] == list(fm.plan.quantized) and fm.plan.float_layers
    assert all(r.stored["input"] and r.stored["output"] for r in rep.quantized)
    assert all(r.storage.startswith("w fp16") for r in rep.rows if not r.quantized)


def test_emulator_returns_intermediates_on_request(built):
    from edge_convnext.contract import INPUT_CONTRACTS
    from edge_convnext.coreml_emulator import CoreMLEmulator
    from edge_convnext.coreml_emulator.program import load_package

    path = _path(built, "coreml-w8a8")
    emu = CoreMLEmulator(path)
    _, prog = load_package(path)
    conv = next(op.outputs[0].name for op in prog.functions["main"].operations if op.op_type == "conv")
    pixels = INPUT_CONTRACTS["rgb-image"].feed(np.full((1, 3, 224, 224), 0.5, np.float32))
    out = emu.predict({"image": pixels}, keep=[conv])
    assert out[conv].shape[0] == 1 and np.isfinite(out[conv]).all()
    np.testing.assert_array_equal(out["probabilities"], emu.predict({"image": pixels})["probabilities"])
    with pytest.raises(KeyError, match="no op"):
        emu.predict({"image": pixels}, keep=["not_a_value"])


def test_the_float_model_needs_the_manifests_weights(built, tmp_path):
    from converters.layer_report import rebuild_float_model
    from edge_convnext.errors import WeightsError
    from edge_convnext.manifest import read_manifest

    m = read_manifest(built / "tflite-int8.json")
    m.weights = {**m.weights, "sha256": "0" * 64}
    with pytest.raises(WeightsError, match="sha256 0000000000000000"):
        rebuild_float_model(m, [], "tflite-int8.json")


def test_a_recorded_layernorm_migration_is_rebuilt_float_equal(built, subset):
    """A manifest recording ``smoothing`` gets the same migration: float-equal logits, migrated pwconv1 weights."""
    from converters.layer_report import rebuild_float_model
    from converters.model import export_model
    from converters.weights import load_weights
    from edge_convnext.manifest import read_manifest

    m = read_manifest(built / "tflite-int8.json")
    calib = subset.split("calibration")
    plain = rebuild_float_model(m, calib).model
    m.lowering = {**m.lowering, "smoothing": {"alpha": 0.5, "fit_ids": [s.image_id for s in calib[:4]],
                                              "pairs_migrated": 5}}  # the 5 blocks; the other LayerNorms feed float layers
    fm = rebuild_float_model(m, calib)
    assert fm.record["smoothing"]["pairs"] == 5 and fm.record["smoothing"]["fit_images"] == 4
    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (2, 3, 224, 224)).astype(np.float32))
    with torch.no_grad():
        a, b = plain(x), fm.model(x)
        w = load_weights("random:0:convnext-test")
        assert torch.allclose(export_model(w.model, w.preprocessing)(x), a, atol=1e-6)
    assert (torch.log(a) - torch.log(b)).abs().max().item() <= 1e-4
    p = dict(plain.named_modules())["stages.0.layers.0.pwconv1"].weight
    q = dict(fm.model.named_modules())["stages.0.layers.0.pwconv1"].weight
    assert not torch.allclose(p, q)
    assert math.isfinite(float(q.detach().abs().max()))
