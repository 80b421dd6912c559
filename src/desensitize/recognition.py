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
from desensitize.models import build_model, save_checkpoint
from desensitize.paths import Paths
from desensitize.release import load_released, read_release_info
from desensitize.training import best_device, seed_everything, train_classifier, write_history

log = logging.getLogger(__name__)
TRAINER_MODELS = ("plain", "masknet")
OWNER_MODELS = ("raw", "plain_random")


def with_mask_channel(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """MaskNet input: uint8 (N, C + 1, H, W), the mask (0 / 255) as the last channel."""
    return np.concatenate([images, (masks[:, None] * 255).astype(np.uint8)], axis=1)


def fit(
    name: str,
    params: Params,
    paths: Paths,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    *,
    masknet: bool,
    device: str,
) -> dict[str, Any]:
    """Train one model of the comparison and save it to models/<name>.npz; returns its last epoch."""
    cfg = params.train
    channels = images.shape[1] - (1 if masknet else 0)
    spec = {"backbone": cfg.backbone, "in_channels": channels, "num_classes": len(class_names),
            "image_shape": [channels, *images.shape[2:]], "class_names": list(class_names), "masknet": masknet}  # fmt: skip
    seed_everything(params.seed)
    model = build_model(spec)
    history = train_classifier(
        model, images, labels, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, seed=params.seed, device=best_device(device), name=name,
    )  # fmt: skip
    save_checkpoint(paths.model(name), model.cpu(), **spec)
    write_history(paths.train_history(name), history)
    return {**history.epochs[-1], "wall_seconds": round(history.wall_seconds, 2)}


def train_on_release(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """The `train` stage: reads only data/release."""
    info = read_release_info(paths.release)
    train = load_released(paths.release, "train")
    return {
        "plain": fit("plain", params, paths, train.images, train.labels, info["class_names"], masknet=False, device=device),
        "masknet": fit("masknet", params, paths, with_mask_channel(train.images, train.masks), train.labels,
                       info["class_names"], masknet=True, device=device),
    }  # fmt: skip


def train_baselines(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """The `baselines` stage (owner side): raw images, and a random mask like the release's."""
    info = read_release_info(paths.release)
    raw = load_split(paths.raw, "train")
    fill_value = np.asarray(info["fill_value"], dtype=np.uint8)
    rand = random_counterpart(like_release(info), {"train": raw}, fill_value, params.seed)["train"]
    return {
        "raw": fit("raw", params, paths, raw.images, raw.labels, list(raw.class_names), masknet=False, device=device),
        "plain_random": fit("plain_random", params, paths, rand.images, raw.labels, list(raw.class_names),
                            masknet=False, device=device),
    }  # fmt: skip
