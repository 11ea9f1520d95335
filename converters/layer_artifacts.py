"""What each artifact stores and computes per conv/linear layer, by torch module name, for `converters.layer_report`.

One `LayerSource` per format, each built on the artifact's own file and runtime:

* `TFLiteLayers`: layers paired with the ``.tflite``'s CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED ops
  by litert-torch's scope names (`converters.backends.tflite_flatbuffer.layer_ops`). Outputs: a copy of
  the artifact whose graph also outputs every layer's tensor, run by LiteRT with its default XNNPACK
  delegate (intermediate tensors inside a delegate are not kept otherwise); integer tensors are
  dequantized with their own scale and zero point. Alone: the artifact's own op cut out with the op
  slicer (`edge_convnext.profiling.tflite.ModelSlicer`), with a QUANTIZE before and a DEQUANTIZE after
  it at the op's own tensor scales, so the real kernels and scales run on float input.
* `XnnpackLayers` (ExecuTorch): the delegate is opaque at run time, so outputs come from its payload
  run in torch (`converters.xnnpack_payload`), nodes paired with layers by order and weight shape.
  Alone: the layer's stored weights, bias and activation quantization, simulated in torch.
* `CoreMLLayers`: MIL conv/linear ops paired with layers by their weight constant's name (the torch
  converter names it after the parameter: ``stages_2_layers_4_pwconv1_weight``), then by order and
  shape. Outputs: the Core ML emulator's intermediate values at the program's own precision. Alone:
  the stored (decompressed) weights, bias and, in ``w8a8``, the quantize/dequantize pair around the op,
  simulated in torch in float32.

Tensors handed over are in torch's layout (NCHW for convs, channels last for the linears), float32.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from converters.quant_plan import quantizable_layers
from converters.act_quant import fake_quant_rows
from converters.xnnpack_payload import ActQuant, XnnpackProgram
from edge_convnext.contract import INPUT_CONTRACTS, OUTPUT_CONTRACTS
from edge_convnext.errors import ArtifactError
from edge_convnext.manifest import Manifest


@dataclass(frozen=True)
class DynamicQuant:
    """Activations quantized at run time per row: asymmetric int8 over the last ``dims`` dims of the
    artifact's channels-last layout (1: each pixel's channels; 3: a whole NHWC image)."""

    dims: int = 1

    def fake(self, x: torch.Tensor, conv: bool) -> torch.Tensor:
        if conv and x.dim() == 4:
            return fake_quant_rows(x.permute(0, 2, 3, 1), self.dims).permute(0, 3, 1, 2)
        return fake_quant_rows(x, self.dims)


@dataclass
class StoredLayer:
    """One conv/linear layer as the artifact stores it.

    ``weight``/``bias``: real values in torch's layout (float32), None where the artifact keeps the float
    model's; ``input``/``output``: the activation quantization the artifact applies there, if any.
    """

    name: str
    quantized: bool
    weights: str  # how the weights are stored: "int8/channel", "4-bit LUT", "fp32", "fp16"
    where: str  # the op or node that computes it in the artifact
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    input: ActQuant | DynamicQuant | None = None
    output: ActQuant | None = None

    @property
    def storage(self) -> str:
        """Short text: weights, input and output activations (``-``: float)."""
        return f"w {self.weights}, in {_act(self.input)}, out {_act(self.output)}"

    def to_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "input": _act_dict(self.input), "output": _act_dict(self.output),
                "op": self.where}


def _act(q: ActQuant | DynamicQuant | None) -> str:
    if q is None:
        return "float"
    if isinstance(q, DynamicQuant):
        return "int8 dynamic"
    return "int16" if q.qmax > 255 else ("uint8" if q.qmin == 0 else "int8")


def _act_dict(q: ActQuant | DynamicQuant | None) -> dict[str, Any] | None:
    if q is None:
        return None
    if isinstance(q, DynamicQuant):
        return {"dynamic": True, "rows_over_last_dims": q.dims}
    return q.to_dict()


@torch.no_grad()
def simulate_layer(module: nn.Module, stored: StoredLayer, x: torch.Tensor) -> torch.Tensor:
    """``module``'s output on ``x`` with only what ``stored`` says quantized: its input and output
    activations rounded to the artifact's grids, its stored weights and bias (float32 arithmetic)."""
    conv = isinstance(module, nn.Conv2d)
    if isinstance(stored.input, DynamicQuant):
        x = stored.input.fake(x, conv)
    elif stored.input is not None:
        x = stored.input.fake(x)
    w = module.weight if stored.weight is None else stored.weight.reshape(module.weight.shape)
    b = module.bias if stored.weight is None else stored.bias
    if conv:
        y = F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)
    else:
        y = F.linear(x, w, b)
    return stored.output.fake(y) if stored.output is not None else y


