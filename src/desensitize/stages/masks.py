"""The `masks` stage: attribution -> candidate masks -> the privacy-constrained search -> verified
release bundle.

Owner side. Reads raw `train`/`test` (and, for the privacy gate, `public`: what the attacker trains
on) and the reference model; writes `data/release/` (verified before it is moved into place),
`metrics/masks.json` (headline) and `reports/masks/` (report.json, search.json, figures). With
masks.privacy = gate the release is the most useful candidate that passes the full privacy gate
(desensitize.mask_search); the stage fails naming the closest candidate when none does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from functools import cached_property, partial
from typing import Any

import numpy as np
import torch

from desensitize.attack_suite import (
    Target,
    attack_suite,
    attacked_sample,
    attacker_data,
    cached_attack_suite,
    judged,
    limits,
)
from desensitize.attribution import attribution_maps
from desensitize.candidates import candidates, check_grid, needs_maps, template_stats
from desensitize.checkpoints import load_checkpoint
from desensitize.compute import Executor, executor
from desensitize.config import Params
from desensitize.inpainting import public_data, release_fill
from desensitize.mask_search import Candidate, SearchFailed, search
from desensitize.masks import grid_shape, n_hidden_cells
from desensitize.paths import Paths
from desensitize.privacy import linkage_chance
from desensitize.release import (
    FILL_STREAMS,
    MaskedShards,
    MaskSettings,
    channel_mean,
    random_release,
    verify_release,
    write_release,
)
from desensitize.reports import heatmap, image_grid
from desensitize.results import write_results
from desensitize.splits import Split, load_split, read_manifest, split_shards
from desensitize.storage import InMemory, Shards, atomic_dir, write_json
from desensitize.templates import TemplateStats, held_out_utility, search_split
from desensitize.training import best_device, predict, to_float

log = logging.getLogger(__name__)


def generate_masks(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns the report (desensitize.results) and the attribution speed
    (for the MLflow run only: a wall-clock figure would make identical reruns differ for DVC).
    The raw splits are read one shard at a time (attribution, release, verification, the reference's
    accuracies); only the mask search (several candidates, see _choose) holds the train split whole."""
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
    with executor(params.compute) as ex:
        chosen, record = _choose(
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
    write_results(paths, "masks", metrics)
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


class Measures:
    """What the search measures of a candidate's train masks, on the train split held whole: `utility`
    (held-out accuracy of a model trained through them, see templates.held_out_utility), `screen` (the
    learned attacker shortened, masks.search.screen) and `full` (the gate's attack suite, kept in the
    attack cache), each score judged as the gate judges it. `limits`: the gate's thresholds in each
    score's units; `chance`: the attacked sample's linkage chance. Its methods travel to a cluster's
    workers as units, the object with them."""

    def __init__(
        self,
        params: Params,
        paths: Paths,
        train_shards: Shards,
        class_names: list[str],
        mean: np.ndarray,
        model: torch.nn.Module,
        device: torch.device,
    ) -> None:
        self.params, self.paths, self.mean, self.model, self.device = params, paths, mean, model, device
        self.arrays = train_shards.read_all()
        self.train = Split(self.arrays["images"], self.arrays["labels"], tuple(class_names))
        self.held_out = search_split(len(self.train.images), params)
        self.n_classes = len(self.train.class_names)

    def released(self, c: Candidate) -> np.ndarray:
        fill, seed = self.params.masks.fill, self.params.seed
        masked = MaskedShards(InMemory(self.arrays), c.masks, fill, self.mean, seed, FILL_STREAMS["train"])
        return masked.read(0)["images"]

    def utility(self, c: Candidate) -> float:
        return held_out_utility(
            self.released(c),
            self.train.labels,
            self.held_out,
            self.params,
            num_classes=self.n_classes,
            device=self.device,
            name=c.name,
        )

    @cached_property
    def _attack(self) -> dict[str, Any]:
        """The attacked sample and what every attack of a candidate shares (made once, when first needed)."""
        attack, cfg, seed = self.params.attack, self.params.masks, self.params.seed
        public = load_split(self.paths.raw, "public")
        idx = attacked_sample(len(self.train.images), attack.sample, seed)
        channels = self.train.images.shape[1]
        return {
            "public": public_data(public.images, public.labels),
            "idx": idx,
            "fill": release_fill(cfg.fill, self.mean.tolist() if cfg.fill == "mean" else [0] * channels, seed),
            "chance": linkage_chance(len(idx), self.train.labels[idx], attack.gallery),
            "common": {"num_classes": self.n_classes, "model": self.model, "device": self.device, "seed": seed},
        }

    @property
    def chance(self) -> float:
        return self._attack["chance"]

    @property
    def limits(self) -> dict[str, float]:
        return limits(self.params.attack.thresholds, self.chance)

    def _target(self, c: Candidate) -> tuple[Target, Any]:
        a, train = self._attack, self.train
        images, idx = self.released(c), a["idx"]
        masks = c.masks if c.masks.ndim == 3 else np.broadcast_to(c.masks, (len(images), *c.masks.shape))
        t = Target(images[idx], np.ascontiguousarray(masks[idx]), train.images[idx], train.labels[idx])
        release_data = self.params.attack.learned.release_data
        return t, attacker_data(a["public"], images, masks, train.labels, c.settings["scope"], release_data)

    def screen(self, c: Candidate) -> dict[str, float]:
        s, attack = self.params.masks.search.screen, self.params.attack
        cfg = attack.model_copy(update={"attackers": ["learned"]})
        a = self._attack
        result = attack_suite(
            *self._target(c), a["fill"], cfg, **a["common"], widths=[s.width], epochs=s.epochs, scaling=False
        )
        return judged(result)

    def full(self, c: Candidate, ex: Executor | None = None) -> dict[str, float]:
        """The attack stage finds this run in the cache; `ex` runs the attacker's fits."""
        a = self._attack
        result = cached_attack_suite(
            self.paths.attack_cache, *self._target(c), a["fill"], self.params.attack, **a["common"], ex=ex
        )
        return judged(result)


def _choose(
    params: Params,
    paths: Paths,
    found: list[Candidate],
    train_shards: Shards,
    class_names: list[str],
    mean: np.ndarray,
    model: torch.nn.Module,
    device: torch.device,
    ex: Executor,
) -> tuple[Candidate, dict[str, Any] | None]:
    """The candidate to release and the search's record (None for a single candidate without the gate);
    the candidates are scored as units on `ex`, the full gate's attacker probes too. The search trains on
    and attacks every candidate's masked train images: it reads the split whole."""
    cfg = params.masks
    if cfg.privacy == "none" and len(found) == 1:
        return found[0], None
    measures = Measures(params, paths, train_shards, class_names, mean, model, device)
    gpu = device.type == "cuda"
    if cfg.privacy == "none":
        for c, u in zip(found, ex.map(measures.utility, found, gpu=gpu, name="utility"), strict=True):
            c.utility = u
            log.info("candidate %s: held-out accuracy %.4f", c.name, c.utility)
        chosen = max(found, key=lambda c: c.utility)  # ties: the first
        return chosen, {"chosen": chosen.name, "candidates": [c.record() for c in found]}
    try:
        result = search(
            found,
            utility=measures.utility,
            screen=measures.screen,
            full=partial(measures.full, ex=ex),
            limits=measures.limits,
            max_full_gates=cfg.search.max_full_gates,
            base={"linkage_within_class": measures.chance},
            map_units=partial(ex.map, gpu=gpu, name="candidate"),
        )
    except SearchFailed as failed:
        write_json(paths.masks_reports / "search.json", failed.result.record())
        raise
    write_json(paths.masks_reports / "search.json", result.record())
    return result.chosen, result.record()


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


def scan_train(
    params: Params, train: Shards, model: torch.nn.Module, device: torch.device
) -> tuple[TemplateStats | None, np.ndarray | None, np.ndarray, float | None]:
    """One pass over the train shards: the channel mean (the `mean` fill) and, for the saliency strategy,
    each shard's attribution against its labels, folded into the set templates' statistics; the maps are
    kept whole only when per-image masks are candidates. Returns (statistics, maps, channel mean,
    attribution images/s). Shard k is attributed with seed + k: one shard gives what one call over the
    whole split gives; for the stochastic methods (gradient_shap, noise tunnel) several shards draw
    differently (and gradient_shap's mean-image baseline is the shard's)."""
    cfg = params.masks
    stats = template_stats(cfg)
    keep_maps = needs_maps(cfg)
    saliency = stats is not None or keep_maps
    all_maps: list[np.ndarray] = []
    seconds = 0.0

    def images() -> Iterator[np.ndarray]:
        nonlocal seconds
        for k, arrays in enumerate(train):
            if saliency:
                start = time.perf_counter()
                images, labels = arrays["images"], arrays["labels"]
                maps = attribution_maps(
                    model,
                    to_float(images),
                    torch.as_tensor(labels),
                    cfg.attribution,
                    device=device,
                    seed=params.seed + k,
                ).numpy()
                seconds += time.perf_counter() - start
                if stats is not None:
                    stats.add(maps, images, labels)
                if keep_maps:
                    all_maps.append(maps)
            yield arrays["images"]

    mean = channel_mean(images())
    if not saliency:
        return None, None, mean, None
    rate = len(train) / seconds
    log.info("%s attribution: %.0f images/s on %s", cfg.attribution.method, rate, device)
    return stats, np.concatenate(all_maps) if keep_maps else None, mean, rate


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
