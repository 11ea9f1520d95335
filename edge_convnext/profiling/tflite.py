"""Per-op profile of a ``.tflite``: cut the flatbuffer into one small model per op, time each in LiteRT.

The LiteRT Python interpreter exposes no op timings, so the artifact itself is profiled: each op of the
main subgraph becomes a model of its own (inputs = the op's non-constant inputs, outputs = its outputs,
only the weights it reads), run by the same interpreter and XNNPACK delegate with the same thread count.
An op whose inputs are all constant (the fp16 weights' DEQUANTIZE) is folded into the pieces of its
consumers, as XNNPACK folds it at load time in the whole model.

Pieces with the same signature (ops, options, tensor shapes, dtypes, quantization layout, weight sizes)
are timed once: ConvNeXt's nine identical stage-3 blocks cost one measurement, not nine. Each piece's
median is taken net of the interpreter's per-invoke overhead, measured on a one-element ADD model.

Needs NumPy and ``ai-edge-litert`` (its flatbuffer schema and ``tools.flatbuffer_utils``): no torch,
so it runs on a Raspberry Pi's light install.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.errors import ArtifactError, MissingExtra, first_line
from edge_convnext.profiling import OpTime, Profile, scope_of

# Ops that call other subgraphs cannot be cut out alone.
_CONTROL_FLOW = {"WHILE", "IF", "CALL", "CALL_ONCE", "STABLEHLO_WHILE", "STABLEHLO_CASE", "STABLEHLO_COMPOSITE"}
_SHORT = {"FLOAT32": "f32", "FLOAT16": "f16", "INT8": "i8", "UINT8": "u8", "INT16": "i16", "INT32": "i32",
          "INT64": "i64", "BOOL": "bool"}


def _schema() -> tuple[Any, Any]:
    try:
        from ai_edge_litert import schema_py_generated as schema
        from ai_edge_litert.tools import flatbuffer_utils as fbu
    except ImportError:
        raise MissingExtra("ai-edge-litert", "litert", "profiling a .tflite (its flatbuffer schema)") from None
    return schema, fbu


@dataclass(frozen=True)
class Piece:
    """One op of subgraph 0 as a model of its own.

    ``ops``: op indices in the piece, the op itself last (constant producers before it);
    ``inputs``/``outputs``: source tensor indices the piece reads from outside and writes;
    ``layer``: torch module scope of the op's first output (`scope_of`); ``key``: its timing signature.
    """

    index: int
    op: str
    ops: tuple[int, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    layer: str
    detail: str
    key: str


class ModelSlicer:
    """A ``.tflite`` read once (flatbuffer object API), cut into `Piece` models on demand."""

    def __init__(self, data: bytes, source: str = "model") -> None:
        schema, fbu = _schema()
        self._schema, self._fbu = schema, fbu
        self.source = source
        if len(data) < 8 or data[4:8] != b"TFL3":
            raise ArtifactError(f"{source}: not a TFLite model (no TFL3 identifier); rebuild it")
        try:
            self.model = schema.ModelT.InitFromPackedBuf(data, 0)
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupted file
            raise ArtifactError(f"{source}: cannot parse the flatbuffer ({first_line(e)}); rebuild it") from e
        self._data = data
        self.graph = self.model.subgraphs[0]
        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        self._types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        self.op_names = [self._op_name(op, names) for op in self.graph.operators]
        self._constant = self._constant_tensors()

    def _op_name(self, op: Any, names: dict[int, str]) -> str:
        code = self.model.operatorCodes[op.opcodeIndex]
        builtin = self._fbu.get_builtin_code_from_operator_code(code)
        if builtin == self._schema.BuiltinOperator.CUSTOM:
            return f"CUSTOM:{(code.customCode or b'?').decode(errors='replace')}"
        return names.get(builtin, f"BUILTIN_{builtin}")

    def _buffer_bytes(self, t: int) -> np.ndarray | None:
        """The constant data of tensor ``t`` as uint8, or None when it has none (an activation)."""
        b = self.model.buffers[self.graph.tensors[t].buffer]
        if b.offset and b.offset > 1:  # stored after the flatbuffer (large models, ai-edge-quantizer output)
            return np.frombuffer(self._data, dtype=np.uint8, count=b.size, offset=b.offset)
        if b.data is not None and len(b.data):
            return np.asarray(b.data, dtype=np.uint8)
        return None

    def _constant_tensors(self) -> set[int]:
        """Tensors with data, plus the outputs of ops that read only such tensors (computed at load time)."""
        const = {t for t in range(len(self.graph.tensors)) if self._buffer_bytes(t) is not None}
        self._folded: dict[int, int] = {}  # constant tensor -> the op producing it
        for i, op in enumerate(self.graph.operators):
            ins = [t for t in op.inputs if t >= 0]
            if ins and all(t in const for t in ins) and self.op_names[i] not in _CONTROL_FLOW:
                for t in op.outputs:
                    const.add(t)
                    self._folded[t] = i
        return const

    @property
    def folded_ops(self) -> list[int]:
        """Ops that compute constants (folded into their consumers' pieces)."""
        return sorted(set(self._folded.values()))

    def pieces(self) -> list[Piece]:
        """One piece per op of subgraph 0 that computes on activations, in execution order."""
        folded = set(self.folded_ops)
        out = []
        for i, op in enumerate(self.graph.operators):
            if i in folded:
                continue
            if self.op_names[i] in _CONTROL_FLOW:
                raise ArtifactError(f"{self.source}: op {i} is {self.op_names[i]}, which calls other subgraphs; "
                                    "the op slicer cannot cut it out alone")
            ops = self._producers([t for t in op.inputs if t >= 0]) + [i]
            made = {t for j in ops for t in self.graph.operators[j].outputs}
            inputs = []
            for j in ops:
                for t in self.graph.operators[j].inputs:
                    if t >= 0 and t not in self._constant and t not in made and t not in inputs:
                        inputs.append(t)
            outputs = tuple(t for t in op.outputs if t >= 0)
            name = self.graph.tensors[outputs[0]].name if outputs else b""
            out.append(Piece(i, self.op_names[i], tuple(ops), tuple(inputs), outputs,
                             scope_of(name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)),
                             self._detail(op), self._signature(ops)))
        return out

    def _producers(self, tensors: list[int]) -> list[int]:
        """The constant-computing ops behind ``tensors``, transitively, in execution order."""
        found: set[int] = set()
        stack = [t for t in tensors if t in self._folded]
        while stack:
            j = self._folded[stack.pop()]
            if j not in found:
                found.add(j)
                stack += [t for t in self.graph.operators[j].inputs if t in self._folded]
        return sorted(found)

    def _tensor_text(self, t: int) -> str:
        x = self.graph.tensors[t]
        shape = ",".join(str(int(d)) for d in (x.shape if x.shape is not None else []))
        dtype = self._types.get(x.type, str(x.type))
        return f"{_SHORT.get(dtype, dtype.lower())}[{shape}]"

    def _detail(self, op: Any) -> str:
        ins = " x ".join(self._tensor_text(t) for t in op.inputs if t >= 0)
        outs = ", ".join(self._tensor_text(t) for t in op.outputs if t >= 0)
        return f"{ins} -> {outs}"

    def _signature(self, ops: list[int]) -> str:
        sig: list[Any] = []
        for j in ops:
            op = self.graph.operators[j]
            opts = op.builtinOptions
            sig.append([self.op_names[j], op.builtinOptionsType, repr(sorted(vars(opts).items())) if opts else None,
                        bytes(op.customOptions).hex() if op.customOptions is not None else None])
            for t in [*op.inputs, *op.outputs]:
                if t < 0:
                    sig.append(None)
                    continue
                x = self.graph.tensors[t]
                q = x.quantization
                qsig = None
                if q is not None and q.scale is not None and len(q.scale):
                    qsig = [len(q.scale), int(q.quantizedDimension)]
                data = self._buffer_bytes(t)
                sig.append([list(map(int, x.shape if x.shape is not None else [])), int(x.type), qsig,
                            None if data is None else int(data.size), t in self._constant])
        return json.dumps(sig, separators=(",", ":"))

    def model_bytes(self, piece: Piece) -> bytes:
        """A standalone flatbuffer running ``piece``: only its tensors, only its constants' data."""
        schema = self._schema
        tensor_ids: list[int] = []
        for j in piece.ops:
            op = self.graph.operators[j]
            for t in [*op.inputs, *op.outputs, *(op.intermediates if op.intermediates is not None else [])]:
                if t >= 0 and t not in tensor_ids:
                    tensor_ids.append(t)
        remap = {t: k for k, t in enumerate(tensor_ids)}
        buffers = [schema.BufferT()]  # buffer 0: the empty sentinel every activation points to
        tensors = []
        for t in tensor_ids:
            x = copy.copy(self.graph.tensors[t])
            data = self._buffer_bytes(t)
            if data is not None:
                buffers.append(schema.BufferT(data=data))
                x.buffer = len(buffers) - 1
            else:
                x.buffer = 0
            tensors.append(x)
        codes: list[int] = []
        operators = []
        for j in piece.ops:
            op = copy.copy(self.graph.operators[j])
            if op.opcodeIndex not in codes:
                codes.append(op.opcodeIndex)
            op.opcodeIndex = codes.index(op.opcodeIndex)
            op.inputs = [remap[t] if t >= 0 else -1 for t in op.inputs]
            op.outputs = [remap[t] for t in op.outputs]
            if op.intermediates is not None:
                op.intermediates = [remap[t] for t in op.intermediates]
            operators.append(op)
        graph = schema.SubGraphT()
        graph.tensors, graph.operators, graph.name = tensors, operators, b"piece"
        graph.inputs = [remap[t] for t in piece.inputs]
        graph.outputs = [remap[t] for t in piece.outputs]
        model = schema.ModelT()
        model.version = self.model.version or 3
        model.description = b"edge-convnext profile piece"
        model.operatorCodes = [self.model.operatorCodes[c] for c in codes]
        model.subgraphs, model.buffers = [graph], buffers
        return bytes(self._fbu.convert_object_to_bytearray(model))


