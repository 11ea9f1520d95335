"""The executable form of an ML program: a flat list of steps over named values, NumPy only.

Built once by `program.build_graph` (constants resolved, constexpr weights decompressed and cached,
every op bound to its kernel), then run per prediction without touching coremltools.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_convnext.coreml_emulator.numeric import round_to_float16
from edge_convnext.coreml_emulator.ops import OpFn


@dataclass(frozen=True)
class Ref:
    """A runtime value (function input or an earlier op's output), by var name."""

    name: str


@dataclass(frozen=True)
class Step:
    op_type: str
    name: str
    fn: OpFn
    consts: Mapping[str, Any]  # constant parameters, already NumPy values
    refs: Mapping[str, Ref | tuple[Any, ...]]  # runtime parameters (variadic ones as tuples of Ref/constant)
    outputs: tuple[str, ...]
    out_dtypes: tuple[np.dtype | None, ...]  # declared dtype per output after the precision mapping
    out_shapes: tuple[tuple[int | None, ...] | None, ...] = ()  # declared shapes, None where symbolic
    frees: tuple[str, ...] = ()  # values whose last use is this step


_FLOAT16 = np.dtype(np.float16)


def to_dtype(value: Any, dtype: np.dtype | None) -> Any:
    """Round/convert an op result to its declared dtype.

    float16 results become float32 arrays holding float16 values (`round_to_float16`).
    """
    if dtype is None:
        return value
    arr = np.asarray(value)
    if dtype == _FLOAT16:
        return round_to_float16(arr)
    return arr if arr.dtype == dtype else arr.astype(dtype)


def _shape_matches(value: Any, shape: tuple[int | None, ...]) -> bool:
    got = np.shape(value)
    return len(got) == len(shape) and all(s is None or s == g for g, s in zip(got, shape))


def _resolve(arg: Any, env: dict[str, Any]) -> Any:
    if isinstance(arg, Ref):
        return env[arg.name]
    if isinstance(arg, tuple):
        return tuple(_resolve(a, env) for a in arg)
    return arg


@dataclass(frozen=True)
class Graph:
    inputs: Mapping[str, np.dtype | None]  # function input name -> runtime dtype
    outputs: tuple[str, ...]
    steps: tuple[Step, ...]
    constants: Mapping[str, Any]  # constants that are themselves program outputs

    def run(self, feeds: Mapping[str, Any], keep: Collection[str] = ()) -> dict[str, Any]:
        """Execute on ``feeds`` (already of the input dtypes); returns every program output, and the
        intermediate values named in ``keep`` (op output var names, e.g. for a per-layer error report)."""
        unknown = set(keep) - {name for step in self.steps for name in step.outputs}
        if unknown:
            raise KeyError(f"no op of the program computes {sorted(unknown)}")
        env: dict[str, Any] = {name: to_dtype(feeds[name], dt) for name, dt in self.inputs.items()}
        env.update(self.constants)
        # Device semantics: fp16 overflow gives inf, 0/0 gives nan, silently.
        with np.errstate(all="ignore"):
            for step in self.steps:
                kwargs = dict(step.consts)
                for key, arg in step.refs.items():
                    kwargs[key] = _resolve(arg, env)
                try:
                    result = step.fn(**kwargs)
                except Exception as exc:  # add which op failed; the kernel's message says why
                    if hasattr(exc, "add_note"):
                        exc.add_note(f"in Core ML emulator op '{step.name}' (type '{step.op_type}')")
                    raise
                if not isinstance(result, tuple):
                    result = (result,)
                for name, dt, value in zip(step.outputs, step.out_dtypes, result):
                    env[name] = to_dtype(value, dt)
                for name, shape in zip(step.outputs, step.out_shapes):
                    if shape is not None and not _shape_matches(env[name], shape):
                        raise ValueError(
                            f"Core ML emulator op '{step.name}' (type '{step.op_type}') produced "
                            f"'{name}' of shape {np.shape(env[name])}, the program declares {shape}"
                        )
                for name in step.frees:
                    if name not in keep:
                        env.pop(name, None)
        return {name: env[name] for name in (*self.outputs, *keep)}


def last_uses(steps: list[Step], keep: set[str]) -> list[tuple[str, ...]]:
    """For each step, the runtime values it is the last reader of (never those in ``keep``)."""
    last: dict[str, int] = {}

    def visit(arg: Any, i: int) -> None:
        if isinstance(arg, Ref):
            last[arg.name] = i
        elif isinstance(arg, tuple):
            for a in arg:
                visit(a, i)

    for i, step in enumerate(steps):
        for name in step.outputs:  # an output nobody reads is dropped right away
            last[name] = i
        for arg in step.refs.values():
            visit(arg, i)
    frees: list[list[str]] = [[] for _ in steps]
    for name, i in last.items():
        if name not in keep:
            frees[i].append(name)
    return [tuple(f) for f in frees]
