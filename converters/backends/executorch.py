"""ExecuTorch backend: export -> (quantize: prepare, calibrate, convert) -> lower -> serialize a ``.pte``.

Recipes (see `edge_convnext.recipes`):

* ``executorch-xnnpack-fp32``: XNNPACK delegate, float32.
* ``executorch-xnnpack-int8``: PT2E static int8 (``XNNPACKQuantizer``, symmetric, per-channel weights,
  per-tensor activations) calibrated on real calibration-split images, then XNNPACK.
* ``executorch-portable-fp32``: no delegate; every op runs on the kernel library linked into the runtime.
* ``executorch-coreml-fp16``: ExecuTorch's Core ML delegate, fp16 compute. It exports on Linux; only an
  ExecuTorch build with the Core ML backend (macOS/iOS) executes it natively, elsewhere the harness runs
  the delegate's embedded model in the Core ML emulator (`edge_convnext.runners.executorch_coreml`).

For the XNNPACK recipes the exported graph is first rewritten so that XNNPACK takes LayerNorm and the
head's global mean (`executorch_rewrite`); otherwise each of the 23 LayerNorms ends a partition. The
lowering report records the partitions and the ops left outside the delegate both with and without the
rewrite (the variant not built is partitioned as a dry run, without compiling it).

Every program keeps ExecuTorch's usual NCHW float32 input (input contract ``rgb-nchw-unit``: RGB in
[0, 1], normalization inside) and, like the other formats, ends in a softmax: ``forward`` returns
float32 probabilities. In the Core ML-delegated program the softmax stays outside the delegate
(portable kernel, float32), so fp16 compute cannot underflow small probabilities to 0.

The manifest (JSON), the labels (one per line) and the input/output contract (JSON, stating that the
app must not normalize and must not apply softmax) are embedded as constant methods returning
strings: ``edge_convnext_manifest``, ``edge_convnext_labels`` and ``edge_convnext_contract``;
`edge_convnext.runners.executorch.read_embedded` reads them back. An app reads them with the plain
runtime (``module.execute("edge_convnext_contract")`` on Android and iOS).
"""

from __future__ import annotations

import contextlib
import copy
import json
import operator
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from executorch.exir import EdgeProgramManager, to_edge_transform_and_lower
from executorch.exir.backend.partitioner import Partitioner, PartitionResult
from torch.export import ExportedProgram

from converters.act_quant import Point, RangeUnion
from converters.backends.executorch_rewrite import RewriteCount, rewrite_for_xnnpack
from converters.backends.fp16 import fp16_entry
from converters.context import BuildContext, BuildResult
from converters.quant_plan import QuantPlan
from edge_convnext.errors import EdgeConvNextError
from edge_convnext.recipes import Recipe
from edge_convnext.runners.executorch import CONTRACT_METHOD, LABELS_METHOD, MANIFEST_METHOD

# Measured on ConvNeXt-T: the rewrite takes XNNPACK from 24 partitions (24 ops outside: 23 LayerNorms and
# the mean) to 1 with nothing outside, fp32 and int8. Latency on the x86 build host is within noise (1
# thread: fp32 -1.5 %, int8 -3 %; 2 threads: -3 % to +3 %), logits are as close to a float64 reference as
# with the native LayerNorm. Kept for the whole-graph delegation, which also frees a device runtime from
# needing a fast native_layer_norm kernel.
DEFAULT_LN_REWRITE = True
# The oldest OS the ExecuTorch Core ML runtime supports (iOS 16 / macOS 13): ML program, fp16.
COREML_MIN_TARGET = "iOS16"


@dataclass(frozen=True)
class _Plan:
    delegate: str | None  # "xnnpack", "coreml" or None (portable)
    int8: bool = False  # PT2E int8 (static, or dynamic with ``dynamic``)
    dynamic: bool = False  # activations quantized per row at run time (XNNPACK qd8), no calibration


_DELEGATES = ("xnnpack", "coreml", None)


