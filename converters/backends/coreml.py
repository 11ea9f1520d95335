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
p4          iOS16   ``constexpr_lut_to_dense`` with one LUT per tensor, or iOS18 when grouped
                    LUTs (one table per 16 output channels) are chosen (``per_grouped_channel``)
w8a8        iOS17   activation ``quantize`` / ``dequantize`` ops
==========  ======  ==========================================================================

Weight compression touches only the ``weight`` inputs of conv and linear ops (named per op through
``op_name_configs``; coremltools 9 dropped ``op_selector``): biases, LayerNorm and layer-scale
vectors stay fp16 whatever their size. The stem conv stays fp16 too (4.6 k parameters, 9 KB): the
mean/std normalization is folded into it and every block reads its output, so it is the weight most
sensitive to storage error (int8 stem alone: 29.6 dB logit SQNR; all other 58 weights int8: 25.9 dB).

``p4`` stores the pointwise linears (25.9 M of 28.6 M parameters) as 4-bit k-means LUTs and the
depthwise convs, downsampling convs and classifier as int8: 15.9 MB at ConvNeXt-T size (budget
16 MB). Measured on synthetic ConvNeXt-T, that layout keeps 7.8 dB of logit SQNR where 4-bit
everywhere keeps 2.0 dB, for +1.4 MB. The LUT granularity is measured, not assumed (option
``lut_granularity``, default ``"auto"``): per-tensor and grouped LUTs (``lut_group_size``, 16) are
both built and compared on a few calibration images; grouped tables are kept only when they gain at
least ``lut_min_gain_db`` (0.5 dB) of logit SQNR, since they cost iOS18 and minutes of k-means.

``w8a8`` quantizes every conv/linear (weights and activations); option ``float_modules`` (torch
module names, default none) leaves chosen modules in float, e.g. ``["embeddings.patch_embeddings"]``
for the stem (measured on synthetic ConvNeXt-T: +0.9 dB SQNR, no better top-1, so not the default).

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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.backends import coreml_compress as cc
from converters.backends.fp16 import fp16_entry
from converters.context import BuildContext, BuildResult
from edge_convnext import __version__
from edge_convnext.contract import CROP, OUTPUT_CONTRACTS
from edge_convnext.manifest import NUM_CLASSES
from edge_convnext.metrics import compare
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
_W8_TREATMENT = {"stem": None, "depthwise": "int8", "downsample": "int8", "pointwise": "int8", "classifier": "int8"}
_P4_TREATMENT = {"stem": None, "depthwise": "int8", "downsample": "int8", "pointwise": "lut4", "classifier": "int8"}
_FIDELITY_IMAGES = 8  # calibration images for build-time torch-side checks (p4 choice, w8a8 report)
P4_BUDGET_BYTES = 16_000_000  # coreml-p4 at ConvNeXt-T size


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

    if kind == "w8a8":
        mlmodel, target = _build_w8a8(ctx, precision, lowering, result, labels)
    else:
        target = _TARGETS[kind]
        ctx.log(f"tracing and converting (mlprogram, {precision}, {target})")
        mlmodel = _convert(ctx.model, ctx.example_input, precision, target, labels)
        if kind == "w8":
            weights = cc.weight_roles(mlmodel)
            mlmodel = cc.compress_weights(mlmodel, weights, _W8_TREATMENT)
            lowering["weight_compression"] = _plan(weights, _W8_TREATMENT)
        elif kind == "p4":
            mlmodel, target = _build_p4(ctx, mlmodel, precision, lowering, labels)

    mlmodel = _rename_probabilities(mlmodel)
    result.embedded = _describe(mlmodel, ctx)
    _save(mlmodel, out, ctx.workdir)
    lowering.update(_inspect(out, labels))
    lowering["minimum_deployment_target"] = target
    lowering["minimum_macos"] = _MACOS[target]
    lowering["build_seconds"] = round(time.perf_counter() - t0, 1)
    lowering["package_bytes"] = cc.package_bytes(out)
    lowering["fp16"] = fp16_entry(recipe, out)
    result.lowering = lowering
    if kind == "p4" and lowering["package_bytes"] > P4_BUDGET_BYTES:
        result.notes.append(f"coreml-p4 is {lowering['package_bytes'] / 1e6:.1f} MB, over the "
                            f"{P4_BUDGET_BYTES / 1e6:.0f} MB budget set for ConvNeXt-T")
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


def _plan(weights: list[cc.Weight], treatment: dict[str, str | None], group_size: int | None = None) -> dict[str, Any]:
    """What happened to each role's weights, as the manifest shows it."""
    names = {None: "fp16 (uncompressed)", "int8": "int8 linear symmetric, per output channel",
             "lut4": "4-bit k-means LUT, one table per tensor",
             "lut4-g": f"4-bit k-means LUT, one table per {group_size} output channels"}
    by_role: dict[str, dict[str, Any]] = {}
    for w in weights:
        r = by_role.setdefault(w.role, {"storage": names[treatment.get(w.role)], "tensors": 0, "parameters": 0})
        r["tensors"] += 1
        r["parameters"] += w.size
    return {"roles": by_role, "untouched": "biases, LayerNorm and layer-scale vectors stay fp16"}


