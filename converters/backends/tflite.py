"""TFLite / LiteRT backend: litert-torch converts, ai-edge-quantizer quantizes the ``.tflite`` file.

Every recipe starts from the same float32 flatbuffer, converted with an NHWC interface
(``litert_torch.to_channel_last_io(model, args=[0])``): float32 RGB ``[1, 224, 224, 3]`` in [0, 1] ->
float32 ``[1, 1000]`` probabilities (the export model ends in a softmax). That is the input MediaPipe's
ImageClassifier accepts ("1 x height x width x depth") with NormalizationOptions mean [0], std [255]
(input contract ``rgb-nhwc-unit``). Then, by recipe precision:

* ``fp32``: as converted.
* ``fp16``: float16 weights for CONV/DEPTHWISE/FULLY_CONNECTED (ai-edge-quantizer float casting,
  weight-only): DEQUANTIZE ops turn them back into float32, which XNNPACK folds at load time.
* ``dynamic-int8``: ``dynamic_wi8_afp32`` (int8 per-channel weights, activations quantized on the fly).
* ``int8`` / ``w8a16``: static quantization calibrated on real calibration images, with per-op
  settings (see `_static_recipe`). Float input and output tensors: the quantizer inserts one
  QUANTIZE after the input; the classifier is dynamic-range and the SOFTMAX stays float32, so the
  probabilities are not quantized to 1/256 steps.

Finally tensor names lose their Python module paths, the TFLite Model Metadata (labels as the
output's TENSOR_AXIS_LABELS file, the manifest, normalization; `tflite_metadata`) is attached and
checked as MediaPipe reads it (`tflite_flatbuffer.finalize`, `tflite_metadata.validate`), the file is
loaded and run once by the device runner, and the lowering report is read from the interpreter.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.backends import tflite_flatbuffer as fb
from converters.backends import tflite_metadata as tmd
from converters.backends import tflite_ranges
from converters.backends.fp16 import fp16_entry
from converters.backends.tflite_lowering import lowering_report
from converters.act_quant import ESTIMATORS
from converters.context import BuildContext, BuildResult
from converters.quant_plan import quantizable_layers
from edge_convnext import __version__
from edge_convnext.contract import INPUT_CONTRACTS, OUTPUT_CONTRACTS
from edge_convnext.errors import EdgeConvNextError
from edge_convnext.manifest import NUM_CLASSES, TensorSpec
from edge_convnext.metrics import Fidelity, center, compare
from edge_convnext.runners import tflite as tflite_runner


# Which ops get static integer activations in `tflite-int8` (recipe option "int8_scope"):
#   "all":     every op ai-edge-quantizer supports: convs, FCs, the decomposed LayerNorm (MEAN,
#              SQUARED_DIFFERENCE, RSQRT, SUB, MUL, ADD), GELU and the residual ADDs.
#   "ln16":    as "all", but the LayerNorm pieces take int16 activations (QUANTIZE ops requantize
#              between int8 and int16 at each LayerNorm's edges).
#   "compute": CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED only; LayerNorm, GELU and the adds
#              stay float32 between QUANTIZE/DEQUANTIZE pairs.
# "compute" is the default: on synthetic ConvNeXt-T it was ~5 dB SQNR more faithful than "all" (per-
# tensor int8 through 23 LayerNorms and 18 GELUs adds up), as faithful as the PT2E route, and the only
# scope XNNPACK runs as one partition (it takes no int8 RSQRT, SQUARED_DIFFERENCE, SUB, GELU or the
# LayerNorm epsilon ADD, so "all" splits into ~88 partitions).
INT8_SCOPES = ("all", "ln16", "compute")
DEFAULT_INT8_SCOPE = "compute"
_LAYERNORM_SCOPE = "LayerNorm"  # regex on op scopes: litert-torch names ops after their torch module
_COMPUTE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")

_fp32_cache: tuple[str, bytes, float] | None = None  # (weights fingerprint, flatbuffer, seconds)


class TFLiteBuildError(EdgeConvNextError):
    """The converter or quantizer produced no usable .tflite."""


def build(ctx: BuildContext, out: Path) -> BuildResult:
    """Write ``ctx.recipe``'s ``.tflite`` at ``out`` and describe it (see module doc)."""
    precision = ctx.recipe.precision
    if precision not in _QUANTIZE:
        raise TFLiteBuildError(f"{ctx.recipe.name}: no TFLite build for precision {precision!r}")
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    result = BuildResult.for_recipe(ctx.recipe)
    timings: dict[str, Any] = {}

    fp32, convert_s, cached = _convert_fp32(ctx)
    timings["convert_s"] = round(convert_s, 2)
    if cached:
        timings["convert_reused"] = True  # converted once for an earlier recipe of this run

    t0 = time.perf_counter()
    model, quant = _QUANTIZE[precision](ctx, fp32, result)
    if precision != "fp32":
        timings["quantize_s"] = round(time.perf_counter() - t0, 2)

    files = {
        tflite_runner.LABELS_NAME: ("\n".join(ctx.labels) + "\n").encode("utf-8"),
        tflite_runner.MANIFEST_NAME: json.dumps(ctx.embedded_manifest, indent=2, sort_keys=True).encode("utf-8"),
    }
    out = Path(out)
    data = fb.finalize(model, files, tmd.metadata_buffer(_metadata(ctx, result)))
    metadata = tmd.validate(data, NUM_CLASSES, f"{ctx.recipe.name}.tflite")  # before anything is written
    out.write_bytes(data)
    where = (f"associated file in the zip appended to the flatbuffer (TFLite Model Metadata layout) and flatbuffer "
             f"metadata '{tflite_runner.METADATA_PREFIX}{{name}}'; read with edge_convnext.runners.tflite.read_embedded")
    result.embedded = {name: where.format(name=name) for name in files}
    result.embedded["model_metadata"] = (f"'{tmd.METADATA_NAME}' (TFLite Model Metadata: name, description, version, "
                                         "author, license, RGB image input with normalization mean [0] std [255], "
                                         f"'{tflite_runner.LABELS_NAME}' as the output's TENSOR_AXIS_LABELS)")

    check = _verify(ctx, out, files, result)
    result.lowering = {
        "converter": "litert-torch",
        "interface": "float32 NHWC [1, 224, 224, 3] input (litert_torch.to_channel_last_io), float32 probabilities "
                     "out (softmax in the graph)",
        "model_metadata": metadata,
        **quant,
        **lowering_report(out, threads=2),
        "example_check": check,
        "timings": timings,
        "fp16": fp16_entry(ctx.recipe, out),
    }
    ctx.log(f"{out.stat().st_size / 1e6:.1f} MB, {result.lowering['xnnpack']['partitions']} XNNPACK partition(s), "
            f"example image max |logit - torch| = {check['max_abs_vs_torch']:.3g}")
    return result


