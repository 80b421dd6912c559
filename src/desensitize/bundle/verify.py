"""`verify_release`: a release bundle proved against the raw data it was made from.

Every hidden pixel holds exactly the declared fill (which never depends on the image), every visible
pixel is the raw one, the masks hide whole cells at the declared ratio, nothing else is in the bundle,
and what release.json declares about the mask (grid, cell and pixel ratios, fill value and seed) is
what the shards and the raw data show: these values become registry tags and card lines. The masks
stage runs it before a bundle lands in data/release; `desensitize verify-release` runs it on any.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from desensitize.data.splits import split_shards
from desensitize.errors import DesensitizeError
from desensitize.masking.grid import cell_scores, channel_mean, fill_values, grid_shape, n_hidden_cells
from desensitize.release import (
    FILL_STREAMS,
    RELEASE_JSON,
    RELEASED_SPLITS,
    SHARD_ARRAYS,
    ReleasedSplit,
    ReleaseInfo,
    read_release_info,
    released_shards,
)
from desensitize.storage import Shards, rechunk


def _first(where: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(where)[0])


def _check_declared(release: ReleaseInfo, path: Path, raw_train: Shards) -> None:
    """The settings in release.json that the shards alone cannot prove: the grid against the image
    size and cell, the hidden count against the requested and the achieved ratio, the fill value
    against what the fill is (0, the raw train images' channel mean, or seeded noise)."""
    shape = list(raw_train.read(0)["images"].shape[1:])
    if release.image_shape != shape:
        raise DesensitizeError(f"{path}: image_shape {release.image_shape}, the raw images are {shape}")
    channels, height, width = shape
    grid = grid_shape(height, width, release.cell)
    if tuple(release.grid) != grid:
        raise DesensitizeError(
            f"{path}: cell {release.cell} cuts {height}x{width} images into a {grid[0]}x{grid[1]} grid, "
            f"grid says {list(release.grid)}"
        )
    n_cells, n_hidden = grid[0] * grid[1], release.n_hidden_cells
    if release.n_cells != n_cells:
        raise DesensitizeError(f"{path}: n_cells {release.n_cells}, but a {grid[0]}x{grid[1]} grid has {n_cells} cells")
    try:
        requested = n_hidden_cells(n_cells, release.hidden_ratio_requested)
    except DesensitizeError:
        raise DesensitizeError(
            f"{path}: hidden_ratio_requested {release.hidden_ratio_requested:g} hides no cell or every cell "
            f"of {n_cells}"
        ) from None
    if requested != n_hidden:
        raise DesensitizeError(
            f"{path}: hidden_ratio_requested {release.hidden_ratio_requested:g} hides {requested} of {n_cells} "
            f"cells, n_hidden_cells says {n_hidden}"
        )
    if not math.isclose(release.hidden_ratio, n_hidden / n_cells, rel_tol=1e-9):
        raise DesensitizeError(
            f"{path}: hidden_ratio {release.hidden_ratio:g}, but {n_hidden} of {n_cells} cells hidden "
            f"is {n_hidden / n_cells:g}"
        )
    if release.fill == "mean":
        expected = channel_mean(arrays["images"] for arrays in raw_train).tolist()
    else:
        expected = [0] * channels
    if release.fill_value != expected:
        if release.fill == "mean":
            raise DesensitizeError(
                f"{path}: fill 'mean' declares fill_value {release.fill_value}, but the per-channel mean of "
                f"the raw train images is {expected}"
            )
        raise DesensitizeError(
            f"{path}: fill_value {release.fill_value} does not match fill {release.fill!r} (expected {expected})"
        )
    if release.fill == "noise" and release.fill_seed is None:
        raise DesensitizeError(f"{path}: fill 'noise' needs the fill_seed it was drawn with, got null")
    if release.fill != "noise" and release.fill_seed is not None:
        raise DesensitizeError(
            f"{path}: fill_seed {release.fill_seed}, but fill {release.fill!r} draws no noise (expected null)"
        )


def _check_fill(
    release: ReleaseInfo,
    split: str,
    released: ReleasedSplit,
    raw: np.ndarray,
    hidden: np.ndarray,
    fill: np.ndarray,
    offset: int,
) -> None:
    """Every hidden pixel of a piece of a split (its first image is image `offset`) holds the declared
    `fill`; a visible one, the raw pixel. Raises naming the first that does not (a solid fill held by
    none of the hidden pixels is named as such, not as a leak)."""
    if release.fill != "noise":
        for c, declared in enumerate(release.fill_value):
            values = released.images[:, c][hidden[:, c]]
            if values.size and values.min() == values.max() != declared:
                raise DesensitizeError(
                    f"{split}: declared fill_value {release.fill_value} (fill {release.fill!r}), but the hidden "
                    f"pixels of channel {c} hold {values.min()}"
                )
    wrong = released.images != np.where(hidden, fill, raw)
    if not wrong.any():
        return
    i, c, y, x = _first(wrong)
    value, raw_value = released.images[i, c, y, x], raw[i, c, y, x]
    if hidden[i, c, y, x]:
        declared = (
            f"the noise of fill_seed {release.fill_seed}"
            if release.fill == "noise"
            else f"the declared fill_value {release.fill_value[c]}"
        )
        leak = " (the raw value: raw pixel leaked)" if value == raw_value else ""
        problem = f"hidden pixel holds {value}, not {declared}{leak}"
    else:
        problem = f"visible pixel holds {value}, the raw image has {raw_value}"
    raise DesensitizeError(f"{split} image {offset + i}, channel {c}, pixel (row {y}, col {x}): {problem}")


def _check_piece(
    release: ReleaseInfo,
    split: str,
    released: ReleasedSplit,
    raw: dict[str, np.ndarray],
    offset: int,
    first_mask: np.ndarray,
) -> None:
    """One released shard against the raw rows it was made from (its first image is image `offset`):
    labels, one mask for the set scope (the split's first, `first_mask`), whole cells hidden at the
    declared count."""
    n, _, height, width = raw["images"].shape
    if not np.array_equal(released.labels, raw["labels"]):
        raise DesensitizeError(f"{split}: labels differ from the raw split")
    if released.masks.shape != (n, height, width) or not np.isin(released.masks, (0, 1)).all():
        raise DesensitizeError(f"{split}: masks must be (N, H, W) of 0/1, got {released.masks.shape}")
    if release.scope == "set" and not (released.masks == first_mask).all():
        raise DesensitizeError(f"{split}: scope is 'set' but the images carry different masks")
    cell, n_hidden = release.cell, release.n_hidden_cells
    cell_area = cell_scores(np.ones((height, width)), cell)
    hidden_area = cell_scores(1 - released.masks.astype(np.float64), cell)
    if not np.isin(hidden_area / cell_area, (0.0, 1.0)).all():
        raise DesensitizeError(f"{split}: masks do not hide whole {cell}x{cell} cells")
    counts = (hidden_area > 0).sum(axis=(1, 2))
    if (counts != n_hidden).any():
        i = int(np.flatnonzero(counts != n_hidden)[0])
        raise DesensitizeError(
            f"{split} image {offset + i}: {counts[i]} hidden cells, release.json says {n_hidden} of {release.n_cells}"
        )


def verify_release(directory: Path, raw_dir: Path) -> dict[str, Any]:
    """Raise DesensitizeError naming the first offending item; returns a summary when all holds.
    Reads the bundle and the raw data one shard at a time."""
    directory = Path(directory)
    release = read_release_info(directory)
    allowed = {RELEASE_JSON} | {e.file for name in RELEASED_SPLITS for e in release.shards.get(name, [])}
    for path in sorted(directory.iterdir()):
        if path.name not in allowed:
            raise DesensitizeError(
                f"{path}: file not allowed in a release bundle (allowed: release.json and its shards)"
            )
    if set(release.shards) != set(RELEASED_SPLITS):
        raise DesensitizeError(f"{directory / RELEASE_JSON}: splits {sorted(release.shards)}, expected train and test")
    _check_declared(release, directory / RELEASE_JSON, split_shards(raw_dir, "train"))

    summary: dict[str, Any] = {"release": str(directory), "splits": {}}
    for split in RELEASED_SPLITS:
        for entry in release.shards[split]:
            with np.load(directory / entry.file) as shard:
                extra = set(shard.files) - SHARD_ARRAYS
            if extra:
                raise DesensitizeError(f"{directory / entry.file}: arrays not allowed in a release: {sorted(extra)}")
        released_all, raw_all = released_shards(directory, split), split_shards(raw_dir, split)  # sha256 checked
        n, fill, first_mask = len(raw_all), None, None
        offset, visible, hidden_pixels = 0, 0, 0
        raw_pieces = rechunk(raw_all, released_all.sizes)  # the raw rows of each released shard
        for arrays in released_all:
            released = ReleasedSplit(arrays["images"], arrays["labels"], arrays["masks"])
            raw = next(raw_pieces, None)
            if raw is None or released.images.shape != raw["images"].shape or released.images.dtype != np.uint8:
                raw_shape = "nothing left" if raw is None else raw["images"].shape
                raise DesensitizeError(
                    f"{split}: images {released.images.shape} {released.images.dtype} from image {offset}, "
                    f"raw {raw_shape} (the raw split has {n} images)"
                )
            first_mask = released.masks[:1] if first_mask is None else first_mask
            _check_piece(release, split, released, raw, offset, first_mask)
            if fill is None:  # noise: drawn for the whole split, as the masks stage drew it
                fill_value = np.asarray(release.fill_value)
                shape = (n, *raw["images"].shape[1:])
                fill = fill_values(release.fill, shape, fill_value, release.fill_seed, FILL_STREAMS[split])
            count = len(released.images)
            piece_fill = fill[offset : offset + count] if fill.shape[0] == n > 1 else fill
            hidden = np.broadcast_to(released.masks[:, None] == 0, raw["images"].shape)
            _check_fill(release, split, released, raw["images"], hidden, piece_fill, offset)
            offset += count
            visible += int(released.masks.sum(dtype=np.int64))
            hidden_pixels += int(hidden[:, 0].sum())
        if offset != n:
            raise DesensitizeError(f"{split}: {offset} released images, the raw split has {n}")
        _, height, width = release.image_shape
        hidden_ratio_pixels = float(1 - visible / (n * height * width))
        if split == "train" and not math.isclose(release.hidden_ratio_pixels, hidden_ratio_pixels, rel_tol=1e-9):
            raise DesensitizeError(
                f"{directory / RELEASE_JSON}: hidden_ratio_pixels {release.hidden_ratio_pixels:g}, but the train "
                f"masks hide {hidden_ratio_pixels:g}"
            )
        summary["splits"][split] = {
            "images": n,
            "hidden_pixels": hidden_pixels,
            "hidden_ratio_pixels": hidden_ratio_pixels,
        }
    return summary
