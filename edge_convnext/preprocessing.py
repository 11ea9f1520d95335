"""The one shared preprocessing: decode, resize, center-crop, scale to [0, 1].

Preprocessing is data tied to the weights (`Preprocessing`), implemented here with NumPy and Pillow
only, and used by the converters (calibration, float reference) and by the harness on the device.

The artifacts' input contract is float32 RGB NCHW ``[N, 3, 224, 224]`` in ``[0, 1]``; the mean/std
normalization is folded into every exported graph, so `preprocess_image` stops at ``[0, 1]``.
`normalize` exists for the float reference and for parity checks against transformers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from edge_convnext.errors import ImageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Pillow filter names <-> the integer codes HF's preprocessor_config.json uses ("resample": 3).
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESAMPLE_BY_CODE = {int(v): k for k, v in _RESAMPLE.items()}

# Refuse decompression bombs with a clear message instead of Pillow's warning.
_MAX_PIXELS = 200_000_000


@dataclass(frozen=True)
class Preprocessing:
    """How the weights expect images: resize shortest edge, center crop, scale, normalize.

    ``mean``/``std`` are applied inside the exported graphs, not by `preprocess_image`.
    """

    resize_shortest_edge: int = 256
    crop_size: int = 224
    resample: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = "facebook/convnext-tiny-224 preprocessor_config.json"

    def __post_init__(self) -> None:
        if self.resample not in _RESAMPLE:
            raise ValueError(f"unknown resample {self.resample!r}; use one of {sorted(_RESAMPLE)}")
        if self.resize_shortest_edge < self.crop_size:
            raise ValueError("resize_shortest_edge must be >= crop_size")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["scale"] = "1/255"
        d["normalization"] = "folded into the exported graph: artifacts take RGB in [0, 1]"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(
            resize_shortest_edge=int(d["resize_shortest_edge"]),
            crop_size=int(d["crop_size"]),
            resample=str(d["resample"]),
            mean=tuple(float(x) for x in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(x) for x in d["std"]),  # type: ignore[arg-type]
            source=str(d.get("source", "manifest")),
        )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str) -> Preprocessing:
        """Read an HF ``preprocessor_config.json`` the way ConvNextImageProcessor does.

        For ``shortest_edge < 384`` it resizes the shortest edge to ``int(shortest_edge / crop_pct)``
        and center-crops ``shortest_edge``; larger sizes warp without cropping, which the fixed
        224x224 contract of this project does not cover.
        """
        size = cfg.get("size", {})
        edge = int(size["shortest_edge"] if isinstance(size, dict) else size)
        if edge >= 384:
            raise ValueError(f"{source}: shortest_edge {edge} >= 384 warps without cropping; not supported")
        crop_pct = float(cfg.get("crop_pct", 224 / 256))
        resample = cfg.get("resample", 3)
        name = _RESAMPLE_BY_CODE.get(int(resample)) if isinstance(resample, int) else str(resample).lower()
        if name is None:
            raise ValueError(f"{source}: unknown resample code {resample!r}")
        if cfg.get("do_rescale", True) and abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
            raise ValueError(f"{source}: rescale_factor other than 1/255 is not supported")
        mean = tuple(cfg.get("image_mean", IMAGENET_MEAN))
        std = tuple(cfg.get("image_std", IMAGENET_STD))
        return cls(int(edge / crop_pct), edge, name, mean, std, source)  # type: ignore[arg-type]

    @classmethod
    def from_hf_config_file(cls, path: Path) -> Preprocessing:
        try:
            cfg = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read preprocessor config ({e})") from e
        return cls.from_hf_config(cfg, source=str(path))


# The preprocessing of the checkpoints this project knows. Weights carry their preprocessing:
# the loader picks one of these (or reads preprocessor_config.json) and records it in every manifest.
CONVNEXT_HF = Preprocessing()
CONVNEXT_TIMM_OFFICIAL = Preprocessing(source="timm convnext_tiny.fb_in1k / official: crop_pct 0.875 bicubic")
TORCHVISION_IMAGENET1K_V1 = Preprocessing(
    resize_shortest_edge=236, resample="bilinear", source="torchvision ConvNeXt_Tiny_Weights.IMAGENET1K_V1"
)


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file to 8-bit RGB, whatever its mode.

    Grayscale, palette, CMYK and 16-bit images are converted; transparency is composited onto
    white (as transformers does); an EXIF orientation tag is applied (a phone photo comes out upright,
    as every app's image decoder shows it). Raises `ImageError` naming the file when it cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.width * im.height > _MAX_PIXELS:
                raise ImageError(f"{path}: {im.width}x{im.height} pixels is too large to be a photo")
            # Pillow decodes lazily: load() is where a truncated file fails. LOAD_TRUNCATED_IMAGES
            # stays False so a cut-off JPEG is an error, not a silently grey image.
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{path}: no such image file") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image Pillow can read (JPEG, PNG, WebP, ...)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: image is truncated or corrupted ({e}); re-export or replace it") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB (see `load_rgb`)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: Pillow's convert("RGB") clips at 255; scale the range down instead.
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8))
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        scale = 255.0 if a.max() <= 1.0 else 1.0
        im = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8))
    has_alpha = "A" in im.getbands() or im.info.get("transparency") is not None
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def preprocess_image(im: Image.Image, p: Preprocessing = CONVNEXT_HF) -> np.ndarray:
    """RGB image -> float32 CHW ``[3, crop, crop]`` in ``[0, 1]`` (not normalized)."""
    return to_unit_float(crop_uint8(im, p))


def crop_uint8(im: Image.Image, p: Preprocessing = CONVNEXT_HF) -> np.ndarray:
    """RGB image -> uint8 CHW ``[3, crop, crop]``: resize, then center crop.

    Resize so the shortest edge is ``p.resize_shortest_edge`` (long edge ``int(edge * long / short)``,
    as transformers and torchvision compute it), then crop the center with ``top = (h - crop) // 2``.
    """
    im = to_rgb(im)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = p.resize_shortest_edge, int(p.resize_shortest_edge * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), resample=_RESAMPLE[p.resample])
    c = p.crop_size
    top, left = (new_h - c) // 2, (new_w - c) // 2
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8)[top : top + c, left : left + c].transpose(2, 0, 1))


def to_unit_float(x: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3, H, W]`` -> float32 in [0, 1] (x / 255)."""
    return x.astype(np.float32) / np.float32(255.0)


def preprocess_file(path: Path, p: Preprocessing = CONVNEXT_HF) -> np.ndarray:
    """Image file -> float32 CHW ``[3, 224, 224]`` in ``[0, 1]``; `ImageError` names a bad file."""
    return preprocess_image(load_rgb(path), p)


def normalize(x: np.ndarray, p: Preprocessing = CONVNEXT_HF) -> np.ndarray:
    """``(x - mean) / std`` over the channel axis of float32 ``[..., 3, H, W]`` input in ``[0, 1]``."""
    mean = np.asarray(p.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(p.std, dtype=np.float32).reshape(3, 1, 1)
    return ((x - mean) / std).astype(np.float32)