# --- conversion -------------------------------------------------------------------------------


def _convert_fp32(ctx: BuildContext) -> tuple[bytes, float, bool]:
    """(float32 flatbuffer of ``ctx.model``, conversion seconds, reused?).

    Converted once per weights in a process (15-60 s at full size) and kept in memory for the
    run's other TFLite recipes, which all start from it.
    """
    global _fp32_cache
    key = _fingerprint(ctx.model, ctx.example_input)
    if _fp32_cache is not None and _fp32_cache[0] == key:
        ctx.log(f"float32 flatbuffer: reusing this run's conversion ({_fp32_cache[2]:.0f} s)")
        return _fp32_cache[1], _fp32_cache[2], True
    import litert_torch

    ctx.log("converting with litert-torch (torch.export -> TFLite, NHWC interface)")
    path = ctx.workdir / "fp32.tflite"
    t0 = time.perf_counter()
    # The layout wrapper is a new module, in training mode unless told: litert-torch then warns on every
    # build (ConvNeXt has no dropout or batch norm, so the numbers are the same either way).
    nhwc = litert_torch.to_channel_last_io(ctx.model.eval(), args=[0]).eval()
    with torch.no_grad():
        litert_torch.convert(nhwc, (torch.from_numpy(_feed(ctx, ctx.example_input.numpy())),)).export(str(path))
    data = path.read_bytes()
    _fp32_cache = (key, data, time.perf_counter() - t0)
    return data, _fp32_cache[2], False


