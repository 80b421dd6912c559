"""The sweep's frontier: the privacy-utility trade-off read off its rows.

Accuracy at matched privacy (`accuracy_at_privacy`, `matched_privacy`: each family's accuracy read off
its frontier at the gate's limits, per seed), `summary.md` (per point mean +- std over seeds, accuracy at
matched privacy, the searched points) and `frontier.png` (accuracy of plain and masknet against the best
attacker's within-class linkage and PSNR gain, mean +- std over seeds, with the gate's limits).
"""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from desensitize.orchestration.sweep_plan import SEARCHED
from desensitize.paths import MODELS as ACCURACY
from desensitize.reporting.figures import Panel, Series, errorbar_panels

PRIVACY = ("psnr_gain", "linkage_within_class", "hidden_information")
# The frontier's privacy axes (lower = more private): score -> label. Each is the best attacker's
# point estimate; its gate limit is in the row as `<score>_limit`.
AXES = {"linkage_within_class": "within-class linkage", "psnr_gain": "PSNR gain (dB)"}
MATCHED = ("plain", "masknet")  # the models compared at matched privacy


def accuracy_at_privacy(points: list[tuple[float, float]], level: float) -> float | None:
    """Accuracy at privacy score `level` along the frontier of `points`, (privacy score, accuracy)
    pairs of one family and seed over ratios and cells; a lower score is more private.

    The frontier is the upper envelope: for each privacy value, the best accuracy among the points at
    or below it (the most accurate point that is at least that private). Its corners are the points
    sorted by privacy score whose accuracy is higher than that of every point with a lower score (of
    several points at one score, the most accurate); a point that another point at least as private
    matches or beats (a dominated point) is not a corner and plays no part. Then:
    - `level` below every point's score: None (nothing that private was measured);
    - `level` at or above the score of the envelope's last point (the most accurate point of all):
      that best accuracy (no extrapolation);
    - otherwise the linear interpolation between the two neighbouring corners (p0, a0), (p1, a1) with
      p0 <= level < p1: a0 + (a1 - a0) * (level - p0) / (p1 - p0), exactly a0 when level hits p0.
    No points: None."""
    envelope: list[tuple[float, float]] = []
    for score, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not envelope or accuracy > envelope[-1][1]:
            envelope.append((score, accuracy))
    if not envelope or level < envelope[0][0]:
        return None
    if level >= envelope[-1][0]:
        return envelope[-1][1]
    for (p0, a0), (p1, a1) in pairwise(envelope):
        if p0 <= level < p1:
            return a0 + (a1 - a0) * (level - p0) / (p1 - p0)
    raise AssertionError("unreachable: level lies within the envelope")


def _number(value: Any) -> float | None:
    """A row value as a float; None where empty (a failed point, or read back from results.csv)."""
    if value is None or value == "":
        return None
    return float(value)


def _limit(rows: list[dict[str, Any]], score: str) -> float | None:
    """The gate's limit of `score` the rows recorded (the strictest, should they differ); None if none did."""
    return min((v for v in (_number(r[f"{score}_limit"]) for r in rows) if v is not None), default=None)


def _mean_std(values: list[float | None], digits: int = 4) -> str:
    """Mean ± sample std of the values there are; `(k of n)` when some are missing, — when none are."""
    present = np.array([v for v in values if v is not None], dtype=float)
    if len(present) == 0:
        return "—"
    text = f"{present.mean():.{digits}f}"
    if len(present) > 1:
        text += f" ± {present.std(ddof=1):.{digits}f}"
    if len(present) < len(values):
        text += f" ({len(present)} of {len(values)} seeds)"
    return text


def matched_privacy(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, list[float | None]]]:
    """(scope, family, model) -> score -> per seed (in seed order), the accuracy at the gate's limit
    of that score: accuracy_at_privacy over the family's fixed points of that seed at the limit they
    recorded (the strictest, should they differ). Fixed-point families only; rows without the score
    (no attack, or a failed point) are left out."""
    frontiers: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    seeds = sorted({row["seed"] for row in rows})
    for row in rows:
        if row["family"] != SEARCHED:
            frontiers[(row["scope"], row["family"])][row["seed"]].append(row)
    table = {}
    for (scope, family), by_seed in frontiers.items():
        for model in MATCHED:
            cells: dict[str, list[float | None]] = {}
            for score in AXES:
                values = []
                for seed in seeds:
                    members = [
                        r
                        for r in by_seed.get(seed, [])
                        if _number(r[score]) is not None and _number(r[model]) is not None
                    ]
                    level = _limit(members, score)
                    points = [(_number(r[score]), _number(r[model])) for r in members]
                    values.append(None if level is None else accuracy_at_privacy(points, level))
                cells[score] = values
            table[(scope, family, model)] = cells
    return table


