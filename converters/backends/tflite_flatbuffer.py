"""Edits of a TFLite flatbuffer: bias-shape fix before quantization, metadata and embedded files, graph facts.

Uses the flatbuffer object API shipped with ``ai_edge_litert`` (``schema_py_generated`` and
``tools.flatbuffer_utils``); nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.tools import flatbuffer_utils as fbu

from edge_convnext.runners.tflite import METADATA_PREFIX

_FULLY_CONNECTED = schema.BuiltinOperator.FULLY_CONNECTED


def _read(model: bytes) -> schema.ModelT:
    # read_model_from_bytearray also inlines the buffers kept after the flatbuffer (ai-edge-quantizer
    # writes its outputs that way), as bytearray slices: make them uint8 arrays, which Pack() writes
    # in one copy instead of byte by byte (minutes for 30 MB of weights).
    m = fbu.read_model_from_bytearray(bytearray(model))
    for buf in m.buffers or []:
        if buf.data is not None and not isinstance(buf.data, np.ndarray):
            buf.data = np.frombuffer(bytes(buf.data), dtype=np.uint8)
    return m


def _write(m: schema.ModelT) -> bytes:
    return bytes(fbu.convert_object_to_bytearray(m))


def flatten_fc_biases(model: bytes) -> tuple[bytes, int]:
    """Give every FULLY_CONNECTED bias the 1-D shape ``[C]``; returns (model, number changed).

    litert-torch folds ConvNeXt's layer scale into ``pwconv2`` and leaves that bias shaped
    ``[1, 1, 1, C]``. ai-edge-quantizer 0.10 quantizes a bias per channel along dimension 0, so the
    int32 bias gets C scales on a dimension of size 1, and the interpreter refuses the file
    ("num_scales must be 1 for per-layer quantization ... got 768"). The values and the float
    results are unchanged; only the shape metadata of a constant is rewritten.
    """
    m = _read(model)
    changed = 0
    for sg in m.subgraphs:
        for op in sg.operators:
            if fbu.get_builtin_code_from_operator_code(m.operatorCodes[op.opcodeIndex]) != _FULLY_CONNECTED:
                continue
            if len(op.inputs) < 3 or op.inputs[2] < 0:
                continue
            bias = sg.tensors[op.inputs[2]]
            shape = [int(d) for d in bias.shape]
            if len(shape) > 1:
                bias.shape = [int(np.prod(shape))]
                bias.shapeSignature = None
                changed += 1
    return (_write(m), changed) if changed else (model, 0)


def output_ops(model: bytes, depth: int = 2) -> list[tuple[str, str]]:
    """(op name, output tensor name) of the op writing the model's single output, then of the op
    feeding its first input, and so on for ``depth`` ops (e.g. SOFTMAX, then FULLY_CONNECTED)."""
    m = _read(model)
    sg = m.subgraphs[0]
    if len(sg.outputs) != 1:
        return []
    writer = {t: op for op in sg.operators for t in op.outputs}
    chain, tensor = [], sg.outputs[0]
    while len(chain) < depth and tensor in writer:
        op = writer[tensor]
        chain.append((fbu.opcode_to_name(m, op.opcodeIndex) or "?", sg.tensors[tensor].name.decode("utf-8")))
        tensor = op.inputs[0]
    return chain


def tensor_writers(model: bytes) -> dict[str, str]:
    """Every tensor name of ``model``'s graph, in flatbuffer order -> the op type writing it (``"INPUT"`` for
    the graph's inputs, ``"CONSTANT"`` for tensors no op writes)."""
    m = _read(model)
    sg = m.subgraphs[0]
    writer = {t: fbu.opcode_to_name(m, op.opcodeIndex) or "?" for op in sg.operators for t in op.outputs}
    inputs = set(sg.inputs)
    return {t.name.decode("utf-8"): writer.get(i, "INPUT" if i in inputs else "CONSTANT") for i, t in enumerate(sg.tensors)}


_LAYER_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


class LayerOp(NamedTuple):
    """The TFLite op a torch layer became: op name and the names of its activation input and output."""

    kind: str
    output: str
    input: str