def _fingerprint(model: torch.nn.Module, example: torch.Tensor) -> str:
    h = hashlib.sha256(f"{type(model).__qualname__}{tuple(example.shape)}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# --- quantization -----------------------------------------------------------------------------


def _fp32(ctx: BuildContext, model: bytes, result: BuildResult) -> tuple[bytes, dict[str, Any]]:
    return model, {"quantization": None}


def _fp16(ctx: BuildContext, model: bytes, result: BuildResult) -> tuple[bytes, dict[str, Any]]:
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    ctx.log("float16 weights (ai-edge-quantizer float casting, weight-only)")
    q = quantizer.Quantizer(model)
    q.add_weight_only_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)
    result.notes.append("float16 weights for CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED; biases, LayerNorm "
                        "parameters and all compute stay float32")
    return _quantize(q), {"quantization": {"tool": "ai-edge-quantizer", "recipe": "weight-only float16 (float_casting)",
                                           "config": _jsonable(q.get_quantization_recipe())}}


def _dynamic_int8(ctx: BuildContext, model: bytes, result: BuildResult) -> tuple[bytes, dict[str, Any]]:
    from ai_edge_quantizer import quantizer, recipe

    ctx.log("dynamic-range int8 (ai-edge-quantizer dynamic_wi8_afp32)")
    q = quantizer.Quantizer(model, recipe.dynamic_wi8_afp32())
    kept = _keep_float(ctx, q, model)
    return _quantize(q), {"quantization": {"tool": "ai-edge-quantizer", "recipe": "dynamic_wi8_afp32",
                                           "float_ops": kept,
                                           "float_ops_storage": "float32 compute, float16 weights" if kept else None,
                                           "config": _jsonable(q.get_quantization_recipe())}}


def _static_int8(ctx: BuildContext, model: bytes, result: BuildResult) -> tuple[bytes, dict[str, Any]]:
    scope = str(ctx.recipe.options.get("int8_scope", DEFAULT_INT8_SCOPE))
    if scope not in INT8_SCOPES:
        raise TFLiteBuildError(f"{ctx.recipe.name}: int8_scope {scope!r} is not one of {INT8_SCOPES}")
    return _static(ctx, model, result, activation_bits=8, scope=scope)


def _static_w8a16(ctx: BuildContext, model: bytes, result: BuildResult) -> tuple[bytes, dict[str, Any]]:
    return _static(ctx, model, result, activation_bits=16, scope="all")


def _static(ctx: BuildContext, model: bytes, result: BuildResult, activation_bits: int,
            scope: str) -> tuple[bytes, dict[str, Any]]:
    from ai_edge_quantizer import quantizer

    model, flattened = fb.flatten_fc_biases(model)
    estimators = _graph_range_estimators(ctx)  # a bad option fails before calibration
    q = quantizer.Quantizer(model)
    head = _static_recipe(q, model, activation_bits, scope)
    kept = _keep_float(ctx, q, model)
    qsvs, used = _calibrate(ctx, model, q.get_quantization_recipe())
    ranged = _torch_ranges(ctx, model, qsvs)
    result.calibration_used = used
    ctx.log(f"static int{activation_bits} activations ({scope}), calibrated on {used} images")
    quantized, graph_ranges = _graph_ranges(ctx, model, q, qsvs, used, estimators)
    if flattened:
        result.notes.append(f"{flattened} FULLY_CONNECTED biases reshaped [1,1,1,C] -> [C] before quantization "
                            "(ai-edge-quantizer 0.10 would give them C scales on a size-1 axis, which LiteRT refuses)")
    if head:
        result.notes.append("classifier FULLY_CONNECTED is dynamic-range int8 (int8 weights, float32 logits): "
                            "logits are not clipped to the range seen in calibration")
    if graph_ranges and graph_ranges.get("per_group"):
        result.notes.append(f"activation ranges of {graph_ranges['tensors']} int8 tensors: an estimator per op group "
                            f"({len(graph_ranges['per_group']['groups'])} groups, from {graph_ranges['chosen']} for all), "
                            "chosen on held-out calibration images (lowering.quantization.graph_ranges)")
    elif graph_ranges:
        result.notes.append(f"activation ranges of {graph_ranges['tensors']} int8 tensors: {graph_ranges['chosen']} "
                            "of their values over the calibration images, chosen on held-out calibration images "
                            "(lowering.quantization.graph_ranges)")
    elif ranged:
        result.notes.append(f"activation ranges of {ranged} conv/fully-connected input and output tensors chosen on the "
                            "torch side (lowering.activation_ranges); the others: absolute min/max over the calibration images")
    else:
        result.notes.append("activation ranges: absolute min/max over all calibration images (ai-edge-quantizer's "
                            "default moving average keeps mostly the first images' ranges and clipped the logits)")
    ranges = ("per op group" if graph_ranges.get("per_group") else graph_ranges["chosen"]) if graph_ranges \
        else "absolute min/max"
    return quantized, {"quantization": {
        "tool": "ai-edge-quantizer",
        "recipe": f"static_wi8_ai{activation_bits} with per-op settings",
        "activation_scope": scope,
        "float_ops": kept,
        "float_ops_storage": "float32 compute, float16 weights" if kept else None,
        "calibration": {"images": used, "ranges": ranges, "tensors_ranged_on_torch_side": ranged},
        "graph_ranges": graph_ranges,
        "config": _jsonable(q.get_quantization_recipe()),
    }}


