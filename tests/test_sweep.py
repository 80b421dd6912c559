from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import LENIENT_GATE, tiny_params
from desensitize.cli import app
from desensitize.config import parse_params
from desensitize.errors import DesensitizeError
from desensitize.orchestration import sweep
from desensitize.orchestration.frontier import accuracy_at_privacy, matched_privacy
from desensitize.orchestration.sweep import COLUMNS, _write, run_sweep
from desensitize.orchestration.sweep_plan import SEARCHED, grid

FRONTIER = [(0.1, 0.5), (0.3, 0.9)]


def test_accuracy_at_privacy_interpolates_between_two_points():
    assert accuracy_at_privacy(FRONTIER, 0.2) == pytest.approx(0.7)
    assert accuracy_at_privacy(FRONTIER, 0.25) == pytest.approx(0.8)


def test_accuracy_at_privacy_envelope_ignores_dominated_points():
    # (0.2, 0.4) is beaten by the more private (0.1, 0.5); (0.4, 0.6) by (0.3, 0.9); (0.1, 0.3) by its twin
    points = [(0.2, 0.4), *FRONTIER, (0.4, 0.6), (0.1, 0.3)]
    assert accuracy_at_privacy(points, 0.25) == pytest.approx(0.8)
    assert accuracy_at_privacy(points, 0.2) == pytest.approx(0.7)
    assert accuracy_at_privacy(points, 0.35) == pytest.approx(0.9)
    assert accuracy_at_privacy(points, 0.1) == pytest.approx(0.5)


def test_accuracy_at_privacy_none_below_every_point():
    assert accuracy_at_privacy(FRONTIER, 0.05) is None
    assert accuracy_at_privacy([], 0.5) is None


def test_accuracy_at_privacy_best_accuracy_above_every_point():
    points = [*FRONTIER, (0.5, 0.6)]  # the least private point is not the most accurate
    assert accuracy_at_privacy(points, 0.5) == pytest.approx(0.9)
    assert accuracy_at_privacy(points, 10.0) == pytest.approx(0.9)


def test_accuracy_at_privacy_exact_hit():
    assert accuracy_at_privacy(FRONTIER, 0.1) == pytest.approx(0.5)
    assert accuracy_at_privacy(FRONTIER, 0.3) == pytest.approx(0.9)
    assert accuracy_at_privacy([(0.1, 0.5), (0.1, 0.7), (0.3, 0.9)], 0.1) == pytest.approx(0.7)


def test_grid_multiplies_only_set_scope_saliency_by_templates():
    points = grid(["set", "image"], [4, 7], [0.5], ["saliency", "random"], ["mean", "class_contrast"])
    families = {(p.scope, p.family, p.cell) for p in points}
    assert len(points) == len(families) == 2 * (3 + 2)
    assert {(p.scope, p.family) for p in points} == {
        ("set", "saliency/mean"),
        ("set", "saliency/class_contrast"),
        ("set", "random"),
        ("image", "saliency/per-image"),
        ("image", "random"),
    }
    assert {p.template for p in points if p.family.startswith("saliency/") and p.scope == "set"} == {
        "mean",
        "class_contrast",
    }
    assert len({p.name for p in points}) == len(points)  # one workspace each


def _row(seed: int, family: str, ratio: float | None, linkage: float | None, gain: float | None, plain, masknet):
    row = dict.fromkeys(COLUMNS)
    row.update(
        seed=seed,
        scope="set",
        family=family,
        strategy="random" if family == "random" else "saliency",
        cell=4,
        hidden_ratio=ratio,
        linkage_within_class=linkage,
        psnr_gain=gain,
        linkage_within_class_limit=None if linkage is None else 0.15,
        psnr_gain_limit=None if gain is None else 1.0,
        hidden_information=0.5,
        gate_passed=False if linkage is None else linkage <= 0.15 and gain <= 1.0,
        raw=0.99,
        plain_random=0.5,
        plain=plain,
        masknet=masknet,
    )
    return row


def _rows():
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        # saliency/mean: at the linkage limit 0.15 halfway between 0.1 and 0.2 -> (0.6 + 0.8) / 2 + shift;
        # at the PSNR limit 1.0 halfway between 0.5 and 1.5 -> the same
        rows.append(_row(seed, "saliency/mean", 0.9, 0.1, 0.5, 0.6 + shift, 0.65 + shift))
        rows.append(_row(seed, "saliency/mean", 0.5, 0.2, 1.5, 0.8 + shift, 0.85 + shift))
        # random: never that private
        rows.append(_row(seed, "random", 0.9, 0.3, 2.0, 0.7, 0.7))
    passed = _row(0, SEARCHED, None, 0.12, 0.8, 0.75, 0.77)
    failed = _row(1, SEARCHED, None, None, None, None, None)
    failed.update(raw=None, plain_random=None, failure="no candidate passed the privacy gate")
    return [*rows, passed, failed]


