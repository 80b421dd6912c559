"""Set masks: how well a model retrained on the release does through each critical template's mask,
against random masks of the same ratio and grid.

Per seed: the pipeline's ingest and reference stages in a temporary workspace, and the train
images' attribution maps (masks.attribution). Then per hidden ratio: the set mask of each
template (`mean`, `class_contrast`, `mean_spread`), the one `masks.template: search` picks from
them (scored on held-out train images only), and --random seeded random masks (draw 0 is the
pipeline's `plain_random` mask). For each mask, `plain` (the `train` params: backbone, epochs,
optimiser) is trained on the masked train split and scored on the masked test split. Every
setting not given below comes from --params (default params.yaml).

Prints per ratio each mask's accuracy per seed and its gain over the mean of that seed's random
draws (mean +- std over seeds); writes every row to --out (CSV).

    python benchmarks/set_masks.py --seeds 0,1,2 --ratios 0.5,0.75 --random 4
    python benchmarks/set_masks.py --source fashion-mnist --path DIR --split 0.06,0.02,0.02
"""

from __future__ import annotations

import argparse
import copy
import csv
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from desensitize.attribution import attribution_maps
from desensitize.checkpoints import load_checkpoint
from desensitize.config import parse_params
from desensitize.masks import random_masks
from desensitize.paths import Paths
from desensitize.release import FILL_STREAMS, channel_mean, mask_images
from desensitize.splits import load_split
from desensitize.stages.ingest import ingest
from desensitize.stages.reference import train_reference
from desensitize.templates import search_split, search_template, set_mask_candidates
from desensitize.training import best_device, fit_and_score, to_float


def _plain_accuracy(params, train, test, mask: np.ndarray, device: torch.device) -> float:
    """`plain` trained on the masked train split, scored on the masked test split."""
    fill, mean = params.masks.fill, channel_mean(train)
    x_train = mask_images(train, mask, fill, mean, params.seed, FILL_STREAMS["train"])
    x_test = mask_images(test, mask, fill, mean, params.seed, FILL_STREAMS["test"])
    return fit_and_score(
        params.train,
        x_train,
        train.labels,
        x_test,
        test.labels,
        num_classes=len(train.class_names),
        seed=params.seed,
        device=device,
        name="plain",
    )


def run_seed(params, ratios: list[float], n_random: int, root: Path, device: torch.device) -> list[dict[str, Any]]:
    paths = Paths(root / f"seed{params.seed}")
    ingest(params, paths)
    train_reference(params, paths, device=str(device))
    train, test = load_split(paths.raw, "train"), load_split(paths.raw, "test")
    model, _ = load_checkpoint(paths.reference_model, device)
    maps = attribution_maps(
        model,
        to_float(train.images),
        torch.as_tensor(train.labels),
        params.masks.attribution,
        device=device,
        seed=params.seed,
    ).numpy()
    _, _, height, width = train.images.shape
    rows = []
    for ratio in ratios:
        point_masks = params.masks.model_copy(update={"hidden_ratio": ratio, "template": "search"})
        point = params.model_copy(update={"masks": point_masks})
        cell = point.masks.cell
        candidates = set_mask_candidates(maps, train.labels, point.masks)
        masks = {name: mask for name, (_, mask) in candidates.items()}
        scores = search_template(masks, train, search_split(len(train.images), point), point, device)
        masks["search"] = masks[max(scores, key=scores.__getitem__)]
        for r in range(n_random):
            masks[f"random{r}"] = random_masks(None, height, width, cell, ratio, params.seed, stream=r)
        trained: dict[bytes, float] = {}  # `search` is one of the templates' masks: trained once
        for name, mask in masks.items():
            if mask.tobytes() not in trained:
                trained[mask.tobytes()] = _plain_accuracy(point, train, test, mask, device)
            accuracy = trained[mask.tobytes()]
            rows.append(
                {
                    "seed": params.seed,
                    "hidden_ratio": ratio,
                    "mask": name,
                    "plain": accuracy,
                    "visible_cells": "".join(map(str, mask[::cell, ::cell].ravel())),
                }
            )
            print(f"seed {params.seed} hidden {ratio:g} {name:<15} plain {accuracy:.4f}", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]]) -> str:
    by_point: dict[tuple, dict[str, float]] = defaultdict(dict)
    for row in rows:
        by_point[(row["hidden_ratio"], row["seed"])][row["mask"]] = row["plain"]
    lines = []
    for ratio in sorted({ratio for ratio, _ in by_point}):
        seeds = sorted(seed for r, seed in by_point if r == ratio)
        points = [by_point[(ratio, seed)] for seed in seeds]
        random_mean = np.array([np.mean([v for k, v in p.items() if k.startswith("random")]) for p in points])
        lines.append(f"\nhidden ratio {ratio:g}, seeds {seeds}: plain accuracy per seed | mean | minus random mean")
        for name in points[0]:
            values = np.array([p[name] for p in points])
            gain = values - random_mean
            spread = gain.std(ddof=1) if len(gain) > 1 else 0.0
            lines.append(
                f"  {name:<15} {' '.join(f'{v:.4f}' for v in values)} | {values.mean():.4f} | "
                f"{gain.mean():+.4f} +- {spread:.4f}"
            )
        lines.append(f"  {'random (mean)':<15} {' '.join(f'{v:.4f}' for v in random_mean)} | {random_mean.mean():.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings not given below")
    parser.add_argument("--source", default=None, help="data.source (default: the params file's)")
    parser.add_argument("--path", default=None, help="data.path (fashion-mnist: the IDX directory)")
    parser.add_argument("--split", default=None, help="train,test,public fractions (default: the params file's)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--random", type=int, default=4, help="random masks per seed and ratio")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("reports/set_masks.csv"))
    args = parser.parse_args()
    base = yaml.safe_load(args.params.read_text()) or {}
    data = base.setdefault("data", {})
    if args.source:
        data.update(source=args.source, path=args.path)
    if args.split:
        data["split"] = dict(zip(("train", "test", "public"), (float(x) for x in args.split.split(",")), strict=True))
    device = best_device(args.device)
    ratios = [float(r) for r in args.ratios.split(",")]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="set-masks-") as root:
        for seed in (int(s) for s in args.seeds.split(",")):
            params = parse_params({**copy.deepcopy(base), "seed": seed}, origin=str(args.params))
            rows += run_seed(params, ratios, args.random, Path(root), device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(summarise(rows))
    print(f"\n{len(rows)} models in {time.perf_counter() - start:.0f} s on {device}; rows in {args.out}")


if __name__ == "__main__":
    main()