def summary(rows: list[dict[str, Any]], attack: bool) -> str:
    """summary.md: the fixed points, accuracy at matched privacy, the searched points."""
    fixed = [r for r in rows if r["family"] != SEARCHED]
    searched = [r for r in rows if r["family"] == SEARCHED]
    lines = [
        "# Sweep summary",
        "",
        "Mean ± sample standard deviation over seeds (a single value where one seed ran; `(k of n seeds)` "
        "where only k had a value; — where none had).",
    ]
    if fixed:
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for row in fixed:
            groups[(row["scope"], row["family"], row["cell"], row["hidden_ratio"])].append(row)
        columns = [*ACCURACY, "masknet - plain", *(PRIVACY if attack else ())]
        lines += [
            "",
            "## Fixed points",
            "",
            "Privacy not constrained (`masks.privacy: none`); the best attacker's point estimates.",
            "",
            "| scope | family | cell | hidden ratio | seeds | " + " | ".join(columns) + " |",
            "|---|---|---|---|---|" + "---|" * len(columns),
        ]
        for (scope, family, cell, ratio), members in groups.items():
            cells = []
            for column in columns:
                if column == "masknet - plain":
                    values = [_difference(m["masknet"], m["plain"]) for m in members]
                else:
                    values = [_number(m[column]) for m in members]
                cells.append(_mean_std(values))
            lines.append(f"| {scope} | {family} | {cell} | {ratio:g} | {len(members)} | " + " | ".join(cells) + " |")
    if attack and fixed:
        seeds = sorted({r["seed"] for r in rows})
        limits = {score: [_limit([r for r in rows if r["seed"] == seed], score) for seed in seeds] for score in AXES}
        lines += [
            "",
            "## Accuracy at matched privacy",
            "",
            "Per seed, each family's test accuracy read off its frontier over hidden ratios and cells at the "
            "privacy gate's limit (within-class linkage limit "
            f"{_mean_std(limits['linkage_within_class'])}, PSNR-gain limit {_mean_std(limits['psnr_gain'])} dB): "
            "the most accurate point at least that private, linearly interpolated between frontier points, "
            "never extrapolated (`frontier.accuracy_at_privacy`); then mean ± std over seeds; — where no point was "
            "that private. Scores are the best attacker's point estimates; the gate judges the upper ends of "
            "their intervals. The searched point reports its own accuracy and how many seeds passed the gate.",
            "",
            "| scope | family | model | at the within-class linkage limit | at the PSNR-gain limit |",
            "|---|---|---|---|---|",
        ]
        for (scope, family, model), cells in matched_privacy(rows).items():
            lines.append(
                f"| {scope} | {family} | {model} | " + " | ".join(_mean_std(cells[score]) for score in AXES) + " |"
            )
        for scope in dict.fromkeys(r["scope"] for r in searched):
            members = [r for r in searched if r["scope"] == scope]
            passed = sum(r["gate_passed"] is True for r in members)
            for model in MATCHED:
                own = _mean_std([_number(r[model]) for r in members])
                cell = f"{own}, own point; gate passed {passed} of {len(members)} seeds"
                lines.append(f"| {scope} | {SEARCHED} | {model} | {cell} | {cell} |")
    if searched:
        lines += [
            "",
            "## Searched points",
            "",
            "`masks.template: search`, `masks.privacy: gate`: the search picks template, cell and hidden ratio "
            "and releases only a candidate that passes the privacy gate.",
            "",
            "| seed | scope | gate passed | template | cell | hidden ratio | plain | masknet | "
            + " | ".join(AXES)
            + " | failure |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in searched:
            values = [r["seed"], r["scope"], r["gate_passed"], r["template"], r["cell"]]
            values += [_fmt(r[k]) for k in ("released_hidden_ratio", "plain", "masknet", *AXES)]
            values.append(r["failure"] or "")
            lines.append("| " + " | ".join("—" if v is None else str(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def _difference(a: Any, b: Any) -> float | None:
    a, b = _number(a), _number(b)
    return None if a is None or b is None else a - b


def _fmt(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.4f}"


def figure(out: Path, rows: list[dict[str, Any]]) -> None:
    """frontier.png: per privacy axis, test accuracy of plain and masknet against the best attacker's
    score; one series per (scope,) family and model, each point the mean over seeds with std error bars
    on both axes; the gate's limit as a dashed vertical line."""
    scopes = list(dict.fromkeys(r["scope"] for r in rows))
    families = list(dict.fromkeys((r["scope"], r["family"]) for r in rows))
    panels = []
    for score, label in AXES.items():
        series = []
        for k, (scope, family) in enumerate(families):
            groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
            for r in rows:
                if (r["scope"], r["family"]) == (scope, family) and _number(r[score]) is not None:
                    groups[(r["cell"], r["hidden_ratio"]) if family != SEARCHED else ()].append(r)
            if not groups:
                continue
            for model in MATCHED:
                x, xerr, y, yerr = zip(*(_stats(members, score, model) for members in groups.values()), strict=True)
                series.append(
                    Series(
                        f"{model}, {family}" + (f" ({scope})" if len(scopes) > 1 else ""),
                        x,
                        y,
                        xerr,
                        yerr,
                        color=k,
                        filled=model == "plain",
                        large=family == SEARCHED,
                    )
                )
        limit = [v for v in (_number(r[f"{score}_limit"]) for r in rows) if v is not None]
        panels.append(Panel(series, f"best attacker's {label} (lower = more private)", "test accuracy", limit))
    errorbar_panels(
        panels, out / "frontier.png", "privacy-utility frontier: mean ± std over seeds per point (hidden ratio x cell)"
    )


def _stats(members: list[dict[str, Any]], score: str, model: str) -> tuple[float, float, float, float]:
    """(x mean, x std, y mean, y std) over seeds; std 0 for a single seed."""
    pairs = np.array([(_number(m[score]), _number(m[model])) for m in members], dtype=float)
    std = pairs.std(axis=0, ddof=1) if len(pairs) > 1 else np.zeros(2)
    return pairs[:, 0].mean(), std[0], pairs[:, 1].mean(), std[1]
