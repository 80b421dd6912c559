"""The masks the `masks` stage chooses among: one per setting of masks.* (template, cell, hidden ratio,
scope), or with masks.template = search the grid of masks.search (templates x cells x hidden ratios x
scopes; for the `random` strategy as many seeded random draws per cell and ratio as there are set
templates, `restorability` counted once per weight: the same search budget).

Each candidate carries its train mask(s), what the search scores, and a rule that gives the masks of
any other split once it is chosen (per-image saliency masks are attributed only then). `scan_train` is
the one pass over the train split that gathers what the candidates are made from.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from itertools import product

import numpy as np
import torch

from desensitize.config import MaskParams, Params
from desensitize.errors import DesensitizeError
from desensitize.masking.attribution import attribution_maps
from desensitize.masking.grid import (
    channel_mean,
    geometric_mask,
    grid_shape,
    mask_from_maps,
    n_hidden_cells,
    random_masks,
)
from desensitize.masking.templates import TemplateStats, per_image_saliency_masks, set_templates, template_mask
from desensitize.release import FILL_STREAMS
from desensitize.runtime.device import to_float
from desensitize.search.gated import Candidate
from desensitize.storage import Shards

log = logging.getLogger(__name__)

MasksFor = Callable[[str, Shards], np.ndarray]  # (split name, its shards) -> its (H, W) or (N, H, W) masks


def _axes(cfg: MaskParams) -> tuple[list[str], list[int], list[float], list[str]]:
    if cfg.template == "search":
        s = cfg.search
        return list(s.templates), list(s.cells), list(s.hidden_ratios), list(s.scopes or [cfg.scope])
    return [cfg.template], [cfg.cell], [cfg.hidden_ratio], [cfg.scope]


def _weights(cfg: MaskParams) -> list[float]:
    """The restorability template's weights: masks.search.restorability_weights in a search, else 1."""
    return list(cfg.search.restorability_weights) if cfg.template == "search" else [1.0]


def check_grid(cfg: MaskParams, height: int, width: int) -> None:
    """Every cell size fits the images and every ratio hides at least one cell and keeps one."""
    _, cells, ratios, _ = _axes(cfg)
    searched = cfg.template == "search"
    cell_key, ratio_key = (
        ("masks.search.cells", "masks.search.hidden_ratios") if searched else ("masks.cell", "masks.hidden_ratio")
    )
    for cell in cells:
        if cell > min(height, width):
            raise DesensitizeError(f"{cell_key}: cell {cell} is larger than the {height}x{width} images")
        gh, gw = grid_shape(height, width, cell)
        for ratio in ratios:
            n_hidden = math.floor(ratio * gh * gw + 0.5)
            if not 0 < n_hidden < gh * gw:
                raise DesensitizeError(
                    f"{ratio_key}: {ratio:g} hides {n_hidden} of the {gh * gw} cells of {cell} pixels on "
                    f"{height}x{width} images; every candidate must hide at least one cell and keep one"
                )


def template_stats(cfg: MaskParams) -> TemplateStats | None:
    """Empty statistics for the set templates of masks.* (covariances at every searched cell size when
    `restorability` is among them); None when no candidate is a set-scope saliency mask."""
    templates, cells, _, scopes = _axes(cfg)
    if cfg.strategy != "saliency" or "set" not in scopes:
        return None
    return TemplateStats(cells if "restorability" in templates else ())


def needs_maps(cfg: MaskParams) -> bool:
    """Whether a candidate is a per-image saliency mask, made from every train image's own map."""
    return cfg.strategy == "saliency" and "image" in _axes(cfg)[3]