def _build_p4(ctx: BuildContext, fp16: Any, precision: str, lowering: dict[str, Any],
              labels: list[str]) -> tuple[Any, str]:
    """Palettize; with ``lut_granularity="auto"`` build both LUT layouts and keep the better one."""
    opts = ctx.recipe.options
    mode = str(opts.get("lut_granularity", "auto"))
    group = int(opts.get("lut_group_size", 16))
    min_gain = float(opts.get("lut_min_gain_db", 0.5))
    if mode not in ("auto", "per_tensor", "per_grouped_channel"):
        raise ValueError(
            f"{ctx.recipe.name}: lut_granularity must be auto, per_tensor or per_grouped_channel, not {mode!r}")
    grouped = {**_P4_TREATMENT, "pointwise": "lut4-g"}
    candidates: dict[str, tuple[dict[str, str | None], str]] = {}
    if mode in ("auto", "per_tensor"):
        candidates["per_tensor"] = (_P4_TREATMENT, "iOS16")
    if mode in ("auto", "per_grouped_channel"):
        # Grouped LUTs are an iOS18 op: the program itself must be converted for iOS18.
        candidates["per_grouped_channel"] = (grouped, "iOS18")
    built: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name, (treatment, target) in candidates.items():
        t = time.perf_counter()
        ctx.log(f"palettizing, {name} LUTs ({target})")
        base = fp16 if target == "iOS16" else _convert(ctx.model, ctx.example_input, precision, target, labels)
        weights = cc.weight_roles(base)
        built[name] = cc.compress_weights(base, weights, treatment, group_size=group)
        seconds[name] = round(time.perf_counter() - t, 1)
    choice = next(iter(candidates))
    report: dict[str, Any] = {"mode": mode}
    if len(candidates) > 1:
        images, ref = _fidelity_images(ctx)
        for name in candidates:
            path = ctx.workdir / f"p4-{name}.mlpackage"
            built[name].save(str(path))
            fid = cc.weight_fidelity(ctx.model, _read_back(path)[1], images, ref)
            report[name] = {"sqnr_db": round(fid.sqnr_db, 2), "top1_agreement": fid.top1_agreement,
                            "kl": round(fid.kl, 4), "bytes": cc.package_bytes(path),
                            "seconds": seconds[name]}
        gain = report["per_grouped_channel"]["sqnr_db"] - report["per_tensor"]["sqnr_db"]
        choice = "per_grouped_channel" if gain >= min_gain else "per_tensor"
        report["measured_on"] = (f"{len(images)} calibration images; float torch model with the package's "
                                 "stored weights vs the float model, on centered log-probabilities "
                                 "(weight error only, fp32 compute)")
        report["rule"] = f"grouped LUTs (iOS18) only when they gain >= {min_gain} dB SQNR over per-tensor (iOS16)"
        ctx.log(f"LUT granularity: per-tensor {report['per_tensor']['sqnr_db']} dB, grouped "
                f"{report['per_grouped_channel']['sqnr_db']} dB -> {choice}")
    report["chosen"] = choice
    treatment, target = candidates[choice]
    lowering["weight_compression"] = _plan(weights, treatment, group) | {"lut_granularity": report}
    return built[choice], target


def _build_w8a8(ctx: BuildContext, precision: str, lowering: dict[str, Any],
                result: BuildResult, labels: list[str]) -> tuple[Any, str]:
    target = _TARGETS["w8a8"]
    float_modules = tuple(ctx.recipe.options.get("float_modules", ()))
    # Read the check images first: the calibration stream records the ids of its latest pass, which
    # the manifest lists as the calibration set, so the calibration pass must be the last one.
    images, ref = _fidelity_images(ctx)
    ctx.log(f"W8A8: calibrating activation observers on {ctx.calibration_count} calibration images")
    q = cc.quantize_w8a8(ctx.model, ctx.example_input, ctx.calibration_images(ctx.calibration_count), float_modules)
    result.calibration_used = q.images
    with torch.no_grad():
        fid = compare(ref, _LOG_P(q.model(images).numpy()))
    ctx.log(f"W8A8 torch-side: {fid.sqnr_db:.1f} dB SQNR on {len(images)} calibration images; converting ({target})")
    mlmodel = _convert(q.model, ctx.example_input, precision, target, labels)
    lowering["activation_quantization"] = {
        "method": "post-training: coremltools.optimize.torch LinearQuantizer (FX), min/max observers over "
                  "calibration images, no training; finalize -> quantize/dequantize ops",
        "weights": "int8 symmetric, per output channel (constexpr_affine_dequantize)",
        "activations": "int8 symmetric, per tensor, on every conv/linear input and output",
        "float_modules": list(q.float_modules),
        "calibration_images": q.images,
        "torch_side_fidelity": {"images": len(images), "split": "calibration (in-sample)",
                                "sqnr_db": round(fid.sqnr_db, 2), "top1_agreement": fid.top1_agreement},
    }
    return mlmodel, target


def _fidelity_images(ctx: BuildContext) -> tuple[torch.Tensor, np.ndarray]:
    """A few calibration images and the float model's log-probabilities on them (what `compare` reads)."""
    n = min(_FIDELITY_IMAGES, max(ctx.calibration_count, 1))
    images = torch.from_numpy(np.concatenate(list(ctx.calibration_images(n))).astype(np.float32))
    with torch.no_grad():
        return images, _LOG_P(ctx.float_reference.eval()(images).numpy())


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


def _inspect(path: Path, labels: list[str]) -> dict[str, Any]:
    """Read the saved package back: check the classifier contract, count ops, describe weight storage."""
    spec, prog = _read_back(path)
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
