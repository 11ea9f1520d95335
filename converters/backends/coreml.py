"""Core ML backend: each ``coreml-*`` recipe as an ML program (``.mlpackage``).

Pipeline: ``torch.jit.trace`` -> ``coremltools.convert(convert_to="mlprogram")`` -> weight
compression on the Core ML side (``w8``, ``p4``) -> metadata -> save -> read back (spec and MIL
program, ``skip_model_load``: nothing here needs ``MLModel.predict``, which is macOS-only).
``w8a8`` quantizes on the torch side first (see `coreml_compress.quantize_w8a8`).

Deployment targets are the oldest each recipe's ops allow, so an artifact loads on as many devices
as possible (recorded in ``lowering["minimum_deployment_target"]``):

==========  ======  ==========================================================================
recipe      target  needs
==========  ======  ==========================================================================
fp32, fp16  iOS15   ML programs (iOS15 / macOS12)
w8          iOS16   ``constexpr_affine_dequantize`` (int8 per-channel weights)
p4          iOS16   ``constexpr_lut_to_dense`` with one 2/4/6/8-bit palette per tensor, or iOS18
                    when the allocation keeps 3-bit or grouped palettes (``Storage.target``)
w8a8        iOS17   activation ``quantize`` / ``dequantize`` ops
==========  ======  ==========================================================================

Weight compression touches only the ``weight`` inputs of conv and linear ops (named per op through
``op_name_configs``; coremltools 9 dropped ``op_selector``): biases, LayerNorm and layer-scale
vectors stay fp16 whatever their size. Which conv/linear layers stay float is the shared plan
(`converters.quant_plan`, recipe option ``float_layers``, torch module names): the torch-side
rounding skips them and the compression leaves them fp16. ``coreml-w8`` keeps the stem conv there
(4.6 k parameters, 9 KB): the mean/std normalization is folded into it and every block reads its
output, so it is the weight most sensitive to storage error (int8 stem alone: 29.6 dB logit SQNR;
all other 58 weights int8: 25.9 dB, measured before the GPTQ rounding).

``p4`` chooses each layer's storage by measurement (`converters.backends.coreml_bits`): 2/3/4/6-bit
palettes (per tensor, or per 16 output channels with ``lut_granularity`` ``"auto"``), int8 or fp16,
all rounded on the torch side, each measured alone end to end on held-out calibration images, then
allocated under ``budget_bytes`` (16,000,000 for the whole package at ConvNeXt-T size) and at most
``budget_bits_per_weight`` (4.5) bits per conv/linear weight. The stem is a candidate like any
other layer: its fp16 storage costs 9 KB, and the measurement decides. Palettes are stored as the
tensors' own fp16 values, int8 as the torch side's grid: nothing is re-rounded by coremltools.

``w8a8`` quantizes weights and activations on the torch side (coremltools' LinearQuantizer) with
int8 weights on ``[-127, 127]`` so the torch-side GPTQ rounding is stored as is. Activations are
symmetric 8-bit: the conv/linear inputs' and outputs' ranges are the ones chosen on the torch side
(`converters.prepare`), with the GELU outputs centred (`converters.centering`); without chosen ranges
the observer is chosen among coremltools' own on held-out calibration images (``activation_observer``
``"auto"``). ``activation_scope`` says whether the residual adds are quantized too; the plan's
float layers get no quantizer (``module_name_configs`` None).

Every recipe is a Vision/Xcode image classifier (input contract ``rgb-image``, output contract
``classifier``, `edge_convnext.contract`), because ``VNCoreMLModel`` refuses a model without an
image input and returns ``VNClassificationObservation`` only for a classifier:

* input ``image``: ``ct.ImageType`` RGB 224x224 with ``scale=1/255`` (one scale for all channels);
  the ImageNet mean/std stays folded into the stem conv. In an ML program the scale is an explicit
  ``mul`` after the input (float32, before an fp16 program's cast), which `_inspect` checks.
* outputs ``classLabel`` (string) and ``probabilities`` (``{label: probability}``) from
  ``ct.ClassifierConfig`` on the export model's softmax; the spec names them in
  ``predictedFeatureName`` / ``predictedProbabilitiesName``. The ``classify`` op coremltools
  appends takes the softmax output as it is (it adds no softmax of its own), and the labels are
  the 1000 unique class names (a dictionary keyed by a repeated name would lose classes).
* the softmax runs in float32 even in fp16 programs (``FP16ComputePrecision`` skips it: a cast to
  fp32 precedes it), so small probabilities do not underflow and the dictionary is float32. Its
  output is declared float32 too: otherwise iOS16+ fp16 programs cast it back to fp16 before
  ``classify`` (seen on w8, p4, w8a8), rounding every probability through fp16.

Labels and the manifest are also in ``user_defined_metadata`` (``edge_convnext.labels``,
``edge_convnext.manifest``, ``edge_convnext.recipe``), with Xcode's preview type
``imageClassifier``, author, license, version and feature descriptions.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.backends import coreml_bits as cb
from converters.backends import coreml_compress as cc
from converters.backends.fp16 import fp16_entry
from converters.calibrate import choose, measure
from converters.context import BuildContext, BuildResult
from converters.quant_plan import QuantPlan, quantizable_layers
from converters.weight_quant import collect_stats
from edge_convnext import __version__
from edge_convnext.contract import CROP, OUTPUT_CONTRACTS
from edge_convnext.manifest import NUM_CLASSES
from edge_convnext.runners.coreml import classifier_io


META_MANIFEST = "edge_convnext.manifest"
META_LABELS = "edge_convnext.labels"
META_RECIPE = "edge_convnext.recipe"
META_PREVIEW = "com.apple.coreml.model.preview.type"
INPUT_NAME, LABEL_NAME, PROBS_NAME = "image", "classLabel", "probabilities"
_SCALE = 1.0 / 255.0
# classify's dictionary as coremltools names it (predicted_feature_name + "_probs"), renamed after conversion.
_CONVERTED_PROBS = LABEL_NAME + "_probs"
_SOFTMAX_NAME = "softmax"  # the program's softmax output (an internal var: classify reads it)
_LOG_P = OUTPUT_CONTRACTS["probabilities"].log_scores  # ctx.model's probabilities -> log p for `compare`
# iOS target -> the macOS release of the same Core ML version (for the manifest's readers).
_MACOS = {"iOS15": "macOS12", "iOS16": "macOS13", "iOS17": "macOS14", "iOS18": "macOS15"}
_TARGETS = {"fp32": "iOS15", "fp16": "iOS15", "w8": "iOS16", "p4": "iOS16", "w8a8": "iOS17"}
# Weight treatment per role (see coreml_compress.weight_roles); None keeps fp16.
_INT8 = cb.Storage("int8")
P4_BUDGET_BYTES = 16_000_000  # coreml-p4 at ConvNeXt-T size
# coreml-p4's candidate storages per layer (coreml_bits.Storage.parse names); grouped palettes are
# added with lut_granularity "auto" or "per_grouped_channel". 2-bit palettes are left out: on the
# synthetic ConvNeXt-T (random:0, 16 held-out images) the allocation never chose one at 15.5-15.8 MB,
# and each candidate costs a rounding of every layer.
P4_STORAGES = ("lut3", "lut4", "lut6", "int8", "fp16")
P4_MARGIN_BYTES = 32_768  # slack between the estimated and the saved package size


def build(ctx: BuildContext, out: Path) -> BuildResult:
    """Write the ``.mlpackage`` for ``ctx.recipe`` at ``out`` and report how it was lowered."""
    import coremltools as ct

    recipe = ctx.recipe
    kind = recipe.precision
    if kind not in _TARGETS:
        raise ValueError(f"{recipe.name}: the Core ML backend has no precision {kind!r}; known: {sorted(_TARGETS)}")
    precision = str(recipe.options.get("compute_precision", "fp32" if kind == "fp32" else "fp16"))
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"{recipe.name}: compute_precision must be 'fp32' or 'fp16', got {precision!r}")
    labels = check_labels(ctx.labels, recipe.name)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    result = BuildResult.for_recipe(recipe, INPUT_NAME, PROBS_NAME)
    lowering: dict[str, Any] = {"converter": f"coremltools {ct.__version__}: torch.jit.trace -> mlprogram",
                                "compute_precision": precision}
    t0 = time.perf_counter()

    planned: tuple[list[cc.Weight], dict[str, cb.Storage]] | None = None  # checked in the saved package
    if kind == "w8a8":
        mlmodel, target = _build_w8a8(ctx, precision, lowering, result, labels)
    elif kind == "p4":
        mlmodel, target, planned = _build_p4(ctx, precision, lowering, labels)
    else:
        target = _TARGETS[kind]
        ctx.log(f"tracing and converting (mlprogram, {precision}, {target})")
        mlmodel = _convert(ctx.model, ctx.example_input, precision, target, labels)
        if kind == "w8":
            plan = _quant_plan(ctx)
            weights = cc.weight_roles(mlmodel, plan.layers)
            # int8 for every conv/linear weight but the plan's float layers (fp16), whose weights the
            # torch-side rounding skipped too (converters.build): one list of float layers for both.
            storage = {w.name: _INT8 for w in weights if w.layer is None or not plan.is_float(w.layer)}
            mlmodel = cc.compress_weights(mlmodel, weights, storage)
            planned = (weights, storage)
            lowering["weight_compression"] = {
                "method": "int8 linear symmetric per output channel (max|w| / 127), weights rounded on the torch "
                          "side first (lowering.weight_rounding) and stored as they are",
                "float_layers": [w.layer for w in weights if w.name not in storage],
                "roles": _roles(weights, storage),
                "untouched": "biases, LayerNorm and layer-scale vectors stay fp16"}

    mlmodel = _rename_probabilities(mlmodel)
    result.embedded = _describe(mlmodel, ctx)
    _save(mlmodel, out, ctx.workdir)
    lowering.update(_inspect(out, labels, planned))
    lowering["minimum_deployment_target"] = target
    lowering["minimum_macos"] = _MACOS[target]
    lowering["build_seconds"] = round(time.perf_counter() - t0, 1)
    lowering["package_bytes"] = cc.package_bytes(out)
    lowering["fp16"] = fp16_entry(recipe, out)
    result.lowering = lowering
    cap = int(recipe.options.get("budget_bytes", P4_BUDGET_BYTES))
    if kind == "p4" and lowering["package_bytes"] > cap:
        raise RuntimeError(
            f"{recipe.name}: the package is {lowering['package_bytes']} bytes, over its budget of {cap}: the "
            f"estimate of the rest of the package ({lowering['weight_compression']['budget']['rest_of_package_bytes']}"
            " bytes) was short; raise P4_MARGIN_BYTES in converters/backends/coreml.py")
    ctx.log(f"wrote {lowering['package_bytes'] / 1e6:.1f} MB, {target}, in {lowering['build_seconds']} s")
    return result


def check_labels(labels: list[str], recipe_name: str = "coreml") -> list[str]:
    """The class labels for ``ClassifierConfig``: 1000 unique one-line strings, else ValueError naming the repeats.

    The classifier's output is a dictionary keyed by label: a repeated label would silently merge
    two classes (ImageNet names "crane" twice; the build makes labels unique first).
    """
    labels = [str(s) for s in labels]
    if len(labels) != NUM_CLASSES or any("\n" in s or not s for s in labels):
        raise ValueError(f"{recipe_name}: need {NUM_CLASSES} non-empty one-line class labels, got {len(labels)}")
    repeats = sorted(k for k, n in Counter(labels).items() if n > 1)
    if repeats:
        where = {k: [i for i, s in enumerate(labels) if s == k] for k in repeats[:5]}
        raise ValueError(
            f"{recipe_name}: the Core ML classifier's {{label: probability}} dictionary needs unique labels, "
            f"but {len(repeats)} repeat: {where}{' ...' if len(repeats) > 5 else ''}. Make them unique "
            "(e.g. append the WordNet id) before building")
    return labels


def _convert(model: torch.nn.Module, example: torch.Tensor, precision: str, target: str, labels: list[str]) -> Any:
    """Trace and convert ``model`` (ending in a softmax) to a Vision image classifier ML program."""
    import coremltools as ct

    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
    return ct.convert(
        traced,
        convert_to="mlprogram",
        inputs=[ct.ImageType(name=INPUT_NAME, shape=(1, 3, CROP, CROP), scale=_SCALE, bias=[0.0, 0.0, 0.0],
                             color_layout=ct.colorlayout.RGB)],
        # The softmax output, declared float32: iOS16+ fp16 programs would otherwise round it to fp16
        # (a cast after the fp32 softmax) before classify reads it. classify takes it as it is (no
        # second softmax) and becomes the program's outputs.
        outputs=[ct.TensorType(name=_SOFTMAX_NAME, dtype=np.float32)],
        classifier_config=ct.ClassifierConfig(list(labels), predicted_feature_name=LABEL_NAME),
        # fp16 programs keep the softmax in float32 (a cast before it): no underflow to 0.
        compute_precision=(ct.precision.FLOAT32 if precision == "fp32" else
                           ct.transform.FP16ComputePrecision(op_selector=lambda op: op.op_type != "softmax")),
        minimum_deployment_target=getattr(ct.target, target),
    )


def _rename_probabilities(mlmodel: Any) -> Any:
    """coremltools names classify's dictionary ``classLabel_probs``; the contract calls it ``probabilities``."""
    import coremltools as ct

    spec = mlmodel.get_spec()
    if _CONVERTED_PROBS not in [f.name for f in spec.description.output]:
        raise RuntimeError(f"the converted classifier has no '{_CONVERTED_PROBS}' output: "
                           f"{[f.name for f in spec.description.output]}")
    ct.utils.rename_feature(spec, _CONVERTED_PROBS, PROBS_NAME)
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def _build_p4(ctx: BuildContext, precision: str, lowering: dict[str, Any],
              labels: list[str]) -> tuple[Any, str, tuple[list[cc.Weight], dict[str, cb.Storage]]]:
    """Mixed-precision weights under the byte budget (`coreml_bits.choose_storage`), stored exactly."""
    opts = ctx.recipe.options
    mode = str(opts.get("lut_granularity", "auto"))
    group = int(opts.get("lut_group_size", 16))
    if mode not in ("auto", "per_tensor", "per_grouped_channel"):
        raise ValueError(
            f"{ctx.recipe.name}: lut_granularity must be auto, per_tensor or per_grouped_channel, not {mode!r}")
    names = tuple(opts.get("storages", P4_STORAGES))
    base = [cb.Storage.parse(n, group) for n in names]
    luts = [s for s in base if s.kind == "lut"]
    grouped = [cb.Storage("lut", s.nbits, group) for s in luts]
    candidates = {"per_tensor": base, "per_grouped_channel": [s for s in base if s.kind != "lut"] + grouped,
                  "auto": base + grouped}[mode]
    model = ctx.model
    plan = _quant_plan(ctx)
    layers = quantizable_layers(model)

    # What the weights may take: the budget minus everything else the package holds (program,
    # biases, LayerNorm vectors, labels, metadata), read off the fp16 program of the same model.
    ctx.log("tracing and converting the float model (mlprogram, fp16) to size the rest of the package")
    t = time.perf_counter()
    fp16 = _convert(model, ctx.example_input, precision, "iOS16", labels)
    fp16_path = ctx.workdir / "p4-fp16.mlpackage"
    fp16.save(str(fp16_path))
    dense = sum(cb.Storage("fp16").nbytes(w.shape) for w in cc.weight_roles(fp16, [n for n, _ in layers]))
    rest = cc.package_bytes(fp16_path) - dense + _metadata_bytes(ctx, labels) + P4_MARGIN_BYTES
    shutil.rmtree(fp16_path, ignore_errors=True)
    params = sum(m.weight.numel() for _, m in layers)
    cap_bytes = int(opts.get("budget_bytes", P4_BUDGET_BYTES))
    bits = float(opts.get("budget_bits_per_weight", 4.5))
    budget = min(cap_bytes - rest, int(bits * params / 8))

    stats_n = int(opts.get("statistics_images", 16))
    data = ctx.choice_split(int(opts.get("held_out_images", 32)))
    stats_images, stats_ids = data.fit[:stats_n], data.fit_ids[:stats_n]
    held, held_ids = np.concatenate(data.held).astype(np.float32), data.held_ids
    ctx.log(f"layer statistics on {len(stats_images)} calibration images; choices measured on {len(held_ids)} "
            f"held-out calibration images; {budget / 1e6:.2f} MB for the weights")
    stats = collect_stats(model, [(n, m) for n, m in layers if not plan.is_float(n)], stats_images,
                          f"{ctx.recipe.name}'s per-layer storage choice")
    choice = cb.choose_storage(model, layers, candidates, plan.float_layers, stats, torch.from_numpy(held), budget,
                               float(opts.get("lut_min_gain_db", 0.5)), ctx.log)
    del stats
    seconds = round(time.perf_counter() - t, 1)
    target = max((s.target for s in choice.storage.values()), key=lambda t: int(t[3:]))

    ctx.log(f"converting the rounded model (mlprogram, {precision}, {target}) and storing it")
    rounded = _convert(choice.model, ctx.example_input, precision, target, labels)
    weights = cc.weight_roles(rounded, [n for n, _ in layers])
    by_const = {w.name: choice.storage[w.layer] for w in weights if w.layer is not None}
    mlmodel = cc.compress_weights(rounded, weights, by_const)
    # What the package stores, swapped back into the float torch model, on the same held-out images:
    # equal to the measured allocation up to fp16 biases, unless something was re-rounded on the way.
    stored_path = ctx.workdir / "p4-stored.mlpackage"
    mlmodel.save(str(stored_path))
    with torch.no_grad():
        ref = _LOG_P(model(torch.from_numpy(held)).numpy())
    stored = cc.weight_fidelity(model, _read_back(stored_path)[1], torch.from_numpy(held), ref)
    shutil.rmtree(stored_path, ignore_errors=True)
    lowering["weight_compression"] = {
        "method": "per-layer storage chosen by measurement under a byte budget (converters.backends.coreml_bits): "
                  "candidates rounded on the torch side (palettes: weighted k-means + GPTQ assignment; int8: "
                  "GPTQ on the min/max grid; bias correction for both), each measured alone end to end on "
                  "held-out calibration images, then a knapsack over bytes; stored exactly (palettes as the "
                  "tensors' own fp16 values, coreml_compress.exact_palette)",
        "candidates": [s.name for s in candidates],
        "lut_granularity": mode,
        "lut_group_size": group,
        "budget": {"package_bytes": cap_bytes, "bits_per_weight": bits, "rest_of_package_bytes": rest,
                   "weight_parameters": params},
        "statistics_image_ids": stats_ids,
        "held_out_image_ids": held_ids,
        "measured_on": "centered log-probabilities of the float torch model with the candidate weights vs the "
                       "float model (fp32 compute), on the held-out calibration images",
        "seconds": seconds,
        **choice.report,
        "stored_weights_sqnr_db": round(stored.sqnr_db, 2),
        "stored_weights_top1_agreement": round(stored.top1_agreement, 4),
        "roles": _roles(weights, by_const),
    }
    return mlmodel, target, (weights, by_const)


