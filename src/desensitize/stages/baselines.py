"""The `baselines` stage (owner side): `raw`, the backbone on raw images (the upper bound), and
`plain_random`, on a seeded random mask of the release's ratio, grid, scope and fill (the
mask-strategy baseline). Same backbone, epochs and seed as the `train` stage's models.
"""

from __future__ import annotations

from typing import Any

from desensitize.bundle.masked import random_release_of
from desensitize.bundle.verify import verified_release
from desensitize.config import Params
from desensitize.data.splits import split_shards
from desensitize.learning.training import TrainingData, fit_comparison
from desensitize.paths import Paths
from desensitize.runtime.device import best_device


def train_baselines(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns each model's last epoch (loss, train accuracy) and wall time."""
    info = verified_release(paths.release, paths.raw)
    raw = split_shards(paths.raw, "train")  # read one shard at a time
    shape = tuple(info.image_shape)
    inputs = {
        "raw": TrainingData(raw, shape),
        "plain_random": TrainingData(random_release_of(info, {"train": raw}, params.seed)["train"], shape),
    }
    return fit_comparison(
        params.train, paths, inputs, None, info.class_names, seed=params.seed, device=best_device(device)
    )
