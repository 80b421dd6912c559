"""MLflow tracking through run_stage: one parent run per pipeline execution with a child per stage,
each with its params, metrics, artifacts and datasets (digest = DVC md5); no raw pixel in any
artifact; the registered champion applies the release's mask itself."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import REPO, copy_project, tracked_params
from desensitize.cli import app
from desensitize.data.splits import load_split, read_manifest, split_digest
from desensitize.errors import DesensitizeError
from desensitize.inference import MaskedClassifier
from desensitize.orchestration.pipeline import RAW_SPLITS, STAGES, tracked_item
from desensitize.orchestration.runner import run_stage
from desensitize.paths import Paths
from desensitize.release import load_released
from desensitize.storage import flatten
from desensitize.tracking.runs import _UNSAFE_KEY, PARENT_ENV, _log_items, params_hash, pipeline_run
from desensitize.tracking.store import EXPERIMENT, tracking_uri
from desensitize.tracking.versioning import dvc_md5

TRACKED = ("masks", "attack", "train", "baselines", "evaluate", "register")


@pytest.fixture(scope="module")
def tracked(tiny_project, tmp_path_factory):
    """The tiny project taken from masks to register under one pipeline run, in its own store."""
    root = tmp_path_factory.mktemp("tracked")
    paths = copy_project(tiny_project, root / "project")
    params = tracked_params()
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        with pipeline_run(paths, tags={"origin": "test"}) as parent:
            assert os.environ[PARENT_ENV] == parent
            for name in TRACKED:
                run_stage(name, params, paths, "cpu")
        assert PARENT_ENV not in os.environ
        client = mlflow.MlflowClient(uri)
        client.uri = uri
        yield params, paths, parent, client


def _stage_runs(client: mlflow.MlflowClient, parent: str) -> dict:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return {run.data.tags["desensitize.stage"]: run for run in runs}


@pytest.mark.slow
def test_each_stage_is_a_tracked_child_of_the_pipeline_run(tracked):
    params, paths, parent, client = tracked
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["desensitize.kind"] == "pipeline" and parent_run.data.tags["origin"] == "test"
    runs = _stage_runs(client, parent)
    assert sorted(runs) == sorted(TRACKED)
    for name, run in runs.items():
        tags = run.data.tags
        assert run.info.status == "FINISHED" and run.info.run_name == name
        assert tags["desensitize.params_sha256"] == params_hash(params)
        assert tags["desensitize.dvc_lock_sha256"] == "none"  # no dvc.lock in this project
        assert len(tags["desensitize.git_commit"]) == 40 and tags["desensitize.git_dirty"] in ("true", "false")
        # Only the params keys the stage uses, as dvc.yaml lists them.
        assert {key.split(".")[0] for key in run.data.params} == {key.split(".")[0] for key in STAGES[name].params}
    assert runs["masks"].data.params["masks.hidden_ratio"] == "0.5"
    assert runs["masks"].data.params["masks.attribution.method"] == "saliency"
    assert "masks.hidden_ratio" not in runs["train"].data.params
    evaluation = json.loads(paths.report("evaluate").read_text())
    assert runs["evaluate"].data.metrics["accuracy.masknet"] == pytest.approx(evaluation["accuracy"]["masknet"])
    assert runs["attack"].data.metrics["gate.passed"] == 1.0
    assert runs["register"].data.metrics["version"] == 1.0


@pytest.mark.slow
def test_datasets_are_logged_with_their_dvc_digest_and_source(tracked):
    _, paths, parent, client = tracked
    runs = _stage_runs(client, parent)

    def inputs(name: str) -> dict:
        return {
            (d.dataset.name, d.tags[0].value): (d.dataset.digest, json.loads(d.dataset.source)["path"])
            for d in runs[name].inputs.dataset_inputs
        }

    raw, release = dvc_md5(paths.raw), dvc_md5(paths.release)
    assert raw.endswith(".dir") and release.endswith(".dir") and raw != release
    split = {name: split_digest(paths.raw, name)[:32] for name in ("train", "test", "public")}
    assert inputs("masks") == {
        ("raw/train", "input"): (split["train"], "data/raw"),
        ("raw/test", "input"): (split["test"], "data/raw"),
        ("raw/public", "input"): (split["public"], "data/raw"),  # the gated search trains its attackers on it
        ("release", "output"): (release, "data/release"),
    }
    # Each raw split its own digest; the DVC md5 of data/raw (the lineage link) in its source and tag.
    assert len(set(split.values())) == 3
    for d in runs["masks"].inputs.dataset_inputs:
        if d.dataset.name.startswith("raw/"):
            assert json.loads(d.dataset.source) == {"path": "data/raw", "split": d.dataset.name[4:], "dvc_md5": raw}
            assert runs["masks"].data.tags[f"desensitize.input.raw.{d.dataset.name[4:]}"] == raw
    attack = inputs("attack")
    assert set(attack) == {
        ("raw/train", "input"),
        ("raw/public", "input"),
        ("release", "input"),
        ("attack-sample", "input"),
    }
    assert attack[("release", "input")][0] == release
    assert attack[("attack-sample", "input")][0] not in (raw, release)
    assert inputs("train") == {("release", "input"): (release, "data/release")}
    masknet = dvc_md5(paths.model("masknet"))
    assert runs["train"].data.tags["desensitize.output.model.masknet"] == masknet
    assert runs["register"].data.tags["desensitize.input.model.masknet"] == masknet
    assert runs["masks"].data.tags["desensitize.input.model.reference"] == dvc_md5(paths.reference_model)


def test_each_raw_split_is_logged_with_its_own_digest(tiny_project, tmp_path):
    """All three splits live in one DVC output, data/raw: each still gets a dataset digest of its own
    (the sha256 of its shards' `sha256sum` listing, first 32 characters: MLflow's digest column holds
    36), with the DVC md5 of data/raw, which lineage links by, in its source, its tag and the run's
    digests/input.json artifact."""
    params, paths = tiny_project
    uri, previous = f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow.get_tracking_uri()
    experiment = mlflow.MlflowClient(uri).create_experiment("split-digests")
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            _log_items([tracked_item(name, paths, params) for name in RAW_SPLITS], "input", paths)
        recorded = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/digests/input.json")
    finally:
        mlflow.set_tracking_uri(previous)
    logged = mlflow.MlflowClient(uri).get_run(run.info.run_id)
    raw = dvc_md5(paths.raw)
    digests = {}
    for d in logged.inputs.dataset_inputs:
        split = d.dataset.name.removeprefix("raw/")
        listing = "".join(
            f"{hashlib.sha256((paths.raw / e['file']).read_bytes()).hexdigest()}  {e['file']}\n"
            for e in read_manifest(paths.raw)["shards"][split]
        )
        assert d.dataset.digest == hashlib.sha256(listing.encode()).hexdigest()[:32]
        assert json.loads(d.dataset.source) == {"path": "data/raw", "split": split, "dvc_md5": raw}
        assert logged.data.tags[f"desensitize.input.raw.{split}"] == raw
        digests[split] = d.dataset.digest
    assert sorted(digests) == ["public", "test", "train"] and len(set(digests.values())) == 3
    assert recorded == {item: raw for item in RAW_SPLITS}


def _blobs(path: Path) -> list[bytes]:
    """A file's bytes, plus what compression hides: zip members (npz, torch pickles), PNG pixels."""
    data = path.read_bytes()
    blobs = [data]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            blobs += [zf.read(name) for name in zf.namelist()]
    if data[:4] == b"\x89PNG":
        blobs.append(np.asarray(Image.open(io.BytesIO(data))).tobytes())
    return blobs


