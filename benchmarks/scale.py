"""Peak memory against the number of images: does the pipeline hold a shard, or the whole set?

For N and 4N synthetic 28x28 greyscale training images (10 classes, each a class pattern under
noise), written as raw shards by the ingest stage's own writer (`data.shard_size` images per shard)
with a reference model trained for one epoch on 2,000 of them, measures in a fresh process each
(peak RSS: `ru_maxrss`):

- the masks stage (saliency attribution, `masks.template: mean`, `masks.privacy: none`: one
  candidate, no search), which attributes, masks, writes and verifies the release;
- one training epoch of the train stage's `masknet` on the release (its input, image + mask, built
  per batch from the release shards).

and prints N, both peaks and their ratio 4N/N. Streaming holds that ratio near 1 (the target is
under 1.3): 4x the images cost time, not memory.

    python benchmarks/scale.py                    # N = 50,000 and 200,000 (hours on 2 busy cores)
    python benchmarks/scale.py --n 5000 --shard-size 1250   # 4 and 16 train shards, ~15 min

2026-11-28, torch 2.14.1 CPU, 2 cores: `--n 12500` (10,000-image shards), masks stage 927 -> 921 MiB
(0.99x), masknet epoch 974 -> 980 MiB (1.01x); `--n 5000 --shard-size 1250` (cores shared with another
benchmark), 841 -> 889 MiB (1.06x) and 928 -> 1002 MiB (1.08x). About 570 MiB is the imports (torch,
captum, MLflow).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TRAIN_SHARE = 0.8  # of the source; test and public get 0.1 each
CLASSES = 10


def params(shard_size: int):
    from desensitize.config import parse_params

    return parse_params(
        {
            "data": {
                "split": {"train": TRAIN_SHARE, "test": (1 - TRAIN_SHARE) / 2, "public": (1 - TRAIN_SHARE) / 2},
                "shard_size": shard_size,
            },
            "reference": {"epochs": 1},
            "masks": {"template": "mean", "privacy": "none", "cell": 7, "hidden_ratio": 0.75},
            "train": {"epochs": 1, "batch_size": 256},  # fewer steps: the same memory, a shorter run
        }
    )


def synthetic(n: int, seed: int = 0):
    """n distinct 28x28 images: the class's pattern (a bright 7x7 block at a class-specific place) under noise."""
    from desensitize.data.sources import Source

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    images = rng.integers(0, 64, (n, 1, 28, 28), dtype=np.uint8)
    for c in range(CLASSES):
        row, col = divmod(c, 4)
        images[labels == c, :, 7 * row : 7 * row + 7, 7 * col : 7 * col + 7] += 160
    return Source(images, labels.astype(np.int64), tuple(str(c) for c in range(CLASSES)))


def prepare(root: Path, n: int, shard_size: int) -> None:
    """Raw shards written by the ingest stage (its source replaced by the synthetic one) and a reference
    model trained for one epoch on 2,000 train images."""
    import desensitize.stages.ingest as ingest_stage
    from desensitize.data.splits import load_split
    from desensitize.learning.training import fit
    from desensitize.paths import Paths
    from desensitize.runtime.device import best_device

    p, paths = params(shard_size), Paths(root)
    source = synthetic(round(n / TRAIN_SHARE))
    ingest_stage.load_source = lambda _data: source
    ingest_stage.ingest(p, paths)
    train = load_split(paths.raw, "train")
    fit(
        p.reference.model_copy(update={"epochs": 1}),
        train.images[:2000],
        train.labels[:2000],
        train.class_names,
        seed=p.seed,
        masknet=False,
        device=best_device("cpu"),
        model_path=paths.reference_model,
        history_path=paths.reference_history,
        name="reference",
    )


def measure(what: str, root: Path, shard_size: int) -> None:
    """Run one step in this (fresh) process and print its peak RSS in MiB as JSON."""
    from desensitize.paths import Paths

    p, paths = params(shard_size), Paths(root)
    if what == "masks":
        from desensitize.stages.masks import generate_masks

        generate_masks(p, paths, device="cpu")
    else:
        from desensitize.learning.training import TrainingData, fit
        from desensitize.masknet import masknet_input
        from desensitize.release import read_release_info, released_shards
        from desensitize.runtime.device import best_device

        info = read_release_info(paths.release)
        channels, height, width = info.image_shape
        data = TrainingData(released_shards(paths.release, "train"), (channels + 1, height, width), masknet_input)
        fit(
            p.train,
            data,
            None,
            info.class_names,
            seed=p.seed,
            masknet=True,
            device=best_device("cpu"),
            model_path=paths.model("masknet"),
            history_path=paths.train_history("masknet"),
            name="masknet",
        )
    print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_step(*args: str) -> float:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="train images of the small set (the large has 4x)")
    parser.add_argument("--shard-size", type=int, default=10_000, help="data.shard_size")
    parser.add_argument("--step", choices=["prepare", "masks", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.root, args.n, args.shard_size)
        return
    if args.step:
        measure(args.step, args.root, args.shard_size)
        return

    rows = []
    for n in (args.n, 4 * args.n):
        with tempfile.TemporaryDirectory(prefix="desensitize-scale-") as tmp:
            common = ["--root", tmp, "--n", str(n), "--shard-size", str(args.shard_size)]
            subprocess.run([sys.executable, __file__, "--step", "prepare", *common], check=True)
            rows.append((n, run_step("--step", "masks", *common), run_step("--step", "train", *common)))
            print(f"N = {n:,}: masks stage {rows[-1][1]:.0f} MiB, training epoch {rows[-1][2]:.0f} MiB", flush=True)
    print(f"\nshard size {args.shard_size:,}; peak RSS in MiB, each step in a fresh process")
    print("| train images | masks stage | training epoch |")
    print("|---|---|---|")
    for n, masks, train in rows:
        print(f"| {n:,} | {masks:.0f} | {train:.0f} |")
    (n1, m1, t1), (_, m4, t4) = rows
    print(f"| ratio 4N/N | {m4 / m1:.2f} | {t4 / t1:.2f} |")


if __name__ == "__main__":
    main()