def _quant_plan(ctx: BuildContext) -> QuantPlan:
    """The build's float-layer plan; without one (a context made by hand), the recipe's ``float_layers``."""
    return ctx.plan or QuantPlan.for_model(ctx.model, ctx.recipe.options.get("float_layers", ()))


def _metadata_bytes(ctx: BuildContext, labels: list[str]) -> int:
    """What `_describe` adds to the package: the manifest and labels in the metadata, plus descriptions."""
    manifest = json.dumps(ctx.embedded_manifest, sort_keys=True, default=str)
    return len(manifest.encode()) + len("\n".join(labels).encode()) + 4096


def _roles(weights: list[cc.Weight], storage: dict[str, cb.Storage]) -> dict[str, dict[str, Any]]:
    """Role -> storage name -> {tensors, parameters}: the manifest's summary by structure."""
    out: dict[str, dict[str, Any]] = {}
    for w in weights:
        st = storage.get(w.name)
        r = out.setdefault(w.role, {}).setdefault("fp16" if st is None else st.name, {"tensors": 0, "parameters": 0})
        r["tensors"] += 1
        r["parameters"] += w.size
    return out


def _build_w8a8(ctx: BuildContext, precision: str, lowering: dict[str, Any],
                result: BuildResult, labels: list[str]) -> tuple[Any, str]:
    """Torch-side W8A8 (`coreml_compress.quantize_w8a8`), the observer chosen on held-out images."""
    target = _TARGETS["w8a8"]
    opts = ctx.recipe.options
    plan = _quant_plan(ctx)
    scope = str(opts.get("activation_scope", "all"))
    wanted = str(opts.get("activation_observer", "auto"))
    # With ranges chosen on the torch side, the observers set nothing the program keeps (measured at full size:
    # all three 31.8 dB on the held-out images), so there is nothing to choose.
    if wanted == "auto":
        observers = ("min_max",) if ctx.activation_ranges else cc.W8A8_OBSERVERS
    else:
        observers = (wanted,)
    # Held-out images: none of those that set the observers' ranges or the weight rounding's statistics
    # (both the first images of the set).
    data = ctx.choice_split(int(opts.get("held_out_images", 32)))
    held_ids = data.held_ids
    # The calibration pass comes last: the stream records the ids of its latest pass, which the manifest
    # lists as the calibration set. They are the first statistics images of the split, never held-out ones.
    calibration = list(ctx.calibration_images(ctx.calibration_count))
    used = list(getattr(ctx.calibration_images, "used_ids", data.fit_ids[:len(calibration)]))
    if not set(used) <= set(data.fit_ids):
        raise RuntimeError(f"{ctx.recipe.name}: calibration images {sorted(set(used) - set(data.fit_ids))} are "
                           "held out for choices; the build must calibrate on the statistics images only")

    built: dict[str, cc.W8A8Model] = {}

    def trial(observer: str, float_layers: tuple[str, ...]) -> Callable[[], Callable[[torch.Tensor], torch.Tensor]]:
        def make() -> Callable[[torch.Tensor], torch.Tensor]:
            ctx.log(f"W8A8: {observer} observers over {len(calibration)} calibration images")
            q = cc.quantize_w8a8(ctx.model, ctx.example_input, calibration, float_layers, observer, scope,
                                 ranges=ctx.activation_ranges)
            if float_layers == plan.float_layers:
                built[observer] = q
            return q.model
        return make

    choice = choose({obs: trial(obs, plan.float_layers) for obs in observers}, data, ctx.log)
    measured = choice.to_dict()["candidates"]
    best = built[choice.chosen]
    result.calibration_used = best.images
    float_effect = None
    if plan.float_layers:  # what keeping them float buys, on the same images
        f = measure(trial(best.observer, ())(), data)
        without = {"sqnr_db": round(f.sqnr_db, 2), "top1_agreement": round(f.top1_agreement, 4)}
        float_effect = {"without_float_layers": without,
                        "gain_db": round(measured[best.observer]["sqnr_db"] - without["sqnr_db"], 2),
                        "note": "without them, those layers' float weights are quantized by the tool (min/max)"}
    ctx.log(f"W8A8 torch-side: {best.observer} {measured[best.observer]['sqnr_db']} dB on held-out images; "
            f"converting ({target})")
    mlmodel = _convert(best.model, ctx.example_input, precision, target, labels)
    lowering["activation_quantization"] = {
        "method": "post-training: coremltools.optimize.torch LinearQuantizer (FX), observers over calibration "
                  "images with fake quantization off, no training; finalize -> quantize/dequantize ops",
        "weights": "int8 symmetric per output channel on [-127, 127] (scale max|w| / 127: the torch-side "
                   "rounding's grid, stored as it is; constexpr_affine_dequantize)",
        "activations": "8-bit symmetric per tensor on every op coremltools' backend config covers (conv/linear inputs "
                       "and outputs, GELU" + (", residual adds)" if scope == "all" else "; residual adds stay float)"),
        "ranges": ("the conv/linear inputs' and outputs' ranges chosen on the torch side (lowering.activation_ranges), "
                   "the observers' elsewhere" if ctx.activation_ranges else "the observers'"),
        "scope": scope,
        "observer": {"chosen": best.observer, "candidates": measured,
                     "rule": "highest SQNR of centered log-probabilities on the held-out calibration images"},
        "float_layers": list(best.float_layers),
        "float_layers_effect": float_effect,
        "calibration_images": best.images,
        "held_out_image_ids": held_ids,
        "torch_side_fidelity": {"images": len(held_ids), "split": "calibration (held out: not the observers' images)",
                                **measured[best.observer]},
    }
    return mlmodel, target


