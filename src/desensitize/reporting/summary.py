"""The summary of the last pipeline run, read from the stages' reports: `text`, the headline lines that
`desensitize summary` prints (and `make run` ends with), and `run_report`, the Markdown the Prefect flow
publishes for each run (outcome, stages run, the privacy gate's verdict, the MLflow run and the metrics
files), so an operator sees the outcome of a scheduled run without opening any file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from desensitize.paths import Paths
from desensitize.reporting.records import accuracy_with_interval, read_report
from desensitize.stats import coverage_text
from desensitize.storage import flatten, read_json

METRICS_FILES = ("reference", "masks", "attack", "evaluate")


def _reports(paths: Paths) -> dict[str, dict[str, Any]]:
    """Every stage report there is, by stage."""
    return {stage: read_report(paths, stage) for stage in METRICS_FILES if paths.report(stage).is_file()}


def _blocked_since(paths: Paths, attack: dict[str, Any]) -> bool:
    """The last attack run blocked its release, and the evaluate report (if any) is older: its figures
    belong to an earlier release."""
    gate = attack["gate"]
    blocked = not gate["passed"] and not gate["overridden"]
    evaluation = paths.report("evaluate")
    evaluated = evaluation.is_file() and evaluation.stat().st_mtime >= paths.report("attack").stat().st_mtime
    return blocked and not evaluated


def text(paths: Paths) -> str:
    """One line per stage that reported: the headline figures of the last run."""
    reports = _reports(paths)
    lines = []
    if "reference" in reports:
        ref = reports["reference"]
        lines.append(f"reference  {ref['backbone']}: raw test accuracy {ref['test_accuracy']:.4f}{_over(ref)}")
    search = paths.masks_reports / "search.json"
    if search.is_file() and "masks" not in reports and read_json(search).get("chosen", "") is None:
        lines.append(
            "masks      no release: no mask candidate passes the privacy gate (the closest and every "
            "candidate's scores: reports/masks/search.json); nothing was attacked, trained or registered"
        )
        return "\n".join(lines)
    if "masks" in reports:
        m = reports["masks"]
        lines.append(
            f"masks      {m['strategy']}/{m['method'] or '-'}, {m['scope']} scope"
            + (f" ({m['template']} template)" if m.get("template") else "")
            + (f", search candidate '{m['candidate']}'" if m.get("candidate") else "")
            + f": {m['n_hidden_cells']} of {m['n_cells']} "
            f"cells hidden; reference accuracy on masked test {m['reference_accuracy_on_masked_test']:.4f} "
            f"(random mask {m['reference_accuracy_on_random_masked_test']:.4f})"
        )
        for line in tradeoff_lines((m.get("search") or {}).get("tradeoff") or []):
            lines.append(f"tradeoff   {line}")
    if "attack" in reports:
        a = reports["attack"]
        best = a["attackers"][a["best_attacker"]]
        gain, within = best["psnr_gain_interval"], best["linkage_within_class_interval"]
        lines.append(
            f"attack     best attacker {a['best_attacker']}: PSNR gain {best['psnr_gain']:+.2f} dB "
            f"[{gain[0]:+.2f}, {gain[1]:+.2f}] over {a['best_blind']}, linkage within class "
            f"{best['linkage_within_class']:.3f} [{within[0]:.3f}, {within[1]:.3f}] (chance "
            f"{a['linkage_within_class_chance']:.3f}); judged {best['judged']['psnr_gain']:+.2f} dB, "
            f"{best['judged']['linkage_within_class']:.3f}; hidden information {a['hidden_information']:.3f}"
        )
        lines.append(f"gate       {a['gate']['message']}")
    if "attack" in reports and _blocked_since(paths, reports["attack"]):
        lines.append(
            "evaluate   not run: the privacy gate blocked this release (nothing was trained or registered on it)"
        )
    elif "evaluate" in reports:
        e = reports["evaluate"]
        acc = ", ".join(f"{name} {accuracy_with_interval(e, name)}" for name in e["accuracy"])
        lines.append(
            f"evaluate   test accuracy [95% interval]: {acc}; masknet over plain {e['masknet_over_plain']:+.4f}, "
            f"this mask over random {e['saliency_over_random']:+.4f}{_over(e)}"
        )
    return "\n".join(lines) if lines else "no metrics yet: run `dvc repro` first"


def _over(report: dict[str, Any]) -> str:
    """`; over 9 of 10 classes (...)` where the test split lacks a class (reports made before it was
    recorded, or with every class present, say nothing)."""
    coverage = report.get("test_classes")
    return f"; over {coverage_text(coverage, 'the test split')}" if coverage and coverage["absent"] else ""


def _format(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_report(
    paths: Paths,
    *,
    executed: Sequence[str],
    skipped: Sequence[str] = (),
    error: str | None = None,
    mlflow_run_url: str | None = None,
    experiment: str | None = None,
) -> str:
    """Markdown for a run that executed `executed`, found `skipped` up to date, and ended with
    `error` (None: completed); `experiment` says which DVC experiment it was (an override run)."""
    lines = ["# Desensitization pipeline run", ""]
    lines.append(f"**Outcome:** {'FAILED: ' + ' '.join(error.split()) if error else 'completed'}")
    if experiment:
        lines.append(f"**DVC experiment:** {experiment}")
    lines.append(f"**Stages run:** {', '.join(executed) or 'none (everything up to date)'}")
    if skipped:
        lines.append(f"**Up to date (skipped):** {', '.join(skipped)}")
    gate = read_report(paths, "attack").get("gate", {}) if paths.report("attack").is_file() else {}
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
        path = paths.metrics / f"{name}.json"
        if not path.is_file():
            lines.append(f"| {name}.json | (not written yet) | |")
            continue
        for key, value in flatten(read_json(path)).items():  # the headline figures (each stage's `headline`)
            lines.append(f"| {name}.json | {key} | {_format(value)} |")
    return "\n".join(lines) + "\n"


def tradeoff_lines(table: Sequence[dict[str, Any]]) -> list[str]:
    """The mask search's trade-off rows (desensitize.search.tradeoff) in words, one per level: the masks
    stage's summary.md and `desensitize summary`."""
    out = []
    for row in table:
        where = f"{row['level']:g}x chance (within-class linkage <= {row['linkage_limit']:.3f})"
        if row["gate"]:
            where += ", the gate's"
        if row["candidate"] is None:
            out.append(f"at {where}: no candidate found")
            continue
        linkage = row["scores"]["linkage_within_class"]
        out.append(
            f"at {where}: '{row['candidate']}', held-out utility {row['utility']:.3f}, within-class linkage "
            f"{linkage:.3f} ({row['basis']})"
        )
    return out
