"""An ExecuTorch ``.pte``'s XNNPACK delegate, read from its payload and run in torch with fake quantization.

The XNNPACK delegate is one opaque call at run time: the runtime logs no intermediate tensor inside it
(ExecuTorch's numeric debugger treats a delegate call as one operator). Its payload, however, is the
whole XNNPACK subgraph the runtime builds: every node (conv, fully-connected, add, GELU, transpose,
convert, ...) with its values' datatypes, shapes and quantization parameters, and the constant data
(int8 weights, per-channel scales, int32 biases). `XnnpackProgram` reads it with ExecuTorch's own
pieces:

* ``executorch.exir._serialize._program.deserialize_pte_binary``: the program, its delegate payload,
  its named data (where XNNPACK 1.x keeps weights) and the constant tensors the delegate call passes in;
* ``XNNHeader`` and the official flatbuffer schema ``schema.fbs`` of
  ``executorch.backends.xnnpack.serialization``, compiled to Python by the ``flatc`` that ships in the
  executorch wheel (``flatc --python --gen-object-api``, once per process, into a temporary directory).
  flatc's JSON output would be simpler but prints floats with 6 significant digits, which would change
  every per-tensor scale.

`XnnpackProgram.run` then executes the subgraph node by node in torch (float32), every value held as
real numbers: a value whose datatype is quantized is rounded to its grid when a node writes it
(``qint8`` per tensor: ``(clamp(round(x / s) + zp, -128, 127) - zp) * s``; ``qdint8``: per row, ranges
from the row itself, as XNNPACK's dynamic quantization computes them), constant ``qcint8`` weights and
``qcint32`` biases are dequantized with their per-channel scales. That is XNNPACK's arithmetic up to
the rounding of its integer requantization (an ulp of the int8 grid on ties), which `run` does not
model; `converters.layer_report` measures the agreement with the real runtime on every report.
"""

from __future__ import annotations

import atexit
import importlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from converters.act_quant import fake_quant_rows
from edge_convnext.errors import ArtifactError, EdgeConvNextError, first_line

XNNPACK_BACKEND = "XnnpackBackend"
_INVALID = 0xFFFFFFFF  # XNN_INVALID_VALUE_ID: no bias
_TRANSPOSE_WEIGHTS = 0x1  # XNN_FLAG_TRANSPOSE_WEIGHTS on a fully-connected node: filter is [in, out]
_REBUILD = "rebuild it with `edge-convnext convert`"
_schema_module: Any = None


