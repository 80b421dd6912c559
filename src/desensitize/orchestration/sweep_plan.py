"""The privacy-utility sweep's plan: which points run, with which params.

Fixed points: seed x scope x cell x hidden ratio x strategy, and for set-scope saliency also x
template (mean, class_contrast, mean_spread, restorability; random masks and image-scope saliency
have no template and are not multiplied by them). They run with `masks.privacy = none`: the mask
asked for is released whatever its privacy, and the attack stage only records it. With `searched`,
each seed and scope also gets one point with `masks.template = search` and `masks.privacy = gate`:
the search picks template, cell and hidden ratio itself and releases only a candidate that passes
the privacy gate; when none does (the masks stage raises), the row records the failure and no
accuracies, and the sweep goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

from desensitize.config import Params, parse_params
from desensitize.errors import DesensitizeError

SEARCHED = "saliency/search"  # the family of the searched points


@dataclass(frozen=True)
class Point:
    """One fixed point of the grid (for every seed)."""

    scope: str
    family: str
    strategy: str
    template: str  # masks.template; "mean" where the mask has no template (it is then unused)
    cell: int
    hidden_ratio: float

    @property
    def name(self) -> str:
        return f"{self.family.replace('/', '-')}-{self.scope}-c{self.cell}-{self.hidden_ratio:g}"


def grid(
    scopes: list[str], cells: list[int], ratios: list[float], strategies: list[str], templates: list[str]
) -> list[Point]:
    """The fixed points: scope x cell x ratio x strategy, set-scope saliency also x template."""
    points = []
    for scope in scopes:
        for cell in cells:
            for ratio in ratios:
                for strategy in strategies:
                    if strategy == "saliency" and scope == "set":
                        points += [Point(scope, f"saliency/{t}", strategy, t, cell, ratio) for t in templates]
                    else:
                        family = "saliency/per-image" if strategy == "saliency" else strategy
                        points.append(Point(scope, family, strategy, "mean", cell, ratio))
    return points


def _fixed_params(params: Params, seed: int, point: Point) -> Params:
    masks = params.masks.model_copy(
        update={
            "scope": point.scope,
            "hidden_ratio": point.hidden_ratio,
            "cell": point.cell,
            "strategy": point.strategy,
            "template": point.template,
            "privacy": "none",
        }
    )
    attack = params.attack.model_copy(update={"enforce": False})
    return params.model_copy(update={"seed": seed, "masks": masks, "attack": attack})


def _searched_params(params: Params, seed: int, scope: str) -> Params:
    search = params.masks.search.model_copy(update={"scopes": [scope]})
    masks = params.masks.model_copy(
        update={"scope": scope, "strategy": "saliency", "template": "search", "privacy": "gate", "search": search}
    )
    attack = params.attack.model_copy(update={"enforce": False})
    return params.model_copy(update={"seed": seed, "masks": masks, "attack": attack})


def check_axes(
    *,
    seeds: list[int],
    scopes: list[str],
    ratios: list[float],
    cells: list[int],
    strategies: list[str],
    templates: list[str],
) -> None:
    """Every value of every axis through the params model, before any work: each axis has at least one value
    and none twice; errors name the CLI option."""
    axes = {
        ("--seeds", "seed"): seeds,
        ("--scopes", "scope"): scopes,
        ("--ratios", "hidden_ratio"): ratios,
        ("--cells", "cell"): cells,
        ("--strategies", "strategy"): strategies,
        ("--templates", "template"): templates,
    }
    for (origin, key), values in axes.items():
        if not values:
            raise DesensitizeError(f"{origin}: give at least one value")
        twice = [value for k, value in enumerate(values) if value in values[:k]]
        if twice:
            raise DesensitizeError(f"{origin}: {twice[0]} given twice (each point runs once per value)")
        for value in values:
            parse_params({"seed": value} if key == "seed" else {"masks": {key: value}}, origin=origin)
    if "search" in templates:
        raise DesensitizeError("--templates: search is not a fixed template; the searched point is --searched")


@dataclass(frozen=True)
class Run:
    """One unit of the sweep: a point at one seed (`point` None: the searched point), in its own workspace."""

    name: str
    params: Params
    point: Point | None


def plan(
    params: Params,
    *,
    seeds: list[int],
    scopes: list[str],
    ratios: list[float],
    strategies: list[str],
    templates: list[str] | None = None,
    cells: list[int] | None = None,
    searched: bool = True,
) -> list[Run]:
    """Every run of the sweep, seed by seed. `templates` defaults to [params.masks.template] unless that is
    `search` (then mean), `cells` to [params.masks.cell]."""
    if templates is None:
        templates = [params.masks.template if params.masks.template != "search" else "mean"]
    points = grid(scopes, cells or [params.masks.cell], ratios, strategies, templates)
    runs = []
    for seed in seeds:
        runs += [Run(point.name, _fixed_params(params, seed, point), point) for point in points]
        if searched:
            runs += [Run(f"saliency-search-{scope}", _searched_params(params, seed, scope), None) for scope in scopes]
    return runs
