"""The operator's path end to end: a real `prefect server`, the deployment from prefect.yaml, flow runs
executed by a process worker: override runs as DVC experiments side by side, then a run without
overrides on the committed params. Every process started is stopped."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import copy_flow_project, project_store

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """In its own session (setsid), so the whole process group can be stopped."""
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            os.killpg(proc.pid, 0)  # children of the group may outlive the leader
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
        time.sleep(1)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _git(project: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _dvc(project: Path, *args: str, env: dict | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _experiments(project: Path) -> dict[str, dict]:
    """`dvc exp show --json` of the checkout, by experiment name: each one's params and metrics."""
    return {
        revision["name"]: revision["data"]
        for baseline in json.loads(_dvc(project, "exp", "show", "--json"))
        for experiment in baseline.get("experiments") or []
        for revision in experiment["revs"]
    }


def _champion(client) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias("masknet-digits", "champion").version
    except MlflowException:
        return None


def test_override_runs_are_experiments_and_the_schedule_runs_the_committed_params(
    flow_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The operator's path end to end: a real `prefect server`, the deployment from prefect.yaml, flow runs
    executed by a process worker. Two override runs started together each become a DVC experiment in a
    workspace of their own, the checkout untouched; a run without overrides then does exactly what a
    plain `dvc repro` of the committed params does."""
    import mlflow

    from desensitize.paths import Paths
    from desensitize.tracking.lineage import lineage

    # A project the flow has run (see conftest), committed as an operator keeps the deployment's
    # checkout; its twin is where a plain `dvc repro` shows what the committed params give.
    project = copy_flow_project(flow_project, tmp_path / "project")
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "the nightly run's records")
    twin = shutil.copytree(project, tmp_path / "twin", symlinks=True)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project / "src"),
        "MLFLOW_TRACKING_URI": project_store(project),  # the copy's own store: the flow's runs and model are in it
        "PWD": str(project),  # prefect.yaml's pull step: runs happen in the checkout deployed from
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # the worker polls for scheduled runs every 2 s, not 10
    }

    def prefect(*args: str) -> str:
        result = subprocess.run(
            [str(BIN / "prefect"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=180
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def trigger(*args: str) -> str:
        out = prefect("deployment", "run", "desensitization-pipeline/nightly", *args)
        return re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)

    def finish(*flow_run_ids: str) -> None:
        deadline = time.monotonic() + 420
        for flow_run_id in flow_run_ids:
            while (state := _get(f"{api}/flow_runs/{flow_run_id}")["state"])["type"] not in TERMINAL:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-5000:]
                assert started[-1].poll() is None, (tmp_path / "worker.log").read_text()[-5000:]
                time.sleep(2)
            assert state["type"] == "COMPLETED", f"{state['message']}\n{(tmp_path / 'worker.log').read_text()[-5000:]}"

    def parent(flow_run_id: str):
        (run,) = mlflow.search_runs(
            experiment_names=["desensitize"],
            filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
            output_format="list",
        )
        return run

    def children(run) -> dict:
        found = mlflow.search_runs(
            experiment_names=["desensitize"],
            filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
            output_format="list",
        )
        return {child.data.tags["desensitize.stage"]: child for child in found}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # for lineage, in this process
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    versions_before = {v.version for v in client.search_model_versions("name = 'masknet-digits'")}
    champion = _champion(client)
    started: list[subprocess.Popen] = []
    try:
        server = _start(
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--analytics-off",
                "--no-ui",
            ],
            tmp_path / "server.log",
            env=env,
        )
        started.append(server)
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                _get(f"{api}/health")
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(1)

        pool = yaml.safe_load((project / "prefect.yaml").read_text())["deployments"][0]["work_pool"]["name"]
        prefect("work-pool", "create", pool, "--type", "process")
        prefect("deploy", "--all", "--no-prompt")
        # Two override runs, started together. A retrains (train, baselines, evaluate and register run in
        # its experiment); B changes a key only ingest and register read (digits ignores data.image_size,
        # so ingest writes the same bytes and nothing between them reruns).
        retrain = trigger("--param", 'overrides={"train.epochs": 1}')
        reingest = trigger("--param", 'overrides={"data.image_size": 16}')
        started.append(
            _start(
                [str(BIN / "prefect"), "worker", "start", "--pool", pool], tmp_path / "worker.log", cwd=project, env=env
            )
        )
        finish(retrain, reingest)

        # The checkout is as it was: no change for git, no workspace left behind.
        assert _git(project, "status", "--porcelain") == ""
        assert not any((project / ".dvc" / "tmp" / "overrides").iterdir())
        # Each is its own DVC experiment, named after its flow run, with its own params and metrics.
        runs = {flow_run_id: parent(flow_run_id) for flow_run_id in (retrain, reingest)}
        names = {flow_run_id: run.data.tags["desensitize.dvc_experiment"] for flow_run_id, run in runs.items()}
        experiments = _experiments(project)
        assert set(experiments) == set(names.values()) and len(experiments) == 2
        # The readable flow run name, which the experiment's carries, with the flow run's id.
        assert _get(f"{api}/flow_runs/{retrain}")["name"].endswith("Z train.epochs=1")
        assert "train.epochs-1" in names[retrain] and names[retrain].endswith(retrain[:8])
        committed = yaml.safe_load((project / "params.yaml").read_text())
        retrained, reingested = experiments[names[retrain]], experiments[names[reingest]]
        assert retrained["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
        assert retrained["params"]["params.yaml"]["data"]["data"]["image_size"] == committed["data"]["image_size"]
        assert reingested["params"]["params.yaml"]["data"]["data"]["image_size"] == 16
        assert reingested["params"]["params.yaml"]["data"]["train"] == committed["train"]

        # In MLflow: each parent run carries its experiment, and so does every stage run under it.
        stages = {flow_run_id: children(run) for flow_run_id, run in runs.items()}
        assert set(stages[retrain]) == {"train", "baselines", "evaluate", "register"}
        assert set(stages[reingest]) == {"ingest", "register"}
        for flow_run_id, runs_of_stages in stages.items():
            assert all(
                run.data.tags["desensitize.dvc_experiment"] == names[flow_run_id] for run in runs_of_stages.values()
            )
        # The experiment's metrics are what its evaluate run measured; B's are the baseline's.
        evaluated = stages[retrain]["evaluate"].data.metrics
        shown = retrained["metrics"]["metrics/evaluate.json"]["data"]
        assert shown == {model: evaluated[f"accuracy.{model}"] for model in shown}
        baseline = json.loads((project / "metrics" / "evaluate.json").read_text())
        assert reingested["metrics"]["metrics/evaluate.json"]["data"] == baseline
        # The two ran at the same time.
        spans = [(run.info.start_time, run.info.end_time) for run in runs.values()]
        assert max(start for start, _ in spans) < min(end for _, end in spans)

        # Each registered a version tagged with its experiment; neither is champion.
        new = [v for v in client.search_model_versions("name = 'masknet-digits'") if v.version not in versions_before]
        assert sorted(v.tags["dvc_experiment"] for v in new) == sorted(names.values())
        assert all(v.tags["champion_decision"].startswith("not champion: trained in DVC experiment") for v in new)
        assert _champion(client) == champion
        # Lineage resolves the retrained model: its training run, release, mask run, data and gate.
        (version,) = [v for v in new if v.tags["dvc_experiment"] == names[retrain]]
        chain = lineage(f"masknet-digits/{version.version}", Paths(project))
        assert chain["complete"], chain["problems"]
        assert chain["model"]["dvc_experiment"] == names[retrain]
        assert chain["training_run"]["run_id"] == stages[retrain]["train"].info.run_id

        # A run without overrides reads the committed params: it writes the dvc.lock a plain `dvc repro`
        # of the same checkout writes. (evaluate's metrics removed in both, so both have a stage to run.)
        for checkout in (project, twin):
            (checkout / "metrics" / "evaluate.json").unlink()
        nightly = trigger()
        finish(nightly)
        _dvc(twin, "repro", env={**env, "PYTHONPATH": str(twin / "src"), "PWD": str(twin)})
        assert (project / "dvc.lock").read_bytes() == (twin / "dvc.lock").read_bytes()
        assert (project / "metrics" / "evaluate.json").read_bytes() == (twin / "metrics" / "evaluate.json").read_bytes()
        assert set(children(parent(nightly))) == {"evaluate"}
        assert json.loads(_dvc(project, "status", "--json")) == {}
        deployment = _get(f"{api}/deployments/name/desensitization-pipeline/nightly")
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    finally:
        for proc in reversed(started):
            _stop(proc)
    for proc in started:
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)
