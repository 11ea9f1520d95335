"""Core ML runner: Core ML itself on macOS, the NumPy emulator of the ML program elsewhere.

``MLModel.predict`` exists only on macOS ("coreml", ``emulated=False``). On any other OS the
ML program is executed op by op by `edge_convnext.coreml_emulator` ("coreml-emulated",
``emulated=True``; fp16 programs are emulated with float16 rounding after every op), so parity and
accuracy of Core ML artifacts can be measured on Linux, and every table says which of the two
produced a number. Both read the ``.mlpackage`` with coremltools (the ``coreml-runtime`` extra). This
module imports no torch itself, but importing coremltools pulls torch in when it is installed.

Every ``coreml-*`` artifact is a Vision image classifier (`edge_convnext.contract`: input contract
``rgb-image``, output contract ``classifier``): one RGB 224x224 image feature, and the classifier
pair ``classLabel`` (string) + a ``{label: probability}`` dictionary. `classifier_io` checks that
from the package's spec (both runners and the converter's read-back use it) and reads the class
labels from the program's ``classify`` op. Both runners feed the shared preprocessing's batch through
the input contract (8-bit pixel values; PIL images for Core ML itself), read the probabilities in
class order and return ``log p`` through the output contract.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.contract import CROP, InputContract, OutputContract, to_pil_images
from edge_convnext.errors import ArtifactError, MissingExtra, RuntimeUnavailable
from edge_convnext.manifest import NUM_CLASSES, Manifest
from edge_convnext.recipes import ArtifactFormat
from edge_convnext.runners.base import contracts, run_batched

INPUT_CONTRACT = ArtifactFormat.COREML.input_contract  # "rgb-image"
OUTPUT_CONTRACT = ArtifactFormat.COREML.output_contract  # "classifier"
LABEL_FEATURE = "classLabel"
_REBUILD = "Rebuild it with `edge-convnext convert`"


@dataclass(frozen=True)
class ClassifierIO:
    """The features of a Core ML image classifier package, as its spec declares them."""

    input_name: str  # the RGB 224x224 image feature
    label_name: str  # predictedFeatureName: the top label (string)
    probabilities_name: str  # predictedProbabilitiesName: {label: probability}
    labels: tuple[str, ...]  # the classify op's classes: the probabilities' class order


def _feature_kind(f: Any) -> str:
    """A feature's type in a few words, for error messages."""
    kind = f.type.WhichOneof("Type")
    if kind == "imageType":
        img = f.type.imageType
        space = type(img).ColorSpace.Name(img.colorSpace)
        flex = " (flexible size)" if img.WhichOneof("SizeFlexibility") else ""
        return f"image {space} {img.width}x{img.height}{flex}"
    if kind == "multiArrayType":
        arr = f.type.multiArrayType
        return f"multiArray {type(arr).ArrayDataType.Name(arr.dataType)} {[int(d) for d in arr.shape]}"
    if kind == "dictionaryType":
        return f"dictionary keyed by {f.type.dictionaryType.WhichOneof('KeyType')}"
    return str(kind)


def spec_class_labels(spec: Any) -> list[str] | None:
    """The ``classes`` of the ``classify`` op in an ML program spec (protobuf only, no weights), or None."""
    if spec.WhichOneof("Type") != "mlProgram":
        return None
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                if op.type != "classify" or "classes" not in op.inputs:
                    continue
                arg = op.inputs["classes"].arguments[0]
                if arg.WhichOneof("binding") != "value":
                    return None
                out = []
                for v in arg.value.immediateValue.list.values:
                    t = v.immediateValue.tensor
                    if t.WhichOneof("value") != "strings":
                        return None  # integer class labels: not this contract
                    out.extend(t.strings.values)
                return out
    return None


