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

Labels and the manifest go into ``user_defined_metadata`` (``edge_convnext.labels``,
``edge_convnext.manifest``), not into a ``ClassifierConfig``: a classifier model's output becomes a
``{label: probability}`` dictionary plus a ``classLabel`` string, which breaks the contract every
artifact shares (one float32 ``[1, 1000]`` "logits" array) and the runners and emulator built on it.
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
from converters.context import BuildContext, BuildResult
from edge_convnext import __version__
from edge_convnext.manifest import INPUT_SHAPE, NUM_CLASSES, standard_input, standard_output
from edge_convnext.metrics import compare


META_MANIFEST = "edge_convnext.manifest"
META_LABELS = "edge_convnext.labels"
META_RECIPE = "edge_convnext.recipe"
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
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    result = BuildResult()
    lowering: dict[str, Any] = {"converter": f"coremltools {ct.__version__}: torch.jit.trace -> mlprogram",
                                "compute_precision": precision}
    t0 = time.perf_counter()

    if kind == "w8a8":
        mlmodel, target = _build_w8a8(ctx, precision, lowering, result)
    else:
        target = _TARGETS[kind]
        ctx.log(f"tracing and converting (mlprogram, {precision}, {target})")
        mlmodel = _convert(ctx.model, ctx.example_input, precision, target)
        if kind == "w8":
            weights = cc.weight_roles(mlmodel)
            mlmodel = cc.compress_weights(mlmodel, weights, _W8_TREATMENT)
            lowering["weight_compression"] = _plan(weights, _W8_TREATMENT)
        elif kind == "p4":
            mlmodel, target = _build_p4(ctx, mlmodel, precision, lowering)

    result.embedded = _describe(mlmodel, ctx)
    _save(mlmodel, out, ctx.workdir)
    lowering.update(_inspect(out))
    lowering["minimum_deployment_target"] = target
    lowering["minimum_macos"] = _MACOS[target]
    lowering["build_seconds"] = round(time.perf_counter() - t0, 1)
    lowering["package_bytes"] = cc.package_bytes(out)
    result.lowering = lowering
    if kind == "p4" and lowering["package_bytes"] > P4_BUDGET_BYTES:
        result.notes.append(f"coreml-p4 is {lowering['package_bytes'] / 1e6:.1f} MB, over the "
                            f"{P4_BUDGET_BYTES / 1e6:.0f} MB budget set for ConvNeXt-T")
    ctx.log(f"wrote {lowering['package_bytes'] / 1e6:.1f} MB, {target}, in {lowering['build_seconds']} s")
    return result


def _convert(model: torch.nn.Module, example: torch.Tensor, precision: str, target: str) -> Any:
    import coremltools as ct

    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example, check_trace=False)
    return ct.convert(
        traced,
        convert_to="mlprogram",
        inputs=[ct.TensorType(name=standard_input().name, shape=INPUT_SHAPE, dtype=np.float32)],
        # iOS16+ fp16 programs default to fp16 outputs; the contract is float32 logits.
        outputs=[ct.TensorType(name=standard_output().name, dtype=np.float32)],
        compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        minimum_deployment_target=getattr(ct.target, target),
    )


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


def _build_p4(ctx: BuildContext, fp16: Any, precision: str, lowering: dict[str, Any]) -> tuple[Any, str]:
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
        base = fp16 if target == "iOS16" else _convert(ctx.model, ctx.example_input, precision, target)
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
                                 "stored weights vs float logits (weight error only, fp32 compute)")
        report["rule"] = f"grouped LUTs (iOS18) only when they gain >= {min_gain} dB SQNR over per-tensor (iOS16)"
        ctx.log(f"LUT granularity: per-tensor {report['per_tensor']['sqnr_db']} dB, grouped "
                f"{report['per_grouped_channel']['sqnr_db']} dB -> {choice}")
    report["chosen"] = choice
    treatment, target = candidates[choice]
    lowering["weight_compression"] = _plan(weights, treatment, group) | {"lut_granularity": report}
    return built[choice], target


