"""The `masks` stage: attribution -> critical template -> cell mask -> verified release bundle.

Owner side. Reads raw `train`/`test` and the reference model; writes `data/release/` (verified
before it is moved into place), `metrics/masks.json` and the figures in `reports/masks/`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from desensitize.attribution import attribution_maps
from desensitize.config import TEMPLATES, MaskParams, Params
from desensitize.errors import DesensitizeError
from desensitize.ingest import Split, load_split
from desensitize.masks import (
    SEARCH_STREAM,
    apply_mask,
    class_contrast,
    fill_values,
    geometric_mask,
    grid_shape,
    mask_from_maps,
    n_hidden_cells,
    random_masks,
)
from desensitize.models import load_checkpoint
from desensitize.paths import Paths
from desensitize.release import FILL_STREAMS, ReleasedSplit, verify_release, write_release
from desensitize.reports import heatmap, image_grid
from desensitize.storage import atomic_dir, write_json
from desensitize.training import best_device, fit_and_score, predict, to_float

log = logging.getLogger(__name__)


def _random(cfg: MaskParams, splits: dict[str, Split], seed: int) -> dict[str, np.ndarray]:
    """Seeded random cells: one mask for the set, or one per image (a different stream per split)."""
    _, _, height, width = next(iter(splits.values())).images.shape
    if cfg.scope == "set":
        mask = random_masks(None, height, width, cfg.cell, cfg.hidden_ratio, seed)
        return {name: mask for name in splits}
    return {
        name: random_masks(len(split.images), height, width, cfg.cell, cfg.hidden_ratio, seed, stream=FILL_STREAMS[name])
        for name, split in splits.items()
    }


def like_release(info: dict[str, Any]) -> MaskParams:
    """The `random` mask settings matching a release (its ratio, grid, scope and fill)."""
    return MaskParams(
        strategy="random", scope=info["scope"], hidden_ratio=info["hidden_ratio_requested"], cell=info["cell"],
        fill=info["fill"],
    )  # fmt: skip


def channel_mean(train: Split) -> np.ndarray:
    """The per-channel mean of the raw train pixels: the `mean` fill."""
    return np.rint(train.images.mean(axis=(0, 2, 3))).astype(np.uint8)


def random_counterpart(
    cfg: MaskParams, splits: dict[str, Split], mean: np.ndarray, seed: int
) -> dict[str, ReleasedSplit]:
    """What a seeded `random` mask of the same ratio, grid, scope and fill would release: the
    baseline that every comparison of mask strategies uses."""
    return _masked(splits, _random(cfg, splits, seed), cfg.fill, mean, seed)


def _masked(
    splits: dict[str, Split], masks: dict[str, np.ndarray], fill: str, mean: np.ndarray, seed: int
) -> dict[str, ReleasedSplit]:
    """Apply each split's mask(s) and fill (noise drawn from the split's own stream)."""
    return {
        name: ReleasedSplit(
            mask_images(split, masks[name], fill, mean, seed, FILL_STREAMS[name]),
            split.labels,
            _per_image(masks[name], len(split.images)),
        )
        for name, split in splits.items()
    }


@dataclass
class Saliency:
    masks: dict[str, np.ndarray]  # per split
    template: np.ndarray  # (H, W), the figure; for set scope also what the mask came from
    template_name: str | None  # set scope: which template made the mask
    search: dict[str, float] | None  # masks.template = search: each candidate's held-out accuracy
    rate: float  # images/s of attribution


def _saliency(params: Params, splits: dict[str, Split], model: torch.nn.Module, device: torch.device) -> Saliency:
    """Masks from attribution maps of the train images against their labels."""
    cfg, seed, train = params.masks, params.seed, splits["train"]
    # A bad held-out share fails before the attribution work.
    held_out = search_split(len(train.images), params) if cfg.scope == "set" and cfg.template == "search" else None
    start = time.perf_counter()
    train_maps = attribution_maps(
        model, to_float(train.images), torch.as_tensor(train.labels), cfg.attribution, device=device, seed=seed
    ).numpy()
    rate = len(train.images) / (time.perf_counter() - start)
    if cfg.scope == "image":
        masks = {"train": mask_from_maps(train_maps, cfg.cell, cfg.hidden_ratio)}
        for name, split in splits.items():
            if name != "train":
                masks[name] = per_image_saliency_masks(model, split.images, cfg, device, seed)
        return Saliency(masks, train_maps.mean(axis=0), None, None, rate)
    candidates = set_mask_candidates(train_maps, train.labels, cfg)
    masks = {name: mask for name, (_, mask) in candidates.items()}
    scores = search_template(masks, train, held_out, params, device) if held_out is not None else None
    chosen = max(scores, key=scores.__getitem__) if scores else cfg.template  # ties: the first, `mean`
    template, mask = candidates[chosen]
    return Saliency({name: mask for name in splits}, template, chosen, scores, rate)


def set_mask_candidates(
    maps: np.ndarray, labels: np.ndarray, cfg: MaskParams
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Set scope: template name -> (its (H, W) map of the train attribution maps, its set mask).
    Every template of TEMPLATES when masks.template = search (in that order), else the one named.
    `mean`: the mean map; `class_contrast`: the between-class spread (masks.class_contrast);
    `mean_spread`: the mean map's cells kept apart (masks.spread_ranks)."""
    names = [name for name in TEMPLATES if name != "search"] if cfg.template == "search" else [cfg.template]
    mean = maps.mean(axis=0)
    candidates = {}
    for name in names:
        template = class_contrast(maps, labels) if name == "class_contrast" else mean
        candidates[name] = template, mask_from_maps(template, cfg.cell, cfg.hidden_ratio, spread=name == "mean_spread")
    return candidates


