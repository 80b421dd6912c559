from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from desensitize.attack.scores import (
    PSNR_CAP,
    class_mean_images,
    linkage_chance,
    linkage_hits,
    psnr_per_image,
    ssim_map,
)
from desensitize.errors import DesensitizeError
from desensitize.stats import (
    above_chance,
    binomial_tail,
    bootstrap_interval,
    chance_level,
    extrapolate,
    saturation,
    wilson_interval,
)


def _images(*pixels: list[float]) -> np.ndarray:
    """One single-channel 1-row image per argument: (N, 1, 1, W) float32."""
    return np.array(pixels, dtype=np.float32)[:, None, None, :]


def test_psnr_per_image_over_hidden_pixels_only():
    raw = _images([0.0, 0.0], [0.5, 0.5])
    reconstruction = _images([0.1, 0.9], [0.5, 0.0])  # image 0 off by 0.1 hidden, 0.9 visible; image 1 exact hidden
    masks = np.array([[[0, 1]], [[0, 1]]], dtype=np.uint8)
    # image 0: MSE 0.01 over its one hidden pixel -> 10 log10(1 / 0.01) = 20 dB; image 1: exact -> the cap.
    np.testing.assert_allclose(psnr_per_image(reconstruction, raw, masks), [20.0, PSNR_CAP], rtol=1e-5)
    assert psnr_per_image(reconstruction, raw, masks).mean() == pytest.approx((20.0 + PSNR_CAP) / 2, rel=1e-5)


def test_scores_refuse_misaligned_or_empty_input():
    raw = _images([0.0, 0.0], [0.5, 0.5])
    with pytest.raises(DesensitizeError, match="reconstruction shape"):
        psnr_per_image(raw[:1], raw, np.ones((2, 1, 2), np.uint8))
    with pytest.raises(DesensitizeError, match="masks have shape"):
        linkage_hits(raw, raw, np.ones((2, 2, 1), np.uint8))
    with pytest.raises(DesensitizeError, match="non-empty"):
        psnr_per_image(raw[:0], raw[:0], np.ones((0, 1, 2), np.uint8))
    with pytest.raises(DesensitizeError, match="groups"):
        linkage_hits(raw, raw, np.zeros((2, 1, 2), np.uint8), groups=np.array([0, 1, 1]))


def test_linkage_within_class_can_hit_where_all_class_misses():
    # Everything hidden. Reconstruction 0 = 0.2: own original 0.0 is at distance 2 * 0.2^2 = 0.08, the impostor
    # 0.3 of class 1 at 2 * 0.1^2 = 0.02 (closer), its classmate 1.0 at 2 * 0.8^2 = 1.28.
    raw = _images([0.0, 0.0], [1.0, 1.0], [0.3, 0.3])
    reconstruction = _images([0.2, 0.2], [1.0, 1.0], [0.3, 0.3])
    masks = np.zeros((3, 1, 2), np.uint8)
    groups = np.array([0, 0, 1])
    np.testing.assert_array_equal(linkage_hits(reconstruction, raw, masks), [False, True, True])
    np.testing.assert_array_equal(linkage_hits(reconstruction, raw, masks, groups), [True, True, True])


def test_linkage_compares_hidden_pixels_only():
    # Pixel 0 hidden: reconstruction 0 matches its own original there (distance 0 vs 1 to the other image).
    # Its visible pixel is wrong: counted, both gallery images would be at distance 1 (a tie, no hit).
    raw = _images([0.0, 0.0], [1.0, 1.0])
    reconstruction = _images([0.0, 1.0], [1.0, 1.0])
    masks = np.array([[[0, 1]], [[0, 1]]], dtype=np.uint8)
    np.testing.assert_array_equal(linkage_hits(reconstruction, raw, masks), [True, True])
    np.testing.assert_array_equal(linkage_hits(reconstruction, raw, np.zeros_like(masks)), [False, True])


