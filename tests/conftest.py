"""Shared fixtures: tiny synthetic image sets written in the formats the sources read."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from desensitize.config import parse_params

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def sequential_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """Units run in the test's process (compute.scheduler: sync) unless a test asks for a cluster: a Dask
    LocalCluster per stage would add seconds to every test; tests/test_compute.py checks that a cluster
    gives the same results."""
    from desensitize.runtime.compute import SCHEDULER_ENV

    monkeypatch.setenv(SCHEDULER_ENV, "sync")


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in IDX format (gzip when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """A miniature Fashion-MNIST directory: 60 + 20 distinct random 28x28 images, 10 classes."""
    rng = np.random.default_rng(1)
    directory = tmp_path / "fashion"
    directory.mkdir()
    for prefix, n in (("train", 60), ("t10k", 20)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8) % 10)
    return directory


def make_params(**data: object):
    """Params with the given `data` section fields (and fast reference training)."""
    return parse_params({"data": data, "reference": {"epochs": 1, "batch_size": 32}})


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory):
    """digits ingested and a reference model trained for 2 epochs: (params, paths), read-only for tests."""
    from desensitize.paths import Paths
    from desensitize.stages.ingest import ingest
    from desensitize.stages.reference import train_reference

    params = tiny_params()
    paths = Paths(tmp_path_factory.mktemp("tiny"))
    ingest(params, paths)
    train_reference(params, paths, device="cpu")
    return params, paths


TINY_SEARCH = {
    "epochs": 2,
    "cells": [2],
    "hidden_ratios": [0.5],
    "screen": {"width": 8, "epochs": 1},
    "amortized": {"epochs": 12, "attacker_epochs": 2, "sample": 100},  # fewer: its utility is at chance
    "cellsets": {"budget": 40, "beam": 2},
}
TINY_ATTACK = {
    "sample": 200,
    "attackers": ["telea", "learned"],
    "learned": {"widths": [8], "max_epochs": 2, "patience": 1, "data_shares": [0.5]},
}


def tiny_params(attack: dict | None = None, **masks: object):
    """digits (8x8) with a 2-pixel cell grid (16 cells), a short template search over the templates at
    that cell and ratio, no privacy constraint unless `masks` asks for it (then a brief attack suite,
    updated with `attack`), and the given `masks` settings."""
    return parse_params(
        {
            "data": {"source": "digits"},
            "reference": {"epochs": 2, "batch_size": 64},
            "masks": {"cell": 2, "hidden_ratio": 0.5, "privacy": "none", "search": TINY_SEARCH, **masks},
            "attack": {**TINY_ATTACK, **(attack or {})},
        }
    )


def copy_project(tiny_project, root: Path):
    """A writable copy of the tiny project's raw data and reference model under `root`."""
    import shutil

    from desensitize.paths import Paths

    _, source = tiny_project
    paths = Paths(root)
    shutil.copytree(source.raw, paths.raw)
    shutil.copytree(source.reference_model.parent, paths.reference_model.parent)
    return paths


