"""The privacy-utility frontier: the pipeline's stage functions run over a grid of mask settings.

Every point (seed x scope x hidden ratio x strategy) gets its own workspace under
`<out>/work/`; per seed the raw split and the reference model are made once and shared. Each point
runs masks -> (attack) -> train -> baselines -> evaluate with the gate recorded, not enforced
(the sweep is there to see where it fails). Results: `results.csv` (one row per point),
`summary.md` (mean +- std over seeds) and `frontier.png` (accuracy against privacy).
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from desensitize.config import Params
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

log = logging.getLogger(__name__)
PRIVACY = ("psnr_gain", "linkage_within_class", "hidden_information")


def _point_params(params: Params, seed: int, scope: str, ratio: float, strategy: str) -> Params:
    masks = params.masks.model_copy(update={"scope": scope, "hidden_ratio": ratio, "strategy": strategy})
    attack = params.attack.model_copy(update={"enforce": False})
    return params.model_copy(update={"seed": seed, "masks": masks, "attack": attack})


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.symlink(source.resolve(), target)


def run_sweep(
    params: Params,
    out: Path,
    *,
    seeds: list[int],
    scopes: list[str],
    ratios: list[float],
    strategies: list[str],
    attack: bool,
    device: str = "auto",
) -> list[dict[str, Any]]:
    rows = []
    start = time.perf_counter()
    for seed in seeds:
        base = Paths(out / "work" / f"seed-{seed}")
        seeded = params.model_copy(update={"seed": seed})
        ingest(seeded, base)
        train_reference(seeded, base, device=device)
        for scope, ratio, strategy in itertools.product(scopes, ratios, strategies):
            point = _point_params(params, seed, scope, ratio, strategy)
            paths = Paths(base.root / f"{strategy}-{scope}-{ratio:g}")
            _link(base.raw, paths.raw)
            _link(base.reference_model, paths.reference_model)
            masks = generate_masks(point, paths, device=device)
            row: dict[str, Any] = {
                "seed": seed,
                "scope": scope,
                "hidden_ratio": ratio,
                "strategy": strategy,
                "template": masks["template"],
                "hidden_pixels": masks["hidden_ratio_pixels"],
            }
            if attack:
                result = run_attack(point, paths, device=device)
                best = result["attackers"][result["best_attacker"]]
                row.update(
                    best_attacker=result["best_attacker"],
                    psnr_gain=best["psnr_gain"],
                    linkage_within_class=best["linkage_within_class"],
                    linkage_top1=best["linkage_top1"],
                    hidden_information=result["hidden_information"],
                    gate_passed=result["gate"]["passed"],
                )
            train_on_release(point, paths, device=device)
            train_baselines(point, paths, device=device)
            row.update(evaluate(point, paths, device=device)["accuracy"])
            rows.append(row)
            log.info("sweep point %s: %s", paths.root.name, {k: row[k] for k in ACCURACY})
            _write(out, rows, attack)
    log.info("sweep of %d points took %.0f s", len(rows), time.perf_counter() - start)
    return rows


def _write(out: Path, rows: list[dict[str, Any]], attack: bool) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["scope"], row["hidden_ratio"], row["strategy"])].append(row)
    columns = [*ACCURACY, "masknet - plain", *(PRIVACY if attack else ())]
    lines = [
        "| scope | hidden ratio | strategy | seeds | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    for (scope, ratio, strategy), members in groups.items():
        cells = []
        for column in columns:
            if column == "masknet - plain":
                values = np.array([m["masknet"] - m["plain"] for m in members])
            else:
                values = np.array([m[column] for m in members], dtype=float)
            cells.append(f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if len(values) > 1 else f"{values[0]:.4f}")
        lines.append(f"| {scope} | {ratio:g} | {strategy} | {len(members)} | " + " | ".join(cells) + " |")
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(
            "Mean ± sample standard deviation over seeds (a single value where one seed ran).\n\n"
            + "\n".join(lines)
            + "\n"
        )
    if attack:
        _frontier(out, rows)


def _frontier(out: Path, rows: list[dict[str, Any]]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.8))
    axes = fig.subplots(1, len(PRIVACY))
    markers = {("saliency", "set"): "o", ("saliency", "image"): "s", ("random", "set"): "^", ("random", "image"): "v"}
    for ax, privacy in zip(axes, PRIVACY, strict=True):
        for model, color in (("plain", "tab:blue"), ("masknet", "tab:orange")):
            for (strategy, scope), marker in markers.items():
                pts = [r for r in rows if r["strategy"] == strategy and r["scope"] == scope]
                if pts:
                    ax.scatter(
                        [r[privacy] for r in pts],
                        [r[model] for r in pts],
                        marker=marker,
                        color=color,
                        label=f"{model}, {strategy} {scope}",
                        alpha=0.8,
                    )
                    for r in pts:
                        ax.annotate(f"{r['hidden_ratio']:g}", (r[privacy], r[model]), fontsize=6)
        ax.set_xlabel(
            privacy + (" (lower = more private)" if privacy != "hidden_information" else " (higher = more hidden)"),
            fontsize=8,
        )
        ax.set_ylabel("test accuracy", fontsize=8)
    axes[0].legend(fontsize=6)
    fig.suptitle("privacy-utility frontier (labels: hidden ratio)", fontsize=9)
    with atomic_path(out / "frontier.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