def build(ctx: BuildContext, out: Path) -> BuildResult:
    """Write the ``.pte`` for ``ctx.recipe`` at ``out``; ``ctx.model`` is not modified.

    Recipe options: ``ln_rewrite`` (XNNPACK recipes; default `DEFAULT_LN_REWRITE`) and
    ``ln_rewrite_compare`` (default True: dry-run partition the other variant for the report).
    """
    recipe = ctx.recipe
    plan = _plan(recipe)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    result = BuildResult.for_recipe(recipe, "image", "probabilities")
    # A NumPy ``image[None]`` has stride 0 on its batch dim, which torch calls contiguous and ExecuTorch
    # refuses ("0 in strides"): clone with freshly computed strides.
    example = (ctx.example_input.detach().to(torch.float32).clone(memory_format=torch.contiguous_format),)
    xnnpack = plan.delegate == "xnnpack"
    ln_rewrite = xnnpack and bool(recipe.options.get("ln_rewrite", DEFAULT_LN_REWRITE))
    compare = xnnpack and bool(recipe.options.get("ln_rewrite_compare", True))

    t0 = time.perf_counter()
    ctx.log("exporting (torch.export)")
    ep = torch.export.export(copy.deepcopy(ctx.model).eval(), example)
    gm: torch.fx.GraphModule = ep.module()  # type: ignore[assignment]  # a copy: rewrites stay off ctx.model
    ranged = 0
    if plan.int8:
        gm, result.calibration_used, ranged = _quantize_int8(gm, ctx, plan.dynamic)
    ctx.log(f"exported{' and quantized' if plan.int8 else ''} in {time.perf_counter() - t0:.1f} s")

    other = None
    if compare:
        ctx.log(f"dry-run partitioning {'without' if ln_rewrite else 'with'} the LayerNorm rewrite, for the report")
        other = _dry_run(_reexport(gm, example, rewrite=not ln_rewrite), _partitioners(plan))
    rewrite = rewrite_for_xnnpack(gm) if ln_rewrite else None
    if rewrite:
        ctx.log(f"rewrote {rewrite.layer_norms} LayerNorms and {rewrite.means} global means into XNNPACK ops")
    if plan.int8 or ln_rewrite:
        ep = torch.export.export(gm, example)
    if plan.delegate == "coreml":
        # The softmax stays out of the fp16 delegate (see `_partitioners`) and must then be the core op
        # the portable kernels implement (aten::_softmax.out); export keeps the composite softmax.int.
        ep = ep.run_decompositions({torch.ops.aten.softmax.int: _core_softmax})

    t1 = time.perf_counter()
    ctx.log(f"lowering ({plan.delegate or 'portable, no delegate'})")
    constant_methods = {MANIFEST_METHOD: json.dumps(ctx.embedded_manifest, sort_keys=True),
                        LABELS_METHOD: "\n".join(ctx.labels),
                        CONTRACT_METHOD: json.dumps(app_contract(result), sort_keys=True)}
    with _tempdir(ctx.workdir):  # the Core ML delegate writes its .mlpackage through tempfile
        edge = to_edge_transform_and_lower(ep, partitioner=_partitioners(plan), constant_methods=constant_methods)
    lowering = lowering_report(edge)
    ctx.log(f"lowered in {time.perf_counter() - t1:.1f} s: {lowering['partitions']} delegate partition(s), "
            f"{lowering['ops_outside_total']} op(s) outside")

    t2 = time.perf_counter()
    buffer = edge.to_executorch().buffer
    out.write_bytes(buffer)
    ctx.log(f"serialized {len(buffer) / 1e6:.1f} MB in {time.perf_counter() - t2:.1f} s")

    result.lowering = _finish_report(lowering, plan, ln_rewrite, rewrite, other,
                                     str(recipe.options.get("int8_scope", "all")), ranged) | {"fp16": fp16_entry(recipe, out)}
    result.embedded = {
        "manifest": f"constant method {MANIFEST_METHOD}() -> str (UTF-8 JSON)",
        "labels": f"constant method {LABELS_METHOD}() -> str (class names, one per line, line i = class i)",
        "contract": f"constant method {CONTRACT_METHOD}() -> str (UTF-8 JSON: input layout, dtype, shape, range, "
                    "normalization inside, output probabilities)",
    }
    result.notes = _notes(plan, lowering)
    return result


