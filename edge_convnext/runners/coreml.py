"""Core ML runner: Core ML itself on macOS, the NumPy emulator of the ML program elsewhere.

``MLModel.predict`` exists only on macOS ("coreml", ``emulated=False``). On any other OS the
ML program is executed op by op by `edge_convnext.coreml_emulator` ("coreml-emulated",
``emulated=True``; fp16 programs are emulated with float16 rounding after every op), so parity and
accuracy of Core ML artifacts can be measured on Linux, and every table says which of the two
produced a number. Both read the ``.mlpackage`` with coremltools (the ``coreml-runtime`` extra). This
module imports no torch itself, but importing coremltools pulls torch in when it is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.errors import ArtifactError, MissingExtra, RuntimeUnavailable
from edge_convnext.manifest import Manifest
from edge_convnext.runners.base import check_input_shape, run_batched


def _io_names(artifact: Path, inputs: list[str], outputs: list[str], manifest: Manifest | None) -> tuple[str, str]:
    """The input and output feature to use: the manifest's names, else the model's only ones."""
    if manifest is not None:
        want_in, want_out = manifest.input.name, manifest.output.name
    elif len(inputs) == 1 and len(outputs) == 1:
        want_in, want_out = inputs[0], outputs[0]
    else:
        raise ArtifactError(f"{artifact}: expected 1 input and 1 output, found inputs {inputs} and outputs {outputs}")
    if want_in not in inputs or want_out not in outputs:
        raise ArtifactError(
            f"{artifact}: the model's features are inputs {inputs} -> outputs {outputs}; its manifest names "
            f"'{want_in}' -> '{want_out}'. Rebuild it with `edge-convnext convert`"
        )
    return want_in, want_out


@contextlib.contextmanager
def _thread_limit(threads: int | None) -> Iterator[None]:
    """Cap NumPy's BLAS threads (the emulator's conv/linear) when asked and threadpoolctl is there."""
    if not threads:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=threads):
        yield


class CoreMLRunner:
    """Core ML on macOS: float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]`` logits.

    ``compute_units`` is a ``coremltools.ComputeUnit`` name (``ALL``, ``CPU_ONLY``,
    ``CPU_AND_GPU``, ``CPU_AND_NE``); ``threads`` has no Core ML equivalent and is ignored.
    """

    name = "coreml"
    emulated = False

    def __init__(self, artifact: Path, manifest: Manifest | None = None, compute_units: str = "ALL") -> None:
        import coremltools as ct

        self.artifact = Path(artifact)
        self.compute_units = compute_units
        try:
            units = getattr(ct.ComputeUnit, compute_units)
        except AttributeError:
            known = [u.name for u in ct.ComputeUnit]
            raise ValueError(f"unknown compute units {compute_units!r}; use one of {known}") from None
        try:
            self.model = ct.models.MLModel(str(self.artifact), compute_units=units)
            spec = self.model.get_spec()
        except Exception as e:  # coremltools raises anything from RuntimeError to protobuf errors
            raise ArtifactError(
                f"{self.artifact}: Core ML cannot load it ({type(e).__name__}: {e}); the package is corrupted "
                "or not a Core ML model. Rebuild it with `edge-convnext convert`"
            ) from e
        features = {f.name: f for f in spec.description.input}
        self.input_name, self.output_name = _io_names(
            self.artifact, list(features), [f.name for f in spec.description.output], manifest)
        arr = features[self.input_name].type.multiArrayType
        check_input_shape(self.artifact, tuple(int(d) for d in arr.shape), manifest.input if manifest else None)

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]`` logits (one predict per image)."""
        return run_batched(x, self._run_one)

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model.predict({self.input_name: x})[self.output_name], dtype=np.float32)


class EmulatedCoreMLRunner:
    """The ML program run by `CoreMLEmulator` (NumPy): same contract as `CoreMLRunner`.

    ``precision="auto"`` emulates the program's own precision; ``"fp32"`` runs it in float32.
    """

    name = "coreml-emulated"
    emulated = True

    def __init__(self, artifact: Path, manifest: Manifest | None = None, threads: int | None = None,
                 precision: str = "auto") -> None:
        try:
            from edge_convnext.coreml_emulator import CoreMLEmulator
        except ImportError as e:
            raise RuntimeUnavailable(
                f"{artifact}: Core ML runs only on macOS and the Core ML emulator cannot be imported here ({e})"
            ) from e
        self.artifact = Path(artifact)
        self.threads = threads
        self.emulator: Any = CoreMLEmulator(self.artifact, precision=precision)  # ArtifactError when corrupted
        self.input_name, self.output_name = _io_names(
            self.artifact, list(self.emulator.input_names), list(self.emulator.output_names), manifest)
        check_input_shape(self.artifact, tuple(self.emulator.input_shapes[self.input_name]),
                          manifest.input if manifest else None)

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]`` logits (one program run per image)."""
        with _thread_limit(self.threads):
            return run_batched(x, self._run_one)

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        return self.emulator.predict({self.input_name: x})[self.output_name]


def open(  # noqa: A001 - the runner-module entry point `open_runner` calls
    artifact: Path,
    manifest: Manifest | None = None,
    threads: int | None = None,
    *,
    emulate: bool | None = None,
    compute_units: str = "ALL",
) -> CoreMLRunner | EmulatedCoreMLRunner:
    """Load an ``.mlpackage``: Core ML on macOS, the emulator elsewhere (``emulate`` forces either).

    Raises `ArtifactError` naming the path (missing, not a package, corrupted, off-contract),
    `MissingExtra` without coremltools, `RuntimeUnavailable` for Core ML off macOS or an ML program
    op the emulator lacks.
    """
    artifact = Path(artifact)
    if not artifact.exists():
        raise ArtifactError(f"{artifact}: no such artifact; run `edge-convnext convert` to build it")
    if not artifact.is_dir() or not (artifact / "Manifest.json").is_file():
        raise ArtifactError(
            f"{artifact}: not an .mlpackage (a directory with Manifest.json); the copy is incomplete or "
            "corrupted. Rebuild it with `edge-convnext convert`"
        )
    if importlib.util.find_spec("coremltools") is None:
        raise MissingExtra("coremltools", "coreml-runtime", "running a Core ML artifact")
    on_macos = sys.platform == "darwin"
    if emulate is None:
        emulate = not on_macos
    if not emulate:
        if not on_macos:
            raise RuntimeUnavailable(f"{artifact}: Core ML itself runs only on macOS (this is {sys.platform})")
        return CoreMLRunner(artifact, manifest, compute_units=compute_units)
    return EmulatedCoreMLRunner(artifact, manifest, threads=threads)