def _raw_leaks(blobs: list[bytes], raw: np.ndarray) -> int:
    """How many raw images occur in the blobs, as uint8 bytes or as float32 in [0, 1]."""
    needles = {image.tobytes() for image in raw} | {
        (image / np.float32(255)).astype(np.float32).tobytes() for image in raw
    }
    lengths = {len(needle) for needle in needles}
    found = set()
    for blob in blobs:
        for length in lengths:
            for start in range(0, len(blob) - length + 1):
                window = blob[start : start + length]
                if window in needles:
                    found.add(window)
    return len(found)


@pytest.mark.slow
def test_no_raw_pixels_in_any_mlflow_artifact(tracked, tmp_path):
    _, paths, parent, client = tracked
    raw = np.concatenate([load_split(paths.raw, split).images for split in ("train", "test", "public")])
    raw = raw[raw.reshape(len(raw), -1).std(axis=1) > 0]
    files = []
    for run in [client.get_run(parent), *_stage_runs(client, parent).values()]:
        root = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, dst_path=str(tmp_path / run.info.run_id), tracking_uri=client.uri
            )
        )
        files += [path for path in root.rglob("*") if path.is_file()]
    names = {path.name for path in files}
    assert {"model_card.md", "data_card.md", "release.json", "attack.json"} <= names
    assert not names & {"samples.png", "grid.png"}  # the figures that show raw images stay out
    # The registered model (a torch.export program: weights, mask, fill, the two example images) is scanned.
    logged_models = client.search_logged_models(
        experiment_ids=[client.get_experiment_by_name(EXPERIMENT).experiment_id]
    )
    model_dir = Path(
        mlflow.artifacts.download_artifacts(logged_models[0].artifact_location, dst_path=str(tmp_path / "m"))
    )
    files += [path for path in model_dir.rglob("*") if path.is_file()]
    assert any(path.suffix == ".pt2" for path in files)
    assert _raw_leaks([blob for path in files for blob in _blobs(path)], raw) == 0

    # The scan does find raw images where they are: in a raw shard, and in a pickled module holding them.
    assert _raw_leaks(_blobs(next(paths.raw.glob("train-*.npz"))), raw) > 0
    leaky = torch.nn.Module()
    leaky.register_buffer("images", torch.from_numpy(raw[:3]).float() / 255)
    torch.save(leaky, tmp_path / "leaky.pth")
    assert _raw_leaks(_blobs(tmp_path / "leaky.pth"), raw) == 3