def _schema() -> Any:
    """The XNNPACK flatbuffer schema as Python classes (package ``fb_xnnpack``), generated once per process."""
    global _schema_module
    if _schema_module is not None:
        return _schema_module
    import importlib.resources as resources

    import executorch.backends.xnnpack.serialization as serialization
    from executorch.exir._serialize._flatbuffer import _get_flatc_path

    out = Path(tempfile.mkdtemp(prefix="edge-convnext-xnnpack-schema-"))
    atexit.register(shutil.rmtree, out, True)
    schema = out / "schema.fbs"
    schema.write_bytes(resources.files(serialization).joinpath("schema.fbs").read_bytes())
    try:
        subprocess.run([_get_flatc_path(), "--python", "--gen-object-api", "-o", str(out), str(schema)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise EdgeConvNextError(f"cannot compile ExecuTorch's XNNPACK schema with its flatc ({first_line(e)})") from e
    sys.path.insert(0, str(out))  # the generated modules import each other as ``fb_xnnpack.*``, lazily
    for union in ("XNodeUnion", "XValueUnion", "XNNQuantParams"):
        # flatc 24.3 names a union's creator ``XnodeUnionCreator`` and calls it ``XNodeUnionCreator``
        mod = importlib.import_module(f"fb_xnnpack.{union}")
        creator = next(getattr(mod, k) for k in dir(mod) if k.endswith("Creator"))
        setattr(mod, f"{union}Creator", creator)
    _schema_module = importlib.import_module("fb_xnnpack.XNNGraph")
    return _schema_module


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor affine quantization of an activation: ``real = scale * (q - zero_point)``, ``q`` in [qmin, qmax]."""

    scale: float
    zero_point: int
    qmin: int = -128
    qmax: int = 127

    def fake(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` rounded to this grid (round half to even), as real numbers of the same dtype and shape."""
        q = torch.clamp(torch.round(t / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale

    def to_dict(self) -> dict[str, float]:
        return {"scale": float(self.scale), "zero_point": int(self.zero_point), "qmin": self.qmin, "qmax": self.qmax}


@dataclass
class Value:
    """One XNNPACK value. ``data``: a constant's real values (float32, XNNPACK's layout), else None.
    ``quant``: the grid a written activation is rounded to; ``dynamic``: rows quantized at run time over
    the last ``dynamic`` dims (``qdint8``); ``external``: the delegate call's argument index, if any."""

    id: int
    dtype: str
    dims: tuple[int, ...]
    data: torch.Tensor | None = None
    quant: ActQuant | None = None
    dynamic: int | None = None
    external: int | None = None

    @property
    def quantized(self) -> bool:
        return self.dtype not in ("fp32", "fp16")


@dataclass(frozen=True)
class Node:
    """One XNNPACK node: its union type name (``XNNConv2d``), its table (flatbuffer object API), its output."""

    kind: str
    table: Any
    output: int
    index: int

    @property
    def input(self) -> int:
        t = self.table
        return int(getattr(t, "input1Id", getattr(t, "inputId", -1)))

    @property
    def filter(self) -> int | None:
        return int(self.table.filterId) if hasattr(self.table, "filterId") else None

    @property
    def bias(self) -> int | None:
        b = getattr(self.table, "biasId", _INVALID)
        return None if b == _INVALID else int(b)


LAYER_NODES = ("XNNConv2d", "XNNDepthwiseConv2d", "XNNFullyConnected")
_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "XNNConvert": lambda x: x, "XNNCopy": lambda x: x, "XNNGelu": F.gelu, "XNNTanh": torch.tanh,
    "XNNSigmoid": torch.sigmoid, "XNNExp": torch.exp, "XNNLog": torch.log, "XNNAbs": torch.abs,
    "XNNNegate": torch.neg, "XNNSquare": torch.square, "XNNSquareRoot": torch.sqrt,
    "XNNReciprocalSquareRoot": torch.rsqrt, "XNNFloor": torch.floor, "XNNCeiling": torch.ceil,
    "XNNSin": torch.sin, "XNNCos": torch.cos, "XNNHardswish": F.hardswish,
    "XNNSoftmax": lambda x: torch.softmax(x, -1),
}
_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "XNNAdd": torch.add, "XNNSubtract": torch.sub, "XNNMultiply": torch.mul, "XNNDiv": torch.div,
    "XNNMinimum": torch.minimum, "XNNMaximum": torch.maximum,
}


class XnnpackProgram:
    """The ``forward`` of a ``.pte`` whose whole graph is one XNNPACK delegate call (see module doc).

    ``nodes`` in execution order; ``values`` by id. `run` maps float32 NCHW ``[1, 3, 224, 224]`` (the
    program's input) to the delegate's outputs and any values asked for.
    """

    def __init__(self, artifact: Path, values: dict[int, Value], nodes: list[Node], inputs: list[int],
                 outputs: list[int]) -> None:
        self.artifact = artifact
        self.values = values
        self.nodes = nodes
        self.inputs = inputs  # ids of the values the program input feeds (one for our recipes)
        self.outputs = outputs

    @classmethod
    def read(cls, artifact: Path) -> XnnpackProgram:
        """Deserialize ``artifact``; `ArtifactError` (naming it) unless ``forward`` is exactly one XNNPACK call."""
        from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
        from executorch.exir._serialize._program import deserialize_pte_binary

        artifact = Path(artifact)
        try:
            pte = deserialize_pte_binary(artifact.read_bytes())
        except Exception as e:  # noqa: BLE001 - flatbuffer and segment checks raise anything
            raise ArtifactError(f"{artifact}: not a readable ExecuTorch program ({first_line(e)}); {_REBUILD}") from e
        program = pte.program
        plan = next((p for p in program.execution_plan if p.name == "forward"), None)
        if plan is None:
            raise ArtifactError(f"{artifact}: the program has no forward method")
        calls = [i.instr_args for i in plan.chains[0].instructions if type(i.instr_args).__name__ != "FreeCall"]
        kinds = [type(c).__name__ for c in calls]
        if (len(calls) != 1 or kinds[0] != "DelegateCall" or len(plan.delegates) != 1
                or plan.delegates[0].id != XNNPACK_BACKEND):
            raise ArtifactError(
                f"{artifact}: forward is {kinds} with delegates {[d.id for d in plan.delegates]}; the per-layer report "
                f"reads programs that are one {XNNPACK_BACKEND} call (the executorch-xnnpack-* recipes with the "
                "LayerNorm rewrite)")
        call = calls[0]
        ref = plan.delegates[0].processed
        raw = bytes(program.backend_delegate_data[ref.index].data)
        try:
            header = XNNHeader.from_bytes(raw[: XNNHeader.EXPECTED_LENGTH])
        except ValueError as e:
            raise ArtifactError(f"{artifact}: the XNNPACK payload has no valid header ({e}); {_REBUILD}") from e
        flat = raw[header.flatbuffer_offset: header.flatbuffer_offset + header.flatbuffer_size]
        graph = _schema().XNNGraphT.InitFromPackedBuf(bytearray(flat), 0)

        def constant(idx: int) -> bytes:
            entry = graph.constantData[idx]
            key = entry.namedKey.decode() if isinstance(entry.namedKey, bytes) else (entry.namedKey or "")
            if key:
                if pte.named_data is None or key not in pte.named_data.pte_data:
                    raise ArtifactError(f"{artifact}: XNNPACK constant {key!r} is not in the program's named data; {_REBUILD}")
                return bytes(pte.named_data.buffers[pte.named_data.pte_data[key].buffer_index])[: int(entry.size)]
            start = header.constant_data_offset + int(entry.offset)
            return raw[start: start + int(entry.size)]

        args = list(call.args)
        n_in = len(args) - len(plan.outputs)
        values: dict[int, Value] = {}
        for i, xv in enumerate(graph.xvalues):
            values[i] = _value(artifact, i, xv, constant, plan, program, args, n_in)
        program_input = plan.inputs[0]
        feeds = [v.id for v in values.values() if v.external is not None and v.external < n_in
                 and args[v.external] == program_input]
        if len(plan.inputs) != 1 or not feeds:
            raise ArtifactError(f"{artifact}: forward has {len(plan.inputs)} inputs; expected the one image tensor")
        _schema()
        union = importlib.import_module("fb_xnnpack.XNodeUnion").XNodeUnion
        names = {v: k for k, v in vars(union).items() if not k.startswith("_")}
        nodes = []
        for k, xn in enumerate(graph.xnodes):
            kind = names.get(xn.xnodeUnionType, str(xn.xnodeUnionType))
            table = xn.xnodeUnion
            if xn.outputMinMax is not None:
                table.clamp = (float(xn.outputMinMax.outputMin), float(xn.outputMinMax.outputMax))
            nodes.append(Node(kind, table, int(getattr(table, "outputId", -1)), k))
        return cls(artifact, values, nodes, feeds, [int(i) for i in graph.outputIds])

    def layer_nodes(self) -> list[Node]:
        """The conv, depthwise-conv and fully-connected nodes, in execution order."""
        return [n for n in self.nodes if n.kind in LAYER_NODES]

    def weight(self, node: Node) -> torch.Tensor:
        """A layer node's real-valued filter in torch's layout: ``[O, I/g, kh, kw]`` for convs, ``[O, I]`` for FC."""
        w = self.values[node.filter].data  # type: ignore[index]
        if w is None:
            raise ArtifactError(f"{self.artifact}: node {node.index} ({node.kind}) has a non-constant filter")
        if node.kind == "XNNConv2d":
            return w.permute(0, 3, 1, 2)  # [O, kh, kw, I/g]
        if node.kind == "XNNDepthwiseConv2d":
            return w.permute(3, 0, 1, 2)  # [1, kh, kw, C*m]
        return w.t() if node.table.flags & _TRANSPOSE_WEIGHTS else w

    @torch.no_grad()
    def run(self, x: torch.Tensor, keep: Collection[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """float32 NCHW ``[1, 3, H, W]`` -> (the delegate's first output, {value id: its real values} for ``keep``)."""
        env: dict[int, torch.Tensor] = {}
        for i in self.inputs:
            env[i] = self._write(i, x.to(torch.float32))
        for node in self.nodes:
            env[node.output] = self._write(node.output, self._compute(node, env))
        return env[self.outputs[0]], {i: env[i] for i in keep}

    def _get(self, i: int, env: dict[int, torch.Tensor]) -> torch.Tensor:
        v = self.values[i]
        return v.data if v.data is not None else env[i]

    def _write(self, i: int, t: torch.Tensor) -> torch.Tensor:
        v = self.values[i]
        if v.dynamic is not None:
            return fake_quant_rows(t, v.dynamic)
        return v.quant.fake(t) if v.quant is not None else t

    def _compute(self, node: Node, env: dict[int, torch.Tensor]) -> torch.Tensor:
        t, kind = node.table, node.kind
        out_dims = self.values[node.output].dims
        if kind in _UNARY:
            y = _UNARY[kind](self._get(t.inputId, env))
        elif kind in _BINARY:
            y = _BINARY[kind](self._get(t.input1Id, env), self._get(t.input2Id, env))
        elif kind == "XNNFullyConnected":
            y = F.linear(self._get(t.input1Id, env), self.weight(node),
                         None if node.bias is None else self._get(node.bias, env))
        elif kind in ("XNNConv2d", "XNNDepthwiseConv2d"):
            x = self._get(t.input1Id, env).permute(0, 3, 1, 2)  # NHWC -> NCHW
            x = F.pad(x, (t.paddingLeft, t.paddingRight, t.paddingTop, t.paddingBottom))
            groups = t.groups if kind == "XNNConv2d" else x.shape[1]
            y = F.conv2d(x, self.weight(node), None if node.bias is None else self._get(node.bias, env),
                         stride=(t.subsamplingHeight, t.subsamplingWidth),
                         dilation=(t.dilationHeight, t.dilationWidth), groups=groups).permute(0, 2, 3, 1)
        elif kind == "XNNStaticTranspose":
            y = self._get(t.inputId, env).permute(*[int(p) for p in t.perm])
        elif kind == "XNNStaticReshape":
            y = self._get(t.inputId, env).reshape(out_dims)
        elif kind == "XNNGlobalAvgPooling2d":
            y = self._get(t.inputId, env).mean(dim=(1, 2))
        elif kind == "XNNClamp":
            y = self._get(t.inputId, env)
        else:
            raise ArtifactError(f"{self.artifact}: XNNPACK node {node.index} is {kind}, which the payload emulation "
                                "does not implement")
        clamp = getattr(t, "clamp", None)
        if clamp is not None:
            y = y.clamp(*clamp)
        y = y.contiguous()
        if tuple(y.shape) != out_dims:
            if y.numel() != int(np.prod(out_dims)):
                raise ArtifactError(f"{self.artifact}: XNNPACK node {node.index} ({kind}) computed {tuple(y.shape)}, "
                                    f"its output value is {out_dims}")
            y = y.reshape(out_dims)
        return y


_DTYPES = {1: "fp32", 2: "fp16", 3: "qint8", 4: "quint8", 5: "qint32", 6: "qcint8", 7: "qcint32", 8: "qcint4",
           9: "qdint8", 10: "qbint4", 11: "qpint8", 12: "int32", 13: "pfp32", 14: "bf16"}
_STORAGE = {"fp32": np.float32, "fp16": np.float16, "qint8": np.int8, "quint8": np.uint8, "qint32": np.int32,
            "qcint8": np.int8, "qcint32": np.int32, "int32": np.int32}


def _value(artifact: Path, i: int, xv: Any, constant: Callable[[int], bytes], plan: Any, program: Any,
           args: list[int], n_in: int) -> Value:
    """One XNNPACK value: dtype, dims, quantization, and a constant's real values (see `Value`)."""
    u = xv.xvalueUnion
    tv = getattr(u, "tensorValue", None) or u
    dtype = _DTYPES.get(int(tv.datatype), f"datatype {tv.datatype}")
    dims = tuple(int(d) for d in (tv.dims if tv.dims is not None else []))
    v = Value(i, dtype, dims)
    qp = getattr(u, "quantParams", None)
    qkind = type(qp).__name__ if qp is not None else None
    scale: np.ndarray | float | None = None
    if qkind == "PerTensorQuantT":
        scale = float(np.float32(qp.scale))
        if dtype in ("qint8", "quint8"):
            lo, hi = (-128, 127) if dtype == "qint8" else (0, 255)
            v.quant = ActQuant(scale, int(qp.zeroPoint), lo, hi)
    elif qkind == "PerChannelQuantT":
        scale = (np.asarray(qp.scale, dtype=np.float32) if qp.scale is not None and len(qp.scale)
                 else np.frombuffer(constant(int(qp.scaleBufferIdx)), dtype=np.float32)[: int(qp.numScales)])
    elif qkind == "PerTokenDynamicQuantT":
        v.dynamic = int(qp.numNonbatchDims)
    elif qkind is not None:
        raise ArtifactError(f"{artifact}: XNNPACK value {i} has {qkind} quantization, which the emulation does not read")
    ext = int(tv.externalId)
    if ext != _INVALID and ext < len(args):
        v.external = ext
        if ext < n_in and args[ext] not in plan.inputs:  # a constant tensor the delegate call passes in
            ev = plan.values[args[ext]].val
            raw = bytes(program.constant_buffer[ev.data_buffer_idx].storage) if ev.data_buffer_idx else b""
            if not raw:
                raise ArtifactError(f"{artifact}: delegate argument {ext} (value {args[ext]}) has no constant data")
            n = int(np.prod(dims))  # constant storage is padded to its alignment
            v.data = torch.from_numpy(np.frombuffer(raw, dtype=np.float32)[:n].copy().reshape(dims))
    if int(tv.constantBufferIdx):
        if dtype not in _STORAGE:
            raise ArtifactError(f"{artifact}: XNNPACK constant {i} is {dtype}, which the emulation does not read")
        arr = np.frombuffer(constant(int(tv.constantBufferIdx)), dtype=_STORAGE[dtype]).astype(np.float32)
        arr = arr[: int(np.prod(dims))].reshape(dims)
        if scale is not None:
            if np.ndim(scale):
                shape = [1] * len(dims)
                shape[int(qp.channelDim)] = -1
                arr = arr * np.asarray(scale, dtype=np.float32).reshape(shape)
            else:
                arr = (arr - int(qp.zeroPoint)) * np.float32(scale)
        v.data = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return v
