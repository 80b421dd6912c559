"""Inpainting attackers: try to restore the hidden pixels of released images.

Every attacker maps released images (uint8 (N, C, H, W), fill at hidden pixels) and their masks
(uint8 (N, H, W), 1 = visible) to reconstructions, float32 in [0, 1], whose visible pixels are
the released ones. The blind references look at no pixel of the image: `mean_fill` (the mean
public image) and `class_mean_fill` (the mean public image of the image's class: a release carries
its labels). Then OpenCV `telea` and `navier_stokes`, scikit-image `biharmonic`, and `learned`, a
U-Net that also reads the label, trained on images masked and filled like the release until its
loss on held-out images stops improving.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from desensitize.config import LearnedAttackerParams
from desensitize.masking.grid import fill_values
from desensitize.runtime.device import batch_to, on_device, progress, seed_everything, to_float

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


def class_mean_fill(released: np.ndarray, masks: np.ndarray, labels: np.ndarray, class_means: np.ndarray) -> np.ndarray:
    """The label-aware blind guess: each image's class mean (K, C, H, W) at its hidden pixels."""
    return composite(released, masks, class_means[labels])


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
    """A two-level U-Net: [image, mask, one-hot label planes] -> image. Sizes need not be multiples of 4."""

    def __init__(self, channels: int, width: int, num_classes: int = 0) -> None:
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

        self.num_classes = num_classes
        self.enc1 = block(channels + 1 + num_classes, width)
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

    def inputs(self, images: np.ndarray, masks: np.ndarray, labels: np.ndarray) -> torch.Tensor:
        """uint8 images (N, C, H, W), masks (N, H, W), labels (N,) -> the network's input."""
        x = [to_float(images), torch.as_tensor(masks[:, None]).float()]
        if self.num_classes:
            planes = F.one_hot(torch.as_tensor(labels, dtype=torch.long), self.num_classes).float()
            x.append(planes[:, :, None, None].expand(-1, -1, *images.shape[-2:]))
        return torch.cat(x, 1)


@dataclass(frozen=True)
class AttackerData:
    """What the attacker trains on: images, where it knows their true pixels (1 = known: everywhere
    for public images, the visible pixels for released ones), and their labels."""

    images: np.ndarray  # uint8 (N, C, H, W)
    known: np.ndarray  # uint8 (N, H, W)
    labels: np.ndarray  # int64 (N,)

    def take(self, idx: np.ndarray) -> AttackerData:
        return AttackerData(self.images[idx], self.known[idx], self.labels[idx])

    @staticmethod
    def join(parts: list[AttackerData]) -> AttackerData:
        return AttackerData(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("images", "known", "labels")))


def public_data(images: np.ndarray, labels: np.ndarray) -> AttackerData:
    return AttackerData(images, np.ones((len(images), *images.shape[-2:]), dtype=np.uint8), labels)


@dataclass
class TrainedAttacker:
    model: UNet
    width: int
    images: int  # training images (held-out ones excluded)
    best_epoch: int
    held_out_mse: float
    curve: list[float] = field(default_factory=list)  # held-out hidden-pixel MSE per epoch
    seconds: float = 0.0

    def record(self) -> dict[str, object]:
        return {
            "width": self.width,
            "images": self.images,
            "best_epoch": self.best_epoch,
            "epochs_run": len(self.curve),
            "held_out_mse": self.held_out_mse,
            "held_out_curve": [round(v, 6) for v in self.curve],
            "seconds": round(self.seconds, 2),
        }


