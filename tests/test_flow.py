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

from conftest import copy_flow_project, project_store, run_flow
from desensitize.errors import DesensitizeError
from desensitize.orchestration.experiment import run_experiment
from desensitize.orchestration.pipeline import STAGES

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


def _mlflow_runs(filter_string: str, uri: str | None = None) -> list:
    """Runs of the session's throw-away store (conftest), where these tests' own flow runs track, or of `uri`."""
    import mlflow

    mlflow.set_tracking_uri(uri or os.environ["MLFLOW_TRACKING_URI"])
    return mlflow.search_runs(experiment_names=["desensitize"], filter_string=filter_string, output_format="list")


def test_flow_run_is_one_mlflow_parent_run_with_a_child_per_stage_run(flow_project):
    from desensitize.orchestration.pipeline import STAGES
    from desensitize.tracking.runs import STAGE_TAG

    first, second = flow_project[2], flow_project[3]
    store = project_store(flow_project[0])
    for state, expected in ((first, set(STAGES)), (second, set())):
        flow_run_id = str(state.state_details.flow_run_id)
        (parent,) = _mlflow_runs(f"tags.`prefect.flow_run_id` = '{flow_run_id}'", store)
        assert parent.info.status == "FINISHED"
        children = _mlflow_runs(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", store)
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


def _workspace_files(project: Path) -> dict[str, str]:
    """Every file of the checkout outside git's and DVC's own directories: params, dvc.lock, metrics,
    reports, data, models."""
    return {path: digest for path, digest in _files(project).items() if not path.startswith((".git/", ".dvc/"))}


def _experiments(project: Path) -> dict[str, dict]:
    """`dvc exp show --json` of the checkout, by experiment name: each one's params and metrics."""
    result = _dvc(project, "exp", "show", "--json")
    assert result.returncode == 0, result.stderr
    found = {}
    for baseline in json.loads(result.stdout):
        for experiment in baseline.get("experiments") or []:
            for revision in experiment["revs"]:
                found[revision["name"]] = revision["data"]
    return found


def test_an_override_run_that_fails_the_gate_changes_nothing_and_records_no_experiment(flow_project, tmp_path: Path):
    # A checkout as the flow left it: dvc.lock, metrics/ and the cards never committed. The experiment
    # starts from them, so only masks (and what follows) reruns, in its own workspace.
    project = copy_flow_project(flow_project, tmp_path / "project")
    remote = flow_project[1]
    before, remote_before = _workspace_files(project), _files(remote)
    registered = _mlflow_runs("tags.`desensitize.stage` = 'register'")
    state = run_flow(project, overrides={"attack.thresholds.max_linkage_x_chance": 1})

    assert state.is_failed()
    # The mask search finds no candidate that passes: it names the closest and what it missed.
    assert "no mask candidate passes the privacy gate" in state.message and "linkage_within_class" in state.message
    assert "stage masks failed" in state.message
    # The checkout is as it was: params.yaml, dvc.lock, metrics, reports, data; no experiment, no workspace.
    assert _workspace_files(project) == before
    assert _experiments(project) == {}
    assert not any((project / ".dvc" / "tmp" / "overrides").iterdir())
    assert _files(remote) == remote_before  # nothing pushed
    assert "FAILED" in _report(state) and "not recorded" in _report(state)
    assert len(_mlflow_runs("tags.`desensitize.stage` = 'register'")) == len(registered)  # nothing registered
    (parent,) = _mlflow_runs(f"tags.`prefect.flow_run_id` = '{state.state_details.flow_run_id}'")
    experiment = parent.data.tags["desensitize.dvc_experiment"]
    assert parent.info.status == "FAILED" and experiment.endswith(str(state.state_details.flow_run_id)[:8])
    (masks,) = _mlflow_runs(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert masks.data.tags["desensitize.stage"] == "masks" and masks.info.status == "FAILED"
    assert masks.data.tags["desensitize.dvc_experiment"] == experiment


def test_repro_with_set_and_the_flow_with_overrides_run_the_same_experiment(flow_project, tmp_path: Path):
    """`desensitize repro --set` and the flow's overrides are one implementation: each run is a DVC
    experiment whose one change is the override, the checkout untouched. (compute.workers: a key no
    stage lists, so DVC reruns nothing and the experiments cost seconds.)"""
    project = copy_flow_project(flow_project, tmp_path / "project")
    before = _workspace_files(project)
    status_before = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "desensitize"), "repro", "--set", "compute.workers=3", "--name", "from-cli"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "DVC experiment from-cli" in cli.stdout and "privacy gate passed" in cli.stdout  # and its summary
    state = run_flow(project, overrides={"compute.workers": 3})
    assert state.is_completed(), state.message
    flow_name = state.result()["experiment"]
    assert state.result()["executed"] == [] and state.result()["skipped"] == list(STAGES)

    experiments = _experiments(project)
    assert set(experiments) == {"from-cli", flow_name}
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    for name in ("from-cli", flow_name):
        data = experiments[name]
        assert data["params"]["params.yaml"]["data"]["compute"]["workers"] == 3
        assert data["metrics"]["metrics/evaluate.json"]["data"] == metrics  # nothing reran: the baseline's
        (parent,) = _mlflow_runs(f"tags.`desensitize.dvc_experiment` = '{name}'")
        assert parent.info.status == "FINISHED"
    assert _workspace_files(project) == before
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True)
    assert status.stdout == status_before.stdout
    with pytest.raises(DesensitizeError, match="an experiment named 'from-cli' exists"):  # before any work
        run_experiment(project, {"compute.workers": 4}, "from-cli")


def _edit_params(project: Path) -> None:
    (project / "params.yaml").write_text((project / "params.yaml").read_text().replace("seed: 0", "seed: 1"))


@pytest.mark.parametrize(
    ("change", "overrides", "expected"),
    [
        (None, {"masks.hiden_ratio": 0.5}, "masks.hiden_ratio: unknown key"),
        (None, {"masks.hidden_ratio": 1.5}, "masks.hidden_ratio = 1.5"),
        (("remote", "default", "--unset"), {}, "no default DVC remote"),
        # A scheduled run reads the committed params.yaml, and an override run starts from it.
        (_edit_params, {}, "uncommitted changes to M params.yaml"),
        (_edit_params, {"train.epochs": 1}, "uncommitted changes to M params.yaml"),
    ],
)
def test_bad_input_fails_before_any_work(flow_project, tmp_path: Path, change, overrides, expected):
    project = copy_flow_project(flow_project, tmp_path / "project")
    if callable(change):
        change(project)
    elif change:
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
