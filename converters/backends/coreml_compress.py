"""Core ML compression for the ``coreml-*`` recipes: which weights get which treatment, and why.

Helpers of `converters.backends.coreml` (no recipe logic lives here):

* `weight_roles`: the conv/linear weights of a converted ML program, classified by structure (not
  by name): ``stem`` (the conv reading the 3-channel image), ``depthwise`` (7x7 convs, one input
  channel per group), ``downsample`` (the other convs), ``classifier`` (the linear with one output
  per class) and ``pointwise`` (the other linears: 90 % of ConvNeXt-T's parameters).
* `compress_weights`: weight-only compression on the Core ML side (``ct.optimize.coreml``), one
  treatment per role; biases, LayerNorm and layer-scale vectors are never touched (coremltools skips
  rank-1 tensors, and only ``conv``/``linear`` weights are configured at all).
* `quantize_w8a8`: post-training W8A8 on the torch side (``ct.optimize.torch`` LinearQuantizer,
  observers over real calibration images, no training), the path Core ML's int8 activation ops
  come from on Linux (``linear_quantize_activations`` needs ``MLModel.predict``).
* `weight_fidelity`: log-probabilities of the float torch model (which ends in a softmax) with a
  package's stored weights swapped in, against the float model's: the weight-storage error alone,
  measured in seconds with torch, used to choose the LUT granularity of ``coreml-p4``.

Measured on synthetic ConvNeXt-T (``random:0``, 16 calibration images): 4-bit k-means on the stem
alone costs as much logit SQNR as on all other 58 tensors together (the stem carries the folded
mean/std, and every block reads its output), and the classifier and downsampling convs are next.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_convnext.contract import OUTPUT_CONTRACTS
from edge_convnext.manifest import NUM_CLASSES
from edge_convnext.metrics import Fidelity, compare

ROLES = ("stem", "depthwise", "downsample", "pointwise", "classifier")
_COMPRESSED_SUFFIX = re.compile(r"(_to_fp16)?(_palettized|_quantized)?$")


@dataclass(frozen=True)
class Weight:
    """One conv/linear weight constant of an ML program."""

    name: str  # the MIL const name (also the key of ``op_name_configs``)
    role: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def weight_roles(mlmodel: Any) -> list[Weight]:
    """The ``weight`` inputs of every conv and linear op of ``mlmodel``, each with its role."""
    import coremltools.optimize.coreml as cto

    out = []
    for name, meta in cto.get_weights_metadata(mlmodel, weight_threshold=0).items():
        shape = tuple(int(d) for d in np.shape(meta.val))
        users = {(op.op_type, p) for op in meta.child_ops for p, v in op.params_name_mapping.items() if v == name}
        if ("conv", "weight") in users and len(shape) == 4:
            role = "stem" if shape[1] == 3 else "depthwise" if shape[1] == 1 else "downsample"
        elif ("linear", "weight") in users and len(shape) == 2:
            role = "classifier" if shape[0] == NUM_CLASSES else "pointwise"
        else:
            continue
        out.append(Weight(name, role, shape))
    return out


def compress_weights(
    mlmodel: Any,
    weights: list[Weight],
    treatment: Mapping[str, str | None],
    group_size: int = 16,
) -> Any:
    """Compress each weight by its role's treatment; returns a new MLModel.

    Treatments: ``None`` (stays fp16), ``"int8"`` (linear symmetric, per output channel),
    ``"lut4"`` (4-bit k-means LUT, one table per tensor: iOS16) or ``"lut4-g"`` (one table per
    ``group_size`` output channels: iOS18; a tensor whose channel count ``group_size`` does not
    divide gets gcd-sized groups instead of being skipped, e.g. 8 for the 1000-class head).
    """
    import coremltools.optimize.coreml as cto

    def configs(kind: str) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        for w in weights:
            t = treatment.get(w.role)
            if t is None or not t.startswith(kind):
                continue
            if t == "int8":
                cfg[w.name] = cto.OpLinearQuantizerConfig(
                    mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0)
            elif t == "lut4":
                cfg[w.name] = cto.OpPalettizerConfig(
                    mode="kmeans", nbits=4, granularity="per_tensor", weight_threshold=0)
            elif t == "lut4-g":
                cfg[w.name] = cto.OpPalettizerConfig(
                    mode="kmeans", nbits=4, granularity="per_grouped_channel",
                    group_size=math.gcd(w.shape[0], group_size), weight_threshold=0)
            else:
                raise ValueError(f"unknown weight treatment {t!r} for role {w.role!r}")
        return cfg

    # No global or op-type config: only the named conv/linear weights are touched, never a bias,
    # LayerNorm or layer-scale vector, whatever its size.
    lut = configs("lut4")
    if lut:
        mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=lut))
    lin = configs("int8")
    if lin:
        mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=lin))
    return mlmodel


def storage_summary(prog: Any) -> dict[str, Any]:
    """How the weights of a loaded MIL program are stored: compressed ops and fp16/fp32 leftovers."""
    compressed: dict[str, int] = {}
    dense_elems = dense_tensors = 0
    for op in prog.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            compressed[op.op_type] = compressed.get(op.op_type, 0) + 1
        elif op.op_type == "const":
            val = op.outputs[0].val
            users = op.outputs[0].child_ops
            # Inputs of constexpr ops (LUTs, scales) belong to the compressed tensor they rebuild.
            if (isinstance(val, np.ndarray) and val.dtype.kind == "f" and val.size > 16 and users
                    and not any(c.op_type.startswith("constexpr_") for c in users)):
                dense_tensors += 1
                dense_elems += int(val.size)
    return {"compressed_tensors": compressed, "dense_float_tensors": dense_tensors,
            "dense_float_elements": dense_elems}


def stored_weights(prog: Any) -> dict[str, np.ndarray]:
    """Every float weight of a loaded MIL program as float32, decompressed, keyed by const name
    without the converter's ``_to_fp16`` / ``_palettized`` / ``_quantized`` suffixes."""
    out: dict[str, np.ndarray] = {}
    for op in prog.functions["main"].operations:
        if op.op_type.startswith("constexpr_"):
            val = op.materialized_val_inference()
        elif op.op_type == "const":
            val = op.outputs[0].val
        else:
            continue
        if isinstance(val, np.ndarray) and val.dtype.kind == "f" and op.outputs[0].child_ops:
            if all(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops):
                continue  # an input of a constexpr (a LUT, a scale), not a weight
            out[_COMPRESSED_SUFFIX.sub("", op.name)] = val.astype(np.float32)
    return out