def _graph_range_estimators(ctx: BuildContext) -> tuple[str, ...]:
    """The estimators of recipe option ``graph_ranges`` (names of `act_quant.ESTIMATORS`); () without it.
    Those of ``graph_ranges.per_group`` are checked too."""
    opts = ctx.recipe.options.get("graph_ranges") or {}
    names = tuple(opts.get("estimators", ()))
    per_group = tuple((opts.get("per_group") or {}).get("estimators", ()))
    unknown = [n for n in (*names, *per_group) if n not in ESTIMATORS]
    if unknown:
        raise TFLiteBuildError(f"{ctx.recipe.name}: unknown range estimators {unknown} in option graph_ranges; "
                               f"known: {sorted(ESTIMATORS)}")
    if opts.get("per_group") and not (names and per_group):
        raise TFLiteBuildError(f"{ctx.recipe.name}: graph_ranges.per_group needs graph_ranges.estimators (the "
                               "starting point) and estimators of its own")
    if names and ctx.activation_ranges:
        raise TFLiteBuildError(f"{ctx.recipe.name}: graph_ranges and torch-side activation_ranges both set ranges; "
                               "give the recipe one of them")
    return names


def _graph_ranges(ctx: BuildContext, model: bytes, q: Any, qsvs: dict[str, Any], used: int,
                  names: tuple[str, ...]) -> tuple[bytes, dict[str, Any] | None]:
    """Quantize with the calibrated ranges, or, given estimator ``names`` (option ``graph_ranges``), with every
    calibrated tensor's range by each estimator in turn (`tflite_ranges`), keeping the build with the best
    SQNR on the held-out calibration images; with ``graph_ranges.per_group``, then an estimator per op group
    (`tflite_ranges.choose_per_group`), each candidate built and measured the same way.

    -> (quantized flatbuffer, the choice's manifest record or None)."""
    if not names:
        return _quantize(q, qsvs), None
    opts = ctx.recipe.options["graph_ranges"]
    data = ctx.choice_split(int(opts.get("held_out_images", 32)))
    held = np.concatenate(data.held)
    # The statistics pass comes last: the calibration stream records its image ids for the manifest.
    images = [_feed(ctx, x) for x in ctx.calibration_images(used)]
    ctx.log(f"observing {len(qsvs)} calibrated tensors of the float graph on {len(images)} calibration images")
    obs = tflite_ranges.observe(model, images, qsvs)
    per_group = opts.get("per_group")
    wanted = tuple(dict.fromkeys((*names, *(per_group or {}).get("estimators", ()))))
    ranges = {e: {t: ESTIMATORS[e].range(o) for t, o in obs.items()} for e in wanted}
    groups = tflite_ranges.tensor_groups(model, obs)
    seen: dict[str, Fidelity] = {}  # sha256 -> measurement of every candidate (not the bytes: ~30 MB each)

    def measure(choice: dict[str, str]) -> tuple[str, Fidelity, bool]:
        """Build with ``choice`` (group -> estimator) -> (sha256, measurement, whether it is new): a build
        identical to one measured before is not measured again."""
        flat = _quantize(q, tflite_ranges.with_choice(qsvs, groups, ranges, choice))
        key = hashlib.sha256(flat).hexdigest()
        if key in seen:
            return key, seen[key], False
        # Measured as eval runs an artifact: the device runner, the format's input contract.
        candidate = ctx.workdir / "graph-ranges-candidate.tflite"
        candidate.write_bytes(flat)
        seen[key] = compare(data.reference, tflite_runner.open(candidate, threads=torch.get_num_threads()).run(held))
        return key, seen[key], True

    measured: dict[str, Fidelity] = {}
    keys: dict[str, str] = {}
    for name in names:
        keys[name], measured[name], _ = measure(dict.fromkeys(groups, name))
        ctx.log(f"  ranges by {name}: {measured[name].sqnr_db:.2f} dB, top-1 agreement "
                f"{100 * measured[name].top1_agreement:.1f}% on {len(data.held)} held-out calibration images")
    chosen = max(measured, key=lambda k: measured[k].sqnr_db)
    record: dict[str, Any] = {
        "chosen": chosen,
        "tensors": len(obs),
        "candidates": {k: {"sqnr_db": round(f.sqnr_db, 2), "top1_agreement": round(f.top1_agreement, 4)}
                       for k, f in measured.items()},
        "rule": "highest SQNR of centered log-probabilities of the built artifact on the held-out calibration images",
        "statistics_images": len(images),
        "held_out_image_ids": data.held_ids,
    }
    if not per_group:
        return _rebuilt(q, qsvs, groups, ranges, dict.fromkeys(groups, chosen), keys[chosen]), record
    ctx.log(f"choosing an estimator per op group ({len(groups)} groups), starting from {chosen}")
    key_of = {_choice_key(dict.fromkeys(groups, chosen)): keys[chosen]}

    def score(choice: dict[str, str]) -> float | None:
        key, fid, new = measure(choice)
        key_of[_choice_key(choice)] = key
        return fid.sqnr_db if new else None  # None: the same artifact as one measured, it cannot gain

    search = tflite_ranges.choose_per_group(
        list(groups), tuple(per_group["estimators"]), chosen, measured[chosen].sqnr_db, score,
        passes=int(per_group.get("passes", 2)), min_gain=float(per_group.get("min_gain_db", 0.05)), log=ctx.log)
    record["per_group"] = {
        "groups": {g: {"estimator": search.choice[g], "tensors": len(groups[g])} for g in groups},
        "estimators": list(per_group["estimators"]),
        "start": chosen, "start_sqnr_db": round(search.start_score, 2), "sqnr_db": round(search.score, 2),
        "moves": [{"group": g, "estimator": e, "sqnr_db": round(v, 2)} for g, e, v in search.moves],
        "builds_measured": search.measured,
        "rule": f"coordinate descent over op groups, a move kept when it gains more than "
                f"{float(per_group.get('min_gain_db', 0.05))} dB on the held-out calibration images",
    }
    return _rebuilt(q, qsvs, groups, ranges, search.choice, key_of[_choice_key(search.choice)]), record