def candidates(
    cfg: MaskParams,
    train: Shards,
    size: tuple[int, int],
    seed: int,
    *,
    stats: TemplateStats | None = None,
    maps: np.ndarray | None = None,
    model: torch.nn.Module | None = None,
    device: torch.device | None = None,
) -> list[Candidate]:
    """The candidates of masks.* for the train split (`size`: its images' height and width). The saliency
    strategy needs `stats` (see template_stats) for set-scope candidates, and for per-image ones `maps`
    (the train images' attribution against their labels) and `model` and `device` (the reference, for the
    per-image masks of other splits)."""
    height, width = size
    check_grid(cfg, height, width)
    templates, cells, ratios, scopes = _axes(cfg)
    searched = cfg.template == "search"
    out: list[Candidate] = []
    templates_at: dict[int, dict] = {}  # per cell: made once for every ratio (see set_templates)
    for scope, cell, ratio in product(scopes, cells, ratios):
        gh, gw = grid_shape(height, width, cell)
        realised = n_hidden_cells(gh * gw, ratio) / (gh * gw)
        base = {"scope": scope, "cell": cell, "hidden_ratio": realised, "hidden_ratio_requested": ratio}
        label = f"c{cell} h{realised:.3g}"
        if cfg.strategy == "saliency" and scope == "set":
            if cell not in templates_at:
                keep = gh * gw - min(n_hidden_cells(gh * gw, r) for r in ratios)
                templates_at[cell] = set_templates(stats, templates, cell, keep, _weights(cfg))
            for tag, (name, weight, template) in templates_at[cell].items():
                mask = template_mask(name, template, cell, ratio, (height, width))
                settings = {**base, "template": name, **({} if weight is None else {"restorability_weight": weight})}
                out.append(fixed(f"{tag} {label}", settings, mask, template))
        elif cfg.strategy == "saliency":
            train_masks = mask_from_maps(maps, cell, ratio)
            masks_for = _per_image_saliency(cfg, cell, ratio, train_masks, model, device, seed)
            out.append(_candidate(f"image {label}", {**base, "template": None}, train_masks, masks_for))
        elif cfg.strategy == "random":
            draws = len(templates) + (len(_weights(cfg)) - 1) * ("restorability" in templates) if searched else 1
            for draw in range(draws):
                masks_for = _random(scope, size, cell, ratio, seed, draw)
                name = f"random{f' {draw}' if draws > 1 else ''} {scope} {label}"
                out.append(
                    _candidate(name, {**base, "template": None, "draw": draw}, masks_for("train", train), masks_for)
                )
        else:
            mask = geometric_mask(cfg.strategy, height, width, cell, ratio)
            out.append(fixed(f"{cfg.strategy} {label}", {**base, "scope": "set", "template": None}, mask, None))
    return out


def _candidate(name: str, settings: dict, train_masks: np.ndarray, masks_for: MasksFor, template=None) -> Candidate:
    return Candidate(name, settings, train_masks, extra={"masks_for": masks_for, "template": template})


def fixed(name: str, settings: dict, mask: np.ndarray, template: np.ndarray | None) -> Candidate:
    return _candidate(name, settings, mask, lambda _name, _split: mask, template)


def _per_image_saliency(
    cfg: MaskParams, cell: int, ratio: float, train_masks: np.ndarray, model, device, seed: int
) -> MasksFor:
    """Train images are masked from their attribution against their labels; any other split against
    the reference model's predictions (labels are unknown where the masks are used)."""

    def masks_for(name: str, shards: Shards) -> np.ndarray:
        if name == "train":
            return train_masks
        return np.concatenate(
            [per_image_saliency_masks(model, a["images"], cfg.attribution, cell, ratio, device, seed) for a in shards]
        )

    return masks_for


def _random(scope: str, size: tuple[int, int], cell: int, ratio: float, seed: int, draw: int) -> MasksFor:
    """Draw 0 is the pipeline's usual random mask (plain_random, the attack stage's comparison)."""
    height, width = size

    def masks_for(name: str, shards: Shards) -> np.ndarray:
        if scope == "set":
            return random_masks(None, height, width, cell, ratio, seed, stream=draw)
        stream = FILL_STREAMS[name] + 100 * draw
        return random_masks(len(shards), height, width, cell, ratio, seed, stream=stream)

    return masks_for


def scan_train(
    params: Params, train: Shards, model: torch.nn.Module, device: torch.device
) -> tuple[TemplateStats | None, np.ndarray | None, np.ndarray, float | None]:
    """One pass over the train shards: the channel mean (the `mean` fill) and, for the saliency strategy,
    each shard's attribution against its labels, folded into the set templates' statistics; the maps are
    kept whole only when per-image masks are candidates. Returns (statistics, maps, channel mean,
    attribution images/s). Shard k is attributed with seed + k: one shard gives what one call over the
    whole split gives; for the stochastic methods (gradient_shap, noise tunnel) several shards draw
    differently (and gradient_shap's mean-image baseline is the shard's)."""
    cfg = params.masks
    stats = template_stats(cfg)
    keep_maps = needs_maps(cfg)
    saliency = stats is not None or keep_maps
    all_maps: list[np.ndarray] = []
    seconds = 0.0

    def images() -> Iterator[np.ndarray]:
        nonlocal seconds
        for k, arrays in enumerate(train):
            if saliency:
                start = time.perf_counter()
                images, labels = arrays["images"], arrays["labels"]
                maps = attribution_maps(
                    model,
                    to_float(images),
                    torch.as_tensor(labels),
                    cfg.attribution,
                    device=device,
                    seed=params.seed + k,
                ).numpy()
                seconds += time.perf_counter() - start
                if stats is not None:
                    stats.add(maps, images, labels)
                if keep_maps:
                    all_maps.append(maps)
            yield arrays["images"]

    mean = channel_mean(images())
    if not saliency:
        return None, None, mean, None
    rate = len(train) / seconds
    log.info("%s attribution: %.0f images/s on %s", cfg.attribution.method, rate, device)
    return stats, np.concatenate(all_maps) if keep_maps else None, mean, rate
