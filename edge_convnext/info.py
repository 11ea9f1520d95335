"""What is installed here: package versions, and which runtimes and converters can be used.

Nothing heavy is imported: availability is checked with ``importlib.util.find_spec`` so ``info`` runs
in a second on a Raspberry Pi with only the light install.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from dataclasses import dataclass

import edge_convnext

# (import name, distribution name). The distribution gives the version without importing.
PACKAGES: tuple[tuple[str, str], ...] = (
    ("numpy", "numpy"),
    ("PIL", "pillow"),
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("safetensors", "safetensors"),
    ("coremltools", "coremltools"),
    ("executorch", "executorch"),
    ("torchao", "torchao"),
    ("litert_torch", "litert-torch"),
    ("ai_edge_quantizer", "ai-edge-quantizer"),
    ("ai_edge_litert", "ai-edge-litert"),
    ("tflite_runtime", "tflite-runtime"),
    ("mediapipe", "mediapipe"),
)


@dataclass(frozen=True)
class Capability:
    name: str
    available: bool
    detail: str


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ValueError, ImportError):  # a module set to None in sys.modules, or a broken parent
        return False


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(only_installed: bool = True) -> dict[str, str]:
    """``{distribution: version}`` of the packages this project uses."""
    out = {"python": platform.python_version(), "edge-convnext": edge_convnext.__version__}
    for mod, dist in PACKAGES:
        v = version(dist) if importable(mod) else None
        if v or not only_installed:
            out[dist] = v or "not installed"
    return out


def runtimes() -> list[Capability]:
    """Which artifact formats can run on this host, and how."""
    is_mac = sys.platform == "darwin"
    litert = importable("ai_edge_litert")
    tflite = litert or importable("tflite_runtime")
    ct = importable("coremltools")
    return [
        Capability("tflite", tflite, "ai_edge_litert interpreter" if litert else
                   ("tflite_runtime interpreter (legacy)" if tflite else "pip install 'edge-convnext[litert]'")),
        Capability("executorch", importable("executorch"),
                   "executorch.runtime (XNNPACK, portable)" if importable("executorch")
                   else "pip install 'edge-convnext[executorch-runtime]'"),
        Capability("coreml", ct, ("Core ML (macOS)" if is_mac else "Core ML emulator (NumPy, Linux)")
                   if ct else "pip install 'edge-convnext[coreml-runtime]'"),
        Capability("mediapipe", importable("mediapipe"), "MediaPipe Tasks ImageClassifier (app-eval)"
                   if importable("mediapipe") else "pip install 'edge-convnext[app]'"),
    ]


def converters() -> list[Capability]:
    """Which converters can build artifacts here (all need torch + transformers)."""
    base = importable("torch") and importable("transformers")
    hint = "pip install 'edge-convnext[convert]'"
    return [
        Capability("coreml", base and importable("coremltools"), "coremltools" if base else hint),
        Capability("tflite", base and importable("litert_torch") and importable("ai_edge_quantizer")
                   and importable("mediapipe"), "litert-torch + ai-edge-quantizer + mediapipe's metadata schema"
                   if base else hint),
        Capability("executorch", base and importable("executorch"), "executorch + torchao" if base else hint),
    ]


def report() -> str:
    lines = [f"edge-convnext {edge_convnext.__version__} on {platform.system()} {platform.machine()}", "", "packages:"]
    lines += [f"  {k:<20} {v}" for k, v in package_versions(only_installed=False).items()]
    for title, caps in (("runtimes (run artifacts):", runtimes()), ("converters (build artifacts):", converters())):
        lines += ["", title]
        lines += [f"  {c.name:<12} {'yes' if c.available else 'no ':<4} {c.detail}" for c in caps]
    return "\n".join(lines)