def _rebuilt(q: Any, qsvs: dict[str, Any], groups: dict[str, list[str]], ranges: dict[str, dict[str, tuple[float, float]]],
             choice: dict[str, str], sha256: str) -> bytes:
    """The chosen candidate, built again (candidates are not kept in memory) and checked to be the one measured."""
    flat = _quantize(q, tflite_ranges.with_choice(qsvs, groups, ranges, choice))
    if hashlib.sha256(flat).hexdigest() != sha256:
        raise TFLiteBuildError("ai-edge-quantizer built a different artifact from the same ranges twice; the "
                               "measured choice cannot be kept")
    return flat


def _choice_key(choice: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(choice.items()))


def _static_recipe(q: Any, model: bytes, activation_bits: int, scope: str) -> bool:
    """Load the static recipe into ``q``; returns whether the classifier head was made dynamic.

    Later entries win: the base config, then the per-op exceptions (float I/O, head, LayerNorm).
    """
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    op = qtyping.TFLOperationName
    ops = [op.ALL_SUPPORTED] if scope in ("all", "ln16") else [op(name) for name in _COMPUTE_OPS]
    for o in ops:
        q.add_static_config(".*", o, activation_num_bits=activation_bits, weight_num_bits=8)
    # Float input and output: QUANTIZE after the input, float logits out.
    for o in (op.INPUT, op.OUTPUT):
        q.update_quantization_recipe(".*", o, algorithm_key=AlgorithmName.NO_QUANTIZE)
    if scope == "ln16":
        q.add_static_config(_LAYERNORM_SCOPE, op.ALL_SUPPORTED, activation_num_bits=16, weight_num_bits=8)
    head = fb.output_ops(model, depth=2)
    # The probabilities stay float32: an int8 softmax would quantize them to steps of 1/256.
    if head and head[0][0] == "SOFTMAX":
        q.update_quantization_recipe(fb.scope_regex(head[0][1]), op.SOFTMAX, algorithm_key=AlgorithmName.NO_QUANTIZE)
        head = head[1:]
    if not head or head[0][0] != "FULLY_CONNECTED":
        return False
    q.add_dynamic_config(fb.scope_regex(head[0][1]), op.FULLY_CONNECTED, num_bits=8)
    return True


