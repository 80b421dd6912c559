"""The `train` stage, the trainer's view: it opens nothing but `data/release/`, exactly what the third
party receives, proves it as far as the bundle alone can (desensitize.bundle.verify, without the raw
data), and fits `plain` (the backbone on masked images as if they were ordinary ones) and `masknet`
(the feature selection MaskNet, which also reads the mask). Same backbone, epochs and seed as the
owner's baselines.
"""

from __future__ import annotations

from typing import Any

from desensitize.bundle.verify import verified_release
from desensitize.config import Params
from desensitize.learning.training import TrainingData, fit_comparison
from desensitize.masknet import masknet_input
from desensitize.paths import Paths
from desensitize.release import released_shards
from desensitize.runtime.device import best_device


def train_on_release(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns each model's last epoch (loss, train accuracy) and wall time."""
    info = verified_release(paths.release, None)  # the bundle alone: the trainer has no raw data
    shards = released_shards(paths.release, "train")  # read one shard at a time
    channels, height, width = info.image_shape
    inputs = {
        "plain": TrainingData(shards, (channels, height, width)),
        "masknet": TrainingData(shards, (channels + 1, height, width), masknet_input),
    }
    return fit_comparison(
        params.train, paths, inputs, None, info.class_names, seed=params.seed, device=best_device(device)
    )
