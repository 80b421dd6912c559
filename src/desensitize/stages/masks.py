"""The `masks` stage: attribution -> candidate masks -> the privacy-constrained search -> verified
release bundle.

Owner side. Reads raw `train`/`test` (and, for the privacy gate, `public`: what the attacker trains
on) and the reference model; writes `data/release/` (verified before it is moved into place),
`metrics/masks.json` (headline) and `reports/masks/` (report.json, search.json, figures). With
masks.privacy = gate the release is the most useful candidate that passes the full privacy gate
(desensitize.search.gated); the stage fails naming the closest candidate when none does.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from desensitize.bundle.masked import MaskedShards, random_release
from desensitize.bundle.verify import verify_release
from desensitize.config import Params
from desensitize.data.splits import read_manifest, split_shards
from desensitize.learning.checkpoints import load_checkpoint
from desensitize.learning.training import predict
from desensitize.masking.grid import grid_shape, n_hidden_cells
from desensitize.paths import Paths
from desensitize.release import FILL_STREAMS, MaskSettings, write_release
from desensitize.reporting.figures import heatmap, image_grid
from desensitize.reporting.records import write_results
from desensitize.reporting.summary import tradeoff_lines
from desensitize.runtime.compute import executor, torch_threads
from desensitize.runtime.device import best_device
from desensitize.search import tradeoff
from desensitize.search.candidates import candidates, check_grid, scan_train
from desensitize.search.gated import Candidate
from desensitize.search.run import choose
from desensitize.storage import Shards, atomic_dir, atomic_path

log = logging.getLogger(__name__)


def generate_masks(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns the report (desensitize.reporting.records) and the attribution speed
    (for the MLflow run only: a wall-clock figure would make identical reruns differ for DVC).
    The raw splits are read one shard at a time (attribution, release, verification, the reference's
    accuracies); only the mask search (desensitize.search.run.choose) holds the train split whole."""
    cfg = params.masks
    manifest = read_manifest(paths.raw)
    channels, height, width = manifest["image_shape"]
    shards = {name: split_shards(paths.raw, name) for name in ("train", "test")}
    check_grid(cfg, height, width)  # a bad grid fails before any work
    torch_device = best_device(device)
    model, _ = load_checkpoint(paths.reference_model, torch_device)

    stats, maps, mean, rate = scan_train(params, shards["train"], model, torch_device)
    found = candidates(
        cfg, shards["train"], (height, width), params.seed, stats=stats, maps=maps, model=model, device=torch_device
    )
    # The search's own training (the amortized scoring's shared models) runs in this process with
    # compute.threads torch threads, as a unit would: the release must not depend on the caller's threads.
    with executor(params.compute) as ex, torch_threads(params.compute.threads):
        chosen, record = choose(
            params, paths, found, shards["train"], manifest["class_names"], mean, model, torch_device, ex
        )
    masks = {name: chosen.extra["masks_for"](name, split) for name, split in shards.items()}

    settings_of = chosen.settings
    gh, gw = grid_shape(height, width, settings_of["cell"])
    random_cfg = cfg.model_copy(
        update={
            "strategy": "random",
            "scope": settings_of["scope"],
            "cell": settings_of["cell"],
            "hidden_ratio": settings_of["hidden_ratio_requested"],
        }
    )
    released = {
        name: MaskedShards(split, masks[name], cfg.fill, mean, params.seed, FILL_STREAMS[name])
        for name, split in shards.items()
    }
    random_test = random_release(random_cfg, {"test": shards["test"]}, (height, width), mean, params.seed)["test"]
    accuracy = _reference_accuracy(model, shards["test"], released["test"], random_test, torch_device)
    settings = MaskSettings(
        strategy=cfg.strategy,
        method=cfg.attribution.method if cfg.strategy == "saliency" else None,
        noise_tunnel=cfg.attribution.noise_tunnel if cfg.strategy == "saliency" else None,
        scope=settings_of["scope"],
        template=settings_of.get("template"),
        candidate=chosen.name,
        privacy=cfg.privacy,
        hidden_ratio_requested=settings_of["hidden_ratio_requested"],
        hidden_ratio=settings_of["hidden_ratio"],
        hidden_ratio_pixels=float(1 - masks["train"].mean()),
        cell=settings_of["cell"],
        grid=(gh, gw),
        n_cells=gh * gw,
        n_hidden_cells=n_hidden_cells(gh * gw, settings_of["hidden_ratio_requested"]),
        fill=cfg.fill,
        fill_value=mean.tolist() if cfg.fill == "mean" else [0] * channels,
        fill_seed=params.seed if cfg.fill == "noise" else None,
        image_shape=[channels, height, width],
        class_names=list(manifest["class_names"]),
        search=record,
    )

    with atomic_dir(paths.release) as tmp:
        write_release(tmp, released, settings=settings, shard_size=params.data.shard_size)
        verify_release(tmp, paths.raw)  # nothing unverified ever lands in data/release

    first = shards["train"].read(0)
    _figures(paths, chosen, masks["train"], first["images"], released["train"].masked(first, 0)["images"])
    if record and "tradeoff" in record:
        _tradeoff(paths, record, accuracy["raw"])
    metrics = {
        **settings.model_dump(
            include={
                "strategy",
                "method",
                "scope",
                "template",
                "candidate",
                "privacy",
                "hidden_ratio",
                "hidden_ratio_pixels",
                "n_cells",
                "n_hidden_cells",
                "cell",
                "fill",
            }
        ),
        "search": record,
        "device": torch_device.type,
        "reference_accuracy_on_raw_test": accuracy["raw"],
        "reference_accuracy_on_masked_test": accuracy["masked"],
        "reference_accuracy_on_random_masked_test": accuracy["random"],
    }
    write_results(paths, "masks", metrics, headline(metrics))
    log.info(
        "released %s: hid %d of %d cells; reference accuracy on test: raw %.4f, masked %.4f, random mask %.4f",
        chosen.name,
        settings.n_hidden_cells,
        gh * gw,
        accuracy["raw"],
        accuracy["masked"],
        accuracy["random"],
    )
    return {**metrics, "attribution_images_per_second": rate}


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """metrics/masks.json: the mask released (template, cell size and hidden ratio), its hidden ratio and
    the reference model's accuracy on the test images under it."""
    return {
        "candidate": report["candidate"] or report["template"] or report["strategy"],
        "hidden_ratio": report["hidden_ratio"],
        "reference_masked": report["reference_accuracy_on_masked_test"],
    }


