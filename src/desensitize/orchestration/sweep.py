"""The privacy-utility sweep run: the pipeline's stage functions over every run of the plan
(desensitize.orchestration.sweep_plan), as units of desensitize.runtime.compute.

Every point gets its own workspace under `<out>/work/`; per seed the raw split and the reference
model are made once and shared. Each point runs masks -> (attack) -> train -> baselines -> evaluate
with the attack stage's gate recorded, not enforced (the sweep is there to see where it fails).
Results: `results.csv` (one row per point, columns COLUMNS), and what desensitize.orchestration.frontier
makes of the rows: `summary.md` and `frontier.png`. They are written when the last point has finished,
so an interrupted sweep leaves the previous complete sweep's results in place.

Until then each finished point is appended to `partial.jsonl` (one JSON object a line: the point's
name, a digest of its params and the attack switch, and its row). A rerun resumes from it: the points
whose name and digest it holds are not run again. A point there that the rerun's plan does not have
(other options or params) stops the rerun before any work, naming the file; the file goes once the
sweep completes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import signal
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


PARTIAL = "partial.jsonl"
RESULTS = ("results.csv", "summary.md", "frontier.png")


class SweepInterrupted(DesensitizeError):
    """The sweep stopped (Ctrl-C, SIGTERM) before its last point; the message says what was kept.
    `signum`: the signal, for the exit status."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


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
    """Run every point (module docstring) as units: first the shared workspace of each seed with points
    to run, then those points (a rerun skips the points `partial.jsonl` holds). Returns the rows in plan
    order, and writes them as the complete results only when all have finished; raises SweepInterrupted,
    saying what was kept, on Ctrl-C (or a SIGTERM the caller turns into KeyboardInterrupt(signum)).
    `units`: what runs them (default: an Executor on `params.compute`; the Prefect sweep flow passes its
    task runner). `track`: the project whose MLflow store records the sweep, one parent run and a child
    per point."""
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
    if not runs:
        raise DesensitizeError("the sweep has no point: give at least one seed, scope, ratio, cell and strategy")
    gpu = best_device(device).type == "cuda"
    rows = _resume(out, runs, attack)
    todo = [i for i, row in enumerate(rows) if row is None]
    if len(todo) < len(runs):
        log.info(
            "sweep: %d of %d points finished before (%s); running the other %d",
            len(runs) - len(todo),
            len(runs),
            out / PARTIAL,
            len(todo),
        )
    start = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            parent = stack.enter_context(sweep_run(track)) if track else None
            ex = units or stack.enter_context(executor(params.compute))

            def record(i: int, row: dict[str, Any]) -> None:
                if parent:
                    log_sweep_point(parent, _point_key(runs[i]), runs[i].params, row)

            def done(k: int, row: dict[str, Any]) -> None:
                i = todo[k]
                rows[i] = row
                _keep(out, runs[i], attack, row)
                finished = sum(r is not None for r in rows)
                accuracies = {name: row.get(name) for name in ACCURACY}
                log.info(
                    "sweep point %s (seed %d), %d of %d: %s",
                    runs[i].name,
                    runs[i].params.seed,
                    finished,
                    len(runs),
                    accuracies,
                )
                record(i, row)

            for i, row in enumerate(rows):
                if row is not None:
                    record(i, row)
            seeds_to_run = list(dict.fromkeys(runs[i].params.seed for i in todo))
            ex.map(partial(prepare_seed, params, out, device), seeds_to_run, gpu=gpu, name="sweep-seed")
            point = partial(run_point, out=out, attack=attack, device=device)
            ex.map(point, [runs[i] for i in todo], gpu=gpu, name="sweep-point", done=done)
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        raise SweepInterrupted(_kept(out, rows), signum) from None
    _write(out, rows, attack)
    (out / PARTIAL).unlink(missing_ok=True)
    log.info("sweep of %d points took %.0f s", len(runs), time.perf_counter() - start)
    return rows


def _point_key(run: Run) -> str:
    return f"{run.name}-seed-{run.params.seed}"


def _point_digest(run: Run, attack: bool) -> str:
    """What a point's row depends on: its params (less where its units run) and whether it is attacked."""
    settings = run.params.model_dump(mode="json", exclude={"compute": {"scheduler", "workers", "retries"}})
    text = json.dumps({"point": _point_key(run), "params": settings, "attack": attack}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _resume(out: Path, runs: list[Run], attack: bool) -> list[dict[str, Any] | None]:
    """Each run's row as `partial.jsonl` keeps it (None: still to run). A line cut short by a kill (the
    last) is dropped; a point that is not one of these runs stops the sweep before any work."""
    rows: list[dict[str, Any] | None] = [None] * len(runs)
    path = out / PARTIAL
    if not path.is_file():
        return rows
    index = {_point_key(run): i for i, run in enumerate(runs)}
    lines = path.read_text().splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if n == len(lines):
                continue
            raise DesensitizeError(f"{path}: line {n} is not JSON; remove the file to start the sweep afresh") from None
        i = index.get(record.get("point"))
        if i is None or record.get("digest") != _point_digest(runs[i], attack):
            raise DesensitizeError(
                f"{path}: holds the finished point {record.get('point')!r} of another sweep (other axes, params "
                "or --attack); finish that sweep with its own options, or remove the file to start this one"
            )
        rows[i] = record["row"]
        kept.append(line)
    if len(kept) < len(lines):
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{line}\n" for line in kept))
    return rows


def _keep(out: Path, run: Run, attack: bool, row: dict[str, Any]) -> None:
    """Append a finished point to `partial.jsonl` (a whole line at once; a kill mid-line is dropped on resume)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"point": _point_key(run), "digest": _point_digest(run, attack), "row": row}
    with open(out / PARTIAL, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=lambda v: v.item() if hasattr(v, "item") else str(v)) + "\n")


def _kept(out: Path, rows: list[dict[str, Any] | None]) -> str:
    """What an interrupted sweep leaves: its finished points, and the previous complete results."""
    finished = sum(row is not None for row in rows)
    points = (
        f"the points finished are kept in {out / PARTIAL}, marked partial (the same sweep run again resumes from them)"
        if finished
        else "no point had finished"
    )
    previous = (
        "still hold the previous complete sweep"
        if (out / RESULTS[0]).is_file()
        else "were not written (no sweep in it has completed)"
    )
    return (
        f"sweep interrupted after {finished} of {len(rows)} points: {points}; {out / RESULTS[0]} and "
        f"{RESULTS[1]} {previous}"
    )


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
    """The complete results, each file replaced atomically (a frontier.png of an earlier sweep with the
    attack goes when this one has none)."""
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text(frontier.summary(rows, attack))
    if attack:
        frontier.figure(out, rows)
    else:
        (out / RESULTS[2]).unlink(missing_ok=True)
