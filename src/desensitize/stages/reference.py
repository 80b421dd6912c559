"""The `reference` stage: the owner's classifier f0, trained on raw `train`, tested on raw `test`.

f0 is what the attribution step interprets to find the pixels recognition needs; it never
leaves the owner.
"""

from __future__ import annotations

import logging
from typing import Any

from desensitize.config import Params
from desensitize.distributed import world
from desensitize.paths import Paths
from desensitize.results import write_results
from desensitize.splits import load_split
from desensitize.training import accuracy_report, best_device, fit, predict

log = logging.getLogger(__name__)


def train_reference(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns the report (desensitize.results) and the wall time (for
    the MLflow run only: a wall-clock figure would make identical reruns differ for DVC)."""
    train = load_split(paths.raw, "train")
    test = load_split(paths.raw, "test")
    torch_device = best_device(device)
    cfg = params.reference
    log.info("training reference %s on %d images (%s)", cfg.backbone, len(train.images), torch_device)
    model, history = fit(
        cfg,
        train.images,
        train.labels,
        train.class_names,
        seed=params.seed,
        masknet=False,
        device=torch_device,
        model_path=paths.reference_model,
        history_path=paths.reference_history,
        name="reference",
    )
    report = accuracy_report(predict(model, test.images, torch_device), test.labels, test.class_names)
    metrics = {
        "test_accuracy": report["accuracy"],
        "per_class_accuracy": report["per_class_accuracy"],
        "train_accuracy": history.epochs[-1]["train_accuracy"],
        "epochs": cfg.epochs,
        "backbone": cfg.backbone,
        "n_train": len(train.images),
        "n_test": len(test.images),
        "device": torch_device.type,
    }
    if world().is_main:  # under torchrun the other ranks only help train
        write_results(paths, "reference", metrics)
    log.info("reference test accuracy %.4f (%.1f s)", metrics["test_accuracy"], history.wall_seconds)
    return {**metrics, "wall_seconds": round(history.wall_seconds, 2)}
