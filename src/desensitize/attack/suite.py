"""The attack suite: every configured attacker on a sample of released images, scored against the raw
originals over hidden pixels only (desensitize.attack.scores), each score with its confidence interval.

The learned attacker is trained to its limit (desensitize.attack.inpainting.train_learned) at each width of
`attack.learned.widths`; the width with the lowest held-out loss is the attacker. Its data-scaling
curve (the same attacker on shares of its training images) says whether more attacker data would
help: unless a score is flat, the gate judges it extrapolated to `attack.assumed_attacker_images`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from desensitize import stats
from desensitize.attack import gate, inpainting, scores
from desensitize.attack.inpainting import AttackerData, TrainedAttacker
from desensitize.config import AttackParams, ComputeParams
from desensitize.learning.training import predict
from desensitize.runtime.compute import Executor
from desensitize.runtime.device import to_float

log = logging.getLogger(__name__)

SAMPLE_STREAM = 11
HOLDOUT_STREAM = 12
BLIND = ("mean_fill", "class_mean_fill")


@dataclass(frozen=True)
class Target:
    """The attacked sample: released images with their masks, the raw originals and the labels."""

    released: np.ndarray  # uint8 (N, C, H, W)
    masks: np.ndarray  # uint8 (N, H, W)
    raw: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)


def sample_indices(n: int, sample: int, seed: int) -> np.ndarray:
    """The released train images attacked: a seeded sample of `sample` of the `n`, all when `sample` is
    larger, sorted (MLflow logs its digest)."""
    return np.sort(np.random.default_rng([seed, SAMPLE_STREAM]).choice(n, min(sample, n), replace=False))


def attacked_sample(n: int, sample: int, seed: int) -> np.ndarray:
    """sample_indices for a stage that attacks (the gated mask search, the attack stage): warns when
    attack.sample asks for more than the `n` released train images, since it is then cut to all of them."""
    if sample > n:
        log.warning(
            "attack.sample = %d, but the release has %d train images: attacking all %d (a larger data.split.train "
            "gives the gate a larger sample and narrower intervals)",
            sample,
            n,
            n,
        )
    return sample_indices(n, sample, seed)


class Scorer:
    """Scores reconstructions of one target against its originals, each score with its interval; PSNR
    gain is over the better (on average) of the blind references built from the attacker's fully known
    images: `mean_fill` and the label-aware `class_mean_fill`."""

    def __init__(
        self,
        target: Target,
        attacker: AttackerData,
        cfg: AttackParams,
        *,
        num_classes: int,
        model: torch.nn.Module,
        device: torch.device,
        seed: int,
    ) -> None:
        self.target, self.model, self.device, self.cfg, self.seed = target, model, device, cfg, seed
        self.truth = to_float(target.raw).numpy()
        public = attacker.take(np.flatnonzero(attacker.known.all(axis=(1, 2))))
        public_float = to_float(public.images).numpy()
        class_means = scores.class_mean_images(public_float, public.labels, num_classes)
        self.blind = {
            "mean_fill": inpainting.mean_fill(target.released, target.masks, public_float.mean(axis=0)),
            "class_mean_fill": inpainting.class_mean_fill(target.released, target.masks, target.labels, class_means),
        }
        blind_psnr = {name: self.psnr(out) for name, out in self.blind.items()}
        self.best_blind = max(BLIND, key=lambda name: blind_psnr[name].mean())
        self.blind_psnr = blind_psnr[self.best_blind]
        # Recognition recovery is over what the reference model recognises without any restoring: the
        # released image or, if it does better (the release carries labels, and a label-aware blind guess
        # hands the model part of the label), the blind guess.
        self.baseline_correct = max(
            (self._correct(target.released), self._correct(self.blind[self.best_blind])), key=np.mean
        )
        self.linkage_within_class_chance = scores.linkage_chance(len(target.labels), target.labels, cfg.gallery)

    def _correct(self, images: np.ndarray) -> np.ndarray:
        return (predict(self.model, images, self.device) == self.target.labels).astype(np.float64)

    def psnr(self, reconstruction: np.ndarray) -> np.ndarray:
        return scores.psnr_per_image(reconstruction, self.truth, self.target.masks)

    def __call__(self, reconstruction: np.ndarray, *, gated_only: bool = False) -> dict[str, Any]:
        """Every score with its interval; `gated_only`: the scores the gate judges only (a screen's)."""
        t, level = self.target, self.cfg.confidence
        psnr = self.psnr(reconstruction)
        gain = psnr - self.blind_psnr
        hits_class = scores.linkage_hits(
            reconstruction, self.truth, t.masks, groups=t.labels, gallery_size=self.cfg.gallery, seed=self.seed
        )
        recovery = self._correct(reconstruction) - self.baseline_correct
        out = {
            "psnr_hidden": float(psnr.mean()),
            "psnr_gain": float(gain.mean()),
            "psnr_gain_interval": stats.bootstrap_interval(gain, level, seed=self.seed),
            "linkage_within_class": float(hits_class.mean()),
            "linkage_within_class_interval": stats.wilson_interval(int(hits_class.sum()), len(hits_class), level),
            "recognition_recovery": float(recovery.mean()),
            "recognition_recovery_interval": stats.bootstrap_interval(recovery, level, seed=self.seed),
        }
        if gated_only:
            return out
        hits_all = scores.linkage_hits(reconstruction, self.truth, t.masks)
        return {
            **out,
            "ssim_hidden": scores.ssim_hidden(reconstruction, self.truth, t.masks),
            "linkage_top1": float(hits_all.mean()),
            "linkage_top1_interval": stats.wilson_interval(int(hits_all.sum()), len(hits_all), level),
        }


def attacker_data(
    public: AttackerData, released: np.ndarray, masks: np.ndarray, labels: np.ndarray, scope: str, release_data: bool
) -> AttackerData:
    """What the learned attacker trains on: the public images, plus for per-image masks (with
    `release_data`) the release itself, its visible pixels: other images show the cells this one
    hides, and every recipient holds them."""
    if scope != "image" or not release_data:
        return public
    return AttackerData.join([public, AttackerData(released, masks, labels)])


def split_attacker_data(data: AttackerData, holdout: float, seed: int) -> tuple[AttackerData, AttackerData]:
    """Seeded (train, held-out) parts of the attacker's images; both keep at least one image."""
    n = len(data.images)
    n_held = min(max(1, round(holdout * n)), n - 1)
    order = np.random.default_rng([seed, HOLDOUT_STREAM]).permutation(n)
    return data.take(order[n_held:]), data.take(order[:n_held])


def share_of(train: AttackerData, share: float, seed: int) -> AttackerData:
    """The first `share` of a seeded order of the attacker's training images: a larger share holds
    every image of a smaller one, so the data-scaling curve only ever adds data."""
    order = np.random.default_rng([seed, HOLDOUT_STREAM, 1]).permutation(len(train.images))
    return train.take(order[: max(1, round(share * len(order)))])


def attack_suite(
    target: Target,
    attacker: AttackerData,
    fill: Callable[[tuple[int, ...], int], np.ndarray],
    cfg: AttackParams,
    *,
    num_classes: int,
    model: torch.nn.Module,
    device: torch.device,
    seed: int,
    widths: list[int] | None = None,
    epochs: int | None = None,
    scaling: bool = True,
    ex: Executor | None = None,
) -> dict[str, Any]:
    """Run every configured attacker on `target`; `attacker` is what the learned attacker trains on
    (its fully known images also give the blind references). `widths` overrides the candidate widths
    and `epochs` sets a fixed budget instead of training to the held-out optimum; `scaling` runs the
    data-scaling curve and judges the learned attacker's scores against it. The learned attacker's
    fits (each width, then each data share) are units on `ex` (default: here, one after another)."""
    score = Scorer(target, attacker, cfg, num_classes=num_classes, model=model, device=device, seed=seed)
    reconstructions = dict(score.blind)
    seconds = dict.fromkeys(BLIND, 0.0)
    learned_record: dict[str, Any] = {}
    for name in cfg.attackers:
        start = time.perf_counter()
        if name == "learned":
            out, learned_record = _learned(
                target, attacker, fill, cfg, num_classes, device, seed, widths, epochs, score, scaling, ex
            )
        else:
            out = inpainting.classical(name, target.released, target.masks, cfg.inpaint_radius)
        seconds[name] = time.perf_counter() - start
        reconstructions[name] = out

    chance = score.linkage_within_class_chance
    bounds = gate.limits(cfg.thresholds, chance)
    scored = {}
    for name, out in reconstructions.items():
        scored[name] = {**score(out), "seconds": round(seconds[name], 2)}
        if name not in BLIND:
            scored[name]["judged"] = gate.upper_ends(scored[name])
    if "learned" in scored and learned_record.get("scaling"):
        gate.judge_scaling(scored["learned"], learned_record["scaling"], bounds, cfg)
    attackers = {name: s for name, s in scored.items() if name not in BLIND}
    return {
        "attackers": attackers,
        "blind": {name: scored[name] for name in BLIND},
        "best_blind": score.best_blind,
        "best_attacker": gate.strongest(attackers, bounds),
        "learned": learned_record or None,
        "hidden_information": scores.hidden_information(score.truth, target.masks, score.truth.mean(axis=0)),
        "linkage_chance": 1 / len(target.labels),
        "linkage_within_class_chance": chance,
        "limits": bounds,
        "reconstructions": reconstructions,
    }


def _learned(
    target: Target,
    attacker: AttackerData,
    fill: Callable[[tuple[int, ...], int], np.ndarray],
    cfg: AttackParams,
    num_classes: int,
    device: torch.device,
    seed: int,
    widths: list[int] | None,
    epochs: int | None,
    score: Scorer,
    scaling: bool,
    ex: Executor | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Train the learned attacker at every width, keep the one with the lowest held-out loss, and with
    `scaling` train it again on shares of its data; returns its reconstruction and the record."""
    train, held_out = split_attacker_data(attacker, cfg.learned.holdout, seed)

    def fit(data: AttackerData, width: int) -> TrainedAttacker:
        return inpainting.train_learned(
            data,
            held_out,
            target.masks,
            fill,
            cfg.learned,
            width=width,
            num_classes=num_classes,
            seed=seed,
            device=device,
            epochs=epochs,
        )

    def attack(trained: TrainedAttacker) -> np.ndarray:
        return inpainting.learned(trained.model, target.released, target.masks, target.labels, device)

    ex = ex or Executor(ComputeParams(scheduler="sync", threads=torch.get_num_threads()))
    gpu = device.type == "cuda"
    tried = widths or cfg.learned.widths
    trained = dict(zip(tried, ex.map(partial(fit, train), tried, gpu=gpu, name="attacker-width"), strict=True))
    chosen = min(trained.values(), key=lambda t: (t.held_out_mse, t.width))
    out = attack(chosen)
    record: dict[str, Any] = {"width": chosen.width, "widths": {str(w): t.record() for w, t in trained.items()}}
    if scaling and cfg.learned.data_shares:
        shares = sorted(cfg.learned.data_shares)

        def fit_share(share: float) -> TrainedAttacker:
            return fit(share_of(train, share, seed), chosen.width)

        parts = ex.map(fit_share, shares, gpu=gpu, name="attacker-share")
        points = [{**part.record(), "scores": _curve_scores(score(attack(part)))} for part in parts]
        points.append({**chosen.record(), "scores": _curve_scores(score(out))})
        record["scaling"] = {"points": points}
    return out, record


def _curve_scores(values: dict[str, Any]) -> dict[str, float]:
    return {s: values[s] for s in (*gate.GATED, "linkage_top1")}