def _build_w8a8(ctx: BuildContext, precision: str, lowering: dict[str, Any],
                result: BuildResult) -> tuple[Any, str]:
    target = _TARGETS["w8a8"]
    float_modules = tuple(ctx.recipe.options.get("float_modules", ()))
    # Read the check images first: the calibration stream records the ids of its latest pass, which
    # the manifest lists as the calibration set, so the calibration pass must be the last one.
    images, ref = _fidelity_images(ctx)
    ctx.log(f"W8A8: calibrating activation observers on {ctx.calibration_count} calibration images")
    q = cc.quantize_w8a8(ctx.model, ctx.example_input, ctx.calibration_images(ctx.calibration_count), float_modules)
    result.calibration_used = q.images
    with torch.no_grad():
        fid = compare(ref, q.model(images).numpy())
    ctx.log(f"W8A8 torch-side: {fid.sqnr_db:.1f} dB SQNR on {len(images)} calibration images; converting ({target})")
    mlmodel = _convert(q.model, ctx.example_input, precision, target)
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
    n = min(_FIDELITY_IMAGES, max(ctx.calibration_count, 1))
    images = torch.from_numpy(np.concatenate(list(ctx.calibration_images(n))).astype(np.float32))
    with torch.no_grad():
        return images, ctx.model.eval()(images).numpy()


def _describe(mlmodel: Any, ctx: BuildContext) -> dict[str, str]:
    """Embed the manifest, the labels and the human-readable descriptions; say what went where."""
    labels = list(ctx.labels)
    if len(labels) != NUM_CLASSES or any("\n" in s for s in labels):
        raise ValueError(f"{ctx.recipe.name}: need {NUM_CLASSES} one-line class names, got {len(labels)}")
    weights = ctx.embedded_manifest.get("weights") or {}
    synthetic = " SYNTHETIC weights (not ImageNet-trained)." if weights.get("synthetic") else ""
    source = f" Weights: {weights['source']}." if weights.get("source") else ""
    mlmodel.short_description = (f"ConvNeXt image classifier, {ctx.recipe.name}: {ctx.recipe.description}."
                                 f"{source}{synthetic}")
    mlmodel.author = "edge-convnext"
    mlmodel.version = __version__
    mlmodel.input_description[standard_input().name] = (
        "RGB image, float32 NCHW [1, 3, 224, 224], values in [0, 1], resized and center-cropped by the "
        "manifest's preprocessing; mean/std normalization happens inside the model")
    mlmodel.output_description[standard_output().name] = (
        f"float32 [1, {NUM_CLASSES}] unnormalized class logits; index i is line i of "
        f"metadata '{META_LABELS}' (apply softmax for probabilities)")
    meta = mlmodel.user_defined_metadata
    meta[META_MANIFEST] = json.dumps(ctx.embedded_manifest, sort_keys=True, default=str)
    meta[META_LABELS] = "\n".join(labels)
    meta[META_RECIPE] = ctx.recipe.name
    return {
        "manifest": f"user_defined_metadata['{META_MANIFEST}'] (JSON build facts)",
        "labels": f"user_defined_metadata['{META_LABELS}'] "
                  f"({NUM_CLASSES} class names, newline-joined, line i = logit i)",
        "recipe": f"user_defined_metadata['{META_RECIPE}']",
        "descriptions": "short_description, author, version; input 'image' and output 'logits' feature descriptions",
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


def _inspect(path: Path) -> dict[str, Any]:
    """Read the saved package back: check the I/O contract, count ops, describe weight storage."""
    spec, prog = _read_back(path)
    io = {"inputs": [_feature(f) for f in spec.description.input],
          "outputs": [_feature(f) for f in spec.description.output]}
    want_in = {"name": standard_input().name, "shape": list(INPUT_SHAPE), "dtype": "FLOAT32"}
    want_out = {"name": standard_output().name, "shape": [1, NUM_CLASSES], "dtype": "FLOAT32"}
    if io["inputs"] != [want_in] or io["outputs"] != [want_out]:
        raise RuntimeError(f"{path}: converted I/O {io} breaks the contract {want_in} -> {want_out}")
    hist = op_histogram(prog)
    compute = {k: v for k, v in hist.items() if k != "const" and not k.startswith("constexpr_")}
    return {
        "specification_version": int(spec.specificationVersion),
        "op_histogram": hist,
        "compute_ops": sum(compute.values()),
        "weight_storage": cc.storage_summary(prog),
        "io": io,
    }


def _feature(f: Any) -> dict[str, Any]:
    arr = f.type.multiArrayType
    return {"name": f.name, "shape": [int(d) for d in arr.shape], "dtype": type(arr).ArrayDataType.Name(arr.dataType)}
