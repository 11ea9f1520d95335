"""ExecuTorch programs delegated to Core ML, off Apple: extract the delegate's model and emulate it.

A ``.pte`` lowered with ExecuTorch's ``CoreMLPartitioner`` (model type ``MODEL``) carries an ordinary,
uncompiled ``.mlpackage`` as its delegate payload, flattened by the Core ML backend's
``executorchcoreml.flatten_directory_contents``. This module reads it back with ExecuTorch's own
pieces, never with byte offsets of its own: the program deserializer
(``executorch.exir._serialize._program.deserialize_pte_binary``: extended header, segments, inline and
named data) and ``executorchcoreml.unflatten_directory_contents`` (the reverse of the flattening),
the same two the ExecuTorch repository's ``extract_coreml_models.py`` uses.

Dependency note: the deserializer lives in ``executorch.exir``, whose package import loads torch, so
extraction needs the ``executorch-runtime`` extra (which imports torch anyway, see
`edge_convnext.runners.executorch`). The only lighter path, the flatbuffer classes generated from the
official schema, sits under the same package (``executorch.exir._serialize.generated``) and cannot be
imported without it; the emulator's coremltools also imports torch when it is installed.

`EmulatedExecuTorchCoreMLRunner` ("executorch-coreml-emulated", ``emulated=True``) runs ``forward`` the
way ExecuTorch would: the delegate call through `edge_convnext.coreml_emulator` (the embedded model's
own input/output names, in the order the delegate's ``metadata.json`` gives them), then the kernels
outside the delegate. Only the ones listed in `_KERNELS` are run (today the float32 ``aten::_softmax``
that the recipe keeps out of the fp16 delegate); any other instruction makes `open` refuse with the
ops it cannot run, instead of guessing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.contract import InputContract, OutputContract, check_tensor
from edge_convnext.errors import ArtifactError, EdgeConvNextError, RuntimeUnavailable, first_line
from edge_convnext.fileio import atomic_path
from edge_convnext.manifest import Manifest
from edge_convnext.runners.base import contracts, run_batched

COREML_BACKEND = "CoreMLBackend"
_JSON_REFERENCE = b"CMJR"  # payload prefix of a multifunction model stored as named data (coreml_preprocess.py)
_MODEL_DIR = "model.mlpackage"  # coreml_preprocess.MODEL_PATHS: inside the flattened directory
_METADATA = "metadata.json"
_COMPILED_DIR = "model.mlmodelc"
_FLOAT32 = 6  # executorch ScalarType.FLOAT
_REBUILD = "rebuild it with `edge-convnext convert`"


def _softmax(args: Sequence[Any]) -> np.ndarray:
    """``aten::_softmax.out(self, dim, half_to_float, out)``: float32, max-subtracted, like the portable kernel."""
    x, dim, half_to_float = args[0], int(args[1]), bool(args[2])
    if half_to_float or x.dtype != np.float32:
        raise ValueError(f"only float32 softmax is emulated (dtype {x.dtype}, half_to_float={half_to_float})")
    e = np.exp(x - x.max(axis=dim, keepdims=True))
    return (e / e.sum(axis=dim, keepdims=True)).astype(np.float32)


@dataclass(frozen=True)
class _Kernel:
    """A portable kernel the runner applies itself: ``n_in`` operands (tensors and scalars), then its out."""

    n_in: int
    fn: Callable[[Sequence[Any]], np.ndarray]


# Operator name -> how to run it. Each entry is checked against the portable kernel on a real program in
# tests/test_executorch_coreml.py; add one only with such a test.
_KERNELS: dict[tuple[str, str], _Kernel] = {("aten::_softmax", "out"): _Kernel(3, _softmax)}


@dataclass(frozen=True)
class _Step:
    """One instruction of ``forward``: the delegate call or a kernel, on indices into the value table."""

    kernel: _Kernel | None  # None: the Core ML delegate call
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class DelegatedProgram:
    """What of a ``.pte`` the emulated runner needs: ``forward``'s plan and the Core ML payload."""

    payload: bytes  # the flattened directory: metadata.json + model.mlpackage (+ debug info)
    steps: tuple[_Step, ...]
    inputs: tuple[int, ...]  # value indices of forward's inputs and outputs
    outputs: tuple[int, ...]
    constants: dict[int, Any]  # scalar values (ints, bools, ...) the kernels read
    tensors: dict[int, tuple[tuple[int, ...], int]]  # value index -> (sizes, ScalarType)


