"""The privacy-constrained mask search (desensitize.search.gated) on hand-made candidates and scores."""

from __future__ import annotations

import numpy as np
import pytest

from desensitize.attack.gate import excess
from desensitize.search.gated import Candidate, SearchFailed, agreement, search

LIMITS = {"psnr_gain": 1.0, "linkage_within_class": 0.15}


def _candidates(n: int) -> list[Candidate]:
    return [Candidate(f"c{i}", {"index": i}, np.full((2, 2), i, dtype=np.uint8)) for i in range(n)]


def _scores(gain: float, linkage: float) -> dict[str, float]:
    return {"psnr_gain": gain, "linkage_within_class": linkage}


def _run(utility, screen, full, n, **kwargs):
    calls = {"utility": [], "screen": [], "full": []}

    def record(kind, table):
        def score(c: Candidate):
            calls[kind].append(c.name)
            return table[c.name]

        return score

    result = search(
        _candidates(n),
        utility=record("utility", utility),
        screen=record("screen", screen),
        full=record("full", full),
        limits=LIMITS,
        max_full_gates=kwargs.pop("max_full_gates", 10),
    )
    return result, calls


def test_the_search_releases_the_most_useful_candidate_that_passes_the_full_gate():
    # c0 is the most useful but fails the screen; c1 passes the screen and fails the full gate; c2 is
    # the only one both passing and more useful than c3, which also passes.
    utility = {"c0": 0.95, "c1": 0.9, "c2": 0.8, "c3": 0.7}
    screen = {
        "c0": _scores(2.0, 0.1),
        "c1": _scores(0.1, 0.10),
        "c2": _scores(0.1, 0.05),
        "c3": _scores(0.1, 0.05),
    }
    full = {"c1": _scores(0.5, 0.3), "c2": _scores(0.5, 0.1), "c3": _scores(0.2, 0.06)}
    result, calls = _run(utility, screen, full, 4)
    assert result.chosen.name == "c2"
    assert calls["full"] == ["c1", "c2"]  # c0 never reaches the full gate; the search stops at c2
    assert calls["utility"] == calls["screen"] == ["c0", "c1", "c2", "c3"]  # every candidate is scored
    record = result.record()
    assert record["chosen"] == "c2"
    assert [c["passed"] for c in record["candidates"]] == [None, False, True, None]
    assert record["candidates"][0]["utility"] == 0.95 and record["candidates"][0]["screen"] == screen["c0"]


def test_a_full_gate_failure_makes_the_screen_stricter_for_the_rest():
    # c0's full run reads linkage 3x what its screen did; c1's screen (0.06 -> 0.18 > 0.15) then fails
    # without a full run, c2's (0.04 -> 0.12) passes. PSNR gain screens at 0 carry no factor.
    utility = {"c0": 0.9, "c1": 0.8, "c2": 0.7}
    screen = {"c0": _scores(0.0, 0.1), "c1": _scores(0.0, 0.06), "c2": _scores(0.0, 0.04)}
    full = {"c0": _scores(0.5, 0.3), "c1": _scores(0.0, 0.14), "c2": _scores(0.0, 0.1)}
    result, calls = _run(utility, screen, full, 3)
    assert calls["full"] == ["c0", "c2"]
    assert result.chosen.name == "c2"
    assert result.calibration == pytest.approx({"psnr_gain": 1.0, "linkage_within_class": 3.0})


def test_the_screen_is_calibrated_above_the_blind_level():
    # With linkage chance 0.05 as the base, c0 (screen 0.1, full 0.3) gives a factor of 5 on what the screen
    # reads above chance: c1's 0.068 predicts 0.14 (passes, gated), where a factor on the raw value would not.
    utility = {"c0": 0.9, "c1": 0.8}
    screen = {"c0": _scores(0.0, 0.1), "c1": _scores(0.0, 0.068)}
    full = {"c0": _scores(0.0, 0.3), "c1": _scores(0.0, 0.12)}
    result = search(
        _candidates(2),
        utility=lambda c: utility[c.name],
        screen=lambda c: screen[c.name],
        full=lambda c: full[c.name],
        limits=LIMITS,
        max_full_gates=5,
        base={"linkage_within_class": 0.05},
    )
    assert result.chosen.name == "c1"
    assert result.calibration["linkage_within_class"] == pytest.approx(5.0)


