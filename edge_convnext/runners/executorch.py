"""ExecuTorch runner: ``executorch.runtime`` (the pip wheel's C++ runtime with its Python bindings).

The bindings need torch: ``executorch.extension.pybindings`` imports it to load ``libtorch`` (its
``_C`` module links ``libtorch_python``), and ``Method.execute`` takes ``torch.Tensor`` inputs only
(NumPy arrays are refused). So this runner imports torch, lazily, inside `open`.

Threads: the runtime has one process-wide threadpool (XNNPACK and the optimized kernels use it),
sized to the logical cores by default. ``threads`` resizes it with the bindings'
``_unsafe_reset_threadpool`` before the method is loaded. Methods loaded earlier keep a pointer to
the pool being replaced, so a resize invalidates every ExecuTorch runner opened before it in this
process: using one afterwards raises instead of crashing.

Core ML: a program delegated to ``CoreMLBackend`` runs only in an Apple build of ExecuTorch. Elsewhere
`open` hands it to `edge_convnext.runners.executorch_coreml`, which extracts the delegate's Core ML
model and runs it in the Core ML emulator ("executorch-coreml-emulated").
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.contract import InputContract, OutputContract, check_tensor
from edge_convnext.errors import ArtifactError, RuntimeUnavailable
from edge_convnext.manifest import Manifest
from edge_convnext.runners import executorch_coreml
from edge_convnext.runners.base import contracts, run_batched
from edge_convnext.runners.executorch_coreml import COREML_BACKEND, EmulatedExecuTorchCoreMLRunner

# The constant methods `converters.backends.executorch` embeds the metadata in.
MANIFEST_METHOD = "edge_convnext_manifest"
LABELS_METHOD = "edge_convnext_labels"
CONTRACT_METHOD = "edge_convnext_contract"
_EMBEDDED = {"manifest": MANIFEST_METHOD, "labels": LABELS_METHOD, "contract": CONTRACT_METHOD}
_APPLE_ONLY = {COREML_BACKEND, "MPSBackend"}
_FLOAT32 = 6  # c10::ScalarType::Float, as TensorInfo.dtype() reports it
_pool_generation = 0  # bumped on every threadpool resize; runners from older generations refuse to run


class ExecuTorchRunner:
    """A loaded ``forward`` method: float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]`` log-scores."""

    name = "executorch"
    emulated = False

    def __init__(self, artifact: Path, method: Any, backends: Sequence[str], torch_module: Any,
                 io: tuple[InputContract, OutputContract]) -> None:
        self.artifact = artifact
        self.input_contract, self.output_contract = io
        self.backends = tuple(backends)  # delegate backend ids in the program, e.g. ("XnnpackBackend",)
        self._method = method
        self._torch = torch_module
        self._generation = _pool_generation

    def run(self, x: np.ndarray) -> np.ndarray:
        if self._generation != _pool_generation:
            raise ArtifactError(
                f"{self.artifact}: the ExecuTorch threadpool was resized after this runner was opened, which "
                "invalidates it; open the artifact again"
            )
        return self.output_contract.log_scores(run_batched(x, self.input_contract, self._run_one))

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        try:
            (out,) = self._method.execute([self._torch.from_numpy(x)])
        except RuntimeError as e:
            raise ArtifactError(f"{self.artifact}: ExecuTorch failed to execute forward ({e})") from e
        return out.numpy()


def open(  # noqa: A001 - the runner-module interface `edge_convnext.runners.base.open_runner` calls
    artifact: Path, manifest: Manifest | None = None, threads: int | None = None, *, emulate: bool | None = None
) -> ExecuTorchRunner | EmulatedExecuTorchCoreMLRunner:
    """Load ``artifact`` (a ``.pte``) for batch-1 inference with ``threads`` runtime threads (None: the default).

    A program with the Core ML delegate runs in emulation (`edge_convnext.runners.executorch_coreml`)
    when this runtime lacks that backend, as every non-Apple one does; ``emulate`` forces either way.
    Raises `ArtifactError` for a missing, truncated or corrupted file or one that breaks the input
    contract, and `RuntimeUnavailable` when ExecuTorch is not installed or the program needs a
    delegate this runtime lacks (and, for Core ML, has ops outside it that the emulation cannot run).
    """
    global _pool_generation
    artifact = Path(artifact)
    if not artifact.is_file():
        raise ArtifactError(f"{artifact}: no such ExecuTorch program; run `edge-convnext convert` to build it")
    runtime, legacy, torch = _runtime()
    backends = delegate_backends(artifact)
    if emulate is None:
        emulate = COREML_BACKEND in backends and not runtime.backend_registry.is_available(COREML_BACKEND)
    if emulate:
        return executorch_coreml.open(artifact, manifest, threads)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if legacy._threadpool_get_thread_count() != threads:
            legacy._unsafe_reset_threadpool(int(threads))
            _pool_generation += 1
    program = _load_program(runtime, artifact)
    missing = [b for b in backends if not runtime.backend_registry.is_available(b)]
    if missing:
        raise _unavailable(artifact, missing, runtime.backend_registry.registered_backend_names)
    try:
        method = program.load_method("forward")
    except KeyError as e:
        have = sorted(program.method_names)
        raise ArtifactError(f"{artifact}: the program has no forward method (it has {have})") from e
    except RuntimeError as e:
        raise ArtifactError(
            f"{artifact}: ExecuTorch could not load forward ({e}); the file is truncated or corrupted, or was "
            "built by an incompatible ExecuTorch; rebuild it with `edge-convnext convert`"
        ) from e
    meta = method.metadata
    if meta.num_inputs() != 1 or meta.num_outputs() != 1:
        raise ArtifactError(f"{artifact}: forward takes {meta.num_inputs()} inputs and returns "
                            f"{meta.num_outputs()} outputs; expected one image tensor in, one probabilities tensor out")
    io = contracts(artifact, manifest)
    dtype = "float32" if meta.input_tensor_meta(0).dtype() == _FLOAT32 else f"ScalarType {meta.input_tensor_meta(0).dtype()}"
    check_tensor(artifact, io[0], tuple(meta.input_tensor_meta(0).sizes()), dtype)
    want_out = io[1].shape
    got_out = tuple(meta.output_tensor_meta(0).sizes())
    if got_out != want_out:
        raise ArtifactError(f"{artifact}: output shape {got_out} does not match the contract {io[1].id!r} {want_out}")
    return ExecuTorchRunner(artifact, method, backends, torch, io)


def read_embedded(path: Path) -> dict[str, str]:
    """The metadata embedded in a ``.pte``: ``{"manifest": <JSON>, "labels": <one class per line>, "contract": <JSON>}``.

    Keys are present only for the constant methods the program has (none for a foreign ``.pte``).
    Constant methods need no delegate, so this also works for a Core ML program on Linux.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such ExecuTorch program")
    runtime, _, _ = _runtime()
    program = _load_program(runtime, path)
    out: dict[str, str] = {}
    for key, method_name in _EMBEDDED.items():
        if method_name not in program.method_names:
            continue
        try:
            (value,) = program.load_method(method_name).execute([])
        except (RuntimeError, ValueError) as e:
            raise ArtifactError(f"{path}: cannot read the embedded {key} ({e})") from e
        out[key] = value if isinstance(value, str) else bytes(value.numpy().astype(np.uint8)).decode("utf-8")
    return out


