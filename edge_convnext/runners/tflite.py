"""LiteRT (TFLite) runner, and the reader for the files embedded in a ``.tflite``.

Device-side module: imports NumPy and the interpreter only (never torch), so it runs on a Raspberry
Pi with ``pip install edge-convnext[litert]``. The interpreter is ``ai_edge_litert``'s; the legacy
``tflite_runtime`` package is used only when it is the one installed.

Embedded files (written by ``converters.backends.tflite``): a zip archive appended to the flatbuffer,
as TFLite Support's metadata populator stores associated files (the model stays loadable, and
``zipfile`` lists ``labels.txt`` and ``manifest.json``), and the same files as flatbuffer ``metadata``
entries named ``edge_convnext/<file>``, which survive tools that re-serialize the flatbuffer and drop
trailing bytes.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.contract import check_tensor
from edge_convnext.errors import ArtifactError, MissingExtra, first_line
from edge_convnext.manifest import Manifest
from edge_convnext.runners.base import contracts, run_batched

METADATA_PREFIX = "edge_convnext/"
LABELS_NAME = "labels.txt"
MANIFEST_NAME = "manifest.json"
_FILE_IDENTIFIER = b"TFL3"  # bytes 4..8 of every TFLite flatbuffer


def _interpreter_class() -> tuple[type, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]

        return Interpreter, "tflite-runtime"
    except ImportError:
        raise MissingExtra("ai-edge-litert", "litert", "running a .tflite artifact") from None


class TFLiteRunner:
    """A loaded ``.tflite``: float32 ``[N, 3, 224, 224]`` in [0, 1] (NCHW) -> float32 ``[N, 1000]`` log-scores.

    The input is fed in the artifact's input contract (NHWC float32 in [0, 1] for this project's
    builds; NCHW or uint8 where a manifest says so); integer input/output tensors are (de)quantized
    with their own scale and zero point; probabilities come back as ``log p``.
    """

    emulated = False

    def __init__(self, artifact: Path, manifest: Manifest | None = None, threads: int | None = None) -> None:
        self.artifact = Path(artifact)
        interpreter_cls, self.name = _interpreter_class()
        _check_header(self.artifact)
        self.input_contract, self.output_contract = contracts(self.artifact, manifest)
        try:
            # LiteRT defaults to one thread; a device's harness wants all of its cores unless told otherwise.
            self.threads = threads or os.cpu_count() or 1
            self.interpreter = interpreter_cls(model_path=str(self.artifact), num_threads=self.threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ArtifactError(
                f"{self.artifact}: the LiteRT interpreter cannot load it ({first_line(e)}); the file is "
                "corrupted or not a TFLite model. Rebuild it with `edge-convnext convert`"
            ) from e
        inputs, outputs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ArtifactError(f"{self.artifact}: expected 1 input and 1 output, found {len(inputs)} and {len(outputs)}")
        self._in, self._out = inputs[0], outputs[0]
        in_dtype = np.dtype(self._in["dtype"])
        # A quantized integer tensor can take a float contract's real values through its scale.
        quantized = in_dtype.kind in "iu" and bool(self._in["quantization"][0])
        fed_dtype = "float32" if quantized and self.input_contract.dtype == "float32" else in_dtype.name
        check_tensor(self.artifact, self.input_contract, tuple(int(d) for d in self._in["shape"]), fed_dtype)
        for d in (self._in, self._out):
            dt = np.dtype(d["dtype"])
            if dt not in (np.float32, np.uint8) and not d["quantization"][0]:
                raise ArtifactError(f"{self.artifact}: tensor {d['name']!r} is {dt} without a "
                                    "quantization scale; it cannot be fed or read as real values")

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]`` log-scores (one invoke per image)."""
        return self.output_contract.log_scores(run_batched(x, self.input_contract, self._run_one))

    def run_raw(self, fed: np.ndarray) -> np.ndarray:
        """One batch-1 input already in the input contract -> the model's raw output (probabilities)."""
        return self._run_one(fed)

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self._in["index"], _quantize(x, self._in))
        self.interpreter.invoke()
        return _dequantize(self.interpreter.get_tensor(self._out["index"]), self._out)


