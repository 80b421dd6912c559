"""The `ingest` stage: a source -> disjoint, stratified, seeded train / test / public shards.

Exact duplicate images are dropped first, so no image content can appear in two splits. The
same params always give byte-identical shards (format: desensitize.data.splits).
"""

from __future__ import annotations

import logging
from typing import Any

from desensitize.config import Params
from desensitize.data.sources import drop_duplicates, load_source
from desensitize.data.splits import FORMAT_VERSION, MANIFEST, split_indices
from desensitize.errors import DesensitizeError
from desensitize.paths import Paths
from desensitize.storage import atomic_dir, write_json, write_shards

log = logging.getLogger(__name__)


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
            manifest["counts"][name] = {cls: int((labels == k).sum()) for k, cls in enumerate(source.class_names)}
            manifest["shards"][name] = write_shards(
                tmp, name, params.data.shard_size, images=source.images[idx], labels=labels
            )
        write_json(tmp / MANIFEST, manifest)
    log.info("ingested %s: %s", params.data.source, ", ".join(f"{name} {len(idx)}" for name, idx in indices.items()))
    return manifest