def test_linkage_ties_are_not_hits():
    # Images 0 and 1 are identical: a perfect reconstruction of either ties with the other.
    raw = _images([0.2, 0.4], [0.2, 0.4], [0.9, 0.1])
    masks = np.zeros((3, 1, 2), np.uint8)
    np.testing.assert_array_equal(linkage_hits(raw, raw, masks), [False, False, True])
    # In different classes the twins are never compared, so each is a hit within its class.
    np.testing.assert_array_equal(linkage_hits(raw, raw, masks, np.array([0, 1, 1])), [True, True, True])


def _naive_hits(reconstruction: np.ndarray, raw: np.ndarray, masks: np.ndarray, groups: np.ndarray) -> np.ndarray:
    hidden = (masks == 0)[:, None].astype(np.float64)
    hits = []
    for i in range(len(raw)):
        dist = ((hidden[i] * (reconstruction[i].astype(np.float64) - raw)) ** 2).sum(axis=(1, 2, 3))
        dist[groups != groups[i]] = np.inf
        hits.append((dist <= dist[i] + 1e-9).sum() == 1)
    return np.array(hits)


def test_linkage_matches_a_pairwise_loop_on_random_data():
    rng = np.random.default_rng(0)
    raw = rng.random((24, 2, 4, 4), dtype=np.float32)
    reconstruction = np.clip(raw + rng.normal(0, 0.3, raw.shape), 0, 1).astype(np.float32)
    masks = (rng.random((24, 4, 4)) < 0.5).astype(np.uint8)
    groups = rng.integers(0, 3, 24)
    hits = linkage_hits(reconstruction, raw, masks)
    assert 0 < hits.sum() < 24  # a non-trivial case
    np.testing.assert_array_equal(hits, _naive_hits(reconstruction, raw, masks, np.zeros(24)))
    expected = _naive_hits(reconstruction, raw, masks, groups)
    np.testing.assert_array_equal(linkage_hits(reconstruction, raw, masks, groups), expected)


def test_linkage_chance():
    assert linkage_chance(5) == pytest.approx(1 / 5)
    # mean(1/2, 1/2, 1/3, 1/3, 1/3) = (1 + 1) / 5
    assert linkage_chance(5, np.array([0, 0, 1, 1, 1])) == pytest.approx(0.4)
    with pytest.raises(DesensitizeError):
        linkage_chance(0)
    with pytest.raises(DesensitizeError):
        linkage_chance(4, np.array([0, 0, 1, 1, 1]))


# Wilson: p = s/n, z = 1.959964 (95%), zz = z^2/n; centre = (p + zz/2) / (1 + zz),
# half = z / (1 + zz) * sqrt(p(1-p)/n + z^2/(4n^2)).
#   0/10:   zz = 0.384146, centre = 0.192073/1.384146 = 0.138767, half = 1.416008 * 0.097998 = 0.138766
#   5/10:   centre = 0.5, half = 1.416008 * sqrt(0.025 + 0.009604) = 1.416008 * 0.186020 = 0.263406
#   50/100: centre = 0.5, half = 1.887458 * sqrt(0.0025 + 0.000096) = 1.887458 * 0.050951 = 0.096169
#   1/20:   zz = 0.192073, centre = 0.146036/1.192073 = 0.122506, half = 1.644168 * 0.069108 = 0.113625
@pytest.mark.parametrize(
    ("successes", "n", "expected"),
    [
        (0, 10, (0.0, 0.2775)),
        (5, 10, (0.2366, 0.7634)),
        (50, 100, (0.4038, 0.5962)),
        (1, 20, (0.0089, 0.2361)),
        (10, 10, (0.7225, 1.0)),  # mirror of 0/10
    ],
)
def test_wilson_interval_known_values(successes: int, n: int, expected: tuple[float, float]):
    assert wilson_interval(successes, n) == pytest.approx(expected, abs=1e-3)


def test_wilson_interval_widens_with_confidence_and_refuses_bad_input():
    low90, high90 = wilson_interval(5, 10, 0.90)
    low95, high95 = wilson_interval(5, 10)
    assert low95 < low90 < 0.5 < high90 < high95
    for args in ((5, 10, 1.0), (5, 10, 0.0), (0, 0), (11, 10), (-1, 10)):
        with pytest.raises(DesensitizeError):
            wilson_interval(*args)