def _floats(images: np.ndarray) -> torch.Tensor:
    """Raw uint8 images as the pyfunc interface takes them: float32 in [0, 1]."""
    return torch.from_numpy(images.astype(np.float32) / np.float32(255))


@pytest.mark.slow
def test_champion_loads_from_the_registry_and_masks_raw_images_itself(tracked):
    params, paths, _, client = tracked
    uri = "models:/masknet-digits@champion"
    mlflow.set_tracking_uri(client.uri)
    version = client.get_model_version_by_alias("masknet-digits", "champion")
    assert version.tags["release_digest"] == dvc_md5(paths.release) and version.tags["gate"] == "passed"
    # The tiny pipeline's release is set scope with a zero fill: the champion is a torch.export program.
    assert version.tags["model_format"] == "pt2" and "model_format_reason" not in version.tags
    model = mlflow.pytorch.load_model(uri)
    assert not isinstance(model, MaskedClassifier)  # an exported graph of torch ops, no class of ours
    raw = load_split(paths.raw, "test")
    released = load_released(paths.release, "test")
    local = MaskedClassifier(paths.model("masknet"), paths.release, device="cpu")
    with torch.no_grad():
        logits = model(_floats(raw.images))
        predictions = logits.argmax(1).numpy()
        np.testing.assert_array_equal(predictions, local.predict(raw.images))
        # Hidden pixels cannot matter: raw images, released ones and raw ones with noise under the mask agree.
        noisy = raw.images.copy()
        hidden = np.broadcast_to(released.masks[:, None] == 0, noisy.shape)
        noisy[hidden] = np.random.default_rng(0).integers(0, 256, int(hidden.sum()), dtype=np.uint8)
        torch.testing.assert_close(logits, model(_floats(released.images)))
        torch.testing.assert_close(logits, model(_floats(noisy)))
    # Through the generic pyfunc interface, with float input in [0, 1].
    pyfunc = mlflow.pyfunc.load_model(uri)
    out = pyfunc.predict(raw.images.astype(np.float32) / 255)
    np.testing.assert_array_equal(np.asarray(out).argmax(axis=1), predictions)
    # Loading it needs torch (pinned) and MLflow, nothing of ours or captum's.
    requirements = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    assert not any(line.startswith(("captum", "desensitize", "pydantic")) for line in requirements), requirements


# Run with `python -I` (no PYTHONPATH, no current directory on sys.path): this package cannot be
# imported, whatever the interpreter's site-packages hold; the champion still loads and predicts.
_WITHOUT_DESENSITIZE = textwrap.dedent(
    """
    import sys
    from importlib.abc import MetaPathFinder


    class NoDesensitize(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "desensitize" or name.startswith("desensitize."):
                raise ImportError(f"{name} is blocked in this process")
            return None


    sys.meta_path.insert(0, NoDesensitize())
    try:
        import desensitize  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("desensitize was importable")

    import mlflow
    import numpy as np

    model = mlflow.pyfunc.load_model("models:/masknet-digits@champion", model_config={"device": "cpu"})
    np.save(sys.argv[2], np.asarray(model.predict(np.load(sys.argv[1]))))
    loaded = [name for name in sys.modules if name == "desensitize" or name.startswith("desensitize.")]
    assert not loaded, loaded
    """
)


