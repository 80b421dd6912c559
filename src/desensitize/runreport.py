"""The Markdown summary of one pipeline run: what ran, the metrics, the privacy gate's verdict and a
link to the MLflow run. The Prefect flow publishes it as an artifact, so an operator sees the
outcome of a scheduled run without opening the metrics files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from desensitize.paths import Paths
from desensitize.storage import flatten, read_json

METRICS_FILES = ("reference", "masks", "attack", "evaluate")


def _format(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_report(
    paths: Paths,
    *,
    executed: Sequence[str],
    skipped: Sequence[str] = (),
    error: str | None = None,
    mlflow_run_url: str | None = None,
) -> str:
    """Markdown for a run that executed `executed`, found `skipped` up to date, and ended with
    `error` (None: completed)."""
    lines = ["# Desensitization pipeline run", ""]
    lines.append(f"**Outcome:** {'FAILED: ' + ' '.join(error.split()) if error else 'completed'}")
    lines.append(f"**Stages run:** {', '.join(executed) or 'none (everything up to date)'}")
    if skipped:
        lines.append(f"**Up to date (skipped):** {', '.join(skipped)}")
    attack = paths.report("attack")
    gate = read_json(attack).get("gate", {}) if attack.is_file() else {}
    verdict = gate.get("message", "no attack metrics yet")
    lines += ["", f"**Privacy gate:** {'PASSED' if gate.get('passed') else 'FAILED' if gate else 'unknown'}: {verdict}"]
    if mlflow_run_url:
        shown = (
            f"[{mlflow_run_url}]({mlflow_run_url})"
            if mlflow_run_url.startswith(("http://", "https://"))
            else mlflow_run_url
        )
        lines += ["", f"**MLflow run:** {shown}"]
    lines += ["", "## Metrics", "", "| file | metric | value |", "|---|---|---|"]
    for name in METRICS_FILES:
        path: Path = paths.metrics / f"{name}.json"
        if not path.is_file():
            lines.append(f"| {name}.json | (not written yet) | |")
            continue
        for key, value in flatten(read_json(path)).items():  # the headline figures (desensitize.results)
            lines.append(f"| {name}.json | {key} | {_format(value)} |")
    return "\n".join(lines) + "\n"
