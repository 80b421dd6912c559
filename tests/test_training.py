from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conftest import copy_project, tiny_params
from desensitize.config import ClassifierParams
from desensitize.learning.training import Batches, TrainingData, accuracy_report, predict, train_classifier
from desensitize.masknet import masknet_input, with_mask_channel
from desensitize.models import build_backbone
from desensitize.runtime.device import batch_to, on_device, seed_everything, to_float
from desensitize.stages.reference import train_reference
from desensitize.storage import Shards, sha256_file, write_shards


def _halves(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0: bright left half; class 1: bright right half; noise on top."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 60, (n, 1, 12, 12)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 0, :, 6 * label : 6 * label + 6] += 180
    return images, labels.astype(np.int64)


def _train(seed: int):
    images, labels = _halves()
    seed_everything(seed)
    model = build_backbone("small_cnn", 1, 2)
    history = train_classifier(
        model,
        images,
        labels,
        ClassifierParams(epochs=3, batch_size=32, lr=3e-3, weight_decay=0),
        seed=seed,
        device=torch.device("cpu"),
    )
    return model, history


def test_training_learns_a_separable_task_and_is_seeded():
    model, history = _train(seed=0)
    losses = [row["loss"] for row in history.epochs]
    assert losses[-1] < losses[0] * 0.5
    test_images, test_labels = _halves(seed=1)
    assert (predict(model, test_images, torch.device("cpu")) == test_labels).mean() > 0.95
    _, again = _train(seed=0)
    assert [row["loss"] for row in again.epochs] == losses


def test_accuracy_report_by_hand():
    report = accuracy_report(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), ("a", "b", "c", "d"))
    assert report["accuracy"] == 0.75
    assert report["per_class_accuracy"] == {"a": 1.0, "b": 1.0, "c": 0.5, "d": None}


def test_a_rerun_of_the_reference_stage_writes_byte_identical_outputs(tiny_project, tmp_path: Path):
    """Its outputs are DVC outs: a wall time in its report would change dvc.lock on every rerun."""
    paths = copy_project(tiny_project, tmp_path / "project")
    outputs = (paths.reference_model, paths.reference_history, paths.reference_metrics, paths.report("reference"))
    first = train_reference(tiny_params(), paths, device="cpu")
    digests = [sha256_file(p) for p in outputs]
    second = train_reference(tiny_params(), paths, device="cpu")
    assert [sha256_file(p) for p in outputs] == digests
    assert first["wall_seconds"] > 0 and second["wall_seconds"] > 0  # returned to the MLflow run only
    assert "wall_seconds" not in json.loads(paths.report("reference").read_text())


def _train_as_before(model, images, labels, cfg: ClassifierParams, seed: int) -> None:
    """The training loop as it was before sharded sources (main at f4c86aa): the whole set as one float
    tensor, each epoch `randperm` over all images cut into batches. The one-shard path must equal it."""
    generator = seed_everything(seed)
    x_all, y_all = torch.as_tensor(images).float().div_(255), torch.as_tensor(labels, dtype=torch.long)
    on_device(model, torch.device("cpu")).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((len(x_all) + cfg.batch_size - 1) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = torch.nn.functional.cross_entropy(model(batch_to(x_all[idx], torch.device("cpu"))), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


def _fresh(seed: int):
    seed_everything(seed)
    return build_backbone("small_cnn", 1, 2)  # has dropout: the global stream must not move either


def _weights(model) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.state_dict().values()]


def test_one_shard_trains_bit_identically_to_the_loop_on_arrays(tmp_path: Path):
    images, labels = _halves(100)
    cfg = ClassifierParams(epochs=2, batch_size=32, lr=3e-3, weight_decay=1e-4)
    before = _fresh(5)
    _train_as_before(before, images, labels, cfg, seed=5)
    in_memory = _fresh(5)
    train_classifier(in_memory, images, labels, cfg, seed=5, device=torch.device("cpu"))
    entries = write_shards(tmp_path, "train", 1000, images=images, labels=labels)
    on_disk = _fresh(5)
    data = TrainingData(Shards(tmp_path, tuple(entries), hint="-"), (1, 12, 12))
    train_classifier(on_disk, data, None, cfg, seed=5, device=torch.device("cpu"))
    for a, b, c in zip(_weights(before), _weights(in_memory), _weights(on_disk), strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_several_shards_give_each_image_once_per_epoch_in_a_seeded_order_and_train(tmp_path: Path):
    images, labels = _halves(256)
    entries = write_shards(tmp_path, "train", 100, images=images, labels=np.arange(256))  # labels: the row
    rows = TrainingData(Shards(tmp_path, tuple(entries), hint="-"), (1, 12, 12))
    batches = Batches(rows, 32, torch.Generator().manual_seed(0))
    assert batches.steps() == 4 + 4 + 2  # per shard: 100, 100, 56 images
    epochs = [[int(v) for _, y in batches for v in y] for _ in range(2)]
    assert all(sorted(e) == list(range(256)) for e in epochs) and epochs[0] != epochs[1]
    again = Batches(rows, 32, torch.Generator().manual_seed(0))
    assert [int(v) for _, y in again for v in y] == epochs[0]

    entries = write_shards(tmp_path, "halves", 100, images=images, labels=labels)
    data = TrainingData(Shards(tmp_path, tuple(entries), hint="-"), (1, 12, 12))
    model = _fresh(0)
    cfg = ClassifierParams(epochs=3, batch_size=32, lr=3e-3, weight_decay=0)
    history = train_classifier(model, data, None, cfg, seed=0, device=torch.device("cpu"))
    assert history.epochs[-1]["loss"] < history.epochs[0]["loss"] * 0.5
    test_images, test_labels = _halves(seed=1)
    assert (predict(model, test_images, torch.device("cpu")) == test_labels).mean() > 0.95


def test_the_masknet_input_is_built_per_batch_from_the_shards(tmp_path: Path):
    images, labels = _halves(64)
    masks = np.random.default_rng(0).integers(0, 2, (64, 12, 12)).astype(np.uint8)
    entries = write_shards(tmp_path, "train", 1000, images=images, labels=labels, masks=masks)
    data = TrainingData(Shards(tmp_path, tuple(entries), hint="-"), (2, 12, 12), masknet_input)
    whole = to_float(with_mask_channel(images, masks))
    order = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    for k, (x, y) in enumerate(Batches(data, 16, torch.Generator().manual_seed(3))):
        idx = order[16 * k : 16 * (k + 1)]
        torch.testing.assert_close(x, whole[idx], rtol=0, atol=0)
        np.testing.assert_array_equal(y.numpy(), labels[idx.numpy()])
