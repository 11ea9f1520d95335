"""Torch-side int8 weight rounding (`converters.weight_quant`) and that every backend stores it as is."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from converters.model import export_model  # noqa: E402
from converters.weight_quant import (  # noqa: E402
    QMAX,
    WeightQuantConfig,
    collect_stats,
    minmax_scale,
    prepare_weights,
    quantizable,
    weight_rows,
)

pytestmark = pytest.mark.convert


@pytest.fixture(scope="module")
def tiny_model(tiny_weights):
    return export_model(tiny_weights.model, tiny_weights.preprocessing, probabilities=False)


@pytest.fixture(scope="module")
def images(tiny_calibration):
    return [x for x in tiny_calibration(12)]


def _output_error(model, images, layers_of):
    """Sum over layers of e^T H e: the layer outputs' squared error under the float inputs."""
    layers = quantizable(model)
    stats = collect_stats(model, layers, images)
    total = 0.0
    for name, m in layers:
        h, _ = stats[name].finish()
        e = (layers_of[name] - weight_rows(m)).to(torch.float64)
        total += float(torch.einsum("grk,gkl,grl->", e, h, e))
    return total


def _rounded_rows(model):
    return {n: weight_rows(m) for n, m in quantizable(model)}


@pytest.mark.parametrize("method", ["minmax", "mse", "gptq"])
def test_weights_land_on_the_min_max_grid(tiny_model, images, method):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    q, report = prepare_weights(tiny_model, images[:8], WeightQuantConfig(method=method, bias_correction=False))
    for k, v in tiny_model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, before[k]), k
    for name, m in quantizable(q):
        w = weight_rows(m).to(torch.float64)
        steps = w / minmax_scale(weight_rows(m)).to(torch.float64)
        # what a min/max quantizer computes: integers, and one weight per row at the clip
        assert torch.allclose(steps, steps.round(), atol=1e-3), name
        assert torch.allclose(steps.abs().amax(-1), torch.full_like(steps[..., 0], QMAX), atol=1e-3), name
    assert set(report.layers) == {n for n, _ in quantizable(tiny_model)}


def test_gptq_and_clipping_beat_nearest_rounding(tiny_model, images):
    """On the layers' own calibration inputs, the output error falls: min/max > mse > gptq."""
    errs = {}
    for method in ("minmax", "mse", "gptq"):
        q, _ = prepare_weights(tiny_model, images[:8], WeightQuantConfig(method=method, bias_correction=False))
        errs[method] = _output_error(tiny_model, images[:8], _rounded_rows(q))
    assert errs["gptq"] < errs["mse"] < errs["minmax"], errs


def test_bias_correction_removes_the_mean_shift(tiny_model, images):
    """With bias correction, every layer's mean output on the calibration inputs equals the float one."""
    q, _ = prepare_weights(tiny_model, images[:8], WeightQuantConfig(method="minmax", bias_correction=True))
    layers_f, layers_q = dict(quantizable(tiny_model)), dict(quantizable(q))
    stats = collect_stats(tiny_model, list(layers_f.items()), images[:8])
    for name, mf in layers_f.items():
        _, mean = stats[name].finish()
        mq = layers_q[name]
        f = torch.einsum("grk,gk->gr", weight_rows(mf).double(), mean).reshape(-1) + mf.bias.double()
        g = torch.einsum("grk,gk->gr", weight_rows(mq).double(), mean).reshape(-1) + mq.bias.double()
        assert torch.allclose(f, g, atol=1e-5), name


def test_rounded_model_stays_close(tiny_model, images):
    from edge_convnext.metrics import compare

    x = torch.from_numpy(np.concatenate(images[8:12]))
    q, _ = prepare_weights(tiny_model, images[:8], WeightQuantConfig())
    with torch.no_grad():
        fid = compare(tiny_model(x).numpy(), q(x).numpy())
    assert fid.sqnr_db > 25, fid


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown weight rounding 'round'"):
        WeightQuantConfig(method="round")


# --- every backend stores the rounded weights as they are ------------------------------------------


