"""Every stage that reads a release proves it first, with the checks of `verify-release`: a release forged
so that release.json still matches its shards (one hidden pixel changed and the shard re-signed, or a
declared figure edited) stops the stage with one clear error before it trains or writes anything. The
trainer's view (`train`) proves what the bundle alone can show; the owner's stages also compare it with
the raw data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import copy_project
from desensitize.bundle.verify import verify_release
from desensitize.cli import app
from desensitize.config import parse_params
from desensitize.data.splits import load_split
from desensitize.errors import DesensitizeError
from desensitize.orchestration.runner import run_stage
from desensitize.paths import Paths
from desensitize.release import RELEASE_JSON, load_released
from desensitize.stages.masks import generate_masks
from desensitize.stages.train import train_on_release
from desensitize.storage import sha256_file, write_arrays

PARAMS = parse_params(
    {
        "data": {"source": "digits"},
        "masks": {"cell": 2, "hidden_ratio": 0.5, "privacy": "none", "template": "mean"},
        "train": {"epochs": 1, "batch_size": 64},
        "attack": {"sample": 100, "attackers": ["telea"]},
    }
)
FORGERIES = {
    # The first hidden pixel of the first train image that holds 0 (the zero fill) now holds 17.
    "hidden-pixel": r"train image 0, channel 0, pixel \(row \d+, col \d+\): hidden pixel holds 17, not the "
    r"declared fill_value 0",
    "hidden-ratio": r"release.json: hidden_ratio 0.25, but 8 of 16 cells hidden is 0.5",
}


@pytest.fixture(scope="module")
def made(tiny_project, tmp_path_factory) -> Paths:
    """A release of the tiny project and every model trained on it (one epoch): each stage could run."""
    paths = copy_project(tiny_project, tmp_path_factory.mktemp("made") / "project")
    generate_masks(PARAMS, paths, device="cpu")
    train_on_release(PARAMS, paths, device="cpu")
    run_stage("baselines", PARAMS, paths, "cpu")
    return paths


def _sign(paths: Paths, split: str, k: int, arrays: dict[str, np.ndarray]) -> None:
    """Write shard k of `split` and its new sha256 into release.json: only a content check can tell."""
    shard = paths.release / f"{split}-{k:03d}.npz"
    write_arrays(shard, **arrays)
    release = json.loads((paths.release / RELEASE_JSON).read_text())
    release["shards"][split][k]["sha256"] = sha256_file(shard)
    (paths.release / RELEASE_JSON).write_text(json.dumps(release))


def _shard(paths: Paths, split: str = "train", k: int = 0) -> dict[str, np.ndarray]:
    with np.load(paths.release / f"{split}-{k:03d}.npz") as data:
        return {name: data[name].copy() for name in data.files}


def forge(paths: Paths, kind: str) -> None:
    if kind == "hidden-pixel":
        arrays = _shard(paths)
        y, x = (int(v) for v in np.argwhere(arrays["masks"][0] == 0)[0])
        assert arrays["images"][0, 0, y, x] == 0
        arrays["images"][0, 0, y, x] = 17
        _sign(paths, "train", 0, arrays)
    else:
        path = paths.release / RELEASE_JSON
        path.write_text(json.dumps({**json.loads(path.read_text()), "hidden_ratio": 0.25}))


def _outputs(paths: Paths) -> dict[str, int]:
    """Every file of the project outside data/, with its modification time."""
    return {
        p.relative_to(paths.root).as_posix(): p.stat().st_mtime_ns
        for p in paths.root.rglob("*")
        if p.is_file() and not p.relative_to(paths.root).as_posix().startswith(("data/", "mlruns"))
    }


@pytest.mark.parametrize("kind", sorted(FORGERIES))
@pytest.mark.parametrize("stage", ["attack", "train", "baselines", "evaluate", "register"])
def test_a_stage_refuses_a_forged_release_before_it_trains_or_writes(
    made, tmp_path: Path, monkeypatch, stage: str, kind: str
):
    paths = Paths(tmp_path / "project")
    shutil.copytree(made.root, paths.root)
    forge(paths, kind)
    before = _outputs(paths)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    with pytest.raises(DesensitizeError, match=rf"release fails verification: .*{FORGERIES[kind]}") as raised:
        run_stage(stage, PARAMS, paths, "cpu")
    assert "\n" not in str(raised.value)
    assert _outputs(paths) == before  # nothing trained, nothing written
    if stage == "register":
        assert mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_registered_models() == []


def test_a_stage_run_from_the_cli_names_the_forgery_in_one_line(made, tmp_path: Path, monkeypatch):
    paths = Paths(tmp_path / "project")
    shutil.copytree(made.root, paths.root)
    forge(paths, "hidden-ratio")
    paths.params_file.write_text(yaml.safe_dump(PARAMS.model_dump(mode="json")))
    before = _outputs(paths)
    monkeypatch.chdir(paths.root)
    result = CliRunner().invoke(app, ["train", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and "hidden_ratio 0.25, but 8 of 16 cells hidden is 0.5" in line
    assert _outputs(paths) == before


def test_without_the_raw_data_the_bundle_is_proved_on_its_own(made, tmp_path: Path):
    """raw_dir None: every check the bundle alone can decide (here, the two forgeries); a visible pixel
    changed is what only the raw data can show."""
    for kind, message in FORGERIES.items():
        paths = Paths(tmp_path / kind)
        shutil.copytree(made.release, paths.release)
        forge(paths, kind)
        with pytest.raises(DesensitizeError, match=message):
            verify_release(paths.release, None)

    paths = Paths(tmp_path / "visible")
    shutil.copytree(made.root, paths.root)
    arrays = _shard(paths)
    y, x = (int(v) for v in np.argwhere(arrays["masks"][0] == 1)[0])
    arrays["images"][0, 0, y, x] ^= 1
    _sign(paths, "train", 0, arrays)
    summary = verify_release(paths.release, None)
    assert summary["splits"]["train"]["hidden_ratio_pixels"] == 0.5
    with pytest.raises(DesensitizeError, match=rf"train image 0, channel 0, pixel \(row {y}, col {x}\): visible pixel"):
        verify_release(paths.release, paths.raw)
    # ...and labels, which only the raw split knows.
    arrays = _shard(paths, "test")
    arrays["labels"][0] = (arrays["labels"][0] + 1) % 10
    shutil.copytree(made.release, paths.release, dirs_exist_ok=True)
    _sign(paths, "test", 0, arrays)
    verify_release(paths.release, None)
    with pytest.raises(DesensitizeError, match=r"test: labels differ from the raw split"):
        verify_release(paths.release, paths.raw)
    assert len(load_released(paths.release, "test").labels) == len(load_split(paths.raw, "test").labels)