def _interpreter(content: bytes | None = None, path: Path | None = None, threads: int | None = None) -> Any:
    from edge_convnext.runners.tflite import _interpreter_class

    cls, _ = _interpreter_class()
    it = cls(model_content=content, num_threads=threads) if content is not None else cls(
        model_path=str(path), num_threads=threads)
    return it


def random_inputs(interpreter: Any, rng: np.random.Generator) -> list[np.ndarray]:
    """One array per input of an allocated interpreter, of its shape and dtype.

    Floats in [0.5, 1.5) (positive, so RSQRT and LOG stay finite); quantized integers over their whole
    range (the tensor's scale and zero point give them meaning, the kernels' cost does not depend on it);
    other integers 0 (a valid index or shape entry).
    """
    out = []
    for d in interpreter.get_input_details():
        dtype, shape = np.dtype(d["dtype"]), tuple(int(s) for s in d["shape"])
        if dtype.kind == "f":
            out.append(rng.uniform(0.5, 1.5, shape).astype(dtype))
        elif dtype.kind in "iu" and d["quantization"][0]:
            info = np.iinfo(dtype)
            out.append(rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype))
        else:
            out.append(np.zeros(shape, dtype))
    return out


def time_invokes(interpreter: Any, runs: int, warmup: int, rng: np.random.Generator) -> list[float]:
    """Seconds of ``invoke()`` alone, ``runs`` times after ``warmup`` untimed calls, on fixed random inputs."""
    for d, x in zip(interpreter.get_input_details(), random_inputs(interpreter, rng)):
        interpreter.set_tensor(d["index"], x)
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - t)
    return times


