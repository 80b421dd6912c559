from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import tiny_params
from desensitize.sweep import run_sweep

pytestmark = pytest.mark.slow


def test_sweep_writes_one_row_per_point_and_the_frontier(tmp_path: Path):
    params = tiny_params().model_copy(deep=True)
    params = params.model_copy(
        update={
            "train": params.train.model_copy(update={"epochs": 1}),
            "attack": params.attack.model_copy(
                update={
                    "sample": 100,
                    "attackers": ["telea", "learned"],
                    "learned": params.attack.learned.model_copy(update={"widths": [4], "max_epochs": 1, "patience": 1}),
                }
            ),
        }
    )
    rows = run_sweep(
        params,
        tmp_path,
        seeds=[0],
        scopes=["set", "image"],
        ratios=[0.5],
        strategies=["saliency", "random"],
        attack=True,
        device="cpu",
    )
    assert len(rows) == 4
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {(r["scope"], r["strategy"]) for r in table} == {
        ("set", "saliency"),
        ("image", "saliency"),
        ("set", "random"),
        ("image", "random"),
    }
    for row in rows:
        assert 0 <= row["masknet"] <= 1 and row["hidden_pixels"] == 0.5 and "linkage_within_class" in row
    summary = (tmp_path / "summary.md").read_text()
    assert "| image | 0.5 | saliency | 1 |" in summary
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
