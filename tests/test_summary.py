"""The run report the Prefect flow publishes: metrics table, gate verdict, MLflow link."""

from __future__ import annotations

import json
from pathlib import Path

from desensitize.paths import Paths
from desensitize.reporting.summary import run_report


def _metrics(root: Path) -> Paths:
    paths = Paths(root)
    paths.metrics.mkdir()
    paths.reference_metrics.write_text(json.dumps({"reference": 0.9512}))
    gate = {
        "passed": False,
        "message": "privacy gate FAILED: learned linkage_within_class 0.4 > 0.15 (release blocked)",
    }
    headline = {"gate_passed": False, "best_attacker": "learned", "psnr_gain": 5.25, "psnr_gain_max": 1.0}
    paths.attack_metrics.write_text(json.dumps(headline))
    paths.report("attack").parent.mkdir(parents=True)
    paths.report("attack").write_text(json.dumps({"gate": gate}))  # the verdict's message is in the report
    return paths


def test_report_has_metrics_verdict_and_outcome(tmp_path: Path):
    paths = _metrics(tmp_path)
    report = run_report(paths, executed=["attack"], skipped=["ingest"], error="privacy gate FAILED: learned ...")
    assert "| reference.json | reference | 0.9512 |" in report
    assert "| attack.json | gate_passed | False |" in report and "| attack.json | best_attacker | learned |" in report
    assert "| attack.json | psnr_gain | 5.25 |" in report and "| attack.json | psnr_gain_max | 1 |" in report
    assert "| masks.json | (not written yet) | |" in report
    assert "**Privacy gate:** FAILED: privacy gate FAILED: learned linkage_within_class 0.4 > 0.15" in report
    assert "**Outcome:** FAILED" in report and "**Stages run:** attack" in report
    assert "MLflow" not in report  # no link slot filled without a run


def test_report_links_the_mlflow_run_when_given(tmp_path: Path):
    url = "http://127.0.0.1:5000/#/experiments/1/runs/abc123"
    report = run_report(_metrics(tmp_path), executed=[], mlflow_run_url=url)
    assert f"**MLflow run:** [{url}]({url})" in report
    assert "**Stages run:** none (everything up to date)" in report
    assert "**Outcome:** completed" in report
