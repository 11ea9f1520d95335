"""The runner protocol and the one function that picks a runner for an artifact.

A runner loads one artifact and maps the shared preprocessing's output, float32 ``[N, 3, 224, 224]``
RGB in [0, 1] (NCHW), to float32 ``[N, 1000]`` logits up to a per-image constant. Each artifact's own
input and output contracts (NHWC, image features, probabilities, classifier dictionaries) are read
from its manifest and applied by `edge_convnext.contract`; a runner only moves tensors in and out.
Runtime packages are imported inside each runner module, so a device with only the LiteRT
interpreter never imports the others (or torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_convnext.contract import INPUT_CONTRACTS, OUTPUT_CONTRACTS, InputContract, OutputContract, input_contract, output_contract
from edge_convnext.errors import ArtifactError
from edge_convnext.manifest import Manifest
from edge_convnext.recipes import ArtifactFormat


class Runner(Protocol):
    """A loaded artifact. ``name`` is the runtime as tables show it ("litert", "coreml-emulated", ...)."""

    name: str
    emulated: bool

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]`` logits up to a per-image constant."""
        ...


_MODULES = {
    ArtifactFormat.TFLITE: "edge_convnext.runners.tflite",
    ArtifactFormat.EXECUTORCH: "edge_convnext.runners.executorch",
    ArtifactFormat.COREML: "edge_convnext.runners.coreml",
}


def open_runner(artifact: Path, manifest: Manifest | None = None, threads: int | None = None) -> Runner:
    """Load ``artifact`` with the runtime for its format.

    Raises `ArtifactError` (missing, corrupted, unknown or broken contract) or `RuntimeUnavailable`
    (runtime not installed or not runnable on this host), each naming the file.
    """
    artifact = Path(artifact)
    if not artifact.exists():
        raise ArtifactError(f"{artifact}: no such artifact; run `edge-convnext convert` to build it")
    fmt = ArtifactFormat.from_path(str(artifact))
    module = importlib.import_module(_MODULES[fmt])
    return module.open(artifact, manifest=manifest, threads=threads)  # type: ignore[no-any-return]


def contracts(artifact: Path, manifest: Manifest | None) -> tuple[InputContract, OutputContract]:
    """The artifact's input and output contracts: its manifest's, else its format's defaults."""
    if manifest is not None:
        return input_contract(artifact, manifest.input), output_contract(artifact, manifest.output)
    fmt = ArtifactFormat.from_path(str(artifact))
    return INPUT_CONTRACTS[fmt.input_contract], OUTPUT_CONTRACTS[fmt.output_contract]


def run_batched(x: np.ndarray, contract: InputContract, run_one: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Feed ``x`` (float32 ``[N, 3, 224, 224]`` in [0, 1]) through ``contract`` to a batch-1 model row by row.

    ``run_one`` takes one row of the contract's batch and returns the raw output -> ``[N, 1000]`` float32.
    """
    fed = contract.feed(x)  # ValueError unless x is [N, 3, 224, 224]
    return np.concatenate([np.asarray(run_one(fed[i : i + 1]), dtype=np.float32).reshape(1, -1) for i in range(len(fed))])