class LayerSource(Protocol):
    """An artifact seen layer by layer (see module doc)."""

    runtime: str  # what computed the intermediates
    how_outputs: str
    how_alone: str
    layers: dict[str, StoredLayer]

    def outputs(self, x: np.ndarray, want: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """float32 NCHW ``[N, 3, 224, 224]`` in [0, 1] -> (log-probabilities ``[N, 1000]`` of that run,
        {layer: its output ``[N, ...]`` in the artifact's layout} for the layers in ``want``)."""
        ...

    def to_torch(self, name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A layer output from `outputs` -> torch's layout and ``shape``."""
        ...

    def alone(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The layer's output on float input ``x`` (torch layout, ``[N, ...]``) with it alone quantized as stored."""
        ...


def open_layers(artifact: Path, manifest: Manifest, model: nn.Module, threads: int | None) -> LayerSource:
    """The `LayerSource` for ``artifact``'s format; ``model`` is the float export model it was built from."""
    ext = Path(artifact).suffix
    if ext == ".tflite":
        return TFLiteLayers(Path(artifact), manifest, model, threads)
    if ext == ".pte":
        return XnnpackLayers(Path(artifact), manifest, model)
    if ext == ".mlpackage":
        return CoreMLLayers(Path(artifact), manifest, model)
    raise ArtifactError(f"{artifact}: no per-layer report for this kind of file")


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d)


def _to_torch(a: np.ndarray, conv: bool, shape: tuple[int, ...]) -> np.ndarray:
    """An artifact tensor in channels-last layout -> torch's ``shape`` (NCHW for a conv's output)."""
    if conv and len(shape) == 4:
        n, c, h, w = shape
        return np.ascontiguousarray(a.reshape(n, h, w, c).transpose(0, 3, 1, 2))
    return a.reshape(shape)


# --- TFLite -----------------------------------------------------------------------------------------

_INT_RANGE = {"INT8": (-128, 127), "UINT8": (0, 255), "INT16": (-32768, 32767)}
_NP = {"INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FLOAT32": np.float32,
       "FLOAT16": np.float16}


class TFLiteLayers:
    """A ``.tflite`` layer by layer (see module doc)."""

    runtime = "litert"

    def __init__(self, artifact: Path, manifest: Manifest, model: nn.Module, threads: int | None) -> None:
        from ai_edge_litert import schema_py_generated as schema

        from converters.backends import tflite_flatbuffer as fb
        from edge_convnext.profiling.tflite import ModelSlicer

        self.artifact, self.threads = artifact, threads
        self.data = artifact.read_bytes()
        self.slicer = ModelSlicer(self.data, str(artifact))
        self._schema = schema
        self._types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        self.modules = dict(quantizable_layers(model))
        try:
            ops = fb.layer_ops(self.data, [(n, type(m).__name__) for n, m in self.modules.items()])
        except ValueError as e:
            raise ArtifactError(f"{artifact}: its conv/fully-connected ops do not pair with the float model's layers "
                                f"({e}); was it built from these weights and rewrites?") from e
        g = self.slicer.graph
        by_name = {(t.name.decode() if isinstance(t.name, bytes) else t.name): i for i, t in enumerate(g.tensors)}
        writer = {t: i for i, op in enumerate(g.operators) for t in op.outputs}
        self._writer = writer
        self.op_index: dict[str, int] = {}
        self.layers: dict[str, StoredLayer] = {}
        for name, lop in ops.items():
            k = writer[by_name[lop.output]]
            self.op_index[name] = k
            self.layers[name] = self._stored(name, k, self.modules[name])
        self.how_outputs = ("the artifact's own tensors: a copy of the .tflite whose graph also outputs every layer's "
                            "tensor, run by LiteRT with its default XNNPACK delegate; int8/int16 tensors dequantized "
                            "with their scale and zero point")
        self.how_alone = ("the artifact's own op, cut out with the op slicer, with QUANTIZE/DEQUANTIZE at the op's own "
                          "tensor scales around it (the real LiteRT kernels, XNNPACK where it takes them), fed the "
                          "float model's input to the layer; its output replaces the layer's in the float model")

    def _tensor(self, t: int) -> tuple[str, np.ndarray | None, Any]:
        x = self.slicer.graph.tensors[t]
        kind = self._types.get(x.type, str(x.type))
        raw = self.slicer._buffer_bytes(t)
        data = None if raw is None else np.frombuffer(raw.tobytes(), dtype=_NP[kind]).reshape(list(x.shape))
        return kind, data, x.quantization

    def _weight_tensor(self, t: int) -> int:
        """The constant behind a layer's weight input: itself, or the float16 (or int8) constant a
        DEQUANTIZE op expands at run time (float layers stored as float16 weights)."""
        k = self._writer.get(t)
        if self.slicer._buffer_bytes(t) is None and k is not None and self.slicer.op_names[k] == "DEQUANTIZE":
            return self.slicer.graph.operators[k].inputs[0]
        return t

    def _act(self, t: int, dynamic_dims: int) -> ActQuant | DynamicQuant | None:
        kind, _, q = self._tensor(t)
        if kind in _INT_RANGE and q is not None and q.scale is not None and len(q.scale):
            lo, hi = _INT_RANGE[kind]
            return ActQuant(float(q.scale[0]), int(q.zeroPoint[0]) if q.zeroPoint is not None else 0, lo, hi)
        return None

    def _stored(self, name: str, k: int, module: nn.Module) -> StoredLayer:
        op = self.slicer.graph.operators[k]
        kind = self.slicer.op_names[k]
        wkind, w, wq = self._tensor(self._weight_tensor(op.inputs[1]))
        where = f"op {k} {kind}"
        if w is None:
            raise ArtifactError(f"{self.artifact}: {where} ({name}) has no constant weights")
        real = w.astype(np.float32)
        quantized = wkind in ("INT8", "INT16") and wq is not None and wq.scale is not None
        if quantized:
            shape = [1] * real.ndim
            shape[wq.quantizedDimension] = -1
            real = real * np.asarray(wq.scale, dtype=np.float32).reshape(shape)
        if kind == "CONV_2D":
            real = real.transpose(0, 3, 1, 2)  # OHWI -> OIHW
        elif kind == "DEPTHWISE_CONV_2D":
            real = real.transpose(3, 0, 1, 2)  # 1HWC -> C1HW
        bias = None
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            bkind, b, bq = self._tensor(op.inputs[2])
            bias = b.astype(np.float32).reshape(-1) if b is not None else None
            if bias is not None and bkind in ("INT32", "INT64") and bq is not None and bq.scale is not None:
                bias = bias * np.asarray(bq.scale, dtype=np.float32).reshape(-1)
        weight = torch.from_numpy(np.ascontiguousarray(real)).reshape(module.weight.shape)
        act_in = self._act(op.inputs[0], 1)
        if quantized and act_in is None:
            # dynamic range: LiteRT quantizes a FULLY_CONNECTED input per row, a CONV_2D input per image
            act_in = DynamicQuant(1 if kind == "FULLY_CONNECTED" else 3)
        return StoredLayer(name, quantized, f"{wkind.lower()}/channel" if quantized else wkind.lower(), where, weight,
                           None if bias is None else torch.from_numpy(bias), act_in, self._act(op.outputs[0], 1))

    def outputs(self, x: np.ndarray, want: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from converters.backends import tflite_flatbuffer as fb
        from edge_convnext.runners.tflite import _interpreter_class

        m = fb._read(self.data)
        sg = m.subgraphs[0]
        wanted = {name: self.slicer.graph.operators[self.op_index[name]].outputs[0] for name in want}
        sg.outputs = list(sg.outputs) + [t for t in wanted.values() if t not in sg.outputs]
        cls, _ = _interpreter_class()
        it = cls(model_content=fb._write(m), num_threads=self.threads)
        it.allocate_tensors()
        inp, out = it.get_input_details()[0], sg.outputs[0]
        fed = INPUT_CONTRACTS["rgb-nhwc-unit"].feed(x)
        probs, got = [], {n: [] for n in want}
        for i in range(len(x)):
            it.set_tensor(inp["index"], fed[i: i + 1])
            it.invoke()
            probs.append(it.get_tensor(out).reshape(1, -1).astype(np.float32))
            for name, t in wanted.items():
                got[name].append(self._real(t, it.get_tensor(t)))
        layers = {}
        for name in want:
            shape = (len(x),) + tuple(got[name][0].shape[1:])
            layers[name] = np.concatenate(got[name]).reshape(shape)
        return OUTPUT_CONTRACTS["probabilities"].log_scores(np.concatenate(probs)), layers

    def _real(self, t: int, a: np.ndarray) -> np.ndarray:
        kind, _, q = self._tensor(t)
        if kind in _INT_RANGE and q is not None and q.scale is not None and len(q.scale):
            zp = int(q.zeroPoint[0]) if q.zeroPoint is not None else 0
            return ((a.astype(np.float32) - zp) * np.float32(q.scale[0])).astype(np.float32)
        return a.astype(np.float32)

    def to_torch(self, name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return _to_torch(a, _is_conv(self.modules[name]), shape)

    _pieces: dict[str, Any] | None = None

    def alone(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        it = self._piece(name)
        d_in, d_out = it.get_input_details()[0], it.get_output_details()[0]
        conv = _is_conv(module)
        outs = []
        for i in range(x.shape[0]):
            xi = x[i: i + 1]
            a = (xi.permute(0, 2, 3, 1) if conv else xi).contiguous().numpy()
            it.set_tensor(d_in["index"], a.reshape(d_in["shape"]).astype(np.float32))
            it.invoke()
            y = it.get_tensor(d_out["index"])
            outs.append(y)
        y = np.concatenate(outs).astype(np.float32)
        shape = (x.shape[0], module.out_channels, *y.shape[1:3]) if conv else (x.shape[0], *y.shape[1:])
        return torch.from_numpy(_to_torch(y, conv, shape))

    def _piece(self, name: str) -> Any:
        """A LiteRT interpreter running the layer's op alone, float in and out (see module doc)."""
        from edge_convnext.runners.tflite import _interpreter_class

        if self._pieces is None:
            self._pieces = {}
            self._all_pieces = {p.index: p for p in self.slicer.pieces()}
        if name not in self._pieces:
            piece = self._all_pieces[self.op_index[name]]
            if len(piece.inputs) != 1:
                raise ArtifactError(f"{self.artifact}: op {piece.index} ({name}) reads {len(piece.inputs)} activations; "
                                    "expected one")
            content = float_io(self.slicer.model_bytes(piece), self.slicer.model)
            cls, _ = _interpreter_class()
            it = cls(model_content=content, num_threads=self.threads)
            it.allocate_tensors()
            self._pieces[name] = it
        return self._pieces[name]


def float_io(piece: bytes, source: Any) -> bytes:
    """A one-op model (`ModelSlicer.model_bytes`) with float32 inputs and outputs: a QUANTIZE before every
    integer input and a DEQUANTIZE after every integer output, at those tensors' own scales.

    ``source``: the artifact's ``ModelT``, whose operator codes (versions) the new ops reuse when it has them.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    m = schema.ModelT.InitFromPackedBuf(piece, 0)
    sg = m.subgraphs[0]
    ints = {schema.TensorType.INT8, schema.TensorType.UINT8, schema.TensorType.INT16}

    def code(builtin: int) -> int:
        for i, c in enumerate(m.operatorCodes):
            if fbu.get_builtin_code_from_operator_code(c) == builtin:
                return i
        version = max([c.version for c in source.operatorCodes
                       if fbu.get_builtin_code_from_operator_code(c) == builtin] or [1])
        c = schema.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = builtin, min(builtin, 127), version
        m.operatorCodes.append(c)
        return len(m.operatorCodes) - 1

    def float_twin(t: int, suffix: str) -> int:
        x = sg.tensors[t]
        f = schema.TensorT()
        f.shape, f.type, f.buffer = list(x.shape), schema.TensorType.FLOAT32, 0
        f.name = (x.name or b"t") + suffix.encode()
        sg.tensors.append(f)
        return len(sg.tensors) - 1

    def op(builtin: int, i: int, o: int) -> Any:
        new = schema.OperatorT()
        new.opcodeIndex, new.inputs, new.outputs = code(builtin), [i], [o]
        return new

    before, after = [], []
    sg.inputs, sg.outputs = [int(t) for t in sg.inputs], [int(t) for t in sg.outputs]
    for k, t in enumerate(list(sg.inputs)):
        if sg.tensors[t].type in ints:
            f = float_twin(t, "/float_in")
            before.append(op(schema.BuiltinOperator.QUANTIZE, f, t))
            sg.inputs[k] = f
    for k, t in enumerate(list(sg.outputs)):
        if sg.tensors[t].type in ints:
            f = float_twin(t, "/float_out")
            after.append(op(schema.BuiltinOperator.DEQUANTIZE, t, f))
            sg.outputs[k] = f
    sg.operators = before + list(sg.operators) + after
    return bytes(fbu.convert_object_to_bytearray(m))


# --- ExecuTorch (XNNPACK) ---------------------------------------------------------------------------


class XnnpackLayers:
    """A ``.pte`` with one whole-graph XNNPACK delegate, layer by layer (see module doc)."""

    runtime = "xnnpack payload emulated in torch"

    def __init__(self, artifact: Path, manifest: Manifest, model: nn.Module) -> None:
        self.artifact = artifact
        self.program = XnnpackProgram.read(artifact)
        self.modules = dict(quantizable_layers(model))
        self.node: dict[str, Any] = {}
        nodes = self.program.layer_nodes()
        k = 0
        for name, module in self.modules.items():
            want = tuple(module.weight.shape)
            while k < len(nodes) and tuple(self.program.weight(nodes[k]).shape) != want:
                k += 1  # LayerNorm sums and means become 1-output linears/convs: not layers of the model
            if k == len(nodes):
                raise ArtifactError(f"{artifact}: no XNNPACK node after the previous layer's has {name}'s weight shape "
                                    f"{list(want)}; was it built from these weights and rewrites?")
            self.node[name] = nodes[k]
            k += 1
        self.layers = {name: self._stored(name, node) for name, node in self.node.items()}
        self.how_outputs = ("the delegate's XNNPACK subgraph read from the .pte payload (nodes, int8 weights, per-channel "
                            "and per-tensor scales) and run in torch, every quantized value rounded to its grid; nodes "
                            "paired with layers by order and weight shape. The runtime itself keeps no intermediates")
        self.how_alone = ("the layer's weights and bias as the payload stores them, its input and output rounded to the "
                          "payload's grids (per row at run time for dynamic int8), in the float torch model")

    def _stored(self, name: str, node: Any) -> StoredLayer:
        p = self.program
        w = p.values[node.filter]
        quantized = w.quantized
        inp, out = p.values[node.input], p.values[node.output]
        act_in: ActQuant | DynamicQuant | None = inp.quant
        if inp.dynamic is not None:
            act_in = DynamicQuant(inp.dynamic)
        return StoredLayer(name, quantized, "int8/channel" if w.dtype == "qcint8" else w.dtype,
                           f"node {node.index} {node.kind}", p.weight(node).clone(),
                           None if node.bias is None else p.values[node.bias].data, act_in, out.quant)

    def outputs(self, x: np.ndarray, want: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ids = {name: self.node[name].output for name in want}
        probs, got = [], {n: [] for n in want}
        for i in range(len(x)):
            y, kept = self.program.run(torch.from_numpy(np.ascontiguousarray(x[i: i + 1])), set(ids.values()))
            probs.append(y.reshape(1, -1).numpy())
            for name, vid in ids.items():
                got[name].append(kept[vid].numpy())
        layers = {name: np.concatenate(v) for name, v in got.items()}
        return OUTPUT_CONTRACTS["probabilities"].log_scores(np.concatenate(probs)), layers

    def to_torch(self, name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return _to_torch(a, self.node[name].kind != "XNNFullyConnected", shape)

    def alone(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return simulate_layer(module, self.layers[name], x)


# --- Core ML ----------------------------------------------------------------------------------------

_WEIGHT_NAME = re.compile(r"^(?P<layer>.+?)_weight(_to_fp16|_to_fp32|_cast_fp16|_cast_fp32)?(_quantized|_palettized)?$")


class CoreMLLayers:
    """An ``.mlpackage`` layer by layer (see module doc)."""

    runtime = "coreml-emulated"

    def __init__(self, artifact: Path, manifest: Manifest, model: nn.Module) -> None:
        from edge_convnext.coreml_emulator import CoreMLEmulator
        from edge_convnext.coreml_emulator.program import load_package

        self.artifact, self.manifest = artifact, manifest
        self.emulator = CoreMLEmulator(artifact)
        _, prog = load_package(artifact)
        self.modules = dict(quantizable_layers(model))
        ops = [op for op in prog.functions["main"].operations if op.op_type in ("conv", "linear")]
        key = {n.replace(".", "_"): n for n in self.modules}
        self.op: dict[str, Any] = {}
        for op in ops:
            m = _WEIGHT_NAME.match(op.inputs["weight"].name)
            if m and m["layer"] in key and key[m["layer"]] not in self.op:
                self.op[key[m["layer"]]] = op
        missing = [n for n in self.modules if n not in self.op]
        if missing:  # names that do not carry the module path: pair the rest by order and weight shape
            rest = [op for op in ops if op not in self.op.values()]
            k = 0
            for name in missing:
                want = tuple(self.modules[name].weight.shape)
                while k < len(rest) and tuple(rest[k].inputs["weight"].shape) != want:
                    k += 1
                if k == len(rest):
                    raise ArtifactError(f"{artifact}: no conv/linear op of the ML program pairs with layer {name} "
                                        f"(weight {list(want)}); was it built from these weights and rewrites?")
                self.op[name] = rest[k]
                k += 1
        self.layers = {name: self._stored(name, self.op[name]) for name in self.modules}
        self.how_outputs = ("the Core ML emulator's intermediate values (each conv/linear op's output, in W8A8 after its "
                            "quantize/dequantize) at the program's own precision (fp16 compute: its rounding is part "
                            "of the error); ops paired with layers by their weight constant's name")
        self.how_alone = ("the layer's weights and bias as the package stores them (decompressed), and in W8A8 the "
                          "quantize/dequantize around the op, in the float torch model (float32 compute)")

    def _stored(self, name: str, op: Any) -> StoredLayer:
        wop = op.inputs["weight"].op
        if wop is not None and wop.op_type.startswith("constexpr_"):
            weight = np.asarray(wop.materialized_val_inference(), dtype=np.float32)
            kind = {"constexpr_affine_dequantize": "int8/channel", "constexpr_lut_to_dense": "LUT",
                    "constexpr_blockwise_shift_scale": "int/block"}.get(wop.op_type, wop.op_type)
            if kind == "LUT":  # iOS16: one table [2^bits]; iOS18: [..., 2^bits, vector size]
                lut = np.asarray(wop.inputs["lut"].val)
                kind = f"{int(np.log2(lut.shape[0] if lut.ndim == 1 else lut.shape[-2]))}-bit LUT"
            quantized = True
        else:
            raw = np.asarray(op.inputs["weight"].val)
            weight, kind, quantized = raw.astype(np.float32), ("fp16" if raw.dtype == np.float16 else "fp32"), False
        bias = op.inputs.get("bias")
        b = None if bias is None or bias.val is None else torch.from_numpy(np.asarray(bias.val, dtype=np.float32))
        act_in = _mil_act(op.inputs["x"].op, "dequantize")
        out_q = _only_child(op.outputs[0], "quantize")
        act_out = _mil_act(out_q, "quantize") if out_q is not None else None
        if act_in is not None or act_out is not None:
            quantized = True
        return StoredLayer(name, quantized, kind, f"{op.op_type} {op.name}",
                           torch.from_numpy(np.ascontiguousarray(weight)).reshape(self.modules[name].weight.shape),
                           b, act_in, act_out)

    def outputs(self, x: np.ndarray, want: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        contract = INPUT_CONTRACTS[self.manifest.input.contract or "rgb-image"]
        feature = self.manifest.input.name
        probs_name = self.manifest.output.name
        names = {n: _carried_output(self.op[n]) for n in want}
        pixels = contract.feed(x)
        probs, got = [], {n: [] for n in want}
        for i in range(len(x)):
            out = self.emulator.predict({feature: pixels[i: i + 1]}, keep=tuple(names.values()))
            probs.append(np.asarray(out[probs_name], dtype=np.float32).reshape(1, -1))
            for n, v in names.items():
                got[n].append(np.asarray(out[v], dtype=np.float32))
        layers = {n: np.concatenate(v) for n, v in got.items()}
        return OUTPUT_CONTRACTS["probabilities"].log_scores(np.concatenate(probs)), layers

    def to_torch(self, name: str, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return a.reshape(shape)  # ML programs from torch keep torch's layouts

    def alone(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return simulate_layer(module, self.layers[name], x)


def _carried_output(op: Any) -> str:
    """The name of the value the network carries on from a conv/linear op: in W8A8 its output after the
    quantize/dequantize pair (what `simulate_layer` computes, like LiteRT's int8 output tensor), else
    the op's own output."""
    out = op.outputs[0]
    q = _only_child(out, "quantize")
    dq = _only_child(q.outputs[0], "dequantize") if q is not None else None
    return str((dq.outputs[0] if dq is not None else out).name)


def _only_child(var: Any, op_type: str) -> Any | None:
    """The one op of ``op_type`` reading MIL value ``var``; None when there is none or several."""
    found = [c for c in var.child_ops if c.op_type == op_type]
    return found[0] if len(found) == 1 else None


def _mil_act(op: Any, kind: str) -> ActQuant | None:
    """The grid of a W8A8 activation: a ``quantize`` op's, or for a ``dequantize`` (a layer's input) its own.

    A layer reads the real values ``(q - zp) * scale`` of the dequantize in front of it. coremltools
    rescales the two sides of residual adds (a quantize and the dequantize reading it with scales ~25x
    apart, undone after the add), so the quantize's scale does not describe the layer's input grid.
    """
    if op is None or op.op_type != kind:
        return None
    src = op if kind == "quantize" else op.inputs["input"].op
    if src is None or src.op_type != "quantize":
        return None
    dtype = str(src.inputs["output_dtype"].val)
    lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
    zp = op.inputs.get("zero_point")
    return ActQuant(float(np.asarray(op.inputs["scale"].val).reshape(-1)[0]),
                    int(np.asarray(zp.val).reshape(-1)[0]) if zp is not None else 0, lo, hi)