def layer_ops(model: bytes, layers: Sequence[tuple[str, str]]) -> dict[str, LayerOp]:
    """Torch layer name -> the `LayerOp` it became, for a litert-torch conversion.

    ``layers``: (module name, class name) of every conv/linear of the converted module in network order
    (`converters.quant_plan.quantizable_layers`), e.g. ``("stages.2.layers.4.pwconv1", "Linear")``.
    litert-torch names each op's output after the chain of module calls that made it, one
    ``<Class>_<attribute>`` per call (``.../ConvNextStage_2/ConvNextLayer_4/Linear_pwconv1;2``), so the
    CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED ops, in graph order, pair with the layers in network
    order; each pair is checked by its last scope (class and attribute) and its stage/layer indices.
    Raises ValueError when the graph does not pair up (a converter that renamed or fused layers).
    """
    m = _read(model)
    sg = m.subgraphs[0]
    ops = [LayerOp(kind, sg.tensors[op.outputs[0]].name.decode("utf-8"), sg.tensors[op.inputs[0]].name.decode("utf-8"))
           for op in sg.operators if (kind := fbu.opcode_to_name(m, op.opcodeIndex) or "") in _LAYER_OPS]
    if len(ops) != len(layers):
        raise ValueError(f"{len(ops)} conv/fully-connected ops in the .tflite, {len(layers)} conv/linear layers "
                         "in the torch model: cannot pair them")
    out: dict[str, LayerOp] = {}
    for (name, cls), op in zip(layers, ops):
        tensor = op.output
        scopes = [part for part in tensor.split(";")[0].split("/")]
        leaf = f"{cls}_{name.rsplit('.', 1)[-1]}"
        indices = re.findall(r"(?:stages|layers)\.(\d+)", name)
        found = re.findall(r"(?:Stage|Layer)_(\d+)", tensor.split(";")[0])
        if not scopes[-1].endswith(leaf) or (indices and indices != found[-len(indices):]):
            raise ValueError(f"layer {name} ({cls}) does not pair with the .tflite op writing {tensor!r}")
        out[name] = op
    return out


def scope_regex(tensor_name: str) -> str:
    """ai-edge-quantizer regex matching exactly the op whose only output is ``tensor_name``.

    The quantizer names an op's scope by its output tensor names joined with ';' plus a trailing ';'.
    """
    return f"^{re.escape(tensor_name)};$"


def finalize(model: bytes, files: Mapping[str, bytes], model_metadata: bytes) -> bytes:
    """Shorten tensor names (`short_tensor_name`), attach the TFLite Model Metadata and embed ``files``.

    ``model_metadata`` (a ``ModelMetadata`` flatbuffer, `tflite_metadata.metadata_buffer`) becomes the
    ``TFLITE_METADATA`` entry; ``files`` (its associated files) go into a zip of stored entries appended
    after the flatbuffer, as the metadata populator lays them out (the interpreter ignores trailing
    bytes, ``zipfile`` and MediaPipe list the files). The same files are also kept as flatbuffer
    ``metadata`` entries (``edge_convnext/<name>``), which survive tools that re-serialize the
    flatbuffer and drop trailing bytes.
    """
    from converters.backends.tflite_metadata import METADATA_NAME, stored_zip

    m = _read(model)
    for sg in m.subgraphs:
        for t in sg.tensors:
            if t.name:
                t.name = short_tensor_name(t.name.decode("utf-8") if isinstance(t.name, bytes) else t.name)
    entries = {f"{METADATA_PREFIX}{n}": data for n, data in files.items()} | {METADATA_NAME: model_metadata}
    m.metadata = [e for e in (m.metadata or []) if _name(e) not in entries]
    for name, data in entries.items():
        buf = schema.BufferT()
        buf.data = np.frombuffer(data, dtype=np.uint8)
        m.buffers.append(buf)
        entry = schema.MetadataT()
        entry.name = name
        entry.buffer = len(m.buffers) - 1
        m.metadata.append(entry)
    return _write(m) + stored_zip(dict(files))


def short_tensor_name(name: str) -> str:
    """Drop Python module paths from litert-torch's scope names, keeping the module hierarchy.

    ``converters.model.ExportClassifier/transformers.models.convnext.modeling_convnext.ConvNextStage_3/
    torch.nn.modules.linear.Linear_pwconv2;1`` -> ``ExportClassifier/ConvNextStage_3/Linear_pwconv2;1``.
    Empty and repeated ';'-joined parts are dropped. Saves ~150 kB at full size, which keeps the int8 file
    under 30 MB; names carry no meaning for the interpreter (signatures refer to tensor indices).
    """
    parts: list[str] = []
    for part in name.split(";"):
        short = "/".join(_MODULE_PATH.sub("", c) for c in part.split("/"))
        if short and short not in parts:
            parts.append(short)
    return ";".join(parts) or name


_MODULE_PATH = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*\.)+(?=[A-Za-z_])")


def _name(entry: schema.MetadataT) -> str:
    n = entry.name
    return n.decode("utf-8") if isinstance(n, bytes) else str(n)
