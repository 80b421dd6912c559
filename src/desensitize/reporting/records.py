"""Where each stage's results go: the whole record in `reports/<stage>/report.json`, and the few
headline scalars a person compares between experiments in `metrics/<stage>.json`.

The metrics files are what `dvc metrics show`, `dvc metrics diff` and `dvc exp show` print, so they hold
only the headline figures (each stage's `headline`: under 20 across all stages, short names): accuracy of each model,
the gate's verdict, the judged scores it compared with each threshold, the candidate released. Everything
else (per-class accuracy, every attacker's every score and interval, the data-scaling fits, the search's
candidates) is in the report, versioned by DVC with the stage's other reports and logged to MLflow.
Every consumer of a detail reads the report.
"""

from __future__ import annotations

from typing import Any

from desensitize.paths import Paths
from desensitize.storage import read_json, write_json


def write_results(paths: Paths, stage: str, report: dict[str, Any], headline: dict[str, Any]) -> None:
    """The report, then its headline figures (each stage's `headline` of the report: short names, since
    `dvc exp show` prints each as a column header), each file written atomically."""
    write_json(paths.report(stage), report)
    write_json(paths.metrics / f"{stage}.json", headline)


def read_report(paths: Paths, stage: str) -> dict[str, Any]:
    return read_json(paths.report(stage))


def accuracy_with_interval(evaluation: dict[str, Any], name: str) -> str:
    """A model's test accuracy from the evaluate report with its 95% interval over the test images."""
    lo, hi = evaluation["accuracy_interval"][name]
    return f"{evaluation['accuracy'][name]:.4f} [{lo:.4f}, {hi:.4f}]"