INPUT_DESCRIPTION = (
    "RGB image, 224x224 (a CVPixelBuffer or CGImage; Vision scales it). With Vision set "
    "imageCropAndScaleOption = .centerCrop (scales the short side to 224 and crops the center); to match the "
    "reference preprocessing (resize the short side to 256, center-crop 224) also set regionOfInterest to the "
    "centered square of side 224/256 of the short side. The model scales pixels by 1/255 and applies the "
    "ImageNet mean/std itself: do NOT normalize the image")
LABEL_DESCRIPTION = f"Most likely class: one of the {NUM_CLASSES} unique labels (the top entry of 'probabilities')"
PROBS_DESCRIPTION = (f"{{label: probability}} over the {NUM_CLASSES} unique labels; softmax inside the model, "
                     "float32, sums to 1")


def _license(weights: dict[str, Any]) -> str:
    if weights.get("synthetic"):
        return ("Apache-2.0 (model code); weights: synthetic (randomly initialized by edge-convnext, not trained), "
                "no separate license")
    source = f" ({weights['source']})" if weights.get("source") else ""
    return f"Apache-2.0 (model code); weights: license unknown here, see their source{source}"


def _describe(mlmodel: Any, ctx: BuildContext) -> dict[str, str]:
    """Embed the manifest, the labels and the human-readable descriptions; say what went where."""
    labels = check_labels(ctx.labels, ctx.recipe.name)
    weights = ctx.embedded_manifest.get("weights") or {}
    synthetic = " SYNTHETIC weights (not ImageNet-trained)." if weights.get("synthetic") else ""
    source = f" Weights: {weights['source']}." if weights.get("source") else ""
    mlmodel.short_description = (f"ConvNeXt image classifier, {ctx.recipe.name}: {ctx.recipe.description}."
                                 f"{source}{synthetic}")
    mlmodel.author = "edge-convnext"
    mlmodel.license = _license(weights)
    mlmodel.version = __version__
    mlmodel.input_description[INPUT_NAME] = INPUT_DESCRIPTION
    mlmodel.output_description[LABEL_NAME] = LABEL_DESCRIPTION
    mlmodel.output_description[PROBS_NAME] = PROBS_DESCRIPTION
    meta = mlmodel.user_defined_metadata
    meta[META_PREVIEW] = "imageClassifier"
    meta[META_MANIFEST] = json.dumps(ctx.embedded_manifest, sort_keys=True, default=str)
    meta[META_LABELS] = "\n".join(labels)
    meta[META_RECIPE] = ctx.recipe.name
    return {
        "manifest": f"user_defined_metadata['{META_MANIFEST}'] (JSON build facts)",
        "labels": f"the classifier's class labels (outputs '{LABEL_NAME}', '{PROBS_NAME}') and "
                  f"user_defined_metadata['{META_LABELS}'] ({NUM_CLASSES} unique labels, newline-joined, "
                  "line i = class i)",
        "recipe": f"user_defined_metadata['{META_RECIPE}']",
        "preview": f"user_defined_metadata['{META_PREVIEW}'] = 'imageClassifier' (Xcode's preview)",
        "descriptions": f"short_description, author, license, version; input '{INPUT_NAME}' and outputs "
                        f"'{LABEL_NAME}', '{PROBS_NAME}' feature descriptions",
    }


