"""Inference with a model trained on a release: one call loads it and applies the release's mask,
so nobody can forget to mask new images the way the training images were masked.

`MaskedClassifier` is a torch module (raw images in, logits out), so the model registry stores
exactly this object: `models:/NAME@champion` applies the mask itself. It holds the weights, the
release's masking rule (for a set-scope release the mask, for an image-scope saliency release the
reference model) and the fill value, never an image.

Registered versions are pickles of this class: its import path and those of the modules it holds
(desensitize.models.Backbone, desensitize.masknet.MaskNet) must stay where they are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from desensitize.checkpoints import load_checkpoint
from desensitize.config import MaskParams
from desensitize.errors import DesensitizeError
from desensitize.masknet import with_mask_channel
from desensitize.masks import apply_mask, fill_values, random_masks
from desensitize.release import ReleaseInfo, load_released, read_release_info
from desensitize.training import batch_to, best_device, predict, to_float

INFERENCE_STREAM = 3


class MaskedClassifier(nn.Module):
    """A trained `plain` or `masknet` model bound to the release it was trained on."""

    def __init__(
        self,
        model_path: Path,
        release_dir: Path,
        *,
        device: str = "auto",
        reference_path: Path | None = None,
        masks: MaskParams | None = None,
        seed: int = 0,
    ) -> None:
        """`reference_path` and `masks` (the masks params the release was made with) are needed only
        for an image-scope saliency release, whose masks come from the owner's reference model."""
        super().__init__()
        self.device = best_device(device)
        self.model, self.spec = load_checkpoint(model_path, self.device)
        self.info = read_release_info(release_dir)
        self.seed = seed
        self.fill_value = np.asarray(self.info.fill_value, dtype=np.uint8)
        self.set_mask = load_released(release_dir, "train").masks[0] if self.info.scope == "set" else None
        self.reference = None
        self.mask_params = masks
        if self.set_mask is None and self.info.strategy == "saliency":
            if reference_path is None or masks is None:
                raise DesensitizeError(
                    "image-scope saliency release: per-image masks come from the owner's reference model; "
                    "pass reference_path (models/reference.npz) and the masks params"
                )
            self.reference, _ = load_checkpoint(reference_path, self.device)

    def __setstate__(self, state: dict) -> None:
        """Versions registered before release.json had a typed model pickled it as a plain dict (with
        a creation time, which release.json no longer holds)."""
        super().__setstate__(state)
        if isinstance(self.info, dict):
            self.info = ReleaseInfo.model_validate({k: v for k, v in self.info.items() if k != "created"})

    def masks_for(self, images: np.ndarray) -> np.ndarray:
        """The release's masking rule applied to new uint8 images (N, C, H, W): (N, H, W)."""
        n, _, height, width = images.shape
        if self.set_mask is not None:
            if self.set_mask.shape != (height, width):
                raise DesensitizeError(f"images are {height}x{width}, the release mask is {self.set_mask.shape}")
            return np.broadcast_to(self.set_mask, (n, height, width))
        if self.reference is not None:
            from desensitize.templates import per_image_saliency_masks  # captum, for this kind of release only

            info = self.info
            return per_image_saliency_masks(
                self.reference,
                images,
                self.mask_params.attribution,
                info.cell,
                info.hidden_ratio_requested,
                self.device,
                self.seed,
            )
        if self.info.strategy == "random":
            info = self.info
            return random_masks(n, height, width, info.cell, info.hidden_ratio_requested, self.seed, INFERENCE_STREAM)
        raise DesensitizeError(f"no inference masking rule for a {self.info.strategy!r} {self.info.scope!r} release")

    def release(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mask and fill raw images exactly as the release did: (masked images, masks)."""
        masks = np.ascontiguousarray(self.masks_for(images))
        fill = fill_values(self.info.fill, images.shape, self.fill_value, self.seed, INFERENCE_STREAM)
        return apply_mask(images, masks, fill), masks

    @torch.no_grad()
    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class indices for raw uint8 images (N, C, H, W); the mask is applied here."""
        return predict(self.model, self._inputs(images), self.device)

    def _inputs(self, images: np.ndarray) -> np.ndarray:
        masked, masks = self.release(images)
        return with_mask_channel(masked, masks) if self.spec.get("masknet") else masked

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for raw images (N, C, H, W): uint8, or floats in [0, 1] (what a pyfunc caller
        passes); the mask is applied here."""
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.dtype != np.uint8:
            array = np.rint(np.clip(array, 0, 1) * 255).astype(np.uint8)
        return self.model(batch_to(to_float(self._inputs(array)), self.device))