def invoke_overhead_model() -> bytes:
    """A model of one float32 ADD of two one-element tensors: the cost of ``invoke()`` itself."""
    schema, fbu = _schema()
    add = schema.BuiltinOperator.ADD
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = add, add, 1
    tensors = []
    for name in (b"a", b"b", b"sum"):
        t = schema.TensorT()
        t.shape, t.type, t.buffer, t.name = [1], schema.TensorType.FLOAT32, 0, name
        tensors.append(t)
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    op.builtinOptionsType, op.builtinOptions = schema.BuiltinOptions.AddOptions, schema.AddOptionsT()
    graph = schema.SubGraphT()
    graph.tensors, graph.operators, graph.inputs, graph.outputs, graph.name = tensors, [op], [0, 1], [2], b"overhead"
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [graph], [schema.BufferT()]
    return bytes(fbu.convert_object_to_bytearray(model))


def _delegated(interpreter: Any) -> bool:
    """Did a delegate (XNNPACK) take the piece? It appends its own node after the model's on allocation."""
    try:
        before = len(interpreter._get_ops_details())
        interpreter.allocate_tensors()
        return len(interpreter._get_ops_details()) > before
    except AttributeError:  # an interpreter without the op listing: allocate, delegation unknown
        interpreter.allocate_tensors()
        return False


