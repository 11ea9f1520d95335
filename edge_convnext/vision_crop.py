"""Emulate what Vision feeds a Core ML image classifier: ``VNImageCropAndScaleOption`` and ``regionOfInterest``.

An app classifies with ``VNCoreMLRequest(model:)`` and a ``VNImageRequestHandler``; Vision turns
the (oriented) photo into the model's 224x224 RGB image itself. This module reproduces that
geometry on Linux with Pillow and NumPy only (no coremltools), so the accuracy of an artifact can be
measured under what an app would actually do, and compared with the reference preprocessing
(`edge_convnext.preprocessing`: shortest edge to 256, center crop 224):

===============  ========================================================================
option           what Vision does with the region (the whole image, or the ROI)
===============  ========================================================================
``centerCrop``   scale the short side to 224 and crop the center 224x224 (crop ratio 1.0:
                 it keeps more of the photo than the reference's 224/256)
``scaleFill``    stretch the whole region to 224x224 (aspect ratio not kept)
``scaleFit``     scale the long side to 224, keep the aspect ratio, pad with black
                 (letterbox / pillarbox), image centered
===============  ========================================================================

``regionOfInterest`` is a normalized rectangle ``(x, y, w, h)`` in Vision's coordinates: origin at
the *lower-left* corner of the oriented image, y up. Vision crops it first and applies the option to
the cropped region. `edge_convnext.roi.center_crop_roi` (``.vision()``) gives the rectangle that, with
``centerCrop``, reproduces the reference's resize-256-crop-224 (the centered square of side about
``min(W, H) * 224 / 256``, with the reference's own integer rounding).

Orientation: pass Vision the photo's orientation (``CGImagePropertyOrientation``) and it classifies
the upright image; `load_oriented` (`edge_convnext.preprocessing.load_rgb`, which applies the EXIF
orientation tag with ``ImageOps.exif_transpose``) gives the same upright image.

Resampling: the scaler Vision uses is not documented (Core Image / vImage, possibly different per
device and compute path). This emulation uses Pillow's bilinear filter (which, like most
production scalers, widens its support when downscaling, i.e. it antialiases), computed from the
exact fractional crop box in one resize. Pixel values therefore differ from a device at the
resampling level; the geometry (which part of the photo lands where) is what this module fixes.
The result is quantized to 8 bits, as the pixel buffer Vision hands Core ML is.

`APP_MODES` lists the pipelines `edge_convnext.app_eval` runs Core ML artifacts through (each a
photo, uint8 RGB ``[H, W, 3]`` or a PIL image, plus the weights' `Preprocessing` -> float32
``[3, 224, 224]`` in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from edge_convnext.preprocessing import CONVNEXT_HF, Preprocessing, crop_uint8, load_rgb, to_rgb, to_unit_float
from edge_convnext.roi import center_crop_roi

SIZE = 224
CropAndScale = Literal["centerCrop", "scaleFill", "scaleFit"]
OPTIONS: tuple[str, ...] = ("centerCrop", "scaleFill", "scaleFit")
ROI = tuple[float, float, float, float]  # normalized (x, y, w, h), lower-left origin


def load_oriented(path: Path | str) -> Image.Image:
    """Decode an image file to 8-bit RGB, upright by its EXIF orientation tag (`load_rgb` applies it)."""
    return load_rgb(Path(path))


def roi_to_box(roi: ROI, width: int, height: int) -> tuple[float, float, float, float]:
    """A Vision ``regionOfInterest`` -> Pillow's ``(left, top, right, bottom)`` box in pixels (upper-left origin)."""
    x, y, w, h = (float(v) for v in roi)
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > 1 + 1e-9 or y + h > 1 + 1e-9:
        raise ValueError(f"regionOfInterest {roi} is not a non-empty rectangle inside the unit square")
    return (x * width, (1.0 - y - h) * height, (x + w) * width, (1.0 - y) * height)


