"""What the mask search measures of a candidate, and the search as the masks stage runs it.

`Measures` holds the train split whole and scores a candidate's train masks: `utility` (the held-out
accuracy of a model trained through them), `screen` (the learned attacker shortened, masks.search.screen)
and `full` (the gate's attack suite, kept in the attack cache for the attack stage), each privacy score
judged as the gate judges it (desensitize.attack.gate). `choose` runs the search of masks.* on them: the
most useful candidate, or with masks.privacy = gate the most useful that passes the full gate
(desensitize.search.gated).
"""

from __future__ import annotations

import logging
from functools import cached_property
from typing import Any

import numpy as np
import torch

from desensitize.attack import gate
from desensitize.attack.cache import cached_attack_suite
from desensitize.attack.inpainting import public_data, release_fill
from desensitize.attack.scores import linkage_chance
from desensitize.attack.suite import Target, attack_suite, attacked_sample, attacker_data
from desensitize.bundle.masked import MaskedShards
from desensitize.config import Params
from desensitize.data.splits import Split, load_split
from desensitize.errors import DesensitizeError
from desensitize.learning.training import fit_and_score
from desensitize.masking.grid import SEARCH_STREAM
from desensitize.paths import Paths
from desensitize.release import FILL_STREAMS
from desensitize.runtime.compute import Executor
from desensitize.search.gated import Candidate
from desensitize.storage import InMemory, Shards

log = logging.getLogger(__name__)


def search_split(n: int, params: Params) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (held-out, rest) indices of the n train images for masks.template = search."""
    share = params.masks.search.holdout
    n_holdout = round(share * n)
    if not 0 < n_holdout < n:
        raise DesensitizeError(
            f"masks.search.holdout = {share:g} holds out {n_holdout} of {n} train images; both parts need at least one"
        )
    order = np.random.default_rng([params.seed, SEARCH_STREAM]).permutation(n)
    return order[:n_holdout], order[n_holdout:]


def held_out_utility(
    images: np.ndarray,
    labels: np.ndarray,
    held_out: tuple[np.ndarray, np.ndarray],
    params: Params,
    *,
    num_classes: int,
    device: torch.device,
    name: str,
) -> float:
    """What a model can still learn through a mask: a model with the reference's backbone and optimiser,
    trained `masks.search.epochs` epochs on the masked train images `rest`, scored on the `held-out`
    ones (see search_split). Test data is never used. (Too few epochs favour a compact central mask
    that is quick to learn over a spread one that ends up better.)"""
    holdout, rest = held_out
    return fit_and_score(
        params.reference,
        images[rest],
        labels[rest],
        images[holdout],
        labels[holdout],
        num_classes=num_classes,
        seed=params.seed,
        device=device,
        epochs=params.masks.search.epochs,
        name=f"search {name}",
    )


class Measures:
    """What the search measures of a candidate's train masks, on the train split held whole: `utility`
    (held-out accuracy of a model trained through them, see held_out_utility), `screen` (the
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
        return gate.limits(self.params.attack.thresholds, self.chance)

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
        return gate.judged(result)

    def full(self, c: Candidate, ex: Executor | None = None) -> dict[str, float]:
        """The attack stage finds this run in the cache; `ex` runs the attacker's fits."""
        a = self._attack
        result = cached_attack_suite(
            self.paths.attack_cache, *self._target(c), a["fill"], self.params.attack, **a["common"], ex=ex
        )
        return gate.judged(result)
