"""The manifest written beside every artifact (``<recipe>.json``) and embedded where the format allows.

The sidecar holds everything: build facts, the artifact's sha256 and size, and the measured parity.
The embedded copy (Core ML ``user_defined_metadata``, a zip appended to the .tflite, an ExecuTorch
constant method) holds the build facts only, since a file cannot contain its own hash.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_convnext.errors import ManifestError
from edge_convnext.fileio import sha256_path, size_bytes, write_json_atomic

# v2: per-format input/output contracts (`edge_convnext.contract`); v1 manifests (one NCHW logits
# contract for all) are refused with a request to rebuild.
SCHEMA = "edge-convnext/manifest/v2"
NUM_CLASSES = 1000
_REQUIRED = (
    "schema", "recipe", "format", "file", "sha256", "size_bytes", "input", "output",
    "preprocessing", "weights", "labels", "toolchain", "created",
)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as an app sees it.

    ``contract`` is the id of a known contract in `edge_convnext.contract` (how the tensor relates to
    the shared preprocessing, or how to read the output); ``quantization`` is set when the tensor
    itself is integer: real = scale * (q - zero_point).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    layout: str
    range: tuple[float, float] | None = None
    description: str = ""
    quantization: dict[str, float] | None = None
    contract: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["range"] = list(self.range) if self.range else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(
            name=d["name"], shape=tuple(d["shape"]), dtype=d["dtype"], layout=d["layout"],
            range=tuple(d["range"]) if d.get("range") else None,  # type: ignore[arg-type]
            description=d.get("description", ""), quantization=d.get("quantization"),
            contract=str(d.get("contract", "")),
        )


@dataclass
class Manifest:
    """Everything an app developer, a device script or a CI gate needs to know about one artifact."""

    recipe: str
    format: str
    precision: str
    file: str
    input: TensorSpec
    output: TensorSpec
    preprocessing: dict[str, Any]
    weights: dict[str, Any]
    labels: dict[str, Any]
    toolchain: dict[str, str]
    created: str
    description: str = ""
    sha256: str = ""
    size_bytes: int = 0
    calibration: dict[str, Any] | None = None
    parity: dict[str, Any] | None = None
    lowering: dict[str, Any] = field(default_factory=dict)
    embedded: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input"], d["output"] = self.input.to_dict(), self.output.to_dict()
        order = ["schema", "recipe", "format", "precision", "description", "file", "sha256", "size_bytes"]
        return {k: d[k] for k in order} | {k: v for k, v in d.items() if k not in order}

    def embedded_dict(self) -> dict[str, Any]:
        """The build facts embedded inside the artifact (no hash, size or measured parity)."""
        d = self.to_dict()
        for k in ("sha256", "size_bytes", "parity", "embedded"):
            d.pop(k, None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> Manifest:
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ManifestError(f"{source}: manifest lacks {', '.join(missing)}; re-run convert to rewrite it")
        if d["schema"] != SCHEMA:
            raise ManifestError(f"{source}: schema {d['schema']!r} is not {SCHEMA!r}; re-run convert")
        kw = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        kw["input"], kw["output"] = TensorSpec.from_dict(d["input"]), TensorSpec.from_dict(d["output"])
        return cls(**kw)

    @property
    def synthetic_weights(self) -> bool:
        return bool(self.weights.get("synthetic"))


def manifest_path(artifact: Path) -> Path:
    """``artifacts/tflite-fp32.tflite`` -> ``artifacts/tflite-fp32.json``."""
    artifact = Path(artifact)
    name = artifact.name.rstrip("/")
    stem = name[: name.rindex(".")] if "." in name else name
    return artifact.with_name(f"{stem}.json")


def read_manifest(path: Path) -> Manifest:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ManifestError(f"{path}: no manifest beside the artifact; re-run convert to write it") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: manifest is not valid JSON ({e}); re-run convert to rewrite it") from e
    if not isinstance(d, dict):
        raise ManifestError(f"{path}: manifest is not a JSON object; re-run convert to rewrite it")
    return Manifest.from_dict(d, source=str(path))


def write_manifest(path: Path, m: Manifest) -> None:
    write_json_atomic(Path(path), m.to_dict())


def verify_artifact(artifact: Path, m: Manifest) -> None:
    """Raise `ManifestError` unless the artifact's sha256 matches its manifest."""
    actual = sha256_path(artifact)
    if actual != m.sha256:
        raise ManifestError(
            f"{artifact}: sha256 {actual[:12]}… does not match its manifest ({m.sha256[:12]}…); the file was "
            "changed or replaced after it was built. Rebuild it, or pass --no-verify to run it anyway"
        )


def stamp(artifact: Path, m: Manifest) -> Manifest:
    """Fill in the artifact's sha256 and size."""
    m.sha256, m.size_bytes = sha256_path(artifact), size_bytes(artifact)
    return m