def read_program(artifact: Path, *, require_runnable: bool = True) -> DelegatedProgram:
    """Deserialize ``artifact`` (a ``.pte``) and find its ``forward``'s one Core ML delegate.

    With ``require_runnable`` every instruction outside the delegate must be one of `_KERNELS`; else
    `RuntimeUnavailable` lists the ops that cannot run here. `ArtifactError` names the file when it is
    unreadable, has no Core ML delegate, or its payload is missing.
    """
    artifact = Path(artifact)
    deserialize, _ = _executorch()
    try:
        data = artifact.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{artifact}: cannot read the ExecuTorch program ({e})") from e
    try:
        pte = deserialize(data)
    except Exception as e:  # flatbuffers and the segment checks raise anything from ValueError to struct.error
        raise ArtifactError(f"{artifact}: not a readable ExecuTorch program ({type(e).__name__}: {first_line(e)}); "
                            f"the file is truncated or corrupted; {_REBUILD}") from e
    program = pte.program
    plans = {p.name: p for p in program.execution_plan}
    if "forward" not in plans:
        raise ArtifactError(f"{artifact}: the program has no forward method (it has {sorted(plans)})")
    plan = plans["forward"]
    ids = [d.id for d in plan.delegates]
    coreml = [i for i, d in enumerate(ids) if d == COREML_BACKEND]
    if len(coreml) != 1:
        raise ArtifactError(f"{artifact}: forward has {len(coreml)} {COREML_BACKEND} delegates (delegates: {ids or 'none'}); "
                            "expected exactly one, as the executorch-coreml-* recipes build it")
    payload = _payload(artifact, program, pte.named_data, plan.delegates[coreml[0]])
    steps, outside = [], []
    for instruction in plan.chains[0].instructions if plan.chains else ():
        args = instruction.instr_args
        kind = type(args).__name__
        if kind == "DelegateCall" and args.delegate_index == coreml[0]:
            steps.append(_Step(None, tuple(args.args), ()))  # split into inputs/outputs once the model is known
        elif kind == "KernelCall":
            op = plan.operators[args.op_index]
            kernel = _KERNELS.get((op.name, op.overload))
            if kernel is None:
                outside.append(f"{op.name}.{op.overload}")
                continue
            steps.append(_Step(kernel, tuple(args.args[: kernel.n_in]), tuple(args.args[kernel.n_in:])))
        elif kind == "DelegateCall":
            outside.append(f"delegate {ids[args.delegate_index]}")
        elif kind != "FreeCall":  # FreeCall only releases memory; jumps and moves are control flow
            outside.append(kind)
    if len(plan.chains) != 1:
        outside.append(f"{len(plan.chains)} chains")
    if require_runnable and outside:
        raise RuntimeUnavailable(
            f"{artifact}: cannot run: ops {sorted(set(outside))} outside the {COREML_BACKEND} delegate; the "
            f"emulated runner applies only {sorted(f'{n}.{o}' for n, o in _KERNELS)} itself (and the real "
            "ExecuTorch runtime with the Core ML backend runs only on Apple devices)")
    constants: dict[int, Any] = {}
    tensors: dict[int, tuple[tuple[int, ...], int]] = {}
    for i, v in enumerate(plan.values):
        kind = type(v.val).__name__
        if kind == "Tensor":
            if list(v.val.dim_order) != list(range(len(v.val.sizes))):
                raise RuntimeUnavailable(f"{artifact}: value {i} has dim order {list(v.val.dim_order)}; the emulated "
                                         "runner handles contiguous tensors only")
            tensors[i] = (tuple(int(s) for s in v.val.sizes), int(v.val.scalar_type))
        elif hasattr(v.val, kind.lower() + "_val"):  # Int.int_val, Bool.bool_val, Double.double_val
            constants[i] = getattr(v.val, kind.lower() + "_val")
    return DelegatedProgram(payload, tuple(steps), tuple(plan.inputs), tuple(plan.outputs), constants, tensors)


