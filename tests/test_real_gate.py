"""The real privacy gate end to end on the tiny source: params.yaml's thresholds and attackers as they
ship (every attacker, the learned one trained to its limit on each width and data share) and nothing
between the gate and its verdict. Every other test that reaches a verdict sets thresholds that open or
shut the gate (conftest's LENIENT_GATE, FAILING_GATE): those test mechanics.

One setting is the tiny source's own: the attacker's data budget (attack.assumed_attacker_images) is
the public split the attacker trains on (357 images), not the 20,000 images the gate assumes of a real
attacker. Projected that far, the learned attacker's curve, still rising on 8x8 digits, fails every
mask, even one that shows a single constant corner cell (measured: 0.03 dB gain judged at 1.47).

One gated search over two masks of the `center` strategy, whose known answer needs no model: hiding the
4 central cells of 16 leaves the digit's outline, which the attackers restore and link (fails), hiding
all but the corner cell leaves nothing to restore (passes). The search must refuse the first at the
full gate and release the second; the attack stage, the model card, the registry's version tag and the
auditor's lineage must all carry that verdict."""

from __future__ import annotations

import json

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, copy_project
from desensitize.attack.gate import GATED, excess
from desensitize.cli import app
from desensitize.config import parse_params
from desensitize.data.splits import read_manifest
from desensitize.orchestration.runner import run_stage
from desensitize.release import RELEASE_JSON
from desensitize.tracking.runs import pipeline_run

pytestmark = pytest.mark.slow
PRODUCTION = yaml.safe_load((REPO / "params.yaml").read_text())["attack"]
NAME = "masknet-digits"


@pytest.fixture(scope="module")
def gated(tiny_project, tmp_path_factory):
    """masks -> register on the tiny project under one pipeline run, in its own store, with the shipped gate."""
    root = tmp_path_factory.mktemp("real-gate")
    paths = copy_project(tiny_project, root / "project")
    params = parse_params(
        {
            "data": {"source": "digits"},
            "reference": {"epochs": 2, "batch_size": 64},
            "masks": {
                "strategy": "center",
                "cell": 2,
                "privacy": "gate",
                "search": {
                    "scoring": "trained",  # the grid alone: the two masks, nothing searched between them
                    "epochs": 2,
                    "cells": [2],
                    "hidden_ratios": [1 / 4, 15 / 16],
                    "screen": {"width": 8, "epochs": 1},
                },
            },
            "train": {"epochs": 2, "batch_size": 32},
            "attack": {
                **PRODUCTION,
                "assumed_attacker_images": sum(read_manifest(paths.raw)["counts"]["public"].values()),
            },
        }
    )
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        with pipeline_run(paths, tags={"origin": "test"}):
            for name in ("masks", "attack", "train", "baselines", "evaluate", "register"):
                run_stage(name, params, paths, "cpu")
        yield params, paths, uri


def test_the_shipped_gate_refuses_the_leaky_candidate_and_releases_the_one_that_passes(gated):
    params, paths, _ = gated
    search = json.loads((paths.masks_reports / "search.json").read_text())
    thresholds = PRODUCTION["thresholds"]
    chance = json.loads(paths.report("attack").read_text())["linkage_within_class_chance"]
    assert search["limits"] == pytest.approx(
        {
            "psnr_gain": thresholds["max_psnr_gain"],
            "linkage_within_class": thresholds["max_linkage_x_chance"] * chance,
            "recognition_recovery": thresholds["max_recognition_recovery"],
        }
    )
    gated_runs = {c["hidden_ratio"]: c for c in search["candidates"] if c["full"] is not None}
    leaky, hidden = gated_runs[1 / 4], gated_runs[15 / 16]
    # The full gate ran on both, most useful first; it refused the leaky one on its own scores ...
    assert leaky["utility"] > hidden["utility"]
    assert leaky["passed"] is False and excess(leaky["full"], search["limits"]) > 0
    # ... and released the other, every score at or under its limit.
    assert hidden["passed"] is True and all(hidden["full"][s] <= search["limits"][s] for s in GATED)
    release = json.loads((paths.release / RELEASE_JSON).read_text())
    assert release["candidate"] == search["chosen"] == hidden["name"] and release["hidden_ratio"] == 15 / 16

    # The attack stage, a fresh run of the same gate on the release, reaches the same verdict.
    attack = json.loads(paths.report("attack").read_text())
    assert attack["gate"]["passed"] is True and attack["gate"]["violations"] == []
    assert attack["gate"]["limits"] == pytest.approx(search["limits"])
    for score in GATED:
        assert max(a["judged"][score] for a in attack["attackers"].values()) <= search["limits"][score]


def test_the_card_the_registry_and_lineage_carry_the_real_verdict(gated, monkeypatch):
    _, paths, uri = gated
    message = json.loads(paths.report("attack").read_text())["gate"]["message"]
    assert message.startswith("privacy gate passed")
    assert f"**{message}**" in (paths.cards / "model_card.md").read_text()
    client = mlflow.MlflowClient(uri)
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert version.tags["gate"] == "passed" and f"**{message}**" in version.description

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(paths.root)
    result = CliRunner().invoke(app, ["lineage", f"{NAME}/{version.version}", "--json"])
    assert result.exit_code == 0, result.output
    chain = json.loads(result.output)
    assert chain["complete"], chain["problems"]
    assert chain["attack_run"]["gate"] == {"passed": True, "enforced": True, "message": message}
