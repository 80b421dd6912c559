"""The Prefect flow on a tiny DVC project: it runs the same stages as `dvc repro`, skips what is up
to date, versions the outputs with DVC, retries transient I/O failures and stops at a failed gate."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import copy_flow_project, run_flow

pytestmark = pytest.mark.slow


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True, timeout=300
    )


def _files(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _report(state) -> str:
    """The Markdown artifact the flow run published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    (artifact,) = [a for a in artifacts if a.key == "desensitization-report"]
    return artifact.data


def test_flow_runs_every_stage_once_then_nothing(flow_project):
    from desensitize.orchestration.pipeline import STAGES

    project, remote, first, second, stamps = flow_project
    assert first.is_completed(), first.message
    assert first.result()["executed"] == list(STAGES)
    assert first.result()["pushed"] > 0
    assert json.loads((project / "metrics" / "attack.json").read_text())["gate_passed"]

    # Same params again: DVC finds every stage up to date, so no stage runs and no output is rewritten.
    assert second.is_completed(), second.message
    assert second.result()["executed"] == []
    assert second.result()["skipped"] == list(STAGES)
    assert {p: (project / p).stat().st_mtime_ns for p in stamps} == stamps

    # The DVC records are what `dvc repro` would have left.
    status = _dvc(project, "status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout + status.stderr
    repro = _dvc(project, "repro")
    assert repro.returncode == 0, repro.stderr
    assert "Running stage" not in repro.stdout and "up to date" in repro.stdout
    cloud = _dvc(project, "status", "--cloud", "--json")
    assert json.loads(cloud.stdout) == {}, cloud.stdout  # everything in the cache is on the remote


def test_flow_run_is_named_and_reports_metrics_and_verdict(flow_project):
    from prefect.client.orchestration import get_client

    first = flow_project[2]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(first.state_details.flow_run_id)
    assert run.name.startswith("project 20")  # the project directory and the start time
    report = _report(first)
    assert "privacy gate passed" in report
    assert "| reference.json | reference |" in report and "| attack.json | gate_passed | True |" in report
    assert "**Stages run:** ingest, reference, masks, attack, train, baselines, evaluate" in report


def _mlflow_runs(filter_string: str) -> list:
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # the session's throw-away store (conftest)
    return mlflow.search_runs(experiment_names=["desensitize"], filter_string=filter_string, output_format="list")


def test_flow_run_is_one_mlflow_parent_run_with_a_child_per_stage_run(flow_project):
    from desensitize.orchestration.pipeline import STAGES
    from desensitize.tracking.runs import STAGE_TAG

    first, second = flow_project[2], flow_project[3]
    for state, expected in ((first, set(STAGES)), (second, set())):
        flow_run_id = str(state.state_details.flow_run_id)
        (parent,) = _mlflow_runs(f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        assert parent.info.status == "FINISHED"
        children = _mlflow_runs(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert {run.data.tags[STAGE_TAG] for run in children} == expected
        assert parent.info.run_id in _report(state)


def test_transient_ingest_failure_is_retried(flow_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import desensitize.stages.ingest

    project = copy_flow_project(flow_project, tmp_path / "project")
    shutil.rmtree(project / "data" / "raw")  # ingest is stale; it rewrites the same bytes
    real, calls = desensitize.stages.ingest.ingest, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("source share unavailable")
        return real(*args, **kwargs)

    monkeypatch.setattr(desensitize.stages.ingest, "ingest", flaky)
    state = run_flow(project)
    assert state.is_completed(), state.message
    assert len(calls) == 2
    assert state.result()["executed"] == ["ingest"]  # same data/raw hash: nothing downstream is stale
    assert json.loads(_dvc(project, "status", "--json").stdout) == {}


def test_bad_input_in_ingest_is_not_retried(flow_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import desensitize.stages.ingest
    from desensitize.errors import DesensitizeError

    project = copy_flow_project(flow_project, tmp_path / "project")
    shutil.rmtree(project / "data" / "raw")
    calls = []

    def bad(*args, **kwargs):
        calls.append(1)
        raise DesensitizeError("/data/images/cat: a folder with a single class")

    monkeypatch.setattr(desensitize.stages.ingest, "ingest", bad)
    state = run_flow(project)
    assert state.is_failed() and "a folder with a single class" in state.message
    assert len(calls) == 1  # bad input never succeeds on retry


def test_failed_gate_fails_the_run_and_pushes_nothing(flow_project, tmp_path: Path):
    project = copy_flow_project(flow_project, tmp_path / "project")
    remote = flow_project[1]
    before = _files(remote)
    registered = _mlflow_runs("tags.`desensitize.stage` = 'register'")
    state = run_flow(project, overrides={"attack.thresholds.max_linkage_x_chance": 1})

    assert state.is_failed()
    # The mask search finds no candidate that passes: it names the closest and what it missed.
    assert "no mask candidate passes the privacy gate" in state.message and "linkage_within_class" in state.message
    assert _files(remote) == before
    assert yaml.safe_load((project / "params.yaml").read_text())["attack"]["thresholds"]["max_linkage_x_chance"] == 1
    # Not recorded as done: masks (the search is held to the gate) and the stages listing attack.* too.
    assert set(json.loads(_dvc(project, "status", "--json").stdout)) == {"masks", "attack", "register"}
    assert "FAILED" in _report(state)
    assert len(_mlflow_runs("tags.`desensitize.stage` = 'register'")) == len(registered)  # nothing registered


@pytest.mark.parametrize(
    ("change", "overrides", "expected"),
    [
        (None, {"masks.hiden_ratio": 0.5}, "masks.hiden_ratio: unknown key"),
        (None, {"masks.hidden_ratio": 1.5}, "masks.hidden_ratio = 1.5"),
        (("remote", "default", "--unset"), {}, "no default DVC remote"),
    ],
)
def test_bad_input_fails_before_any_work(flow_project, tmp_path: Path, change, overrides, expected):
    project = copy_flow_project(flow_project, tmp_path / "project")
    if change:
        assert _dvc(project, *change).returncode == 0
    before = _files(project)
    state = run_flow(project, overrides=overrides)
    assert state.is_failed()
    assert expected in state.message
    assert _files(project) == before  # params.yaml, dvc.lock and every output untouched


def test_fresh_clone_and_dvc_pull_restore_the_release(flow_project, tmp_path: Path):
    project = copy_flow_project(flow_project, tmp_path / "project")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (
        ["git", "add", "-A"],
        [*git, "commit", "-qm", "run"],
        ["git", "clone", "-q", str(project), str(tmp_path / "clone")],
    ):
        subprocess.run(command, cwd=project, check=True, capture_output=True, timeout=60)
    clone = tmp_path / "clone"
    assert not (clone / "data").exists()
    pull = _dvc(clone, "pull")
    assert pull.returncode == 0, pull.stderr
    release = _files(project / "data" / "release")
    assert "release.json" in release and len(release) > 2
    assert _files(clone / "data" / "release") == release
    assert _files(clone / "models") == _files(project / "models")
    assert json.loads(_dvc(clone, "status", "--json").stdout) == {}
