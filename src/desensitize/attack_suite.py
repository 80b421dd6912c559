"""The attack suite: every configured attacker on a sample of released images, scored against the
raw originals over hidden pixels only (desensitize.privacy)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from desensitize import inpainting, privacy
from desensitize.config import Params
from desensitize.training import predict, to_float

SAMPLE_STREAM = 11


def attack_suite(
    released: np.ndarray,
    masks: np.ndarray,
    raw: np.ndarray,
    labels: np.ndarray,
    public: np.ndarray,
    fill: str,
    fill_value: list[int],
    params: Params,
    model: torch.nn.Module,
    device: torch.device,
) -> dict[str, Any]:
    """Run every configured attacker on (released, masks); score against raw (uint8 arrays)."""
    cfg = params.attack
    truth = to_float(raw).numpy()
    public_mean = to_float(public).mean(dim=0).numpy()

    def accuracy(images: np.ndarray) -> float:
        return float((predict(model, images, device) == labels).mean())

    released_accuracy = accuracy(released)
    reconstructions: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name in ("mean_fill", *cfg.attackers):
        start = time.perf_counter()
        if name == "mean_fill":
            out = inpainting.mean_fill(released, masks, public_mean)
        elif name == "learned":
            fill_fn = inpainting.release_fill(fill, fill_value, params.seed)
            unet = inpainting.train_learned(public, masks, fill_fn, cfg.learned, seed=params.seed, device=device)
            out = inpainting.learned(unet, released, masks, device)
        else:
            out = inpainting.classical(name, released, masks, cfg.inpaint_radius)
        seconds[name] = time.perf_counter() - start
        reconstructions[name] = out

    blind_psnr = privacy.psnr_hidden(reconstructions["mean_fill"], truth, masks)
    scores = {}
    for name, out in reconstructions.items():
        psnr = privacy.psnr_hidden(out, truth, masks)
        scores[name] = {
            "psnr_hidden": psnr,
            "psnr_gain": psnr - blind_psnr,
            "ssim_hidden": privacy.ssim_hidden(out, truth, masks),
            "linkage_top1": privacy.linkage_top1(out, truth, masks),
            "recognition_recovery": accuracy(out) - released_accuracy,
            "seconds": round(seconds[name], 2),
        }
    attackers = {name: s for name, s in scores.items() if name != "mean_fill"}
    best = max(attackers, key=lambda name: (attackers[name]["psnr_gain"], attackers[name]["linkage_top1"]))
    return {
        "attackers": attackers,
        "mean_fill": scores["mean_fill"],
        "best_attacker": best,
        "hidden_information": privacy.hidden_information(truth, masks, truth.mean(axis=0)),
        "linkage_chance": 1 / len(raw),
        "reconstructions": reconstructions,
    }


def sample_indices(n: int, sample: int, seed: int) -> np.ndarray:
    """The released train images attacked: a seeded sample, sorted (MLflow logs its digest)."""
    return np.sort(np.random.default_rng([seed, SAMPLE_STREAM]).choice(n, min(sample, n), replace=False))
