from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO
from desensitize.cli import app
from desensitize.config import Params, load_params, parse_params
from desensitize.errors import DesensitizeError


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def test_repository_params_file_is_valid_and_spells_out_every_setting():
    params = load_params(REPO / "params.yaml")
    assert params.data.source == "mnist5k"
    written = yaml.safe_load((REPO / "params.yaml").read_text())
    # Nothing silently falls back to a default that the user cannot see in params.yaml.
    assert _keys(written) == _keys(Params().model_dump())


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"data": {"split": {"train": 1.5}}}, "data.split.train = 1.5: Input should be less than 1"),
        ({"data": {"split": {"test": 0}}}, "data.split.test = 0: Input should be greater than 0"),
        ({"data": {"split": {"train": 0.7, "test": 0.2, "public": 0.2}}}, "must be at most 1"),
        ({"data": {"source": "imagenet"}}, "data.source = 'imagenet': Input should be 'mnist5k', 'fashion-mnist'"),
        ({"reference": {"epochs": 0}}, "reference.epochs = 0: Input should be greater than or equal to 1"),
        ({"reference": {"backbone": "vgg"}}, "reference.backbone = 'vgg'"),
        ({"refrence": {}}, "refrence: unknown key"),
        ({"seed": -1}, "seed = -1"),
    ],
)
def test_bad_values_name_key_value_and_allowed_range(raw, expected):
    with pytest.raises(DesensitizeError) as info:
        parse_params(raw, origin="p.yaml")
    assert str(info.value).startswith("p.yaml: ")
    assert expected in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(DesensitizeError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(DesensitizeError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(DesensitizeError, match="expected a mapping"):
        load_params(bad)


def test_cli_reports_one_error_line_and_exit_status_2(tmp_path: Path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  split:\n    public: 2\n")
    result = CliRunner().invoke(app, ["check-params", "--params", str(bad)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and "data.split.public = 2" in lines[0]


def test_a_stage_failing_under_dvc_says_how_to_restore_its_previous_outputs(tmp_path: Path, monkeypatch):
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  split:\n    public: 2\n")
    monkeypatch.setenv("DVC_STAGE", "ingest")  # what DVC sets for the command of the stage it runs
    result = CliRunner().invoke(app, ["ingest", "--params", str(bad)])
    assert result.exit_code == 2
    assert "'dvc checkout ingest' restores them" in result.output
    monkeypatch.delenv("DVC_STAGE")  # run by hand: the outputs were never deleted, no such advice
    assert "dvc checkout" not in CliRunner().invoke(app, ["ingest", "--params", str(bad)]).output


def test_help_explains_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ingest", "reference", "check-params"):
        assert command in result.output


def test_overrides_are_validated_then_written_keeping_comments(tmp_path: Path):
    from desensitize.config import write_overrides

    path = tmp_path / "params.yaml"
    path.write_text("seed: 0  # the seed\nmasks:\n  hidden_ratio: 0.75  # share hidden\n")
    params = write_overrides(path, {"masks.hidden_ratio": "0.5", "attack.sample": 100})
    assert params.masks.hidden_ratio == 0.5 and params.attack.sample == 100
    text = path.read_text()
    assert re.search(r"hidden_ratio: 0.5 +# share hidden", text)  # the validated value, a number; comment kept
    assert "# the seed" in text
    assert load_params(path) == params


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"masks.hiden_ratio": 0.5}, "masks.hiden_ratio: unknown key"),
        ({"masks.hidden_ratio": 1.5}, "masks.hidden_ratio = 1.5: Input should be less than 1"),
        ({"seed.value": 1}, "seed.value: seed is a value, not a section"),
        ({"masks..cell": 2}, "expected a dotted key"),
    ],
)
def test_a_bad_override_names_the_key_and_writes_nothing(tmp_path: Path, overrides, message):
    from desensitize.config import write_overrides

    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\nmasks:\n  hidden_ratio: 0.75\n")
    before = path.read_bytes()
    with pytest.raises(DesensitizeError, match=re.escape(message)):
        write_overrides(path, overrides)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]
