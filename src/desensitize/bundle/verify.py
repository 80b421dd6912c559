"""`verify_release`: a release bundle proved on its own and, where the raw data it was made from is at
hand, against that data too. One set of checks, two reaches:

- the bundle alone (what the receiver, and the trainer's view, can prove opening nothing but the
  bundle): only release.json and its shards, every shard present with its recorded sha256 and only the
  allowed arrays, the declared counts, image shape, grid and ratios (cells and pixels) true of the shards
  and their masks, whole cells hidden at the declared count, one mask for a set-scope release, and every
  hidden pixel exactly the declared fill (the fill value for zero and mean, the noise regenerated from
  fill_seed for noise), which never depends on the image;
- with the raw data as well: the raw image shape, every visible pixel and every label equal to the raw
  ones (so no raw value sits where it is declared hidden and nothing else was altered), and a mean
  fill's value equal to the raw train images' per-channel mean.

What release.json declares becomes registry tags and card lines, hence these checks. The masks stage
runs the whole of it before a bundle lands in data/release, `desensitize verify-release` on any bundle,
and every stage that reads a release runs `verified_release` first (the `train` stage without the raw
data).
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


def _check_files(directory: Path, release: ReleaseInfo) -> None:
    """Nothing in the bundle but release.json and the shards it lists, and every one of those present."""
    path = directory / RELEASE_JSON
    if set(release.shards) != set(RELEASED_SPLITS):
        raise DesensitizeError(f"{path}: splits {sorted(release.shards)}, expected train and test")
    listed = [directory / entry.file for name in RELEASED_SPLITS for entry in release.shards[name]]
    allowed = {RELEASE_JSON} | {shard.name for shard in listed}
    for found in sorted(directory.iterdir()):
        if found.name not in allowed:
            raise DesensitizeError(
                f"{found}: file not allowed in a release bundle (allowed: release.json and its shards)"
            )
    for shard in listed:
        if not shard.is_file():
            raise DesensitizeError(
                f"{shard}: shard listed in release.json is missing (the release bundle is incomplete; make it again)"
            )


def _check_declared(release: ReleaseInfo, path: Path) -> None:
    """The settings in release.json that the shards alone cannot show: the grid against the image size
    and cell, the hidden count against the requested and the achieved ratio, the fill value and seed
    against the fill (0 for zero and noise, one level per channel for mean, a seed for noise only)."""
    if len(release.image_shape) != 3 or min(release.image_shape) < 1:
        raise DesensitizeError(f"{path}: image_shape {release.image_shape}, expected [channels, height, width]")
    channels, height, width = release.image_shape
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
    if len(release.fill_value) != channels or not all(0 <= v <= 255 for v in release.fill_value):
        raise DesensitizeError(
            f"{path}: fill_value {release.fill_value}, expected {channels} levels in 0..255 (one per channel)"
        )
    if release.fill != "mean" and release.fill_value != [0] * channels:
        raise DesensitizeError(
            f"{path}: fill_value {release.fill_value} does not match fill {release.fill!r} (expected {[0] * channels})"
        )
    if release.fill == "noise" and release.fill_seed is None:
        raise DesensitizeError(f"{path}: fill 'noise' needs the fill_seed it was drawn with, got null")
    if release.fill != "noise" and release.fill_seed is not None:
        raise DesensitizeError(
            f"{path}: fill_seed {release.fill_seed}, but fill {release.fill!r} draws no noise (expected null)"
        )


def _check_declared_against_raw(release: ReleaseInfo, path: Path, raw_train: Shards) -> None:
    """The image shape against the raw images; a mean fill's value against the raw train images' mean."""
    shape = list(raw_train.read(0)["images"].shape[1:])
    if release.image_shape != shape:
        raise DesensitizeError(f"{path}: image_shape {release.image_shape}, the raw images are {shape}")
    if release.fill == "mean":
        expected = channel_mean(arrays["images"] for arrays in raw_train).tolist()
        if release.fill_value != expected:
            raise DesensitizeError(
                f"{path}: fill 'mean' declares fill_value {release.fill_value}, but the per-channel mean of "
                f"the raw train images is {expected}"
            )


def _check_arrays(release: ReleaseInfo, path: Path, arrays: dict[str, np.ndarray], count: int) -> ReleasedSplit:
    """One shard's arrays: only the allowed ones, `count` images of the declared shape, labels of the
    declared classes, masks of 0 and 1."""
    extra = set(arrays) - SHARD_ARRAYS
    if extra:
        raise DesensitizeError(f"{path}: arrays not allowed in a release: {sorted(extra)}")
    if set(arrays) != SHARD_ARRAYS:
        raise DesensitizeError(f"{path}: arrays {sorted(arrays)}, expected {sorted(SHARD_ARRAYS)}")
    released = ReleasedSplit(arrays["images"], arrays["labels"], arrays["masks"])
    _, height, width = release.image_shape
    if released.images.shape != (count, *release.image_shape) or released.images.dtype != np.uint8:
        raise DesensitizeError(
            f"{path}: images {released.images.shape} {released.images.dtype}, release.json declares {count} "
            f"uint8 images of shape {release.image_shape}"
        )
    if released.labels.shape != (count,) or not np.isin(released.labels, np.arange(len(release.class_names))).all():
        raise DesensitizeError(
            f"{path}: labels must be {count} class indices below {len(release.class_names)} (the declared classes)"
        )
    if released.masks.shape != (count, height, width) or not np.isin(released.masks, (0, 1)).all():
        raise DesensitizeError(f"{path}: masks must be (N, H, W) of 0/1, got {released.masks.shape}")
    return released


def _check_masks(release: ReleaseInfo, split: str, masks: np.ndarray, offset: int, first_mask: np.ndarray) -> None:
    """One mask for the set scope (the split's first, `first_mask`), whole cells hidden at the declared count."""
    if release.scope == "set" and not (masks == first_mask).all():
        raise DesensitizeError(f"{split}: scope is 'set' but the images carry different masks")
    cell, n_hidden = release.cell, release.n_hidden_cells
    cell_area = cell_scores(np.ones(masks.shape[1:]), cell)
    hidden_area = cell_scores(1 - masks.astype(np.float64), cell)
    if not np.isin(hidden_area / cell_area, (0.0, 1.0)).all():
        raise DesensitizeError(f"{split}: masks do not hide whole {cell}x{cell} cells")
    counts = (hidden_area > 0).sum(axis=(1, 2))
    if (counts != n_hidden).any():
        i = int(np.flatnonzero(counts != n_hidden)[0])
        raise DesensitizeError(
            f"{split} image {offset + i}: {counts[i]} hidden cells, release.json says {n_hidden} of {release.n_cells}"
        )


def _check_fill(
    release: ReleaseInfo,
    split: str,
    released: ReleasedSplit,
    raw: np.ndarray | None,
    fill: np.ndarray,
    offset: int,
) -> None:
    """Every hidden pixel of a piece of a split (its first image is image `offset`) holds the declared
    `fill`; with the `raw` images, every visible one the raw pixel. Raises naming the first that does not
    (a solid fill held by none of the hidden pixels is named as such, not as a leak)."""
    hidden = np.broadcast_to(released.masks[:, None] == 0, released.images.shape)
    if release.fill != "noise":
        for c, declared in enumerate(release.fill_value):
            values = released.images[:, c][hidden[:, c]]
            if values.size and values.min() == values.max() != declared:
                raise DesensitizeError(
                    f"{split}: declared fill_value {release.fill_value} (fill {release.fill!r}), but the hidden "
                    f"pixels of channel {c} hold {values.min()}"
                )
    wrong = released.images != np.where(hidden, fill, released.images if raw is None else raw)
    if not wrong.any():
        return
    i, c, y, x = _first(wrong)
    value = released.images[i, c, y, x]
    if hidden[i, c, y, x]:
        declared = (
            f"the noise of fill_seed {release.fill_seed}"
            if release.fill == "noise"
            else f"the declared fill_value {release.fill_value[c]}"
        )
        leak = " (the raw value: raw pixel leaked)" if raw is not None and value == raw[i, c, y, x] else ""
        problem = f"hidden pixel holds {value}, not {declared}{leak}"
    else:
        problem = f"visible pixel holds {value}, the raw image has {raw[i, c, y, x]}"
    raise DesensitizeError(f"{split} image {offset + i}, channel {c}, pixel (row {y}, col {x}): {problem}")


def _check_split(directory: Path, release: ReleaseInfo, split: str, raw_all: Shards | None) -> dict[str, Any]:
    """Every shard of one split, one at a time (with the raw rows it was made from, when given)."""
    released_all = released_shards(directory, split)  # each shard's sha256 checked as it is read
    n = sum(released_all.sizes)
    if release.counts.get(split) != n:
        raise DesensitizeError(
            f"{directory / RELEASE_JSON}: counts.{split} = {release.counts.get(split)}, its shards list {n} images"
        )
    if raw_all is not None and len(raw_all) != n:
        raise DesensitizeError(f"{split}: {n} released images, the raw split has {len(raw_all)}")
    raw_pieces = rechunk(raw_all, released_all.sizes) if raw_all is not None else None  # each shard's raw rows
    # The fill as the masks stage drew it: one value per channel, or a split's noise drawn as one array.
    fill = fill_values(
        release.fill, (n, *release.image_shape), np.asarray(release.fill_value), release.fill_seed, FILL_STREAMS[split]
    )
    offset, visible, hidden_pixels, first_mask = 0, 0, 0, None
    for k, entry in enumerate(release.shards[split]):
        released = _check_arrays(release, directory / entry.file, released_all.read(k), entry.images)
        raw = next(raw_pieces) if raw_pieces is not None else None
        if raw is not None and not np.array_equal(released.labels, raw["labels"]):
            raise DesensitizeError(f"{split}: labels differ from the raw split")
        first_mask = released.masks[:1] if first_mask is None else first_mask
        _check_masks(release, split, released.masks, offset, first_mask)
        count = len(released.images)
        piece_fill = fill[offset : offset + count] if release.fill == "noise" else fill
        _check_fill(release, split, released, None if raw is None else raw["images"], piece_fill, offset)
        offset += count
        visible += int(released.masks.sum(dtype=np.int64))
        hidden_pixels += int((released.masks == 0).sum(dtype=np.int64))
    _, height, width = release.image_shape
    ratio = float(1 - visible / (n * height * width))
    return {"images": n, "hidden_pixels": hidden_pixels, "hidden_ratio_pixels": ratio}


def verify_release(directory: Path, raw_dir: Path | None) -> dict[str, Any]:
    """Prove the bundle in `directory` (module docstring): on its own with `raw_dir` None, else against
    the raw data in `raw_dir` too. Raises DesensitizeError naming the first offending item; returns a
    summary when all holds. Reads the bundle (and the raw data) one shard at a time."""
    directory = Path(directory)
    release = read_release_info(directory)
    path = directory / RELEASE_JSON
    _check_files(directory, release)
    if raw_dir is not None:
        _check_declared_against_raw(release, path, split_shards(raw_dir, "train"))
    _check_declared(release, path)
    summary: dict[str, Any] = {"release": str(directory), "splits": {}}
    for split in RELEASED_SPLITS:
        raw_all = split_shards(raw_dir, split) if raw_dir is not None else None
        facts = summary["splits"][split] = _check_split(directory, release, split, raw_all)
        hidden = facts["hidden_ratio_pixels"]
        if split == "train" and not math.isclose(release.hidden_ratio_pixels, hidden, rel_tol=1e-9):
            raise DesensitizeError(
                f"{path}: hidden_ratio_pixels {release.hidden_ratio_pixels:g}, but the train masks hide {hidden:g}"
            )
    return summary


def verified_release(directory: Path, raw_dir: Path | None) -> ReleaseInfo:
    """What a stage calls before it reads a release: `verify_release` (on the bundle alone where `raw_dir`
    is None: the trainer's view), its failure as one line that says the release is refused; returns the
    release's info."""
    try:
        verify_release(directory, raw_dir)
    except DesensitizeError as exc:
        raise DesensitizeError(
            f"{directory}: release fails verification: {exc} (make it again with the masks stage)"
        ) from None
    return read_release_info(directory)
