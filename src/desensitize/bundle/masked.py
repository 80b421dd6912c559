"""A split's release made as each shard is read: the masks and fill applied to raw shards
(`MaskedShards`), so no stage holds a whole split; and the random counterpart of a release, what a
seeded `random` mask of the same ratio, grid, scope and fill would release: the baseline every
comparison of mask strategies uses."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from desensitize.config import MaskParams
from desensitize.masking.grid import apply_mask, fill_values, random_masks
from desensitize.release import FILL_STREAMS, ReleaseInfo
from desensitize.storage import ShardSource


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
