"""Vision's crop-and-scale options and regionOfInterest, emulated (`edge_convnext.vision_crop`).

Geometry on synthetic images whose content is known: which part of the photo lands where.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_convnext.preprocessing import Preprocessing, crop_uint8, to_unit_float
from edge_convnext.roi import center_crop_roi
from edge_convnext.vision_crop import load_oriented, roi_to_box, vision_file, vision_image, vision_input

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def painted(size: tuple[int, int], boxes: list[tuple[tuple[int, int, int, int], tuple[int, int, int]]],
            background=(0, 0, 0)) -> Image.Image:
    """An RGB image of ``size`` (W, H) with each ``(left, top, right, bottom)`` box filled (upper-left origin)."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:] = background
    for (l, t, r, b), color in boxes:
        a[t:b, l:r] = color
    return Image.fromarray(a, "RGB")


def test_output_is_float32_chw_8_bit_values() -> None:
    x = vision_input(painted((300, 200), [((0, 0, 150, 200), WHITE)]))
    assert x.shape == (3, 224, 224) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(np.rint(x * 255) / 255, x.astype(np.float64).astype(np.float32))


def test_center_crop_keeps_the_central_square_of_a_landscape_photo() -> None:
    # 400x300: the centered 300x300 square is x in [50, 350): green left half, blue right half.
    im = painted((400, 300), [((0, 0, 50, 300), RED), ((350, 0, 400, 300), RED),
                              ((50, 0, 200, 300), GREEN), ((200, 0, 350, 300), BLUE)])
    a = np.asarray(vision_image(im, "centerCrop")).astype(int)
    assert a.shape == (224, 224, 3)
    assert (a[:, 2:-2, 0] == 0).all()  # no red inside: the side bands are cropped away
    assert a[:, 0, 0].max() < 90  # the edge pixel may blend a little red (filter support)
    assert (a[:, 2:110, 1] == 255).all() and (a[:, 114:222, 2] == 255).all()  # halves at 112
    # A portrait photo: the crop is vertical.
    portrait = painted((300, 400), [((0, 0, 300, 50), RED), ((0, 350, 300, 400), RED),
                                    ((0, 50, 300, 350), GREEN)])
    b = np.asarray(vision_image(portrait, "centerCrop")).astype(int)
    assert (b[2:-2, :, 0] == 0).all() and (b[2:-2, :, 1] == 255).all()


def test_scale_fill_stretches_the_whole_image() -> None:
    # 400x200 with a red top-left quadrant: after stretching it is the top-left 112x112 quadrant.
    im = painted((400, 200), [((0, 0, 200, 100), RED)], background=WHITE)
    a = np.asarray(vision_image(im, "scaleFill")).astype(int)
    assert (a[:110, :110] == RED).all()
    assert (a[114:, :, 1] == 255).all() and (a[:, 114:, 1] == 255).all()


def test_scale_fit_letterboxes_with_black() -> None:
    # 400x200 white: scaled to 224x112, centered vertically, black bars of 56 rows.
    a = np.asarray(vision_image(painted((400, 200), [], background=WHITE), "scaleFit")).astype(int)
    assert (a[:56] == 0).all() and (a[168:] == 0).all() and (a[56:168] == 255).all()
    # Portrait 100x400: 56x224, pillarboxed.
    b = np.asarray(vision_image(painted((100, 400), [], background=WHITE), "scaleFit")).astype(int)
    assert (b[:, :84] == 0).all() and (b[:, 140:] == 0).all() and (b[:, 84:140] == 255).all()
    # Aspect kept: a centered square in a 400x200 photo stays square (80x80 -> 44.8 px a side).
    sq = np.asarray(vision_image(painted((400, 200), [((160, 60, 240, 140), RED)]), "scaleFit"))[..., 0] > 127
    rows, cols = np.nonzero(sq)
    assert abs((rows.max() - rows.min()) - (cols.max() - cols.min())) <= 1
    assert 43 <= rows.max() - rows.min() + 1 <= 46


def test_region_of_interest_has_a_lower_left_origin() -> None:
    assert roi_to_box((0.0, 0.0, 0.5, 0.25), 400, 200) == (0.0, 150.0, 200.0, 200.0)  # the bottom-left strip
    # Only the bottom-left 200x50 strip is red: with that ROI, scaleFill sees red only.
    im = painted((400, 200), [((0, 150, 200, 200), RED)], background=BLUE)
    a = np.asarray(vision_image(im, "scaleFill", roi=(0.0, 0.0, 0.5, 0.25))).astype(int)
    assert (a[2:-2, 2:-2] == RED).all()
    top = np.asarray(vision_image(im, "scaleFill", roi=(0.0, 0.75, 0.5, 0.25))).astype(int)
    assert (top[2:-2, 2:-2] == BLUE).all()
    with pytest.raises(ValueError, match="regionOfInterest"):
        roi_to_box((0.6, 0.0, 0.5, 1.0), 400, 200)


