"""Attribution-guided masks: set-scope critical templates and their held-out search, and per-image
saliency masks (one mask per image from its own attribution map).

A set-scope template is one (H, W) map built from the train images' attribution maps; its mask
keeps the cells holding the most of it. `search` builds every template and keeps the one whose
mask lets a model trained through it score best on a seeded held-out share of train.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from desensitize.attribution import attribution_maps
from desensitize.config import TEMPLATES, MaskParams, Params
from desensitize.errors import DesensitizeError
from desensitize.masks import SEARCH_STREAM, class_contrast, mask_from_maps
from desensitize.release import FILL_STREAMS, channel_mean, mask_images
from desensitize.splits import Split
from desensitize.training import fit_and_score, predict, to_float

log = logging.getLogger(__name__)


@dataclass
class Saliency:
    masks: dict[str, np.ndarray]  # per split
    template: np.ndarray  # (H, W), the figure; for set scope also what the mask came from
    template_name: str | None  # set scope: which template made the mask
    search: dict[str, float] | None  # masks.template = search: each candidate's held-out accuracy
    rate: float  # images/s of attribution


def saliency_masks(params: Params, splits: dict[str, Split], model: torch.nn.Module, device: torch.device) -> Saliency:
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
                params.reference,
                images[rest],
                train.labels[rest],
                images[holdout],
                train.labels[holdout],
                num_classes=len(train.class_names),
                seed=params.seed,
                device=device,
                epochs=cfg.search.epochs,
                name=f"search {name}",
            )
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
