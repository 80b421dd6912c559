"""End to end through DVC, in a scratch copy of the project: `dvc repro` as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import copy_flow_project, make_dvc_project
from desensitize.data.splits import read_manifest

pytestmark = pytest.mark.slow


def _run(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_dvc_project(tmp_path / "project")


def _repro(project: Path) -> str:
    result = _run(project, sys.executable, "-m", "dvc", "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _ran(output: str) -> list[str]:
    stages = ("ingest", "reference", "masks", "attack", "train", "baselines", "evaluate", "register")
    return [stage for stage in stages if f"Running stage '{stage}'" in output]


def _lock_outs(lock: str) -> dict[str, str]:
    """Every stage output's hash recorded in a dvc.lock text."""
    stages = yaml.safe_load(lock)["stages"]
    return {out["path"]: out.get("md5", "") for stage in stages.values() for out in stage.get("outs", [])}


def _set(project: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def test_repro_reruns_only_what_a_params_change_reaches(flow_project, tmp_path: Path):
    """On a project the flow has built (conftest; test_flow checks that it runs every stage once, then
    none): a changed key reruns the stages that read it and those whose inputs then change, no more."""
    project = copy_flow_project(flow_project, tmp_path / "project")
    assert read_manifest(project / "data" / "raw")["source"] == "digits"
    assert _ran(_repro(project)) == []

    # masks.hidden_ratio is not used under template: search: masks reruns (its params changed) and writes
    # the same bytes, so nothing that reads the release reruns; register reads the masks params itself.
    lock = (project / "dvc.lock").read_text()
    _set(project, "masks", "hidden_ratio", 0.5)
    assert _ran(_repro(project)) == ["masks", "register"]
    assert _lock_outs(lock) == _lock_outs((project / "dvc.lock").read_text())

    _set(project, "masks", "fill", "mean")
    assert _ran(_repro(project)) == ["masks", "attack", "train", "baselines", "evaluate", "register"]
    assert json.loads((project / "reports" / "masks" / "report.json").read_text())["fill"] == "mean"
    verify = _run(project, sys.executable, "-m", "desensitize", "verify-release", "data/release")
    assert verify.returncode == 0, verify.stderr
    status = _run(project, sys.executable, "-m", "dvc", "status")
    assert "up to date" in status.stdout


def test_repro_killed_during_reference_completes_when_run_again(project: Path):
    _set(project, "reference", "epochs", 8)
    _set(project, "reference", "batch_size", 16)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    assert proc.stdout is not None
    for line in proc.stdout:
        if "reference epoch 1/" in line or time.monotonic() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (project / "models" / "reference.npz").exists()  # nothing a later stage would trust

    result = _run(project, sys.executable, "-m", "dvc", "repro", "reference")  # same params: DVC must see
    assert result.returncode == 0, result.stdout + result.stderr  # the stage as unfinished and rerun it
    assert _ran(result.stdout) == ["reference"]
    assert (project / "models" / "reference.npz").is_file()
    assert not list((project / "models").glob(".*.tmp"))


def _image(folder: Path, name: str, value: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(folder / name)


def test_a_changed_image_folder_makes_ingest_stale(project: Path, tmp_path: Path):
    """dvc.yaml watches ${data.path}: an image added to the folder (outside the project) reruns ingest."""
    images = tmp_path / "images"
    for k in range(10):
        _image(images / ("a", "b")[k % 2], f"{k}.png", 10 * k)
    _set(project, "data", "source", "imagefolder")
    _set(project, "data", "path", str(images))
    _set(project, "data", "image_size", 8)
    assert _ran(_run(project, sys.executable, "-m", "dvc", "repro", "ingest").stdout) == ["ingest"]
    assert json.loads(_run(project, sys.executable, "-m", "dvc", "status", "--json", "ingest").stdout) == {}

    _image(images / "a", "new.png", 255)
    status = json.loads(_run(project, sys.executable, "-m", "dvc", "status", "--json", "ingest").stdout)
    assert status == {"ingest": [{"changed deps": {str(images): "modified"}}]}


HOLD_LOCK = """
import sys, time
import zc.lockfile
lock = zc.lockfile.LockFile(sys.argv[1])  # DVC's repo lock, as a running `dvc repro` holds it
print("held", flush=True)
time.sleep(300)
"""


def test_repro_refused_because_another_run_holds_the_lock_says_so(project: Path):
    """Another process holds DVC's lock: first the repo lock (held while DVC collects the stages), then a
    stage's output in .dvc/tmp/rwlock (held while a stage runs). Either way DVC refuses, and `desensitize
    repro` ends saying that another run holds the lock, naming it, without the `dvc checkout` hint."""
    (project / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(project / ".dvc" / "tmp" / "lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        refused = _run(project, sys.executable, "-m", "desensitize", "repro")
        rwlock = {"read": {}, "write": {str(project / "data" / "raw"): {"pid": holder.pid, "cmd": "dvc repro"}}}
        holder.kill()
        holder.wait()
        blocker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        rwlock["write"][str(project / "data" / "raw")]["pid"] = blocker.pid
        (project / ".dvc" / "tmp" / "rwlock").write_text(json.dumps(rwlock))
        busy = _run(project, sys.executable, "-m", "desensitize", "repro")
        blocker.kill()
        blocker.wait()
    finally:
        holder.kill()
    for result, pid in ((refused, holder.pid), (busy, blocker.pid)):
        assert result.returncode == 2, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: dvc repro exited with status"), last
        assert "another run holds this project's DVC lock" in last and f"PID {pid}" in last, last
        assert "dvc checkout" not in last
    assert not (project / "data" / "raw").exists()