def _steps(values: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(sorted per-row min/max scales, sorted integer steps) of a weight tensor, rows along ``axis``."""
    v = np.moveaxis(np.asarray(values, dtype=np.float64), axis, 0).reshape(values.shape[axis], -1)
    scale = np.abs(v).max(1, keepdims=True) / QMAX
    steps = v / np.where(scale == 0, 1, scale)
    assert np.allclose(steps, np.round(steps), atol=0.02), "stored weights are not on a per-row min/max grid"
    return np.sort(scale.ravel()), np.sort(np.round(steps).astype(np.int64).ravel())


def _ours(model) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Our rounded layers by element count -> [(sorted scales, sorted steps)]."""
    out: dict[int, list] = {}
    for _, m in quantizable(model):
        w = m.weight.detach().numpy()
        out.setdefault(w.size, []).append(_steps(w, 0))
    return out


def _assert_stored_as_rounded(stored: list[tuple[np.ndarray, int]], model, rtol: float) -> None:
    """Every stored int8 weight tensor is one of our rounded layers: same steps, same scales."""
    ours = _ours(model)
    assert stored, "no quantized weight tensors found"
    for values, axis in stored:
        scales, steps = _steps(values, axis)
        cands = ours.get(values.size, [])
        assert any(np.array_equal(steps, s) and np.allclose(scales, c, rtol=rtol) for c, s in cands), (
            f"a stored weight tensor of {values.size} elements was re-rounded by the backend")


@pytest.fixture(scope="module")
def rounded(tiny_model, tiny_weights, images):
    """The tiny export model (softmax included, as backends get it), layer scale folded, GPTQ-rounded.

    Folded first, as the recipes do: litert-torch would otherwise fold each block's layer scale into
    ``pwconv2`` itself (the steps stay, the scales change by gamma)."""
    from converters.rewrites import fold_layer_scale

    model, _ = fold_layer_scale(export_model(tiny_weights.model, tiny_weights.preprocessing))
    q, _ = prepare_weights(model, images[:4], WeightQuantConfig(images=4))
    return q


def _tflite_weights(path) -> list[tuple[np.ndarray, int]]:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    m = fbu.read_model_from_bytearray(bytearray(path.read_bytes()))
    out = []
    for t in m.subgraphs[0].tensors:
        q = t.quantization
        data = m.buffers[t.buffer].data
        if t.type != schema.TensorType.INT8 or q is None or q.scale is None or len(q.scale) < 2 or data is None:
            continue
        ints = np.frombuffer(bytes(data), dtype=np.int8).reshape(t.shape).astype(np.float64)
        scale = np.asarray(q.scale, dtype=np.float64)
        shape = [1] * ints.ndim
        shape[q.quantizedDimension] = -1
        out.append((ints * scale.reshape(shape), q.quantizedDimension))
    return out


@pytest.mark.parametrize("recipe", ["tflite-dynamic-int8", "tflite-int8"])
def test_tflite_stores_the_rounded_weights(recipe, rounded, make_context, tmp_path):
    from converters.backends import tflite

    ctx = make_context(recipe, calibration_count=4)
    ctx.model = rounded
    tflite.build(ctx, tmp_path / "m.tflite")
    _assert_stored_as_rounded(_tflite_weights(tmp_path / "m.tflite"), rounded, rtol=1e-5)


def test_executorch_xnnpack_quantizer_keeps_the_rounded_weights(rounded, make_context):
    from converters.backends.executorch import _quantize_int8

    ctx = make_context("executorch-xnnpack-int8", calibration_count=2)
    gm = torch.export.export(rounded, (ctx.example_input,)).module()
    q = _quantize_int8(gm, ctx, dynamic=False)[0]
    stored = []
    for node in q.graph.nodes:
        if node.op == "call_function" and "dequantize_per_channel" in str(node.target):
            w, scale = (getattr(q, a.target) for a in node.args[:2])
            shape = [1] * w.ndim
            shape[node.args[3]] = -1
            stored.append(((w.double() * scale.double().reshape(shape)).numpy(), node.args[3]))
    _assert_stored_as_rounded(stored, rounded, rtol=1e-6)


def test_coreml_w8_stores_the_rounded_weights(rounded, make_context, tmp_path):
    pytest.importorskip("coremltools")
    from converters.backends import coreml

    ctx = make_context("coreml-w8")
    ctx.model = rounded
    coreml.build(ctx, tmp_path / "m.mlpackage")
    # the int8 data and scales of each constexpr_affine_dequantize, keyed by the torch layer name
    stored_by_name = _coreml_int8_weights(tmp_path / "m.mlpackage")
    keys = [name.replace(".", "_") + "_weight" for name, _ in quantizable(rounded)]
    stored = [stored_by_name[k] for k in keys if k in stored_by_name]  # the stem stays fp16 in this recipe
    assert len(stored) >= sum(1 for k in keys if "dwconv" in k or "pwconv" in k)
    # fp16 program: the scales are stored as float16
    _assert_stored_as_rounded(stored, rounded, rtol=2e-3)


def _coreml_int8_weights(path) -> dict[str, tuple[np.ndarray, int]]:
    """The int8 data times scales of each constexpr_affine_dequantize of a package, by const name."""
    ct = pytest.importorskip("coremltools")
    from converters.backends import coreml_compress as cc
    from coremltools.converters.mil.frontend.milproto.load import load

    m = ct.models.MLModel(str(path), skip_model_load=True)
    spec = m.get_spec()
    prog = load(spec, specification_version=spec.specificationVersion, file_weights_dir=m.weights_dir)
    out = {}
    for op in prog.functions["main"].operations:
        if op.op_type == "constexpr_affine_dequantize":
            data, scale = op.quantized_data.val.astype(np.float64), op.scale.val.astype(np.float64)
            axis = int(op.axis.val)
            shape = [1] * data.ndim
            shape[axis] = -1
            out[cc._COMPRESSED_SUFFIX.sub("", op.name)] = (data * scale.reshape(shape), axis)
    return out


def test_coreml_w8a8_stores_the_rounded_weights(rounded, make_context, tmp_path):
    """coremltools' torch quantizer on [-127, 127] (scale max|w| / 127) keeps the rounded steps; its
    default [-128, 127] (scale max|w| / 127.5) would re-round every weight."""
    import dataclasses

    from converters.backends import coreml

    ctx = make_context("coreml-w8a8", calibration_count=4)
    # float_layers (): every layer int8 here, so every rounded weight is checked (the recipe keeps some fp16)
    ctx.recipe = dataclasses.replace(ctx.recipe, options={**ctx.recipe.options, "activation_observer": "min_max",
                                                          "held_out_images": 2, "float_layers": ()})
    ctx.model = rounded
    coreml.build(ctx, tmp_path / "m.mlpackage")
    stored = _coreml_int8_weights(tmp_path / "m.mlpackage")
    assert len(stored) == len(quantizable(rounded))  # every conv/linear, the stem too
    _assert_stored_as_rounded(list(stored.values()), rounded, rtol=2e-3)


# --- what the manifest records, and which images every choice used ------------------------------


def _convert_tiny(out, **kw):
    from conftest import convert_tiny

    convert_tiny(out, "tflite-int8", reference_images=8, parity_images=2, calibration_images=4, **kw)
    return json.loads((out / "tflite-int8.json").read_text())


def test_every_recorded_image_is_a_calibration_image(tmp_path, subset):
    m = _convert_tiny(tmp_path / "a")
    evaluation = {s.image_id for s in subset.split("evaluation")}
    calibration = {s.image_id for s in subset.split("calibration")}
    rounding = m["lowering"]["weight_rounding"]
    assert rounding["method"] == "gptq" and rounding["layers"] > 0 and m["lowering"]["rewrites"]
    used = set(rounding["image_ids"]) | set(m["calibration"]["image_ids"])
    assert used and used <= calibration and not used & evaluation


def test_user_calibration_directory(tmp_path, samples_dir):
    import shutil

    mine = tmp_path / "mine" / "sub"
    mine.mkdir(parents=True)
    # 9: tflite-int8 chooses on held-out images; HeldOut.split refuses fewer (1 fit + 8 held out)
    photos = sorted(p for p in samples_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:9]
    assert len(photos) == 9
    for p in photos:
        shutil.copy(p, mine / p.name)
    (mine / "notes.txt").write_text("not an image")
    m = _convert_tiny(tmp_path / "b", calibration=tmp_path / "mine")
    assert m["calibration"]["set"] == "user" and m["calibration"]["images_available"] == len(photos)
    expected = {f"sub/{p.name}" for p in photos}
    assert set(m["calibration"]["image_ids"]) <= expected
    assert set(m["lowering"]["weight_rounding"]["image_ids"]) <= expected


def test_empty_calibration_directory_names_it(tmp_path):
    from edge_convnext.errors import DataError

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images .* pass --calibration"):
        _convert_tiny(tmp_path / "c", calibration=tmp_path / "empty")