def tiny_pipeline_params() -> dict:
    """The repository's params.yaml (DVC needs every key a stage lists) on digits, trained briefly,
    with a gate that passes."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = "digits"
    params["reference"].update(epochs=2, batch_size=64)
    params["train"].update(epochs=2, batch_size=64)  # one epoch leaves every model at chance: never champion
    params["masks"]["cell"] = 2
    params["masks"]["search"].update(TINY_SEARCH, templates=["mean", "class_contrast"])
    params["attack"].update(TINY_ATTACK)
    params["attack"]["thresholds"].update(max_psnr_gain=100, max_linkage_x_chance=10_000, max_recognition_recovery=1)
    return params


def make_dvc_project(root: Path, remote: Path | None = None) -> Path:
    """A scratch git + DVC project at `root` (sources, dvc.yaml, flows/, prefect.yaml, requirements.lock, tiny params),
    committed to git; with `remote`, that directory is its default DVC remote."""
    import shutil
    import subprocess
    import sys

    import yaml

    root.mkdir(parents=True)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(REPO / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "prefect.yaml", ".gitignore", "requirements.lock"):  # the lock: digits' data.path
        shutil.copy(REPO / name, root)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_pipeline_params()))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (
        ["git", "init", "-q"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        *([[sys.executable, "-m", "dvc", "remote", "add", "-d", "-q", "store", str(remote)]] if remote else []),
        ["git", "add", "-A"],
        [*git, "commit", "-qm", "tiny project"],
    ):
        subprocess.run(command, cwd=root, check=True, capture_output=True, timeout=120)
    return root


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory: pytest.TempPathFactory):
    """Prefect settings for tests (a private PREFECT_HOME, no analytics, no heartbeats, a patient
    server start-up) applied to this process and inherited by subprocesses; restored afterwards."""
    import os

    env = {
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-home")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    from prefect.settings import (
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_HOME,
        PREFECT_LOGGING_LEVEL,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    updates = {
        PREFECT_HOME: env["PREFECT_HOME"],
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120,
        PREFECT_LOGGING_LEVEL: "WARNING",
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
    }
    try:
        with temporary_settings(updates=updates):
            yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def prefect_harness(prefect_env):
    """One ephemeral Prefect API for the session's flow tests (starting one costs 10-20 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def run_flow(project: Path, **parameters):
    """Run the Prefect flow on `project` (CPU); returns its final state."""
    from flows.pipeline import desensitization_pipeline

    return desensitization_pipeline(
        params_file=str(project / "params.yaml"), device="cpu", return_state=True, **parameters
    )


@pytest.fixture(scope="session")
def flow_project(tmp_path_factory: pytest.TempPathFactory, prefect_harness):
    """A tiny project run twice by the flow with the same params: (project, remote, first state,
    second state, output mtimes after the first run). Its runs and registered model are in the project's
    own MLflow store (mlruns/, as `make run` keeps it; see project_store), which copies carry. The suite's
    one full pipeline build through DVC: tests copy it; they do not change it."""
    base = tmp_path_factory.mktemp("flow")
    project = make_dvc_project(base / "project", base / "remote")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI")
        first = run_flow(project)
        outputs = ("models/reference.npz", "data/release/release.json", "metrics/evaluate.json")
        stamps = {path: (project / path).stat().st_mtime_ns for path in outputs}
        second = run_flow(project)
    return project, base / "remote", first, second, stamps


def project_store(project: Path) -> str:
    """The tracking URI of a project's own MLflow store (desensitize.tracking.store's default)."""
    return f"sqlite:///{(project / 'mlruns' / 'mlflow.db').resolve()}"


def copy_flow_project(flow_project, root: Path) -> Path:
    """A writable copy of the flow-run project (git, DVC cache and outputs) at `root`; it shares
    the original's DVC remote."""
    import shutil

    shutil.copytree(flow_project[0], root, symlinks=True)
    return root


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store(tmp_path_factory: pytest.TempPathFactory):
    """Every test (and every process it starts) tracks into a throw-away MLflow store, never the
    project's mlruns/. Tests that need their own store or the default one override it."""
    import os

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Create the store's tables now, so that no test's output depends on being the first to track.
    import mlflow

    mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_experiments()
    yield
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


LENIENT_GATE = {"max_psnr_gain": 100, "max_linkage_x_chance": 10_000, "max_recognition_recovery": 1}
FAILING_GATE = {"max_psnr_gain": 0, "max_linkage_x_chance": 1, "max_recognition_recovery": -1}


def tracked_params(gate: dict | None = None, enforce: bool = True):
    """tiny_params() with models that learn something (for registry comparisons) and a cheap attack."""
    return parse_params(
        {
            "data": {"source": "digits"},
            "reference": {"epochs": 2, "batch_size": 64},
            "masks": {"cell": 2, "hidden_ratio": 0.5, "privacy": "none", "search": TINY_SEARCH},
            "train": {"epochs": 2, "batch_size": 32},
            "attack": {"sample": 100, "attackers": ["telea"], "enforce": enforce, "thresholds": gate or LENIENT_GATE},
        }
    )
