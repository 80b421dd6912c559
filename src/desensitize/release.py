"""The release bundle (what leaves the owner), its verification, and its random counterpart.

`data/release/` holds exactly: `train-*.npz` and `test-*.npz` shards (uint8 masked `images`,
`labels`, and the `masks` applied to them) and `release.json` (settings, achieved hidden ratio,
class names, sha256 of every shard, package version). Never raw pixels at hidden positions,
attribution maps, the reference model, file names, or the `public` split. Nor anything that differs
between two runs that release the same shards (creation time, git commit, dirty flag: the masks
stage's MLflow run records those): DVC hashes the bundle, and a new hash reruns every stage after
it and registers a duplicate model version.

`verify_release` proves that against the raw data: every hidden pixel holds exactly the
declared fill (which never depends on the image), every visible pixel is the raw one, the masks
hide whole cells at the declared ratio, nothing else is in the bundle, and what release.json
declares about the mask (grid, cell and pixel ratios, fill value and seed) is what the shards and
the raw data show: these values become registry tags and card lines.

`ReleaseInfo` is the typed content of `release.json`, written by the masks stage and read by every
consumer. `MaskedShards` makes a split's release as each shard is read, so no stage holds a whole
split; `random_release` is what a seeded `random` mask of the same ratio, grid, scope and fill would
release: the baseline every comparison of mask strategies uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

import desensitize
from desensitize.config import MaskParams
from desensitize.errors import DesensitizeError
from desensitize.masks import apply_mask, cell_scores, fill_values, grid_shape, n_hidden_cells, random_masks
from desensitize.splits import split_shards
from desensitize.storage import (
    Shards,
    ShardSource,
    read_versioned_json,
    rechunk,
    write_json,
    write_shard_stream,
)

RELEASE_JSON = "release.json"
FORMAT_VERSION = 1
RELEASED_SPLITS = ("train", "test")
SHARD_ARRAYS = {"images", "labels", "masks"}
FILL_STREAMS = {"train": 0, "test": 1}


@dataclass(frozen=True)
class ReleasedSplit:
    images: np.ndarray  # uint8 (N, C, H, W), masked
    labels: np.ndarray  # int64 (N,)
    masks: np.ndarray  # uint8 (N, H, W), 1 = visible


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str
    images: int
    sha256: str


class MaskSettings(BaseModel):
    """How the release was masked: what the masks stage declares, before any shard is written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str
    method: str | None  # the attribution method (saliency strategy)
    noise_tunnel: bool | None
    scope: Literal["set", "image"]
    template: str | None  # set-scope saliency: the template the mask came from
    candidate: str | None = None  # the mask-search candidate released (template, cell, hidden ratio)
    privacy: Literal["gate", "none"] | None = None  # masks.privacy: gate = the release passed the full gate
    hidden_ratio_requested: float
    hidden_ratio: float  # hidden cells / cells, as achieved on the grid
    hidden_ratio_pixels: float
    cell: int
    grid: tuple[int, int]
    n_cells: int
    n_hidden_cells: int
    fill: Literal["zero", "mean", "noise"]
    fill_value: list[int]  # per channel; the fill is never computed from the image
    fill_seed: int | None  # noise fill
    image_shape: list[int]
    class_names: list[str]
    # The search: every candidate's settings, utility and privacy scores, the winner and the screen's
    # agreement with the full gate (desensitize.mask_search); None for a single candidate, ungated.
    search: dict[str, Any] | None = None


class ReleaseInfo(MaskSettings):
    """`release.json`."""

    format: Literal[1] = FORMAT_VERSION
    counts: dict[str, int]
    shards: dict[str, list[ShardEntry]]
    code_version: dict[str, Any]  # {"package": version}; no time or git commit (see the module docstring)

    def random_like(self) -> MaskParams:
        """The `random` mask settings matching this release (its ratio, grid, scope and fill)."""
        return MaskParams(
            strategy="random",
            scope=self.scope,
            hidden_ratio=self.hidden_ratio_requested,
            cell=self.cell,
            fill=self.fill,
        )


def write_release(
    directory: Path, splits: dict[str, Iterable[dict[str, np.ndarray]]], *, settings: MaskSettings, shard_size: int
) -> ReleaseInfo:
    """Write the bundle into `directory` (an empty temporary directory), each split from its pieces (any
    sizes: `images`, `labels`, `masks`; see MaskedShards), holding about one shard at a time; returns
    release.json's content."""
    shards = {name: write_shard_stream(directory, name, shard_size, pieces) for name, pieces in splits.items()}
    release = ReleaseInfo(
        **settings.model_dump(),
        counts={name: sum(entry["images"] for entry in entries) for name, entries in shards.items()},
        shards=shards,
        code_version={"package": desensitize.__version__},
    )
    write_json(Path(directory) / RELEASE_JSON, release.model_dump(mode="json"))
    return release