def weight_fidelity(model: torch.nn.Module, prog: Any, images: torch.Tensor, reference: np.ndarray) -> Fidelity:
    """Float torch ``model`` with every weight replaced by what ``prog`` stores -> fidelity vs ``reference``.

    ``model`` returns probabilities (the export model ends in a softmax); ``reference`` is the float
    model's log-probabilities (``OUTPUT_CONTRACTS["probabilities"].log_scores``), and the trial's
    are compared the same way (`compare` centers both per image).

    The torch converter names a parameter ``a.b.weight`` as const ``a_b_weight[_to_fp16]``; a
    compressed weight that maps to no parameter raises KeyError (the comparison would be wrong).
    """
    params = {k.replace(".", "_"): k for k in model.state_dict()}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for name, val in stored_weights(prog).items():
        key = params.get(name)
        if key is None:
            continue  # a converter constant (e.g. a folded shape), not a parameter
        if sd[key].numel() != val.size:
            raise KeyError(f"stored weight {name} {val.shape} does not match parameter {key} {tuple(sd[key].shape)}")
        sd[key] = torch.from_numpy(val.reshape(sd[key].shape))
    trial = copy.deepcopy(model).eval()
    trial.load_state_dict(sd)
    with torch.no_grad():
        return compare(reference, OUTPUT_CONTRACTS["probabilities"].log_scores(trial(images).numpy()))


def calibration_batches(images: Iterable[np.ndarray], batch: int = 8) -> Iterator[torch.Tensor]:
    """Group float32 ``[1, 3, 224, 224]`` images into ``[<=batch, 3, 224, 224]`` tensors."""
    buf: list[np.ndarray] = []
    for x in images:
        buf.append(np.asarray(x, dtype=np.float32).reshape(1, 3, 224, 224))
        if len(buf) == batch:
            yield torch.from_numpy(np.concatenate(buf))
            buf = []
    if buf:
        yield torch.from_numpy(np.concatenate(buf))


@dataclass
class W8A8Model:
    model: torch.nn.Module  # finalized: quantize/dequantize around every conv/linear, int8 weights
    images: int  # calibration images the observers saw
    float_modules: tuple[str, ...]  # modules left in float


def quantize_w8a8(
    model: torch.nn.Module,
    example: torch.Tensor,
    images: Iterable[np.ndarray],
    float_modules: tuple[str, ...] = (),
) -> W8A8Model:
    """Post-training W8A8 with coremltools' torch quantizer (FX graph mode, Core ML backend config).

    Weights int8 symmetric per output channel; activations 8-bit symmetric per tensor (the scheme
    the Neural Engine's int8-int8 path takes). Observers are min/max: a moving average over a
    stream of single images keeps mostly the first images' ranges (measured 4 dB worse here).
    Calibration runs with fake quantization off, so each observer sees float activations (as in
    PT2E ``prepare``); ``finalize`` then writes the quantize/dequantize pairs.
    """
    import torch.ao.quantization as aoq
    from coremltools.optimize.torch.quantization import (
        LinearQuantizer,
        LinearQuantizerConfig,
        ModuleLinearQuantizerConfig,
    )

    config = LinearQuantizerConfig(
        global_config=ModuleLinearQuantizerConfig(
            quantization_scheme="symmetric",
            weight_dtype="qint8",
            weight_per_channel=True,
            weight_observer="min_max",
            activation_dtype="quint8",
            activation_observer="min_max",
            milestones=None,
        ),
        module_name_configs={name: None for name in float_modules},
    )
    quantizer = LinearQuantizer(model, config)
    prepared = quantizer.prepare(example_inputs=(example,))  # a deep copy: `model` is untouched
    prepared.eval()
    prepared.apply(aoq.enable_observer)
    prepared.apply(aoq.disable_fake_quant)
    seen = 0
    with torch.no_grad():
        for batch in calibration_batches(images):
            prepared(batch)
            seen += len(batch)
    if seen == 0:
        raise ValueError("W8A8 calibration got no images; the calibration split is empty or unreadable")
    prepared.apply(aoq.disable_observer)
    prepared.apply(aoq.enable_fake_quant)
    return W8A8Model(quantizer.finalize(inplace=False).eval(), seen, tuple(float_modules))


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
