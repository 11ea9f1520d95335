"""Backend registry: one module per artifact format, imported only when that format is built.

Each module defines ``build(ctx: BuildContext, out: Path) -> BuildResult`` that writes the artifact
for ``ctx.recipe`` at ``out`` (a temporary path the caller renames into place). `REQUIRES` below lists
the packages each one imports. Adding a backend is adding a module and a line in each table here.
"""

from __future__ import annotations

import importlib
import importlib.util

from converters.context import Builder
from edge_convnext.errors import MissingExtra
from edge_convnext.recipes import ArtifactFormat

_MODULES = {
    ArtifactFormat.COREML: "converters.backends.coreml",
    ArtifactFormat.TFLITE: "converters.backends.tflite",
    ArtifactFormat.EXECUTORCH: "converters.backends.executorch",
}
# Packages each backend needs, checked before import so the error names the extra to install.
REQUIRES = {
    ArtifactFormat.COREML: ("coremltools",),
    ArtifactFormat.TFLITE: ("litert_torch", "ai_edge_quantizer", "ai_edge_litert"),
    ArtifactFormat.EXECUTORCH: ("executorch", "torchao"),
}


def get_builder(fmt: ArtifactFormat) -> Builder:
    for pkg in REQUIRES[fmt]:
        if importlib.util.find_spec(pkg) is None:
            raise MissingExtra(pkg, "convert", f"building {fmt.runtime} artifacts")
    return importlib.import_module(_MODULES[fmt]).build  # type: ignore[no-any-return]
