"""Label-noise functions: exact flip counts, real flips, seeding, transition matrices."""
import numpy as np
import pytest

from lai.data.noise import resample_from_transition, symmetric_noise, transition_matrix


@pytest.mark.parametrize("n,rate,classes", [(1000, 0.4, 10), (37, 0.2, 2), (500, 0.0, 6),
                                            (11, 0.5, 20)])
def test_symmetric_noise_flips_exact_count_to_other_classes(n, rate, classes):
    labels = np.random.default_rng(1).integers(0, classes, n)
    noisy, flipped = symmetric_noise(labels, rate, classes, seed=3)
    assert len(flipped) == round(rate * n)
    assert np.all(np.diff(flipped) > 0)  # sorted, unique
    changed = np.flatnonzero(noisy != labels)
    np.testing.assert_array_equal(changed, flipped)  # every flip changes the label, nothing else
    assert noisy.min() >= 0 and noisy.max() < classes
    assert noisy.dtype == np.int64


def test_symmetric_noise_is_seeded_and_uniform_over_other_classes():
    labels = np.zeros(20000, dtype=np.int64)
    a, fa = symmetric_noise(labels, 0.4, 5, seed=0)
    b, fb = symmetric_noise(labels, 0.4, 5, seed=0)
    c, _ = symmetric_noise(labels, 0.4, 5, seed=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(a, c)
    counts = np.bincount(a[fa], minlength=5)
    assert counts[0] == 0
    np.testing.assert_allclose(counts[1:] / len(fa), 0.25, atol=0.02)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_symmetric_noise_rejects_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        symmetric_noise(np.zeros(10, dtype=np.int64), rate, 3, seed=0)


def test_transition_matrix_rows_are_distributions():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 4, 1000)
    clean[clean == 3] = 2  # class 3 never occurs: identity row
    noisy, _ = symmetric_noise(clean, 0.3, 4, seed=1)
    T = transition_matrix(clean, noisy, 4)
    assert T.shape == (4, 4)
    np.testing.assert_allclose(T.sum(axis=1), 1.0)
    np.testing.assert_array_equal(T[3], np.eye(4)[3])
    np.testing.assert_allclose(np.diag(T)[:3], 0.7, atol=0.06)
    assert T[0, 0] == pytest.approx(np.mean(noisy[clean == 0] == 0))


def test_resample_from_transition_follows_rows_and_is_seeded():
    T = np.array([[0.6, 0.4, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8]])
    clean = np.repeat(np.arange(3), 20000)
    a = resample_from_transition(clean, T, seed=5)
    np.testing.assert_array_equal(a, resample_from_transition(clean, T, seed=5))
    assert not np.array_equal(a, resample_from_transition(clean, T, seed=6))
    np.testing.assert_allclose(transition_matrix(clean, a, 3), T, atol=0.015)
    assert np.all(a[clean == 1] == 1)  # zero-probability classes are never drawn
    with pytest.raises(ValueError):
        resample_from_transition(clean, np.ones((3, 3)), seed=0)