def search_split(n: int, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (held-out, rest) indices of the n train images for masks.template = search."""
    share = params.masks.search.holdout
    n_holdout = round(share * n)
    if not 0 < n_holdout < n:
        raise DesensitizeError(
            f"masks.search.holdout = {share:g} holds out {n_holdout} of {n} train images; both parts need at least one"
        )
    order = np.random.default_rng([params.seed, SEARCH_STREAM]).permutation(n)
    return order[:n_holdout], order[n_holdout:]


def search_template(
    masks: dict[str, np.ndarray],
    train: Split,
    held_out: tuple[np.ndarray, np.ndarray],
    params: Params,
    device: torch.device,
) -> dict[str, float]:
    """Score each candidate's set mask (template name -> (H, W) mask) by what a model can still
    learn through it: a model with the reference's backbone and optimiser, trained
    `masks.search.epochs` epochs on the masked train images `rest`, scored on the `held-out` ones
    (see search_split). Test data is never used. Returns the held-out accuracy per template, in the
    order given. (Too few epochs favour a compact central mask that is quick to learn over a
    spread one that ends up better.)"""
    cfg = params.masks
    holdout, rest = held_out
    mean = channel_mean(train)
    scores: dict[str, float] = {}
    scored: dict[bytes, float] = {}  # candidates that give the same mask are scored once
    for name, mask in masks.items():
        if mask.tobytes() not in scored:
            images = mask_images(train, mask, cfg.fill, mean, params.seed, FILL_STREAMS["train"])
            scored[mask.tobytes()] = fit_and_score(
                params.reference, images[rest], train.labels[rest], images[holdout], train.labels[holdout],
                num_classes=len(train.class_names), seed=params.seed, device=device, epochs=cfg.search.epochs,
                name=f"search {name}",
            )  # fmt: skip
        scores[name] = scored[mask.tobytes()]
        log.info("template search: %s mask, held-out accuracy %.4f", name, scores[name])
    return scores


def per_image_saliency_masks(
    model: torch.nn.Module, images: np.ndarray, cfg: MaskParams, device: torch.device, seed: int
) -> np.ndarray:
    """Image-scope masks where labels are unknown (test, inference): each image is attributed
    against the reference model's own prediction."""
    targets = torch.as_tensor(predict(model, images, device))
    maps = attribution_maps(model, to_float(images), targets, cfg.attribution, device=device, seed=seed)
    return mask_from_maps(maps.numpy(), cfg.cell, cfg.hidden_ratio)


def _per_image(mask: np.ndarray, count: int) -> np.ndarray:
    return mask if mask.ndim == 3 else np.broadcast_to(mask, (count, *mask.shape)).copy()


def mask_images(
    split: Split, masks: np.ndarray, fill: str, channel_mean: np.ndarray, seed: int, stream: int
) -> np.ndarray:
    values = fill_values(fill, split.images.shape, channel_mean, seed, stream)
    return apply_mask(split.images, masks, values)


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
        saliency = _saliency(params, splits, model, torch_device)
        masks = saliency.masks
        log.info("%s attribution: %.0f images/s on %s", cfg.attribution.method, saliency.rate, torch_device)
    elif cfg.strategy == "random":
        masks = _random(cfg, splits, params.seed)
    else:
        mask = geometric_mask(cfg.strategy, height, width, cfg.cell, cfg.hidden_ratio)
        masks = {name: mask for name in splits}

    mean = channel_mean(splits["train"])
    released = _masked(splits, masks, cfg.fill, mean, params.seed)

    test = splits["test"]
    random_test = random_counterpart(cfg, {"test": test}, mean, params.seed)["test"].images
    accuracy = {
        "raw": float((predict(model, test.images, torch_device) == test.labels).mean()),
        "masked": float((predict(model, released["test"].images, torch_device) == test.labels).mean()),
        "random": float((predict(model, random_test, torch_device) == test.labels).mean()),
    }
    hidden_pixels = float(1 - released["train"].masks.mean())
    info = {
        "strategy": cfg.strategy,
        "method": cfg.attribution.method if cfg.strategy == "saliency" else None,
        "noise_tunnel": cfg.attribution.noise_tunnel if cfg.strategy == "saliency" else None,
        "scope": cfg.scope,
        "template": saliency.template_name if saliency else None,
        "hidden_ratio_requested": cfg.hidden_ratio,
        "hidden_ratio": n_hidden / (gh * gw),
        "hidden_ratio_pixels": hidden_pixels,
        "cell": cfg.cell,
        "grid": [gh, gw],
        "n_cells": gh * gw,
        "n_hidden_cells": n_hidden,
        "fill": cfg.fill,
        "fill_value": mean.tolist() if cfg.fill == "mean" else [0] * channels,
        "fill_seed": params.seed if cfg.fill == "noise" else None,
        "image_shape": [channels, height, width],
        "class_names": list(test.class_names),
    }
    with atomic_dir(paths.release) as tmp:
        write_release(tmp, released, info=info, shard_size=params.data.shard_size)
        verify_release(tmp, paths.raw)  # nothing unverified ever lands in data/release

    _figures(paths, saliency, released, splits["train"])
    metrics = {
        **{k: info[k] for k in ("strategy", "method", "scope", "template", "hidden_ratio", "hidden_ratio_pixels",
                                "n_cells", "n_hidden_cells", "cell", "fill")},
        "template_search": saliency.search if saliency else None,
        "attribution_images_per_second": saliency.rate if saliency else None,
        "device": torch_device.type,
        "reference_accuracy_on_raw_test": accuracy["raw"],
        "reference_accuracy_on_masked_test": accuracy["masked"],
        "reference_accuracy_on_random_masked_test": accuracy["random"],
    }  # fmt: skip
    write_json(paths.masks_metrics, metrics)
    log.info(
        "hid %d of %d cells; reference accuracy on test: raw %.4f, %s mask %.4f, random mask %.4f",
        n_hidden, gh * gw, accuracy["raw"], cfg.strategy, accuracy["masked"], accuracy["random"],
    )  # fmt: skip
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