def profile_tflite(path: Path, threads: int | None, runs: int = 10, warmup: int = 2,
                   echo: Callable[[str], None] = lambda s: None) -> Profile:
    """Time every op of ``path`` as its own model (see the module doc) and the whole model, in this process."""
    path = Path(path)
    threads = threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read it ({e.strerror})") from e
    slicer = ModelSlicer(data, str(path))
    pieces = slicer.pieces()

    whole = _interpreter(path=path, threads=threads)
    whole.allocate_tensors()
    whole_times = time_invokes(whole, runs, warmup, rng)

    over = _interpreter(content=invoke_overhead_model(), threads=threads)
    over.allocate_tensors()
    overhead_ms = 1000 * statistics.median(time_invokes(over, max(runs, 50), warmup, rng))

    timed: dict[str, tuple[float, bool]] = {}
    # Whole-model runs between pieces, ``runs`` of them spread over the profile: the whole median then spans
    # the same period (and machine load) as the pieces, without a slow model's runs dominating the time.
    every = max(1, -(-len({p.key for p in pieces}) // runs))
    ops: list[OpTime] = []
    not_delegated: list[str] = []
    t0 = time.perf_counter()
    for n, p in enumerate(pieces, 1):
        if p.key not in timed:
            content = slicer.model_bytes(p)
            try:
                it = _interpreter(content=content, threads=threads)
                delegated = _delegated(it)
                raw = 1000 * statistics.median(time_invokes(it, runs, warmup, rng))
            except (ValueError, RuntimeError) as e:
                raise ArtifactError(f"{path}: op {p.index} ({p.op}, {p.detail}) does not run as a model of its "
                                    f"own ({first_line(e)}); the op slicer cannot profile this model") from e
            timed[p.key] = (max(0.0, raw - overhead_ms), delegated)
            if len(timed) % every == 0:
                whole_times += time_invokes(whole, 1, 0, rng)
            echo(f"profile {path.name}: {n}/{len(pieces)} ops ({len(timed)} timed)")
        ms, delegated = timed[p.key]
        if not delegated:
            not_delegated.append(p.op)
        ops.append(OpTime(p.op, p.op, round(ms, 4), p.layer, p.detail, p.index))
    whole_ms = 1000 * statistics.median(whole_times)
    del whole
    total = sum(o.ms for o in ops)
    prof = Profile(str(path), "LiteRT, each op cut out as a model of its own and timed alone (invoke only, net of "
                   f"the {1000 * overhead_ms:.1f} us per-invoke overhead)", runtime="litert", threads=threads,
                   runs=runs, whole_ms=round(whole_ms, 3), total_ms=round(total, 3), ops=ops)
    prof.extra = {"pieces": len(pieces), "timed": len(timed), "folded_constant_ops": len(slicer.folded_ops),
                  "overhead_ms_per_invoke": round(overhead_ms, 4), "profile_seconds": round(time.perf_counter() - t0, 1),
                  "not_delegated": sorted(set(not_delegated))}
    prof.notes.append(f"{len(pieces)} ops, {len(timed)} distinct signatures timed (identical ops timed once)"
                      + (f"; {len(slicer.folded_ops)} constant ops folded into their consumers" if slicer.folded_ops else ""))
    prof.notes.append("The pieces run out of context: inputs and weights stay hot in cache between timed runs, while "
                      "the whole model streams its weights and activations through the caches, so the pieces add "
                      "up to less than the whole where a layer's weights or activations outgrow the caches.")
    if not_delegated:
        prof.notes.append(f"not taken by XNNPACK when alone (reference kernels): {', '.join(sorted(set(not_delegated)))}")
    return prof
