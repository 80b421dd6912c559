"""The privacy-constrained mask search: the most useful candidate mask that passes the privacy gate.

Every candidate gets a utility score (a model trained through its mask, scored on held-out train
images) and a privacy screen (a shortened attacker, cheap). Then, most useful first, a candidate whose
screen passes goes to the full gate (every attacker, trained to its limit, judged at the upper end of
each interval); the first that passes is the release. When no candidate the screen passes is left and
the budget of full runs is not spent, the rest of it goes to the candidates the screen puts closest to
passing. The screen only decides the order of work: a candidate is released only on the full gate's
verdict.

The screen is calibrated against the full gate as the search goes. A stronger attacker draws more out
of the same mask, so each gated score is modelled as its chance level plus a strength factor times
what the screen measures above it: full = base + k * (screen - base), with base the score of a blind
guess (linkage chance; 0 for PSNR gain and recognition recovery). k starts at 1 (the screen read as it
is: a weaker attacker that already breaks the gate means the full one does) and after every full run
becomes the largest ratio seen, so a candidate the screen passed but the full gate failed makes the
screen stricter for the rest. How well the screen ranks candidates like the full gate (Spearman over the
candidates that had both) is recorded with every search.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from desensitize.attack.gate import Scores, excess
from desensitize.errors import DesensitizeError
from desensitize.stats import spearman

log = logging.getLogger(__name__)

MIN_SIGNAL = 0.05  # a screen this share of the way from base to the limit, or less, is not used to calibrate


@dataclass
class Candidate:
    """One mask setting of the search; `masks` is what the utility and privacy scores look at (the
    train split's mask(s)); anything else the caller needs rides in `extra`."""

    name: str
    settings: dict[str, Any]  # e.g. template, cell, hidden ratio, scope: recorded as they are
    masks: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)
    utility: float | None = None
    screen: Scores | None = None
    predicted: Scores | None = None  # the calibrated screen when the full gate ran
    full: Scores | None = None
    passed: bool | None = None  # the full gate's verdict; None where it did not run

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.settings,
            "utility": self.utility,
            "screen": self.screen,
            "predicted": self.predicted,
            "full": self.full,
            "passed": self.passed,
        }


@dataclass
class SearchResult:
    chosen: Candidate | None  # None: no candidate passed (SearchFailed carries the result)
    candidates: list[Candidate]
    limits: Scores
    calibration: Scores  # the screen's strength factor per score (see the module doc), as used at the end
    base: Scores  # each score's blind-guess level
    agreement: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.name if self.chosen else None,
            "limits": self.limits,
            "screen_calibration": self.calibration,
            "screen_base": self.base,
            "screen_agreement": self.agreement,
            "candidates": [c.record() for c in self.candidates],
        }


def calibrated(screen: Scores, strength: Scores, base: Scores) -> Scores:
    """What the full gate is predicted to judge from a screen: base + strength x (screen - base) where
    the screen is above the blind level, the screen as it is elsewhere (see the module doc)."""
    return {s: base[s] + strength[s] * (v - base[s]) if v > base[s] else v for s, v in screen.items()}


def agreement(candidates: list[Candidate], limits: Scores) -> dict[str, Any]:
    """The screen against the full gate over the candidates that had both: Spearman correlation of their
    excess (None under 3 candidates), the share of pairs they order alike, and how many candidates the
    screen read as it is would have passed that the full gate failed."""
    both = [c for c in candidates if c.screen is not None and c.full is not None]
    screen = [excess(c.screen, limits) for c in both]
    full = [excess(c.full, limits) for c in both]
    pairs = [(i, j) for i in range(len(both)) for j in range(i + 1, len(both)) if full[i] != full[j]]
    alike = sum((screen[i] - screen[j]) * (full[i] - full[j]) > 0 for i, j in pairs)
    return {
        "candidates": len(both),
        "spearman": spearman(screen, full),
        "pairs_ordered_alike": alike / len(pairs) if pairs else None,
        "screen_passed_full_failed": sum(s <= 0 < f for s, f in zip(screen, full, strict=True)),
        "screen_failed_full_passed": sum(f <= 0 < s for s, f in zip(screen, full, strict=True)),
    }