def _core_softmax(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.ops.aten._softmax.default(x if dtype is None else x.to(dtype), dim, False)


def app_contract(result: BuildResult) -> dict[str, Any]:
    """What an app must know to feed ``forward`` and read its output, for the contract constant method."""
    return {
        "input": {**result.input.to_dict(),
                  "normalization": "inside the model: do NOT subtract the ImageNet mean or divide by its std "
                                   "(demo-app code that does would normalize twice)"},
        "output": {**result.output.to_dict(), "softmax": "inside the model: the values are probabilities; "
                                                          "do NOT apply softmax again"},
        "labels_method": LABELS_METHOD,
    }


@contextlib.contextmanager
def _tempdir(path: Path) -> Iterator[None]:
    saved = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _plan(recipe: Recipe) -> _Plan:
    """The recipe's ``delegate`` option (None: portable kernels) and whether its precision is int8."""
    delegate = recipe.options.get("delegate")
    if delegate not in _DELEGATES or recipe.precision not in ("fp32", "fp16", "int8", "dynamic-int8"):
        raise EdgeConvNextError(f"{recipe.name}: no ExecuTorch build for delegate {delegate!r} and precision "
                                f"{recipe.precision!r}; delegates: {', '.join(map(str, _DELEGATES))}")
    dynamic = recipe.precision == "dynamic-int8"
    return _Plan(delegate, int8=recipe.precision == "int8" or dynamic, dynamic=dynamic)


def _partitioners(plan: _Plan) -> list[Partitioner]:
    if plan.delegate == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        return [XnnpackPartitioner()]
    if plan.delegate == "coreml":
        import coremltools as ct
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        specs = CoreMLBackend.generate_compile_specs(
            compute_unit=ct.ComputeUnit.ALL,
            minimum_deployment_target=getattr(ct.target, COREML_MIN_TARGET),
            compute_precision=ct.precision.FLOAT16,
            model_type=CoreMLBackend.MODEL_TYPE.MODEL,  # compiling to .mlmodelc needs macOS
        )
        # float32 softmax on the portable kernels: an fp16 one would flush probabilities below 6e-8 to 0.
        return [CoreMLPartitioner(compile_specs=specs, skip_ops_for_coreml_delegation=["aten._softmax.default"])]
    return []


def _quantize_int8(gm: torch.fx.GraphModule, ctx: BuildContext,
                   dynamic: bool) -> tuple[torch.fx.GraphModule, int, int]:
    """PT2E int8 for XNNPACK: static (calibrated on calibration-split images only) or dynamic (qd8).

    Returns the converted module, the calibration images used and how many observers took the ranges
    chosen on the torch side (`_set_chosen_ranges`)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    quantizer = XNNPACKQuantizer().set_global(config)
    quantizer.set_filter_function(_annotation_filter(ctx.plan, str(ctx.recipe.options.get("int8_scope", "all"))))
    prepared = prepare_pt2e(gm, quantizer)
    if dynamic:
        # The weight observers still have to see the weights once (activation ranges are taken at run
        # time); without this pass every per-channel weight scale is the observer default of size 1.
        example = [torch.zeros(n.meta["val"].shape) for n in prepared.graph.nodes if n.op == "placeholder"]
        with torch.no_grad():
            prepared(*example)
        return convert_pt2e(prepared), 0, 0
    ctx.log(f"calibrating on up to {ctx.calibration_count} calibration-split images")
    used = 0
    with torch.no_grad():
        for image in ctx.calibration_images(ctx.calibration_count):
            prepared(torch.from_numpy(image).to(torch.float32))
            used += 1
    if used == 0:
        raise EdgeConvNextError(f"{ctx.recipe.name}: no calibration image could be read; cannot calibrate int8")
    ranged = _set_chosen_ranges(prepared, ctx)
    if ranged:
        ctx.log(f"activation ranges of {ranged} observer(s) set to the ones chosen on held-out calibration images")
    return convert_pt2e(prepared), used, ranged


def _layer_name(node: torch.fx.Node) -> str:
    """The torch module name of the innermost module ``node`` came from (the plan's layer names)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _set_chosen_ranges(prepared: torch.fx.GraphModule, ctx: BuildContext) -> int:
    """Replace the observers at the conv/linear inputs and outputs that ``ctx.activation_ranges`` covers by
    min/max observers holding the chosen ranges (`converters.prepare`); returns how many were set.

    The XNNPACK quantizer observes with `HistogramObserver`; the chosen ranges are the ones LiteRT's
    int8 artifact gets too (`converters.backends.tflite._torch_ranges`), so both backends quantize the
    same activations with the same ranges. An observer shared by two points takes the union of theirs.
    """
    from torchao.quantization.pt2e import MinMaxObserver, ObserverBase

    chosen = ctx.activation_ranges
    if not chosen:
        return 0
    wanted = RangeUnion()

    def want(node: Any, rng: tuple[float, float]) -> None:
        if isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(
                getattr(prepared, str(node.target), None), ObserverBase):
            wanted.want(str(node.target), rng)

    quantized = set(ctx.plan.quantized) if ctx.plan is not None else None
    for node in prepared.graph.nodes:
        if node.op != "call_function" or node.target not in _LAYER_TARGETS:
            continue
        name = _layer_name(node)
        if quantized is not None and name not in quantized:  # float (e.g. by an accuracy target): no range
            continue
        if Point(name, "input") in chosen:
            want(node.args[0], chosen[Point(name, "input")])
        if Point(name, "output") in chosen:
            for user in node.users:
                want(user, chosen[Point(name, "output")])
    for target, (lo, hi) in wanted.items():
        old = getattr(prepared, target)
        fixed = MinMaxObserver(dtype=old.dtype, qscheme=old.qscheme, quant_min=old.quant_min,
                               quant_max=old.quant_max, eps=float(old.eps))
        fixed.min_val, fixed.max_val = torch.tensor(float(lo)), torch.tensor(float(hi))
        setattr(prepared, target, fixed)
    return len(wanted)


_LAYER_TARGETS = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default, torch.ops.aten.convolution.default}
INT8_SCOPES = ("all", "compute")


def _annotation_filter(plan: QuantPlan | None, scope: str) -> Callable[[torch.fx.Node], bool]:
    """PT2E node filter: which nodes the XNNPACK quantizer may annotate.

    A conv/linear node is quantized when the innermost module of its ``nn_module_stack`` is a layer the
    plan quantizes (torch module names, as in the plan); other convs (a `ChannelLayerNorm`'s mean
    kernels) stay float. Other ops (residual adds, muls) are quantized only with scope ``"all"``, and
    not inside a module whose conv/linear layers are all float (the adds joining float depthwise
    pieces), so no quantize/dequantize pair sits between float ops. Scope ``"compute"`` keeps them
    float, like LiteRT's ``compute`` scope: the residual stream stays float32.
    """
    if scope not in INT8_SCOPES:
        raise EdgeConvNextError(f"int8_scope {scope!r} is not one of {INT8_SCOPES}")
    quantized = set(plan.quantized) if plan is not None else None
    floats = set(plan.float_layers) if plan is not None else set()
    all_float = {prefix for prefix in {n.rsplit(".", 1)[0] for n in floats}
                 if plan is not None and all(x in floats for x in plan.layers if x.startswith(prefix + "."))}

    def keep(node: torch.fx.Node) -> bool:
        name = _layer_name(node)
        if node.op != "call_function":
            # The annotators ask about every node of a pattern, its weight and bias attributes too;
            # those follow the layer's own answer.
            return True
        if node.target in _LAYER_TARGETS:
            return quantized is None or name in quantized
        return scope == "all" and name not in floats and name not in all_float

    return keep


def _reexport(gm: torch.fx.GraphModule, example: tuple[torch.Tensor, ...], rewrite: bool) -> ExportedProgram:
    gm = copy.deepcopy(gm)
    if rewrite:
        rewrite_for_xnnpack(gm)
    return torch.export.export(gm, example)


class _Counted(Exception):
    """Stops a dry-run lowering once the partitioner has counted; carries the counts."""

    def __init__(self, counts: dict[str, Any]) -> None:
        super().__init__("dry run")
        self.counts = counts


class _CountingPartitioner(Partitioner):
    """Runs ``inner``'s partitioning on the edge program, counts what it would delegate, then stops the
    lowering (nothing is compiled) by raising `_Counted`."""

    def __init__(self, inner: Partitioner) -> None:
        super().__init__()
        self.inner = inner

    def partition(self, exported_program: ExportedProgram) -> PartitionResult:
        tagged = self.inner.partition(exported_program).tagged_exported_program
        tags: Counter[str] = Counter()
        outside: Counter[str] = Counter()
        for node in tagged.graph.nodes:
            if _is_op(node):
                tag = node.meta.get("delegation_tag")
                if tag is None:
                    outside[_op_name(node.target)] += 1
                else:
                    tags[tag] += 1
        raise _Counted({
            "partitions": len(tags),
            "ops_outside_total": sum(outside.values()),
            "ops_outside_delegate": dict(sorted(outside.items())),
            "ops_total": sum(tags.values()) + sum(outside.values()),
        })

    def ops_to_not_decompose(self, ep: ExportedProgram):  # noqa: ANN201
        return self.inner.ops_to_not_decompose(ep)


def _dry_run(ep: ExportedProgram, partitioners: list[Partitioner]) -> dict[str, Any]:
    try:
        to_edge_transform_and_lower(ep, partitioner=[_CountingPartitioner(partitioners[0])])
    except _Counted as counted:
        return counted.counts
    raise AssertionError("the counting partitioner was never called")


def _is_op(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is not operator.getitem


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # aten.native_layer_norm.default
    return str(getattr(target, "__name__", target))  # EdgeOpOverload: aten.native_layer_norm.default


def lowering_report(edge: EdgeProgramManager, method: str = "forward") -> dict[str, Any]:
    """Delegate partitions and ops outside them in the lowered ``method`` (before ``to_executorch``).

    ``ops_*`` count ``call_function`` nodes except ``getitem``; ops inside a delegate are counted in
    the partition's original edge graph (q/dq nodes included for quantized graphs).
    """
    ep = edge.exported_program(method)
    outside: Counter[str] = Counter()
    backends: Counter[str] = Counter()
    inside = 0
    partitions = 0
    for node in ep.graph.nodes:
        if not _is_op(node):
            continue
        if _op_name(node.target) == "executorch_call_delegate":
            partitions += 1
            lowered = getattr(ep.graph_module, node.args[0].target)
            backends[lowered.backend_id] += 1
            inside += sum(1 for n in lowered.original_module.graph.nodes if _is_op(n))
        else:
            outside[_op_name(node.target)] += 1
    return {
        "delegate": ", ".join(sorted(backends)) or None,
        "partitions": partitions,
        "ops_outside_delegate": dict(sorted(outside.items())),
        "ops_outside_total": sum(outside.values()),
        "ops_delegated": inside,
        "ops_total": inside + sum(outside.values()),
    }


def _finish_report(lowering: dict[str, Any], plan: _Plan, applied: bool, rewrite: RewriteCount | None,
                   other: dict[str, Any] | None, scope: str = "all", ranged: int = 0) -> dict[str, Any]:
    report = dict(lowering)
    if plan.delegate == "xnnpack":
        built = {k: lowering[k] for k in ("partitions", "ops_outside_total", "ops_outside_delegate", "ops_total")}
        report["ln_rewrite"] = {
            "applied": applied,
            "rewritten": rewrite.to_dict() if rewrite else {"layer_norms": 0, "means": 0},
            "with_rewrite": built if applied else other,
            "without_rewrite": other if applied else built,
        }
    else:
        report["ln_rewrite"] = {"applied": False, "reason": "only for the XNNPACK delegate"}
    if plan.delegate == "coreml":
        report["coreml"] = {"compute_precision": "fp16", "minimum_deployment_target": COREML_MIN_TARGET,
                            "compute_units": "ALL", "model_type": "mlpackage (compiled on device)"}
    if plan.int8 and plan.dynamic:
        report["quantization"] = {"scheme": "PT2E dynamic int8 (XNNPACK qd8)", "quantizer": "XNNPACKQuantizer",
                                  "weights": "symmetric per-channel int8",
                                  "activations": "each conv/linear input quantized per row at run time; float32 "
                                                 "outputs, everything else float32"}
    elif plan.int8:
        report["quantization"] = {"scheme": "PT2E static int8", "quantizer": "XNNPACKQuantizer", "int8_scope": scope,
                                  "weights": "symmetric per-channel int8", "activations": "per-tensor int8",
                                  "activation_observers": (f"{ranged} conv/linear input and output observers hold the "
                                                           "ranges chosen on the torch side (lowering.activation_ranges), "
                                                           "the same as LiteRT's int8 artifact; the others: "
                                                           "HistogramObserver" if ranged else "HistogramObserver"),
                                  "float_ops": "LayerNorm, GELU and the global mean run in float32 between "
                                               "dequantize/quantize pairs (XNNPACK has no int8 GELU; the "
                                               "quantizer leaves LayerNorm unquantized)"
                                               + ("; so do the residual adds (int8_scope 'compute')"
                                                  if scope == "compute" else "")}
    return report


def _notes(plan: _Plan, lowering: dict[str, Any]) -> list[str]:
    notes = []
    if plan.delegate is None:
        notes.append("no delegate: every op runs on the kernel library linked into the ExecuTorch runtime "
                     "(the pip wheel links the optimized CPU kernels; a device build may link only the portable ones)")
    if plan.delegate == "coreml":
        notes.append("Core ML delegate: exported on Linux, runs on Apple devices only (macOS 13+/iOS 16+ with an "
                     "ExecuTorch build that includes the Core ML backend); the Linux pip runtime cannot execute it, "
                     "so the harness emulates the delegate's Core ML model there (executorch-coreml-emulated)")
    if plan.delegate and lowering["ops_outside_total"]:
        outside = lowering["ops_outside_delegate"]
        notes.append(f"{lowering['ops_outside_total']} op(s) run outside the delegate: {outside}")
    return notes
