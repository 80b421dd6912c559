"""The operator's path end to end: a real `prefect server`, the deployment from prefect.yaml, a
triggered run executed by a process worker to Completed. Every process started is stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import copy_flow_project

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


def test_deployment_runs_on_a_process_worker_to_completed(flow_project, tmp_path: Path):
    # A project the flow has run (see conftest), so the deployed run redoes only `attack`, whose
    # params its override changes.
    project = copy_flow_project(flow_project, tmp_path / "project")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(project / "src"),
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
        out = prefect(
            "deployment", "run", "desensitization-pipeline/nightly", "--param", 'overrides={"attack.sample": 100}'
        )
        flow_run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)

        started.append(
            _start(
                [str(BIN / "prefect"), "worker", "start", "--pool", pool], tmp_path / "worker.log", cwd=project, env=env
            )
        )
        deadline = time.monotonic() + 420
        while (state := _get(f"{api}/flow_runs/{flow_run_id}")["state"])["type"] not in TERMINAL:
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            assert started[-1].poll() is None, (tmp_path / "worker.log").read_text()
            time.sleep(2)
        assert state["type"] == "COMPLETED", f"{state['message']}\n{(tmp_path / 'worker.log').read_text()[-5000:]}"

        # The run did the pipeline's work in the checkout, with the override written where DVC reads it.
        result = subprocess.run(
            [str(BIN / "prefect"), "flow-run", "inspect", flow_run_id],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "attack.sample=100" in result.stdout  # the readable flow run name
        assert yaml.safe_load((project / "params.yaml").read_text())["attack"]["sample"] == 100
        assert json.loads((project / "reports" / "attack" / "report.json").read_text())["sample"] == 100
        status = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True, text=True, timeout=120
        )
        assert json.loads(status.stdout) == {}, status.stdout + status.stderr
        deployment = _get(f"{api}/deployments/name/desensitization-pipeline/nightly")
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    finally:
        for proc in reversed(started):
            _stop(proc)
    for proc in started:
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)
