"""The `masks` stage: attribution -> critical template -> cell mask -> verified release bundle.

Owner side. Reads raw `train`/`test` and the reference model; writes `data/release/` (verified
before it is moved into place), `metrics/masks.json` and the figures in `reports/masks/`.
"""

from __future__ import annotations

import logging
from typing import Any

from desensitize.checkpoints import load_checkpoint
from desensitize.config import Params
from desensitize.errors import DesensitizeError
from desensitize.masks import geometric_mask, grid_shape, n_hidden_cells
from desensitize.paths import Paths
from desensitize.release import (
    MaskSettings,
    ReleasedSplit,
    channel_mean,
    masked,
    random_counterpart,
    random_split_masks,
    verify_release,
    write_release,
)
from desensitize.reports import heatmap, image_grid
from desensitize.splits import Split, load_split
from desensitize.storage import atomic_dir, write_json
from desensitize.templates import Saliency, saliency_masks
from desensitize.training import best_device, predict

log = logging.getLogger(__name__)


def generate_masks(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns the metrics written to `metrics/masks.json`."""
    cfg = params.masks
    splits = {name: load_split(paths.raw, name) for name in ("train", "test")}
    _, channels, height, width = splits["train"].images.shape
    if cfg.cell > min(height, width):
        raise DesensitizeError(f"masks.cell = {cfg.cell}: larger than the {height}x{width} images")
    gh, gw = grid_shape(height, width, cfg.cell)
    n_hidden = n_hidden_cells(gh * gw, cfg.hidden_ratio)
    torch_device = best_device(device)
    model, _ = load_checkpoint(paths.reference_model, torch_device)

    saliency = None
    if cfg.strategy == "saliency":
        saliency = saliency_masks(params, splits, model, torch_device)
        masks = saliency.masks
        log.info("%s attribution: %.0f images/s on %s", cfg.attribution.method, saliency.rate, torch_device)
    elif cfg.strategy == "random":
        masks = random_split_masks(cfg, splits, params.seed)
    else:
        mask = geometric_mask(cfg.strategy, height, width, cfg.cell, cfg.hidden_ratio)
        masks = {name: mask for name in splits}

    mean = channel_mean(splits["train"])
    released = masked(splits, masks, cfg.fill, mean, params.seed)

    test = splits["test"]
    random_test = random_counterpart(cfg, {"test": test}, mean, params.seed)["test"].images
    accuracy = {
        "raw": float((predict(model, test.images, torch_device) == test.labels).mean()),
        "masked": float((predict(model, released["test"].images, torch_device) == test.labels).mean()),
        "random": float((predict(model, random_test, torch_device) == test.labels).mean()),
    }
    hidden_pixels = float(1 - released["train"].masks.mean())
    settings = MaskSettings(
        strategy=cfg.strategy,
        method=cfg.attribution.method if cfg.strategy == "saliency" else None,
        noise_tunnel=cfg.attribution.noise_tunnel if cfg.strategy == "saliency" else None,
        scope=cfg.scope,
        template=saliency.template_name if saliency else None,
        hidden_ratio_requested=cfg.hidden_ratio,
        hidden_ratio=n_hidden / (gh * gw),
        hidden_ratio_pixels=hidden_pixels,
        cell=cfg.cell,
        grid=(gh, gw),
        n_cells=gh * gw,
        n_hidden_cells=n_hidden,
        fill=cfg.fill,
        fill_value=mean.tolist() if cfg.fill == "mean" else [0] * channels,
        fill_seed=params.seed if cfg.fill == "noise" else None,
        image_shape=[channels, height, width],
        class_names=list(test.class_names),
    )
    with atomic_dir(paths.release) as tmp:
        write_release(tmp, released, settings=settings, shard_size=params.data.shard_size)
        verify_release(tmp, paths.raw)  # nothing unverified ever lands in data/release

    _figures(paths, saliency, released, splits["train"])
    metrics = {
        **settings.model_dump(
            include={
                "strategy",
                "method",
                "scope",
                "template",
                "hidden_ratio",
                "hidden_ratio_pixels",
                "n_cells",
                "n_hidden_cells",
                "cell",
                "fill",
            }
        ),
        "template_search": saliency.search if saliency else None,
        "attribution_images_per_second": saliency.rate if saliency else None,
        "device": torch_device.type,
        "reference_accuracy_on_raw_test": accuracy["raw"],
        "reference_accuracy_on_masked_test": accuracy["masked"],
        "reference_accuracy_on_random_masked_test": accuracy["random"],
    }
    write_json(paths.masks_metrics, metrics)
    log.info(
        "hid %d of %d cells; reference accuracy on test: raw %.4f, %s mask %.4f, random mask %.4f",
        n_hidden,
        gh * gw,
        accuracy["raw"],
        cfg.strategy,
        accuracy["masked"],
        accuracy["random"],
    )
    return metrics


def _figures(paths: Paths, saliency: Saliency | None, released: dict[str, ReleasedSplit], raw: Split) -> None:
    out = paths.masks_reports
    if saliency is not None:
        title = {
            "mean": "mean attribution",
            "class_contrast": "between-class spread of attribution",
            "mean_spread": "mean attribution, cells kept apart",
        }
        name = saliency.template_name or "mean"
        heatmap(saliency.template, out / "template.png", f"critical template ({title[name]}, train)")
    visible = released["train"].masks.mean(axis=0)
    heatmap(visible, out / "mask.png", "mask: share of images where a pixel is visible", cmap="gray")
    k = min(8, len(raw.images))
    image_grid(
        [("raw", raw.images[:k]), ("released", released["train"].images[:k])],
        out / "samples.png",
        "raw vs released (train)",
    )
