"""Privacy scores of reconstructions against the raw originals, over hidden pixels only, and the gate.

All inputs are float32 (N, C, H, W) in [0, 1] plus masks uint8 (N, H, W), 1 = visible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from desensitize.config import GateThresholds
from desensitize.masks import cell_scores

PSNR_CAP = 100.0  # dB, reported when the hidden pixels are restored exactly
SSIM_WINDOW = 7


def psnr_hidden(reconstruction: np.ndarray, raw: np.ndarray, masks: np.ndarray) -> float:
    """Mean over images of the PSNR computed over each image's hidden pixels only."""
    hidden = (masks == 0)[:, None]
    err = ((reconstruction - raw) ** 2 * hidden).sum(axis=(1, 2, 3))
    count = hidden.sum(axis=(1, 2, 3)) * raw.shape[1]
    mse = err / np.maximum(count, 1)
    psnr = np.where(mse > 0, 10 * np.log10(1.0 / np.maximum(mse, 1e-30)), PSNR_CAP)
    return float(np.minimum(psnr, PSNR_CAP).mean())


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (uniform 7x7 window, reflect padding), averaged over channels: (N, H, W)."""
    x, y = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    pad = min(SSIM_WINDOW // 2, x.shape[-1] - 1, x.shape[-2] - 1)

    def mean(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.pad(t, (pad,) * 4, mode="reflect"), 2 * pad + 1, stride=1)

    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx**2, mean(y * y) - my**2, mean(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return ssim.mean(dim=1).numpy()


def ssim_hidden(reconstruction: np.ndarray, raw: np.ndarray, masks: np.ndarray) -> float:
    hidden = masks == 0
    values = ssim_map(reconstruction, raw)
    per_image = (values * hidden).sum(axis=(1, 2)) / np.maximum(hidden.sum(axis=(1, 2)), 1)
    return float(per_image.mean())


def linkage_top1(reconstruction: np.ndarray, raw: np.ndarray, masks: np.ndarray) -> float:
    """Share of reconstructions whose own original is the nearest of the N raw images (the gallery),
    comparing only the reconstruction's hidden pixels. Chance is 1/N."""
    n = len(raw)
    h = torch.from_numpy((masks == 0)[:, None].repeat(raw.shape[1], axis=1).reshape(n, -1)).double()
    r = torch.from_numpy(reconstruction.reshape(n, -1)).double()
    g = torch.from_numpy(raw.reshape(n, -1)).double()
    # ||h_i * (r_i - g_j)||^2 for every pair, as matrix products.
    dist = (h * r * r).sum(1, keepdim=True) - 2 * (h * r) @ g.T + h @ (g * g).T
    own = dist.diagonal()
    ties_or_better = (dist <= own[:, None] + 1e-9).sum(1)  # an exact tie is not a confident link
    return float((ties_or_better == 1).double().mean())


def hidden_information(raw: np.ndarray, masks: np.ndarray, mean_image: np.ndarray) -> float:
    """Share of the images' content (energy around the dataset mean image) that lies under the mask."""
    energy = ((raw - mean_image[None]) ** 2).sum(axis=1)
    return float((energy * (masks == 0)).sum() / max(energy.sum(), 1e-12))


def cell_restoration(
    reconstruction: np.ndarray, blind: np.ndarray, raw: np.ndarray, masks: np.ndarray, cell: int
) -> np.ndarray:
    """Per cell: 1 - attacker error / blind error over the cell's hidden pixels (1 = restored exactly,
    0 = no better than a blind guess); NaN for cells never hidden."""
    hidden = masks == 0
    err = (((reconstruction - raw) ** 2).sum(axis=1) * hidden).sum(axis=0)
    blind_err = (((blind - raw) ** 2).sum(axis=1) * hidden).sum(axis=0)
    att, ref = cell_scores(err, cell), cell_scores(blind_err, cell)
    never = cell_scores(hidden.sum(axis=0).astype(float), cell) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(ref > 0, 1 - att / ref, np.where(att > 0, -np.inf, 1.0))
    return np.where(never, np.nan, score)


def gate(attackers: dict[str, dict[str, float]], thresholds: GateThresholds) -> dict[str, Any]:
    """Passes only if every attacker (the best one included) stays at or under every threshold."""
    limits = {
        "psnr_gain": thresholds.max_psnr_gain,
        "linkage_top1": thresholds.max_linkage_top1,
        "recognition_recovery": thresholds.max_recognition_recovery,
    }
    violations = [
        {"attacker": name, "score": score, "value": scores[score], "threshold": limit}
        for name, scores in attackers.items()
        for score, limit in limits.items()
        if scores[score] > limit
    ]
    return {"passed": not violations, "thresholds": limits, "violations": violations}