def classifier_io(artifact: Path | str, spec: Any) -> ClassifierIO:
    """Check that ``spec`` is the ``rgb-image`` -> ``classifier`` contract; `ArtifactError` naming both when not."""
    ins, outs = list(spec.description.input), list(spec.description.output)
    got_in = [f"{f.name}: {_feature_kind(f)}" for f in ins]
    want_in = f"one RGB {CROP}x{CROP} image feature (input contract {INPUT_CONTRACT!r})"
    if len(ins) != 1 or ins[0].type.WhichOneof("Type") != "imageType":
        raise ArtifactError(f"{artifact}: the model's inputs are {got_in}, expected {want_in}. {_REBUILD}")
    img = ins[0].type.imageType
    if (int(img.width), int(img.height)) != (CROP, CROP) or type(img).ColorSpace.Name(img.colorSpace) != "RGB" \
            or img.WhichOneof("SizeFlexibility") is not None:
        raise ArtifactError(f"{artifact}: the model's input is {got_in[0]}, expected {want_in}. {_REBUILD}")
    desc = spec.description
    label, probs = desc.predictedFeatureName, desc.predictedProbabilitiesName
    kinds = {f.name: f.type.WhichOneof("Type") for f in outs}
    got_out = [f"{f.name}: {_feature_kind(f)}" for f in outs]
    ok = (len(outs) == 2 and label and probs and kinds.get(label) == "stringType"
          and kinds.get(probs) == "dictionaryType"
          and next(f for f in outs if f.name == probs).type.dictionaryType.WhichOneof("KeyType") == "stringKeyType")
    if not ok:
        raise ArtifactError(
            f"{artifact}: the model's outputs are {got_out} (predictedFeatureName {label!r}, "
            f"predictedProbabilitiesName {probs!r}); expected a classifier (output contract {OUTPUT_CONTRACT!r}): "
            f"a string '{LABEL_FEATURE}' and a {{label: probability}} dictionary, both named in the spec. {_REBUILD}")
    labels = spec_class_labels(spec)
    if labels is None or len(labels) != NUM_CLASSES or len(set(labels)) != len(labels):
        n = "no string labels" if labels is None else f"{len(labels)} labels, {len(set(labels))} unique"
        raise ArtifactError(f"{artifact}: the classifier's classify op has {n}; expected {NUM_CLASSES} unique "
                            f"string labels. {_REBUILD}")
    return ClassifierIO(ins[0].name, label, probs, tuple(labels))


def _checked_contracts(artifact: Path, manifest: Manifest | None,
                       io: ClassifierIO) -> tuple[InputContract, OutputContract]:
    """The artifact's contracts (manifest or format defaults), refused unless they are this runner's."""
    inp, out = contracts(artifact, manifest)
    if (inp.id, out.id) != (INPUT_CONTRACT, OUTPUT_CONTRACT):
        raise ArtifactError(
            f"{artifact}: its manifest declares contracts {inp.id!r} -> {out.id!r}; Core ML artifacts are "
            f"{INPUT_CONTRACT!r} -> {OUTPUT_CONTRACT!r} (a Vision image classifier). {_REBUILD}")
    if manifest is not None and (manifest.input.name, manifest.output.name) != (io.input_name, io.probabilities_name):
        raise ArtifactError(
            f"{artifact}: the model's features are '{io.input_name}' -> '{io.probabilities_name}', its manifest "
            f"names '{manifest.input.name}' -> '{manifest.output.name}'. {_REBUILD}")
    return inp, out


@contextlib.contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
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


def _in_class_order(artifact: Path, probabilities: Any, labels: tuple[str, ...]) -> np.ndarray:
    """A ``{label: probability}`` dictionary -> float32 ``[1, 1000]`` in the classify op's class order."""
    try:
        return np.asarray([[probabilities[label] for label in labels]], dtype=np.float32)
    except KeyError as e:
        raise ArtifactError(f"{artifact}: the probabilities dictionary has no entry for label {e}; "
                            f"it has {len(probabilities)} entries") from None


class CoreMLRunner:
    """Core ML on macOS: float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]`` log-probabilities.

    Images go in as PIL RGB images (the image feature), the probabilities dictionary is read in
    class order. ``compute_units`` is a ``coremltools.ComputeUnit`` name (``ALL``, ``CPU_ONLY``,
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
        self.io = classifier_io(self.artifact, spec)
        self.input_contract, self.output_contract = _checked_contracts(self.artifact, manifest, self.io)

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]`` log p (one predict per image)."""
        return self.output_contract.log_scores(run_batched(x, self.input_contract, self._run_one))

    def _run_one(self, pixels: np.ndarray) -> np.ndarray:
        (image,) = to_pil_images(pixels)
        out = self.model.predict({self.io.input_name: image})
        return _in_class_order(self.artifact, out[self.io.probabilities_name], self.io.labels)


class EmulatedCoreMLRunner:
    """The ML program run by `CoreMLEmulator` (NumPy): same contract as `CoreMLRunner`.

    The image feature is fed as float32 NCHW pixel values 0..255 (what the input contract's ``feed``
    gives); the emulated ``classify`` op returns the probabilities in class order.
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
        self.io = classifier_io(self.artifact, self.emulator.spec)
        self.input_contract, self.output_contract = _checked_contracts(self.artifact, manifest, self.io)
        if tuple(self.emulator.class_labels or ()) != self.io.labels:
            raise ArtifactError(f"{self.artifact}: the program's classify op and the spec disagree on the labels. "
                                f"{_REBUILD}")

    def run(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[N, 3, 224, 224]`` in [0, 1] -> float32 ``[N, 1000]`` log p (one program run per image)."""
        with thread_limit(self.threads):
            return self.output_contract.log_scores(run_batched(x, self.input_contract, self._run_one))

    def _run_one(self, pixels: np.ndarray) -> np.ndarray:
        return self.emulator.predict({self.io.input_name: pixels})[self.io.probabilities_name]


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
