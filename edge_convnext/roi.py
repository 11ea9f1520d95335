"""The region of interest that makes an app's own resize reproduce the shared preprocessing's crop.

The shared preprocessing resizes the shortest edge to ``resize_shortest_edge`` (256) and takes the
center ``crop_size`` (224) square (`edge_convnext.preprocessing.crop_uint8`). An app pipeline that
instead resizes a region of the photo to 224x224 (MediaPipe's ``ImageProcessingOptions
(region_of_interest=RectF(...))``, Vision's ``regionOfInterest`` with ``.scaleFill``) sees the same
pixels when that region is the crop's footprint in the photo: `center_crop_roi` computes it, in
normalized coordinates, from the photo's size after its EXIF orientation is applied. The resampling
filter still differs (the apps resize bilinearly, the reference bicubically), which is what the
app-pipeline accuracy table measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_convnext.preprocessing import CONVNEXT_HF, Preprocessing, load_rgb


@dataclass(frozen=True)
class Roi:
    """A normalized rectangle in a photo, top-left origin: every value in [0, 1]."""

    left: float
    top: float
    right: float
    bottom: float

    @property
    def width(self) -> float:
        return self.right - self.left

    @property
    def height(self) -> float:
        return self.bottom - self.top

    def vision(self) -> tuple[float, float, float, float]:
        """Vision's ``regionOfInterest`` (x, y, width, height): normalized, lower-left origin."""
        return self.left, 1.0 - self.bottom, self.width, self.height

    def pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in pixels of a ``width`` x ``height`` photo (Pillow's crop box)."""
        return self.left * width, self.top * height, self.right * width, self.bottom * height

    def to_dict(self) -> dict[str, float]:
        return {"left": self.left, "top": self.top, "right": self.right, "bottom": self.bottom}


def center_crop_roi(width: int, height: int, p: Preprocessing = CONVNEXT_HF) -> Roi:
    """The crop of `crop_uint8` for a ``width`` x ``height`` photo, as a normalized `Roi`.

    Same integer arithmetic as `crop_uint8`: resized size ``(new_w, new_h)`` with the long edge
    ``int(edge * long / short)``, crop origin ``((new_w - c) // 2, (new_h - c) // 2)``.
    """
    if width < 1 or height < 1:
        raise ValueError(f"photo size must be positive, got {width}x{height}")
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = p.resize_shortest_edge, int(p.resize_shortest_edge * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    c = p.crop_size
    left, top = (new_w - c) // 2, (new_h - c) // 2
    return Roi(left / new_w, top / new_h, (left + c) / new_w, (top + c) / new_h)


def photo_roi(path: Path, p: Preprocessing = CONVNEXT_HF) -> tuple[Roi, tuple[int, int]]:
    """(`center_crop_roi`, (width, height)) of an image file, its EXIF orientation applied."""
    im = load_rgb(Path(path))
    return center_crop_roi(im.width, im.height, p), (im.width, im.height)
