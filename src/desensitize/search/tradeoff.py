"""The price of each level of privacy: what the search found at the gate's within-class linkage and at
looser levels (masks.search.cellsets.levels), read off every candidate it scored.

At each level (a multiple of within-class chance) the row is the most useful candidate whose
within-class linkage stays at or under the level while its other gated scores stay under the gate's own
limits, judged by the full gate where it ran on the candidate and by the calibrated screen (a
prediction, desensitize.search.gated.calibrated) where it did not. At the gate's level the row is the
release itself: only a full gate admits a candidate there. So the owner sees what a looser threshold
would let the release keep before deciding; the thresholds stay theirs to set in params.yaml.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from desensitize.attack.gate import Scores, excess
from desensitize.reporting.figures import Scatter, ScatterPanel, scatter_panels
from desensitize.search.gated import Candidate, calibrated

LINKAGE = "linkage_within_class"


def judged_or_predicted(c: Candidate, strength: Scores, base: Scores) -> tuple[Scores, str]:
    """A candidate's gated scores and where they come from: the full gate, or the calibrated screen."""
    return (c.full, "full gate") if c.full is not None else (calibrated(c.screen, strength, base), "predicted")


def rows(
    candidates: Sequence[Candidate],
    chosen: Candidate | None,
    limits: Scores,
    *,
    chance: float,
    levels: Sequence[float],
    gate_level: float,
    strength: Scores,
    base: Scores,
) -> list[dict[str, Any]]:
    """One row per level, loosest last: the level (x chance), its linkage limit, and the candidate found
    there (None where none was): its name, utility, gated scores and their basis."""
    out = []
    for level in sorted({gate_level, *levels}):
        bound = {**limits, LINKAGE: level * chance}
        if level == gate_level:
            found = chosen
        else:
            admitted = [c for c in candidates if excess(judged_or_predicted(c, strength, base)[0], bound) <= 0]
            found = max(admitted, key=lambda c: c.utility, default=None)  # ties: the first scored
        row: dict[str, Any] = {"level": level, "linkage_limit": bound[LINKAGE], "gate": level == gate_level}
        if found is None:
            row.update(candidate=None, utility=None, scores=None, basis=None)
        else:
            scores, basis = judged_or_predicted(found, strength, base)
            row.update(candidate=found.name, utility=found.utility, scores=scores, basis=basis)
        out.append(row)
    return out


def cost_sentence(table: Sequence[dict[str, Any]]) -> str:
    """What the release cost, for the model card: its utility at the gate's level beside what each looser
    level would let a release keep."""
    gate_row = next(row for row in table if row["gate"])
    parts = [
        f"at the gate's {gate_row['level']:g}x chance the release keeps a held-out utility of {gate_row['utility']:.3f}"
        if gate_row["utility"] is not None
        else "no release passed the gate"
    ]
    for row in table:
        if row["level"] > gate_row["level"]:
            kept = "nothing found" if row["utility"] is None else f"{row['utility']:.3f} ({row['basis']})"
            parts.append(f"at {row['level']:g}x it would keep {kept}")
    return "; ".join(parts)


AXES = {
    "linkage_within_class": "within-class linkage (x chance)",
    "psnr_gain": "PSNR gain over the blind guess (dB)",
    "recognition_recovery": "recognition recovery",
}


def figure(record: dict[str, Any], *, chance: float, raw_accuracy: float, path: Path) -> None:
    """tradeoff.png: every candidate's held-out utility against each gated score, as the screen read it,
    as the calibrated screen predicts the full gate, and as the full gate judged it where it ran; the
    thresholds (and the trade-off's looser linkage levels), the release, the raw model (the reference on
    raw test images) and a random mask of the release's grid and hidden count."""
    strength, base, limits = record["screen_calibration"], record["screen_base"], record["limits"]
    candidates = record["candidates"]
    panels = []
    for score, label in AXES.items():
        unit = chance if score == LINKAGE else 1.0

        def xs(rows: list[dict[str, Any]], read, unit=unit, score=score) -> list[float]:
            return [read(row)[score] / unit for row in rows]

        full = [c for c in candidates if c["full"] is not None]
        series = [
            Scatter("screen", xs(candidates, lambda c: c["screen"]), [c["utility"] for c in candidates], "o", 5, 7),
            Scatter(
                "calibrated prediction",
                xs(candidates, lambda c: calibrated(c["screen"], strength, base)),
                [c["utility"] for c in candidates],
                "o",
                8,
                0,
            ),
            *(
                Scatter(
                    f"full gate: {verdict}",
                    xs([c for c in full if c["passed"] == passed], lambda c: c["full"]),
                    [c["utility"] for c in full if c["passed"] == passed],
                    "s",
                    30,
                    2 if passed else 3,
                )
                for passed, verdict in ((True, "passed"), (False, "failed"))
            ),
        ]
        released = [c for c in full if c["name"] == record["chosen"]]
        if released:
            series.append(Scatter("released", xs(released, lambda c: c["full"]), [released[0]["utility"]], "*", 160, 1))
        vlines = {"gate threshold": limits[score] / unit}
        if score == LINKAGE:
            vlines |= {f"{row['level']:g}x chance": row["level"] for row in record["tradeoff"] if not row["gate"]}
        hlines = {"raw model (reference, raw test)": raw_accuracy}
        if record.get("random_utility") is not None:
            hlines["random mask, the release's grid and count"] = record["random_utility"]
        panels.append(ScatterPanel(series, label, "held-out utility", vlines, hlines))
    scatter_panels(panels, path, "mask search: utility against privacy for every candidate scored")
