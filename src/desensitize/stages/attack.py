"""The `attack` stage, the privacy gate: attack the release before anything is trained on it.

Every attacker tries to restore the hidden pixels of a seeded sample of released `train` images,
knowing the mask and the labels (a release carries both); the reconstructions are scored against
the raw originals over hidden pixels only, each score with its confidence interval. (Where the mask
search already ran this suite on the released candidate, the same inputs find its result in the
attack cache.) Comparisons with random masks are made at equal privacy by the mask search and the
sweep, not here at equal area. The gate passes only if
every attacker stays under every threshold with the upper end of its interval (and, for the learned
attacker, what more attacker data would add); otherwise the stage exits non-zero (unless
`attack.enforce` is false, which is recorded as an override).

Recognition recovery is read through the reference model: if that model is not clearly above chance
on the raw test images (desensitize.stats.above_chance), a recovery near zero proves nothing, and
the gate's message and report say so.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from desensitize import stats
from desensitize.attack import gate, inpainting, scores
from desensitize.attack.cache import cached_attack_suite
from desensitize.attack.suite import Target, attacked_sample, attacker_data
from desensitize.bundle.verify import verified_release
from desensitize.config import Params
from desensitize.data.splits import load_split
from desensitize.errors import DesensitizeError
from desensitize.learning.checkpoints import load_checkpoint
from desensitize.learning.training import predict
from desensitize.paths import Paths
from desensitize.release import load_released
from desensitize.reporting.figures import heatmap, image_grid, scaling_curves
from desensitize.reporting.records import write_results
from desensitize.runtime.compute import executor
from desensitize.runtime.device import best_device, to_float
from desensitize.storage import atomic_path

log = logging.getLogger(__name__)


def run_attack(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns the report (desensitize.reporting.records) with each attacker's wall
    time, which goes to the MLflow run only (raises if the gate fails while enforced, after writing
    them)."""
    cfg = params.attack
    info = verified_release(paths.release, paths.raw)
    released = load_released(paths.release, "train")
    raw = load_split(paths.raw, "train")
    public = load_split(paths.raw, "public")
    torch_device = best_device(device)
    model, _ = load_checkpoint(paths.reference_model, torch_device)
    idx = attacked_sample(len(raw.images), cfg.sample, params.seed)
    fill = inpainting.release_fill(info.fill, info.fill_value, params.seed)
    common = {"num_classes": len(raw.class_names), "model": model, "device": torch_device, "seed": params.seed}
    public_set = inpainting.public_data(public.images, public.labels)

    target = Target(released.images[idx], released.masks[idx], raw.images[idx], raw.labels[idx])
    attacker = attacker_data(
        public_set, released.images, released.masks, released.labels, info.scope, cfg.learned.release_data
    )
    # The mask search ran this very suite on the candidate it released (same inputs, same digest): its
    # result is reused, and the metrics say so.
    with executor(params.compute) as ex:
        release = cached_attack_suite(paths.attack_cache, target, attacker, fill, cfg, **common, ex=ex)

    test = load_split(paths.raw, "test")
    reference = stats.above_chance(int((predict(model, test.images, torch_device) == test.labels).sum()), test.labels)
    verdict = gate.verdict(release, enforce=cfg.enforce, budget=cfg.assumed_attacker_images, reference=reference)
    best = release["best_attacker"]
    truth = to_float(raw.images[idx]).numpy()
    cells = scores.cell_restoration(
        release["reconstructions"][best],
        release["reconstructions"][release["best_blind"]],
        truth,
        released.masks[idx],
        info.cell,
    )
    metrics = {
        "sample": len(idx),
        "reused_from_search": release["cached"],
        "confidence": cfg.confidence,
        "linkage_chance": release["linkage_chance"],
        "linkage_within_class_chance": release["linkage_within_class_chance"],
        # within-class galleries (and their chance) are of the classes the sample holds
        "sample_classes": stats.class_coverage(raw.labels[idx], raw.class_names),
        "attackers": release["attackers"],
        "blind": release["blind"],
        "best_blind": release["best_blind"],
        "best_attacker": best,
        "learned": release["learned"],
        "hidden_information": release["hidden_information"],
        "reference_raw_test": reference,
        "mask": info.model_dump(include={"strategy", "method", "scope", "hidden_ratio", "cell", "fill"}),
        "gate": verdict,
    }
    _report(paths, metrics, release, raw.images[idx], released.images[idx], cells)
    report = _without_timings(metrics)
    write_results(paths, "attack", report, headline(report))
    log.log(logging.INFO if reference["above"] else logging.WARNING, "%s", verdict["message"])
    if not verdict["passed"] and cfg.enforce:
        raise DesensitizeError(verdict["message"])
    return metrics


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """metrics/attack.json: the verdict, the strongest attacker, and per gated score what the gate compared
    with its threshold (the highest judged value over the attackers) beside the threshold (`_max`)."""
    worst = gate.judged(report)
    names = dict(zip(gate.GATED, ("psnr_gain", "linkage", "recovery"), strict=True))
    return {
        "gate_passed": report["gate"]["passed"],
        "best_attacker": report["best_attacker"],
        **{
            column: value
            for score, name in names.items()
            for column, value in ((name, worst[score]), (f"{name}_max", report["gate"]["limits"][score]))
        },
    }


