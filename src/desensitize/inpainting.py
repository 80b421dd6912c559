"""Inpainting attackers: try to restore the hidden pixels of released images.

Every attacker maps released images (uint8 (N, C, H, W), fill at hidden pixels) and their masks
(uint8 (N, H, W), 1 = visible) to reconstructions, float32 in [0, 1], whose visible pixels are
the released ones. From weak to strong: `mean_fill` (the blind reference: the mean public image,
no look at the image at all), OpenCV `telea` and `navier_stokes`, scikit-image `biharmonic`, and
`learned`, a small U-Net the attacker trains on the `public` split masked like the release.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from desensitize.config import LearnedAttackerParams
from desensitize.masks import fill_values
from desensitize.training import batch_to, on_device, progress, seed_everything, to_float

log = logging.getLogger(__name__)
CLASSICAL = ("telea", "navier_stokes", "biharmonic")


def composite(released: np.ndarray, masks: np.ndarray, guess: np.ndarray | torch.Tensor) -> np.ndarray:
    """Visible pixels from the release, hidden ones from the attacker's guess, as an 8-bit image
    would hold them: float32 in [0, 1] on the 1/255 grid."""
    visible = masks[:, None].astype(bool)
    guess = guess.detach().cpu().numpy() if isinstance(guess, torch.Tensor) else guess
    pixels = np.where(visible, released.astype(np.float32), np.rint(np.clip(guess, 0, 1) * 255))
    return (pixels / 255).astype(np.float32)


def mean_fill(released: np.ndarray, masks: np.ndarray, public_mean: np.ndarray) -> np.ndarray:
    return composite(released, masks, np.broadcast_to(public_mean[None], released.shape))


def _classical_one(name: str, image: np.ndarray, hidden: np.ndarray, radius: int) -> np.ndarray:
    """One image (C, H, W) uint8 -> (C, H, W) float32; OpenCV and scikit-image work per image."""
    import cv2

    if name == "biharmonic":
        from skimage.restoration import inpaint_biharmonic

        out = inpaint_biharmonic(image.transpose(1, 2, 0) / 255.0, hidden, channel_axis=-1)
        return out.transpose(2, 0, 1).astype(np.float32)
    flag = cv2.INPAINT_TELEA if name == "telea" else cv2.INPAINT_NS
    src = image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))
    out = cv2.inpaint(src, hidden.astype(np.uint8), radius, flag)
    return (out[None] if out.ndim == 2 else out.transpose(2, 0, 1)).astype(np.float32) / 255


def classical(name: str, released: np.ndarray, masks: np.ndarray, radius: int) -> np.ndarray:
    """OpenCV / scikit-image inpainting over all images, spread over threads (both release the GIL)."""
    hidden = masks == 0

    def one(i: int) -> np.ndarray:
        return _classical_one(name, released[i], hidden[i], radius)

    with ThreadPoolExecutor() as pool:
        guesses = np.stack(list(pool.map(one, range(len(released)))))
    return composite(released, masks, guesses)


class UNet(nn.Module):
    """A two-level U-Net: [image, mask] -> image. Sizes need not be multiples of 4."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.enc1 = block(channels + 1, width)
        self.enc2 = block(width, 2 * width)
        self.mid = block(2 * width, 4 * width)
        self.dec2 = block(6 * width, 2 * width)
        self.dec1 = block(3 * width, width)
        self.out = nn.Conv2d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2, ceil_mode=True))
        m = self.mid(F.max_pool2d(e2, 2, ceil_mode=True))
        d2 = self.dec2(torch.cat([F.interpolate(m, size=e2.shape[-2:]), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, size=e1.shape[-2:]), e1], 1))
        return torch.sigmoid(self.out(d1))


def _inputs(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return torch.cat([images, masks[:, None]], 1)


def train_learned(
    public: np.ndarray,
    release_masks: np.ndarray,
    fill: Callable[[tuple[int, ...], int], np.ndarray],
    cfg: LearnedAttackerParams,
    *,
    seed: int,
    device: torch.device,
) -> UNet:
    """The attacker's inpainter: public images, masked with masks drawn from the release and filled
    like the release, trained to predict the originals at the hidden pixels."""
    generator = seed_everything(seed)
    rng = np.random.default_rng([seed, 7])
    model = on_device(UNet(public.shape[1], cfg.width), device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    targets = to_float(public)
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(public), generator=generator)
        total = 0.0
        for k, start in enumerate(progress(range(0, len(order), cfg.batch_size), desc=f"learned attacker {epoch}")):
            idx = order[start : start + cfg.batch_size].numpy()
            masks = release_masks[rng.integers(0, len(release_masks), len(idx))]
            released = np.where(masks[:, None].astype(bool), public[idx], fill((len(idx), *public.shape[1:]), k))
            x = batch_to(_inputs(to_float(released), torch.as_tensor(masks).float()), device)
            y = batch_to(targets[idx], device)
            hidden = batch_to(1 - torch.as_tensor(masks[:, None]).float(), device)
            loss = (((model(x) - y) ** 2) * hidden).sum() / hidden.sum().clamp_min(1) / public.shape[1]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        log.info("learned attacker epoch %d/%d: hidden-pixel MSE %.4f", epoch, cfg.epochs, total / len(public))
    return model.eval()


@torch.no_grad()
def learned(
    model: UNet, released: np.ndarray, masks: np.ndarray, device: torch.device, batch_size: int = 512
) -> np.ndarray:
    guesses = []
    for start in range(0, len(released), batch_size):
        x = _inputs(
            to_float(released[start : start + batch_size]), torch.as_tensor(masks[start : start + batch_size]).float()
        )
        guesses.append(model(batch_to(x, device)).float().cpu())
    return composite(released, masks, torch.cat(guesses))


def release_fill(kind: str, fill_value: list[int], seed: int) -> Callable[[tuple[int, ...], int], np.ndarray]:
    """The fill the attacker reads from release.json, reproduced for its own training images."""
    channel_mean = np.asarray(fill_value)
    return lambda shape, step: fill_values(kind, shape, channel_mean, seed, stream=1000 + step)
