"""The mask search as the masks stage runs it: score the candidates, add the searched cell sets, and
choose the release (desensitize.search.gated), with the trade-off the owner reads beside it.

masks.search.scoring = amortized (the default): two shared models score every candidate
(desensitize.search.amortized), so beyond the grid of masks.search the search scores set-scope cell sets
(desensitize.search.cellsets; for the `random` strategy, as many random cell sets instead), up to
masks.search.cellsets.budget masks in all, and records what each level of privacy would let a release
keep (desensitize.search.tradeoff). masks.search.scoring = trained: each grid candidate trains its own
utility model and screen attacker, as units on the run's Executor.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import numpy as np
import torch

from desensitize.attack.gate import Scores, excess
from desensitize.config import Params
from desensitize.masking.grid import expand, grid_shape, random_masks
from desensitize.paths import Paths
from desensitize.runtime.compute import Executor
from desensitize.search import cellsets, tradeoff
from desensitize.search.amortized import AmortizedMeasures
from desensitize.search.candidates import fixed
from desensitize.search.gated import Candidate, SearchFailed, search
from desensitize.search.measures import Measures
from desensitize.storage import Shards, write_json

log = logging.getLogger(__name__)
CELLSET_STREAM = 31  # the random strategy's cell sets


def choose(
    params: Params,
    paths: Paths,
    found: list[Candidate],
    train_shards: Shards,
    class_names: list[str],
    mean: np.ndarray,
    model: torch.nn.Module,
    device: torch.device,
    ex: Executor,
) -> tuple[Candidate, dict[str, Any] | None]:
    """The candidate to release and the search's record (None for a single candidate without the gate).
    Trained scoring runs the candidates as units on `ex`; the full gate's attacker fits always are; the
    shared models of amortized scoring train in this process (the caller sets its torch threads). The
    search trains on and attacks every candidate's masked train images: it reads the split whole."""
    cfg = params.masks
    if cfg.privacy == "none" and len(found) == 1:
        return found[0], None
    amortized = cfg.template == "search" and cfg.search.scoring == "amortized"
    measures = (AmortizedMeasures if amortized else Measures)(
        params, paths, train_shards, class_names, mean, model, device
    )
    gpu = device.type == "cuda"
    units = _in_order if amortized else partial(ex.map, gpu=gpu, name="candidate")
    if cfg.privacy == "none":
        for c, u in zip(found, units(measures.utility, found), strict=True):
            c.utility = u
            log.info("candidate %s: held-out accuracy %.4f", c.name, c.utility)
        chosen = max(found, key=lambda c: c.utility)  # ties: the first
        return chosen, {"chosen": chosen.name, "candidates": [c.record() for c in found]}
    levels = _levels(params)
    if amortized and "set" in (cfg.search.scopes or [cfg.scope]):  # cell sets are set-scope masks
        found = [*found, *_cell_sets(params, measures, found, levels)]
    try:
        result = search(
            found,
            utility=measures.utility,
            screen=measures.screen,
            full=partial(measures.full, ex=ex),
            limits=measures.limits,
            max_full_gates=cfg.search.max_full_gates,
            base={"linkage_within_class": measures.chance},
            map_units=units,
        )
    except SearchFailed as failed:
        write_json(paths.masks_reports / "search.json", _record(failed.result, params, measures, amortized))
        raise
    record = _record(result, params, measures, amortized)
    write_json(paths.masks_reports / "search.json", record)
    return result.chosen, record


def _in_order(fn, candidates: list[Candidate]) -> list[Any]:
    return [fn(c) for c in candidates]


def _levels(params: Params) -> list[float]:
    """The privacy levels the search keeps candidates for, strictest first, as multiples of within-class
    chance: the gate's and masks.search.cellsets.levels."""
    return sorted({params.attack.thresholds.max_linkage_x_chance, *params.masks.search.cellsets.levels})


def _bounds(measures: Measures, level: float) -> Scores:
    return {**measures.limits, "linkage_within_class": level * measures.chance}


def _cell_sets(
    params: Params, measures: AmortizedMeasures, grid: list[Candidate], levels: list[float]
) -> list[Candidate]:
    """Scored set-scope candidates beyond the grid, per cell size of masks.search.cells: for the saliency
    strategy the beam search of desensitize.search.cellsets from every single cell and the grid's masks
    (what the screen, read as it is, admits at each level), for the `random` strategy as many random cell
    sets. Either way each cell size gets an equal share of masks.search.cellsets.budget, the grid's masks
    at that size counted in it."""
    bounds = [{**measures.limits, "linkage_within_class": level * measures.chance} for level in levels]
    admitted = [partial(lambda bound, screen: excess(screen, bound) <= 0, bound) for bound in bounds]
    share = params.masks.search.cellsets.budget // len(params.masks.search.cells)
    out = []
    for cell in params.masks.search.cells:
        out += _cell_sets_at(params, measures, grid, admitted, cell, share)
    return out


