"""A class too small for the split: ingest refuses one that would get no train image and warns, naming it,
of one that gets no test or no public image; every later figure (accuracy, chance level, within-class
linkage galleries) is computed on the classes present and the reports say which."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import LENIENT_GATE
from desensitize.config import DataParams, parse_params
from desensitize.data.sources import Source, load_source
from desensitize.data.splits import load_split
from desensitize.errors import DesensitizeError
from desensitize.paths import Paths
from desensitize.stages.attack import run_attack
from desensitize.stages.baselines import train_baselines
from desensitize.stages.evaluate import evaluate
from desensitize.stages.ingest import ingest
from desensitize.stages.masks import generate_masks
from desensitize.stages.reference import train_reference
from desensitize.stages.train import train_on_release
from desensitize.stats import chance_level

PARAMS = parse_params(
    {
        "data": {"source": "digits"},
        "reference": {"epochs": 1, "batch_size": 64},
        "masks": {"cell": 2, "hidden_ratio": 0.5, "privacy": "none", "template": "mean"},
        "train": {"epochs": 1, "batch_size": 64},
        "attack": {"sample": 100, "attackers": ["telea"], "thresholds": LENIENT_GATE},
    }
)


def _thin(monkeypatch, keep: int) -> None:
    """The digits source with only `keep` images of class '9'."""
    digits = load_source(DataParams(source="digits"))
    kept = np.ones(len(digits.labels), dtype=bool)
    kept[np.flatnonzero(digits.labels == 9)[keep:]] = False
    thin = Source(digits.images[kept], digits.labels[kept], digits.class_names)
    monkeypatch.setattr("desensitize.stages.ingest.load_source", lambda data: thin)


@pytest.mark.parametrize(("keep", "missing"), [(1, "test and no public"), (3, "public")])
def test_ingest_warns_of_a_class_with_no_test_or_public_image(tmp_path: Path, monkeypatch, caplog, keep, missing):
    _thin(monkeypatch, keep)
    with caplog.at_level("WARNING", logger="desensitize.stages.ingest"):
        manifest = ingest(PARAMS, Paths(tmp_path))
    images = "image" if keep == 1 else "images"
    assert f"class '9' ({keep} {images}) is too small for data.split: it has no {missing} image" in caplog.text
    assert manifest["counts"]["public"]["9"] == 0 and manifest["counts"]["train"]["9"] >= 1


def test_ingest_refuses_a_class_that_would_have_no_train_image(tmp_path: Path, monkeypatch):
    _thin(monkeypatch, 1)
    split = {"train": 0.2, "test": 0.6, "public": 0.2}  # a single image goes to test
    params = PARAMS.model_copy(update={"data": PARAMS.data.model_copy(update={"split": split})})
    params = parse_params(params.model_dump(mode="json"))
    with pytest.raises(DesensitizeError, match=r"class '9' \(1 image\) gets no train image from data.split"):
        ingest(params, Paths(tmp_path))
    assert not Paths(tmp_path).raw.exists()


def test_every_figure_is_over_the_classes_present_and_says_so(tmp_path: Path, monkeypatch):
    _thin(monkeypatch, 1)
    paths = Paths(tmp_path)
    ingest(PARAMS, paths)
    train_reference(PARAMS, paths, device="cpu")
    generate_masks(PARAMS, paths, device="cpu")
    attack = run_attack(PARAMS, paths, device="cpu")
    train_on_release(PARAMS, paths, device="cpu")
    train_baselines(PARAMS, paths, device="cpu")
    evaluation = evaluate(PARAMS, paths, device="cpu")
    test = load_split(paths.raw, "test").labels
    assert 9 not in test
    nine_absent = {"present": 9, "classes": 10, "absent": ["9"]}

    reference = json.loads(paths.report("reference").read_text())
    assert reference["test_classes"] == nine_absent and reference["per_class_accuracy"]["9"] is None
    assert evaluation["test_classes"] == nine_absent
    assert "9 of 10 classes (absent from the test split: '9')" in (paths.evaluate_reports / "summary.md").read_text()

    # Chance level: the majority class among the classes present, and the message says how many.
    chance = attack["reference_raw_test"]
    assert chance["chance"] == chance_level(test) and chance["classes"] == 9
    assert "the majority-class rate of the 9 classes present" in chance["message"]
    # Within-class linkage: galleries of the classes in the attacked sample, which the report names.
    sample = attack["sample_classes"]
    assert sample["present"] + len(sample["absent"]) == 10
    summary = (paths.attack_reports / "summary.md").read_text()
    assert f"within each of the {sample['present']} classes in the sample" in summary