def vision_image(image: Image.Image, option: CropAndScale = "centerCrop", roi: ROI | None = None,
                 size: int = SIZE) -> Image.Image:
    """The ``size`` x ``size`` RGB image Vision would give the model for ``image`` (already upright)."""
    if option not in OPTIONS:
        raise ValueError(f"unknown crop-and-scale option {option!r}; use one of {list(OPTIONS)}")
    image = to_rgb(image)
    W, H = image.size
    left, top, right, bottom = roi_to_box(roi, W, H) if roi is not None else (0.0, 0.0, float(W), float(H))
    rw, rh = right - left, bottom - top
    bilinear = Image.Resampling.BILINEAR
    if option == "scaleFill":
        return image.resize((size, size), bilinear, box=(left, top, right, bottom))
    if option == "centerCrop":
        side = min(rw, rh)
        x0, y0 = left + (rw - side) / 2.0, top + (rh - side) / 2.0
        return image.resize((size, size), bilinear, box=(x0, y0, x0 + side, y0 + side))
    # scaleFit: the long side becomes `size`, the short one keeps the aspect ratio; black around it.
    scale = size / max(rw, rh)
    nw, nh = max(1, min(size, round(rw * scale))), max(1, min(size, round(rh * scale)))
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(image.resize((nw, nh), bilinear, box=(left, top, right, bottom)), ((size - nw) // 2, (size - nh) // 2))
    return canvas


def vision_input(image: Image.Image, option: CropAndScale = "centerCrop", roi: ROI | None = None,
                 size: int = SIZE) -> np.ndarray:
    """`vision_image` as float32 ``[3, size, size]`` RGB in [0, 1] (pixel / 255), the shared preprocessing's form."""
    pixels = np.asarray(vision_image(image, option, roi, size), dtype=np.uint8)
    return np.ascontiguousarray(to_unit_float(pixels.transpose(2, 0, 1)))


def vision_file(path: Path | str, option: CropAndScale = "centerCrop", reference_crop: bool = False,
                p: Preprocessing = CONVNEXT_HF) -> np.ndarray:
    """An image file as Vision would feed it: upright (EXIF), ``option``, and with ``reference_crop`` the
    `center_crop_roi` (so ``centerCrop`` matches resize-256-crop-224) -> float32 ``[3, 224, 224]`` in [0, 1]."""
    im = load_oriented(path)
    roi = center_crop_roi(im.width, im.height, p).vision() if reference_crop else None
    return vision_input(im, option, roi, p.crop_size)


# ---- the app pipelines `edge_convnext.app_eval` measures ------------------------------------------

Photo = np.ndarray | Image.Image  # uint8 RGB [H, W, 3] (upright), or a PIL image
Prepare = Callable[[Photo, Preprocessing], np.ndarray]


def _image(photo: Photo) -> Image.Image:
    return photo if isinstance(photo, Image.Image) else Image.fromarray(np.asarray(photo, dtype=np.uint8), "RGB")


def _precropped(photo: Photo, p: Preprocessing = CONVNEXT_HF) -> np.ndarray:
    return to_unit_float(crop_uint8(_image(photo), p))


def _with_reference_roi(photo: Photo, p: Preprocessing = CONVNEXT_HF) -> np.ndarray:
    im = _image(photo)
    return vision_input(im, "centerCrop", center_crop_roi(im.width, im.height, p).vision(), p.crop_size)


def _option(option: CropAndScale) -> Prepare:
    def prepare(photo: Photo, p: Preprocessing = CONVNEXT_HF) -> np.ndarray:
        return vision_input(_image(photo), option, None, p.crop_size)

    return prepare


# mode -> (what the app sets, photo + preprocessing -> float32 [3, 224, 224] in [0, 1] as Vision feeds it).
APP_MODES: dict[str, tuple[str, Prepare]] = {
    "precropped": ("the shared preprocessing's 224x224 crop (any option is then the identity): checks the "
                   "artifact, not the app pipeline", _precropped),
    "centerCrop": ("imageCropAndScaleOption = .centerCrop, no regionOfInterest (short side to 224, crop ratio 1.0)",
                   _option("centerCrop")),
    "centerCrop+roi": (".centerCrop with regionOfInterest = center_crop_roi(W, H).vision(): the reference's "
                       "resize-256-crop-224", _with_reference_roi),
    "scaleFill": ("imageCropAndScaleOption = .scaleFill (whole photo stretched to 224x224)", _option("scaleFill")),
    "scaleFit": ("imageCropAndScaleOption = .scaleFit (whole photo letterboxed, black bars)", _option("scaleFit")),
}
