"""The shared preprocessing: parity with transformers, every image mode, and clear errors."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_convnext.errors import ImageError
from edge_convnext.preprocessing import (
    CONVNEXT_HF,
    TORCHVISION_IMAGENET1K_V1,
    Preprocessing,
    load_rgb,
    normalize,
    preprocess_file,
    preprocess_image,
    to_rgb,
)

# facebook/convnext-tiny-224's preprocessor_config.json (see FIELD_NOTES): the checkpoint's own values,
# not transformers' class defaults, which changed across versions.
CONVNEXT_TINY_224_CONFIG = {
    "crop_pct": 0.875, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 224},
}


def test_config_reading_matches_the_checkpoint():
    p = Preprocessing.from_hf_config(CONVNEXT_TINY_224_CONFIG, source="test")
    assert (p.resize_shortest_edge, p.crop_size, p.resample) == (256, 224, "bicubic")
    assert p.mean == CONVNEXT_HF.mean and p.std == CONVNEXT_HF.std
    assert Preprocessing.from_dict(p.to_dict()) == p


def _parity_images(subset, samples_dir: Path) -> list[Path]:
    samples = sorted(samples_dir.iterdir())
    val = [s.path for s in subset.split("evaluation")[:50]] + [s.path for s in subset.split("calibration")[:10]]
    return samples + val


@pytest.mark.convert
def test_parity_with_transformers_pil_processor(subset, samples_dir):
    transformers = pytest.importorskip("transformers")
    proc = transformers.ConvNextImageProcessorPil(**CONVNEXT_TINY_224_CONFIG)
    p = Preprocessing.from_hf_config(CONVNEXT_TINY_224_CONFIG, source="test")
    paths = _parity_images(subset, samples_dir)
    assert len(paths) >= 9 + 50
    worst = 0.0
    for path in paths:
        with Image.open(path) as im:
            want = proc(images=im, do_convert_rgb=True, return_tensors="np")["pixel_values"][0]
        got = normalize(preprocess_file(path, p), p)
        assert got.shape == want.shape == (3, 224, 224) and got.dtype == np.float32
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= 1e-5, f"max abs difference {worst}"


def test_output_contract_and_geometry(samples_dir):
    x = preprocess_file(samples_dir / "executorch_dog.jpg")  # 1546x1213 landscape
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # Center crop of a 256-short-edge resize: compare with Pillow doing the same by hand.
    with Image.open(samples_dir / "executorch_dog.jpg") as im:
        im = im.convert("RGB")
        w = int(256 * im.width / im.height)
        ref = im.resize((w, 256), Image.Resampling.BICUBIC)
        left = (w - 224) // 2
        ref = np.asarray(ref)[16:240, left : left + 224].transpose(2, 0, 1) / 255.0
    assert np.abs(x - ref).max() < 1e-6


def test_portrait_and_torchvision_preprocessing():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 300, 3), dtype=np.uint8))
    x = preprocess_image(im, TORCHVISION_IMAGENET1K_V1)
    assert x.shape == (3, 224, 224)
    resized = im.resize((236, int(236 * 400 / 300)), Image.Resampling.BILINEAR)
    top = (resized.height - 224) // 2
    ref = np.asarray(resized)[top : top + 224, 6:230].transpose(2, 0, 1) / 255.0
    assert np.abs(x - ref).max() < 1e-6


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "I", "F", "1", "RGB"])
def test_every_mode_becomes_rgb(mode):
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray(rng.integers(0, 65535, (40, 50)).astype(np.uint16))
    elif mode == "F":
        im = Image.fromarray(rng.random((40, 50)).astype(np.float32))
    else:
        im = base.convert(mode)
    rgb = to_rgb(im)
    assert rgb.mode == "RGB" and rgb.size == (50, 40)
    if mode in ("I;16", "F"):  # the 16-bit / float range is scaled down, not clipped at 255
        assert 100 < np.asarray(rgb).mean() < 160
    assert preprocess_image(im).shape == (3, 224, 224)


def test_transparency_composites_onto_white():
    im = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert np.asarray(to_rgb(im))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_png_file_round_trip(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((30, 30), 65535, dtype=np.uint16)).save(path)
    assert np.asarray(load_rgb(path)).min() == 255


def test_truncated_image_names_the_file(tmp_path, samples_dir):
    src = (samples_dir / "n01440764_tench.JPEG").read_bytes()
    bad = tmp_path / "cut.JPEG"
    bad.write_bytes(src[: len(src) // 3])
    with pytest.raises(ImageError, match=r"cut\.JPEG: image is truncated or corrupted"):
        preprocess_file(bad)


def test_non_image_and_missing_file_name_the_file(tmp_path):
    txt = tmp_path / "notes.jpg"
    txt.write_text("not a picture")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image"):
        preprocess_file(txt)
    with pytest.raises(ImageError, match=r"missing\.png: no such image file"):
        preprocess_file(tmp_path / "missing.png")


def test_grayscale_sample_is_converted(samples_dir):
    with Image.open(samples_dir / "n03417042_garbage_truck.JPEG") as im:
        assert im.mode == "L"
    x = preprocess_file(samples_dir / "n03417042_garbage_truck.JPEG")
    assert np.allclose(x[0], x[1]) and np.allclose(x[1], x[2])


def test_preprocessing_does_not_import_torch(samples_dir):
    code = (
        "import sys; from edge_convnext.preprocessing import preprocess_file;"
        f"preprocess_file({str(samples_dir / 'n02123045_tabby.JPEG')!r});"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_jpeg_bytes_in_memory_match_file(tmp_path, samples_dir):
    data = (samples_dir / "n02129604_tiger.JPEG").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        a = preprocess_image(im)
    assert np.array_equal(a, preprocess_file(samples_dir / "n02129604_tiger.JPEG"))
