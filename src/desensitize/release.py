"""The release bundle (what leaves the owner) and its verification.

`data/release/` holds exactly: `train-*.npz` and `test-*.npz` shards (uint8 masked `images`,
`labels`, and the `masks` applied to them) and `release.json` (settings, achieved hidden ratio,
class names, sha256 of every shard, creation time, code version). Never raw pixels at hidden
positions, attribution maps, the reference model, file names, or the `public` split.

`verify_release` proves that against the raw data: every hidden pixel holds exactly the
declared fill (which never depends on the image), every visible pixel is the raw one, the masks
hide whole cells at the declared ratio, and nothing else is in the bundle.
"""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import desensitize
from desensitize.errors import DesensitizeError
from desensitize.ingest import load_split
from desensitize.masks import cell_scores, fill_values, grid_shape
from desensitize.storage import read_shards, read_versioned_json, write_json, write_shards

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


def code_version() -> dict[str, Any]:
    """Package version and, when run from a git checkout, the commit and whether it was dirty."""
    here = Path(__file__).resolve().parent
    version: dict[str, Any] = {"package": desensitize.__version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        version.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def write_release(
    directory: Path,
    splits: dict[str, ReleasedSplit],
    *,
    info: dict[str, Any],
    shard_size: int,
) -> dict[str, Any]:
    """Write the bundle into `directory` (an empty temporary directory); returns release.json's content."""
    shards = {
        name: write_shards(directory, name, shard_size, images=s.images, labels=s.labels, masks=s.masks)
        for name, s in splits.items()
    }
    release = {
        **info,
        "format": FORMAT_VERSION,
        "counts": {name: len(s.images) for name, s in splits.items()},
        "shards": shards,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "code_version": code_version(),
    }
    write_json(Path(directory) / RELEASE_JSON, release)
    return release


def read_release_info(directory: Path) -> dict[str, Any]:
    return read_versioned_json(Path(directory) / RELEASE_JSON, FORMAT_VERSION)


def load_released(directory: Path, split: str) -> ReleasedSplit:
    release = read_release_info(directory)
    if split not in release["shards"]:
        raise DesensitizeError(f"{directory}: no {split!r} split in the release")
    arrays = read_shards(directory, release["shards"][split], hint="the release bundle was altered; make it again")
    return ReleasedSplit(arrays["images"], arrays["labels"], arrays["masks"])


def _first(where: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(where)[0])


def verify_release(directory: Path, raw_dir: Path) -> dict[str, Any]:
    """Raise DesensitizeError naming the first offending item; returns a summary when all holds."""
    directory = Path(directory)
    release = read_release_info(directory)
    allowed = {RELEASE_JSON} | {e["file"] for name in RELEASED_SPLITS for e in release["shards"].get(name, [])}
    for path in sorted(directory.iterdir()):
        if path.name not in allowed:
            raise DesensitizeError(f"{path}: file not allowed in a release bundle (allowed: release.json and its shards)")
    if set(release["shards"]) != set(RELEASED_SPLITS):
        raise DesensitizeError(f"{directory / RELEASE_JSON}: splits {sorted(release['shards'])}, expected train and test")

    cell, n_hidden = release["cell"], release["n_hidden_cells"]
    summary: dict[str, Any] = {"release": str(directory), "splits": {}}
    for split in RELEASED_SPLITS:
        for entry in release["shards"][split]:
            with np.load(directory / entry["file"]) as shard:
                extra = set(shard.files) - SHARD_ARRAYS
            if extra:
                raise DesensitizeError(f"{directory / entry['file']}: arrays not allowed in a release: {sorted(extra)}")
        released = load_released(directory, split)  # checks every shard's sha256
        raw = load_split(raw_dir, split)
        where = f"{split}"
        if released.images.shape != raw.images.shape or released.images.dtype != np.uint8:
            raise DesensitizeError(f"{where}: images {released.images.shape} {released.images.dtype}, raw {raw.images.shape}")
        if not np.array_equal(released.labels, raw.labels):
            raise DesensitizeError(f"{where}: labels differ from the raw split")
        n, _, height, width = raw.images.shape
        if released.masks.shape != (n, height, width) or not np.isin(released.masks, (0, 1)).all():
            raise DesensitizeError(f"{where}: masks must be (N, H, W) of 0/1, got {released.masks.shape}")
        if release["scope"] == "set" and not (released.masks == released.masks[:1]).all():
            raise DesensitizeError(f"{where}: scope is 'set' but the images carry different masks")
        gh, gw = grid_shape(height, width, cell)
        cell_area = cell_scores(np.ones((height, width)), cell)
        hidden_area = cell_scores(1 - released.masks.astype(np.float64), cell)
        if not np.isin(hidden_area / cell_area, (0.0, 1.0)).all():
            raise DesensitizeError(f"{where}: masks do not hide whole {cell}x{cell} cells")
        counts = (hidden_area > 0).sum(axis=(1, 2))
        if (counts != n_hidden).any():
            i = int(np.flatnonzero(counts != n_hidden)[0])
            raise DesensitizeError(f"{where} image {i}: {counts[i]} hidden cells, release.json says {n_hidden} of {gh * gw}")

        fill = fill_values(
            release["fill"], raw.images.shape, np.asarray(release["fill_value"]), release["fill_seed"], FILL_STREAMS[split]
        )
        hidden = np.broadcast_to(released.masks[:, None] == 0, raw.images.shape)
        expected = np.where(hidden, fill, raw.images)
        wrong = released.images != expected
        if wrong.any():
            i, c, y, x = _first(wrong)
            value, raw_value = released.images[i, c, y, x], raw.images[i, c, y, x]
            if hidden[i, c, y, x]:
                leak = " (the raw value: raw pixel leaked)" if value == raw_value else ""
                problem = f"hidden pixel holds {value}, not the declared {release['fill']} fill{leak}"
            else:
                problem = f"visible pixel holds {value}, the raw image has {raw_value}"
            raise DesensitizeError(f"{where} image {i}, channel {c}, pixel (row {y}, col {x}): {problem}")
        summary["splits"][split] = {
            "images": n,
            "hidden_pixels": int(hidden[:, 0].sum()),
            "hidden_ratio_pixels": float(hidden[:, 0].mean()),
        }
    return summary
