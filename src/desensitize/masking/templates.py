"""Attribution-guided masks: set-scope critical templates, the privacy-aware `restorability` template,
the held-out utility score the mask search ranks candidates by, and per-image saliency masks (one mask
per image from its own attribution map).

A set-scope template is one (H, W) map built from the train images' attribution maps; its mask
keeps the cells holding the most of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from desensitize.config import AttributionParams
from desensitize.learning.training import predict
from desensitize.masking.attribution import attribution_maps
from desensitize.masking.grid import (
    cell_scores,
    class_contrast,
    expand,
    grid_shape,
    hide_lowest,
    mask_from_maps,
    n_hidden_cells,
)
from desensitize.runtime.device import to_float

RESTORABILITY_RIDGE = 1e-3  # ridge on the visible pixels' covariance (pixel values in [0, 1])
RESTORABILITY_DETAIL = 4  # per cell side, the pooled values restorability is computed on


class TemplateStats:
    """What every set template needs from the train split, accumulated shard by shard so that neither the
    images nor their attribution maps are ever held whole: per class, the count and the sum of the maps;
    for each cell size of `cells` (the `restorability` template), per class the sum of the pooled images
    (see pooled_images) and over all images the sum of their cross-products. Float64 sums: the
    templates do not depend on how the split is sharded (beyond rounding at 1e-16, far below any
    difference between cells)."""

    def __init__(self, cells: Iterable[int] = ()) -> None:
        self.counts: dict[int, int] = {}
        self.map_sums: dict[int, np.ndarray] = {}
        self.feature_sums: dict[int, dict[int, np.ndarray]] = {cell: {} for cell in cells}
        self.cross: dict[int, np.ndarray] = {}

    def add(self, maps: np.ndarray, images: np.ndarray, labels: np.ndarray) -> None:
        """One shard: its (N, H, W) attribution maps, uint8 (N, C, H, W) images and labels."""
        maps = np.asarray(maps, dtype=np.float64)
        features = {cell: pooled_images(images, cell) for cell in self.feature_sums}
        for c in np.unique(labels).tolist():
            members = labels == c
            self.counts[c] = self.counts.get(c, 0) + int(members.sum())
            self.map_sums[c] = self.map_sums.get(c, 0) + maps[members].sum(axis=0)
            for cell, x in features.items():
                self.feature_sums[cell][c] = self.feature_sums[cell].get(c, 0) + x[members].sum(axis=0)
        for cell, x in features.items():
            self.cross[cell] = self.cross.get(cell, 0) + x.T @ x

    def mean(self) -> np.ndarray:
        """The mean attribution map."""
        return sum(self.map_sums.values()) / sum(self.counts.values())

    def class_means(self) -> np.ndarray:
        """(K, H, W): each class's mean map, classes in label order (those present only)."""
        return np.stack([self.map_sums[c] / self.counts[c] for c in sorted(self.counts)])

    def within_class_covariance(self, cell: int) -> np.ndarray:
        """Covariance of the pooled images around their class means (see pooled_images): (P, P)."""
        n = sum(self.counts.values())
        between = sum(np.outer(s, s) / self.counts[c] for c, s in self.feature_sums[cell].items())
        return (self.cross[cell] - between) / max(n, 1)


def template_label(name: str, weight: float | None) -> str:
    """A set template's name in candidate names: `restorability` at a weight other than 1 carries it."""
    return name if weight in (None, 1.0) else f"{name} w{weight:g}"


def set_templates(
    stats: TemplateStats, names: list[str], cell: int, keep: int, weights: Sequence[float] = (1.0,)
) -> dict[str, tuple[str, float | None, np.ndarray]]:
    """Set-scope templates: label (see template_label) -> (name, restorability weight or None, (H, W) map;
    for `restorability`, the (gh, gw) rank scores at `cell`) of the train attribution maps, from their
    statistics. `mean`: the mean map; `class_contrast`: the between-class spread (masks.class_contrast);
    `mean_spread`: the mean map, its cells kept apart when masked (masks.spread_ranks); `restorability`:
    see restorability_ranks (ranked up to `keep` cells), one per weight of `weights`."""
    out = {}
    for name in names:
        if name in ("mean", "mean_spread"):
            out[name] = (name, None, stats.mean())
        elif name == "class_contrast":
            out[name] = (name, None, class_contrast(stats.class_means()))
        else:
            evidence = cell_scores(class_contrast(stats.class_means()), cell)
            cov = stats.within_class_covariance(cell)
            for w in weights:
                out[template_label(name, w)] = (name, w, restorability_ranks(evidence, cov, keep, w))
    return out


