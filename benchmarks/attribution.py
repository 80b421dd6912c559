"""Attribution throughput: the batched path against a naive loop of one captum call per image.

For every method: images/s of `desensitize.masking.attribution.attribution_maps` (one captum call per
batch) and of a loop that calls the same captum algorithm once per image, on the same model and
images, in one run, and their ratio. For integrated_gradients also its time divided by the time
of `ig_steps` plain forward+backward passes over the same images (its compute floor).

    python benchmarks/attribution.py                  # CPU (or CUDA when present)
    python benchmarks/attribution.py --device cuda --images 2048
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from desensitize.config import ATTRIBUTION_METHODS, AttributionParams, DataParams
from desensitize.data.sources import load_source
from desensitize.masking.attribution import attribution_maps, explainer, normalise
from desensitize.models import build_backbone
from desensitize.runtime.device import batch_to, best_device, on_device, to_float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def naive(model, images, targets, cfg: AttributionParams, device: torch.device) -> None:
    """One captum call per image; IG gets all its steps for that image in one pass."""
    baselines = torch.cat([torch.zeros_like(images[:1]), images.mean(0, keepdim=True)]).to(device)
    algorithm, kwargs, _ = explainer(model, cfg, 1, baselines)
    # Per-image calls as a user would write them: every sample / step / perturbation of the image in one pass.
    if cfg.method == "integrated_gradients":
        kwargs["internal_batch_size"] = cfg.ig_steps
    if cfg.method == "occlusion":
        kwargs["perturbations_per_eval"] = 256
    for i in range(len(images)):
        x = batch_to(images[i : i + 1], device).requires_grad_(cfg.method != "occlusion")
        attr = algorithm.attribute(x, target=targets[i : i + 1].to(device), **kwargs)
        normalise(attr.detach(), tuple(images.shape[-2:])).cpu()  # the same maps as the batched path


def forward_backward_floor(model, images, targets, steps: int, batch_size: int, device: torch.device) -> None:
    """The compute IG cannot avoid: `steps` forward+backward passes over every image, in full batches."""
    images, targets = images.repeat(steps, 1, 1, 1), targets.repeat(steps)
    for start in range(0, len(images), batch_size):
        x = batch_to(images[start : start + batch_size], device).requires_grad_()
        y = targets[start : start + batch_size].to(device)
        out = model(x).gather(1, y[:, None]).sum()
        torch.autograd.grad(out, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--images", type=int, default=128, help="MNIST-5k images to attribute")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--ig-steps", type=int, default=32)
    parser.add_argument("--methods", nargs="+", default=list(ATTRIBUTION_METHODS), choices=ATTRIBUTION_METHODS)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    device = best_device(args.device)
    source = load_source(DataParams(source="mnist5k"))
    images = to_float(source.images[: args.images])
    targets = torch.as_tensor(source.labels[: args.images])
    torch.manual_seed(0)
    model = on_device(build_backbone("small_cnn", 1, 10), device).eval()  # timings do not depend on the weights

    rows = []
    for method in args.methods:
        cfg = AttributionParams(method=method, ig_steps=args.ig_steps)
        attribution_maps(model, images[:8], targets[:8], cfg, device=device, seed=0)  # warm-up
        batched = timed(
            lambda cfg=cfg: attribution_maps(
                model, images, targets, cfg, device=device, seed=0, batch_size=args.batch_size
            ),
            device,
        )
        loop = timed(lambda cfg=cfg: naive(model, images, targets, cfg, device), device)
        row = {
            "method": method,
            "batched_images_per_s": len(images) / batched,
            "naive_images_per_s": len(images) / loop,
            "speedup": loop / batched,
        }
        if method == "integrated_gradients":
            floor = timed(
                lambda: forward_backward_floor(model, images, targets, args.ig_steps, args.batch_size, device), device
            )
            row["time_over_floor"] = batched / floor
        rows.append(row)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"attribution benchmark: {len(images)} MNIST images, small_cnn, batch {args.batch_size}, {name}")
    print(f"{'method':<22}{'batched img/s':>15}{'naive img/s':>13}{'speedup':>9}{'IG time/floor':>15}")
    for row in rows:
        floor = f"{row['time_over_floor']:.2f}" if "time_over_floor" in row else "-"
        print(
            f"{row['method']:<22}{row['batched_images_per_s']:>15.1f}{row['naive_images_per_s']:>13.1f}"
            f"{row['speedup']:>8.1f}x{floor:>15}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "images": len(images), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
