"""Attack strength: is the gate's learned attacker the strongest of its class?

On a landed release (data/raw, data/release, models/reference.npz of a checkout, default: here),
trains the gate's U-Net attacker (image, mask and label in) at each --widths for each budget:
fixed --epochs (the last epoch's weights) and `converged` (the gate's protocol: until the held-out
loss stops improving for attack.learned.patience epochs, best epoch kept), on --shares of the
attacker's images; --extra test adds the raw test split to the attacker's images (a better-supplied
attacker than the pipeline assumes). Every row is scored like the gate scores (same sample, blind
reference, gallery, intervals). Prints one table, the strongest row, and whether the gate's own
attacker (reports/attack/report.json: the chosen width, converged, all public images) is within the
interval of the strongest; writes the rows to --out (CSV). Settings not given come from --params.

    python benchmarks/attack_strength.py --widths 16,32,64 --epochs 20,100,300 --shares 0.25,0.5,1
    python benchmarks/attack_strength.py --widths 16,32 --epochs 20 --shares 1 --extra test
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from desensitize.attack import inpainting
from desensitize.attack.inpainting import AttackerData, public_data
from desensitize.attack.suite import Scorer, Target, sample_indices, share_of, split_attacker_data
from desensitize.config import load_params
from desensitize.data.splits import load_split
from desensitize.learning.checkpoints import load_checkpoint
from desensitize.paths import Paths
from desensitize.release import load_released, read_release_info
from desensitize.runtime.device import best_device


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="checkout with a landed release")
    parser.add_argument("--params", type=Path, default=None, help="params file (default: ROOT/params.yaml)")
    parser.add_argument("--widths", default="16,32,64")
    parser.add_argument("--epochs", default="20,100,300", help="fixed budgets; `converged` always runs")
    parser.add_argument("--shares", default="0.25,0.5,1", help="shares of the attacker's training images")
    parser.add_argument("--extra", choices=["none", "test"], default="none", help="add the raw test split")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=Path("reports/attack_strength.csv"))
    args = parser.parse_args()

    paths = Paths(args.root)
    params = load_params(args.params or paths.params_file)
    cfg, seed = params.attack, params.seed
    device = best_device(args.device)
    info = read_release_info(paths.release)
    released = load_released(paths.release, "train")
    raw = load_split(paths.raw, "train")
    public = load_split(paths.raw, "public")
    model, _ = load_checkpoint(paths.reference_model, device)
    idx = sample_indices(len(raw.images), cfg.sample, seed)
    target = Target(released.images[idx], released.masks[idx], raw.images[idx], raw.labels[idx])
    attacker = public_data(public.images, public.labels)
    if args.extra == "test":
        test = load_split(paths.raw, "test")
        attacker = AttackerData.join([attacker, public_data(test.images, test.labels)])
    num_classes = len(raw.class_names)
    score = Scorer(target, attacker, cfg, num_classes=num_classes, model=model, device=device, seed=seed)
    fill = inpainting.release_fill(info.fill, info.fill_value, seed)
    train, held_out = split_attacker_data(attacker, cfg.learned.holdout, seed)

    rows = []
    budgets: list[int | None] = [*_ints(args.epochs), None]
    for share in [float(x) for x in args.shares.split(",") if x]:
        part = share_of(train, share, seed)
        for width in _ints(args.widths):
            for epochs in budgets:
                start = time.perf_counter()
                trained = inpainting.train_learned(
                    part,
                    held_out,
                    target.masks,
                    fill,
                    cfg.learned,
                    width=width,
                    num_classes=num_classes,
                    seed=seed,
                    device=device,
                    epochs=epochs,
                )
                out = inpainting.learned(trained.model, target.released, target.masks, target.labels, device)
                s = score(out)
                rows.append(
                    {
                        "images": len(part.images),
                        "width": width,
                        "budget": "converged" if epochs is None else epochs,
                        "epochs_run": len(trained.curve),
                        "best_epoch": trained.best_epoch,
                        "held_out_mse": trained.held_out_mse,
                        "psnr_gain": s["psnr_gain"],
                        "psnr_gain_high": s["psnr_gain_interval"][1],
                        "linkage_within_class": s["linkage_within_class"],
                        "linkage_within_class_high": s["linkage_within_class_interval"][1],
                        "linkage_top1": s["linkage_top1"],
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                )
                print(_line(rows[-1]), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"\ndevice {device}; sample {len(idx)}; blind reference {score.best_blind}; within-class chance "
        f"{score.linkage_within_class_chance:.4f}; attacker images {len(attacker.images)} "
        f"(held out {len(held_out.images)})"
    )
    print(
        "| images | width | budget | epochs run | held-out MSE | PSNR gain (high) | linkage within class (high) "
        "| linkage all | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_line(row))
    strongest = max(rows, key=lambda r: (r["psnr_gain"], r["linkage_within_class"]))
    print(f"\nstrongest: {_line(strongest)}")
    attack_json = paths.report("attack")
    if attack_json.is_file():
        gate = json.loads(attack_json.read_text())["attackers"].get("learned")
        if gate:
            within = gate["psnr_gain_interval"][1] >= strongest["psnr_gain"] and (
                gate["linkage_within_class_interval"][1] >= strongest["linkage_within_class"]
            )
            print(
                f"gate's attacker (reports/attack/report.json): PSNR gain {gate['psnr_gain']:+.2f} "
                f"(high {gate['psnr_gain_interval'][1]:+.2f}), linkage within class {gate['linkage_within_class']:.3f} "
                f"(high {gate['linkage_within_class_interval'][1]:.3f}): "
                + ("within the interval of the strongest row" if within else "BEATEN beyond its interval")
            )


def _line(r: dict) -> str:
    return (
        f"| {r['images']} | {r['width']} | {r['budget']} | {r['epochs_run']} | {r['held_out_mse']:.5f} | "
        f"{r['psnr_gain']:+.2f} ({r['psnr_gain_high']:+.2f}) | {r['linkage_within_class']:.3f} "
        f"({r['linkage_within_class_high']:.3f}) | {r['linkage_top1']:.3f} | {r['seconds']} |"
    )


if __name__ == "__main__":
    main()
