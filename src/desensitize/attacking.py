"""The `attack` stage, the privacy gate: attack the release before anything is trained on it.

Every attacker tries to restore the hidden pixels of a seeded sample of released `train`
images; the reconstructions are scored against the raw originals (hidden pixels only). The same
suite runs on a seeded `random` mask of the same ratio and grid, for comparison. The gate passes
only if every attacker stays under every threshold; otherwise the stage exits non-zero (unless
`attack.enforce` is false, which is recorded as an override).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from desensitize import attacks, privacy
from desensitize.config import Params
from desensitize.errors import DesensitizeError
from desensitize.ingest import load_split
from desensitize.masking import like_release, random_counterpart
from desensitize.models import load_checkpoint
from desensitize.paths import Paths
from desensitize.release import load_released, read_release_info
from desensitize.reports import heatmap, image_grid
from desensitize.storage import atomic_path, write_json
from desensitize.training import best_device, predict, to_float

log = logging.getLogger(__name__)
SAMPLE_STREAM = 11


def attack_suite(
    released: np.ndarray,
    masks: np.ndarray,
    raw: np.ndarray,
    labels: np.ndarray,
    public: np.ndarray,
    fill: dict[str, Any],
    params: Params,
    model: torch.nn.Module,
    device: torch.device,
) -> dict[str, Any]:
    """Run every configured attacker on (released, masks); score against raw (uint8 arrays)."""
    cfg = params.attack
    truth = to_float(raw).numpy()
    public_mean = to_float(public).mean(dim=0).numpy()

    def accuracy(images: np.ndarray) -> float:
        return float((predict(model, images, device) == labels).mean())

    released_accuracy = accuracy(released)
    reconstructions: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name in ("mean_fill", *cfg.attackers):
        start = time.perf_counter()
        if name == "mean_fill":
            out = attacks.mean_fill(released, masks, public_mean)
        elif name == "learned":
            fill_fn = attacks.release_fill(fill["fill"], fill["fill_value"], params.seed)
            unet = attacks.train_learned(public, masks, fill_fn, cfg.learned, seed=params.seed, device=device)
            out = attacks.learned(unet, released, masks, device)
        else:
            out = attacks.classical(name, released, masks, cfg.inpaint_radius)
        seconds[name] = time.perf_counter() - start
        reconstructions[name] = out

    blind_psnr = privacy.psnr_hidden(reconstructions["mean_fill"], truth, masks)
    scores = {}
    for name, out in reconstructions.items():
        psnr = privacy.psnr_hidden(out, truth, masks)
        scores[name] = {
            "psnr_hidden": psnr,
            "psnr_gain": psnr - blind_psnr,
            "ssim_hidden": privacy.ssim_hidden(out, truth, masks),
            "linkage_top1": privacy.linkage_top1(out, truth, masks),
            "recognition_recovery": accuracy(out) - released_accuracy,
            "seconds": round(seconds[name], 2),
        }
    attackers = {name: s for name, s in scores.items() if name != "mean_fill"}
    best = max(attackers, key=lambda name: (attackers[name]["psnr_gain"], attackers[name]["linkage_top1"]))
    return {
        "attackers": attackers,
        "mean_fill": scores["mean_fill"],
        "best_attacker": best,
        "hidden_information": privacy.hidden_information(truth, masks, truth.mean(axis=0)),
        "linkage_chance": 1 / len(raw),
        "reconstructions": reconstructions,
    }


def sample_indices(n: int, sample: int, seed: int) -> np.ndarray:
    """The released train images attacked: a seeded sample, sorted (MLflow logs its digest)."""
    return np.sort(np.random.default_rng([seed, SAMPLE_STREAM]).choice(n, min(sample, n), replace=False))


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
    fill = {"fill": info["fill"], "fill_value": info["fill_value"]}
    release = attack_suite(
        released.images[idx], released.masks[idx], raw_sample, labels, public, fill, params, model, torch_device
    )

    # The comparison: a seeded random mask of the same ratio, grid, scope and fill.
    fill_value = np.asarray(info["fill_value"], dtype=np.uint8)
    rand = random_counterpart(like_release(info), {"train": raw}, fill_value, params.seed)["train"]
    random = attack_suite(
        rand.images[idx], rand.masks[idx], raw_sample, labels, public, fill, params, model, torch_device
    )

    verdict = privacy.gate(release["attackers"], cfg.thresholds)
    verdict["enforced"] = cfg.enforce
    verdict["overridden"] = not verdict["passed"] and not cfg.enforce
    verdict["message"] = _message(verdict)
    best = release["best_attacker"]
    cells = privacy.cell_restoration(
        release["reconstructions"][best], release["reconstructions"]["mean_fill"],
        to_float(raw_sample).numpy(), released.masks[idx], info["cell"],
    )  # fmt: skip
    metrics = {
        "sample": len(idx),
        "linkage_chance": release["linkage_chance"],
        "attackers": release["attackers"],
        "mean_fill": release["mean_fill"],
        "best_attacker": best,
        "hidden_information": release["hidden_information"],
        "mask": {k: info[k] for k in ("strategy", "method", "scope", "hidden_ratio", "cell", "fill")},
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
    heatmap(cells, out / "cell_restoration.png",
            f"how well {metrics['best_attacker']} restores each cell (1 = exactly, 0 = blind guess)", cmap="viridis")  # fmt: skip
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
            f"{s['linkage_top1']:.3f} | {s['recognition_recovery']:+.3f} | {r['psnr_gain']:+.2f} | {r['linkage_top1']:.3f} |"
        )
    lines += ["", f"Best attacker: **{metrics['best_attacker']}**.", "", f"**{metrics['gate']['message']}**", ""]
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines))
