"""The privacy gate's rules, in one place: which scores it judges, each threshold in its score's units,
the value each score is judged at, the verdict and its message. The attack stage, the mask search, the
sweep, the records, the cards and the run summary all read the gate through this module.

A score is judged at the upper end of its confidence interval, so a sample too small to show privacy
fails safe; for the learned attacker, where the score still grows with the attacker's data, plus what
a log-linear fit of its data-scaling curve projects up to `attack.assumed_attacker_images`. The gate
passes only if every attacker stays at or under every threshold with the value it is judged at.
"""

from __future__ import annotations

from typing import Any

from desensitize.config import AttackParams, GateThresholds
from desensitize.stats import extrapolate, saturation

GATED = ("psnr_gain", "linkage_within_class", "recognition_recovery")
Scores = dict[str, float]  # gated score -> value (judged, screened or predicted)


def limits(thresholds: GateThresholds, linkage_chance: float) -> Scores:
    """Each gated score's threshold in the score's own units (linkage: a multiple of its chance level)."""
    return {
        "psnr_gain": thresholds.max_psnr_gain,
        "linkage_within_class": thresholds.max_linkage_x_chance * linkage_chance,
        "recognition_recovery": thresholds.max_recognition_recovery,
    }


def _unit(limit: float) -> float:
    return max(abs(limit), 1e-6)


def upper_ends(scores: dict[str, Any]) -> Scores:
    """What an attacker's scores are judged at before any projection: the upper end of each interval."""
    return {s: scores[f"{s}_interval"][1] for s in GATED}


def judge_scaling(scores: dict[str, Any], curve: dict[str, Any], bounds: Scores, cfg: AttackParams) -> None:
    """Fit every gated score of the learned attacker's data-scaling curve (`curve["points"]`, each with its
    training images and scores); where a score still grows by more than `attack.saturation_tolerance` of
    its threshold per doubling of the data, judge it at the upper end of its interval plus what the
    log-linear fit adds up to the assumed attacker budget. Records the fits in `curve`, the judged
    values in `scores["judged"]`."""
    points = curve["points"]
    counts = [point["images"] for point in points]
    curve["assumed_attacker_images"] = cfg.assumed_attacker_images
    curve["fits"] = {}
    if len(set(counts)) < 2:  # too few images to draw shares from: judged as measured
        return
    for s in GATED:
        values = [point["scores"][s] for point in points]
        fit = saturation(counts, values)
        flat = fit["slope_per_doubling"] <= cfg.saturation_tolerance * _unit(bounds[s])
        projected = extrapolate(counts, values, cfg.assumed_attacker_images)
        added = 0.0 if flat else max(0.0, projected - values[-1])
        curve["fits"][s] = {**fit, "flat": flat, "projected": projected, "added": added}
        value = scores[f"{s}_interval"][1] + added
        scores["judged"][s] = value if s == "psnr_gain" else min(value, 1.0)  # shares cannot pass 1


def strongest(attackers: dict[str, dict[str, Any]], bounds: Scores) -> str:
    """The attacker that comes nearest to (or furthest past) a threshold, in units of each threshold."""
    return max(attackers, key=lambda name: max(attackers[name]["judged"][s] / _unit(bounds[s]) for s in GATED))


def judged(result: dict[str, Any]) -> Scores:
    """Each gated score at its worst over the attackers of a suite's result or the attack stage's
    report: what the gate compares with each threshold."""
    return {s: max(scores["judged"][s] for scores in result["attackers"].values()) for s in GATED}


def excess(scores: Scores, bounds: Scores) -> float:
    """How far scores are from passing, in units of each limit: the largest (value - limit) / |limit|
    over the gated scores; <= 0 passes."""
    return max((scores[s] - limit) / _unit(limit) for s, limit in bounds.items())


def check(attackers: dict[str, dict[str, Any]], bounds: Scores) -> dict[str, Any]:
    """Passes only if every attacker stays at or under every limit with the value it is judged at.
    `bounds`: gated score -> threshold in its units."""
    violations = [
        {
            "attacker": name,
            "score": score,
            "value": scores["judged"][score],
            "point": scores[score],
            "interval": list(scores[f"{score}_interval"]),
            "threshold": limit,
        }
        for name, scores in attackers.items()
        for score, limit in bounds.items()
        if scores["judged"][score] > limit
    ]
    return {"passed": not violations, "limits": bounds, "violations": violations}


def verdict(result: dict[str, Any], *, enforce: bool, budget: int, reference: dict[str, Any]) -> dict[str, Any]:
    """The gate on a suite's `result`: `check` with whether it is enforced, overridden, and its message.
    `budget`: attack.assumed_attacker_images; `reference`: desensitize.stats.above_chance of the
    reference model on raw test images (recognition recovery means something only if it is above)."""
    out = check(result["attackers"], result["limits"])
    out.update(enforced=enforce, overridden=not out["passed"] and not enforce)
    out["message"] = _message(out, result, budget, reference)
    return out


def _violation(v: dict[str, Any], result: dict[str, Any], budget: int) -> str:
    lo, hi = v["interval"]
    text = f"{v['attacker']} {v['score']} {v['point']:.4g} (interval {lo:.4g} to {hi:.4g}"
    fits = ((result["learned"] or {}).get("scaling") or {}).get("fits") or {}
    added = fits.get(v["score"], {}).get("added", 0.0) if v["attacker"] == "learned" else 0.0
    if added:
        text += f"; +{added:.4g} projected to {budget} attacker images"
    text += f") > {v['threshold']:.4g}"
    if v["score"] == "linkage_within_class":
        text += f" ({v['threshold'] / result['linkage_within_class_chance']:g}x within-class chance)"
    return text


def weak_reference(reference: dict[str, Any]) -> str:
    """What a reference model not clearly above chance means for the gate; empty when it is above."""
    if reference["above"]:
        return ""
    return (
        f"; the reference model is too weak for recognition recovery to mean anything: its raw test "
        f"{reference['message']}"
    )


def _message(out: dict[str, Any], result: dict[str, Any], budget: int, reference: dict[str, Any]) -> str:
    if out["passed"]:
        return (
            "privacy gate passed: every attacker stays under every threshold, upper interval ends included"
            + weak_reference(reference)
        )
    broken = "; ".join(_violation(v, result, budget) for v in out["violations"])
    tail = (
        "overridden by attack.enforce: false, the pipeline goes on"
        if out["overridden"]
        else "release blocked; hide more (masks.*) or set attack.enforce: false to record the failure and go on"
    )
    return f"privacy gate FAILED: {broken} ({tail}){weak_reference(reference)}"
