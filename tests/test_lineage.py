"""The auditor's view, end to end: `desensitize repro` (what `make run` runs) on a tiny DVC project
with the default MLflow store, then `desensitize lineage` and an `mlflow server` over that store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from conftest import copy_flow_project
from desensitize.cli import app
from desensitize.orchestration.pipeline import STAGES

pytestmark = pytest.mark.slow
MODEL = "masknet-digits"


@pytest.fixture(scope="module")
def project(flow_project, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A copy of the project the flow built (conftest), with its own MLflow store (mlruns/mlflow.db, the
    default, as `make run` uses it); `env`: this process's environment without MLFLOW_TRACKING_URI."""
    project = copy_flow_project(flow_project, tmp_path_factory.mktemp("lineage") / "project")
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return project, env


def _lock_md5(project: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return next(out["md5"] for out in lock[stage]["outs"] if out["path"] == path)


def _lineage(project: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    return CliRunner().invoke(app, ["lineage", *args])


def test_lineage_of_the_champion_matches_dvc_lock(project, monkeypatch):
    root, _ = project
    result = _lineage(root, monkeypatch, f"{MODEL}@champion", "--json")
    assert result.exit_code == 0, result.output
    chain = json.loads(result.output)
    assert chain["complete"], chain["problems"]
    assert chain["model"]["version"] == 1 and chain["model"]["aliases"] == ["challenger", "champion"]
    assert chain["model"]["digest"] == _lock_md5(root, "train", "models/masknet.npz")
    release = _lock_md5(root, "masks", "data/release")
    assert chain["release"]["digest"] == chain["training_run"]["release_digest"] == release
    assert chain["model"]["tags"]["release_digest"] == release
    assert chain["mask_run"]["reference_model_digest"] == _lock_md5(root, "reference", "models/reference.npz")
    released_with = json.loads((root / "data" / "release" / "release.json").read_text())
    # What was released, as the search chose it (not the params' masks.hidden_ratio / masks.cell).
    assert (chain["mask_run"]["strategy"], chain["mask_run"]["method"]) == ("saliency", "saliency")
    released_grid = (released_with["hidden_ratio"], released_with["cell"])
    assert (chain["mask_run"]["hidden_ratio"], chain["mask_run"]["cell"]) == released_grid == (0.5, 2)
    assert chain["mask_run"]["template"] == chain["model"]["tags"]["mask_template"] == released_with["template"]
    assert chain["mask_run"]["candidate"] == chain["model"]["tags"]["mask_candidate"] == released_with["candidate"]
    assert chain["raw"]["digest"] == _lock_md5(root, "ingest", "data/raw")
    # Each split its own digest; every tag the chain read matched what its run logged beside it.
    assert (
        sorted(chain["raw"]["splits"]) == ["public", "test", "train"] and len(set(chain["raw"]["splits"].values())) == 3
    )
    assert chain["unverified"] == []
    assert chain["attack_run"]["gate"]["passed"] is True
    # One pipeline run (the flow's first): every stage run is a child of it.
    parents = {chain[key]["parent_run_id"] for key in ("training_run", "mask_run", "attack_run")}
    assert len(parents) == 1 and None not in parents

    text = _lineage(root, monkeypatch, f"{MODEL}/1")
    assert text.exit_code == 0 and f"release       data/release md5 {release}" in text.output
    assert text.output.rstrip().endswith("chain complete")
    # The cards are in git-tracked reports/cards/, generated from this release.
    assert release in (root / "reports" / "cards" / "data_card.md").read_text()


def test_lineage_says_when_a_tag_no_longer_matches_what_it_describes(project, monkeypatch, tmp_path):
    """Tags are editable in the MLflow UI; the runs' dataset inputs, artifacts and metrics are not."""
    root = tmp_path / "project"
    shutil.copytree(project[0], root, symlinks=True)  # the copy's store is edited, not the module's
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    version = client.get_model_version(MODEL, "1")
    runs = client.search_runs([client.get_run(version.run_id).info.experiment_id])
    stage = {run.data.tags.get("desensitize.stage"): run for run in runs}
    edits = [
        ("version", "release_digest", "version tag release_digest is {new} but registration run"),
        ("version", "hidden_ratio", "version tag hidden_ratio is {new} but masks run"),
        ("masks", "desensitize.input.raw.train", "masks run {run} tag desensitize.input.raw.train is {new} but"),
        ("attack", "desensitize.input.release", "attack run {run} tag desensitize.input.release is {new} but"),
        ("register", "desensitize.input.model.masknet", "register run {run} tag desensitize.input.model.masknet is"),
    ]
    for where, key, message in edits:
        new = "0.123" if key == "hidden_ratio" else "0" * 32 + ".dir"
        run = None if where == "version" else stage[where].info.run_id
        old = version.tags[key] if run is None else stage[where].data.tags[key]
        if run is None:
            client.set_model_version_tag(MODEL, "1", key, new)
        else:
            client.set_tag(run, key, new)
        try:
            result = _lineage(root, monkeypatch, f"{MODEL}/1", "--json")
            assert result.exit_code == 1, (key, result.output)
            chain = json.loads(result.output)
            assert not chain["complete"]
            expected = message.format(new=new, run=run)
            assert any(p.startswith(expected) and "no longer matches" in p for p in chain["problems"]), (
                key,
                chain["problems"],
            )
            text = _lineage(root, monkeypatch, f"{MODEL}/1").output
            assert "chain INCOMPLETE: " in text and expected in text
        finally:
            if run is None:
                client.set_model_version_tag(MODEL, "1", key, old)
            else:
                client.set_tag(run, key, old)
    assert _lineage(root, monkeypatch, f"{MODEL}/1").output.rstrip().endswith("chain complete")


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nosuch@champion", "no registered model 'nosuch'"),
        (f"{MODEL}@nosuch", "has no alias 'nosuch'"),
        (f"{MODEL}/9", "has no version 9"),
        ("bad name!", "expected NAME, NAME@ALIAS or NAME/VERSION"),
    ],
)
def test_lineage_of_an_unknown_model_is_one_error_line(project, monkeypatch, ref, message):
    result = _lineage(project[0], monkeypatch, ref)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output and result.output.count("\n") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(query)}" if query else url, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def test_mlflow_server_serves_the_runs_and_the_registered_model(project, tmp_path):
    root, env = project
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")  # closed in finally
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # setsid: the server and its workers form one process group
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)

        experiment = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name", experiment_name="desensitize")["experiment"]
        runs = _post(
            f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100}
        )["runs"]

        def tags(run: dict) -> dict:
            return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}

        pipeline = {run["info"]["run_id"]: run for run in runs if tags(run).get("desensitize.kind") == "pipeline"}
        stages = {tags(run)["desensitize.stage"]: run for run in runs if tags(run).get("desensitize.kind") == "stage"}
        assert sorted(stages) == sorted(STAGES)  # the flow's first run; its second ran no stage
        (parent,) = {tags(run)["mlflow.parentRunId"] for run in stages.values()}
        assert pipeline[parent]["info"]["status"] == "FINISHED"
        masks_inputs = stages["masks"]["inputs"]["dataset_inputs"]
        release = _lock_md5(root, "masks", "data/release")
        assert {(d["dataset"]["name"], d["dataset"]["digest"]) for d in masks_inputs} >= {("release", release)}

        model = _get(f"{base}/api/2.0/mlflow/registered-models/get", name=MODEL)["registered_model"]
        assert {alias["alias"] for alias in model["aliases"]} == {"champion", "challenger"}
        champion = _get(f"{base}/api/2.0/mlflow/registered-models/alias", name=MODEL, alias="champion")["model_version"]
        version_tags = {tag["key"]: tag["value"] for tag in champion["tags"]}
        assert version_tags["release_digest"] == release and version_tags["gate"] == "passed"
        assert champion["run_id"] == stages["register"]["info"]["run_id"]
    finally:
        pgid = server.pid
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while _group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _group_members(pgid):
                break
        server.wait(timeout=10)
        log.close()
    assert _group_members(pgid) == []
