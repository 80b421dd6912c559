"""Device choice, seeding, and the supervised training / evaluation loops shared by every model."""

from __future__ import annotations

import csv
import logging
import random
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from desensitize.checkpoints import build_model, save_checkpoint
from desensitize.config import ClassifierParams
from desensitize.distributed import Replicas, rank_device, world
from desensitize.errors import DesensitizeError
from desensitize.models import build_backbone
from desensitize.paths import Paths
from desensitize.storage import atomic_path

log = logging.getLogger(__name__)
T = TypeVar("T")


def best_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; `cuda` without a GPU is an error, not a silent fallback.
    Under torchrun with several processes, each rank's CUDA device is cuda:LOCAL_RANK."""
    if requested == "auto":
        return rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DesensitizeError(f"device {requested!r} requested but CUDA is not available on this machine")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DesensitizeError(f"device {requested!r}: expected auto, cpu, cuda or cuda:N") from None
    return rank_device(device)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A progress bar on a terminal; nothing otherwise (callers log periodic lines instead)."""
    return iter(tqdm(iterable, desc=desc, total=total, leave=False, disable=not sys.stderr.isatty()))


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to `device` in channels-last layout, which oneDNN and cuDNN run fastest for convolutions."""
    return model.to(device=device, memory_format=torch.channels_last)


def batch_to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.to(device=device, memory_format=torch.channels_last) if x.dim() == 4 else x.to(device)


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [0, 1]."""
    tensor = torch.as_tensor(images)
    return tensor.float().div_(255) if tensor.dtype == torch.uint8 else tensor.float()


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0


def train_classifier(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: ClassifierParams,
    *,
    seed: int,
    device: torch.device,
    name: str = "model",
    epochs: int | None = None,
) -> History:
    """Adam with a one-cycle schedule over full passes in a seeded order (`cfg`: batch size, learning
    rate, weight decay, and the epochs unless `epochs` is given); logs one line per epoch."""
    epochs, batch_size, lr, weight_decay = epochs or cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay
    generator = seed_everything(seed)
    x_all, y_all = to_float(images), torch.as_tensor(labels, dtype=torch.long)
    on_device(model, device).train()
    replicas = Replicas(model, device, seed)  # under torchrun: every rank takes its share of each batch
    optimizer = torch.optim.Adam(replicas.module.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x_all) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    history = History()
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_all), generator=generator)
        total_loss, correct = 0.0, 0
        batches = range(0, len(order), batch_size)
        for i in progress(batches, desc=f"{name} epoch {epoch}/{epochs}"):
            idx = order[i : i + batch_size]
            share = replicas.share(idx)
            x, y = batch_to(x_all[share], device), y_all[share].to(device)
            logits = replicas.module(x)
            loss = replicas.loss(logits, y, len(idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        total_loss, correct = replicas.totals(total_loss, correct)
        row = {"epoch": epoch, "loss": total_loss / len(order), "train_accuracy": correct / len(order)}
        history.epochs.append(row)
        log.info(
            "%s epoch %d/%d: loss %.4f, train accuracy %.4f", name, epoch, epochs, row["loss"], row["train_accuracy"]
        )
    replicas.finish()
    history.wall_seconds = time.perf_counter() - start
    return history


def fit(
    cfg: ClassifierParams,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    *,
    seed: int,
    masknet: bool,
    device: torch.device,
    model_path: Path,
    history_path: Path,
    name: str,
) -> tuple[nn.Module, History]:
    """Build, train and save one classifier (a MaskNet when `masknet`: the mask is the last channel of
    `images`); writes the checkpoint and its training curve."""
    channels = images.shape[1] - (1 if masknet else 0)
    spec = {
        "backbone": cfg.backbone,
        "in_channels": channels,
        "num_classes": len(class_names),
        "image_shape": [channels, *images.shape[2:]],
        "class_names": list(class_names),
        "masknet": masknet,
    }
    seed_everything(seed)  # the initial weights too
    model = build_model(spec)
    history = train_classifier(model, images, labels, cfg, seed=seed, device=device, name=name)
    if world().is_main:  # under torchrun every rank holds the same weights; one writes them
        save_checkpoint(model_path, model, **spec)
        write_history(history_path, history)
    return model, history


def fit_comparison(
    cfg: ClassifierParams,
    paths: Paths,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    *,
    seed: int,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """`fit` each model of the comparison (name -> its input images; `masknet` reads the mask as their
    last channel) into models/<name>.npz with its curve in plots/train/<name>.csv; returns each
    model's last epoch and wall time."""
    summary = {}
    for name, images in inputs.items():
        _, history = fit(
            cfg,
            images,
            labels,
            class_names,
            seed=seed,
            masknet=name == "masknet",
            device=device,
            model_path=paths.model(name),
            history_path=paths.train_history(name),
            name=name,
        )
        summary[name] = {**history.epochs[-1], "wall_seconds": round(history.wall_seconds, 2)}
    return summary


def fit_and_score(
    cfg: ClassifierParams,
    images: np.ndarray,
    labels: np.ndarray,
    eval_images: np.ndarray,
    eval_labels: np.ndarray,
    *,
    num_classes: int,
    seed: int,
    device: torch.device,
    epochs: int | None = None,
    name: str = "model",
) -> float:
    """Train a fresh, seeded `cfg.backbone` (for `epochs`, default `cfg.epochs`) and return its top-1
    accuracy on the eval set; nothing is saved."""
    seed_everything(seed)  # the initial weights too
    model = build_backbone(cfg.backbone, images.shape[1], num_classes)
    train_classifier(model, images, labels, cfg, seed=seed, device=device, name=name, epochs=epochs)
    return float((predict(model, eval_images, device) == eval_labels).mean())


def write_history(path: Path, history: History) -> None:
    """The per-epoch curve as CSV (a DVC plot)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "loss", "train_accuracy"])
        writer.writeheader()
        writer.writerows(history.epochs)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 512) -> np.ndarray:
    on_device(model, device).eval()
    x_all = to_float(images)
    out = [model(batch_to(x_all[i : i + batch_size], device)).argmax(1).cpu() for i in range(0, len(x_all), batch_size)]
    return torch.cat(out).numpy()


def accuracy_report(predictions: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> dict:
    """Top-1 accuracy and accuracy per class (None for a class absent from `labels`)."""
    per_class = {}
    for k, cls in enumerate(class_names):
        members = labels == k
        per_class[cls] = float((predictions[members] == k).mean()) if members.any() else None
    return {"accuracy": float((predictions == labels).mean()), "per_class_accuracy": per_class}
