"""The release bundle's format: what leaves the owner, written by the masks stage and read by every
stage after it.

`data/release/` holds exactly: `train-*.npz` and `test-*.npz` shards (uint8 masked `images`,
`labels`, and the `masks` applied to them) and `release.json` (settings, achieved hidden ratio,
class names, sha256 of every shard, package version). Never raw pixels at hidden positions,
attribution maps, the reference model, file names, or the `public` split. Nor anything that differs
between two runs that release the same shards (creation time, git commit, dirty flag: the masks
stage's MLflow run records those): DVC hashes the bundle, and a new hash reruns every stage after
it and registers a duplicate model version.

`ReleaseInfo` is the typed content of `release.json`. Registered pickle-format models hold it
(desensitize.inference), so it and `ShardEntry` stay at this import path. Making a bundle's shards
and its random counterpart is desensitize.bundle.masked; proving a bundle is desensitize.bundle.verify.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

import desensitize
from desensitize.config import MaskParams
from desensitize.errors import DesensitizeError
from desensitize.storage import Shards, read_versioned_json, write_json, write_shard_stream

RELEASE_JSON = "release.json"
FORMAT_VERSION = 1
RELEASED_SPLITS = ("train", "test")
SHARD_ARRAYS = {"images", "labels", "masks"}
FILL_STREAMS = {"train": 0, "test": 1}  # the noise stream of each split's fill (and per-image random masks)


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
    # agreement with the full gate (desensitize.search.gated); None for a single candidate, ungated.
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