def _save(mlmodel: Any, out: Path, workdir: Path) -> None:
    # MLModel.save insists on the .mlpackage extension; stage elsewhere when ``out`` lacks it.
    out = Path(out)
    if out.suffix == ".mlpackage":
        mlmodel.save(str(out))
        return
    staged = workdir / "model.mlpackage"
    mlmodel.save(str(staged))
    shutil.move(str(staged), str(out))


def _read_back(path: Path) -> tuple[Any, Any]:
    """(spec, MIL program) of a saved package, without compiling or loading it."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    m = ct.models.MLModel(str(path), skip_model_load=True)
    spec = m.get_spec()
    return spec, load_milproto(spec, specification_version=spec.specificationVersion, file_weights_dir=m.weights_dir)


def op_histogram(prog: Any) -> dict[str, int]:
    """Op type -> count in the program's main function (const and constexpr ops included)."""
    counts = Counter(op.op_type for op in prog.functions["main"].operations)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _inspect(path: Path, labels: list[str],
             planned: tuple[list[cc.Weight], dict[str, cb.Storage]] | None = None) -> dict[str, Any]:
    """Read the saved package back: check the classifier contract and the planned weight storage,
    count ops, describe weight storage."""
    spec, prog = _read_back(path)
    if planned is not None:
        cc.check_storage(path, prog, *planned)
    io = {"inputs": [_feature(f) for f in spec.description.input],
          "outputs": [_feature(f) for f in spec.description.output]}
    cio = classifier_io(path, spec)  # image RGB 224x224, classifier outputs, 1000 unique labels
    if (cio.input_name, cio.label_name, cio.probabilities_name) != (INPUT_NAME, LABEL_NAME, PROBS_NAME):
        raise RuntimeError(f"{path}: converted features {io} are not '{INPUT_NAME}' -> '{LABEL_NAME}', '{PROBS_NAME}'")
    if list(cio.labels) != list(labels):
        raise RuntimeError(f"{path}: the classifier's labels are not the build's {NUM_CLASSES} labels in order")
    func = prog.functions["main"]
    preprocessing = _image_preprocessing(path, func)
    softmax = _softmax_dtype(path, func)
    hist = op_histogram(prog)
    compute = {k: v for k, v in hist.items() if k != "const" and not k.startswith("constexpr_")}
    return {
        "specification_version": int(spec.specificationVersion),
        "op_histogram": hist,
        "compute_ops": sum(compute.values()),
        "weight_storage": cc.storage_summary(prog),
        "io": io,
        "image_preprocessing": preprocessing,
        "softmax_dtype": softmax,
    }


