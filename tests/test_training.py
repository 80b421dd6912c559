from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conftest import copy_project, tiny_params
from desensitize.config import ClassifierParams
from desensitize.models import build_backbone
from desensitize.stages.reference import train_reference
from desensitize.storage import sha256_file
from desensitize.training import accuracy_report, predict, seed_everything, train_classifier


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
