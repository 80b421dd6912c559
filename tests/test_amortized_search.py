"""The amortized mask search: shared models learn only what their family of masks shows, the beam search
over cell sets finds the known best set of a toy problem, and the trade-off table reads the candidates
as its rule says."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from desensitize.config import parse_params
from desensitize.errors import DesensitizeError
from desensitize.masking.grid import expand
from desensitize.search.amortized import AmortizedMeasures, Family
from desensitize.search.cellsets import beam_search
from desensitize.search.gated import Candidate
from desensitize.search.tradeoff import cost_sentence, rows
from desensitize.stats import chance_level

LIMITS = {"psnr_gain": 1.0, "linkage_within_class": 0.15, "recognition_recovery": 0.3}
BASE = {"psnr_gain": 0.0, "linkage_within_class": 0.05, "recognition_recovery": 0.0}


class _Split:
    """A train split in memory, as Measures reads it."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.arrays = {"images": images, "labels": labels}

    def read_all(self) -> dict[str, np.ndarray]:
        return self.arrays


class _NeverCellZero(Family):
    """The family with the top-left cell always hidden (a cell the training masks never show)."""

    def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        masks = super().draw(count, rng)
        masks[:, :4, :4] = 0
        masks[:, 4:, 4:] |= (masks.reshape(count, -1).sum(axis=1) == 0)[:, None, None].astype(np.uint8)
        return masks