def _cell_sets_at(
    params: Params, measures: AmortizedMeasures, grid: list[Candidate], admitted: list, cell: int, share: int
) -> list[Candidate]:
    """_cell_sets at one cell size: the new candidates, scored (the grid's are scored in place)."""
    height, width = measures.train.images.shape[-2:]
    gh, gw = grid_shape(height, width, cell)
    n = gh * gw
    starts: dict[frozenset[int], Candidate] = {}  # the first grid candidate of each cell set (the search's own)
    for c in grid:
        if c.settings["scope"] == "set" and c.settings["cell"] == cell and c.masks.ndim == 2:
            starts.setdefault(_visible(c.masks, cell), c)
    made: dict[frozenset[int], Candidate] = {}
    family = "cells" if params.masks.strategy == "saliency" else "random"

    def candidate(cells: frozenset[int]) -> Candidate:
        if cells in starts:
            return starts[cells]
        if cells not in made:
            visible = np.zeros(n, dtype=np.uint8)
            visible[sorted(cells)] = 1
            settings = {
                "scope": "set",
                "cell": cell,
                "hidden_ratio": (n - len(cells)) / n,
                "hidden_ratio_requested": (n - len(cells)) / n,
                "template": None,
                "cells": sorted(cells),
            }
            name = f"{family} c{cell} " + "+".join(map(str, sorted(cells)))
            made[cells] = fixed(name, settings, expand(visible.reshape(gh, gw), height, width, cell), None)
        return made[cells]

    def score(sets: list[frozenset[int]]) -> list[tuple[float, Scores]]:
        batch = [candidate(s) for s in sets]
        for c, u in zip(batch, measures.utilities(batch), strict=True):
            c.utility, c.screen = u, measures.screen(c)
        return [(c.utility, c.screen) for c in batch]

    most = measures.family.most_visible[cell]
    if params.masks.strategy == "saliency":
        beam = params.masks.search.cellsets.beam
        cellsets.beam_search(n, score, admitted, starts=starts, width=beam, budget=share, most_visible=most)
    else:
        rng = np.random.default_rng([params.seed, CELLSET_STREAM, cell])
        drawn = [frozenset(rng.choice(n, rng.integers(1, most + 1), replace=False).tolist()) for _ in range(share)]
        score([s for s in dict.fromkeys(drawn) if s not in starts][: max(0, share - len(starts))])
    log.info("cell sets of %d pixels: %d scored beyond the grid", cell, len(made))
    return list(made.values())


def _visible(mask: np.ndarray, cell: int) -> frozenset[int]:
    """The visible cells of a set mask, as indices into its cell grid (row by row)."""
    height, width = mask.shape
    gh, gw = grid_shape(height, width, cell)
    padded = np.zeros((gh * cell, gw * cell), dtype=np.uint8)
    padded[:height, :width] = mask
    return frozenset(np.flatnonzero(padded.reshape(gh, cell, gw, cell).max(axis=(1, 3))).tolist())


def _record(result, params: Params, measures: Measures, amortized: bool) -> dict[str, Any]:
    """The search's record, and for amortized scoring the trade-off and the random counterpart's utility."""
    record = {"scoring": "amortized" if amortized else "trained", **result.record()}
    if not amortized:
        return record
    table = tradeoff.rows(
        result.candidates,
        result.chosen,
        result.limits,
        chance=measures.chance,
        levels=_levels(params),
        gate_level=params.attack.thresholds.max_linkage_x_chance,
        strength=result.calibration,
        base=result.base,
    )
    record["tradeoff"] = table
    record["linkage_within_class_chance"] = measures.chance
    record["cost"] = tradeoff.cost_sentence(table)
    if result.chosen is not None:
        settings = result.chosen.settings
        height, width = measures.train.images.shape[-2:]
        mask = (
            random_masks(None, height, width, settings["cell"], settings["hidden_ratio_requested"], params.seed)
            if settings["scope"] == "set"
            else None
        )
        if mask is not None:
            record["random_utility"] = measures.utilities([fixed("random", settings, mask, None)])[0]
    return record
