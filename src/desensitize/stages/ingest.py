"""The `ingest` stage: a source -> disjoint, stratified, seeded train / test / public shards.

Exact duplicate images are dropped first, so no image content can appear in two splits. The
same params always give byte-identical shards (format: desensitize.data.splits).

A class too small for the split: one that would get no train image is refused (no model could learn
it); one that gets no test or no public image is ingested with a warning naming it and the splits it
lacks. Every later figure is then computed on the classes present (accuracy and chance level on the
test split's, within-class linkage on the attacked sample's), and the reports say which those are.
"""

from __future__ import annotations

import logging
from typing import Any

from desensitize.config import Params
from desensitize.data.sources import drop_duplicates, load_source
from desensitize.data.splits import FORMAT_VERSION, MANIFEST, split_indices, thin_classes
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
    _check_classes(thin_classes(source.labels, indices, source.class_names), params)
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


def _images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def _check_classes(thin: dict[str, tuple[int, list[str]]], params: Params) -> None:
    """Refuse the classes the split leaves without a train image; warn of those without a test or public one."""
    untrained = {name: count for name, (count, missing) in thin.items() if "train" in missing}
    if untrained:
        names = ", ".join(f"{name!r} ({_images(count)})" for name, count in untrained.items())
        fractions = ", ".join(f"{split} {value:g}" for split, value in params.data.split.model_dump().items())
        one = len(untrained) == 1
        raise DesensitizeError(
            f"class{'' if one else 'es'} {names} get{'s' if one else ''} no train image from data.split "
            f"({fractions}): no model could learn {'it' if one else 'them'}; give {'it' if one else 'them'} more "
            f"images or leave {'it' if one else 'them'} out of the source"
        )
    for name, (count, missing) in thin.items():
        log.warning(
            "class %r (%s) is too small for data.split: it has no %s image; accuracy and chance level are "
            "computed over the classes present in test, within-class linkage over those in the attacked "
            "sample, and the reports name them",
            name,
            _images(count),
            " and no ".join(missing),
        )
