"""Device parity: one artifact's outputs on a device against the same artifact's outputs on the build host.

The statistical gate needs its minimum image count; an emulated Raspberry Pi runs 4-18 s per image, so
there the check is parity instead: the host stores its outputs on N images (`save_outputs`), the device
runs the same artifact on the same images and compares (`compare_outputs`) within per-precision bounds
(``gates/arm-parity.json``). For quantized precisions the SQNR bound is relative to the artifact's own
quantization error on the same images (``max_excess_db``): the device may differ from the host by as
much as the host differs from the float reference, not more. Both sides' fidelity against the float
reference is reported too: that is what a device user gets. Light: NumPy and the artifact's runtime only.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_convnext.dataset import load_subset
from edge_convnext.errors import ManifestError
from edge_convnext.evaluate import samples_for
from edge_convnext.fileio import atomic_path
from edge_convnext.manifest import manifest_path, read_manifest
from edge_convnext.metrics import center, sqnr_db
from edge_convnext.preprocessing import Preprocessing, preprocess_file
from edge_convnext.reference import REFERENCE_FILE, load_reference
from edge_convnext.runners import open_runner

DEFAULT_BOUNDS = Path(__file__).parent / "gates" / "arm-parity.json"


@dataclass(frozen=True)
class HostOutputs:
    """Outputs stored on the host: ``logits[artifact name]`` float32 ``[N, 1000]`` on ``image_ids``."""

    image_ids: list[str]
    logits: dict[str, np.ndarray]
    machine: str


@dataclass(frozen=True)
class ParityResult:
    """Device against host (``max_abs``, ``sqnr_db``: centered log-probabilities, same images) and each
    against the float reference (``*_vs_float_sqnr_db``; None without a reference)."""

    artifact: str
    precision: str
    images: int
    max_abs: float
    sqnr_db: float
    bound_max_abs: float
    bound_min_sqnr_db: float  # the effective bound: the absolute floor, raised by the relative rule
    host_machine: str
    device_machine: str
    host_vs_float_sqnr_db: float | None = None
    device_vs_float_sqnr_db: float | None = None
    bound_rule: str = ""

    @property
    def passed(self) -> bool:
        return bool(self.max_abs <= self.bound_max_abs and self.sqnr_db >= self.bound_min_sqnr_db)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed}


def parity_image_ids(artifacts_dir: Path, limit: int) -> list[str]:
    """The first ``limit`` images of the stored reference: the ones `eval --limit` uses too."""
    return load_reference(artifacts_dir / REFERENCE_FILE).image_ids[:limit]


def run_artifact(artifact: Path, image_ids: Sequence[str], data: Path | None = None,
                 threads: int | None = None) -> np.ndarray:
    """``artifact`` on the given evaluation images with its manifest's preprocessing -> float32 ``[N, 1000]``."""
    m = read_manifest(manifest_path(artifact))
    ref_path = artifact.parent / REFERENCE_FILE
    samples = samples_for(list(image_ids), load_subset(data), ref_path)
    pre = Preprocessing.from_dict(m.preprocessing)
    runner = open_runner(artifact, m, threads=threads)
    return runner.run(np.stack([preprocess_file(s.path, pre) for s in samples]))


def save_outputs(path: Path, outputs: HostOutputs) -> None:
    """One ``.npz``: ``image_ids``, ``machine`` and one array per artifact (written atomically)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, image_ids=np.array(outputs.image_ids), machine=np.array(outputs.machine),
                     **{f"logits:{k}": v for k, v in outputs.logits.items()})


def load_outputs(path: Path) -> HostOutputs:
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: cannot read stored host outputs ({e}); rerun the host side") from e
    with z:
        logits = {k.split(":", 1)[1]: z[k] for k in z.files if k.startswith("logits:")}
        return HostOutputs([str(i) for i in z["image_ids"]], logits, str(z["machine"]))


def load_bounds(path: Path = DEFAULT_BOUNDS) -> dict[str, dict[str, Any]]:
    """Per-precision bounds: ``{"int8": {"min_sqnr_db": ..., "max_abs": ...}, ...}``."""
    try:
        return dict(json.loads(Path(path).read_text())["precisions"])
    except (OSError, ValueError, KeyError) as e:
        raise ManifestError(f"{path}: not a parity bounds file ({e})") from e


def compare_outputs(artifact: Path, host: HostOutputs, device: np.ndarray,
                    bounds: dict[str, dict[str, Any]], reference: np.ndarray | None = None) -> ParityResult:
    """Compare centered log-probabilities of the device's ``[N, 1000]`` outputs with the host's.

    ``reference``: the float reference's logits on the same images (``[N, 1000]``); needed for a
    precision whose bound has ``max_excess_db`` (then the SQNR bound is ``max(min_sqnr_db, host's SQNR
    against float - max_excess_db)``), and reported when given.
    """
    m = read_manifest(manifest_path(artifact))
    if artifact.name not in host.logits:
        raise ManifestError(f"host outputs have no entry for {artifact.name} (have {sorted(host.logits)})")
    if m.precision not in bounds:
        raise ManifestError(f"{DEFAULT_BOUNDS.name}: no parity bound for precision {m.precision!r}")
    ref = host.logits[artifact.name]
    if ref.shape != device.shape:
        raise ValueError(f"{artifact.name}: host outputs {ref.shape} vs device {device.shape}")
    h, d = center(ref), center(device)
    b = bounds[m.precision]
    floor = float(b["min_sqnr_db"])
    host_float = device_float = None
    if reference is not None:
        if reference.shape != ref.shape:
            raise ValueError(f"{artifact.name}: reference {reference.shape} vs outputs {ref.shape}")
        f = center(reference)
        host_float, device_float = sqnr_db(f, h), sqnr_db(f, d)
    min_sqnr, rule = floor, f"SQNR >= {floor:g}"
    if "max_excess_db" in b:
        if host_float is None:
            raise ManifestError(f"{artifact.name}: the {m.precision} parity bound is relative to the artifact's own "
                                "error against the float reference; give the reference logits")
        excess = float(b["max_excess_db"])
        min_sqnr = max(floor, host_float - excess)
        rule = (f"SQNR >= max({floor:g}, host vs float {host_float:.1f}"
                + (f" - {excess:g}" if excess else "") + ")")
    return ParityResult(artifact.name, m.precision, len(ref), float(np.abs(h - d).max()), sqnr_db(h, d),
                        float(b["max_abs"]), min_sqnr, host.machine, platform.machine(),
                        host_float, device_float, f"max abs <= {float(b['max_abs']):g}, {rule}")