def _without_timings(tree: Any) -> Any:
    """The report without the attackers' wall times: the report is a dependency of `register`,
    and a figure that differs between identical runs would rerun it and register a duplicate version."""
    if isinstance(tree, dict):
        return {key: _without_timings(value) for key, value in tree.items() if key != "seconds"}
    if isinstance(tree, list):
        return [_without_timings(value) for value in tree]
    return tree


def _interval(scores: dict[str, Any], key: str, fmt: str) -> str:
    lo, hi = scores[f"{key}_interval"]
    return f"{scores[key]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _report(
    paths: Paths,
    metrics: dict[str, Any],
    release: dict[str, Any],
    raw: np.ndarray,
    released: np.ndarray,
    cells: np.ndarray,
) -> None:
    out = paths.attack_reports
    k = min(8, len(raw))
    rows = [("raw", raw[:k]), ("released", released[:k])]
    rows += [(name, np.rint(r[:k] * 255).astype(np.uint8)) for name, r in release["reconstructions"].items()]
    image_grid(rows, out / "grid.png", "raw / released / each attacker's reconstruction (train sample)")
    heatmap(
        cells,
        out / "cell_restoration.png",
        f"how well {metrics['best_attacker']} restores each cell (1 = exactly, 0 = blind guess)",
        cmap="viridis",
    )
    with atomic_path(out / "cell_restoration.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, cells)
    scaling = (metrics["learned"] or {}).get("scaling")
    if scaling:
        scaling_curves(scaling, metrics["gate"]["limits"], out / "scaling.png")
    level = f"{metrics['confidence']:.0%}"
    lines = [
        "# Inpainting-attack report",
        "",
        f"Mask: {metrics['mask']}. Sample: {metrics['sample']} released train images. Linkage chance: "
        f"{metrics['linkage_chance']:.4f} over all sampled images, {metrics['linkage_within_class_chance']:.4f} "
        f"within each of the {metrics['sample_classes']['present']} classes in the sample"
        + (
            f" (absent from it: {', '.join(repr(name) for name in metrics['sample_classes']['absent'])})"
            if metrics["sample_classes"]["absent"]
            else ""
        )
        + f". Blind reference for PSNR gain: {metrics['best_blind']}.",
        f"Hidden information (share of content under the mask): {metrics['hidden_information']:.3f}."
        + (
            " The mask search ran this suite on this release; its result is reused."
            if metrics["reused_from_search"]
            else ""
        ),
        f"Reference model on raw test images: {metrics['reference_raw_test']['message']}"
        + (
            "."
            if metrics["reference_raw_test"]["above"]
            else ": **too weak for recognition recovery to mean anything** (an attacker's restorations cannot "
            "be recognised by a model that recognises nothing)."
        ),
        "",
        f"Scores with {level} intervals; the gate judges the upper end (for `learned`, plus what the "
        "data-scaling curve projects).",
        "",
        "| attacker | PSNR hidden (dB) | PSNR gain (dB) | linkage within class | linkage all | recognition recovery |"
        " judged: gain / within / recovery |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in {**metrics["blind"], **metrics["attackers"]}.items():
        judged = s.get("judged")
        judged_cell = (
            f"{judged['psnr_gain']:+.2f} / {judged['linkage_within_class']:.3f} / {judged['recognition_recovery']:+.3f}"
            if judged
            else "(blind reference)"
        )
        lines.append(
            f"| {name} | {s['psnr_hidden']:.2f} | {_interval(s, 'psnr_gain', '+.2f')} | "
            f"{_interval(s, 'linkage_within_class', '.3f')} | {_interval(s, 'linkage_top1', '.3f')} | "
            f"{_interval(s, 'recognition_recovery', '+.3f')} | {judged_cell} |"
        )
    learned = metrics["learned"]
    if learned:
        widths = ", ".join(
            f"width {w}: held-out MSE {t['held_out_mse']:.5f} at epoch {t['best_epoch']} of {t['epochs_run']}"
            for w, t in learned["widths"].items()
        )
        lines += ["", f"Learned attacker: width {learned['width']} chosen by held-out loss ({widths})."]
    if scaling:
        lines += ["", "Data scaling of the learned attacker (`scaling.png`):", ""]
        lines += ["| training images | PSNR gain | linkage within class | recognition recovery |", "|---|---|---|---|"]
        for point in scaling["points"]:
            p = point["scores"]
            lines.append(
                f"| {point['images']} | {p['psnr_gain']:+.2f} | {p['linkage_within_class']:.3f} | "
                f"{p['recognition_recovery']:+.3f} |"
            )
        for score, fit in scaling["fits"].items():
            state = (
                "flat" if fit["flat"] else f"grows; +{fit['added']:.4g} by {scaling['assumed_attacker_images']} images"
            )
            lines.append(f"\n{score}: {fit['slope_per_doubling']:+.4g} per doubling of the data ({state}).")
    lines += [
        "",
        f"Strongest attacker: **{metrics['best_attacker']}**; `cell_restoration.png` shows which cells it restores.",
        "",
        f"**{metrics['gate']['message']}**",
        "",
    ]
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines))
