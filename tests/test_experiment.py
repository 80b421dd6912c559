"""Override runs as DVC experiments, the parts that need no pipeline run: overrides read from `--set`,
experiment names git accepts, `-S` arguments DVC turns into exactly the validated values, the refusal
of uncommitted params.yaml / dvc.yaml, and the checkout lock. End to end (a real Prefect server and
worker, experiments side by side): tests/test_deployment.py; a failing experiment: tests/test_flow.py."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from desensitize.config import get_dotted, load_params, parse_params, with_overrides
from desensitize.errors import DesensitizeError
from desensitize.orchestration.experiment import LOCK, checkout_lock, require_committed
from desensitize.orchestration.overrides import experiment_name, parse_set, set_args


def test_set_values_are_read_as_yaml():
    overrides = parse_set(["masks.template=restorability", "masks.cell=7", "masks.search.hidden_ratios=[0.75, 0.875]"])
    assert overrides == {
        "masks.template": "restorability",
        "masks.cell": 7,
        "masks.search.hidden_ratios": [0.75, 0.875],
    }
    with pytest.raises(DesensitizeError, match="expected KEY=VALUE"):
        parse_set(["masks.cell"])


@pytest.mark.parametrize(
    "parts",
    [
        ("project 2026-11-26 02:00Z masks.template=restorability masks.cell=7", "1a2b3c4d"),
        ("..lead", "x.lock"),
        ("a~b^c:d?e*f[g]h\\i@{j}", ""),
        ("café déjà-vu", "0"),
    ],
)
def test_experiment_names_are_names_git_and_dvc_accept(parts):
    name = experiment_name(*parts)
    ref = f"refs/exps/ab/{'c' * 38}/{name}"
    assert subprocess.run(["git", "check-ref-format", ref], capture_output=True).returncode == 0, ref
    assert "/" not in name and experiment_name(name) == name  # DVC refuses a `/`; a name is its own name
    assert len(name) <= 64


def test_a_long_flow_run_name_is_cut_but_keeps_its_unique_tail():
    long = "project 2026-12-05 05:27Z masks.cell=7 masks.hidden_ratio=0.9375 masks.template=restorability"
    assert experiment_name(long, "84830e3f") == "project-2026-12-05-05-27Z-masks.cell-7-masks.hidden_rat-84830e3f"
    assert experiment_name("short", "84830e3f") == "short-84830e3f"


def test_set_args_make_dvc_write_exactly_the_validated_values(tmp_path: Path):
    """The `-S` arguments go through DVC's own parser (Hydra's grammar) into params.yaml: what the stages
    then read equals what was validated, awkward strings and numbers included."""
    from dvc.utils.hydra import apply_overrides

    overrides = {
        "masks.template": "restorability",
        "masks.cell": 7,
        "masks.hidden_ratio": "0.9375",  # from a UI: validated to a number
        "masks.search.hidden_ratios": [0.75, 0.875],
        "masks.search.scopes": None,
        "masks.attribution.noise_tunnel": True,
        "reference.lr": 1e-5,  # repr 1e-05, which Hydra would read as text
        "data.path": "it's a \\ back\\slash, =x,y\\",  # quotes, backslashes, commas, a trailing backslash
        "compute.scheduler": "tcp://scheduler:8786",
        "attack.thresholds": {"max_psnr_gain": 2.5, "max_linkage_x_chance": 3, "max_recognition_recovery": 0.1},
    }
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    raw = yaml.safe_load(path.read_text())
    params = parse_params(with_overrides(raw, overrides, "test"))
    args = set_args(params, overrides)
    assert args[:2] == ["-S", "++masks.template='restorability'"]
    apply_overrides(path, args[1::2])
    written = load_params(path)
    assert written == params
    validated = params.model_dump(mode="json")
    for key in overrides:  # and the file holds each value itself, not a default standing in for it
        assert get_dotted(written.model_dump(mode="json"), key) == get_dotted(validated, key)
        assert get_dotted(yaml.safe_load(path.read_text()), key) is not None or get_dotted(validated, key) is None


def test_an_interpolation_is_refused_before_dvc_reads_it():
    params = parse_params({"data": {"path": "${HOME}/images"}})
    with pytest.raises(DesensitizeError, match="interpolation"):
        set_args(params, {"data.path": "${HOME}/images"})


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_uncommitted_params_or_pipeline_are_refused_by_name(tmp_path: Path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    _git(tmp_path, "add", "params.yaml", "dvc.yaml")
    _git(tmp_path, "commit", "-qm", "params")
    require_committed(tmp_path)  # clean; an uncommitted dvc.lock, metrics, ... are the runs' own records

    (tmp_path / "params.yaml").write_text("seed: 1\n")
    with pytest.raises(DesensitizeError, match=r"uncommitted changes to M params\.yaml \(git status\)") as error:
        require_committed(tmp_path)
    assert "\n" not in str(error.value)  # one line
    _git(tmp_path, "add", "params.yaml")  # staged is not committed either
    (tmp_path / "dvc.yaml").unlink()
    with pytest.raises(DesensitizeError, match=r"D dvc\.yaml, M params\.yaml"):
        require_committed(tmp_path)


def test_a_run_that_writes_the_checkout_excludes_the_ones_that_copy_it(tmp_path: Path):
    (tmp_path / ".dvc").mkdir()
    with checkout_lock(tmp_path, shared=True), checkout_lock(tmp_path, shared=True):
        pass  # override runs set up side by side
    with checkout_lock(tmp_path), open(tmp_path / LOCK) as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
