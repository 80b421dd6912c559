"""Attribution maps with captum: which pixels does the reference model use for each image?

`attribution_maps` runs one captum call per batch (never per image), on the model's device,
and returns `|attr|` summed over channels, normalised so every map sums to 1.
"""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import (
    GradientShap,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    NoiseTunnel,
    Occlusion,
    Saliency,
)
from torch import nn

from desensitize.config import AttributionParams
from desensitize.errors import DesensitizeError
from desensitize.runtime.device import batch_to, on_device, progress, seed_everything


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
        raise DesensitizeError(
            f"masks.attribution.gradcam_layer = {name!r}: no such layer; try one of {', '.join(names)}"
        ) from None


def explainer(
    model: nn.Module, cfg: AttributionParams, batch_size: int, baselines: torch.Tensor
) -> tuple[Any, dict, int]:
    """The captum algorithm for `cfg.method` (in NoiseTunnel when asked), its call arguments, and
    how many images to pass per call so that about `batch_size` images go through the model at once.

    `baselines` is a (K, C, H, W) stack of reference images (GradientShap draws from it).
    """
    channels = baselines.shape[1]
    method = cfg.method
    per_call = batch_size
    if method == "saliency":
        algorithm, kwargs = Saliency(model), {"abs": True}
    elif method == "integrated_gradients":
        # captum runs the n_steps scaled copies of all images in chunks of internal_batch_size.
        algorithm = IntegratedGradients(model)
        kwargs = {"baselines": 0.0, "n_steps": cfg.ig_steps, "internal_batch_size": batch_size}
    elif method == "gradient_shap":
        algorithm = GradientShap(model)
        kwargs = {"baselines": baselines, "n_samples": cfg.shap_samples, "stdevs": 0.1}
        per_call = batch_size // cfg.shap_samples
    elif method == "grad_cam":
        algorithm, kwargs = LayerGradCam(model, resolve_layer(model, cfg.gradcam_layer)), {"relu_attributions": True}
    elif method == "occlusion":
        window, stride = cfg.occlusion_window, cfg.occlusion_stride
        algorithm = Occlusion(model)
        per_call = max(1, batch_size // 16)
        kwargs = {
            "sliding_window_shapes": (channels, window, window),
            "strides": (channels, stride, stride),
            "baselines": 0.0,
            "perturbations_per_eval": max(1, batch_size // per_call),
        }
    else:  # the params model admits only the names above
        raise DesensitizeError(f"masks.attribution.method = {method!r}: unknown")
    if cfg.noise_tunnel:
        kwargs = {
            **kwargs,
            "nt_type": "smoothgrad",
            "nt_samples": cfg.nt_samples,
            "stdevs": cfg.nt_stdev,
            "nt_samples_batch_size": cfg.nt_samples,
        }
        algorithm = NoiseTunnel(algorithm)
        per_call //= cfg.nt_samples
    return algorithm, kwargs, max(1, per_call)


def normalise(attr: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) attributions -> (B, H, W) maps of |attr| summed over channels, each summing to 1."""
    if attr.shape[-2:] != size:  # Grad-CAM works at the layer's resolution
        attr = LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")
    maps = attr.abs().sum(dim=1)
    totals = maps.sum(dim=(1, 2), keepdim=True)
    uniform = torch.full_like(maps, 1.0 / (size[0] * size[1]))
    return torch.where(totals > 0, maps / totals.clamp_min(torch.finfo(maps.dtype).tiny), uniform)


def attribution_maps(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    cfg: AttributionParams,
    *,
    device: torch.device,
    seed: int,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Attribution of every image against its target class: (N, H, W) float32 on the CPU.

    `batch_size` (default: cfg.batch_size) is about how many images, samples or perturbations go
    through the model in one pass.
    """
    batch_size = batch_size or cfg.batch_size
    model = on_device(model, device).eval()
    mean_image = images.float().mean(dim=0, keepdim=True)
    baselines = torch.cat([torch.zeros_like(mean_image), mean_image]).to(device)
    algorithm, kwargs, per_call = explainer(model, cfg, batch_size, baselines)
    size = (images.shape[-2], images.shape[-1])
    seed_everything(seed)  # GradientShap draws with numpy and torch, NoiseTunnel with torch
    needs_grad = cfg.method != "occlusion"
    out = []
    for start in progress(range(0, len(images), per_call), desc=f"{cfg.method} attribution"):
        x = batch_to(images[start : start + per_call].float(), device).requires_grad_(needs_grad)
        y = targets[start : start + per_call].to(device)
        attr = algorithm.attribute(x, target=y, **kwargs)
        out.append(normalise(attr.detach(), size).cpu())
    return torch.cat(out) if out else torch.empty(0, *size)
