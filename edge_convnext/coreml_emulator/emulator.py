"""`CoreMLEmulator`: ``MLModel.predict`` for ML programs, on any OS, with NumPy."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.coreml_emulator.numeric import Precision
from edge_convnext.coreml_emulator.program import build_graph, load_package
from edge_convnext.errors import ArtifactError


@dataclass(frozen=True)
class _InputContract:
    shape: tuple[int, ...]  # the spec's (default) shape
    allowed: tuple[tuple[int, ...], ...] | None  # enumerated shapes; None: no enumeration
    bounds: tuple[tuple[int, int], ...] | None  # per-dim (lower, upper) for range shapes; upper -1 = unbounded
    image: bool = False  # an image feature: 8-bit pixel values, fed as a float NCHW array of integers 0..255

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if self.allowed is not None:
            return shape in self.allowed
        if self.bounds is not None:
            return len(shape) == len(self.bounds) and all(
                lo <= s and (hi < 0 or s <= hi) for s, (lo, hi) in zip(shape, self.bounds)
            )
        return shape == self.shape

    def describe(self) -> str:
        if self.allowed is not None:
            return f"one of {list(self.allowed)}"
        if self.bounds is not None:
            dims = ", ".join(str(lo) if lo == hi else f"{lo}..{hi if hi >= 0 else ''}" for lo, hi in self.bounds)
            return f"({dims})"
        return str(self.shape)


def _input_contract(feature: Any) -> _InputContract:
    ftype = feature.type
    kind = ftype.WhichOneof("Type")
    if kind == "multiArrayType":
        arr = ftype.multiArrayType
        shape = tuple(int(d) for d in arr.shape)
        flex = arr.WhichOneof("ShapeFlexibility")
        if flex == "enumeratedShapes":
            allowed = tuple(tuple(int(d) for d in s.shape) for s in arr.enumeratedShapes.shapes)
            return _InputContract(shape or allowed[0], allowed, None)
        if flex == "shapeRange":
            bounds = tuple((int(r.lowerBound), int(r.upperBound)) for r in arr.shapeRange.sizeRanges)
            return _InputContract(shape or tuple(lo for lo, _ in bounds), None, bounds)
        return _InputContract(shape, None, None)
    if kind == "imageType":
        # Fed here as a float NCHW array of 8-bit pixel values (integers 0..255), channels in the
        # spec's order (RGB or BGR). An ML program applies ImageType's scale and bias itself: the
        # converter writes them as explicit ``mul``/``add`` ops after the input (the spec's
        # imageType holds only size and color space), so the emulator feeds the pixels unchanged.
        img = ftype.imageType
        space = type(img).ColorSpace.Name(img.colorSpace)
        if space not in ("RGB", "BGR", "GRAYSCALE"):
            raise ArtifactError(f"input '{feature.name}' is a {space} image, which the emulator cannot feed")
        channels = 1 if space == "GRAYSCALE" else 3
        shape = (1, channels, int(img.height), int(img.width))
        if img.WhichOneof("SizeFlexibility") is not None:
            return _InputContract(shape, None, ((1, 1), (channels, channels), (1, -1), (1, -1)), image=True)
        return _InputContract(shape, None, None, image=True)
    raise ArtifactError(f"input '{feature.name}' has feature type '{kind}', which the emulator cannot feed")


class CoreMLEmulator:
    """Execute the ML program inside an ``.mlpackage`` with NumPy.

    ``precision="auto"`` emulates the program's own precision (an fp16 program rounds every op's
    inputs and outputs to float16); ``"fp32"`` runs the same program with every tensor in float32.
    Raises `ArtifactError` for a missing or corrupted package and `UnsupportedOpError` (a
    `RuntimeUnavailable`) for an op the emulator does not implement.

    ``blas_threads`` (class default 1, settable per instance) caps NumPy's BLAS threads during
    `predict` when threadpoolctl is installed; ``None`` leaves the library's own setting. One
    thread is the default because on a small machine shared with other jobs multi-threaded
    OpenBLAS oversubscribes the cores and runs several times slower (ConvNeXt-T: ~2.5 s instead
    of ~0.3 s per image measured here); on an idle machine it costs a little speed.
    """

    blas_threads: int | None = 1

    def __init__(self, path: Path | str, precision: Precision = "auto") -> None:
        if precision not in ("auto", "fp32"):
            raise ValueError(f"precision must be 'auto' or 'fp32', got {precision!r}")
        self.path = Path(path)
        self.precision: Precision = precision
        spec, prog = load_package(self.path)
        self.spec: Any = spec  # the protobuf spec (description, metadata; weights live in the package)
        function_name = spec.description.defaultFunctionName or "main"
        self._graph, ops_used = build_graph(prog, precision, source=str(self.path), function_name=function_name)
        self.ops_used: Counter[str] = ops_used  # op type histogram of the main function, const ops included
        self.input_names: list[str] = [f.name for f in spec.description.input]
        self.output_names: list[str] = [f.name for f in spec.description.output]
        self._contracts = {f.name: _input_contract(f) for f in spec.description.input}
        self.input_shapes: dict[str, tuple[int, ...]] = {n: c.shape for n, c in self._contracts.items()}
        self.image_inputs: frozenset[str] = frozenset(n for n, c in self._contracts.items() if c.image)
        # A classifier (ClassifierConfig): the classify op's labels, the order its probabilities come in.
        self.class_labels: list[Any] | None = _class_labels(prog.functions[function_name])
        for name in self.input_names:
            if name not in self._graph.inputs:
                raise ArtifactError(f"{self.path}: spec input '{name}' is not an input of the ML program")
        for name in self.output_names:
            if name not in self._graph.outputs:
                raise ArtifactError(f"{self.path}: spec output '{name}' is not an output of the ML program")

    def predict(self, inputs: Mapping[str, np.ndarray], keep: Collection[str] = ()) -> dict[str, np.ndarray]:
        """Run one batch: ``inputs`` maps every input name to an array of its spec shape.

        An image input is an array of 8-bit pixel values (integers 0..255, float or integer dtype),
        NCHW, channels in the spec's color order. Returns every output as a float32 array (a
        classifier's label output stays a 0-d array of the label; its probabilities, a dictionary in
        Core ML, are returned as a vector in the order of `class_labels`), plus the intermediate
        values named in ``keep`` (MIL op output names), as the program computed them.
        """
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in inputs if n not in self._contracts]
        if missing or unknown:
            raise ArtifactError(
                f"{self.path}: inputs {sorted(inputs)} do not match the model's {self.input_names}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unknown {unknown})" if unknown else "")
            )
        feeds: dict[str, np.ndarray] = {}
        for name in self.input_names:
            arr = np.asarray(inputs[name])
            if arr.dtype.kind not in "fiub":
                raise ArtifactError(f"{self.path}: input '{name}' must be numeric, got dtype {arr.dtype}")
            if not self._contracts[name].accepts(tuple(arr.shape)):
                raise ArtifactError(
                    f"{self.path}: input '{name}' has shape {tuple(arr.shape)}, "
                    f"the model takes {self._contracts[name].describe()}"
                )
            if self._contracts[name].image:
                _check_pixels(self.path, name, arr)
            feeds[name] = arr
        with _blas_limit(self.blas_threads):
            results = self._graph.run(feeds, keep)
        return {name: _as_output(results[name]) for name in (*self.output_names, *keep)}

    def __repr__(self) -> str:
        return f"CoreMLEmulator({str(self.path)!r}, precision={self.precision!r})"


def _class_labels(func: Any) -> list[Any] | None:
    """The ``classes`` of the program's ``classify`` op (a ClassifierConfig model), else None."""
    for op in func.operations:
        if op.op_type == "classify":
            classes = op.inputs["classes"].val
            return list(classes.ls) if hasattr(classes, "ls") else list(classes)
    return None


