"""MaskNet design ablation: which feature selection variant earns its place over `plain`.

Every seed x scope x hidden ratio point (saliency masks; every other setting from --params,
default params.yaml) runs in a workspace of its own: the pipeline's own stages ingest ->
reference -> masks -> train -> baselines -> evaluate (raw, plain_random, plain and the default
masknet), then every MaskNet variant below on the same release, backbone, epochs and seed,
scored on the released test set.
Points run in parallel worker processes (each on the best device: CUDA when present).

Prints, per scope and ratio, mean +- std over seeds of each model's accuracy and of each
variant's paired gain over plain; writes every row to --out (CSV).

    python benchmarks/masknet_ablation.py --seeds 0,1,2 --workers 2
    python benchmarks/masknet_ablation.py --source fashion-mnist --split 0.06,0.02,0.02 --seeds 0,1,2,3,4 --workers 8
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import os
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import yaml

VARIANTS: dict[str, dict[str, Any]] = {
    "input_only": {"gates": "none"},  # mask channel + hidden pixels zeroed, no gates
    "both": {"gates": "both"},  # spatial + channel gates after every stage
    "spatial": {"gates": "spatial"},
    "channel": {"gates": "channel"},
    "first_stage": {"gates": "both", "gated_stages": 1},
    "rezero": {"gates": "both", "rezero": True},
    "visible_pool": {"gates": "none", "visible_pool": True},
    "both_visible_pool": {"gates": "both", "visible_pool": True},
    "rezero_visible_pool": {"gates": "both", "rezero": True, "visible_pool": True},
}
BASE_MODELS = ("raw", "plain_random", "plain", "masknet")
STAGES_RUN = ("ingest", "reference", "masks", "train", "baselines", "evaluate")  # no attack: accuracy only


def run_point(settings: dict[str, Any], variants: list[str], root: str, device: str, threads: int) -> dict[str, Any]:
    import torch

    from desensitize.config import parse_params
    from desensitize.learning.training import predict, train_classifier
    from desensitize.masknet import MaskNet, with_mask_channel
    from desensitize.models import build_backbone
    from desensitize.orchestration.runner import run_stage
    from desensitize.paths import Paths
    from desensitize.release import load_released
    from desensitize.runtime.device import best_device, seed_everything

    torch.set_num_threads(threads)
    params = parse_params(settings)
    m = params.masks
    paths = Paths(Path(root) / f"seed{params.seed}-{m.scope}-{m.hidden_ratio:g}-{m.attribution.method}")
    start = time.perf_counter()
    metrics = {name: run_stage(name, params, paths, device) for name in STAGES_RUN}
    row: dict[str, Any] = {
        "seed": params.seed,
        "scope": m.scope,
        "hidden_ratio": m.hidden_ratio,
        "method": m.attribution.method,
        "template": metrics["masks"]["template"],
        **metrics["evaluate"]["accuracy"],
    }
    train, test = load_released(paths.release, "train"), load_released(paths.release, "test")
    x_train, x_test = with_mask_channel(train.images, train.masks), with_mask_channel(test.images, test.masks)
    torch_device, cfg = best_device(device), params.train
    for name in variants:
        options = VARIANTS[name]
        seed_everything(params.seed)
        model = MaskNet(build_backbone(cfg.backbone, x_train.shape[1], int(train.labels.max()) + 1), **options)
        train_classifier(model, x_train, train.labels, cfg, seed=params.seed, device=torch_device, name=name)
        row[f"v:{name}"] = float((predict(model, x_test, torch_device) == test.labels).mean())
    row["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(
        f"point seed={params.seed} {m.scope}/{m.hidden_ratio:g}/{m.attribution.method} done in {row['wall_seconds']} s",
        flush=True,
    )
    return row


def summarise(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["scope"], row["hidden_ratio"], row["method"])].append(row)
    lines = []
    for (scope, ratio, method), members in sorted(groups.items()):
        lines.append(f"\n{scope} scope, hidden ratio {ratio:g}, {method} masks ({len(members)} seeds)")
        for name in BASE_MODELS:
            values = np.array([r[name] for r in members])
            lines.append(f"  {name:<22} {values.mean():.4f} +- {values.std(ddof=1) if len(values) > 1 else 0:.4f}")
        for name in (key.removeprefix("v:") for key in members[0] if key.startswith("v:")):
            gain = np.array([r[f"v:{name}"] - r["plain"] for r in members])
            spread = gain.std(ddof=1) if len(gain) > 1 else 0.0
            lines.append(
                f"  {name:<22} {np.mean([r[f'v:{name}'] for r in members]):.4f}   "
                f"minus plain {gain.mean():+.4f} +- {spread:.4f}"
            )
    return "\n".join(lines)


def _write(out: Path, rows: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["scope"], r["hidden_ratio"], r["method"], r["seed"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings not given below")
    parser.add_argument("--source", default="mnist5k")
    parser.add_argument("--path", default=None, help="data.path (fashion-mnist: the IDX directory)")
    parser.add_argument("--split", default="0.6,0.2,0.2", help="train,test,public fractions")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scopes", default="set,image")
    parser.add_argument("--ratios", default="0.75,0.5")
    parser.add_argument("--methods", default="saliency", help="masks.attribution.method values")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="MaskNet variants to train ('' for none)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("reports/masknet_ablation.csv"))
    args = parser.parse_args()
    train, test, public = (float(x) for x in args.split.split(","))
    base = yaml.safe_load(args.params.read_text()) or {}
    points = []
    for seed, scope, ratio, method in itertools.product(
        (int(s) for s in args.seeds.split(",")),
        args.scopes.split(","),
        (float(r) for r in args.ratios.split(",")),
        args.methods.split(","),
    ):
        point = copy.deepcopy(base)
        point["seed"] = seed
        point.setdefault("data", {}).update(
            source=args.source, path=args.path, split={"train": train, "test": test, "public": public}
        )
        point.setdefault("train", {})["epochs"] = args.epochs
        point.setdefault("masks", {}).update(scope=scope, hidden_ratio=ratio)
        point["masks"].setdefault("attribution", {})["method"] = method
        points.append(point)
    variants = [name for name in args.variants.split(",") if name]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; expected some of {', '.join(VARIANTS)}")
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="masknet-ablation-") as root:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_point, point, variants, root, args.device, threads) for point in points]
            for future in as_completed(futures):
                rows.append(future.result())
                _write(args.out, rows)  # a run cut short keeps the points it finished
    print(summarise(rows))
    print(f"\n{len(rows)} points, {args.workers} workers, {time.perf_counter() - start:.0f} s; rows in {args.out}")


if __name__ == "__main__":
    main()