def _image_preprocessing(path: Path, func: Any) -> str:
    """The ImageType scale as the program applies it: the image's only reader is ``mul`` by 1/255."""
    from coremltools.converters.mil.mil import types

    readers = [op for op in func.operations if any(
        v is func.inputs[INPUT_NAME] for vals in op.inputs.values()
        for v in (vals if isinstance(vals, (list, tuple)) else (vals,)))]
    ok = len(readers) == 1 and readers[0].op_type == "mul"
    if ok:
        mul = readers[0]
        other = mul.inputs["y"] if mul.inputs["x"] is func.inputs[INPUT_NAME] else mul.inputs["x"]
        ok = other.val is not None and np.allclose(np.asarray(other.val, dtype=np.float64), _SCALE, rtol=1e-6)
        # A nonzero bias would follow as an add; bias [0, 0, 0] writes none. The scaling is float32
        # (an fp16 program casts after it).
        ok = ok and not any(c.op_type == "add" for c in mul.outputs[0].child_ops)
        ok = ok and types.builtin_to_string(mul.outputs[0].dtype) == "fp32"
    if not ok:
        found = [(op.op_type, op.name) for op in readers]
        raise RuntimeError(f"{path}: the image input must be scaled by one mul by 1/255 and nothing else; "
                           f"its readers are {found}")
    return "image * (1/255) in the program (ImageType scale, bias 0), float32"