def _cell_zero_labels(n: int = 800, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """8x8 images whose label (two classes, 85% of one) is written in the top-left 4x4 cell only (bright or
    dark); the rest is noise."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.15).astype(np.int64)
    images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    images[:, 0, :4, :4] = np.where(labels == 1, 255, 0)[:, None, None]
    return images, labels


@pytest.mark.parametrize("family_shows_the_cell", [True, False])
def test_the_utility_model_uses_a_cell_only_if_its_family_shows_it(family_shows_the_cell: bool):
    """The label lives in cell 0 alone. Trained under masks that show it, the shared model reads the label
    off a mask that keeps cell 0 visible; trained under masks that never show it, the inputs it learns from
    say nothing about the label, so it learns the majority class and keeps to it: chance (the majority
    rate) on the held-out images, whatever cell 0 then shows."""
    images, labels = _cell_zero_labels()
    params = parse_params(
        {
            "reference": {"batch_size": 32, "lr": 0.01},
            "masks": {"search": {"cells": [4], "hidden_ratios": [0.5], "amortized": {"epochs": 6}}},
        }
    )
    cpu = torch.device("cpu")
    measures = AmortizedMeasures(params, None, _Split(images, labels), ["a", "b"], np.zeros(1), None, cpu)
    if not family_shows_the_cell:
        measures.family = _NeverCellZero(measures.family.size, measures.family.most_visible)
    keep_cell_zero = expand(np.array([[1, 0], [0, 0]], dtype=np.uint8), 8, 8, 4)
    utility = measures.utility(Candidate("cell 0", {"scope": "set"}, keep_cell_zero))
    held_out, _ = measures.held_out
    chance = chance_level(labels[held_out])
    if family_shows_the_cell:
        assert utility > 0.95
    else:
        assert utility <= chance + 0.02


def test_the_family_draws_one_to_the_most_visible_cells_per_mask():
    family = Family.of(parse_params({"masks": {"search": {"cells": [7, 4], "hidden_ratios": [0.75, 0.9]}}}), (28, 28))
    assert family.most_visible == {7: 4, 4: 12}  # 16 - 12 and 49 - 37 cells
    masks = family.draw(400, np.random.default_rng(1))
    counts = {7: [], 4: []}
    for mask in masks:
        for cell, (gh, gw) in ((7, (4, 4)), (4, (7, 7))):
            cells = mask.reshape(gh, cell, gw, cell).max(axis=(1, 3))
            if (expand(cells, 28, 28, cell) == mask).all():  # whole cells of this size
                counts[cell].append(int(cells.sum()))
                break
    assert len(counts[7]) + len(counts[4]) == 400
    assert min(counts[7]) == 1 and max(counts[7]) == 4 and min(counts[4]) == 1 and max(counts[4]) == 12


def _knapsack(values: list[float], costs: list[float], limit: float):
    """Utility = the kept cells' values, privacy = their costs, admitted up to `limit`."""

    def score(sets):
        return [(sum(values[c] for c in s), {"cost": sum(costs[c] for c in s)}) for s in sets]

    return score, [lambda privacy: privacy["cost"] <= limit]


def _best_by_brute_force(values, costs, limit, most):
    sets = (frozenset(s) for k in range(1, most + 1) for s in itertools.combinations(range(len(values)), k))
    admitted = [s for s in sets if sum(costs[c] for c in s) <= limit]
    return max(admitted, key=lambda s: (sum(values[c] for c in s), [-c for c in sorted(s)]))


def test_the_beam_search_finds_the_known_best_cell_set_of_a_toy_problem():
    """Cell 0 is the most useful alone but its cost leaves no room for cells 1 and 2 together, which are
    the best pair; a one-wide greedy search takes cell 0 and never finds them, a beam of three does."""
    values, costs, limit = [5, 4, 4, 0.6, 0.5, 0.4], [3, 2, 2, 0, 0, 0], 4
    best = _best_by_brute_force(values, costs, limit, most=3)
    assert best == {1, 2, 3}
    score, levels = _knapsack(values, costs, limit)

    def found(width: int) -> frozenset[int]:
        scored = beam_search(6, score, levels, width=width, budget=1000, most_visible=3)
        return max((s for s, (_, p) in scored.items() if levels[0](p)), key=lambda s: scored[s][0])

    assert found(width=3) == best
    assert found(width=1) == {0, 3}  # the greedy path: 5.6 of the best 8.6


def test_the_beam_search_keeps_to_its_budget_and_its_starts():
    score, levels = _knapsack([1.0] * 16, [0.0] * 16, 1.0)
    scored = beam_search(16, score, levels, starts=[frozenset({3, 4, 5})], width=2, budget=20, most_visible=5)
    assert len(scored) == 20 and frozenset({3, 4, 5}) in scored  # every single cell, the start, 3 more
    assert all(0 < len(s) <= 5 for s in scored)


def _candidate(name: str, utility: float, screen: float, full: float | None = None) -> Candidate:
    scores = {"psnr_gain": 0.0, "linkage_within_class": screen, "recognition_recovery": 0.0}
    c = Candidate(name, {}, np.zeros((2, 2), dtype=np.uint8), utility=utility, screen=scores)
    if full is not None:
        c.full = {**scores, "linkage_within_class": full}
        c.passed = full <= LIMITS["linkage_within_class"]
    return c


def test_the_tradeoff_table_matches_hand_made_rows():
    """Chance 0.05, gate at 3x (0.15), levels 5x (0.25) and 10x (0.5); the screen's strength 2 doubles what
    it reads above chance. a: released (full 0.12). b: failed the full gate at 0.30 (over 5x, under 10x).
    c: never gated, screen 0.12 -> predicted 0.19 (under 5x). d: screen 0.20 -> predicted 0.35."""
    a, b = _candidate("a", 0.20, 0.10, full=0.12), _candidate("b", 0.60, 0.10, full=0.30)
    c, d = _candidate("c", 0.40, 0.12), _candidate("d", 0.50, 0.20)
    strength = {"psnr_gain": 1.0, "linkage_within_class": 2.0, "recognition_recovery": 1.0}
    table = rows([a, b, c, d], a, LIMITS, chance=0.05, levels=[5, 10], gate_level=3, strength=strength, base=BASE)
    expected = [
        (3, 0.15, True, "a", 0.20, 0.12, "full gate"),
        (5, 0.25, False, "c", 0.40, 0.19, "predicted"),
        (10, 0.50, False, "b", 0.60, 0.30, "full gate"),
    ]
    got = [
        (r["level"], r["linkage_limit"], r["gate"], r["candidate"], r["utility"], r["scores"]["linkage_within_class"])
        + (r["basis"],)
        for r in table
    ]
    for row, want in zip(got, expected, strict=True):
        assert (row[0], row[2], row[3], row[6]) == (want[0], want[2], want[3], want[6])
        assert row[1] == pytest.approx(want[1]) and row[4:6] == pytest.approx(want[4:6])
    assert cost_sentence(table) == (
        "at the gate's 3x chance the release keeps a held-out utility of 0.200; "
        "at 5x it would keep 0.400 (predicted); at 10x it would keep 0.600 (full gate)"
    )


def test_a_level_that_admits_nothing_says_so():
    table = rows([_candidate("x", 0.5, 0.9)], None, LIMITS, chance=0.05, levels=[5], gate_level=3,
                 strength=dict.fromkeys(LIMITS, 1.0), base=BASE)  # fmt: skip
    assert [(r["level"], r["candidate"]) for r in table] == [(3, None), (5, None)]
    assert cost_sentence(table) == "no release passed the gate; at 5x it would keep nothing found"


def test_cell_set_levels_are_checked():
    with pytest.raises(
        DesensitizeError, match=r"masks.search.cellsets = .*levels \[0.5\]: each must be in \[1, 10000\]"
    ):
        parse_params({"masks": {"search": {"cellsets": {"levels": [0.5]}}}})


def test_the_amortized_search_releases_the_same_whatever_threads_the_caller_had(tiny_project, tmp_path):
    """The shared models train in the stage's own process: with compute.threads torch threads, as a unit
    would, not with whatever the caller (a flow run, a test) had set."""
    from conftest import LENIENT_GATE, copy_project, tiny_params
    from desensitize.stages.masks import generate_masks

    params = tiny_params(privacy="gate", attack={"thresholds": LENIENT_GATE})
    outputs, previous = [], torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            paths = copy_project(tiny_project, tmp_path / f"threads{threads}")
            generate_masks(params, paths, device="cpu")
            assert torch.get_num_threads() == threads  # and left as it was
            outputs.append(
                {p.name: p.read_bytes() for p in (*paths.release.iterdir(), paths.masks_reports / "search.json")}
            )
    finally:
        torch.set_num_threads(previous)
    assert outputs[0] == outputs[1]