def test_candidates_with_the_same_mask_are_scored_and_gated_once():
    candidates = _candidates(2)
    candidates.append(Candidate("same as c0", {}, candidates[0].masks.copy()))
    seen = []

    def utility(c: Candidate) -> float:
        seen.append(c.name)
        return {"c0": 0.9, "c1": 0.5}[c.name]

    result = search(
        candidates,
        utility=utility,
        screen=lambda c: _scores(0.0, 0.0),
        full=lambda c: _scores(0.0, 0.3 if c.name == "c0" else 0.0),
        limits=LIMITS,
        max_full_gates=5,
    )
    assert seen == ["c0", "c1"]
    assert candidates[2].utility == 0.9 and candidates[2].passed is None  # not gated a second time
    assert result.chosen.name == "c1"


def test_when_no_candidate_passes_the_search_fails_naming_the_closest():
    utility = {"c0": 0.9, "c1": 0.8, "c2": 0.7}
    screen = {name: _scores(0.0, 0.0) for name in utility}
    full = {"c0": _scores(3.0, 0.5), "c1": _scores(0.5, 0.2), "c2": _scores(0.2, 0.4)}
    with pytest.raises(SearchFailed) as failed:
        _run(utility, screen, full, 3)
    message = str(failed.value)
    assert "closest: c1 (utility 0.8000), by the full gate: linkage_within_class 0.2 > 0.15" in message
    assert "psnr_gain" not in message.split("closest:")[1].split("Widen")[0]  # only the scores it missed
    assert failed.value.result.chosen is None and failed.value.result.record()["chosen"] is None


def test_the_full_gate_budget_bounds_the_work():
    utility = {"c0": 0.9, "c1": 0.8, "c2": 0.7}
    screen = {name: _scores(0.0, 0.0) for name in utility}
    full = {name: _scores(0.0, 0.9) for name in utility}
    with pytest.raises(SearchFailed, match=r"3 candidates, 1 through the full gate"):
        _run(utility, screen, full, 3, max_full_gates=1)


def test_once_the_screen_passes_nothing_left_the_budget_goes_to_the_closest_first():
    # c0 passes the screen and fails the full gate (linkage factor 3 from then on: c1's 0.1 predicts 0.3,
    # c2's 0.06 predicts 0.18); no candidate the calibrated screen passes is left, so the rest of the budget
    # goes to the closest by the calibrated screen: c2 (predicted excess 0.2) before c1 (1.0), whatever
    # their utility. c2 passes and is the release.
    utility = {"c0": 0.9, "c1": 0.8, "c2": 0.7, "c3": 0.6}
    screen = {"c0": _scores(0.0, 0.1), "c1": _scores(0.0, 0.1), "c2": _scores(0.0, 0.06), "c3": _scores(9.0, 0.5)}
    full = {"c0": _scores(0.0, 0.3), "c1": _scores(0.0, 0.3), "c2": _scores(0.0, 0.12), "c3": _scores(0.0, 0.0)}
    result, calls = _run(utility, screen, full, 4, max_full_gates=2)
    assert calls["full"] == ["c0", "c2"]
    assert result.chosen.name == "c2"
    record = {c["name"]: c for c in result.record()["candidates"]}
    assert record["c2"]["predicted"] == pytest.approx(_scores(0.0, 0.18))  # what the screen said when it ran
    assert record["c0"]["predicted"] == screen["c0"] and record["c1"]["predicted"] is None
    # The budget spent without a pass: the failure names the closest by the full gate.
    full["c2"] = _scores(0.0, 0.2)
    with pytest.raises(SearchFailed, match=r"2 through the full gate\); closest: c2 .*linkage_within_class 0.2 > 0.15"):
        _run(utility, screen, full, 4, max_full_gates=2)


def test_excess_and_agreement():
    assert excess(_scores(1.0, 0.15), LIMITS) == pytest.approx(0.0)
    assert excess(_scores(0.5, 0.30), LIMITS) == pytest.approx(1.0)  # linkage twice its limit
    candidates = _candidates(4)
    screen = [_scores(0.1, 0.05), _scores(0.2, 0.10), _scores(0.3, 0.14), _scores(0.9, 0.2)]
    full = [_scores(0.2, 0.10), _scores(0.3, 0.20), _scores(0.4, 0.30), _scores(0.5, 0.40)]
    for c, s, f in zip(candidates, screen, full, strict=True):
        c.screen, c.full = s, f
    result = agreement(candidates, LIMITS)
    assert result["candidates"] == 4 and result["spearman"] == pytest.approx(1.0)
    assert result["pairs_ordered_alike"] == 1.0
    assert result["screen_passed_full_failed"] == 2  # c1 and c2: screen under both limits, full over
    assert result["screen_failed_full_passed"] == 0
    candidates[3].screen = _scores(0.0, 0.0)  # now ranked most private by the screen, least by the full gate
    assert agreement(candidates, LIMITS)["pairs_ordered_alike"] == pytest.approx(3 / 6)