def _payload(artifact: Path, program: Any, named_data: Any, delegate: Any) -> bytes:
    """The delegate's processed bytes (inline, or the named data a JSON reference points to)."""
    ref = delegate.processed
    if ref.location.name != "INLINE":  # the deserializer moves segment payloads inline
        raise ArtifactError(f"{artifact}: the {COREML_BACKEND} payload is not inline ({ref.location.name}); {_REBUILD}")
    if ref.index >= len(program.backend_delegate_data):
        raise ArtifactError(f"{artifact}: the {COREML_BACKEND} payload is missing (delegate data {ref.index} of "
                            f"{len(program.backend_delegate_data)}); {_REBUILD}")
    raw = bytes(program.backend_delegate_data[ref.index].data)
    if raw.startswith(_JSON_REFERENCE):
        try:
            key = json.loads(raw[len(_JSON_REFERENCE):].decode("utf-8"))["key"]
            entry = named_data.pte_data[key]
            raw = bytes(named_data.buffers[entry.buffer_index])
        except Exception as e:  # noqa: BLE001 - any failure here is a broken reference
            raise ArtifactError(f"{artifact}: the {COREML_BACKEND} payload refers to named data it does not "
                                f"hold ({type(e).__name__}: {first_line(e)}); {_REBUILD}") from e
    if not raw:
        raise ArtifactError(f"{artifact}: the {COREML_BACKEND} payload is empty; {_REBUILD}")
    return raw


@dataclass(frozen=True)
class Unpacked:
    """A delegate payload unflattened into a directory."""

    package: Path  # the .mlpackage
    input_names: tuple[str, ...]  # the Core ML model's features, in the delegate call's argument order
    output_names: tuple[str, ...]


