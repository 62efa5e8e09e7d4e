"""kpn_jax.grades: schema, validation and one-hot encoding."""

from __future__ import annotations

import numpy as np
import pytest

from kpn_jax import grades


def test_schema_layout():
    assert grades.TASKS[0] == "kl" and len(grades.TASKS) == 7
    assert [grades.NUM_CLASSES[t] for t in grades.TASKS] == [5, 4, 4, 4, 4, 4, 4]
    assert grades.ONE_HOT_DIM == 29
    assert grades.OARSI_TASKS == grades.TASKS[1:]
    offsets = grades.one_hot_offsets()
    assert offsets[0] == (0, 5) and offsets[1] == (5, 9) and offsets[-1] == (25, 29)
    assert set(grades.PAPER_NAMES) == set(grades.TASKS)


def test_one_hot_matches_manual_encoding():
    rng = np.random.default_rng(0)
    g = np.stack([rng.integers(0, grades.NUM_CLASSES[t], 12) for t in grades.TASKS], 1)
    encoded = grades.one_hot(g)
    assert encoded.shape == (12, 29) and encoded.dtype == np.float32
    for row, code in zip(g, encoded):
        expected = np.zeros(29)
        for (start, _), value in zip(grades.one_hot_offsets(), row):
            expected[start + value] = 1.0
        np.testing.assert_array_equal(code, expected)


def test_one_hot_missing_grade_is_a_zero_block_and_batch_shapes_work():
    g = np.array([[2, -1, 0, 3, -1, 1, 0]])
    encoded = grades.one_hot(g)[0]
    # kl 0-4, jsn_l 5-8 (missing), jsn_m 9-12, ost_fl 13-16, ost_fm 17-20 (missing), ...
    np.testing.assert_array_equal(np.flatnonzero(encoded), [2, 9, 16, 22, 25])
    nested = grades.one_hot(np.full((2, 3, 7), -1))
    assert nested.shape == (2, 3, 29) and nested.sum() == 0
    single = grades.one_hot([4, 3, 3, 3, 3, 3, 3])
    assert single.shape == (29,) and single[4] == 1 and single[-1] == 1


@pytest.mark.parametrize("bad, match", [
    ([5, 0, 0, 0, 0, 0, 0], "kl grade 5"),
    ([0, 4, 0, 0, 0, 0, 0], "jsn_lateral grade 4"),
    ([0, 0, 0, 0, 0, 0, -2], "ost_tibia_medial grade -2"),
    ([0, 0, 0], r"shape \[\.\.\., 7\]"),
    ([0.5, 0, 0, 0, 0, 0, 0], "non-integer"),
    ([np.nan, 0, 0, 0, 0, 0, 0], "finite"),
    (["a", "b", "c", "d", "e", "f", "g"], "dtype"),
])
def test_one_hot_rejects_bad_grades(bad, match):
    with pytest.raises(ValueError, match=match):
        grades.one_hot(np.array(bad))


def test_validate_and_fully_graded():
    g = np.array([[1.0, 2, 3, 0, 0, 1, 2], [1, -1, 3, 0, 0, 1, 2]])
    out = grades.validate(g)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(grades.fully_graded(g), [True, False])
    with pytest.raises(ValueError, match="my_grades"):
        grades.validate(np.zeros(6), name="my_grades")
