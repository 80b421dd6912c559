"""The `attack` stage, the privacy gate: attack the release before anything is trained on it.

Every attacker tries to restore the hidden pixels of a seeded sample of released `train`
images; the reconstructions are scored against the raw originals (hidden pixels only). The same
suite runs on a seeded `random` mask of the same ratio and grid, for comparison. The gate passes
only if every attacker stays under every threshold; otherwise the stage exits non-zero (unless
`attack.enforce` is false, which is recorded as an override).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from desensitize import privacy
from desensitize.attack_suite import attack_suite, sample_indices
from desensitize.checkpoints import load_checkpoint
from desensitize.config import Params
from desensitize.errors import DesensitizeError
from desensitize.paths import Paths
from desensitize.release import load_released, random_release_of, read_release_info
from desensitize.reports import heatmap, image_grid
from desensitize.splits import load_split
from desensitize.storage import atomic_path, write_json
from desensitize.training import best_device, to_float

log = logging.getLogger(__name__)


def run_attack(params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run the stage; returns the metrics written to `metrics/attack.json` (raises if the gate fails
    while enforced, after writing them)."""
    cfg = params.attack
    info = read_release_info(paths.release)
    released = load_released(paths.release, "train")
    raw = load_split(paths.raw, "train")
    public = load_split(paths.raw, "public").images
    torch_device = best_device(device)
    model, _ = load_checkpoint(paths.reference_model, torch_device)

    idx = sample_indices(len(raw.images), cfg.sample, params.seed)
    raw_sample, labels = raw.images[idx], raw.labels[idx]
    release = attack_suite(
        released.images[idx],
        released.masks[idx],
        raw_sample,
        labels,
        public,
        info.fill,
        info.fill_value,
        params,
        model,
        torch_device,
    )

    # The comparison: a seeded random mask of the same ratio, grid, scope and fill.
    rand = random_release_of(info, {"train": raw}, params.seed)["train"]
    random = attack_suite(
        rand.images[idx],
        rand.masks[idx],
        raw_sample,
        labels,
        public,
        info.fill,
        info.fill_value,
        params,
        model,
        torch_device,
    )

    verdict = privacy.gate(release["attackers"], cfg.thresholds)
    verdict["enforced"] = cfg.enforce
    verdict["overridden"] = not verdict["passed"] and not cfg.enforce
    verdict["message"] = _message(verdict)
    best = release["best_attacker"]
    cells = privacy.cell_restoration(
        release["reconstructions"][best],
        release["reconstructions"]["mean_fill"],
        to_float(raw_sample).numpy(),
        released.masks[idx],
        info.cell,
    )
    metrics = {
        "sample": len(idx),
        "linkage_chance": release["linkage_chance"],
        "attackers": release["attackers"],
        "mean_fill": release["mean_fill"],
        "best_attacker": best,
        "hidden_information": release["hidden_information"],
        "mask": info.model_dump(include={"strategy", "method", "scope", "hidden_ratio", "cell", "fill"}),
        "random_mask": {k: random[k] for k in ("attackers", "mean_fill", "best_attacker", "hidden_information")},
        "gate": verdict,
    }
    _report(paths, metrics, release, raw_sample, released.images[idx], cells)
    write_json(paths.attack_metrics, metrics)
    log.info("%s", verdict["message"])
    if not verdict["passed"] and cfg.enforce:
        raise DesensitizeError(verdict["message"])
    return metrics


def _message(verdict: dict[str, Any]) -> str:
    if verdict["passed"]:
        return "privacy gate passed: every attacker stays under every threshold"
    broken = "; ".join(
        f"{v['attacker']} {v['score']} {v['value']:.4g} > {v['threshold']:g}" for v in verdict["violations"]
    )
    tail = (
        "overridden by attack.enforce: false, the pipeline goes on"
        if verdict["overridden"]
        else "release blocked; change the mask (masks.*) or the thresholds (attack.thresholds), "
        "or set attack.enforce: false to record the failure and go on"
    )
    return f"privacy gate FAILED: {broken} ({tail})"


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
    lines = [
        "# Inpainting-attack report",
        "",
        f"Mask: {metrics['mask']}. Sample: {metrics['sample']} released train images; "
        f"linkage chance 1/{metrics['sample']} = {metrics['linkage_chance']:.4f}.",
        f"Hidden information (share of content under the mask): {metrics['hidden_information']:.3f} "
        f"(random mask of the same ratio: {metrics['random_mask']['hidden_information']:.3f}).",
        "",
        "| attacker | PSNR hidden (dB) | PSNR gain (dB) | SSIM hidden | linkage top-1 | recognition recovery |"
        " random mask: PSNR gain | random mask: linkage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in {"mean_fill": metrics["mean_fill"], **metrics["attackers"]}.items():
        r = metrics["random_mask"]["attackers"].get(name, metrics["random_mask"]["mean_fill"])
        lines.append(
            f"| {name} | {s['psnr_hidden']:.2f} | {s['psnr_gain']:+.2f} | {s['ssim_hidden']:.3f} | "
            f"{s['linkage_top1']:.3f} | {s['recognition_recovery']:+.3f} | {r['psnr_gain']:+.2f} | "
            f"{r['linkage_top1']:.3f} |"
        )
    lines += ["", f"Best attacker: **{metrics['best_attacker']}**.", "", f"**{metrics['gate']['message']}**", ""]
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines))
