"""Where each stage's results go: the whole record in `reports/<stage>/report.json`, and the few
headline scalars a person compares between experiments in `metrics/<stage>.json`.

The metrics files are what `dvc metrics show`, `dvc metrics diff` and `dvc exp show` print, so they hold
only the headline figures (HEADLINES: under 20 across all stages, short names): accuracy of each model,
the gate's verdict, the judged scores it compared with each threshold, the candidate released. Everything
else (per-class accuracy, every attacker's every score and interval, the data-scaling fits, the search's
candidates) is in the report, versioned by DVC with the stage's other reports and logged to MLflow.
Every consumer of a detail reads the report.
"""

from __future__ import annotations

from typing import Any

from desensitize.paths import Paths
from desensitize.storage import read_json, write_json

GATED = ("psnr_gain", "linkage_within_class", "recognition_recovery")


def _worst_judged(report: dict[str, Any], score: str) -> float:
    """What the gate compared with the threshold: the highest judged value over the attackers."""
    return max(attacker["judged"][score] for attacker in report["attackers"].values())


# Short names: `dvc exp show` prints each as a column header. The attack's scores are what the gate
# compared with each threshold (`_max`): the highest judged value over the attackers. The evaluate
# stage's are test accuracies, the reference stage's the reference model's on raw test images.
HEADLINES = {
    "reference": lambda r: {"reference": r["test_accuracy"]},
    "masks": lambda r: {
        "candidate": r["candidate"] or r["template"] or r["strategy"],
        "hidden_ratio": r["hidden_ratio"],
        "reference_masked": r["reference_accuracy_on_masked_test"],
    },
    "attack": lambda r: {
        "gate_passed": r["gate"]["passed"],
        "best_attacker": r["best_attacker"],
        **{
            name: value
            for key, score in zip(("psnr_gain", "linkage", "recovery"), GATED, strict=True)
            for name, value in ((key, _worst_judged(r, score)), (f"{key}_max", r["gate"]["limits"][score]))
        },
    },
    "evaluate": lambda r: dict(r["accuracy"]),
}


def headline(stage: str, report: dict[str, Any]) -> dict[str, Any]:
    return HEADLINES[stage](report)


def write_results(paths: Paths, stage: str, report: dict[str, Any]) -> None:
    """The report, then the metrics file drawn from it (each written atomically)."""
    write_json(paths.report(stage), report)
    write_json(paths.metrics / f"{stage}.json", headline(stage, report))


def read_report(paths: Paths, stage: str) -> dict[str, Any]:
    return read_json(paths.report(stage))
