"""Inference with a model trained on a release: one call loads it and applies the release's mask,
so nobody can forget to mask new images the way the training images were masked.

`MaskedClassifier` is a torch module (raw images in, logits out), so the model registry stores it
(or its torch-only form, below): `models:/NAME@champion` applies the mask itself. It holds the
weights, the release's masking rule (for a set-scope release the mask, for an image-scope saliency
release the reference model) and the fill value, never an image.

How a version is stored depends on the rule (`export_format`, the one place that decides). A
set-scope release with a zero or mean fill masks every image with the same constants, so
`MaskedClassifier.exportable()` gives the same computation in torch alone (`SetMaskClassifier`: mask
and fill are buffers) and the registry stores a `torch.export` program (MLflow's `pt2` format) that
loads with torch and MLflow, no code of ours unpickled. Any other rule runs numpy or captum at
inference (per-image masks, fresh noise), so those versions are pickles of this class: its import
path and those of the modules it holds (desensitize.models.Backbone, desensitize.masknet.MaskNet)
must stay where they are."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from desensitize.config import MaskParams
from desensitize.errors import DesensitizeError
from desensitize.learning.checkpoints import load_checkpoint
from desensitize.learning.training import predict
from desensitize.masking.grid import apply_mask, fill_values, random_masks
from desensitize.masknet import with_mask_channel
from desensitize.release import MaskSettings, ReleaseInfo, load_released, read_release_info
from desensitize.runtime.device import batch_to, best_device, to_float

INFERENCE_STREAM = 3
ModelFormat = Literal["pt2", "pickle"]
# What a registered model takes (the model card says it too): float input outside it is refused, not clipped.
ACCEPTS = "float32 images (N, C, H, W) with values in [0, 1] (raw uint8 levels / 255)"


def check_input(images: torch.Tensor) -> None:
    """Refuse NaN and values outside [0, 1] (RuntimeError) with a message saying what the model accepts.
    Traced by torch.export, the checks become runtime asserts that keep their messages in the exported
    program (`aten._assert_async.msg`, raised on the CPU, where a pt2 version runs), so a caller of the
    program gets them without this package; run eagerly, a plain raise (also on CUDA)."""
    checks = (
        (~torch.isnan(images).any(), f"input images hold NaN; the model takes {ACCEPTS}"),
        (((images >= 0) & (images <= 1)).all(), f"input images hold values outside [0, 1]; the model takes {ACCEPTS}"),
    )
    for holds, message in checks:
        if torch.compiler.is_compiling():
            torch._assert_async(holds, message)
        elif not bool(holds):
            raise RuntimeError(message)


def export_format(info: MaskSettings) -> tuple[ModelFormat, str | None]:
    """How a model trained on a release with these settings is registered: ("pt2", None) when the
    masking rule is constant (one set-scope mask, a zero or mean fill), so torch.export captures it;
    else ("pickle", why)."""
    needs = "loading needs the desensitize package and unpickles its code"
    if info.scope != "set":
        if info.strategy == "saliency":
            return "pickle", f"image-scope saliency masks run captum attribution at inference; {needs}"
        return "pickle", f"image-scope {info.strategy} masks are drawn per image with numpy at inference; {needs}"
    if info.fill not in ("zero", "mean"):
        return "pickle", f"the {info.fill} fill draws fresh random values with numpy at inference; {needs}"
    return "pt2", None


class SetMaskClassifier(nn.Module):
    """`MaskedClassifier.forward` for a set-scope release with a constant fill, in torch alone (what
    torch.export captures; built by `MaskedClassifier.exportable`): float32 raw images (N, C, H, W)
    in [0, 1] in (NaN and values outside refused: `check_input`), logits out. The images are rounded to
    the uint8 grid, hidden pixels (mask 0) set to the fill, and a MaskNet gets the mask as its last
    channel, as the release and training did."""

    def __init__(self, model: nn.Module, mask: np.ndarray, fill: np.ndarray, *, mask_channel: bool) -> None:
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        self.register_buffer("visible", torch.as_tensor(np.asarray(mask, dtype=bool), device=device)[None, None])
        fill = torch.as_tensor(np.asarray(fill, dtype=np.float32), device=device).reshape(1, -1, 1, 1)
        self.register_buffer("fill", fill)  # uint8 levels 0..255, per channel
        self.mask_channel = mask_channel

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_input(images)
        levels = torch.round(images * 255)  # the uint8 grid (round half to even, as np.rint)
        x = torch.where(self.visible, levels, self.fill) / 255
        if self.mask_channel:  # desensitize.masknet.with_mask_channel: 0 / 255 -> 0 / 1
            x = torch.cat([x, self.visible.to(x.dtype).expand(x.shape[0], 1, -1, -1)], 1)
        return self.model(x)


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

    def exportable(self) -> SetMaskClassifier | None:
        """This classifier as a module of torch alone (see `export_format`), or None when its rule
        runs numpy or captum at inference. It shares this classifier's model, mask and fill."""
        if export_format(self.info)[0] != "pt2":
            return None
        shape = (1, *self.info.image_shape)
        fill = fill_values(self.info.fill, shape, self.fill_value, self.seed, INFERENCE_STREAM)
        return SetMaskClassifier(self.model, self.set_mask, fill, mask_channel=bool(self.spec.get("masknet"))).eval()

    def masks_for(self, images: np.ndarray) -> np.ndarray:
        """The release's masking rule applied to new uint8 images (N, C, H, W): (N, H, W)."""
        n, _, height, width = images.shape
        if self.set_mask is not None:
            if self.set_mask.shape != (height, width):
                raise DesensitizeError(f"images are {height}x{width}, the release mask is {self.set_mask.shape}")
            return np.broadcast_to(self.set_mask, (n, height, width))
        if self.reference is not None:
            from desensitize.masking.templates import per_image_saliency_masks  # captum, for this kind of release only

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
        passes; NaN and values outside refused: `check_input`); the mask is applied here."""
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.dtype != np.uint8:
            check_input(torch.as_tensor(array))
            array = np.rint(array * 255).astype(np.uint8)
        return self.model(batch_to(to_float(self._inputs(array)), self.device))
