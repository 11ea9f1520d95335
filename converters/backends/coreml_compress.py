"""Core ML compression for the ``coreml-*`` recipes: which weights get which storage, and how.

Helpers of `converters.backends.coreml` (no recipe logic lives here):

* `weight_roles`: the conv/linear weights of a converted ML program, classified by structure (not
  by name): ``stem`` (the conv reading the 3-channel image), ``depthwise`` (7x7 convs, one input
  channel per group), ``downsample`` (the other convs), ``classifier`` (the linear with one output
  per class) and ``pointwise`` (the other linears: 90 % of ConvNeXt-T's parameters), each with the
  torch layer it came from (``stages.0.layers.0.pwconv1``: the name the shared float-layer plan uses).
* `compress_weights`: weight storage on the Core ML side (``ct.optimize.coreml``), one
  `coreml_bits.Storage` per weight, for weights already rounded on the torch side: nothing is
  re-rounded (`exact_palette`, min/max int8 grid); `check_storage` reads back what was stored.
  Biases, LayerNorm and layer-scale vectors are never touched.
* `quantize_w8a8`: post-training W8A8 on the torch side (``ct.optimize.torch`` LinearQuantizer,
  observers over real calibration images, no training), the path Core ML's int8 activation ops
  come from on Linux (``linear_quantize_activations`` needs ``MLModel.predict``).
* `weight_fidelity`: log-probabilities of the float torch model (which ends in a softmax) with a
  package's stored weights swapped in, against the float model's: the weight-storage error alone.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from converters.act_quant import Point, RangeUnion
from converters.backends.coreml_bits import Storage
from edge_convnext.contract import OUTPUT_CONTRACTS
from edge_convnext.manifest import NUM_CLASSES
from edge_convnext.metrics import Fidelity, compare

ROLES = ("stem", "depthwise", "downsample", "pointwise", "classifier")
_COMPRESSED_SUFFIX = re.compile(r"(_to_fp16|_cast_fp16)?(_palettized|_quantized)?$")  # converter suffixes


@dataclass(frozen=True)
class Weight:
    """One conv/linear weight constant of an ML program."""

    name: str  # the MIL const name (also the key of ``op_name_configs``)
    role: str
    shape: tuple[int, ...]
    layer: str | None = None  # the torch module it came from (``stages.0.layers.0.pwconv1``), when known

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def mil_weight_name(layer: str) -> str:
    """The const name (suffixes stripped) the torch converter gives ``layer.weight``: dots -> underscores."""
    return layer.replace(".", "_") + "_weight"


def weight_roles(mlmodel: Any, layers: Iterable[str] = ()) -> list[Weight]:
    """The ``weight`` inputs of every conv and linear op of ``mlmodel``, each with its role and, for
    the torch module names in ``layers``, the layer it belongs to."""
    import coremltools.optimize.coreml as cto

    by_const = {mil_weight_name(n): n for n in layers}
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
        out.append(Weight(name, role, shape, by_const.get(_COMPRESSED_SUFFIX.sub("", name))))
    missing = sorted(set(by_const.values()) - {w.layer for w in out})
    if missing:
        raise KeyError(f"torch layers {missing[:5]} have no conv/linear weight in the ML program "
                       f"(expected consts named like {mil_weight_name(missing[0])!r})")
    return out


def compress_weights(mlmodel: Any, weights: list[Weight], storage: Mapping[str, Storage | None]) -> Any:
    """Store each weight as ``storage[weight.name]`` says; returns a new MLModel.

    The weights must already hold what the storage can represent (rounded on the torch side:
    `converters.weight_quant` for int8, `coreml_bits` for palettes), so nothing is re-rounded here:

    * ``lut`` -> palettization whose palette is the tensor's own distinct fp16 values
      (`exact_palette`), padded to ``2^nbits`` entries: one palette per tensor, or per group of output
      channels (``per_grouped_channel``, iOS18; a group size that does not divide the channels falls
      back to their gcd, e.g. 8 for the 1000-class head). A tensor with more distinct values than its
      bits allow raises ValueError;
    * ``int8`` -> ``linear_symmetric`` per output channel (``max|w| / 127``: the grid the torch side
      rounded to);
    * ``fp16`` or ``None`` -> untouched.

    No global or op-type config: only the named conv/linear weights are touched, never a bias,
    LayerNorm or layer-scale vector, whatever its size.
    """
    import coremltools.optimize.coreml as cto

    lut: dict[str, Any] = {}
    lin: dict[str, Any] = {}
    for w in weights:
        st = storage.get(w.name)
        if st is None or st.kind == "fp16":
            continue
        if st.kind == "int8":
            lin[w.name] = cto.OpLinearQuantizerConfig(
                mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0)
        elif st.grouped:
            lut[w.name] = cto.OpPalettizerConfig(
                mode="custom", lut_function=exact_palette(st.nbits, w.name), granularity="per_grouped_channel",
                group_size=w.shape[0] // st.groups(w.shape[0]), channel_axis=0, weight_threshold=0)
        else:
            lut[w.name] = cto.OpPalettizerConfig(
                mode="custom", lut_function=exact_palette(st.nbits, w.name), granularity="per_tensor",
                weight_threshold=0)
    if lut:
        mlmodel = cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=lut))
    if lin:
        mlmodel = cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=lin))
    return mlmodel


def exact_palette(nbits: int, name: str) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """coremltools ``lut_function``: the palette of a tensor (or group) is its own distinct values.

    Returns ``(lut, indices)``: ``lut`` ``[2^nbits]`` in the weight's dtype (unused entries repeat the
    last value), ``indices`` uint8, one per element in C order. The bit width is fixed (the ``unique``
    mode would shrink it to what the count of values needs, e.g. 3 bits, an iOS18 width, for a
    4-bit tensor with 8 distinct values).
    """

    def lut_function(val: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        uniq, idx = np.unique(np.asarray(val).reshape(-1), return_inverse=True)
        if len(uniq) > 2 ** nbits:
            raise ValueError(f"{name}: {len(uniq)} distinct values do not fit a {nbits}-bit palette; the weight "
                             "was not rounded to its palette on the torch side (converters.backends.coreml_bits)")
        lut = np.full(2 ** nbits, uniq[-1], dtype=val.dtype)
        lut[: len(uniq)] = uniq
        return lut, idx.astype(np.uint8)

    return lut_function


def stored_kinds(prog: Any) -> dict[str, str]:
    """How each conv/linear weight of a loaded MIL program is stored, keyed by const name without
    suffixes: ``"lut<n>"`` (``"lut<n>g"`` with several palettes), ``"int8"`` or ``"fp16"``/``"fp32"``."""
    from coremltools.converters.mil.mil import types

    out: dict[str, str] = {}
    for op in prog.functions["main"].operations:
        if op.op_type not in ("conv", "linear"):
            continue
        src = op.inputs["weight"].op
        key = _COMPRESSED_SUFFIX.sub("", src.name)
        if src.op_type == "constexpr_lut_to_dense":
            lut = np.asarray(src.inputs["lut"].val)
            dense_rank = len(src.outputs[0].shape)
            # iOS16: lut [2^n]; iOS18: [*groups per axis, 2^n, vector size] with rank dense + 2
            entries, palettes = (lut.shape[-2], lut.size // lut.shape[-2] // lut.shape[-1]) \
                if lut.ndim == dense_rank + 2 else (lut.shape[-1], 1)
            out[key] = f"lut{int(entries).bit_length() - 1}" + ("g" if palettes > 1 else "")
        elif src.op_type in ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"):
            out[key] = "int8"
        else:
            out[key] = types.builtin_to_string(src.outputs[0].dtype)
    return out


def check_storage(path: Path, prog: Any, weights: list[Weight], storage: Mapping[str, Storage | None]) -> None:
    """Raise RuntimeError naming every weight of ``path`` not stored as planned (e.g. a palette that
    coremltools skipped because the tensor had more distinct values than its bits allow)."""
    got = stored_kinds(prog)
    wrong = []
    for w in weights:
        st = storage.get(w.name)
        want = "fp16" if st is None else st.name
        if st is not None and st.grouped and st.groups(w.shape[0]) == 1:
            want = want[:-1]  # one group covers the tensor: a single palette
        have = got.get(_COMPRESSED_SUFFIX.sub("", w.name))
        if have != want:
            wrong.append(f"{w.layer or w.name}: planned {want}, stored {have}")
    if wrong:
        raise RuntimeError(f"{path}: {len(wrong)} weights are not stored as planned: {wrong[:5]}")


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


W8A8_OBSERVERS = ("min_max", "ema_min_max", "moving_average_min_max")  # what coremltools.optimize.torch offers
W8A8_SCOPES = ("all", "no_residual_add")


@dataclass
class W8A8Model:
    model: torch.nn.Module  # finalized: quantize/dequantize around every conv/linear, int8 weights
    images: int  # calibration images the observers saw
    float_layers: tuple[str, ...]  # conv/linear modules left in float (torch names)
    observer: str
    scope: str


def quantize_w8a8(
    model: torch.nn.Module,
    example: torch.Tensor,
    images: Iterable[np.ndarray],
    float_layers: tuple[str, ...] = (),
    observer: str = "min_max",
    scope: str = "all",
    batch: int = 8,
    ranges: Mapping[Point, tuple[float, float]] | None = None,
) -> W8A8Model:
    """Post-training W8A8 with coremltools' torch quantizer (FX graph mode, Core ML backend config).

    Weights int8 symmetric per output channel on ``[-127, 127]`` (``scale = max|w| / 127``: the grid
    `converters.weight_quant` rounds to, so rounded weights are stored exactly; the tool's default
    ``[-128, 127]`` range has ``scale = max|w| / 127.5`` and re-rounds every weight). Activations
    8-bit per tensor (the scheme the Neural Engine's int8-int8 path takes), ``observer`` one of
    `W8A8_OBSERVERS` over batches of ``batch`` images: ``min_max`` keeps the extremes of all
    images; ``ema_min_max`` averages the batches' extremes (weight 0.1 for the newest);
    ``moving_average_min_max`` is torch's (weight 0.01: it stays near the first batch).
    ``scope`` ``"all"`` quantizes every op the tool's backend config covers (conv/linear inputs and
    outputs, GELU, the residual adds); ``"no_residual_add"`` leaves the residual adds in float, so
    the residual stream is not rounded to 8 bits at every block. ``float_layers`` (torch module
    names) keep float weights and no quantizer of their own (``module_name_configs`` None), and the
    quantizers their neighbours' configs put on their input and output are removed too: a float layer
    reads and writes float (fp16) activations.
    Calibration runs with fake quantization off, so each observer sees float activations (as in
    PT2E ``prepare``); ``finalize`` then writes the quantize/dequantize pairs.

    ``ranges`` (chosen on the torch side, `converters.prepare`) replace the observers' ranges at the
    conv/linear inputs and outputs they cover. A `converters.centering.Shift` in ``model`` is quantized
    once, after the shift: the quantizer the tool puts on the shift's input (GELU's output) is removed,
    so the layer reads the centred grid and nothing rounds on the uncentred one first.
    """
    import operator

    import torch.ao.quantization as aoq
    from coremltools.optimize.torch.quantization import (
        LinearQuantizer,
        LinearQuantizerConfig,
        ModuleLinearQuantizerConfig,
    )

    if observer not in W8A8_OBSERVERS:
        raise ValueError(f"unknown activation observer {observer!r}; coremltools offers {W8A8_OBSERVERS}")
    if scope not in W8A8_SCOPES:
        raise ValueError(f"unknown activation scope {scope!r}; choose one of {W8A8_SCOPES}")
    config = LinearQuantizerConfig(
        global_config=ModuleLinearQuantizerConfig(
            quantization_scheme="symmetric",
            weight_dtype="qint8",
            weight_per_channel=True,
            weight_observer="min_max",
            activation_dtype="quint8",
            activation_observer=observer,
            milestones=None,
        ),
        module_type_configs={operator.add: None} if scope == "no_residual_add" else {},
        module_name_configs={name: None for name in float_layers},
    )
    quantizer = LinearQuantizer(model, config)
    prepared = quantizer.prepare(example_inputs=(example,))  # a deep copy: `model` is untouched
    prepared.eval()
    _unquantize(prepared, set(float_layers))
    narrowed = 0
    for m in prepared.modules():
        if isinstance(m, aoq.FakeQuantizeBase) and m.dtype == torch.qint8:  # the weights' quantizers
            m.quant_min = m.activation_post_process.quant_min = -127
            narrowed += 1
    if narrowed == 0:
        raise RuntimeError("coremltools' W8A8 quantizer created no int8 weight quantizer to narrow to [-127, 127]")
    prepared.apply(aoq.enable_observer)
    prepared.apply(aoq.disable_fake_quant)
    seen = 0
    with torch.no_grad():
        for b in calibration_batches(images, batch):
            prepared(b)
            seen += len(b)
    if seen == 0:
        raise ValueError("W8A8 calibration got no images; the calibration split is empty or unreadable")
    prepared.apply(aoq.disable_observer)
    if ranges:
        _set_ranges(prepared, ranges)
    prepared.apply(aoq.enable_fake_quant)
    return W8A8Model(quantizer.finalize(inplace=False).eval(), seen, tuple(float_layers), observer, scope)


def _is_fake_quant(gm: torch.fx.GraphModule, node: Any) -> bool:
    import torch.ao.quantization as aoq

    return (isinstance(node, torch.fx.Node) and node.op == "call_module"
            and isinstance(gm.get_submodule(str(node.target)), aoq.FakeQuantizeBase))


_LAYOUT_METHODS = frozenset({"permute", "reshape", "view", "contiguous", "transpose", "flatten"})


def _value_preserving(gm: torch.fx.GraphModule, node: Any) -> bool:
    """Whether ``node`` passes its input's values on unchanged (layout only, or an eval-mode identity)."""
    if node.op == "call_method":
        return str(node.target) in _LAYOUT_METHODS
    if node.op == "call_function":
        return getattr(node.target, "__name__", "") in _LAYOUT_METHODS
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return isinstance(m, torch.nn.Identity) or (type(m).__name__.endswith("DropPath") and not m.training)
    return False


