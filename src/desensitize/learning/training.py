"""The supervised training and evaluation loops shared by every classifier: batches drawn from shards,
Adam with a one-cycle schedule, checkpoints and curves written, predictions and accuracy."""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from desensitize.config import ClassifierParams
from desensitize.learning.checkpoints import build_model, save_checkpoint
from desensitize.models import build_backbone
from desensitize.paths import Paths
from desensitize.runtime.device import batch_to, on_device, progress, seed_everything, to_float
from desensitize.runtime.distributed import Replicas, world
from desensitize.storage import InMemory, ShardSource, atomic_path

log = logging.getLogger(__name__)


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0


Inputs = Callable[[dict[str, np.ndarray]], np.ndarray]


def images_of(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return arrays["images"]


@dataclass(frozen=True)
class TrainingData:
    """What a classifier trains on: a source of shards (storage.ShardSource: `Shards` on disk, read one
    at a time, a release made as each shard is read, or arrays `InMemory`) holding `labels`, and
    `inputs`, which builds a batch's model input (uint8 or float, `shape` per image) from that batch's
    arrays: the images, or e.g. the MaskNet input (image + mask), so that no input is ever built for the
    whole set."""

    source: ShardSource
    shape: tuple[int, ...]
    inputs: Inputs = images_of


def training_data(images: np.ndarray | TrainingData, labels: np.ndarray | None = None) -> TrainingData:
    """In-memory images and labels as one shard; TrainingData as it is (its labels are in its shards)."""
    if isinstance(images, TrainingData):
        if labels is not None:
            raise ValueError("sharded training data carries its own labels; pass labels=None")
        return images
    return TrainingData(InMemory({"images": images, "labels": labels}), tuple(images.shape[1:]))


class Batches(IterableDataset):
    """One epoch of training batches per iteration: (float32 input in [0, 1], int64 labels), each
    converted on its own, from one shard in memory at a time. The order is drawn from `generator` as
    the epoch starts: the shards in a seeded random order (drawn only when there are several), then
    each shard's images in a seeded random order, cut into batches (a shard's last one may be short).
    With one shard that is exactly `torch.randperm(n)` cut into batches, the order training on arrays
    always had: a model trained on data that fits one shard keeps its weights bit for bit."""

    def __init__(self, data: TrainingData, batch_size: int, generator: torch.Generator) -> None:
        self.data, self.batch_size, self.generator = data, batch_size, generator

    def steps(self) -> int:
        """Batches per epoch."""
        return sum((n + self.batch_size - 1) // self.batch_size for n in self.data.source.sizes)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n_shards = len(self.data.source.sizes)
        shards = torch.randperm(n_shards, generator=self.generator).tolist() if n_shards > 1 else [0]
        for k in shards:
            arrays = self.data.source.read(k)
            order = torch.randperm(len(arrays["labels"]), generator=self.generator).numpy()
            for i in range(0, len(order), self.batch_size):
                batch = {name: array[order[i : i + self.batch_size]] for name, array in arrays.items()}
                yield to_float(self.data.inputs(batch)), torch.as_tensor(batch["labels"], dtype=torch.long)


def train_classifier(
    model: nn.Module,
    images: np.ndarray | TrainingData,
    labels: np.ndarray | None,
    cfg: ClassifierParams,
    *,
    seed: int,
    device: torch.device,
    name: str = "model",
    epochs: int | None = None,
) -> History:
    """Adam with a one-cycle schedule over full passes in a seeded order (`cfg`: batch size, learning
    rate, weight decay, and the epochs unless `epochs` is given); logs one line per epoch. `images` and
    `labels` in memory, or sharded `TrainingData` (labels None), read one shard at a time (see Batches)."""
    epochs, batch_size, lr, weight_decay = epochs or cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay
    generator = seed_everything(seed)
    batches = Batches(training_data(images, labels), batch_size, generator)
    # batch_size=None: Batches yields whole batches. Its own generator: the loader draws a seed for its
    # workers as each epoch starts, which must not move the global stream that dropout draws from.
    loader = DataLoader(batches, batch_size=None, generator=torch.Generator())
    on_device(model, device).train()
    replicas = Replicas(model, device, seed)  # under torchrun: every rank takes its share of each batch
    optimizer = torch.optim.Adam(replicas.module.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * batches.steps()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    history = History()
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        total_loss, correct, seen = 0.0, 0, 0
        for x_cpu, y_cpu in progress(loader, desc=f"{name} epoch {epoch}/{epochs}", total=batches.steps()):
            batch_len = len(y_cpu)
            x, y = batch_to(replicas.share(x_cpu), device), replicas.share(y_cpu).to(device)
            logits = replicas.module(x)
            loss = replicas.loss(logits, y, batch_len)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * batch_len
            correct += (logits.argmax(1) == y).sum().item()
            seen += batch_len
        total_loss, correct = replicas.totals(total_loss, correct)
        row = {"epoch": epoch, "loss": total_loss / seen, "train_accuracy": correct / seen}
        history.epochs.append(row)
        log.info(
            "%s epoch %d/%d: loss %.4f, train accuracy %.4f", name, epoch, epochs, row["loss"], row["train_accuracy"]
        )
    replicas.finish()
    history.wall_seconds = time.perf_counter() - start
    return history


def fit(
    cfg: ClassifierParams,
    images: np.ndarray | TrainingData,
    labels: np.ndarray | None,
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
    the input); writes the checkpoint and its training curve. `images` and `labels` as in train_classifier."""
    data = training_data(images, labels)
    channels = data.shape[0] - (1 if masknet else 0)
    spec = {
        "backbone": cfg.backbone,
        "in_channels": channels,
        "num_classes": len(class_names),
        "image_shape": [channels, *data.shape[1:]],
        "class_names": list(class_names),
        "masknet": masknet,
    }
    seed_everything(seed)  # the initial weights too
    model = build_model(spec)
    history = train_classifier(model, data, None, cfg, seed=seed, device=device, name=name)
    if world().is_main:  # under torchrun every rank holds the same weights; one writes them
        save_checkpoint(model_path, model, **spec)
        write_history(history_path, history)
    return model, history


def fit_comparison(
    cfg: ClassifierParams,
    paths: Paths,
    inputs: dict[str, np.ndarray | TrainingData],
    labels: np.ndarray | None,
    class_names: list[str] | tuple[str, ...],
    *,
    seed: int,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """`fit` each model of the comparison (name -> its input images, or sharded TrainingData with labels
    None; `masknet` reads the mask as the last channel) into models/<name>.npz with its curve in
    plots/train/<name>.csv; returns each model's last epoch and wall time."""
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


def predict_shards(
    model: nn.Module, shards: Iterable[dict[str, np.ndarray]], device: torch.device, inputs: Inputs = images_of
) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and labels of a sharded split, one shard in memory at a time (`inputs` builds a shard's
    model input from its arrays)."""
    parts = [(predict(model, inputs(arrays), device), arrays["labels"]) for arrays in shards]
    return np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts])


def accuracy_report(predictions: np.ndarray, labels: np.ndarray, class_names: tuple[str, ...]) -> dict:
    """Top-1 accuracy and accuracy per class (None for a class absent from `labels`)."""
    per_class = {}
    for k, cls in enumerate(class_names):
        members = labels == k
        per_class[cls] = float((predictions[members] == k).mean()) if members.any() else None
    return {"accuracy": float((predictions == labels).mean()), "per_class_accuracy": per_class}