def _figures(paths: Paths, chosen: Candidate, masks: np.ndarray, raw: np.ndarray, released: np.ndarray) -> None:
    """The template, where the train masks leave pixels visible, and the first train images (`raw`,
    `released`: the first shard's) before and after."""
    out = paths.masks_reports
    template = chosen.extra.get("template")
    if template is not None:
        title = {
            "mean": "mean attribution",
            "class_contrast": "between-class spread of attribution",
            "mean_spread": "mean attribution, cells kept apart",
            "restorability": "cell rank: class evidence minus restorability",
        }
        heatmap(template, out / "template.png", f"critical template ({title[chosen.settings['template']]}, train)")
    visible = masks.mean(axis=0) if masks.ndim == 3 else masks.astype(np.float64)
    heatmap(visible, out / "mask.png", "mask: share of images where a pixel is visible", cmap="gray")
    k = min(8, len(raw))
    image_grid([("raw", raw[:k]), ("released", released[:k])], out / "samples.png", "raw vs released (train)")


def _tradeoff(paths: Paths, record: dict[str, Any], raw_accuracy: float) -> None:
    """tradeoff.png and summary.md: what the search found at each level of privacy (desensitize.search.tradeoff)."""
    chance = record["linkage_within_class_chance"]
    tradeoff.figure(record, chance=chance, raw_accuracy=raw_accuracy, path=paths.masks_reports / "tradeoff.png")
    lines = [
        "# Mask search: the price of each level of privacy",
        "",
        f"{len(record['candidates'])} candidates scored ({record['scoring']} scoring); within-class chance "
        f"{chance:.4f}; the screen's calibration {record['screen_calibration']}. Held-out utility: a model's "
        "accuracy on held-out train images under the mask (test data is never used).",
        "",
        *(f"- {line}" for line in tradeoff_lines(record["tradeoff"])),
        "",
        f"What the release cost: {record['cost']}. Raw images: the reference model's raw test accuracy "
        f"{raw_accuracy:.4f}"
        + (
            f"; a random mask of the release's grid and hidden count: utility {record['random_utility']:.3f}."
            if record.get("random_utility") is not None
            else "."
        ),
        "",
    ]
    with atomic_path(paths.masks_reports / "summary.md") as tmp:
        tmp.write_text("\n".join(lines))


def _reference_accuracy(
    model: torch.nn.Module, test: Shards, released: MaskedShards, randomised: MaskedShards, device: torch.device
) -> dict[str, float]:
    """The reference model's accuracy on the raw test images, under the release's masks and under a seeded
    random mask of the same ratio, grid and fill (both made of `test`); each test shard is read once."""
    n = len(test)
    correct, start = dict.fromkeys(("raw", "masked", "random"), 0), 0
    for arrays in test:
        inputs = {
            "raw": arrays["images"],
            "masked": released.masked(arrays, start)["images"],
            "random": randomised.masked(arrays, start)["images"],
        }
        for name, images in inputs.items():
            correct[name] += int((predict(model, images, device) == arrays["labels"]).sum())
        start += len(arrays["labels"])
    return {name: count / n for name, count in correct.items()}