def read_release_info(directory: Path) -> ReleaseInfo:
    path = Path(directory) / RELEASE_JSON
    try:
        return ReleaseInfo.model_validate(read_versioned_json(path, FORMAT_VERSION))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise DesensitizeError(f"{path}: {key}: {first['msg']}; make the release again") from None


def released_shards(directory: Path, split: str) -> Shards:
    """One released split's shards, read one at a time, each checked against the sha256 in release.json."""
    release = read_release_info(directory)
    if split not in release.shards:
        raise DesensitizeError(f"{directory}: no {split!r} split in the release")
    entries = tuple(entry.model_dump() for entry in release.shards[split])
    return Shards(Path(directory), entries, hint="the release bundle was altered; make it again")


def load_released(directory: Path, split: str) -> ReleasedSplit:
    """Read one released split whole (for the callers whose data is small), every shard checked."""
    arrays = released_shards(directory, split).read_all()
    return ReleasedSplit(arrays["images"], arrays["labels"], arrays["masks"])


def channel_mean(images: Iterable[np.ndarray]) -> np.ndarray:
    """The per-channel mean of the raw train pixels (the `mean` fill), from the images shard by shard:
    exact integer sums, so it does not depend on how the split is sharded."""
    total, count = 0, 0
    for part in images:
        total = total + part.sum(axis=(0, 2, 3), dtype=np.int64)
        count += part.shape[0] * part.shape[2] * part.shape[3]
    return np.rint(total / count).astype(np.uint8)


class MaskedShards:
    """A split's shards (`images`, `labels`; storage.ShardSource) with a mask (one (H, W) for the set, or
    (N, H, W), one per image) and a fill applied as each shard is read, in any order: the release of a
    split (or its random counterpart) with no more than a shard of it in memory. Shards come out as the
    release stores them: `images` (masked), `labels`, `masks` (per image). A `noise` fill is drawn for
    the whole split (seeded per split, as one array, so that the release does not depend on the shard
    size) and sliced per shard: with that fill the split's noise is held whole."""

    def __init__(
        self, shards: ShardSource, masks: np.ndarray, fill: str, mean: np.ndarray, seed: int, stream: int
    ) -> None:
        self.shards, self.masks, self.fill, self.mean, self.seed, self.stream = shards, masks, fill, mean, seed, stream
        self._values: np.ndarray | None = None

    @property
    def sizes(self) -> list[int]:
        return self.shards.sizes

    def masked(self, arrays: dict[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
        """The release of rows `start`, ... of the split (`arrays`, e.g. a shard already read)."""
        images = arrays["images"]
        if self._values is None:
            shape = (sum(self.sizes), *images.shape[1:])
            self._values = fill_values(self.fill, shape, self.mean, self.seed, self.stream)
        stop = start + len(images)
        mask = self.masks[start:stop] if self.masks.ndim == 3 else self.masks
        values = self._values[start:stop] if self.fill == "noise" else self._values
        return {
            "images": apply_mask(images, mask, values),
            "labels": arrays["labels"],
            "masks": _per_image(mask, len(images)),
        }

    def read(self, k: int) -> dict[str, np.ndarray]:
        return self.masked(self.shards.read(k), sum(self.sizes[:k]))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self.read(k) for k in range(len(self.sizes)))


def _per_image(mask: np.ndarray, count: int) -> np.ndarray:
    return mask if mask.ndim == 3 else np.broadcast_to(mask, (count, *mask.shape)).copy()


def random_split_masks(
    cfg: MaskParams, counts: dict[str, int], height: int, width: int, seed: int
) -> dict[str, np.ndarray]:
    """Seeded random cells for splits of `counts` images: one mask for the set, or one per image (a
    different stream per split)."""
    if cfg.scope == "set":
        mask = random_masks(None, height, width, cfg.cell, cfg.hidden_ratio, seed)
        return {name: mask for name in counts}
    return {
        name: random_masks(count, height, width, cfg.cell, cfg.hidden_ratio, seed, stream=FILL_STREAMS[name])
        for name, count in counts.items()
    }


def random_release(
    cfg: MaskParams, splits: dict[str, ShardSource], size: tuple[int, int], mean: np.ndarray, seed: int
) -> dict[str, MaskedShards]:
    """What a seeded `random` mask of cfg's ratio, grid, scope and fill releases of each split (images of
    `size`: height, width), made as each shard is read."""
    counts = {name: sum(split.sizes) for name, split in splits.items()}
    masks = random_split_masks(cfg, counts, *size, seed)
    return {
        name: MaskedShards(split, masks[name], cfg.fill, mean, seed, FILL_STREAMS[name])
        for name, split in splits.items()
    }


def random_release_of(info: ReleaseInfo, splits: dict[str, ShardSource], seed: int) -> dict[str, MaskedShards]:
    """The random counterpart of a written release: the baseline every comparison of mask strategies uses."""
    _, height, width = info.image_shape
    fill_value = np.asarray(info.fill_value, dtype=np.uint8)
    return random_release(info.random_like(), splits, (height, width), fill_value, seed)


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
