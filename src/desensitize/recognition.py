"""Recognition on masked images: the `train` stage (the trainer's view) and the owner's `baselines`.

`train` opens nothing but `data/release/` — exactly what the third party receives — and fits
`plain` (the backbone on masked images as if they were ordinary ones) and `masknet` (the feature
selection MaskNet, which also reads the mask). `baselines` is owner side: `raw`, the same backbone
on raw images (the upper bound), and `plain_random`, on a seeded random mask of the same ratio,
grid, scope and fill (the mask-strategy baseline). All four share backbone, epochs and seed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from desensitize.config import Params
from desensitize.ingest import load_split
from desensitize.masking import like_release, random_counterpart
from desensitize.paths import Paths
from desensitize.release import load_released, read_release_info
from desensitize.training import best_device, fit

log = logging.getLogger(__name__)
TRAINER_MODELS = ("plain", "masknet")
OWNER_MODELS = ("raw", "plain_random")


def with_mask_channel(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """MaskNet input: uint8 (N, C + 1, H, W), the mask (0 / 255) as the last channel."""
    return np.concatenate([images, (masks[:, None] * 255).astype(np.uint8)], axis=1)


def _fit(name: str, params: Params, paths: Paths, images: np.ndarray, labels: np.ndarray,
         class_names: list[str], *, masknet: bool, device: str) -> dict[str, Any]:  # fmt: skip
    """Train one model of the comparison into models/<name>.npz; returns its last epoch."""
    _, history = fit(
        params.train, images, labels, class_names, seed=params.seed, masknet=masknet, device=best_device(device),
        model_path=paths.model(name), history_path=paths.train_history(name), name=name,
    )  # fmt: skip
    return {**history.epochs[-1], "wall_seconds": round(history.wall_seconds, 2)}


def train_on_release(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """The `train` stage: reads only data/release."""
    info = read_release_info(paths.release)
    train = load_released(paths.release, "train")
    return {
        "plain": _fit("plain", params, paths, train.images, train.labels, info["class_names"], masknet=False, device=device),
        "masknet": _fit("masknet", params, paths, with_mask_channel(train.images, train.masks), train.labels,
                       info["class_names"], masknet=True, device=device),
    }  # fmt: skip


def train_baselines(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """The `baselines` stage (owner side): raw images, and a random mask like the release's."""
    info = read_release_info(paths.release)
    raw = load_split(paths.raw, "train")
    fill_value = np.asarray(info["fill_value"], dtype=np.uint8)
    rand = random_counterpart(like_release(info), {"train": raw}, fill_value, params.seed)["train"]
    return {
        "raw": _fit("raw", params, paths, raw.images, raw.labels, list(raw.class_names), masknet=False, device=device),
        "plain_random": _fit("plain_random", params, paths, rand.images, raw.labels, list(raw.class_names),
                            masknet=False, device=device),
    }  # fmt: skip