def _batch(
    data: AttackerData, masks: np.ndarray, fill: np.ndarray, model: UNet, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input, target and loss weight of a batch masked with `masks`: the network sees what is both
    known and visible under the mask, and is scored where it knows the truth but the mask hides it."""
    seen = masks & data.known
    released = np.where(seen[:, None].astype(bool), data.images, fill).astype(np.uint8)
    weight = torch.as_tensor((data.known & (1 - masks))[:, None]).float()
    x = model.inputs(released, seen, data.labels)
    return batch_to(x, device), batch_to(to_float(data.images), device), batch_to(weight, device)


def _loss(model: UNet, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (((model(x) - y) ** 2) * weight).sum() / weight.sum().clamp_min(1) / y.shape[1]


def train_learned(
    train: AttackerData,
    held_out: AttackerData,
    release_masks: np.ndarray,
    fill: Callable[[tuple[int, ...], int], np.ndarray],
    cfg: LearnedAttackerParams,
    *,
    width: int,
    num_classes: int,
    seed: int,
    device: torch.device,
    epochs: int | None = None,
) -> TrainedAttacker:
    """Train the attacker's inpainter on `train`, masked with masks drawn from the release and filled
    like it, to predict the true pixels it hides. After every epoch it is scored on `held_out` (masks
    drawn once); it stops when that loss has not improved for `cfg.patience` epochs and keeps the
    best epoch's weights. With `epochs` set it runs exactly that many and keeps the last (a fixed
    budget, for benchmarks)."""
    start = time.perf_counter()
    generator = seed_everything(seed)
    rng = np.random.default_rng([seed, 7])
    channels = train.images.shape[1]
    model = on_device(UNet(channels, width, num_classes), device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    held_masks = release_masks[rng.integers(0, len(release_masks), len(held_out.images))]
    held_fill = fill(held_out.images.shape, -1)
    result = TrainedAttacker(model, width, len(train.images), 0, float("inf"))
    best_state = None
    for epoch in range(1, (epochs or cfg.max_epochs) + 1):
        model.train()
        order = torch.randperm(len(train.images), generator=generator).numpy()
        steps = range(0, len(order), cfg.batch_size)
        for k, i in enumerate(progress(steps, desc=f"learned attacker w{width} epoch {epoch}")):
            batch = train.take(order[i : i + cfg.batch_size])
            masks = release_masks[rng.integers(0, len(release_masks), len(batch.images))]
            loss = _loss(model, *_batch(batch, masks, fill(batch.images.shape, k), model, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        held = _held_out_mse(model, held_out, held_masks, held_fill, device, cfg.batch_size)
        result.curve.append(held)
        if held < result.held_out_mse or epochs:
            result.held_out_mse, result.best_epoch = held, epoch
            best_state = copy.deepcopy(model.state_dict())
        log.info("learned attacker w%d epoch %d: held-out hidden-pixel MSE %.5f", width, epoch, held)
        if not epochs and epoch - result.best_epoch >= cfg.patience:
            break
    model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    return result


@torch.no_grad()
def _held_out_mse(
    model: UNet, data: AttackerData, masks: np.ndarray, fill: np.ndarray, device: torch.device, batch_size: int
) -> float:
    model.eval()
    total, weight_sum = 0.0, 0.0
    for i in range(0, len(data.images), batch_size):
        idx = np.arange(i, min(i + batch_size, len(data.images)))
        x, y, weight = _batch(data.take(idx), masks[idx], fill[idx], model, device)
        total += float((((model(x) - y) ** 2) * weight).sum()) / y.shape[1]
        weight_sum += float(weight.sum())
    return total / max(weight_sum, 1.0)


@torch.no_grad()
def learned(
    model: UNet,
    released: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    batch_size: int = 512,
) -> np.ndarray:
    model.eval()
    guesses = []
    for start in range(0, len(released), batch_size):
        part = slice(start, start + batch_size)
        guesses.append(model(batch_to(model.inputs(released[part], masks[part], labels[part]), device)).float().cpu())
    return composite(released, masks, torch.cat(guesses))


def release_fill(kind: str, fill_value: list[int], seed: int) -> Callable[[tuple[int, ...], int], np.ndarray]:
    """The fill the attacker reads from release.json, reproduced for its own training images
    (broadcastable to the batch's shape)."""
    channel_mean = np.asarray(fill_value)
    return lambda shape, step: np.broadcast_to(fill_values(kind, shape, channel_mean, seed, stream=1000 + step), shape)