def unpack(artifact: Path, payload: bytes, directory: Path) -> Unpacked:
    """Unflatten ``payload`` into the empty ``directory``; `ArtifactError` naming ``artifact`` if it is corrupted."""
    _, unflatten = _executorch()
    try:
        ok = unflatten(payload, str(directory))
    except RuntimeError as e:  # "Failed to de-serialize bytes object!"
        raise ArtifactError(f"{artifact}: the {COREML_BACKEND} payload is corrupted or truncated ({first_line(e)}); "
                            f"{_REBUILD}") from e
    roots = [p.parent for p in directory.rglob(_METADATA)] if ok else []
    if len(roots) != 1:
        raise ArtifactError(f"{artifact}: the {COREML_BACKEND} payload does not unpack to one model directory with "
                            f"{_METADATA} (found {len(roots)}); {_REBUILD}")
    root = roots[0]
    if (root / _COMPILED_DIR).exists():
        raise RuntimeUnavailable(f"{artifact}: the {COREML_BACKEND} payload is a compiled model ({_COMPILED_DIR}), "
                                 "which only Core ML on an Apple device can read; build with model type MODEL")
    try:
        meta = json.loads((root / _METADATA).read_text("utf-8"))
        names = tuple(str(n) for n in meta["inputNames"]), tuple(str(n) for n in meta["outputNames"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{artifact}: the {COREML_BACKEND} payload's {_METADATA} is unreadable "
                            f"({type(e).__name__}: {first_line(e)}); the payload is corrupted; {_REBUILD}") from e
    if not (root / _MODEL_DIR / "Manifest.json").is_file():
        raise ArtifactError(f"{artifact}: the {COREML_BACKEND} payload holds no {_MODEL_DIR}; {_REBUILD}")
    return Unpacked(root / _MODEL_DIR, *names)


def extract(artifact: Path, out: Path) -> Path:
    """Write the ``.mlpackage`` inside ``artifact``'s Core ML delegate to ``out`` (atomically) -> ``out``.

    ``out`` then opens in Xcode or coremltools like any package (its inputs and outputs are the
    delegate's: float32 NCHW in, logits out, no image feature or classifier head).
    """
    artifact, out = Path(artifact), Path(out)
    if out.suffix != ".mlpackage":
        raise EdgeConvNextError(f"{out}: the output must be a .mlpackage path (Xcode and coremltools require it)")
    if artifact.suffix != ".pte":
        raise EdgeConvNextError(f"{artifact}: not an ExecuTorch program; give the .pte of an executorch-coreml-* recipe")
    if not artifact.is_file():
        raise ArtifactError(f"{artifact}: no such ExecuTorch program")
    program = read_program(artifact, require_runnable=False)
    with tempfile.TemporaryDirectory(prefix="edge-convnext-extract-") as tmp, atomic_path(out) as dst:
        package = unpack(artifact, program.payload, Path(tmp)).package
        _check_package(artifact, package)  # a package coremltools cannot read is not written
        shutil.move(str(package), dst)
    return out


def _check_package(artifact: Path, package: Path) -> None:
    """Read the unpacked package's spec, ML program and weights; `ArtifactError` naming ``artifact`` if broken."""
    from edge_convnext.coreml_emulator.program import load_package

    try:
        load_package(package)
    except ArtifactError as e:
        raise ArtifactError(f"{artifact}: the model in its {COREML_BACKEND} payload is corrupted ({first_line(e)}); "
                            f"{_REBUILD}") from e


class EmulatedExecuTorchCoreMLRunner:
    """``forward`` of a Core ML-delegated ``.pte``: float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]``.

    The delegate runs in `CoreMLEmulator` at the embedded program's own precision (fp16 for the
    recipe); the kernels after it in float32 NumPy. Returns log-scores through the output contract.
    """

    name = "executorch-coreml-emulated"
    emulated = True

    def __init__(self, artifact: Path, program: DelegatedProgram, emulator: Any, unpacked: Unpacked,
                 io: tuple[InputContract, OutputContract], threads: int | None) -> None:
        self.artifact = artifact
        self.input_contract, self.output_contract = io
        self.program = program
        self.emulator = emulator
        self.io = unpacked
        self.threads = threads

    def run(self, x: np.ndarray) -> np.ndarray:
        from edge_convnext.runners.coreml import thread_limit

        with thread_limit(self.threads):
            return self.output_contract.log_scores(run_batched(x, self.input_contract, self._run_one))

    def _run_one(self, x: np.ndarray) -> np.ndarray:
        p = self.program
        values: dict[int, Any] = dict(p.constants)
        values[p.inputs[0]] = np.ascontiguousarray(x, dtype=np.float32)
        for step in p.steps:
            if step.kernel is None:
                n = len(self.io.input_names)
                ins, outs = step.inputs[:n], step.inputs[n:]
                try:
                    got = self.emulator.predict({name: values[i] for name, i in zip(self.io.input_names, ins)})
                except ArtifactError as e:
                    raise ArtifactError(f"{self.artifact}: the embedded Core ML model failed: {e}") from e
                for name, i in zip(self.io.output_names, outs):
                    values[i] = got[name].reshape(p.tensors[i][0]).astype(np.float32)
            else:
                result = step.kernel.fn([values[i] for i in step.inputs])
                for i in step.outputs:
                    values[i] = result
        return values[p.outputs[0]]


def open(  # noqa: A001 - the runner-module interface (called from `edge_convnext.runners.executorch.open`)
    artifact: Path, manifest: Manifest | None = None, threads: int | None = None
) -> EmulatedExecuTorchCoreMLRunner:
    """Load a Core ML-delegated ``.pte`` for emulated batch-1 inference.

    Raises `ArtifactError` naming the file (unreadable, no Core ML delegate, corrupted payload, broken
    contract) and `RuntimeUnavailable` (ops outside the delegate that cannot run here, no emulator).
    """
    artifact = Path(artifact)
    program = read_program(artifact)
    try:
        from edge_convnext.coreml_emulator import CoreMLEmulator
    except ImportError as e:
        raise RuntimeUnavailable(f"{artifact}: the Core ML emulator cannot be imported here ({e})") from e
    # The emulator reads the program and its weights into memory at load, so the unpacked package can go.
    with tempfile.TemporaryDirectory(prefix="edge-convnext-pte-coreml-") as tmp:
        unpacked = unpack(artifact, program.payload, Path(tmp))
        try:
            emulator = CoreMLEmulator(unpacked.package)
        except ArtifactError as e:
            raise ArtifactError(f"{artifact}: the model in its {COREML_BACKEND} payload is corrupted ({first_line(e)}); "
                                f"{_REBUILD}") from e
    _check_structure(artifact, program, emulator, unpacked)
    io = contracts(artifact, manifest)
    shape, dtype = program.tensors[program.inputs[0]]
    check_tensor(artifact, io[0], shape, "float32" if dtype == _FLOAT32 else f"ScalarType {dtype}")
    out_shape = program.tensors[program.outputs[0]][0]
    if out_shape != io[1].shape:
        raise ArtifactError(f"{artifact}: output shape {out_shape} does not match the contract {io[1].id!r} {io[1].shape}")
    return EmulatedExecuTorchCoreMLRunner(artifact, program, emulator, unpacked, io, threads)


def _check_structure(artifact: Path, p: DelegatedProgram, emulator: Any, u: Unpacked) -> None:
    """One image in, one tensor out; the delegate's features are the embedded model's; every value is produced."""
    if len(p.inputs) != 1 or len(p.outputs) != 1:
        raise ArtifactError(f"{artifact}: forward takes {len(p.inputs)} inputs and returns {len(p.outputs)} outputs; "
                            "expected one image tensor in, one probabilities tensor out")
    if (sorted(u.input_names), sorted(u.output_names)) != (sorted(emulator.input_names), sorted(emulator.output_names)):
        raise ArtifactError(f"{artifact}: the delegate's {_METADATA} names {list(u.input_names)} -> "
                            f"{list(u.output_names)}, its model has {emulator.input_names} -> {emulator.output_names}")
    ready = set(p.inputs) | set(p.constants)
    for step in p.steps:
        if step.kernel is None:
            n = len(u.input_names)
            if len(step.inputs) != n + len(u.output_names):
                raise ArtifactError(f"{artifact}: the delegate call has {len(step.inputs)} arguments, its model "
                                    f"{n} inputs and {len(u.output_names)} outputs")
            needs, makes = step.inputs[:n], step.inputs[n:]
        else:
            needs, makes = step.inputs, step.outputs
        if not set(needs) <= ready:
            raise ArtifactError(f"{artifact}: forward reads values {sorted(set(needs) - ready)} before they are set")
        ready |= set(makes)
    if p.outputs[0] not in ready:
        raise ArtifactError(f"{artifact}: forward's output (value {p.outputs[0]}) is never produced")


def _executorch() -> tuple[Callable[[bytes], Any], Callable[[bytes, str], bool]]:
    """ExecuTorch's program deserializer and the Core ML backend's unflattener (the executorch-runtime extra)."""
    try:
        from executorch.backends.apple.coreml import executorchcoreml
        from executorch.exir._serialize._program import deserialize_pte_binary
    except ImportError as e:
        raise RuntimeUnavailable(
            f"reading a Core ML-delegated .pte needs ExecuTorch's Python package ({e}); "
            "install it with: pip install 'edge-convnext[executorch-runtime,coreml-runtime]'"
        ) from e
    return deserialize_pte_binary, executorchcoreml.unflatten_directory_contents
