"""Read an ``.mlpackage`` and turn its ML program into an executable `Graph`.

coremltools is imported here, lazily, and only at load time: it parses the spec and the weight
blobs (``MLModel(path, skip_model_load=True)`` and the milproto loader both work on Linux).
Everything after `build_graph` is NumPy.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.coreml_emulator.graph import Graph, Ref, Step, last_uses, to_dtype
from edge_convnext.coreml_emulator.numeric import Precision, runtime_dtype
from edge_convnext.coreml_emulator.ops import OPS, VALUE_PRESERVING, UnsupportedOpError, supported_ops
from edge_convnext.errors import ArtifactError, MissingExtra, RuntimeUnavailable


def load_package(path: Path) -> tuple[Any, Any]:
    """(protobuf spec, MIL ``Program``) of an ``.mlpackage``.

    Raises `ArtifactError` naming ``path`` when the package is missing, truncated or corrupted,
    `RuntimeUnavailable` when it holds a model that is not an ML program.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"Core ML package not found: {path}")
    if not path.is_dir():
        raise ArtifactError(f"{path} is not an .mlpackage directory (ML programs are saved as packages)")
    try:
        import coremltools as ct
        from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
    except ImportError as exc:
        raise MissingExtra("coremltools", "coreml-runtime", "Emulating a Core ML model") from exc
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
    except Exception as exc:  # coremltools raises anything from KeyError to protobuf DecodeError
        raise ArtifactError(
            f"{path} is not a readable Core ML package ({type(exc).__name__}: {exc}). Re-export it."
        ) from exc
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise RuntimeUnavailable(
            f"{path} holds a '{kind}' Core ML model; the emulator runs ML programs only "
            "(convert with convert_to='mlprogram')."
        )
    try:
        prog = load_milproto(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)
    except Exception as exc:
        raise ArtifactError(
            f"{path}: its ML program or weight file could not be read ({type(exc).__name__}: {exc}). "
            "The package is truncated or corrupted; re-export it."
        ) from exc
    return spec, prog


def _mil_dtype(var: Any) -> str | None:
    from coremltools.converters.mil.mil import types

    try:
        return types.builtin_to_string(var.dtype)
    except Exception:  # dicts, lists: not numeric tensors
        return None


def _declared_shape(var: Any) -> tuple[int | None, ...] | None:
    """The var's static shape (None for symbolic dims); None for non-tensors."""
    if runtime_dtype(_mil_dtype(var), "auto") is None:  # strings, dicts: no shape to check
        return None
    try:
        shape = var.shape
    except ValueError:
        return None
    return tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in shape)


def _same_dtype(op: Any) -> bool:
    """The op's non-constant inputs and its outputs share one MIL dtype (e.g. fp16 in, fp16 out)."""
    outs = {_mil_dtype(v) for v in op.outputs}
    ins = {
        _mil_dtype(v)
        for value in op.inputs.values()
        for v in (value if isinstance(value, (list, tuple)) else (value,))
        if v.val is None
    }
    return len(outs) == 1 and None not in outs and ins <= outs


def _store_const(value: Any) -> Any:
    """A constant as kernels want it: float16 widened to float32 (exactly), MIL lists as lists."""
    if hasattr(value, "ls"):  # coremltools mil_list (e.g. classifier labels)
        return list(value.ls)
    if isinstance(value, (np.ndarray, np.generic)):
        if value.dtype == np.float16:
            return value.astype(np.float32)
        if value.dtype.kind in "US":
            return str(value) if value.ndim == 0 else value
        return value
    if isinstance(value, float):
        return np.float32(value)
    return value


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _check_params(op: Any, fn: Any, params: list[str], source: str) -> None:
    sig = _SIGNATURES.setdefault(fn, inspect.signature(fn))
    try:
        sig.bind(**dict.fromkeys(params))
    except TypeError as exc:
        raise UnsupportedOpError(
            op.op_type, op.name, source, detail=f"has parameters {sorted(params)} the emulator does not accept ({exc})"
        ) from exc


def build_graph(
    prog: Any, precision: Precision = "auto", *, source: str = "<program>", function_name: str = "main"
) -> tuple[Graph, Counter]:
    """Bind every op of ``function_name`` to its kernel; fold constant subgraphs (constexpr weights).

    Returns the graph and the op-type histogram of the function. Raises `UnsupportedOpError` for
    the first op the emulator cannot run, before doing any work.
    """
    if precision not in ("auto", "fp32"):
        raise ValueError(f"precision must be 'auto' or 'fp32', got {precision!r}")
    if function_name not in prog.functions:
        raise ArtifactError(f"{source}: the ML program has no function '{function_name}'")
    func = prog.functions[function_name]
    ops = list(func.operations)
    histogram = Counter(op.op_type for op in ops)
    known = supported_ops()
    for op in ops:
        if op.op_type not in known:
            raise UnsupportedOpError(op.op_type, op.name, source)
        if getattr(op, "blocks", None):
            raise UnsupportedOpError(op.op_type, op.name, source, detail="has nested blocks (control flow)")

    consts: dict[str, Any] = {}
    runtime: set[str] = set(func.inputs)

    def arg_of(value: Any, op: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(arg_of(v, op) for v in value)
        if value.name in consts:
            return consts[value.name]
        if value.name in runtime:
            return Ref(value.name)
        if value.val is not None:
            return _store_const(value.val)
        raise ArtifactError(f"{source}: op '{op.name}' reads '{value.name}', which no earlier op defines")

    def has_ref(arg: Any) -> bool:
        return isinstance(arg, Ref) or (isinstance(arg, tuple) and any(has_ref(a) for a in arg))

    steps: list[Step] = []
    for op in ops:
        if op.op_type == "const":
            consts[op.outputs[0].name] = _store_const(op.outputs[0].val)
            continue
        fn = OPS[op.op_type]
        args = {key: arg_of(value, op) for key, value in op.inputs.items()}
        _check_params(op, fn, list(args), source)
        outputs = tuple(v.name for v in op.outputs)
        out_dtypes = tuple(runtime_dtype(_mil_dtype(v), precision) for v in op.outputs)
        refs = {k: a for k, a in args.items() if has_ref(a)}
        if not refs:  # constant subgraph (constexpr weights, dequantize of const weights): fold once
            result = fn(**args)
            result = result if isinstance(result, tuple) else (result,)
            for name, dt, value in zip(outputs, out_dtypes, result):
                consts[name] = _store_const(to_dtype(value, dt))
            continue
        if op.op_type in VALUE_PRESERVING and _same_dtype(op):
            out_dtypes = tuple(None for _ in out_dtypes)  # inputs already carry the output's rounding
        consts_args = {k: a for k, a in args.items() if k not in refs}
        shapes = tuple(_declared_shape(v) for v in op.outputs)
        steps.append(Step(op.op_type, op.name, fn, consts_args, refs, outputs, out_dtypes, shapes))
        runtime.update(outputs)

    output_names = tuple(v.name for v in func.outputs)
    out_consts = {}
    for v in func.outputs:
        if v.name in consts:
            out_consts[v.name] = to_dtype(consts[v.name], runtime_dtype(_mil_dtype(v), precision))
        elif v.name not in runtime:
            raise ArtifactError(f"{source}: program output '{v.name}' is never computed")
    frees = last_uses(steps, keep=set(output_names))
    steps = [replace(s, frees=f) for s, f in zip(steps, frees)]
    inputs = {name: runtime_dtype(_mil_dtype(var), precision) for name, var in func.inputs.items()}
    return Graph(inputs, output_names, tuple(steps), out_consts), histogram