def test_bootstrap_interval():
    rng = np.random.default_rng(3)
    values = rng.exponential(1.0, 1000)
    small = values[:50]
    low, high = bootstrap_interval(small)
    assert low < small.mean() < high
    assert bootstrap_interval(small) == (low, high)  # seeded
    assert bootstrap_interval(small, seed=1) != (low, high)
    low_big, high_big = bootstrap_interval(values)
    assert low_big < values.mean() < high_big
    assert high_big - low_big < (high - low) / 2  # ~ 1/sqrt(N): 20x the images, ~4.5x narrower
    low_c, high_c = bootstrap_interval(np.full(40, 0.3))
    assert low_c == high_c == pytest.approx(0.3)
    with pytest.raises(DesensitizeError):
        bootstrap_interval(np.array([]))
    with pytest.raises(DesensitizeError):
        bootstrap_interval(values, confidence=1.5)


def test_class_mean_images_values_and_absent_class():
    images = _images([0.0, 1.0], [1.0, 1.0], [0.2, 0.4])
    means = class_mean_images(images, np.array([0, 0, 2]), 4)
    assert means.shape == (4, 1, 1, 2) and means.dtype == np.float32
    np.testing.assert_allclose(means[:, 0, 0], [[0.5, 1.0], [0.4, 0.8], [0.2, 0.4], [0.4, 0.8]], rtol=1e-6)
    with pytest.raises(DesensitizeError):
        class_mean_images(images, np.array([0, 0, 4]), 4)
    with pytest.raises(DesensitizeError):
        class_mean_images(images, np.array([0, 0]), 4)


def test_class_mean_guess_is_unbeatable_when_images_equal_their_class_mean():
    rng = np.random.default_rng(0)
    prototypes = rng.random((3, 2, 4, 4), dtype=np.float32)
    labels = np.array([0, 0, 1, 1, 1, 2])
    images = prototypes[labels]
    masks = (rng.random((6, 4, 4)) < 0.5).astype(np.uint8)
    guess = class_mean_images(images, labels, 3)[labels]
    np.testing.assert_array_equal(psnr_per_image(guess, images, masks), PSNR_CAP)
    other = np.clip(images + rng.normal(0, 0.05, images.shape), 0, 1).astype(np.float32)
    gain = psnr_per_image(other, images, masks) - psnr_per_image(guess, images, masks)
    assert (gain <= 0).all() and (gain < 0).any()


def test_extrapolate_and_saturation_on_an_exact_log_curve():
    a, b = 0.1, 0.05
    counts = [250, 500, 1000]
    scores = [a + b * math.log(n) for n in counts]
    assert extrapolate(counts, scores, 8000) == pytest.approx(a + b * math.log(8000))
    fit = saturation(counts, scores)
    assert fit["slope_per_doubling"] == pytest.approx(b * math.log(2))
    assert fit["intercept"] == pytest.approx(a)
    assert fit["r2"] == pytest.approx(1.0)


def test_extrapolate_never_falls_below_the_measured_maximum():
    counts = [250, 500, 1000]
    assert extrapolate(counts, [0.3, 0.3, 0.3], 8000) == pytest.approx(0.3)
    assert extrapolate(counts, [0.3, 0.25, 0.2], 8000) == pytest.approx(0.3)
    assert extrapolate(counts, [0.2, 0.35, 0.3], 8000) >= 0.35


def test_scaling_fit_refuses_too_few_counts():
    with pytest.raises(DesensitizeError, match="2 distinct"):
        saturation([500, 500], [0.1, 0.2])
    with pytest.raises(DesensitizeError):
        extrapolate([500], [0.1], 1000)
    with pytest.raises(DesensitizeError):
        saturation([0, 500], [0.1, 0.2])
    with pytest.raises(DesensitizeError):
        extrapolate([250, 500], [0.1, 0.2], 0)


