"""Amortized scoring for the mask search: one recognition model and one attacker, each trained once on
masks drawn from the search's candidate family, score any candidate at the cost of inference.

This is the design of the patent family behind the paper (one recognition model trained on images under
masks sampled from the candidate set, read on each candidate) and of inpainters such as LaMa and MAT
(trained once on sampled masks). The family (`Family`) is every cell mask the search may visit: at each
cell size of masks.search.cells, from one visible cell up to as many as the lowest hidden ratio of
masks.search.hidden_ratios leaves; each training image gets a mask of its own, so per-image masks are in
the family too.

- Utility: the reference backbone (a MaskNet reading the mask as an extra channel when
  masks.search.amortized.mask_channel) trained on the train images outside the held-out share, each batch
  under fresh family masks; a candidate's utility is its accuracy on the held-out share under the
  candidate's mask.
- Screen: the gate's learned attacker (the U-Net that reads image, mask and label) at masks.search.screen.width,
  trained on the public images under family masks until its held-out loss stalls; a candidate's screen is
  that attacker's gated scores on (a share of) the gate's sample under the candidate's mask, read at the
  upper ends of their intervals as the gate reads them.

Neither model ever gives a verdict: the screen orders the work, the full gate decides (desensitize.search.gated).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from torch import nn

from desensitize.attack import gate, inpainting
from desensitize.attack.suite import Scorer, Target, split_attacker_data
from desensitize.config import Params
from desensitize.learning.checkpoints import build_model
from desensitize.learning.training import TrainingData, predict, train_classifier
from desensitize.masking.grid import apply_mask, expand, fill_values, grid_shape, n_hidden_cells
from desensitize.masknet import with_mask_channel
from desensitize.release import FILL_STREAMS
from desensitize.runtime.device import seed_everything
from desensitize.search.gated import Candidate
from desensitize.search.measures import Measures
from desensitize.storage import InMemory

log = logging.getLogger(__name__)
FAMILY_STREAM = 21  # the utility model's training masks
POOL_STREAM = 22  # the screen attacker's mask pool
SCREEN_STREAM = 23  # which of the gate's sample the screen attacks
POOL = 4096  # family masks the screen attacker draws its training masks from


@dataclass(frozen=True)
class Family:
    """Cell masks of images of `size`: at each cell size, 1 to `most_visible[cell]` visible cells (see draw)."""

    size: tuple[int, int]
    most_visible: dict[int, int]

    @classmethod
    def of(cls, params: Params, size: tuple[int, int]) -> Family:
        """The family of masks.search: its cell sizes, down to its lowest hidden ratio."""
        search = params.masks.search
        most = {}
        for cell in search.cells:
            n = int(np.prod(grid_shape(*size, cell)))
            most[cell] = n - n_hidden_cells(n, min(search.hidden_ratios))
        return cls(tuple(size), most)

    def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` masks (count, H, W), each at a random cell size with k visible cells in random places,
        k from 1 to the most with probability proportional to 1/k: the models learn most about the few
        visible cells where the gate's edge lies, and still see every size."""
        height, width = self.size
        cells = sorted(self.most_visible)
        out = np.empty((count, height, width), dtype=np.uint8)
        sizes = rng.integers(0, len(cells), count)
        for i, which in enumerate(sizes):
            cell = cells[which]
            gh, gw = grid_shape(height, width, cell)
            weights = 1 / np.arange(1, self.most_visible[cell] + 1)
            keep = 1 + rng.choice(len(weights), p=weights / weights.sum())
            visible = np.zeros(gh * gw, dtype=np.uint8)
            visible[rng.choice(gh * gw, keep, replace=False)] = 1
            out[i] = expand(visible.reshape(gh, gw), height, width, cell)
        return out