@pytest.mark.slow
def test_a_set_scope_champion_loads_and_masks_without_this_package(tracked, tmp_path):
    """The auditor's check that a `pt2` champion needs nothing of ours: in a process where importing
    `desensitize` fails and MLflow refuses pickled payloads, the champion loads from the registry and,
    given raw test images, gives the logits the package's own MaskedClassifier gives."""
    _, paths, _, client = tracked
    raw = load_split(paths.raw, "test").images
    np.save(tmp_path / "raw.npy", _floats(raw).numpy())
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(MLFLOW_TRACKING_URI=client.uri, MLFLOW_ALLOW_PICKLE_DESERIALIZATION="false")
    done = subprocess.run(
        [sys.executable, "-I", "-c", _WITHOUT_DESENSITIZE, str(tmp_path / "raw.npy"), str(tmp_path / "logits.npy")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logits = np.load(tmp_path / "logits.npy")
    local = MaskedClassifier(paths.model("masknet"), paths.release, device="cpu")
    np.testing.assert_array_equal(logits.argmax(axis=1), local.predict(raw))
    with torch.no_grad():
        expected = local(torch.from_numpy(raw)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)


def test_a_failing_stage_leaves_its_run_and_the_pipeline_run_failed(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    paths = Paths(tmp_path / "empty")
    with pytest.raises(DesensitizeError, match="release.json"):
        with pipeline_run(paths) as parent:
            run_stage("train", tracked_params(), paths, "cpu")
    client = mlflow.MlflowClient(uri)
    assert client.get_run(parent).info.status == "FAILED"
    (child,) = _stage_runs(client, parent).values()
    assert child.info.status == "FAILED" and "release.json" in child.data.tags["desensitize.error"]


def test_stage_table_matches_dvc_yaml():
    """Tracking logs each stage's params from the stage table: it must say what dvc.yaml says."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == list(STAGES)
    paths = Paths(Path("."))
    for name, stage in STAGES.items():
        assert list(dvc[name]["params"]) == list(stage.params), name
        deps = {str(Path(dep)) for dep in dvc[name].get("deps", [])}
        outs = {str(Path(next(iter(out)) if isinstance(out, dict) else out)) for out in dvc[name].get("outs", [])}
        from desensitize.orchestration.pipeline import item_path

        for item in stage.reads:
            assert str(item_path(item, paths)) in deps, (name, item)
        for item in stage.writes:
            assert str(item_path(item, paths)) in outs, (name, item)


def test_default_store_is_in_the_project_and_lineage_needs_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(Paths(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["lineage", "masknet-digits@champion"])
    assert result.exit_code == 2
    assert result.output.startswith("error: no MLflow tracking store at") and result.output.count("\n") == 1
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # a reader creates nothing


@pytest.mark.slow
def test_metrics_files_hold_the_headline_and_the_reports_every_figure_the_runs_logged(tracked, tiny_project):
    """`dvc metrics show` prints the metrics files: a few headline figures. Nothing else is lost: every
    figure a stage's MLflow run logged (all of what the metrics files used to hold), its wall times
    aside, is in the stage's report, which is also where the headline comes from."""
    _, paths, parent, client = tracked
    runs = _stage_runs(client, parent)
    figures = 0
    for stage in ("reference", "masks", "attack", "evaluate"):
        where = tiny_project[1] if stage == "reference" else paths  # the fixture's reference stage ran there
        report = json.loads(where.report(stage).read_text())
        metrics = json.loads((where.metrics / f"{stage}.json").read_text())
        assert metrics == importlib.import_module(f"desensitize.stages.{stage}").headline(report)
        flat = flatten(metrics)
        assert all(isinstance(value, int | float | str | bool) for value in flat.values()), flat
        figures += len(flat)
        if stage in runs:  # the reference stage ran before the tracked part of this fixture
            in_report = {_UNSAFE_KEY.sub("_", key): value for key, value in flatten(report).items()}
            logged = {k: v for k, v in runs[stage].data.metrics.items() if "second" not in k}
            assert len(logged) > len(flat)
            for key, value in logged.items():
                assert in_report[key] == pytest.approx(value), key
    assert figures <= 20
    attack = json.loads(paths.attack_metrics.read_text())
    assert (
        attack["linkage_max"]
        == json.loads(paths.report("attack").read_text())["gate"]["limits"]["linkage_within_class"]
    )
