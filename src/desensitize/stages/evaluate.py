"""The `evaluate` stage: every model of the comparison on its own masked test set.

`raw` on raw test images, `plain_random` on test images under the random mask, `plain` and
`masknet` on the released (masked) test set. Writes reports/evaluate/report.json (accuracy per model
with its 95% Wilson interval over the test images, the two gains, the classes the test split holds,
which every figure covers; the accuracies are also the headline in metrics/evaluate.json), a
confusion matrix PNG per model and a Markdown table in reports/evaluate/.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from desensitize.bundle.masked import random_release_of
from desensitize.bundle.verify import verified_release
from desensitize.config import Params
from desensitize.data.splits import split_shards
from desensitize.learning.checkpoints import load_checkpoint
from desensitize.learning.training import accuracy_report, images_of, predict_shards
from desensitize.masknet import masknet_input
from desensitize.paths import MODELS, Paths
from desensitize.release import released_shards
from desensitize.reporting.figures import confusion_matrix
from desensitize.reporting.records import accuracy_with_interval, write_results
from desensitize.runtime.device import best_device
from desensitize.stats import class_coverage, coverage_text, wilson_interval
from desensitize.storage import atomic_path


def evaluate(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns the report written to reports/evaluate/report.json (headline: metrics/evaluate.json)."""
    info = verified_release(paths.release, paths.raw)
    released = released_shards(paths.release, "test")  # every test set is read one shard at a time
    raw = split_shards(paths.raw, "test")
    inputs = {
        "raw": (raw, images_of),
        "plain_random": (random_release_of(info, {"test": raw}, params.seed)["test"], images_of),
        "plain": (released, images_of),
        "masknet": (released, masknet_input),
    }
    class_names = tuple(info.class_names)
    torch_device = best_device(device)
    accuracy, interval, per_class, coverage = {}, {}, {}, None
    for name in MODELS:
        model, _ = load_checkpoint(paths.model(name), torch_device)
        source, build = inputs[name]
        predictions, labels = predict_shards(model, source, torch_device, build)
        report = accuracy_report(predictions, labels, class_names)
        accuracy[name], per_class[name] = report["accuracy"], report["per_class_accuracy"]
        coverage = class_coverage(labels, class_names)  # the same test labels for every model
        interval[name] = list(wilson_interval(int((predictions == labels).sum()), len(labels)))
        k = len(class_names)
        matrix = np.bincount(labels * k + predictions, minlength=k * k).reshape(k, k)
        confusion_matrix(
            matrix,
            class_names,
            paths.evaluate_reports / f"confusion_{name}.png",
            f"{name}: accuracy {report['accuracy']:.3f}",
        )
    metrics = {
        "accuracy": accuracy,
        # One run's figure moves with the test sample (this interval) and with the seed and machine
        # (README: what is reproducible).
        "accuracy_interval": interval,
        "masknet_over_plain": accuracy["masknet"] - accuracy["plain"],
        "saliency_over_random": accuracy["plain"] - accuracy["plain_random"],
        "per_class_accuracy": per_class,
        "mask": info.model_dump(include={"strategy", "method", "scope", "hidden_ratio", "cell", "fill"}),
        "n_test": len(raw),
        "test_classes": coverage,
    }
    _table(paths, metrics)
    write_results(paths, "evaluate", metrics, headline(metrics))
    return metrics


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """metrics/evaluate.json: each model's test accuracy."""
    return dict(report["accuracy"])


def _table(paths: Paths, metrics: dict[str, Any]) -> None:
    mask = metrics["mask"]
    a = {name: accuracy_with_interval(metrics, name) for name in metrics["accuracy"]}
    lines = [
        "# Recognition on masked images",
        "",
        f"Mask: {mask['strategy']} ({mask['method'] or '-'}), {mask['scope']} scope, "
        f"{mask['hidden_ratio']:.0%} of {mask['cell']}x{mask['cell']} cells hidden, {mask['fill']} fill. "
        f"Test images: {metrics['n_test']}, of {coverage_text(metrics['test_classes'], 'the test split')}; "
        "accuracies and intervals are over these.",
        "",
        "| model | trained and tested on | accuracy [95% interval] |",
        "|---|---|---|",
        f"| raw | raw images (owner-side upper bound) | {a['raw']} |",
        f"| plain_random | a random mask of the same ratio and grid | {a['plain_random']} |",
        f"| plain | the release | {a['plain']} |",
        f"| masknet | the release, with its mask | {a['masknet']} |",
        "",
        f"MaskNet over plain (model adjustment): {metrics['masknet_over_plain']:+.4f}. "
        f"This mask over a random one (mask generation): {metrics['saliency_over_random']:+.4f}.",
        "",
    ]
    with atomic_path(paths.evaluate_reports / "summary.md") as tmp:
        tmp.write_text("\n".join(lines))
