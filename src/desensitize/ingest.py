"""The `ingest` stage: a source -> disjoint, stratified, seeded train / test / public shards.

`data/raw/` holds `<split>-<k>.npz` shards (uint8 images (N, C, H, W) and int64 labels) and
`manifest.json`. Exact duplicate images are dropped first, so no image content can appear in
two splits. The same params always give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from desensitize.config import Params, SplitParams
from desensitize.errors import DesensitizeError
from desensitize.paths import SPLITS, Paths
from desensitize.sources import Source, load_source
from desensitize.storage import atomic_dir, read_shards, read_versioned_json, write_json, write_shards

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    class_names: tuple[str, ...]


def image_digests(images: np.ndarray) -> list[bytes]:
    """One content digest per image (its raw bytes), to find duplicates across splits."""
    return [hashlib.sha256(image.tobytes()).digest() for image in images]


def drop_duplicates(source: Source) -> tuple[Source, int]:
    _, first = np.unique(np.array(image_digests(source.images)), return_index=True)
    keep = np.sort(first)
    dropped = len(source.images) - len(keep)
    return Source(source.images[keep], source.labels[keep], source.class_names), dropped


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


def ingest(params: Params, paths: Paths) -> dict[str, Any]:
    """Run the stage; returns the manifest written to `data/raw/manifest.json`."""
    source, dropped = drop_duplicates(load_source(params.data))
    if dropped:
        log.warning("dropped %d exact duplicate images so that no image lands in two splits", dropped)
    indices = split_indices(source.labels, params.data.split, params.seed)
    for name, idx in indices.items():
        if len(idx) == 0:
            raise DesensitizeError(
                f"data.split.{name}: split would be empty ({len(source.images)} images in {params.data.source!r}); "
                "raise the fraction or use a larger source"
            )
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "source": params.data.source,
        "seed": params.seed,
        "fractions": params.data.split.model_dump(),
        "image_shape": list(source.images.shape[1:]),
        "dtype": str(source.images.dtype),
        "class_names": list(source.class_names),
        "source_images": len(source.images) + dropped,
        "duplicates_dropped": dropped,
        "counts": {},
        "shards": {},
    }
    with atomic_dir(paths.raw) as tmp:
        for name, idx in indices.items():
            labels = source.labels[idx]
            manifest["counts"][name] = {
                cls: int((labels == k).sum()) for k, cls in enumerate(source.class_names)
            }
            manifest["shards"][name] = write_shards(
                tmp, name, params.data.shard_size, images=source.images[idx], labels=labels
            )
        write_json(tmp / MANIFEST, manifest)
    log.info(
        "ingested %s: %s",
        params.data.source,
        ", ".join(f"{name} {len(idx)}" for name, idx in indices.items()),
    )
    return manifest


def read_manifest(raw_dir: Path) -> dict[str, Any]:
    return read_versioned_json(Path(raw_dir) / MANIFEST, FORMAT_VERSION)


def load_split(raw_dir: Path, split: str) -> Split:
    """Read one split, checking every shard against the sha256 in the manifest."""
    if split not in SPLITS:
        raise DesensitizeError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    raw_dir = Path(raw_dir)
    manifest = read_manifest(raw_dir)
    arrays = read_shards(raw_dir, manifest["shards"][split], hint="run the ingest stage again")
    return Split(arrays["images"], arrays["labels"], tuple(manifest["class_names"]))
