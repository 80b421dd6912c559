"""The `train` stage, the trainer's view: it opens nothing but `data/release/`, exactly what the third
party receives, and fits `plain` (the backbone on masked images as if they were ordinary ones) and
`masknet` (the feature selection MaskNet, which also reads the mask). Same backbone, epochs and seed
as the owner's baselines.
"""

from __future__ import annotations

from typing import Any

from desensitize.config import Params
from desensitize.masknet import with_mask_channel
from desensitize.paths import Paths
from desensitize.release import load_released, read_release_info
from desensitize.training import best_device, fit_comparison


def train_on_release(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns each model's last epoch (loss, train accuracy) and wall time."""
    info = read_release_info(paths.release)
    train = load_released(paths.release, "train")
    inputs = {"plain": train.images, "masknet": with_mask_channel(train.images, train.masks)}
    return fit_comparison(
        params.train, paths, inputs, train.labels, info.class_names, seed=params.seed, device=best_device(device)
    )