def _softmax_dtype(path: Path, func: Any) -> str:
    """The dtype the final softmax computes in: must be fp32 (the classify op reads it directly)."""
    from coremltools.converters.mil.mil import types

    (classify,) = [op for op in func.operations if op.op_type == "classify"]
    producer = classify.inputs["probabilities"].op
    if producer is None or producer.op_type != "softmax":
        raise RuntimeError(f"{path}: classify must read the softmax output directly, it reads "
                           f"{getattr(producer, 'op_type', None)!r} (a cast there rounds the probabilities "
                           "through fp16)")
    dtypes = {types.builtin_to_string(producer.inputs["x"].dtype), types.builtin_to_string(producer.outputs[0].dtype)}
    if dtypes != {"fp32"}:
        raise RuntimeError(f"{path}: the softmax computes in {sorted(dtypes)}, not fp32")
    return "fp32"


def _feature(f: Any) -> dict[str, Any]:
    kind = f.type.WhichOneof("Type")
    if kind == "imageType":
        img = f.type.imageType
        return {"name": f.name, "type": "image", "color_space": type(img).ColorSpace.Name(img.colorSpace),
                "width": int(img.width), "height": int(img.height)}
    if kind == "multiArrayType":
        arr = f.type.multiArrayType
        return {"name": f.name, "shape": [int(d) for d in arr.shape],
                "dtype": type(arr).ArrayDataType.Name(arr.dataType)}
    if kind == "dictionaryType":
        return {"name": f.name, "type": "dictionary", "key": f.type.dictionaryType.WhichOneof("KeyType")}
    return {"name": f.name, "type": kind}