@pytest.mark.parametrize(("w", "h"), [(640, 480), (480, 640), (500, 375), (300, 300)])
def test_reference_roi_is_the_resize_256_crop_224_square(w, h) -> None:
    x, y, rw, rh = center_crop_roi(w, h).vision()
    side = min(w, h) * 224 / 256
    # Within the reference's integer rounding of its resized long edge and crop offset (< 1 pixel).
    assert abs(rw * w - side) < 1.0 and abs(rh * h - side) < 1.0
    assert abs((x + rw / 2) * w - w / 2) < 1.0 and abs((y + rh / 2) * h - h / 2) < 1.0


def gradient(w: int, h: int) -> Image.Image:
    """Smooth content: R grows left to right, G top to bottom, B along the diagonal."""
    xs, ys = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    a = np.stack([xs, ys, (xs + ys) / 2], axis=-1) * 255
    return Image.fromarray(np.rint(a).astype(np.uint8), "RGB")


@pytest.mark.parametrize(("w", "h"), [(640, 480), (375, 500)])
def test_center_crop_with_reference_roi_matches_the_reference_preprocessing(w, h) -> None:
    im = gradient(w, h)
    ref = to_unit_float(crop_uint8(im, Preprocessing(resample="bilinear")))
    got = vision_input(im, "centerCrop", roi=center_crop_roi(w, h).vision())
    # Same pixels up to the reference's integer rounding of its resized size and crop offset.
    assert np.abs(got - ref).max() <= 2.5 / 255
    # Without the ROI, centerCrop keeps more of the photo (crop ratio 1.0): the content differs.
    wide = vision_input(im, "centerCrop")
    assert np.abs(wide - ref).max() > 10 / 255
    # ... and its red ramp spans the whole short side, the reference's only 224/256 of it.
    short_ramp = (wide[0, 112, -1] - wide[0, 112, 0]) if w >= h else (wide[1, -1, 112] - wide[1, 0, 112])
    ref_ramp = (ref[0, 112, -1] - ref[0, 112, 0]) if w >= h else (ref[1, -1, 112] - ref[1, 0, 112])
    assert np.isclose(ref_ramp / short_ramp, 224 / 256, atol=0.02)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 80x40, left half red; EXIF orientation 6 means "rotate 90 degrees clockwise to display".
    stored = painted((80, 40), [((0, 0, 40, 40), RED)], background=BLUE)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    upright = load_oriented(path)
    assert upright.size == (40, 80)
    a = np.asarray(upright).astype(int)
    assert a[10, 20, 0] > 200 and a[10, 20, 2] < 60  # red on top after the rotation
    assert a[70, 20, 2] > 200 and a[70, 20, 0] < 60
    x = vision_file(path, "scaleFill")
    assert x[0, 20, 112] > 0.8 and x[2, 200, 112] > 0.8
    plain = tmp_path / "plain.png"
    stored.save(plain)
    assert load_oriented(plain).size == (80, 40)


def test_unknown_option_is_refused() -> None:
    with pytest.raises(ValueError, match="scaleFit"):
        vision_input(painted((10, 10), []), "stretch")  # type: ignore[arg-type]


def test_app_modes_prepare_vision_inputs_from_uint8_photos() -> None:
    from edge_convnext.vision_crop import APP_MODES

    im = gradient(500, 375)
    photo = np.asarray(im, dtype=np.uint8)
    p = Preprocessing(resample="bilinear")
    assert set(APP_MODES) == {"precropped", "centerCrop", "centerCrop+roi", "scaleFill", "scaleFit"}
    out = {}
    for mode, (settings, prepare) in APP_MODES.items():
        assert settings
        x = prepare(photo, p)
        assert x.shape == (3, 224, 224) and x.dtype == np.float32, mode
        out[mode] = x
    np.testing.assert_array_equal(out["precropped"], to_unit_float(crop_uint8(im, p)))
    assert np.abs(out["centerCrop+roi"] - out["precropped"]).max() <= 2.5 / 255
    np.testing.assert_array_equal(out["scaleFill"], vision_input(im, "scaleFill"))
    assert (out["scaleFit"][:, :20] == 0).all()  # 500x375 letterboxed: 28 black rows on top
