"""Privacy scores of reconstructions against the raw originals, over hidden pixels only.

All inputs are float32 (N, C, H, W) in [0, 1] plus masks uint8 (N, H, W), 1 = visible: PSNR and SSIM
over the hidden pixels, linkage (is a reconstruction's own original the nearest of its gallery), the
label-aware blind guess, the share of the content a mask hides and how well each cell is restored.
Their confidence intervals are desensitize.stats'; what the gate makes of them, desensitize.attack.gate.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

from desensitize.errors import DesensitizeError
from desensitize.masking.grid import cell_scores

PSNR_CAP = 100.0  # dB, reported when the hidden pixels are restored exactly
SSIM_WINDOW = 7


def _check_scored(reconstruction: np.ndarray, raw: np.ndarray, masks: np.ndarray) -> None:
    """Scores compare image i with image i under mask i: the three arrays must line up."""
    if raw.ndim != 4 or len(raw) == 0:
        raise DesensitizeError(f"raw images have shape {raw.shape}; expected a non-empty (N, C, H, W) array")
    if reconstruction.shape != raw.shape:
        raise DesensitizeError(f"reconstruction shape {reconstruction.shape} differs from raw shape {raw.shape}")
    expected = (raw.shape[0], *raw.shape[2:])
    if masks.shape != expected:
        raise DesensitizeError(f"masks have shape {masks.shape}; expected {expected} (N, H, W) to match the images")


def psnr_per_image(reconstruction: np.ndarray, raw: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N,) PSNR over each image's hidden pixels only, capped at PSNR_CAP (exact restoration); per image so
    that a gain over a blind guess can be bootstrapped over images."""
    _check_scored(reconstruction, raw, masks)
    hidden = (masks == 0)[:, None]
    err = ((reconstruction - raw) ** 2 * hidden).sum(axis=(1, 2, 3))
    count = hidden.sum(axis=(1, 2, 3)) * raw.shape[1]
    mse = err / np.maximum(count, 1)
    psnr = np.where(mse > 0, 10 * np.log10(1.0 / np.maximum(mse, 1e-30)), PSNR_CAP)
    return np.minimum(psnr, PSNR_CAP)


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM, averaged over channels: (N, H, W). scikit-image's implementation with a uniform
    7x7 window (the largest odd one that fits smaller images) and population statistics (Wang et al.'s
    definition), data range 1."""
    window = min(SSIM_WINDOW, *(side - 1 + side % 2 for side in a.shape[-2:]))
    if window < 3:
        raise DesensitizeError(f"images of {a.shape[-2]}x{a.shape[-1]} pixels are too small for SSIM (3x3 window)")
    return np.stack(
        [
            structural_similarity(
                x, y, win_size=window, data_range=1.0, channel_axis=0, full=True, use_sample_covariance=False
            )[1].mean(axis=0)
            for x, y in zip(a.astype(np.float64), b.astype(np.float64), strict=True)
        ]
    )


def ssim_hidden(reconstruction: np.ndarray, raw: np.ndarray, masks: np.ndarray) -> float:
    hidden = masks == 0
    values = ssim_map(reconstruction, raw)
    per_image = (values * hidden).sum(axis=(1, 2)) / np.maximum(hidden.sum(axis=(1, 2)), 1)
    return float(per_image.mean())


def _check_groups(groups: np.ndarray | None, n: int) -> None:
    if groups is not None and np.shape(groups) != (n,):
        raise DesensitizeError(f"groups have shape {np.shape(groups)}; expected ({n},), one label per image")


def galleries(n: int, groups: np.ndarray | None = None, size: int | None = None, seed: int = 0) -> np.ndarray:
    """(N, N) bool: row i is image i's linkage gallery: i itself and the other images of its group (all
    images without `groups`), cut to `size` images in all by a seeded draw. A fixed gallery size keeps
    chance at 1/size however large the sample, so the count of chance hits, and the interval's
    precision, grows with the sample."""
    _check_groups(groups, n)
    labels = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    member = labels[:, None] == labels[None, :]
    if size is not None and size < n:
        if size < 2:
            raise DesensitizeError(f"gallery size {size}: need the original and at least one other image")
        keys = np.random.default_rng(seed).random((n, n))
        keys[~member] = np.inf
        np.fill_diagonal(keys, -1.0)  # the original is always in its gallery
        kth = np.partition(keys, size - 1, axis=1)[:, size - 1 : size]
        member &= keys <= kth
    return member


def linkage_hits(
    reconstruction: np.ndarray,
    raw: np.ndarray,
    masks: np.ndarray,
    groups: np.ndarray | None = None,
    gallery_size: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """(N,) bool: reconstruction i's own original is strictly the nearest raw image of its gallery, comparing
    only i's hidden pixels (a tie is not a confident link). The gallery (see `galleries`) is all N raw
    images, or with `groups` only those of i's group: a release carries labels, so an attacker need only
    compare within the class; `gallery_size` cuts it to a fixed size."""
    _check_scored(reconstruction, raw, masks)
    n = len(raw)
    member = torch.from_numpy(galleries(n, groups, gallery_size, seed))
    h = torch.from_numpy((masks == 0)[:, None].repeat(raw.shape[1], axis=1).reshape(n, -1)).double()
    r = torch.from_numpy(reconstruction.reshape(n, -1)).double()
    g = torch.from_numpy(raw.reshape(n, -1)).double()
    # ||h_i * (r_i - g_j)||^2 for every pair, as matrix products.
    dist = (h * r * r).sum(1, keepdim=True) - 2 * (h * r) @ g.T + h @ (g * g).T
    dist[~member] = torch.inf
    own = dist.diagonal()
    ties_or_better = (dist <= own[:, None] + 1e-9).sum(1)  # an exact tie is not a confident link
    return (ties_or_better == 1).numpy()


def linkage_chance(n: int, groups: np.ndarray | None = None, gallery_size: int | None = None) -> float:
    """Expected linkage hit rate of a blind guess, the baseline linkage is judged against: the mean over
    images of 1 / (size of the image's gallery); 1/N over the whole sample, (number of groups) / N with
    `groups`, 1/gallery_size where every group holds at least that many images."""
    if n < 1:
        raise DesensitizeError(f"linkage chance of a gallery of {n} images: need at least one image")
    _check_groups(groups, n)
    labels = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sizes = counts[inverse] if gallery_size is None else np.minimum(counts[inverse], gallery_size)
    return float(np.mean(1.0 / sizes))


def class_mean_images(images: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, C, H, W) float32 mean image of each class: the label-aware blind guess (a release carries
    labels, so anyone can guess the mean public image of the image's class). An absent class gets the overall
    mean image."""
    labels = np.asarray(labels)
    if images.ndim != 4 or len(images) == 0 or labels.shape != (len(images),):
        raise DesensitizeError(
            f"images {images.shape} and labels {labels.shape}: need a non-empty (N, C, H, W) array and N labels"
        )
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DesensitizeError(f"labels range {labels.min()}..{labels.max()}: must lie in 0..{n_classes - 1}")
    sums = np.zeros((n_classes, *images.shape[1:]), dtype=np.float64)
    np.add.at(sums, labels, images)
    counts = np.bincount(labels, minlength=n_classes).reshape(-1, 1, 1, 1)
    overall = images.mean(axis=0, dtype=np.float64)
    return np.where(counts > 0, sums / np.maximum(counts, 1), overall[None]).astype(np.float32)


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