def open(artifact: Path, manifest: Manifest | None = None, threads: int | None = None) -> TFLiteRunner:  # noqa: A001
    """Load a ``.tflite`` artifact; `ArtifactError` (naming the file) when missing, corrupted or off-contract."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise ArtifactError(f"{artifact}: no such artifact; run `edge-convnext convert` to build it")
    return TFLiteRunner(artifact, manifest, threads)


def read_embedded(artifact: Path) -> dict[str, bytes]:
    """Files embedded in a ``.tflite`` -> ``{"labels.txt": b"...", "manifest.json": b"..."}``.

    Reads the appended zip first; flatbuffer metadata entries ``edge_convnext/<name>`` fill in what
    the zip lacks (e.g. when a tool dropped the trailing zip). Empty dict when nothing is embedded.
    """
    artifact = Path(artifact)
    try:
        data = artifact.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{artifact}: cannot read it ({e.strerror})") from e
    if data[4:8] != _FILE_IDENTIFIER:
        raise ArtifactError(f"{artifact}: not a TFLite model (no {_FILE_IDENTIFIER.decode()} identifier)")
    files: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            files = {n: z.read(n) for n in z.namelist() if not n.endswith("/")}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        pass  # no zip, or a truncated one: fall back to the flatbuffer metadata below
    for name, value in _flatbuffer_metadata(data).items():
        if name.startswith(METADATA_PREFIX):
            files.setdefault(name[len(METADATA_PREFIX):], value)
    return files


def embedded_labels(artifact: Path) -> list[str] | None:
    """Class names embedded in the artifact (line i is class i), or None."""
    raw = read_embedded(artifact).get(LABELS_NAME)
    return raw.decode("utf-8").splitlines() if raw is not None else None


def embedded_manifest(artifact: Path) -> dict[str, Any] | None:
    """The build facts embedded in the artifact (see `Manifest.embedded_dict`), or None."""
    raw = read_embedded(artifact).get(MANIFEST_NAME)
    return json.loads(raw) if raw is not None else None


def _flatbuffer_metadata(data: bytes) -> dict[str, bytes]:
    """The model's ``metadata`` entries (name -> buffer bytes); {} when the schema module is unavailable."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # tflite_runtime-only devices have no flatbuffer schema; the zip still serves
        return {}
    try:
        model = schema.Model.GetRootAs(data, 0)
        out: dict[str, bytes] = {}
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            buf = model.Buffers(entry.Buffer())
            if buf.Offset() > 1:  # stored after the flatbuffer (large models)
                value = data[buf.Offset(): buf.Offset() + buf.Size()]
            else:
                value = buf.DataAsNumpy().tobytes() if buf.DataLength() else b""
            out[entry.Name().decode("utf-8")] = bytes(value)
        return out
    except Exception:  # noqa: BLE001 - a malformed flatbuffer has no readable metadata
        return {}


def _check_header(artifact: Path) -> None:
    try:
        with artifact.open("rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ArtifactError(f"{artifact}: cannot read it ({e.strerror})") from e
    if len(head) < 8 or head[4:8] != _FILE_IDENTIFIER:
        raise ArtifactError(
            f"{artifact}: not a TFLite model (no {_FILE_IDENTIFIER.decode()} identifier; the file is truncated "
            "or corrupted). Rebuild it with `edge-convnext convert`"
        )


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype == x.dtype:
        return np.ascontiguousarray(x)  # float32, or raw uint8 pixels for a uint8 contract
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(x.astype(np.float64) / scale) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if y.dtype == np.float32 or not detail["quantization"][0]:
        return y.astype(np.float32)
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)

