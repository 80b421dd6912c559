"""The `baselines` stage (owner side): `raw`, the backbone on raw images (the upper bound), and
`plain_random`, on a seeded random mask of the release's ratio, grid, scope and fill (the
mask-strategy baseline). Same backbone, epochs and seed as the `train` stage's models.
"""

from __future__ import annotations

from typing import Any

from desensitize.config import Params
from desensitize.paths import Paths
from desensitize.release import random_release_of, read_release_info
from desensitize.splits import load_split
from desensitize.training import best_device, fit_comparison


def train_baselines(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns each model's last epoch (loss, train accuracy) and wall time."""
    info = read_release_info(paths.release)
    raw = load_split(paths.raw, "train")
    inputs = {"raw": raw.images, "plain_random": random_release_of(info, {"train": raw}, params.seed)["train"].images}
    return fit_comparison(
        params.train, paths, inputs, raw.labels, raw.class_names, seed=params.seed, device=best_device(device)
    )
