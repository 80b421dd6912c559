"""The gated registry: every version becomes `challenger`; `champion` moves only to a version whose
privacy gate passed, whose accuracy is clearly above chance and not below the current champion's."""

from __future__ import annotations

import pickle
import shutil
import types
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from torch import nn

from conftest import FAILING_GATE, copy_project, tracked_params
from desensitize.inference import MaskedClassifier, export_format
from desensitize.learning.checkpoints import load_checkpoint, save_checkpoint
from desensitize.orchestration.runner import run_stage
from desensitize.paths import Paths
from desensitize.release import load_released
from desensitize.stages.baselines import train_baselines
from desensitize.stages.masks import generate_masks
from desensitize.stages.train import train_on_release
from desensitize.stats import above_chance
from desensitize.tracking.lineage import lineage
from desensitize.tracking.registry import MAX_DESCRIPTION, register_version, version_description
from desensitize.tracking.store import configure

pytestmark = pytest.mark.slow
NAME = "masknet-digits"


@pytest.fixture(scope="module")
def trained(tiny_project, tmp_path_factory) -> Paths:
    """Release and models made once (untracked); each test copies them and tracks into its own store."""
    params = tracked_params()
    paths = copy_project(tiny_project, tmp_path_factory.mktemp("trained"))
    generate_masks(params, paths, device="cpu")
    train_on_release(params, paths, device="cpu")
    train_baselines(params, paths, device="cpu")
    return paths