def _keep_float(ctx: BuildContext, q: Any, model: bytes) -> dict[str, str]:
    """Float compute for every float layer of ``ctx.plan``, its weights stored as float16 -> {layer: TFLite op}.

    Torch layer names are paired with the ops of ``model`` (the float flatbuffer) by
    `tflite_flatbuffer.layer_ops`; the entries come after the recipe's own, so they win. The weights are
    stored float16 and dequantized once at load (XNNPACK folds the DEQUANTIZE of a constant), so a float
    layer costs half the bytes of float32 and computes exactly as a float32 one with those weights
    (float16 weights: ~66 dB weight SQNR, far above the int8 layers around it).
    """
    from ai_edge_quantizer import qtyping
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    if ctx.plan is None or not ctx.plan.float_layers:
        return {}
    ops = _layer_ops(ctx, model)
    for name in ctx.plan.float_layers:
        op = ops[name]
        q.add_weight_only_config(fb.scope_regex(op.output), qtyping.TFLOperationName(op.kind), 16,
                                 algorithm_key=AlgorithmName.FLOAT_CASTING)
    return {name: ops[name].kind for name in ctx.plan.float_layers}


def _layer_ops(ctx: BuildContext, model: bytes) -> dict[str, fb.LayerOp]:
    return fb.layer_ops(model, [(n, type(m).__name__) for n, m in quantizable_layers(ctx.model)])


def _torch_ranges(ctx: BuildContext, model: bytes, qsvs: dict[str, Any]) -> int:
    """Replace the calibrator's min/max of every layer input/output tensor by ``ctx.activation_ranges``
    (chosen on the torch side, `converters.prepare`); returns how many tensors were set.

    The torch points and the TFLite tensors are the same activations of the same graph (the layers are
    paired by `tflite_flatbuffer.layer_ops`), so only the range estimator differs from the calibrator's.
    """
    if not ctx.activation_ranges:
        return 0
    ops = _layer_ops(ctx, model)
    quantized = set(ctx.plan.quantized) if ctx.plan is not None else set(ops)
    set_ = 0
    for point, (lo, hi) in ctx.activation_ranges.items():
        if point.layer not in quantized:  # a float layer (e.g. kept float by an accuracy target): no range
            continue
        op = ops[point.layer]
        tensor = op.input if point.where == "input" else op.output
        if tensor not in qsvs:
            raise TFLiteBuildError(f"no calibration values for tensor {tensor!r} ({point}): cannot set its range")
        qsvs[tensor] = tflite_ranges.with_range(qsvs[tensor], lo, hi)
        set_ += 1
    return set_


