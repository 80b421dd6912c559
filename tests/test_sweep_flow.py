"""The sweep as a Prefect flow on a Dask LocalCluster: the CLI sweep's results, tracked in MLflow as one
parent run with a child per point."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import tiny_pipeline_params
from desensitize.config import load_params
from desensitize.orchestration.sweep import run_sweep
from desensitize.runtime.compute import SCHEDULER_ENV
from desensitize.tracking.runs import KIND_TAG

pytestmark = pytest.mark.slow
AXES = {"scopes": ["set"], "ratios": [0.5], "cells": [4], "strategies": ["saliency", "random"], "templates": ["mean"]}


def test_the_sweep_flow_on_a_dask_cluster_gives_the_cli_sweep_and_a_run_per_point(
    tmp_path: Path, prefect_harness, monkeypatch: pytest.MonkeyPatch
):
    from flows.sweep import run

    monkeypatch.delenv(SCHEDULER_ENV)
    settings = tiny_pipeline_params()
    settings["train"]["epochs"] = 1
    settings["compute"] = {"scheduler": "local", "workers": 2, "threads": 1, "retries": 2}
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(settings))
    seeds = [0]

    state = run(str(project / "params.yaml"), out="sweep", seeds=seeds, **AXES, searched=False, device="cpu")
    assert state.is_completed(), state.message
    rows = state.result()
    assert len(rows) == len(seeds) * 2

    sequential = load_params(project / "params.yaml")
    sequential = sequential.model_copy(update={"compute": sequential.compute.model_copy(update={"scheduler": "sync"})})
    run_sweep(sequential, tmp_path / "sync", seeds=seeds, **AXES, searched=False, attack=True, device="cpu")
    assert (project / "sweep" / "results.csv").read_text() == (tmp_path / "sync" / "results.csv").read_text()

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # the session's throw-away store (conftest)
    (parent,) = mlflow.search_runs(
        experiment_names=["desensitize"],
        filter_string=f"tags.`{KIND_TAG}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    assert parent.info.status == "FINISHED"
    children = mlflow.search_runs(
        experiment_names=["desensitize"],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        output_format="list",
    )
    assert sorted(run.info.run_name for run in children) == sorted(
        f"{family}-set-c4-0.5-seed-{seed}" for seed in seeds for family in ("saliency-mean", "random")
    )
    by_name = {run.info.run_name: run for run in children}
    first = by_name["random-set-c4-0.5-seed-0"]
    row = next(r for r in rows if r["family"] == "random" and r["seed"] == 0)
    assert first.data.metrics["plain"] == pytest.approx(row["plain"])
    assert first.data.params["masks.strategy"] == "random" and first.data.params["seed"] == "0"
