"""Several processes on one MLflow tracking store: its first use, the champion move, runs left RUNNING by
a killed process, and a store that fails. The processes are forked, so that they start together, before
this process touches the store."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
from torch import nn
from typer.testing import CliRunner

from conftest import REPO, tracked_params
from desensitize.cli import app
from desensitize.orchestration.pipeline import STAGES
from desensitize.paths import Paths
from desensitize.stats import above_chance
from desensitize.tracking import registry
from desensitize.tracking.runs import pipeline_run, stage_run
from desensitize.tracking.store import (
    OWNER_HOST_TAG,
    OWNER_PID_TAG,
    OWNER_START_TAG,
    configure,
    end_orphaned_runs,
    owner_tags,
)

FORK = multiprocessing.get_context("fork")
NAME = "masknet-shared"


def _store(tmp_path: Path, monkeypatch, name: str = "store") -> str:
    uri = f"sqlite:///{tmp_path / name / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the forked processes inherit it
    return uri


def _in_processes(target, *args_per_process: tuple, timeout: float = 300) -> list[Any]:
    """Run `target(*args, results)` in one forked process per args tuple; what each put in `results`."""
    results = FORK.Queue()
    processes = [FORK.Process(target=target, args=(*args, results)) for args in args_per_process]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=timeout) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    return outcomes


def _configure(root: Path, barrier, results) -> None:
    barrier.wait(timeout=60)
    try:
        configure(Paths(root))
        results.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported to the test, which names it
        results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_start_on_a_new_store_at_once(tmp_path, monkeypatch):
    """Each first use creates the tables and migrates them; without a lock one process died with
    `table ... already exists` or `duplicate column name`, in every round."""
    for round_ in range(3):
        _store(tmp_path, monkeypatch, f"store{round_}")
        barrier = FORK.Barrier(2)
        assert _in_processes(_configure, (tmp_path, barrier), (tmp_path, barrier)) == ["ok", "ok"], round_


def test_a_failing_tracking_store_is_one_error_line(tmp_path, monkeypatch):
    store = tmp_path / "store.db"
    store.write_text("not an SQLite database " * 10)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    for name in ("params.yaml", "requirements.lock"):  # a project that passes the params preflight
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["repro"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(
        f"error: the MLflow tracking store sqlite:///{store} failed: file is not a database"
    )
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


ABOVE_CHANCE = above_chance(90, [0, 1] * 50)


def _register(root: Path, accuracy: float, linger: float, barrier, results) -> None:
    """Register a version; between reading the champion and setting it, wait until the other process has
    read it too (or 5 s), then `linger`: the window where a read-then-set without a lock goes wrong."""
    read = registry._champion_accuracy

    def slow_read(client: mlflow.MlflowClient, name: str) -> float | None:
        current = read(client, name)
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=5)  # under the lock the other process cannot get here: it times out
        time.sleep(linger)
        return current

    registry._champion_accuracy = slow_read
    configure(Paths(root))
    with mlflow.start_run():
        result = registry.register_version(
            nn.Linear(2, 2), NAME, accuracy=accuracy, gate_passed=True, chance=ABOVE_CHANCE, tags={}
        )
    results.put((accuracy, result))


def test_two_registrations_at_once_leave_the_better_one_champion(tmp_path, monkeypatch):
    """Without the lock both read "no champion" and both set it, the worse one last (it lingers)."""
    uri = _store(tmp_path, monkeypatch)
    assert _in_processes(_configure, (tmp_path, FORK.Barrier(1))) == ["ok"]
    barrier = FORK.Barrier(2)
    outcomes = dict(_in_processes(_register, (tmp_path, 0.9, 0.0, barrier), (tmp_path, 0.7, 1.0, barrier)))

    client = mlflow.MlflowClient(uri)
    versions = {float(v.tags["accuracy"]): v for v in client.search_model_versions(f"name = '{NAME}'")}
    assert sorted(versions) == [0.7, 0.9]
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert str(champion.version) == str(versions[0.9].version) == str(outcomes[0.9]["version"])
    assert outcomes[0.9]["champion"] and champion.tags["champion_decision"].startswith("champion: accuracy 0.9000")
    worse = versions[0.7]
    assert str(outcomes[0.7]["version"]) == str(worse.version)
    # The worse one was champion only if it came first; either way its tag says what it was told.
    expected = "champion: accuracy 0.7000" if outcomes[0.7]["champion"] else "not champion: accuracy 0.7000 below"
    assert worse.tags["champion_decision"].startswith(expected)


def _open_runs_and_wait(root: Path, results) -> None:
    with pipeline_run(Paths(root)) as parent, stage_run(STAGES["ingest"], tracked_params(), Paths(root)):
        results.put((parent, mlflow.active_run().info.run_id))
        time.sleep(600)  # until killed


def test_runs_of_a_killed_process_are_set_killed_when_the_next_run_starts(tmp_path, monkeypatch):
    uri = _store(tmp_path, monkeypatch)
    results = FORK.Queue()
    process = FORK.Process(target=_open_runs_and_wait, args=(tmp_path, results))
    process.start()
    parent, stage = results.get(timeout=300)
    os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=60)
    client = mlflow.MlflowClient(uri)
    assert client.get_run(parent).info.status == client.get_run(stage).info.status == "RUNNING"
    tags = client.get_run(stage).data.tags
    assert tags[OWNER_PID_TAG] == str(process.pid) and tags[OWNER_START_TAG] != "unknown"

    experiment = client.get_run(parent).info.experiment_id
    alive = client.create_run(experiment, tags=owner_tags())  # this process: alive
    reused = client.create_run(experiment, tags={**owner_tags(), OWNER_START_TAG: "another boot/1"})  # pid reused
    elsewhere = client.create_run(experiment, tags={**tags, OWNER_HOST_TAG: "another-host"})

    with pipeline_run(Paths(tmp_path)) as run_id:  # a later run in the same store
        status = {run: client.get_run(run).info.status for run in (parent, stage, reused.info.run_id)}
        assert status == dict.fromkeys(status, "KILLED")
        assert client.get_run(run_id).info.status == client.get_run(alive.info.run_id).info.status == "RUNNING"
        assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"  # cannot tell from here: left alone
        assert end_orphaned_runs(experiment) == []
    assert client.get_run(run_id).info.status == "FINISHED"