def test_matched_privacy_per_seed_then_over_seeds(tmp_path: Path):
    rows = _rows()
    table = matched_privacy(rows)
    assert table[("set", "saliency/mean", "plain")]["linkage_within_class"] == pytest.approx([0.7, 0.72])
    assert table[("set", "saliency/mean", "masknet")]["psnr_gain"] == pytest.approx([0.75, 0.77])
    assert table[("set", "random", "plain")] == {"linkage_within_class": [None, None], "psnr_gain": [None, None]}
    assert not any(family == SEARCHED for _, family, _ in table)

    _write(tmp_path, rows, attack=True)
    summary = (tmp_path / "summary.md").read_text()
    assert "| set | saliency/mean | plain | 0.7100 ± 0.0141 | 0.7100 ± 0.0141 |" in summary
    assert "| set | random | masknet | — | — |" in summary
    assert f"| set | {SEARCHED} | plain | 0.7500 (1 of 2 seeds), own point; gate passed 1 of 2 seeds |" in summary
    assert "| set | saliency/mean | 4 | 0.9 | 2 | 0.9900 ± 0.0000 | 0.5000 ± 0.0000 | 0.6100 ± 0.0141 |" in summary
    assert "| 1 | set | False | — | 4 | — | — | — | — | — | no candidate passed the privacy gate |" in summary
    with open(tmp_path / "results.csv") as f:
        table_csv = list(csv.DictReader(f))
    assert tuple(table_csv[0]) == COLUMNS and len(table_csv) == len(rows)
    assert table_csv[-1]["plain"] == "" and table_csv[-1]["failure"].startswith("no candidate")
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def _refused(tmp_path: Path, option: str, value: str) -> str:
    """The sweep command given one bad option: it exits 2 before any work (no --out directory); its output."""
    params, out = tmp_path / "params.yaml", tmp_path / "out"
    params.write_text("{}\n")
    result = CliRunner().invoke(app, ["sweep", "-p", str(params), "--out", str(out), option, value])
    assert result.exit_code == 2, (option, value, result.output)
    assert not out.exists()
    return result.output


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--templates", "search", "--templates: search"),
        ("--templates", "mean,median", "--templates: masks.template = 'median'"),
        ("--cells", "0", "--cells: masks.cell = 0"),
    ],
)
def test_sweep_cli_rejects_bad_axes_before_any_work(tmp_path: Path, option, value, expected):
    assert expected in _refused(tmp_path, option, value)


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--seeds", "", "error: --seeds: give at least one value"),
        ("--seeds", " , ", "error: --seeds: give at least one value"),
        ("--ratios", "", "error: --ratios: give at least one value"),
        ("--seeds", "0,1,0", "error: --seeds: 0 given twice"),
    ],
)
def test_sweep_cli_refuses_an_empty_axis_naming_the_option(tmp_path: Path, option, value, expected):
    output = _refused(tmp_path, option, value)
    assert output.startswith(expected), output


AXES = {
    "scopes": ["set"],
    "ratios": [0.25, 0.5, 0.75],
    "cells": [4],
    "strategies": ["random"],
    "templates": ["mean"],
    "searched": False,
    "attack": False,
}


def _fake_points(monkeypatch, stop_at: int | None = None, signum: int | None = None) -> list[str]:
    """The sweep's points without their stages: each gives a row made from its params. The `stop_at`-th
    call is interrupted instead: Ctrl-C, or the signal `signum` sent to this process. Returns the points
    called, in order."""
    calls: list[str] = []

    def point(run, out, attack, device):
        calls.append(f"{run.name}-seed-{run.params.seed}")
        if len(calls) == stop_at:
            if signum is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            time.sleep(5)  # the handler interrupts the sleep
        ratio = run.params.masks.hidden_ratio
        return _row(run.params.seed, run.point.family, ratio, None, None, 0.9 - ratio / 2, 0.95 - ratio / 2)

    monkeypatch.setattr(sweep, "run_point", point)
    monkeypatch.setattr(sweep, "prepare_seed", lambda params, out, device, seed: None)
    return calls


def _results(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("results.csv", "summary.md")}


def test_an_interrupted_sweep_keeps_the_previous_results_and_a_rerun_resumes(tmp_path: Path, monkeypatch):
    params, out = parse_params({}), tmp_path / "sweep"
    _fake_points(monkeypatch)
    run_sweep(params, out, seeds=[0], **AXES)
    previous = _results(out)
    assert not (out / "partial.jsonl").exists()

    calls = _fake_points(monkeypatch, stop_at=3)
    with pytest.raises(sweep.SweepInterrupted) as raised:
        run_sweep(params, out, seeds=[0, 1], **AXES)
    assert str(raised.value) == (
        f"sweep interrupted after 2 of 6 points: the points finished are kept in {out / 'partial.jsonl'}, marked "
        f"partial (the same sweep run again resumes from them); {out / 'results.csv'} and summary.md still hold "
        "the previous complete sweep"
    )
    assert raised.value.signum == signal.SIGINT
    assert _results(out) == previous  # the previous complete sweep, untouched
    kept = [json.loads(line) for line in (out / "partial.jsonl").read_text().splitlines()]
    assert [record["point"] for record in kept] == calls[:2]

    calls = _fake_points(monkeypatch)
    rows = run_sweep(params, out, seeds=[0, 1], **AXES)
    assert calls == [f"random-set-c4-{ratio:g}-seed-{seed}" for seed in (0, 1) for ratio in AXES["ratios"]][2:]
    assert [(row["seed"], row["hidden_ratio"]) for row in rows] == [(s, r) for s in (0, 1) for r in AXES["ratios"]]
    assert not (out / "partial.jsonl").exists()
    _fake_points(monkeypatch)
    run_sweep(params, tmp_path / "whole", seeds=[0, 1], **AXES)
    assert _results(out) == _results(tmp_path / "whole")  # resumed = run at once


