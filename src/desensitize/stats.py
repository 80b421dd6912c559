"""General statistics the gate, the registry and the search read their figures through: confidence
intervals (Wilson for proportions, the percentile bootstrap for means), the exact binomial test of an
accuracy against chance, which classes a set of labels covers, rank correlation, and the log-linear
data-scaling fit of an attacker's score.

Nothing here knows about images or masks; the privacy scores themselves are in desensitize.attack.scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from desensitize.errors import DesensitizeError

# An accuracy is clearly above chance when a classifier no better than chance would reach it with a
# probability under 1%: the usual level for "significant", stated rather than tuned.
CHANCE_SIGNIFICANCE = 0.01


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise DesensitizeError(f"confidence = {confidence:g}: must lie strictly between 0 and 1")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Wilson score interval of a binomial proportion (e.g. linkage hits of n images), in [0, 1].
    The gate compares its upper end with a threshold, so a sample too small to show privacy fails safe."""
    _check_confidence(confidence)
    if n < 1 or not 0 <= successes <= n:
        raise DesensitizeError(f"{successes} successes of {n} trials: need n >= 1 and 0 <= successes <= n")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, zz = successes / n, z * z / n
    centre = (p + zz / 2) / (1 + zz)
    half = z / (1 + zz) * math.sqrt(p * (1 - p) / n + zz / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def class_coverage(labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Which of `class_names` the labels hold: what a figure computed on them (accuracy, chance level,
    within-class galleries) covers. `present` and `classes` counts, and the `absent` names."""
    held = set(np.unique(np.asarray(labels)).tolist())
    absent = [name for k, name in enumerate(class_names) if k not in held]
    return {"present": len(class_names) - len(absent), "classes": len(class_names), "absent": absent}


def coverage_text(coverage: dict[str, Any], where: str) -> str:
    """`all 10 classes`, or `9 of 10 classes (absent from <where>: '7')`."""
    if not coverage["absent"]:
        return f"all {coverage['classes']} classes"
    names = ", ".join(repr(name) for name in coverage["absent"])
    return f"{coverage['present']} of {coverage['classes']} classes (absent from {where}: {names})"


def chance_level(labels: np.ndarray) -> float:
    """The accuracy of the best guess that never looks at the image: always the most frequent class of
    `labels` (1 / number of classes on a balanced split)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise DesensitizeError(f"labels with shape {labels.shape}: need a non-empty (N,) array")
    return float(np.bincount(labels).max() / len(labels))


def binomial_tail(successes: int, n: int, p: float) -> float:
    """P[X >= successes] for X ~ Binomial(n, p), summed exactly in log space (lgamma for the binomial
    coefficients), so large n neither overflows nor underflows."""
    if n < 1 or not 0 <= successes <= n or not 0 <= p <= 1:
        raise DesensitizeError(
            f"{successes} successes of {n} trials at p = {p:g}: need 0 <= successes <= n and p in [0, 1]"
        )
    if successes == 0 or p == 1:
        return 1.0
    if p == 0:
        return 0.0
    logs = [
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
        for k in range(successes, n + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(x - top) for x in logs))


def above_chance(correct: int, labels: np.ndarray, significance: float = CHANCE_SIGNIFICANCE) -> dict[str, Any]:
    """Whether `correct` right answers on the images of `labels` are clearly above chance: a one-sided
    exact binomial test against the hypothesis that each answer is right with probability
    `chance_level(labels)` (the majority-class rate, the true chance level of an imbalanced split, over the
    classes the labels hold: a class absent from them plays no part), at `significance`. The accuracy,
    chance level, number of images and of `classes` present, p-value, verdict `above` and a sentence
    saying all that."""
    if not 0 < significance < 1:
        raise DesensitizeError(f"significance = {significance:g}: must lie strictly between 0 and 1")
    n, chance = len(labels), chance_level(labels)
    classes = len(np.unique(labels))
    p_value = binomial_tail(correct, n, chance)
    above = p_value < significance
    return {
        "accuracy": correct / n,
        "chance": chance,
        "images": n,
        "classes": classes,
        "p_value": p_value,
        "significance": significance,
        "above": above,
        "message": f"accuracy {correct / n:.4f} on {n} images is {'' if above else 'not '}clearly above chance "
        f"{chance:.4f}, the majority-class rate of the {classes} classes present (one-sided binomial test: "
        f"p = {p_value:.2g}, {'<' if above else '>='} {significance:g})",
    }


def bootstrap_interval(
    values: np.ndarray, confidence: float = 0.95, *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-image `values` (images resampled with replacement),
    so a score from few images carries its uncertainty to the gate. For a paired difference, such as PSNR
    gain = attacker's per-image PSNR - blind guess's per-image PSNR on the same images, pass the per-image
    differences: bootstrap_interval(attacker - blind) resamples image pairs together."""
    _check_confidence(confidence)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0 or resamples < 1:
        raise DesensitizeError(
            f"bootstrap of values with shape {values.shape} and {resamples} resamples: need a non-empty (N,) "
            "array and at least one resample"
        )
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**22 // len(values))  # rows per draw: bounds the index matrix to ~32 MiB
    means = np.concatenate(
        [
            values[rng.integers(0, len(values), (min(chunk, resamples - start), len(values)))].mean(axis=1)
            for start in range(0, resamples, chunk)
        ]
    )
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _log_fit(counts: Sequence[float], scores: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares score = a + b * log(count): (a, b, r2)."""
    x, y = np.asarray(counts, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(np.unique(x)) < 2 or x.min() <= 0:
        raise DesensitizeError(
            f"counts {x.tolist()} and scores {y.tolist()}: a data-scaling fit needs one score per count and at "
            "least 2 distinct positive counts"
        )
    x = np.log(x)
    b, a = np.polyfit(x, y, 1)
    ss_res, ss_tot = ((y - a - b * x) ** 2).sum(), ((y - y.mean()) ** 2).sum()
    return float(a), float(b), float(1 - ss_res / ss_tot) if ss_tot > 0 else 1.0


def saturation(counts: Sequence[float], scores: Sequence[float]) -> dict[str, float]:
    """How an attacker score grows with its number of training images, from the fit score = a + b * log(count):
    the gain per doubling of the attacker's data, the intercept a and the fit's r2."""
    a, b, r2 = _log_fit(counts, scores)
    return {"slope_per_doubling": b * math.log(2), "intercept": a, "r2": r2}


def extrapolate(counts: Sequence[float], scores: Sequence[float], target: int) -> float:
    """The attacker score expected with `target` training images: max(max(scores), a + b * log(target)).
    Assumes the score grows log-linearly in the attacker's data; that is conservative for the data owner,
    since real curves saturate, and the result never falls below what was measured (a flat or decreasing
    curve is taken as saturated at its measured maximum)."""
    if target <= 0:
        raise DesensitizeError(f"target = {target}: must be a positive number of attacker training images")
    a, b, _ = _log_fit(counts, scores)
    return max(float(max(scores)), a + b * math.log(target))


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation of a and b; None under 3 values or where either is constant."""
    if len(a) < 3:
        return None
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])
