"""The privacy-utility frontier: the pipeline's stage functions run over a grid of mask settings.

Fixed points: seed x scope x cell x hidden ratio x strategy, and for set-scope saliency also x
template (mean, class_contrast, mean_spread, restorability; random masks and image-scope saliency
have no template and are not multiplied by them). They run with `masks.privacy = none`: the mask
asked for is released whatever its privacy, and the attack stage only records it. With `searched`,
each seed and scope also gets one point with `masks.template = search` and `masks.privacy = gate`:
the search picks template, cell and hidden ratio itself and releases only a candidate that passes
the privacy gate; when none does (the masks stage raises), the row records the failure and no
accuracies, and the sweep goes on.

Every point gets its own workspace under `<out>/work/`; per seed the raw split and the reference
model are made once and shared. Each point runs masks -> (attack) -> train -> baselines -> evaluate
with the attack stage's gate recorded, not enforced (the sweep is there to see where it fails).
Results: `results.csv` (one row per point, columns COLUMNS), `summary.md` (per point mean +- std over
seeds; accuracy at matched privacy, i.e. read off each family's frontier at the gate's limits per
seed, see accuracy_at_privacy; the searched points) and `frontier.png` (accuracy of plain and masknet
against the best attacker's within-class linkage and PSNR gain, mean +- std over seeds, with the
gate's limits).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from desensitize.compute import Units, executor
from desensitize.config import Params, parse_params
from desensitize.errors import DesensitizeError
from desensitize.paths import MODELS as ACCURACY
from desensitize.paths import Paths
from desensitize.stages.attack import run_attack
from desensitize.stages.baselines import train_baselines
from desensitize.stages.evaluate import evaluate
from desensitize.stages.ingest import ingest
from desensitize.stages.masks import generate_masks
from desensitize.stages.reference import train_reference
from desensitize.stages.train import train_on_release
from desensitize.storage import atomic_path
from desensitize.tracking import log_sweep_point, sweep_run
from desensitize.training import best_device

log = logging.getLogger(__name__)
PRIVACY = ("psnr_gain", "linkage_within_class", "hidden_information")
# The frontier's privacy axes (lower = more private): score -> label. Each is the best attacker's
# point estimate; its gate limit is in the row as `<score>_limit`.
AXES = {"linkage_within_class": "within-class linkage", "psnr_gain": "PSNR gain (dB)"}
MATCHED = ("plain", "masknet")  # the models compared at matched privacy
SEARCHED = "saliency/search"
COLUMNS = (
    "seed",
    "scope",
    "family",  # saliency/<template>, saliency/per-image (image scope), saliency/search, random, ...
    "strategy",
    "template",  # the template released (set-scope saliency), else empty
    "cell",  # released
    "hidden_ratio",  # requested (empty for the searched point: the search picks it)
    "released_hidden_ratio",  # hidden cells / cells of the released mask
    "hidden_pixels",
    "gate_passed",
    "failure",  # searched point: why no candidate was released
    "best_attacker",
    "psnr_gain",
    "psnr_gain_judged",
    "psnr_gain_limit",
    "linkage_within_class",
    "linkage_within_class_judged",
    "linkage_within_class_limit",
    "linkage_within_class_chance",
    "linkage_top1",
    "hidden_information",
    *ACCURACY,
)


@dataclass(frozen=True)
class Point:
    """One fixed point of the grid (for every seed)."""

    scope: str
    family: str
    strategy: str
    template: str  # masks.template; "mean" where the mask has no template (it is then unused)
    cell: int
    hidden_ratio: float

    @property
    def name(self) -> str:
        return f"{self.family.replace('/', '-')}-{self.scope}-c{self.cell}-{self.hidden_ratio:g}"


def grid(
    scopes: list[str], cells: list[int], ratios: list[float], strategies: list[str], templates: list[str]
) -> list[Point]:
    """The fixed points: scope x cell x ratio x strategy, set-scope saliency also x template."""
    points = []
    for scope in scopes:
        for cell in cells:
            for ratio in ratios:
                for strategy in strategies:
                    if strategy == "saliency" and scope == "set":
                        points += [Point(scope, f"saliency/{t}", strategy, t, cell, ratio) for t in templates]
                    else:
                        family = "saliency/per-image" if strategy == "saliency" else strategy
                        points.append(Point(scope, family, strategy, "mean", cell, ratio))
    return points


def _fixed_params(params: Params, seed: int, point: Point) -> Params:
    masks = params.masks.model_copy(
        update={
            "scope": point.scope,
            "hidden_ratio": point.hidden_ratio,
            "cell": point.cell,
            "strategy": point.strategy,
            "template": point.template,
            "privacy": "none",
        }
    )
    attack = params.attack.model_copy(update={"enforce": False})
    return params.model_copy(update={"seed": seed, "masks": masks, "attack": attack})


def _searched_params(params: Params, seed: int, scope: str) -> Params:
    search = params.masks.search.model_copy(update={"scopes": [scope]})
    masks = params.masks.model_copy(
        update={"scope": scope, "strategy": "saliency", "template": "search", "privacy": "gate", "search": search}
    )
    attack = params.attack.model_copy(update={"enforce": False})
    return params.model_copy(update={"seed": seed, "masks": masks, "attack": attack})


def check_axes(
    *, scopes: list[str], ratios: list[float], cells: list[int], strategies: list[str], templates: list[str]
) -> None:
    """Every value of every axis through the params model, before any work; errors name the CLI option."""
    axes = {
        ("--scopes", "scope"): scopes,
        ("--ratios", "hidden_ratio"): ratios,
        ("--cells", "cell"): cells,
        ("--strategies", "strategy"): strategies,
        ("--templates", "template"): templates,
    }
    for (origin, key), values in axes.items():
        if not values:
            raise DesensitizeError(f"{origin}: give at least one value")
        for value in values:
            parse_params({"masks": {key: value}}, origin=origin)
    if "search" in templates:
        raise DesensitizeError("--templates: search is not a fixed template; the searched point is --searched")


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.symlink(source.resolve(), target)


@dataclass(frozen=True)
class Run:
    """One unit of the sweep: a point at one seed (`point` None: the searched point), in its own workspace."""

    name: str
    params: Params
    point: Point | None


def plan(
    params: Params,
    *,
    seeds: list[int],
    scopes: list[str],
    ratios: list[float],
    strategies: list[str],
    templates: list[str] | None = None,
    cells: list[int] | None = None,
    searched: bool = True,
) -> list[Run]:
    """Every run of the sweep, seed by seed. `templates` defaults to [params.masks.template] unless that is
    `search` (then mean), `cells` to [params.masks.cell]."""
    if templates is None:
        templates = [params.masks.template if params.masks.template != "search" else "mean"]
    points = grid(scopes, cells or [params.masks.cell], ratios, strategies, templates)
    runs = []
    for seed in seeds:
        runs += [Run(point.name, _fixed_params(params, seed, point), point) for point in points]
        if searched:
            runs += [Run(f"saliency-search-{scope}", _searched_params(params, seed, scope), None) for scope in scopes]
    return runs


def _seed_workspace(out: Path, seed: int) -> Paths:
    return Paths(out.resolve() / "work" / f"seed-{seed}")


def prepare_seed(params: Params, out: Path, device: str, seed: int) -> None:
    """The raw splits and the reference model every run of `seed` shares."""
    seeded, base = params.model_copy(update={"seed": seed}), _seed_workspace(out, seed)
    ingest(seeded, base)
    train_reference(seeded, base, device=device)


def run_point(run: Run, out: Path, attack: bool, device: str) -> dict[str, Any]:
    """One row of results.csv (the seed's workspace must be prepared)."""
    base = _seed_workspace(out, run.params.seed)
    paths = Paths(base.root / run.name)
    _link(base.raw, paths.raw)
    _link(base.reference_model, paths.reference_model)
    return _run_point(run.params, paths, run.point, attack, device)


def run_sweep(
    params: Params,
    out: Path,
    *,
    seeds: list[int],
    scopes: list[str],
    ratios: list[float],
    strategies: list[str],
    templates: list[str] | None = None,
    cells: list[int] | None = None,
    searched: bool = True,
    attack: bool,
    device: str = "auto",
    track: Paths | None = None,
    units: Units | None = None,
) -> list[dict[str, Any]]:
    """Run every point (module docstring) as units: first each seed's shared workspace, then every run.
    The results are rewritten as runs finish (the rows in plan order, those done so far) and returned in
    plan order. `units`: what runs them (default: an Executor on `params.compute`; the Prefect sweep flow
    passes its task runner). `track`: the project whose MLflow store records the sweep, one parent run and
    a child per point."""
    runs = plan(
        params,
        seeds=seeds,
        scopes=scopes,
        ratios=ratios,
        strategies=strategies,
        templates=templates,
        cells=cells,
        searched=searched,
    )
    gpu = best_device(device).type == "cuda"
    rows: list[dict[str, Any] | None] = [None] * len(runs)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        parent = stack.enter_context(sweep_run(track)) if track else None
        ex = units or stack.enter_context(executor(params.compute))

        def done(i: int, row: dict[str, Any]) -> None:
            rows[i] = row
            finished = sum(r is not None for r in rows)
            name, seed = runs[i].name, runs[i].params.seed
            accuracies = {k: row.get(k) for k in ACCURACY}
            log.info("sweep point %s (seed %d), %d of %d: %s", name, seed, finished, len(runs), accuracies)
            _write(out, [r for r in rows if r is not None], attack)
            if parent:
                log_sweep_point(parent, f"{name}-seed-{seed}", runs[i].params, row)

        ex.map(partial(prepare_seed, params, out, device), seeds, gpu=gpu, name="sweep-seed")
        ex.map(partial(run_point, out=out, attack=attack, device=device), runs, gpu=gpu, name="sweep-point", done=done)
    log.info("sweep of %d points took %.0f s", len(runs), time.perf_counter() - start)
    return rows


def _run_point(params: Params, paths: Paths, point: Point | None, attack: bool, device: str) -> dict[str, Any]:
    """One row; `point` None: the searched point of params.masks.scope."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        seed=params.seed,
        scope=params.masks.scope,
        family=point.family if point else SEARCHED,
        strategy=params.masks.strategy,
        hidden_ratio=point.hidden_ratio if point else None,
    )
    try:
        masks = generate_masks(params, paths, device=device)
    except DesensitizeError as exc:
        if point is not None:  # a fixed point has no privacy constraint: any failure is a real error
            raise
        log.warning("sweep: searched point (seed %d, %s scope) released nothing: %s", params.seed, row["scope"], exc)
        row.update(gate_passed=False, failure=" ".join(str(exc).split()))
        return row
    row.update(
        scope=masks.get("scope", row["scope"]),
        template=masks["template"],
        cell=masks["cell"],
        released_hidden_ratio=masks["hidden_ratio"],
        hidden_pixels=masks["hidden_ratio_pixels"],
    )
    if point is None:
        row["gate_passed"] = True  # the masks stage released only a candidate that passed the gate
    if attack:
        result = run_attack(params, paths, device=device)
        best = result["attackers"][result["best_attacker"]]
        limits = result["gate"]["limits"]
        row.update(
            best_attacker=result["best_attacker"],
            gate_passed=result["gate"]["passed"],
            hidden_information=result["hidden_information"],
            linkage_within_class_chance=result["linkage_within_class_chance"],
            linkage_top1=best["linkage_top1"],
        )
        for score in AXES:
            row.update({score: best[score], f"{score}_judged": best["judged"][score], f"{score}_limit": limits[score]})
    train_on_release(params, paths, device=device)
    train_baselines(params, paths, device=device)
    row.update(evaluate(params, paths, device=device)["accuracy"])
    return row


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


def _write(out: Path, rows: list[dict[str, Any]], attack: bool) -> None:
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(summary(rows, attack))
    if attack:
        _frontier(out, rows)


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
            "never extrapolated (`sweep.accuracy_at_privacy`); then mean ± std over seeds; — where no point was "
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


def _frontier(out: Path, rows: list[dict[str, Any]]) -> None:
    """frontier.png: per privacy axis, test accuracy of plain and masknet against the best attacker's
    score; one series per (scope,) family and model, each point the mean over seeds with std error bars
    on both axes; the gate's limit as a dashed vertical line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.6))
    axes = fig.subplots(1, len(AXES))
    scopes = list(dict.fromkeys(r["scope"] for r in rows))
    series = list(dict.fromkeys((r["scope"], r["family"]) for r in rows))
    colors = {key: f"C{i % 10}" for i, key in enumerate(series)}
    markers = {"plain": "o", "masknet": "^"}
    for ax, (score, label) in zip(axes, AXES.items(), strict=True):
        for scope, family in series:
            groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
            for r in rows:
                if (r["scope"], r["family"]) == (scope, family) and _number(r[score]) is not None:
                    point = (r["cell"], r["hidden_ratio"]) if family != SEARCHED else ()
                    groups[point].append(r)
            if not groups:
                continue
            for model, marker in markers.items():
                stats = [_stats(members, score, model) for members in groups.values()]
                x, xerr, y, yerr = (np.array(column) for column in zip(*stats, strict=True))
                ax.errorbar(
                    x,
                    y,
                    xerr=xerr,
                    yerr=yerr,
                    fmt=marker,
                    color=colors[(scope, family)],
                    mfc=colors[(scope, family)] if model == "plain" else "none",
                    markersize=7 if family == SEARCHED else 4,
                    elinewidth=0.6,
                    capsize=1.5,
                    alpha=0.85,
                    label=f"{model}, {family}" + (f" ({scope})" if len(scopes) > 1 else ""),
                )
        limit = [v for v in (_number(r[f"{score}_limit"]) for r in rows) if v is not None]
        if limit:
            ax.axvline(float(np.mean(limit)), color="gray", linestyle="--", linewidth=1, label="gate limit")
        ax.set_xlabel(f"best attacker's {label} (lower = more private)", fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("privacy-utility frontier: mean ± std over seeds per point (hidden ratio x cell)", fontsize=9)
    with atomic_path(out / "frontier.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _stats(members: list[dict[str, Any]], score: str, model: str) -> tuple[float, float, float, float]:
    """(x mean, x std, y mean, y std) over seeds; std 0 for a single seed."""
    pairs = np.array([(_number(m[score]), _number(m[model])) for m in members], dtype=float)
    std = pairs.std(axis=0, ddof=1) if len(pairs) > 1 else np.zeros(2)
    return pairs[:, 0].mean(), std[0], pairs[:, 1].mean(), std[1]