class AmortizedMeasures(Measures):
    """Measures whose `utility` and `screen` read the two shared models (module doc); `full`, the gate's
    attack suite on the candidate, is the per-candidate one. The models are trained when first needed."""

    @cached_property
    def family(self) -> Family:
        return Family.of(self.params, self.train.images.shape[-2:])

    def _fill(self, shape: tuple[int, ...], stream: int) -> np.ndarray:
        return fill_values(self.params.masks.fill, shape, self.mean, self.params.seed, stream)

    def _inputs(self, images: np.ndarray, masks: np.ndarray, stream: int) -> np.ndarray:
        """What the utility model reads of images under masks (uint8): the masked images, and with
        mask_channel the mask as a last channel."""
        masked = apply_mask(images, masks, self._fill(images.shape, stream))
        return with_mask_channel(masked, masks) if self.params.masks.search.amortized.mask_channel else masked

    @cached_property
    def utility_model(self) -> nn.Module:
        """The utility model, trained once on the images outside the held-out share under family masks."""
        cfg, seed = self.params.masks.search.amortized, self.params.seed
        _, rest = self.held_out
        images, labels = self.train.images[rest], self.train.labels[rest]
        rng = np.random.default_rng([seed, FAMILY_STREAM])
        batches = iter(range(1, 1 << 62))

        def inputs(batch: dict[str, np.ndarray]) -> np.ndarray:
            masks = self.family.draw(len(batch["labels"]), rng)
            return self._inputs(batch["images"], masks, stream=1000 + next(batches))

        channels = images.shape[1]
        spec = {
            "backbone": self.params.reference.backbone,
            "in_channels": channels,
            "num_classes": self.n_classes,
            "masknet": cfg.mask_channel,
        }
        seed_everything(seed)  # the initial weights too
        model = build_model(spec)
        shape = (channels + cfg.mask_channel, *images.shape[2:])
        data = TrainingData(InMemory({"images": images, "labels": labels}), shape, inputs)
        train_classifier(
            model,
            data,
            None,
            self.params.reference,
            seed=seed,
            device=self.device,
            name="amortized utility",
            epochs=cfg.epochs,
        )
        return model.eval()

    def utilities(self, candidates: Sequence[Candidate]) -> list[float]:
        """Each candidate's held-out accuracy under its train masks."""
        holdout, _ = self.held_out
        images, labels = self.train.images[holdout], self.train.labels[holdout]
        out = []
        for c in candidates:
            masks = self._per_image(c.masks)[holdout]
            predictions = predict(self.utility_model, self._inputs(images, masks, FILL_STREAMS["train"]), self.device)
            out.append(float((predictions == labels).mean()))
        return out

    def utility(self, c: Candidate) -> float:
        return self.utilities([c])[0]

    def _per_image(self, masks: np.ndarray) -> np.ndarray:
        n = len(self.train.images)
        return masks if masks.ndim == 3 else np.broadcast_to(masks, (n, *masks.shape))

    @cached_property
    def attacker(self) -> nn.Module:
        """The screen attacker, trained once on the public images under family masks."""
        a, attack, seed = self._attack, self.params.attack, self.params.seed
        learned = attack.learned.model_copy(update={"max_epochs": self.params.masks.search.amortized.attacker_epochs})
        train, held_out = split_attacker_data(a["public"], learned.holdout, seed)
        pool = self.family.draw(POOL, np.random.default_rng([seed, POOL_STREAM]))
        trained = inpainting.train_learned(
            train,
            held_out,
            pool,
            a["fill"],
            learned,
            width=self.params.masks.search.screen.width,
            num_classes=self.n_classes,
            seed=seed,
            device=self.device,
        )
        log.info(
            "amortized screen attacker: held-out hidden-pixel MSE %.5f at epoch %d of %d",
            trained.held_out_mse,
            trained.best_epoch,
            len(trained.curve),
        )
        return trained.model

    @cached_property
    def _screen_idx(self) -> np.ndarray:
        """The screen's images: a seeded share of the gate's sample (all of it when it is smaller)."""
        idx = self._attack["idx"]
        n = min(self.params.masks.search.amortized.sample, len(idx))
        return np.sort(np.random.default_rng([self.params.seed, SCREEN_STREAM]).choice(idx, n, replace=False))

    def screen(self, c: Candidate) -> dict[str, float]:
        a, idx = self._attack, self._screen_idx
        masks = np.ascontiguousarray(self._per_image(c.masks)[idx])
        raw, labels = self.train.images[idx], self.train.labels[idx]
        released = apply_mask(raw, masks, self._released_fill(idx))
        target = Target(released, masks, raw, labels)
        scorer = Scorer(target, a["public"], self.params.attack, **a["common"])
        reconstruction = inpainting.learned(self.attacker, released, masks, labels, self.device)
        return gate.upper_ends(scorer(reconstruction, gated_only=True))

    def _released_fill(self, idx: np.ndarray) -> np.ndarray:
        """The release's fill at the train images `idx` (a noise fill is drawn for the whole split)."""
        values = self._split_fill
        return values[idx] if values.shape[0] > 1 else values

    @cached_property
    def _split_fill(self) -> np.ndarray:
        return self._fill((len(self.train.images), *self.train.images.shape[1:]), stream=FILL_STREAMS["train"])
