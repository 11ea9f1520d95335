"""Error types. Each message names the file involved and what to do about it."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (third-party errors can run to pages), or its type."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class EdgeConvNextError(Exception):
    """Base class: the CLI prints these as one clean line instead of a traceback."""


class ImageError(EdgeConvNextError):
    """An image file could not be read or decoded."""


class DataError(EdgeConvNextError):
    """The ImageNet subset (labels, ground truth, image directory) is missing or malformed."""


class ManifestError(EdgeConvNextError):
    """A manifest is missing, malformed, or does not match its artifact."""


class ArtifactError(EdgeConvNextError):
    """An artifact is missing, truncated, corrupted, or breaks the input contract."""


class RuntimeUnavailable(EdgeConvNextError):
    """The runtime an artifact needs is not installed or cannot run on this host."""


class WeightsError(EdgeConvNextError):
    """A checkpoint could not be loaded or does not match ConvNeXt."""


class MissingExtra(EdgeConvNextError):
    """A package from an optional extra is needed for this command."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed. "
            f"Install it with: pip install 'edge-convnext[{extra}]'"
        )
        self.package = package
        self.extra = extra
