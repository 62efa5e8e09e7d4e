"""BoneFinder .pts reading and the kneel16 conversion (kpn_jax.pts)."""

import numpy as np
import pytest

from kpn_jax import pts
from kpn_jax import keypoints as kp_lib


def _bonefinder_shape(rng, n=74):
    return rng.uniform(5.0, 60.0, size=(n, 2))


def test_parse_round_trip_and_header(tmp_path):
    rng = np.random.default_rng(0)
    shape = _bonefinder_shape(rng)
    path = tmp_path / "001.pts"
    pts.write_pts(path, shape)
    text = path.read_text()
    assert text.startswith("version: 1\nn_points: 74\n{\n") and text.rstrip().endswith("}")
    np.testing.assert_allclose(pts.read_pts(path), shape, atol=1e-6)


@pytest.mark.parametrize("text, message", [
    ("version: 1\nn_points: 3\n{\n1 2\n3 4\n}\n", "n_points: 3 but the file lists 2"),
    ("version: 1\nn_points: 2\n{\n1 2\n3 x\n}\n", "line 5"),
    ("version: 1\nn_points: 2\n{\n1 2\n3 4\n", "no '}'"),
    ("version: 1\n1 2\n", "line 2"),
])
def test_malformed_files_name_the_file_and_line(text, message):
    with pytest.raises(pts.PtsError, match="knee.pts") as info:
        pts.parse_pts(text, source="knee.pts")
    assert message in str(info.value)


def test_kneel16_takes_knee_l_indices():
    shape = np.stack([np.arange(74.0), 1000 + np.arange(74.0)], axis=-1)
    kneel = pts.to_kneel16(shape)
    assert kneel.shape == (16, 2)
    # femur 12..24 step 2 -> points 0-6, tibia 47..63 step 2 -> points 7-15 (docs/DESIGN.md, section 3).
    np.testing.assert_array_equal(kneel[:7, 0], [12, 14, 16, 18, 20, 22, 24])
    np.testing.assert_array_equal(kneel[7:, 0], [47, 49, 51, 53, 55, 57, 59, 61, 63])
    np.testing.assert_array_equal(kneel[:, 1], kneel[:, 0] + 1000)
    # A 16-point file is kneel16 already; other counts are refused.
    np.testing.assert_array_equal(pts.to_kneel16(kneel), kneel)
    with pytest.raises(pts.PtsError, match="40 points"):
        pts.to_kneel16(shape[:40])


def test_mm_to_pixels_uses_column_spacing_for_x():
    points = np.array([[14.0, 7.0]])
    np.testing.assert_allclose(pts.mm_to_pixels(points, (0.1, 0.2)), [[70.0, 70.0]])
    np.testing.assert_allclose(pts.pixels_to_mm(pts.mm_to_pixels(points, (0.1, 0.2)), (0.1, 0.2)),
                               points)


def test_flipped_file_is_mirrored_back_into_the_stored_image(tmp_path):
    """A right knee found on the mirrored radiograph ('_f') lands on the original pixels."""
    rng = np.random.default_rng(1)
    width, spacing = 300, (0.25, 0.25)
    true_px = rng.uniform(10, 200, size=(74, 2))
    # BoneFinder saw the mirrored image: x_f = W - 1 - x (pixel centres), in mm.
    mirrored_px = true_px.copy()
    mirrored_px[:, 0] = width - 1 - mirrored_px[:, 0]
    pts.write_pts(tmp_path / "001_f.pts", pts.pixels_to_mm(mirrored_px, spacing))
    pts.write_pts(tmp_path / "001.pts", pts.pixels_to_mm(true_px, spacing))
    expected = true_px[list(pts.BONEFINDER_TO_KNEEL16)]
    got_f = pts.read_knee_pts(tmp_path / "001_f.pts", spacing_mm=spacing, image_width=width)
    got = pts.read_knee_pts(tmp_path / "001.pts", spacing_mm=spacing, image_width=width)
    np.testing.assert_allclose(got_f, expected, atol=1e-3)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert pts.is_flipped_name(tmp_path / "001_f.pts") and not pts.is_flipped_name("001.pts")
    with pytest.raises(pts.PtsError, match="image width"):
        pts.read_knee_pts(tmp_path / "001_f.pts", spacing_mm=spacing)
    # Pixel files (no spacing) are taken as they are.
    np.testing.assert_allclose(pts.read_knee_pts(tmp_path / "001.pts", flipped=False),
                               pts.pixels_to_mm(true_px, spacing)[list(pts.BONEFINDER_TO_KNEEL16)],
                               atol=1e-4)
    assert kp_lib.validate_keypoints(got).shape == (16, 2)
