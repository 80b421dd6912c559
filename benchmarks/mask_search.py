"""At equal privacy: the privacy-constrained search over attribution-guided masks against the same
search over random masks (same budget: the grid's templates become as many seeded random draws, and
with amortized scoring the cell sets searched from them become as many random cell sets), both held to
the same gate.

Per seed: the pipeline's ingest and reference stages in a temporary workspace, then the masks stage
twice (masks.strategy saliency, then random; masks.template = search, masks.privacy = gate). For each
release, `plain` (the `train` params) is trained on the masked train split and scored on the masked
test split. Every setting not given below comes from --params (default params.yaml).

Prints per seed the candidate each search released, its test accuracy, how many candidates it scored,
the full-gate runs, the masks stage's seconds and the trade-off (what each privacy level would keep), and
the screen's agreement with the full gate; then the margin (saliency - random) as mean +- std over seeds.
A search that finds no passing candidate is reported as such (accuracy: none). Then every mask that
went through the full gate, most useful first, with its judged scores: where the gate's edge lies, and
which score stops each mask that fails. Rows go to --out; --rows summarises rows files of earlier runs
without running anything: each file's table, then the full-gate runs of all of them pooled.

    python benchmarks/mask_search.py --seeds 0,1,2
    python benchmarks/mask_search.py --rows reports/mask_search.csv other.csv
    python benchmarks/mask_search.py --source fashion-mnist --path DIR --split 0.06,0.02,0.02 \
        --hidden-ratios 0.75,0.875,0.9375,0.96
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from desensitize.attack.gate import excess
from desensitize.config import parse_params
from desensitize.data.splits import load_split
from desensitize.errors import DesensitizeError
from desensitize.learning.training import fit_and_score
from desensitize.paths import Paths
from desensitize.release import load_released
from desensitize.runtime.device import best_device
from desensitize.search.gated import Candidate, SearchFailed, agreement
from desensitize.stages.ingest import ingest
from desensitize.stages.masks import generate_masks
from desensitize.stages.reference import train_reference


def _plain_accuracy(params, paths: Paths, device) -> float:
    """`plain` trained on the released train split, scored on the released test split."""
    train, test = load_released(paths.release, "train"), load_released(paths.release, "test")
    return fit_and_score(
        params.train,
        train.images,
        train.labels,
        test.images,
        test.labels,
        num_classes=len(load_split(paths.raw, "test").class_names),
        seed=params.seed,
        device=device,
        name="plain",
    )


def run_seed(params, root: Path, device, strategies: list[str]) -> list[dict[str, Any]]:
    base = Paths(root / f"seed{params.seed}")
    ingest(params, base)
    train_reference(params, base, device=str(device))
    rows = []
    for strategy in strategies:
        point = params.model_copy(
            update={"masks": params.masks.model_copy(update={"strategy": strategy, "template": "search"})}
        )
        paths = Paths(base.root / strategy)
        for link, target in ((paths.raw, base.raw), (paths.reference_model, base.reference_model)):
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(target.resolve())
        start = time.perf_counter()
        row: dict[str, Any] = {"seed": params.seed, "strategy": strategy}
        try:
            metrics = generate_masks(point, paths, device=str(device))
            row["masks_seconds"] = round(time.perf_counter() - start, 1)
            record = metrics["search"]
            row.update(candidate=metrics["candidate"], plain=_plain_accuracy(point, paths, device))
        except SearchFailed as failed:
            row["masks_seconds"] = round(time.perf_counter() - start, 1)
            record = json.loads((paths.masks_reports / "search.json").read_text())
            row.update(candidate=None, plain=None, failure=str(failed))
        chosen = next((c for c in record["candidates"] if c["name"] == record["chosen"]), None)
        gated = [c for c in record["candidates"] if c["full"] is not None]
        row.update(
            utility=chosen and chosen["utility"],
            full_gate_runs=len(gated),
            judged=chosen and chosen["full"],
            spearman=record["screen_agreement"]["spearman"],
            screen_passed_full_failed=record["screen_agreement"]["screen_passed_full_failed"],
            seconds=round(time.perf_counter() - start, 1),
            gated=[(c["name"], c["screen"], c["full"], c["predicted"], c["utility"]) for c in gated],
            limits=record["limits"],
            scored=len(record["candidates"]),
            scoring=record.get("scoring"),
            tradeoff=[(r["level"], r["candidate"], r["utility"], r["basis"]) for r in record.get("tradeoff", [])],
        )
        rows.append(row)
        accuracy = "none (no candidate passed)" if row["plain"] is None else f"{row['plain']:.4f}"
        print(
            f"seed {params.seed} {strategy:<8} released {row['candidate']}: plain test accuracy {accuracy}; "
            f"{row['scored']} candidates scored ({row['scoring']}), {len(gated)} full-gate runs; masks stage "
            f"{row['masks_seconds']} s, {row['seconds']} s with plain",
            flush=True,
        )
        for level, name, utility, basis in row["tradeoff"]:
            kept = "nothing found" if name is None else f"{name}: held-out utility {utility:.3f} ({basis})"
            print(f"    at {level:g}x chance: {kept}", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["strategy"]): r for r in rows}
    lines = [
        "",
        "| seed | saliency: candidate | plain | random: candidate | plain | margin |",
        "|---|---|---|---|---|---|",
    ]
    margins = []
    for seed in seeds:
        s, r = by.get((seed, "saliency")), by.get((seed, "random"))
        margin = None
        if s is not None and r is not None and s["plain"] is not None:
            margin = s["plain"] - (r["plain"] if r["plain"] is not None else 0.0)  # no passing random mask: 0
            margins.append(margin)

        def cell(x: dict[str, Any] | None) -> str:
            if x is None:
                return "not run | -"
            return f"{x['candidate']} | {x['plain']:.4f}" if x["plain"] is not None else "none passed | -"

        lines.append(f"| {seed} | {cell(s)} | {cell(r)} | {'-' if margin is None else f'{margin:+.4f}'} |")
    for strategy in ("saliency", "random"):
        values = np.array([r["plain"] for r in rows if r["strategy"] == strategy and r["plain"] is not None])
        if len(values):
            spread = values.std(ddof=1) if len(values) > 1 else 0.0
            lines.append(f"\n{strategy}: plain {values.mean():.4f} +- {spread:.4f} over {len(values)} seeds")
    pooled = []  # every full-gate run of every search, against its screen
    for row in rows:
        for name, screen, full, *_ in row["gated"]:
            c = Candidate(name, {}, np.zeros(1))
            c.screen, c.full = screen, full
            pooled.append(c)
    if pooled:
        limits = rows[0]["limits"]  # linkage chance differs a little per seed; the first seed's limits
        a = agreement(pooled, limits)
        lines.append(
            f"screen vs full gate over all {a['candidates']} full runs: Spearman {a['spearman']}, pairs ordered "
            f"alike {a['pairs_ordered_alike']}, screen passed but full failed {a['screen_passed_full_failed']}, "
            f"screen failed but full passed {a['screen_failed_full_passed']}"
        )
    if margins:
        m = np.array(margins)
        lines.append(
            f"margin (saliency - best passing random): {m.mean():+.4f} +- {m.std(ddof=1) if len(m) > 1 else 0:.4f}"
        )
    return "\n".join(lines)


def gated_table(rows: list[dict[str, Any]]) -> list[str]:
    """Every mask that went through the full gate (once per seed and name), most useful first: its
    held-out utility, judged scores and, where it fails, the score furthest over its limit."""
    seen: dict[tuple[int, str], tuple[str, str, float, dict[str, float], dict[str, float]]] = {}
    for row in rows:
        for name, _screen, full, _predicted, utility in row["gated"]:
            seen.setdefault((row["seed"], name), (row["strategy"], name, utility, full, row["limits"]))
    if not seen:
        return []
    lines = [
        "",
        "every full-gate run, most useful first:",
        "| seed | strategy | candidate | held-out utility | PSNR gain | linkage | recovery | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (seed, _), (strategy, name, utility, full, limits) in sorted(seen.items(), key=lambda kv: -kv[1][2]):
        over = max(limits, key=lambda s: excess(full, {s: limits[s]}))  # the score furthest over
        verdict = "passes" if excess(full, limits) <= 0 else f"fails: {over} {full[over]:.3f} > {limits[over]:.3f}"
        lines.append(
            f"| {seed} | {strategy} | {name} | {utility:.3f} | {full['psnr_gain']:+.2f} | "
            f"{full['linkage_within_class']:.3f} | {full['recognition_recovery']:+.2f} | {verdict} |"
        )
    return lines


def _write(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def _read(path: Path) -> list[dict[str, Any]]:
    """Rows as _write wrote them: numbers, dicts and lists back from their text, names as they are."""

    def value(text: str) -> Any:
        if text == "":
            return None
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"seed", "strategy", "plain", "gated", "limits"} - set(reader.fieldnames or ())
            if missing:
                raise SystemExit(f"error: --rows {path}: not a rows file of this benchmark (no {sorted(missing)})")
            return [{k: value(v) for k, v in row.items()} for row in reader]
    except OSError as exc:
        raise SystemExit(f"error: --rows {path}: {exc.strerror}") from None


def _ratios(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings not given below")
    parser.add_argument("--source", default=None, help="data.source (default: the params file's)")
    parser.add_argument("--path", default=None, help="data.path (fashion-mnist: the IDX directory)")
    parser.add_argument("--split", default=None, help="train,test,public fractions (default: the params file's)")
    parser.add_argument(
        "--hidden-ratios", type=_ratios, default=None, help="masks.search.hidden_ratios, e.g. 0.75,0.96"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default="saliency,random", help="masks.strategy values to search")
    parser.add_argument("--scoring", choices=("amortized", "trained"), help="masks.search.scoring (default: params)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("reports/mask_search.csv"))
    parser.add_argument("--rows", type=Path, nargs="+", help="summarise these rows files (--out of earlier runs)")
    args = parser.parse_args()
    if args.rows:
        runs = [_read(path) for path in args.rows]
        for path, rows in zip(args.rows, runs, strict=True):
            print(f"\n{path}:{summarise(rows)}")
        print("\n".join(gated_table([row for rows in runs for row in rows])))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    base = yaml.safe_load(args.params.read_text()) or {}
    data = base.setdefault("data", {})
    if args.source:
        data.update(source=args.source, path=args.path)
    if args.split:
        data["split"] = dict(zip(("train", "test", "public"), (float(x) for x in args.split.split(",")), strict=True))
    search = base.setdefault("masks", {}).setdefault("search", {})
    if args.hidden_ratios:
        search["hidden_ratios"] = args.hidden_ratios
    if args.scoring:
        search["scoring"] = args.scoring
    device = best_device(args.device)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="mask-search-") as root:
            for seed in (int(s) for s in args.seeds.split(",")):
                params = parse_params({**copy.deepcopy(base), "seed": seed}, origin=str(args.params))
                rows += run_seed(params, Path(root), device, args.strategies.split(","))
                _write(rows, args.out)  # after every seed: a long run that is stopped keeps what it finished
    except DesensitizeError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(summarise(rows))
    print("\n".join(gated_table(rows)))
    print(f"\n{len(rows)} searches in {time.perf_counter() - start:.0f} s on {device}; rows in {args.out}")


if __name__ == "__main__":
    main()