def search(
    candidates: list[Candidate],
    *,
    utility: Callable[[Candidate], float],
    screen: Callable[[Candidate], Scores],
    full: Callable[[Candidate], Scores],
    limits: Scores,
    max_full_gates: int,
    base: Scores | None = None,
    map_units: Callable[[Callable[[Candidate], Any], list[Candidate]], list[Any]] | None = None,
) -> SearchResult:
    """Score every candidate, then run the full gate on the most useful ones whose calibrated screen
    passes, in order, and once none is left, on the ones whose calibrated screen comes closest to
    passing, until one passes (at most `max_full_gates` full runs in all). Candidates with the same
    masks are scored and gated once. `base`: each score's blind-guess level (default 0), see the module doc.
    `map_units(fn, candidates)`: how the candidates' scores are computed (desensitize.runtime.compute's
    Executor.map spreads them over a cluster; default one after another, here).
    Raises SearchFailed naming the closest candidate when none passes."""
    if not candidates:
        raise DesensitizeError("the mask search has no candidates")
    done: dict[bytes, Candidate] = {}
    for c in candidates:
        done.setdefault(c.masks.tobytes(), c)

    def scores(c: Candidate) -> tuple[float, Scores]:
        return float(utility(c)), {s: float(v) for s, v in screen(c).items() if s in limits}

    unscored = [c for c in done.values() if c.utility is None or c.screen is None]  # others came scored
    for c, (u, screened) in zip(unscored, (map_units or _in_order)(scores, unscored), strict=True):
        c.utility, c.screen = u, screened
        log.info("search candidate %s: utility %.4f, screen %s", c.name, c.utility, _fmt(c.screen))
    for c in candidates:  # a candidate with the same masks as an earlier one shares its scores
        first = done[c.masks.tobytes()]
        c.utility, c.screen = first.utility, first.screen
    base = {s: (base or {}).get(s, 0.0) for s in limits}
    strength = dict.fromkeys(limits, 1.0)

    def predicted(c: Candidate) -> Scores:
        return calibrated(c.screen, strength, base)

    waiting = sorted(done.values(), key=lambda c: -c.utility)  # one per mask; ties: the first given
    runs, chosen = 0, None
    while waiting and runs < max_full_gates:
        margin = {id(c): excess(predicted(c), limits) for c in waiting}
        fits = [c for c in waiting if margin[id(c)] <= 0]
        c = fits[0] if fits else min(waiting, key=lambda c: margin[id(c)])  # min: the most useful of ties
        waiting.remove(c)
        runs += 1
        c.predicted = predicted(c)
        c.full = {s: float(v) for s, v in full(c).items() if s in limits}
        c.passed = excess(c.full, limits) <= 0
        log.info(
            "search candidate %s (%s): full gate %s (%s)",
            c.name,
            "the most useful the screen passes" if fits else "none left that the screen passes: the closest",
            "passed" if c.passed else "failed",
            _fmt(c.full),
        )
        if c.passed:
            chosen = c
            break
        for s in limits:  # a screen at or under the blind level says nothing about the factor
            if c.screen[s] - base[s] > MIN_SIGNAL * max(abs(limits[s] - base[s]), 1e-6):
                strength[s] = max(strength[s], (c.full[s] - base[s]) / (c.screen[s] - base[s]))
    result = SearchResult(chosen, candidates, limits, strength, base, agreement(candidates, limits))
    if chosen is None:
        raise SearchFailed(result)
    return result


def _in_order(fn: Callable[[Candidate], Any], candidates: list[Candidate]) -> list[Any]:
    return [fn(c) for c in candidates]


class SearchFailed(DesensitizeError):
    """No candidate passed; `result.chosen` is None and the message names the closest candidate."""

    def __init__(self, result: SearchResult) -> None:
        self.result = result
        super().__init__(_failure(result))


def closest(candidates: list[Candidate], limits: Scores) -> Candidate:
    """The candidate the full gate put nearest to passing (the search always runs it at least once)."""
    return min((c for c in candidates if c.full is not None), key=lambda c: excess(c.full, limits))


def _failure(result: SearchResult) -> str:
    c = closest(result.candidates, result.limits)
    missed = "; ".join(f"{s} {c.full[s]:.4g} > {limit:.4g}" for s, limit in result.limits.items() if c.full[s] > limit)
    ran = sum(x.full is not None for x in result.candidates)
    return (
        f"no mask candidate passes the privacy gate ({len(result.candidates)} candidates, {ran} through the full "
        f"gate); closest: {c.name} (utility {c.utility:.4f}), by the full gate: {missed}. Widen masks.search "
        "(higher hidden_ratios, other cells or templates), raise masks.search.max_full_gates, or relax "
        "attack.thresholds"
    )


def _fmt(scores: Scores) -> str:
    return ", ".join(f"{s} {v:.4g}" for s, v in scores.items())