def test_a_sweep_refuses_the_finished_points_of_another_sweep(tmp_path: Path, monkeypatch):
    params, out = parse_params({}), tmp_path / "sweep"
    _fake_points(monkeypatch, stop_at=2)
    with pytest.raises(sweep.SweepInterrupted, match=r"were not written \(no sweep in it has completed\)"):
        run_sweep(params, out, seeds=[0], **AXES)
    other = parse_params({"train": {"epochs": 3}})
    calls = _fake_points(monkeypatch)
    with pytest.raises(DesensitizeError, match=r"partial.jsonl: holds the finished point 'random-set-c4-0.25-seed-0'"):
        run_sweep(other, out, seeds=[0], **AXES)
    assert calls == [] and not (out / "results.csv").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_sweep_command_stopped_by_a_signal_says_what_it_kept(tmp_path: Path, monkeypatch, signum: int):
    params, out = tmp_path / "params.yaml", tmp_path / "out"
    params.write_text("{}\n")
    _fake_points(monkeypatch, stop_at=2, signum=signum)

    def unhandled(*_):  # without the command's own handler SIGTERM would end the test process
        raise RuntimeError("SIGTERM reached the test's guard")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        result = CliRunner().invoke(
            app,
            [
                "sweep",
                "-p",
                str(params),
                "--out",
                str(out),
                "--scopes",
                "set",
                "--ratios",
                "0.25,0.5",
                "--cells",
                "4",
                "--strategies",
                "random",
                "--no-searched",
                "--no-attack",
            ],
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 128 + signum, result.output
    (line,) = result.output.strip().splitlines()[-1:]
    assert line.startswith("error: sweep interrupted after 1 of 2 points: the points finished are kept in ")
    assert len((out / "partial.jsonl").read_text().splitlines()) == 1 and not (out / "results.csv").exists()


@pytest.mark.slow
def test_sweep_writes_one_row_per_point_and_the_frontier(tmp_path: Path):
    # A gate that every mask passes: the real gate's decisions are tests/test_real_gate.py's; here the rows
    # must show the pass at every point and the searched points' releases.
    params = tiny_params(
        attack={"thresholds": LENIENT_GATE},
        search={
            "epochs": 1,
            "templates": ["mean"],
            "cells": [2],
            "hidden_ratios": [0.5],
            "screen": {"width": 4, "epochs": 1},
            "max_full_gates": 1,
        },
    )
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
        cells=[4],  # not the params' cell (2): the axis reaches the mask
        strategies=["saliency", "random"],
        templates=["mean", "class_contrast"],
        searched=True,
        attack=True,
        device="cpu",
    )
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["scope"], r["family"]) for r in table] == [
        ("set", "saliency/mean"),
        ("set", "saliency/class_contrast"),
        ("set", "random"),
        ("image", "saliency/per-image"),
        ("image", "random"),
        ("set", SEARCHED),
        ("image", SEARCHED),
    ]
    assert tuple(table[0]) == COLUMNS
    fixed, searched = rows[:5], rows[5:]
    for row in fixed:
        assert row["cell"] == 4 and row["hidden_ratio"] == 0.5 and row["released_hidden_ratio"] == 0.5
        assert 0 <= row["masknet"] <= 1 and row["hidden_pixels"] == 0.5 and row["failure"] is None
        assert row["linkage_within_class_limit"] == pytest.approx(
            params.attack.thresholds.max_linkage_x_chance * row["linkage_within_class_chance"]
        )
        assert row["psnr_gain_limit"] == params.attack.thresholds.max_psnr_gain
        assert row["gate_passed"] is True
        assert all(row[f"{score}_judged"] <= row[f"{score}_limit"] for score in ("psnr_gain", "linkage_within_class"))
    assert [r["template"] for r in fixed[:3]] == ["mean", "class_contrast", None]
    for row in searched:  # the search releases its most useful candidate, which the attack stage then passes
        assert row["hidden_ratio"] is None and row["failure"] is None and row["gate_passed"] is True
        assert 0 <= row["plain"] <= 1 and 0 <= row["masknet"] <= 1 and row["cell"] is not None
    summary = (tmp_path / "summary.md").read_text()
    assert "| image | saliency/per-image | 4 | 0.5 | 1 |" in summary
    assert "| set | saliency/mean | plain |" in summary and "## Searched points" in summary
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
