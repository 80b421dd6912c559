"""A beam search over the cells a set-scope mask keeps visible, for one cell grid.

With a candidate costing inference only (desensitize.search.amortized), the search can look at the
cell sets between the templates instead of a few of them. Every single cell is scored, and every start
(the grid's masks: templates and random draws); then, size by size, the `width` most useful sets that
each privacy level admits (the gate's, and the looser levels of the trade-off) grow by one cell, taken
from the cells that are the most useful on their own and admitted at the loosest level, until the
budget of scored sets is spent or no set of a size is admitted anywhere. What a level admits is the
caller's to say (the calibrated screen, desensitize.search.gated); a set is only ever proposed here:
the full gate decides.

Pure: the scores come from `score`, so a toy problem with a known best set tests the search itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

Cells = frozenset[int]
Score = tuple[float, Any]  # (utility, privacy scores)
GROWTH = 4  # a set grows by the GROWTH x width cells that are the most useful on their own


def beam_search(
    n_cells: int,
    score: Callable[[list[Cells]], list[Score]],
    levels: Sequence[Callable[[Any], bool]],
    *,
    starts: Iterable[Cells] = (),
    width: int,
    budget: int,
    most_visible: int,
) -> dict[Cells, Score]:
    """Every set scored, with its score: at most `budget` sets of 1 to `most_visible` cells (of
    `n_cells`), each keeping at least one cell hidden. `score(sets)` scores a batch; `levels`: whether
    a set's privacy scores are admitted at each privacy level."""
    scored: dict[Cells, Score] = {}
    most_visible = min(most_visible, n_cells - 1)

    def run(sets: Iterable[Cells]) -> None:
        new = [s for s in dict.fromkeys(sets) if s not in scored and 0 < len(s) <= most_visible]
        new = new[: max(0, budget - len(scored))]
        if new:
            scored.update(zip(new, score(new), strict=True))

    run([frozenset({c}) for c in range(n_cells)])
    run(frozenset(s) for s in starts)
    admitted_anywhere = [c for c in range(n_cells) if any(ok(scored[frozenset({c})][1]) for ok in levels)]
    growth = sorted(admitted_anywhere, key=lambda c: (-scored[frozenset({c})][0], c))[: GROWTH * width]
    for size in range(1, most_visible):
        if len(scored) >= budget:
            break
        beam: dict[Cells, None] = {}
        for ok in levels:
            admitted = [s for s, (_, privacy) in scored.items() if len(s) == size and ok(privacy)]
            beam.update(dict.fromkeys(sorted(admitted, key=lambda s: (-scored[s][0], sorted(s)))[:width]))
        if not beam:
            break
        run(s | {c} for s in beam for c in growth if c not in s)
    return scored
