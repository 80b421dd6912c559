"""The single-cell landscape: what one visible cell is worth to recognition and to an attacker.

For one seed (the pipeline's ingest and reference stages in a temporary workspace), every set mask
that keeps exactly one cell of --cell pixels is scored as the mask search scores a candidate:
held-out utility, the privacy screen, and with --full the full gate (the cells listed). Each cell also
gets the measures a template can rank it by before any training: its class evidence (its share of the
between-class spread of attribution, as `class_contrast` and `restorability` use it) under each
--methods attribution, its linear restorability (desensitize.masking.templates.restorability of that cell
alone) and its share of the mean image's pixel mass. Prints one row per cell, then the Spearman
correlation of every measure with the utility and with the screen's within-class linkage, and of
utility with linkage (near 1: the cells that help recognition are the ones that let the attacker
link). Rows go to --out (JSON). Settings not given come from --params.

    python benchmarks/cell_landscape.py --seed 1 --full 1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from desensitize.config import parse_params
from desensitize.data.splits import read_manifest, split_shards
from desensitize.learning.checkpoints import load_checkpoint
from desensitize.masking.attribution import attribution_maps
from desensitize.masking.grid import cell_scores, class_contrast, expand, grid_shape
from desensitize.masking.templates import TemplateStats, restorability
from desensitize.paths import Paths
from desensitize.runtime.device import best_device, to_float
from desensitize.search.candidates import scan_train
from desensitize.search.gated import Candidate
from desensitize.search.measures import Measures
from desensitize.stages.ingest import ingest
from desensitize.stages.reference import train_reference
from desensitize.stats import spearman


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of cell indices: {text!r}") from None


def evidence(stats: TemplateStats, cell: int) -> np.ndarray:
    """Each cell's share of the between-class spread of the attribution `stats` were made of."""
    scores = cell_scores(class_contrast(stats.class_means()), cell).ravel()
    return scores / scores.sum()


def attributed(measures: Measures, model: torch.nn.Module, method: str, device: torch.device) -> TemplateStats:
    """The train split's attribution statistics under another method than the params'."""
    params = measures.params
    cfg = params.masks.attribution.model_copy(update={"method": method})
    images, labels = measures.train.images, measures.train.labels
    maps = attribution_maps(model, to_float(images), torch.as_tensor(labels), cfg, device=device, seed=params.seed)
    stats = TemplateStats()
    stats.add(maps.numpy(), images, labels)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings not given below")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell", type=int, default=7, help="cell size in pixels")
    parser.add_argument("--methods", default="saliency,integrated_gradients", help="attribution methods")
    parser.add_argument(
        "--full", type=_ints, default=[], help="cells (indices, row-major) to put through the full gate"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("reports/cell_landscape.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    base = yaml.safe_load(args.params.read_text()) or {}
    params = parse_params({**base, "seed": args.seed}, origin=str(args.params))
    params = params.model_copy(
        update={
            "masks": params.masks.model_copy(
                update={"search": params.masks.search.model_copy(update={"cells": [args.cell]})}
            )
        }
    )
    device = best_device(args.device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cell-landscape-") as root:
        paths = Paths(Path(root))
        ingest(params, paths)
        train_reference(params, paths, device=str(device))
        model, _ = load_checkpoint(paths.reference_model, device)
        shards = split_shards(paths.raw, "train")
        stats, _, mean, _ = scan_train(params, shards, model, device)  # restorability's covariance at --cell
        measures = Measures(params, paths, shards, read_manifest(paths.raw)["class_names"], mean, model, device)
        _, _, height, width = measures.train.images.shape
        gh, gw = grid_shape(height, width, args.cell)
        bad = [k for k in args.full if not 0 <= k < gh * gw]
        if bad:
            parser.error(f"--full: cells {bad} are not on the {gh}x{gw} grid of {args.cell}-pixel cells")
        cov = stats.within_class_covariance(args.cell)
        own = params.masks.attribution.method  # scan_train's statistics are of this one
        evidences = {
            m: evidence(stats if m == own else attributed(measures, model, m, device), args.cell)
            for m in args.methods.split(",")
        }
        content = cell_scores(to_float(measures.train.images).numpy().mean(axis=(0, 1)), args.cell).ravel()
        content /= content.sum()
        rows = []
        for k in range(gh * gw):
            kept = np.zeros(gh * gw, dtype=np.uint8)
            kept[k] = 1
            mask = expand(kept.reshape(1, gh, gw), height, width, args.cell)[0]
            c = Candidate(f"cell {k}", {"scope": "set", "cell": args.cell}, mask)
            row = {
                "cell": k,
                **{f"evidence_{m}": float(e[k]) for m, e in evidences.items()},
                "restorability": restorability(cov, kept.reshape(gh, gw)),
                "pixel_share": float(content[k]),
                "utility": measures.utility(c),
                "screen": measures.screen(c),
                "full": measures.full(c) if k in args.full else None,
            }
            rows.append(row)
            full = "" if row["full"] is None else " | full " + ", ".join(f"{v:.3f}" for v in row["full"].values())
            print(
                f"cell {k:3d}: "
                + ", ".join(f"{n} {row[f'evidence_{n}']:.3f}" for n in evidences)
                + f", restorability {row['restorability']:.3f}, pixel share {row['pixel_share']:.3f} | utility "
                f"{row['utility']:.3f} | screen " + ", ".join(f"{v:.3f}" for v in row["screen"].values()) + full,
                flush=True,
            )
    print(f"\nscores: psnr_gain, linkage_within_class, recognition_recovery; gate limits {measures.limits}")
    utility = np.array([r["utility"] for r in rows])
    linkage = np.array([r["screen"]["linkage_within_class"] for r in rows])
    for name in [f"evidence_{m}" for m in evidences] + ["restorability", "pixel_share"]:
        values = np.array([r[name] for r in rows])
        print(
            f"{name:<34} Spearman with utility {spearman(values, utility):+.2f}, "
            f"with screen linkage {spearman(values, linkage):+.2f}"
        )
    print(f"{'utility':<34} Spearman with screen linkage {spearman(utility, linkage):+.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seed": args.seed, "cell": args.cell, "limits": measures.limits, "cells": rows}))
    print(f"{len(rows)} cells in {time.perf_counter() - start:.0f} s on {device.type}; rows in {args.out}")


if __name__ == "__main__":
    main()
