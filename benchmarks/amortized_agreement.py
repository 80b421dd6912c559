"""Does amortized scoring order the candidates as per-candidate training does?

Per seed: the pipeline's ingest and reference stages in a temporary workspace, then the mask search's
candidates (the grid of masks.search, and seeded random cell sets of the candidate family until there are
--candidates of them) scored three ways on the same train split:
- trained: each candidate trains its own utility model and screen attacker (masks.search.scoring = trained);
- amortized: one utility model (a MaskNet reading the mask) and one screen attacker, each trained once on
  masks drawn from the family (masks.search.scoring = amortized, the default);
- amortized without the mask channel: the shared utility model reads the masked image only.
Prints, per score, the Spearman correlation of the amortized values with the trained ones and the share
of candidate pairs the two put in the same order (pairs the trained values tie are left out), the
wall seconds of each, and whether the mask channel helps. Every setting not given comes from --params.

    python benchmarks/amortized_agreement.py --candidates 30
    python benchmarks/amortized_agreement.py --source fashion-mnist --path DIR --split 0.06,0.02,0.02
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from desensitize.attack.gate import GATED, excess
from desensitize.config import parse_params
from desensitize.data.splits import read_manifest, split_shards
from desensitize.learning.checkpoints import load_checkpoint
from desensitize.masking.grid import expand, grid_shape
from desensitize.paths import Paths
from desensitize.runtime.device import best_device
from desensitize.search.amortized import AmortizedMeasures, Family
from desensitize.search.candidates import candidates, fixed, scan_train
from desensitize.search.measures import Measures
from desensitize.stages.ingest import ingest
from desensitize.stages.reference import train_reference
from desensitize.stats import spearman

RANDOM_STREAM = 41


def pairs_alike(a: list[float], b: list[float]) -> float | None:
    """Share of pairs ordered alike by a and b, over the pairs b does not tie."""
    pairs = [(i, j) for i in range(len(a)) for j in range(i + 1, len(a)) if b[i] != b[j]]
    return sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs) / len(pairs) if pairs else None


def pool(params, paths: Paths, device, count: int):
    """The grid's candidates, then seeded random family cell sets up to `count` candidates."""
    manifest = read_manifest(paths.raw)
    _, height, width = manifest["image_shape"]
    train = split_shards(paths.raw, "train")
    model, _ = load_checkpoint(paths.reference_model, device)
    stats, maps, mean, _ = scan_train(params, train, model, device)
    found = candidates(params.masks, train, (height, width), params.seed, stats=stats, maps=maps)
    family = Family.of(params, (height, width))
    rng = np.random.default_rng([params.seed, RANDOM_STREAM])
    seen = {c.masks.tobytes() for c in found}
    while len(found) < count:
        mask = family.draw(1, rng)[0]
        if mask.tobytes() in seen:
            continue
        seen.add(mask.tobytes())
        cell = next(c for c in sorted(family.most_visible) if _whole_cells(mask, c))
        gh, gw = grid_shape(height, width, cell)
        hidden = gh * gw - int(mask[::cell, ::cell].sum())
        settings = {"scope": "set", "cell": cell, "hidden_ratio": hidden / (gh * gw), "template": None}
        found.append(fixed(f"random c{cell} #{len(found)}", settings, mask, None))
    return found, train, manifest["class_names"], mean, model


def _whole_cells(mask: np.ndarray, cell: int) -> bool:
    height, width = mask.shape
    gh, gw = grid_shape(height, width, cell)
    cells = np.zeros((gh * cell, gw * cell), dtype=np.uint8)
    cells[:height, :width] = mask
    return bool((expand(cells[::cell, ::cell], height, width, cell) == mask).all())


def score(measures, found) -> tuple[list[float], list[dict[str, float]], float]:
    start = time.perf_counter()
    utilities = [measures.utility(c) for c in found]
    screens = [measures.screen(c) for c in found]
    return utilities, screens, time.perf_counter() - start


def compare(name: str, reference: tuple, other: tuple, limits: dict[str, float]) -> list[str]:
    (u0, s0, _), (u1, s1, _) = reference, other
    rows = [("utility", u0, u1)]
    rows += [(score, [s[score] for s in s0], [s[score] for s in s1]) for score in GATED]
    rows.append(("screen excess over the gate", [excess(s, limits) for s in s0], [excess(s, limits) for s in s1]))
    out = []
    for label, a, b in rows:
        rho, alike = spearman(b, a), pairs_alike(b, a)
        out.append(
            f"| {name} | {label} | {'-' if rho is None else f'{rho:.2f}'} | "
            f"{'-' if alike is None else f'{alike:.0%}'} |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=int, default=30, help="At least this many (the grid, then random sets).")
    parser.add_argument("--source", help="data.source (default: the params file's)")
    parser.add_argument("--path", help="data.path")
    parser.add_argument("--split", help="data.split as train,test,public fractions")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    raw = yaml.safe_load(args.params.read_text())
    raw["seed"] = args.seed
    if args.source:
        raw["data"]["source"] = args.source
    if args.path:
        raw["data"]["path"] = args.path
    if args.split:
        raw["data"]["split"] = dict(zip(("train", "test", "public"), map(float, args.split.split(",")), strict=True))
    params = parse_params(raw)
    device = best_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = Paths(Path(tmp))
        ingest(params, paths)
        train_reference(params, paths, device=str(device))
        found, train, class_names, mean, model = pool(params, paths, device, args.candidates)
        print(f"{len(found)} candidates on {raw['data']['source']}, seed {args.seed}", flush=True)
        common = (paths, train, class_names, mean, model, device)
        trained = score(Measures(params, *common), found)
        print(f"trained: {trained[2]:.0f} s", flush=True)
        amortized = score(AmortizedMeasures(params, *common), found)
        print(f"amortized: {amortized[2]:.0f} s (training both models included)", flush=True)
        blind = copy.deepcopy(raw)
        blind["masks"]["search"].setdefault("amortized", {})["mask_channel"] = False
        no_channel = AmortizedMeasures(parse_params(blind), *common)
        start = time.perf_counter()
        no_channel_utility = [no_channel.utility(c) for c in found]
        print(f"amortized without the mask channel: {time.perf_counter() - start:.0f} s (utility only)", flush=True)
        limits = Measures(params, *common).limits
    print()
    print("| scoring | score | Spearman with trained | pairs ordered alike |")
    print("|---|---|---|---|")
    for line in compare("amortized", trained, amortized, limits):
        print(line)
    rho, alike = spearman(no_channel_utility, trained[0]), pairs_alike(no_channel_utility, trained[0])
    print(f"| amortized, no mask channel | utility | {rho:.2f} | {alike:.0%} |")
    print()
    print(f"seconds: trained {trained[2]:.0f}, amortized {amortized[2]:.0f} ({trained[2] / amortized[2]:.1f}x)")


if __name__ == "__main__":
    main()