def _calibrate(ctx: BuildContext, model: bytes, quant_recipe: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """Activation ranges over ``ctx.calibration_count`` real calibration images -> (QSVs, images used)."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    images = [_feed(ctx, x) for x in ctx.calibration_images(ctx.calibration_count)]
    if not images:
        raise TFLiteBuildError(f"{ctx.recipe.name}: static quantization needs calibration images; got none")
    signature, inputs = next(iter(Interpreter(model_content=model).get_signature_list().items()))
    name = inputs["inputs"][0]
    rm = recipe_manager.RecipeManager()
    rm.load_quantization_recipe(quant_recipe)
    ctx.log(f"calibrating on {len(images)} calibration images")
    with _quiet(), warnings.catch_warnings():
        # The calibrator reads every intermediate tensor, which the interpreter warns is for debugging.
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
        calib = calibrator.Calibrator(model, num_threads=max(1, torch.get_num_threads()),
                                      qsv_update_func=qsv_utils.min_max_update)
        calib.calibrate({signature: [{name: x} for x in images]}, rm)
    return calib.get_model_qsvs(), len(images)


def _quantize(q: Any, calibration: dict[str, Any] | None = None) -> bytes:
    with _quiet():
        res = q.quantize(calibration, enable_progress_bar=False, enable_progress_report=False)
    if res.quantized_model is None:
        raise TFLiteBuildError("ai-edge-quantizer returned no model")
    return bytes(res.quantized_model)


_QUANTIZE = {
    "fp32": _fp32,
    "fp16": _fp16,
    "dynamic-int8": _dynamic_int8,
    "int8": _static_int8,
    "w8a16": _static_w8a16,
}


# --- checks -----------------------------------------------------------------------------------


def _feed(ctx: BuildContext, x: Any) -> np.ndarray:
    """float32 NCHW ``[1, 3, 224, 224]`` in [0, 1] -> the artifact's input (its format's contract)."""
    return INPUT_CONTRACTS[ctx.recipe.format.input_contract].feed(np.asarray(x, dtype=np.float32))


def _metadata(ctx: BuildContext, result: BuildResult) -> tmd.ClassifierMetadata:
    weights = ctx.embedded_manifest.get("weights") or {}
    synthetic = " SYNTHETIC weights (not ImageNet-trained): predictions are not meaningful." if weights.get("synthetic") else ""
    return tmd.ClassifierMetadata(
        name=f"ConvNeXt-Tiny image classifier ({ctx.recipe.name})",
        description=(f"ImageNet-1k classifier, {ctx.recipe.description}. Weights: {weights.get('source', 'unknown')}."
                     f"{synthetic} Crop the photo to its center (shortest edge resized to 256, center 224x224) "
                     "for the reference accuracy; see manifest.json."),
        version=__version__,
        author="edge-convnext",
        license="Apache-2.0 (model code); the weights carry their own license",
        input_description=result.input.description,
        output_description=result.output.description,
        labels_file=tflite_runner.LABELS_NAME,
        labels=tuple(ctx.labels),
        extra_files=((tflite_runner.MANIFEST_NAME, "edge-convnext build manifest (JSON): recipe, weights, "
                      "preprocessing, input/output contract, calibration, toolchain"),),
    )


def _verify(ctx: BuildContext, path: Path, files: dict[str, bytes], result: BuildResult) -> dict[str, Any]:
    """Load the artifact with the device runner, run the example image, read the embedded files back.

    Fills ``result.input``/``output`` from the model's tensors (dtype and quantization where integer).
    """
    runner = tflite_runner.open(path, threads=2)
    x = ctx.example_input.detach().cpu().numpy().astype(np.float32)
    got = runner.run(x)
    with torch.no_grad():
        want = OUTPUT_CONTRACTS["probabilities"].log_scores(ctx.model(ctx.example_input).detach().cpu().numpy())
    if got.shape != want.shape or not np.all(np.isfinite(got)):
        raise TFLiteBuildError(f"{path}: output {got.shape} (finite: {np.all(np.isfinite(got))}) for one image; "
                               f"expected finite {want.shape}")
    embedded = tflite_runner.read_embedded(path)
    if any(embedded.get(k) != v for k, v in files.items()):
        raise TFLiteBuildError(f"{path}: embedded files do not read back intact")
    details = runner.interpreter.get_input_details()[0], runner.interpreter.get_output_details()[0]
    result.input, result.output = _spec(result.input, details[0]), _spec(result.output, details[1])
    return {"images": 1, "max_abs_vs_torch": float(np.max(np.abs(center(got) - center(want)))),
            "compared": "log-probabilities centered per image", "top1_equal": bool(np.argmax(got) == np.argmax(want))}


def _spec(standard: TensorSpec, d: dict[str, Any]) -> TensorSpec:
    """The contract's spec, with dtype/quantization from the model if its tensor is integer."""
    dtype = np.dtype(d["dtype"]).name
    if dtype == standard.dtype:
        return standard
    scale, zero_point = d["quantization"]
    return TensorSpec(standard.name, standard.shape, dtype, standard.layout, standard.range, standard.description,
                      {"scale": float(scale), "zero_point": float(zero_point)}, standard.contract)


@contextlib.contextmanager
def _quiet():
    """Swallow the quantizer's tqdm bars and size report (stdout/stderr); errors still propagate."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: getattr(o, "value", str(o))))