@pytest.mark.parametrize(
    ("successes", "n", "p", "expected"),
    [
        (5, 10, 0.5, 638 / 1024),  # sum of C(10, k) for k >= 5, over 2^10
        (3, 3, 0.9, 0.729),
        (0, 7, 0.3, 1.0),
        (1, 4, 0.0, 0.0),
        (100, 300, 1 / 3, 0.5217025910938239),  # scipy.stats.binom.sf(99, 300, 1/3)
        (120, 300, 1 / 3, 0.009125962873638847),  # scipy.stats.binom.sf(119, 300, 1/3)
    ],
)
def test_binomial_tail_known_values(successes: int, n: int, p: float, expected: float):
    assert binomial_tail(successes, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_binomial_tail_stays_finite_for_large_n_and_refuses_bad_input():
    assert 0 < binomial_tail(1_100, 10_000, 0.1) < 0.01 and binomial_tail(9_000, 10_000, 0.1) == 0.0
    for bad in ((4, 3, 0.5), (1, 0, 0.5), (1, 3, 1.5)):
        with pytest.raises(DesensitizeError):
            binomial_tail(*bad)


def test_chance_is_the_majority_class_rate_and_an_accuracy_at_chance_is_not_above_it():
    balanced = np.arange(300) % 3
    assert chance_level(balanced) == pytest.approx(1 / 3)
    assert chance_level(np.array([0] * 80 + [1] * 20)) == 0.8  # imbalanced: always guessing class 0
    at_chance = above_chance(100, balanced)  # every model of the image-folder run: 0.333 on 3 classes
    assert not at_chance["above"] and at_chance["p_value"] > 0.5
    assert "not clearly above chance 0.3333" in at_chance["message"]
    assert above_chance(130, balanced)["above"]  # 0.433: p = 0.0002
    assert not above_chance(4, np.arange(9) % 3)["above"]  # 4 of 9 is above 1/3, but too few images to tell
    # 85% is below the 80%-majority split's chance plus what 100 images can show (p = 0.13).
    assert not above_chance(85, np.array([0] * 80 + [1] * 20))["above"]
    with pytest.raises(DesensitizeError, match="significance"):
        above_chance(100, balanced, significance=0)


def test_ssim_map_follows_the_definition_at_an_interior_pixel_and_is_one_for_identical_images():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 16, 16)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1).astype(np.float32)
    values = ssim_map(a, b)
    assert values.shape == (2, 16, 16)
    np.testing.assert_allclose(ssim_map(a, a), 1.0, atol=1e-6)

    def by_hand(x: np.ndarray, y: np.ndarray) -> float:  # one channel's 7x7 window, population statistics
        mx, my = x.mean(), y.mean()
        vx, vy, cxy = x.var(), y.var(), ((x - mx) * (y - my)).mean()
        c1, c2 = 0.01**2, 0.03**2
        return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))

    window = (slice(5, 12), slice(2, 9))  # centred on pixel (8, 5)
    expected = np.mean([by_hand(a[1, c][window].astype(float), b[1, c][window].astype(float)) for c in range(3)])
    assert values[1, 8, 5] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(DesensitizeError, match="2x2 pixels are too small for SSIM"):
        ssim_map(a[:, :, :2, :2], b[:, :, :2, :2])


@pytest.mark.parametrize(("n", "confidence", "seed"), [(50, 0.95, 0), (3000, 0.9, 3), (7, 0.99, 11)])
def test_bootstrap_interval_is_scipys_percentile_bootstrap(n: int, confidence: float, seed: int):
    """An independent implementation: scipy.stats.bootstrap, percentile method, the same resamples drawn
    from the same seed (3,000 values: our resamples come in two chunks, scipy's in one; the draws agree)."""
    values = np.random.default_rng(n).normal(size=n) if n != 3000 else np.random.default_rng(6).integers(0, 2, n)
    ours = bootstrap_interval(values.astype(float), confidence, resamples=2000, seed=seed)
    theirs = stats.bootstrap(
        (values.astype(float),),
        np.mean,
        n_resamples=2000,
        method="percentile",
        confidence_level=confidence,
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), rel=1e-12, abs=1e-12)
