"""The raw splits in `data/raw/`: how a source is split, and the reader every stage uses.

`data/raw/` holds `<split>-<k>.npz` shards (uint8 images (N, C, H, W) and int64 labels) and
`manifest.json`, which records the sha256 of every shard; readers refuse a shard that differs.
Each split has its own content digest (`split_digest`), which MLflow logs as that split's dataset
digest: `cd data/raw && sha256sum train-*.npz | sha256sum` gives the same value.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from desensitize.config import SplitParams
from desensitize.errors import DesensitizeError
from desensitize.paths import SPLITS
from desensitize.storage import Shards, read_versioned_json, sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    class_names: tuple[str, ...]


def _allocate(n: int, fractions: tuple[float, ...]) -> list[int]:
    """Split n items by fractions: floors, then the largest remainders, totalling round(sum * n)."""
    exact = [f * n for f in fractions]
    counts = [int(np.floor(x)) for x in exact]
    target = min(n, int(round(sum(exact))))
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: max(0, target - sum(counts))]:
        counts[i] += 1
    return counts


def split_indices(labels: np.ndarray, fractions: SplitParams, seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded, disjoint index sets per split, each in a seeded random order."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    wanted = tuple(getattr(fractions, name) for name in SPLITS)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        start = 0
        for name, count in zip(SPLITS, _allocate(len(members), wanted), strict=True):
            parts[name].append(members[start : start + count])
            start += count
    return {name: rng.permutation(np.concatenate(parts[name])) for name in SPLITS}


def thin_classes(
    labels: np.ndarray, indices: dict[str, np.ndarray], class_names: tuple[str, ...]
) -> dict[str, tuple[int, list[str]]]:
    """The classes that some split of `indices` has no image of: name -> (its images in the source, the
    splits without one, in SPLITS order)."""
    thin = {}
    for k, name in enumerate(class_names):
        missing = [split for split in SPLITS if not (labels[indices[split]] == k).any()]
        if missing:
            thin[name] = (int((labels == k).sum()), missing)
    return thin


def read_manifest(raw_dir: Path) -> dict[str, Any]:
    return read_versioned_json(Path(raw_dir) / MANIFEST, FORMAT_VERSION)


def split_digest(raw_dir: Path, split: str) -> str:
    """One split's own digest: the sha256 of the `sha256sum` listing of its shards (hashed from the
    files, in the manifest's order), so the splits of one `data/raw` can be told apart."""
    if split not in SPLITS:
        raise DesensitizeError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    raw_dir = Path(raw_dir)
    listing = "".join(
        f"{sha256_file(raw_dir / entry['file'])}  {entry['file']}\n"
        for entry in read_manifest(raw_dir)["shards"][split]
    )
    return hashlib.sha256(listing.encode()).hexdigest()


def split_shards(raw_dir: Path, split: str) -> Shards:
    """One split's shards, read one at a time, each checked against the sha256 in the manifest."""
    if split not in SPLITS:
        raise DesensitizeError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    entries = read_manifest(raw_dir)["shards"][split]
    return Shards(Path(raw_dir), tuple(entries), hint="run the ingest stage again")


def load_split(raw_dir: Path, split: str) -> Split:
    """Read one split whole (for the callers whose data is small), every shard checked."""
    arrays = split_shards(raw_dir, split).read_all()
    return Split(arrays["images"], arrays["labels"], tuple(read_manifest(raw_dir)["class_names"]))