def _check_pixels(path: Path, name: str, arr: np.ndarray) -> None:
    """An image feature holds 8-bit pixels: refuse values Core ML could not have been given."""
    if arr.size == 0:
        return
    lo, hi = float(np.min(arr)), float(np.max(arr))
    fractional = arr.dtype.kind == "f" and not np.array_equal(arr, np.rint(arr))
    if lo < 0 or hi > 255 or fractional:
        raise ArtifactError(
            f"{path}: input '{name}' is an image feature (8-bit pixels, integers 0..255), got values in "
            f"[{lo:g}, {hi:g}]{' (not integers)' if fractional else ''}; feed pixel values, e.g. "
            "`edge_convnext.contract.InputContract.feed` of a [0, 1] batch")


_CONTROLLER: Any = None


def _blas_limit(threads: int | None) -> contextlib.AbstractContextManager[Any]:
    """Cap BLAS threads while predicting (threadpoolctl is optional: without it, no cap)."""
    global _CONTROLLER
    if threads is None:
        return contextlib.nullcontext()
    if _CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _CONTROLLER = False
        else:
            _CONTROLLER = ThreadpoolController()
    if _CONTROLLER is False:
        return contextlib.nullcontext()
    return _CONTROLLER.limit(limits=threads, user_api="blas")


def _as_output(value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind in "fiub":
        return arr.astype(np.float32, copy=False)
    return arr