def template_mask(name: str, template: np.ndarray, cell: int, ratio: float, shape: tuple[int, int]) -> np.ndarray:
    """The set mask of a template at a cell size and hidden ratio."""
    if name == "restorability":  # rank scores per cell already
        height, width = shape
        return expand(hide_lowest(template, n_hidden_cells(template.size, ratio)), height, width, cell)
    return mask_from_maps(template, cell, ratio, spread=name == "mean_spread")


def pooled_images(images: np.ndarray, cell: int) -> np.ndarray:
    """The images average-pooled to at most RESTORABILITY_DETAIL x RESTORABILITY_DETAIL values per cell
    (channels averaged), float64 (N, P), P = cells x detail^2, in grid-cell-major order so cell k owns
    columns [k * d^2, (k + 1) * d^2): what restorability is computed on."""
    _, _, height, width = images.shape
    gh, gw = grid_shape(height, width, cell)
    d = min(cell, RESTORABILITY_DETAIL)
    x = to_float(images).mean(dim=1, keepdim=True)
    x = F.pad(x, (0, gw * cell - width, 0, gh * cell - height))
    x = F.adaptive_avg_pool2d(x, (gh * d, gw * d)).numpy().astype(np.float64)
    return x.reshape(len(x), gh, d, gw, d).transpose(0, 1, 3, 2, 4).reshape(len(x), -1)


def restorability(cov: np.ndarray, kept: np.ndarray) -> float:
    """Share of the hidden cells' within-class variance a linear (ridge) predictor reads off the kept
    cells: tr(S_hv (S_vv + r I)^-1 S_vh) / tr(S_hh), with `kept` the (gh, gw) cell mask (1 = visible).
    What the label does not already tell an attacker about the hidden pixels, and the visible ones do."""
    per_cell = cov.shape[0] // kept.size
    visible = np.repeat(kept.ravel().astype(bool), per_cell)
    total = np.trace(cov[np.ix_(~visible, ~visible)])
    if not visible.any() or total <= 0:
        return 0.0
    s_vv = cov[np.ix_(visible, visible)] + RESTORABILITY_RIDGE * np.eye(int(visible.sum()))
    s_vh = cov[np.ix_(visible, ~visible)]
    return float(np.sum(s_vh * np.linalg.solve(s_vv, s_vh)) / total)


def restorability_ranks(evidence: np.ndarray, cov: np.ndarray, keep: int, weight: float = 1.0) -> np.ndarray:
    """The privacy-aware template, (gh, gw) rank scores (higher = kept sooner): cells are kept greedily,
    each time the one that adds the most class evidence (its share of `evidence`, the between-class
    spread of attribution per cell) minus `weight` times the restorability it adds (see `restorability`,
    on `cov`, the train images' within-class covariance): both are shares, so at weight 1 a cell is worth
    keeping when it tells more about the class than it lets an attacker redraw of the rest; a smaller
    weight trades more of the rest for evidence (weight 0: class evidence alone). The first `keep` cells
    are ranked in the order chosen, the others after them by evidence."""
    gh, gw = evidence.shape
    share = evidence.ravel() / max(float(evidence.sum()), 1e-12)
    kept = np.zeros(gh * gw, dtype=np.uint8)
    ranks = share / 2  # below every greedy rank (>= 1)
    current = 0.0
    for step in range(min(keep, gh * gw - 1)):
        best, best_gain, best_r = -1, -np.inf, 0.0
        for c in np.flatnonzero(kept == 0):
            kept[c] = 1
            r = restorability(cov, kept.reshape(gh, gw))
            kept[c] = 0
            gain = share[c] - weight * max(r - current, 0.0)
            if gain > best_gain:
                best, best_gain, best_r = c, gain, r
        kept[best], ranks[best], current = 1, gh * gw - step, best_r
    return ranks.reshape(gh, gw)


def per_image_saliency_masks(
    model: torch.nn.Module,
    images: np.ndarray,
    cfg: AttributionParams,
    cell: int,
    ratio: float,
    device: torch.device,
    seed: int,
) -> np.ndarray:
    """Image-scope masks where labels are unknown (test, inference): each image is attributed
    against the reference model's own prediction."""
    targets = torch.as_tensor(predict(model, images, device))
    maps = attribution_maps(model, to_float(images), targets, cfg, device=device, seed=seed)
    return mask_from_maps(maps.numpy(), cell, ratio)