def delegate_backends(path: Path) -> list[str]:
    """Delegate backend ids used by the program's methods, in order (e.g. ``["XnnpackBackend"]``).

    Read from the ``.pte`` flatbuffer (``Program.execution_plan[].delegates[].id``) without loading any
    segment. Returns ``[]`` when the file cannot be parsed; loading the program reports that.
    """
    try:
        from flatbuffers.table import Table
    except ImportError:
        return []
    try:
        with Path(path).open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read_delegate_ids(buf, Table)
    except Exception:  # noqa: BLE001 - an unparseable file is reported by the runtime's own load
        return []


def _read_delegate_ids(buf: Any, table_cls: Any) -> list[str]:
    if len(buf) < 8 or bytes(buf[4:6]) != b"ET":  # file identifier "ET12" (schema version in the last two)
        return []
    root = table_cls(buf, struct.unpack_from("<I", buf, 0)[0])
    ids: list[str] = []
    plans = _vector(root, 1)  # Program.execution_plan
    for i in range(plans[1] if plans else 0):
        plan = table_cls(buf, root.Indirect(plans[0] + 4 * i))
        delegates = _vector(plan, 7)  # ExecutionPlan.delegates
        for j in range(delegates[1] if delegates else 0):
            delegate = table_cls(buf, plan.Indirect(delegates[0] + 4 * j))
            o = delegate.Offset(4)  # BackendDelegate.id (field 0)
            if o:
                name = delegate.String(o + delegate.Pos).decode("utf-8")
                if name not in ids:
                    ids.append(name)
    return ids


def _vector(table: Any, field: int) -> tuple[int, int] | None:
    o = table.Offset(4 + 2 * field)
    return (table.Vector(o), table.VectorLen(o)) if o else None


def _runtime() -> tuple[Any, Any, Any]:
    try:
        import torch
        from executorch.extension.pybindings import portable_lib as legacy
        from executorch.runtime import Runtime
    except ImportError as e:
        raise RuntimeUnavailable(
            f"running ExecuTorch artifacts needs the ExecuTorch runtime ({e}); "
            "install it with: pip install 'edge-convnext[executorch-runtime]'"
        ) from e
    return Runtime.get(), legacy, torch


def _load_program(runtime: Any, artifact: Path) -> Any:
    try:
        return runtime.load_program(artifact)
    except (RuntimeError, ValueError) as e:
        raise ArtifactError(
            f"{artifact}: not a loadable ExecuTorch program ({e}); the file is truncated or corrupted, "
            "or not a .pte; rebuild it with `edge-convnext convert`"
        ) from e


def _unavailable(artifact: Path, missing: list[str], available: Sequence[str]) -> RuntimeUnavailable:
    have = ", ".join(available) or "none"
    if any(b in _APPLE_ONLY for b in missing):
        return RuntimeUnavailable(
            f"{artifact}: uses the {'/'.join(missing)} delegate, which runs on Apple devices only (macOS/iOS with "
            f"an ExecuTorch build that includes it); this ExecuTorch runtime has: {have}"
        )
    return RuntimeUnavailable(
        f"{artifact}: needs the ExecuTorch delegate(s) {', '.join(missing)}, which this runtime lacks "
        f"(it has: {have}); run it with an ExecuTorch build that includes them"
    )