def _quantizers_after(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list[torch.fx.Node]:
    """The fake quantizers reading ``node``'s value: its own users, and those after value-preserving ops (the
    permute back to NCHW, the block's eval-mode DropPath) or after such a quantizer, in graph order."""
    found: list[torch.fx.Node] = []
    for user in node.users:
        if _is_fake_quant(gm, user):
            found += [user, *_quantizers_after(gm, user)]
        elif _value_preserving(gm, user):
            found += _quantizers_after(gm, user)
    return found


def _drop_fake_quant(gm: torch.fx.GraphModule, fq: torch.fx.Node, reader: torch.fx.Node | None = None) -> None:
    """Remove fake quantizer ``fq`` from the graph for ``reader`` (None: for every reader); the module goes
    with its last reader."""
    if reader is None:
        fq.replace_all_uses_with(fq.args[0])
    else:
        reader.replace_input_with(fq, fq.args[0])
    if not fq.users:
        gm.graph.erase_node(fq)
        gm.delete_submodule(str(fq.target))


def _unquantize(gm: torch.fx.GraphModule, float_layers: set[str]) -> int:
    """Remove the fake quantizers that must not round (returns how many were removed):

    * the one in front of every `Shift` (traced as ``x - <float literal>``, GELU's output): the layer after
      the shift reads the centred grid, and nothing rounds on the uncentred one first. A `Restore` (traced
      as ``x + <float literal>``, in front of GELU) keeps the one before it: that is the layer's centred output;
    * those on the inputs (when only float layers read them) and outputs of ``float_layers``: their own
      config is None, but the tool still quantizes what GELU, the permutes and DropPath around them read.
    """
    import operator

    removed = 0
    for node in list(gm.graph.nodes):
        if (node.op == "call_function" and node.target in (operator.sub, torch.sub) and len(node.args) == 2
                and isinstance(node.args[1], float) and _is_fake_quant(gm, node.args[0])):
            _drop_fake_quant(gm, node.args[0], reader=node)
            removed += 1
        elif node.op == "call_module" and str(node.target) in float_layers:
            src = node.args[0]
            if _is_fake_quant(gm, src) and all(u.op == "call_module" and str(u.target) in float_layers
                                               for u in src.users):
                _drop_fake_quant(gm, src)
                removed += 1
            for fq in _quantizers_after(gm, node):
                _drop_fake_quant(gm, fq)
                removed += 1
    if removed:
        gm.graph.lint()
        gm.recompile()
    return removed


def _set_ranges(gm: torch.fx.GraphModule, ranges: Mapping[Point, tuple[float, float]]) -> int:
    """Give the fake quantizers at the covered layers' inputs and outputs the chosen ranges (an observer
    shared by two points takes the union); returns how many were set. A layer's output range also goes to
    the quantizers that re-quantize it after value-preserving ops, or they would round it again on another grid."""
    wanted = RangeUnion()

    def want(node: Any, rng: tuple[float, float]) -> None:
        if _is_fake_quant(gm, node):
            wanted.want(str(node.target), rng)

    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        if Point(name, "input") in ranges:
            want(node.args[0], ranges[Point(name, "input")])
        if Point(name, "output") in ranges:
            for fq in _quantizers_after(gm, node):
                want(fq, ranges[Point(name, "output")])
    for target, (lo, hi) in wanted.items():
        fq = gm.get_submodule(target)
        obs = fq.activation_post_process
        obs.min_val, obs.max_val = torch.tensor(float(lo)), torch.tensor(float(hi))
        scale, zero_point = fq.calculate_qparams()
        fq.scale.resize_(scale.shape).copy_(scale)
        fq.zero_point.resize_(zero_point.shape).copy_(zero_point)
    return len(wanted)


def package_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
