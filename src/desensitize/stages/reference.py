"""The `reference` stage: the owner's classifier f0, trained on raw `train`, tested on raw `test`.

f0 is what the attribution step interprets to find the pixels recognition needs; it never
leaves the owner.
"""

from __future__ import annotations

import logging
from typing import Any

from desensitize import stats
from desensitize.config import Params
from desensitize.data.splits import read_manifest, split_shards
from desensitize.learning.training import TrainingData, accuracy_report, fit, predict_shards
from desensitize.paths import Paths
from desensitize.reporting.records import write_results
from desensitize.runtime.device import best_device
from desensitize.runtime.distributed import world

log = logging.getLogger(__name__)


def train_reference(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns the report (desensitize.reporting.records) and the wall time (for
    the MLflow run only: a wall-clock figure would make identical reruns differ for DVC)."""
    manifest = read_manifest(paths.raw)
    class_names = tuple(manifest["class_names"])
    train = TrainingData(split_shards(paths.raw, "train"), tuple(manifest["image_shape"]))
    torch_device = best_device(device)
    cfg = params.reference
    log.info("training reference %s on %d images (%s)", cfg.backbone, len(train.source), torch_device)
    model, history = fit(
        cfg,
        train,
        None,
        class_names,
        seed=params.seed,
        masknet=False,
        device=torch_device,
        model_path=paths.reference_model,
        history_path=paths.reference_history,
        name="reference",
    )
    predictions, test_labels = predict_shards(model, split_shards(paths.raw, "test"), torch_device)
    report = accuracy_report(predictions, test_labels, class_names)
    coverage = stats.class_coverage(test_labels, class_names)  # the accuracy is over these classes only
    metrics = {
        "test_accuracy": report["accuracy"],
        "test_classes": coverage,
        "per_class_accuracy": report["per_class_accuracy"],
        "train_accuracy": history.epochs[-1]["train_accuracy"],
        "epochs": cfg.epochs,
        "backbone": cfg.backbone,
        "n_train": len(train.source),
        "n_test": len(test_labels),
        "device": torch_device.type,
    }
    if world().is_main:  # under torchrun the other ranks only help train
        write_results(paths, "reference", metrics, headline(metrics))
    log.info(
        "reference test accuracy %.4f over %s (%.1f s)",
        metrics["test_accuracy"],
        stats.coverage_text(coverage, "the test split"),
        history.wall_seconds,
    )
    return {**metrics, "wall_seconds": round(history.wall_seconds, 2)}


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """metrics/reference.json: the reference model's accuracy on raw test images."""
    return {"reference": report["test_accuracy"]}
