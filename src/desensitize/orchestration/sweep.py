"""The privacy-utility sweep run: the pipeline's stage functions over every run of the plan
(desensitize.orchestration.sweep_plan), as units of desensitize.runtime.compute.

Every point gets its own workspace under `<out>/work/`; per seed the raw split and the reference
model are made once and shared. Each point runs masks -> (attack) -> train -> baselines -> evaluate
with the attack stage's gate recorded, not enforced (the sweep is there to see where it fails).
Results: `results.csv` (one row per point, columns COLUMNS), and what desensitize.orchestration.frontier
makes of the rows: `summary.md` and `frontier.png`.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

from desensitize.config import Params
from desensitize.errors import DesensitizeError
from desensitize.orchestration import frontier
from desensitize.orchestration.pipeline import STAGES
from desensitize.orchestration.sweep_plan import SEARCHED, Point, Run, plan
from desensitize.paths import MODELS as ACCURACY
from desensitize.paths import Paths
from desensitize.runtime.compute import Units, executor
from desensitize.runtime.device import best_device
from desensitize.storage import atomic_path
from desensitize.tracking.runs import log_sweep_point, sweep_run

log = logging.getLogger(__name__)
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


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.symlink(source.resolve(), target)


def _seed_workspace(out: Path, seed: int) -> Paths:
    return Paths(out.resolve() / "work" / f"seed-{seed}")


def prepare_seed(params: Params, out: Path, device: str, seed: int) -> None:
    """The raw splits and the reference model every run of `seed` shares."""
    seeded, base = params.model_copy(update={"seed": seed}), _seed_workspace(out, seed)
    STAGES["ingest"].run(seeded, base)
    STAGES["reference"].run(seeded, base, device)


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
        masks = STAGES["masks"].run(params, paths, device)
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
        result = STAGES["attack"].run(params, paths, device)
        best = result["attackers"][result["best_attacker"]]
        limits = result["gate"]["limits"]
        row.update(
            best_attacker=result["best_attacker"],
            gate_passed=result["gate"]["passed"],
            hidden_information=result["hidden_information"],
            linkage_within_class_chance=result["linkage_within_class_chance"],
            linkage_top1=best["linkage_top1"],
        )
        for score in frontier.AXES:
            row.update({score: best[score], f"{score}_judged": best["judged"][score], f"{score}_limit": limits[score]})
    STAGES["train"].run(params, paths, device)
    STAGES["baselines"].run(params, paths, device)
    row.update(STAGES["evaluate"].run(params, paths, device)["accuracy"])
    return row


def _write(out: Path, rows: list[dict[str, Any]], attack: bool) -> None:
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(frontier.summary(rows, attack))
    if attack:
        frontier.figure(out, rows)
