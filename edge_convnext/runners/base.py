"""The runner protocol and the one function that picks a runner for an artifact.

A runner loads one artifact and maps float32 ``[N, 3, 224, 224]`` RGB in [0, 1] (NCHW, the shared
preprocessing's output) to float32 ``[N, 1000]`` logits. Runtime packages are imported inside each
runner module, so a device with only the LiteRT interpreter never imports the others (or torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_convnext.errors import ArtifactError
from edge_convnext.manifest import Manifest, TensorSpec
from edge_convnext.recipes import ArtifactFormat


class Runner(Protocol):
    """A loaded artifact. ``name`` is the runtime as tables show it ("litert", "coreml-emulated", ...)."""

    name: str
    emulated: bool

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]`` logits."""
        ...


_MODULES = {
    ArtifactFormat.TFLITE: "edge_convnext.runners.tflite",
    ArtifactFormat.EXECUTORCH: "edge_convnext.runners.executorch",
    ArtifactFormat.COREML: "edge_convnext.runners.coreml",
}


def open_runner(artifact: Path, manifest: Manifest | None = None, threads: int | None = None) -> Runner:
    """Load ``artifact`` with the runtime for its format.

    Raises `ArtifactError` (missing, corrupted, wrong input contract) or `RuntimeUnavailable`
    (runtime not installed or not runnable on this host), each naming the file.
    """
    artifact = Path(artifact)
    if not artifact.exists():
        raise ArtifactError(f"{artifact}: no such artifact; run `edge-convnext convert` to build it")
    fmt = ArtifactFormat.from_path(str(artifact))
    module = importlib.import_module(_MODULES[fmt])
    return module.open(artifact, manifest=manifest, threads=threads)  # type: ignore[no-any-return]


def check_input_shape(artifact: Path, actual: tuple[int, ...], expected: TensorSpec | None) -> None:
    """Refuse an artifact whose input tensor breaks the contract, naming both shapes."""
    want = tuple(expected.shape) if expected is not None else (1, 3, 224, 224)
    if tuple(actual) != want:
        raise ArtifactError(
            f"{artifact}: input shape {tuple(actual)} does not match the contract {want} "
            "(float32 RGB NCHW in [0, 1]); rebuild it with `edge-convnext convert`"
        )


def run_batched(x: np.ndarray, run_one: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Run a batch-1 model over ``x`` ``[N, 3, 224, 224]`` row by row -> ``[N, 1000]`` float32."""
    if x.ndim != 4 or x.shape[1:] != (3, 224, 224):
        raise ValueError(f"expected float32 [N, 3, 224, 224], got {x.dtype} {list(x.shape)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.concatenate([np.asarray(run_one(x[i : i + 1]), dtype=np.float32).reshape(1, -1) for i in range(len(x))])