@pytest.fixture
def project(trained: Paths, tmp_path, monkeypatch) -> tuple[Paths, mlflow.MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    shutil.copytree(trained.root, tmp_path / "project")
    return Paths(tmp_path / "project"), mlflow.MlflowClient(uri)


def _champion(client: mlflow.MlflowClient) -> str | None:
    try:
        return str(client.get_model_version_by_alias(NAME, "champion").version)
    except MlflowException:
        return None


def _pipeline_tail(paths: Paths, params, stages=("attack", "evaluate", "register")) -> dict:
    for name in stages:
        result = run_stage(name, params, paths, "cpu")
    return result


def test_a_failed_gate_registers_a_challenger_never_a_champion(project):
    paths, client = project
    result = _pipeline_tail(paths, tracked_params(gate=FAILING_GATE, enforce=False))
    assert result == {**result, "version": 1, "champion": False, "gate_passed": False}
    version = client.get_model_version(NAME, "1")
    assert version.tags["gate"] == "failed" and version.aliases == ["challenger"]
    assert _champion(client) is None
    # The cards carry the failed verdict, each score with its interval.
    card = paths.cards.joinpath("data_card.md").read_text()
    assert "not enforced: attack.enforce is false" in card and "privacy gate FAILED" in card
    assert "linkage within class" in card and "| telea | " in card and "] | " in card
    # This project's release and models were made untracked: lineage says which links are missing.
    chain = lineage(f"{NAME}/1", paths)
    assert chain["model"]["tags"]["gate"] == "failed" and not chain["complete"]
    assert "no training run found" in chain["problems"]

    # The same models behind a passing gate: this version, not the failed one, becomes champion.
    result = _pipeline_tail(paths, tracked_params())
    assert result["version"] == 2 and result["champion"] and _champion(client) == "2"
    assert client.get_model_version(NAME, "1").tags["gate"] == "failed"


def _degrade(path) -> None:
    """A deliberately worse model: every weight zeroed, so it predicts one class for every image."""
    model, spec = load_checkpoint(path)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.zero_()
    save_checkpoint(path, model, **spec)


def test_champion_moves_only_to_a_version_that_is_not_worse(project):
    paths, client = project
    params = tracked_params()
    first = _pipeline_tail(paths, params)
    assert first["version"] == 1 and first["champion"] and _champion(client) == "1"

    good = paths.model("masknet").read_bytes()
    _degrade(paths.model("masknet"))
    worse = _pipeline_tail(paths, params, ("evaluate", "register"))
    assert worse["accuracy"] < first["accuracy"] - 0.2
    assert worse["version"] == 2 and not worse["champion"]
    assert first["above_chance"] and not worse["above_chance"]  # one class for every image: chance
    assert "not clearly above chance" in worse["champion_decision"]
    assert (
        client.get_model_version(NAME, "2").tags["champion_decision"] == f"not champion: {worse['champion_decision']}"
    )
    assert _champion(client) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    assert float(client.get_model_version(NAME, "2").tags["accuracy"]) == worse["accuracy"]

    paths.model("masknet").write_bytes(good)  # as accurate as the champion: not worse, so it moves
    again = _pipeline_tail(paths, params, ("evaluate", "register"))
    assert again["accuracy"] == first["accuracy"] and again["champion"]
    assert _champion(client) == "3" and str(client.get_model_version_by_alias(NAME, "challenger").version) == "3"


def test_a_model_at_chance_is_registered_but_never_champion(tmp_path, monkeypatch):
    """The image-folder run where every model scored 0.333 on 3 classes: the gate passed, but 100 of 300
    right is what guessing gives, so the version stays challenger and says why."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    configure(Paths(tmp_path))
    client, labels = mlflow.MlflowClient(uri), np.arange(300) % 3

    def register(correct: int) -> dict:
        with mlflow.start_run():
            chance = above_chance(correct, labels)
            return register_version(
                nn.Linear(2, 3), NAME, accuracy=correct / 300, gate_passed=True, chance=chance, tags={}
            )

    at_chance = register(100)
    assert not at_chance["champion"] and _champion(client) is None
    assert at_chance["why"].startswith("accuracy 0.3333 on 300 images is not clearly above chance 0.3333")
    version = client.get_model_version(NAME, "1")
    assert (
        version.aliases == ["challenger"] and version.tags["champion_decision"] == f"not champion: {at_chance['why']}"
    )

    above = register(130)  # 0.433: p = 0.0002
    assert above["champion"] and _champion(client) == "2"
    assert client.get_model_version(NAME, "2").tags["champion_decision"] == "champion: accuracy 0.4333"


def test_a_model_from_a_dvc_experiment_is_registered_but_never_champion(tmp_path, monkeypatch):
    """An override run (or `dvc exp run`) registers its model, tagged with the experiment, as challenger:
    the champion, what a deployment serves, comes only from committed params. The same model registered
    outside an experiment then becomes champion."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    configure(Paths(tmp_path))
    client, labels = mlflow.MlflowClient(uri), np.arange(300) % 3

    def register(experiment: str | None) -> dict:
        with mlflow.start_run():
            chance = above_chance(280, labels)
            return register_version(
                nn.Linear(2, 3),
                NAME,
                accuracy=280 / 300,
                gate_passed=True,
                chance=chance,
                tags={},
                experiment=experiment,
            )

    tried = register("project-2026-12-06-0200Z-masks.cell-7-1a2b3c4d")
    assert not tried["champion"] and _champion(client) is None
    assert tried["why"] == (
        "trained in DVC experiment 'project-2026-12-06-0200Z-masks.cell-7-1a2b3c4d' "
        "(champion comes only from committed params)"
    )
    version = client.get_model_version(NAME, "1")
    assert version.aliases == ["challenger"] and version.tags["dvc_experiment"].endswith("1a2b3c4d")
    assert version.tags["champion_decision"] == f"not champion: {tried['why']}"

    committed = register(None)
    assert committed["champion"] and _champion(client) == "2"
    assert "dvc_experiment" not in client.get_model_version(NAME, "2").tags


def test_a_version_carries_its_model_card_and_its_signature(project):
    """What the auditor sees on the version's page: the model card as its description, and the
    model's inputs and outputs (signature, input example), its format and how to load it; the model
    still loads and predicts."""
    paths, client = project
    _pipeline_tail(paths, tracked_params())
    version = client.get_model_version(NAME, "1")
    card = paths.cards.joinpath("model_card.md").read_text()
    assert card.startswith("# Model card: masknet-digits") and version.description == card
    # A set-scope release with a zero fill: a torch.export program, and the card says how to load it.
    assert version.tags["model_format"] == "pt2" and "model_format_reason" not in version.tags
    assert "Format `pt2`" in card and "mlflow.pyfunc.load_model('models:/masknet-digits@champion')" in card
    assert "Input: float32 images (N, 1, 8, 8) with values in [0, 1], the raw uint8 levels divided by 255" in card

    uri = f"models:/{NAME}/1"
    info = mlflow.models.get_model_info(uri)
    assert info.signature is not None and info.saved_input_example_info is not None
    (inputs,), (outputs,) = info.signature.inputs.inputs, info.signature.outputs.inputs
    assert (inputs.type, inputs.shape) == (np.dtype("float32"), (-1, 1, 8, 8))  # digits: 1x8x8 in [0, 1]
    assert (outputs.type, outputs.shape) == (np.dtype("float32"), (-1, 10))  # logits, ten classes
    example = mlflow.models.Model.load(uri).load_input_example(uri)
    assert example.dtype == np.float32 and example.shape[1:] == (1, 8, 8) and 0 <= example.min() <= example.max() <= 1
    pyfunc = mlflow.pyfunc.load_model(uri)
    logits = np.asarray(pyfunc.predict(example))
    # 0..255 floats or a NaN: the exported program refuses them (no clipping to 1, no NaN logits).
    with pytest.raises(Exception, match=r"input images hold values outside \[0, 1\]; the model takes float32"):
        pyfunc.predict(example * np.float32(255))
    nan = example.copy()
    nan[0, 0, 3, 3] = np.nan
    with pytest.raises(Exception, match=r"input images hold NaN"):
        pyfunc.predict(nan)
    native = mlflow.pytorch.load_model(uri)
    assert not isinstance(native, MaskedClassifier)  # an exported graph: no class of ours was unpickled
    np.testing.assert_array_equal(logits, native(torch.from_numpy(example)).detach().numpy())
    local = MaskedClassifier(paths.model("masknet"), paths.release, device="cpu")
    np.testing.assert_array_equal(logits.argmax(axis=1), local.predict(np.rint(example * 255).astype(np.uint8)))


def _register_pickle(classifier: MaskedClassifier, paths: Paths, reason: str | None, **kwargs) -> dict:
    """Register `classifier` as a pickle-format version of NAME in the project's store."""
    configure(paths)
    with mlflow.start_run():
        return register_version(
            classifier,
            NAME,
            accuracy=0.9,
            gate_passed=True,
            chance=above_chance(90, np.arange(100) % 10),
            tags={},
            model_format="pickle",
            format_reason=reason,
            **kwargs,
        )


def test_a_release_whose_rule_runs_numpy_at_inference_is_registered_as_a_pickle_that_says_why(project):
    """A noise fill draws fresh numbers at inference (here put on the trained set-scope release's
    classifier; an image-scope release is the other case): no torch.export program can match it, so
    the version is a pickle of MaskedClassifier, tagged with why, and loads as one."""
    paths, client = project
    classifier = MaskedClassifier(paths.model("masknet"), paths.release, device="cpu")
    assert export_format(classifier.info) == ("pt2", None) and classifier.exportable() is not None
    classifier.info = classifier.info.model_copy(update={"fill": "noise"})
    model_format, reason = export_format(classifier.info)
    assert model_format == "pickle" and classifier.exportable() is None
    images = load_released(paths.release, "test").images
    result = _register_pickle(classifier, paths, reason, input_example=images[:2].astype(np.float32) / np.float32(255))
    tags = client.get_model_version(NAME, str(result["version"])).tags
    assert tags["model_format"] == "pickle" and tags["model_format_reason"] == reason
    assert reason.startswith("the noise fill draws fresh random values with numpy at inference")
    loaded = mlflow.pytorch.load_model(f"models:/{NAME}/{result['version']}")
    assert isinstance(loaded, MaskedClassifier)
    np.testing.assert_array_equal(loaded.predict(images), classifier.predict(images))


def test_a_pickled_version_names_only_the_modules_whose_import_paths_stay(project):
    """Registered pickles record the import path of every class they hold. The version is unpickled
    through a find_class that lists each module it touches: of this package, exactly the modules kept at
    their recorded paths (README: where the code lives), so a layout change cannot orphan a version."""
    paths, _ = project
    classifier = MaskedClassifier(paths.model("masknet"), paths.release, device="cpu")
    classifier.info = classifier.info.model_copy(update={"fill": "noise"})
    classifier.mask_params = tracked_params().masks  # as an image-scope saliency version holds them
    result = _register_pickle(classifier, paths, None)
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{result['version']}")
    (pickled,) = Path(local).rglob("*.pth")
    touched: set[str] = set()

    class Tracing(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            touched.add(module)
            return super().find_class(module, name)

    tracing = types.SimpleNamespace(Unpickler=Tracing, load=pickle.load, __name__="tracing")
    restored = torch.load(pickled, pickle_module=tracing, weights_only=False)
    assert sorted(m for m in touched if m.split(".")[0] == "desensitize") == [
        "desensitize.config",
        "desensitize.inference",
        "desensitize.masknet",
        "desensitize.models",
        "desensitize.release",
    ]
    images = load_released(paths.release, "test").images
    np.testing.assert_array_equal(restored.predict(images), classifier.predict(images))


def test_a_card_longer_than_the_description_field_is_cut_with_a_pointer():
    card = "# Model card\n\n" + "".join(f"| row {k} | {'x' * 60} |\n" for k in range(200))
    assert len(card) > MAX_DESCRIPTION
    text = version_description(card, "the artifact `reports/cards/model_card.md` of run abc")
    assert len(text) <= MAX_DESCRIPTION
    assert text.endswith("the whole card is the artifact `reports/cards/model_card.md` of run abc.)*\n")
    kept = text[: text.index("\n\n*(Card cut")]
    assert card.startswith(kept + "\n") and kept.endswith("|")  # cut at a row's end, not inside it
    assert version_description("# short\n", "anywhere") == "# short\n"


def test_lineage_names_a_version_tag_edited_after_registration(project):
    paths, client = project
    _pipeline_tail(paths, tracked_params())
    before = lineage(f"{NAME}/1", paths)
    assert not any("edited" in problem for problem in before["problems"]), before["problems"]
    run_id = client.get_model_version(NAME, "1").run_id
    assert {"model_digest", "release_digest", "accuracy"} <= set(before["model"]["tags"])
    assert not any("model_digest" in what or "release_digest" in what for what in before["unverified"])

    client.set_model_version_tag(NAME, "1", "model_digest", "0" * 32)
    client.set_model_version_tag(NAME, "1", "accuracy", "0.99")
    chain = lineage(f"{NAME}/1", paths)
    assert not chain["complete"]
    (digest,) = [p for p in chain["problems"] if p.startswith("version tag model_digest is " + "0" * 32)]
    assert f"registration run {run_id}" in digest and "no longer matches" in digest
    assert any(p.startswith("version tag accuracy is 0.99 but") for p in chain["problems"])
