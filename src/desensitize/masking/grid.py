"""Masks on a cell grid: from scores to masks, baseline strategies, fills, application.

A mask is uint8 (H, W) or (N, H, W): 1 = visible, 0 = hidden. The image is cut into a grid of
`cell` x `cell` pixel cells (the last row/column of cells is partial when `cell` does not divide
the size) and exactly `n_hidden_cells(n_cells, ratio)` whole cells are hidden.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from desensitize.errors import DesensitizeError

# Fixed stream ids so that different random uses of the same seed never share numbers.
RANDOM_MASK_STREAM = 1
NOISE_FILL_STREAM = 2
SEARCH_STREAM = 3  # the held-out share of masks.template = search


def grid_shape(height: int, width: int, cell: int) -> tuple[int, int]:
    return math.ceil(height / cell), math.ceil(width / cell)


def n_hidden_cells(n_cells: int, ratio: float) -> int:
    """round(ratio * n_cells), halves rounded up; at least one cell hidden and one visible."""
    n_hidden = math.floor(ratio * n_cells + 0.5)
    if not 0 < n_hidden < n_cells:
        raise DesensitizeError(
            f"masks.hidden_ratio = {ratio:g} hides {n_hidden} of {n_cells} cells; choose a ratio or "
            "masks.cell that hides at least one cell and keeps at least one"
        )
    return n_hidden


def cell_scores(maps: np.ndarray, cell: int) -> np.ndarray:
    """Sum of (..., H, W) maps over each cell -> (..., gh, gw). Partial edge cells sum what they hold."""
    *lead, height, width = maps.shape
    gh, gw = grid_shape(height, width, cell)
    padded = np.zeros((*lead, gh * cell, gw * cell), dtype=np.float64)
    padded[..., :height, :width] = maps
    return padded.reshape(*lead, gh, cell, gw, cell).sum(axis=(-3, -1))


def hide_lowest(scores: np.ndarray, n_hidden: int) -> np.ndarray:
    """Cell mask (..., gh, gw) that hides the n_hidden lowest-scoring cells (ties: lower index first)."""
    *lead, gh, gw = scores.shape
    flat = scores.reshape(*lead, gh * gw)
    order = np.argsort(flat, axis=-1, kind="stable")
    visible = np.ones_like(flat, dtype=np.uint8)
    np.put_along_axis(visible, order[..., :n_hidden], 0, axis=-1)
    return visible.reshape(*lead, gh, gw)


def expand(cell_mask: np.ndarray, height: int, width: int, cell: int) -> np.ndarray:
    """Cell mask (..., gh, gw) -> pixel mask (..., H, W)."""
    pixels = np.repeat(np.repeat(cell_mask, cell, axis=-2), cell, axis=-1)
    return np.ascontiguousarray(pixels[..., :height, :width])


def spread_ranks(scores: np.ndarray) -> np.ndarray:
    """Re-rank a (gh, gw) grid so that cells are kept best first but apart: a cell next to (8
    neighbours) one already kept comes after every cell that is not. Returns rank scores (higher =
    kept sooner) for hide_lowest. Adjacent cells carry overlapping evidence; cells spread over the
    object let a model retrained on the release see more of its outline."""
    gh, gw = scores.shape
    taken = np.zeros((gh + 2, gw + 2), dtype=bool)  # padded: neighbours of edge cells exist
    apart, later = [], []
    for index in np.argsort(-scores.ravel(), kind="stable"):
        row, col = divmod(int(index), gw)
        if taken[row : row + 3, col : col + 3].any():
            later.append(index)
        else:
            apart.append(index)
            taken[row + 1, col + 1] = True
    ranks = np.empty(gh * gw)
    ranks[apart + later] = np.arange(gh * gw, 0, -1)
    return ranks.reshape(gh, gw)


def mask_from_maps(maps: np.ndarray, cell: int, ratio: float, spread: bool = False) -> np.ndarray:
    """Keep the cells holding the most attribution, hide the rest: (..., H, W) maps -> masks.
    `spread` (one (H, W) map only): keep them apart first, see spread_ranks."""
    height, width = maps.shape[-2:]
    scores = cell_scores(maps, cell)
    if spread:
        scores = spread_ranks(scores)
    n_hidden = n_hidden_cells(scores.shape[-2] * scores.shape[-1], ratio)
    return expand(hide_lowest(scores, n_hidden), height, width, cell)


def class_contrast(class_means: np.ndarray) -> np.ndarray:
    """Between-class spread of attribution, (K, H, W) per-class mean maps -> (H, W): their std over
    classes. High where the evidence differs from class to class; low where every class puts its
    attribution alike (e.g. the centre every garment covers), which a mean template favours."""
    return class_means.std(axis=0)


def random_masks(
    count: int | None, height: int, width: int, cell: int, ratio: float, seed: int, stream: int = 0
) -> np.ndarray:
    """Seeded random cells: one (H, W) mask when count is None, else (count, H, W), one per image."""
    gh, gw = grid_shape(height, width, cell)
    n_hidden = n_hidden_cells(gh * gw, ratio)
    rng = np.random.default_rng([seed, RANDOM_MASK_STREAM, stream])
    scores = rng.random((1 if count is None else count, gh, gw))
    masks = expand(hide_lowest(scores, n_hidden), height, width, cell)
    return masks[0] if count is None else masks


def geometric_mask(kind: str, height: int, width: int, cell: int, ratio: float) -> np.ndarray:
    """`center` hides the cells nearest the image centre, `border` those farthest from it."""
    gh, gw = grid_shape(height, width, cell)
    rows = (np.arange(gh) * cell + np.minimum(cell, height - np.arange(gh) * cell) / 2)[:, None]
    cols = (np.arange(gw) * cell + np.minimum(cell, width - np.arange(gw) * cell) / 2)[None, :]
    distance = np.hypot(rows - height / 2, cols - width / 2)
    scores = distance if kind == "center" else -distance
    return expand(hide_lowest(scores, n_hidden_cells(gh * gw, ratio)), height, width, cell)


def fill_values(kind: str, shape: tuple[int, ...], channel_mean: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """What hidden pixels become, broadcastable to `shape` (N, C, H, W); never derived from the image itself.

    `zero`: 0; `mean`: the per-channel dataset mean; `noise`: fresh uniform noise, seeded per `stream`.
    """
    if kind == "zero":
        return np.zeros((1, shape[1], 1, 1), dtype=np.uint8)
    if kind == "mean":
        return np.asarray(channel_mean, dtype=np.uint8).reshape(1, shape[1], 1, 1)
    if kind == "noise":
        return np.random.default_rng([seed, NOISE_FILL_STREAM, stream]).integers(0, 256, shape, dtype=np.uint8)
    raise DesensitizeError(f"masks.fill = {kind!r}: expected zero, mean or noise")


def apply_mask(images: np.ndarray, masks: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """Released pixels: x where the mask is 1, the fill where it is 0. uint8 in, uint8 out."""
    visible = (masks[:, None] if masks.ndim == 3 else masks[None, None]).astype(bool)
    return np.where(visible, images, fill).astype(np.uint8)


def channel_mean(images: Iterable[np.ndarray]) -> np.ndarray:
    """The per-channel mean of the raw train pixels (the `mean` fill), from the images shard by shard:
    exact integer sums, so it does not depend on how the split is sharded."""
    total, count = 0, 0
    for part in images:
        total = total + part.sum(axis=(0, 2, 3), dtype=np.int64)
        count += part.shape[0] * part.shape[2] * part.shape[3]
    return np.rint(total / count).astype(np.uint8)
