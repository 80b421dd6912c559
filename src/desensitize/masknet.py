"""The feature selection MaskNet: a backbone that knows which pixels are hidden.

Input: (N, C + 1, H, W), the released image and its mask as the last channel (1 = visible).
Hidden pixels are zeroed before the first layer, so whatever the fill was (zero, mean, noise)
the logits cannot depend on it. After each gated stage a feature selection module multiplies
the features by
- a spatial gate computed from [features, the mask resized to the stage], and/or
- a channel gate computed from features pooled over *visible* positions only,
so the network can keep features computed from visible content and drop those dominated by the
hole. Gates start as the identity. The options below are the design space that
benchmarks/masknet_ablation.py measures; the defaults are the variant that earned its place there.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from desensitize.models import Backbone

Gates = Literal["both", "spatial", "channel", "none"]
GATES: tuple[str, ...] = ("both", "spatial", "channel", "none")


def with_mask_channel(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """MaskNet input: uint8 (N, C + 1, H, W), the mask (0 / 255) as the last channel."""
    return np.concatenate([images, (masks[:, None] * 255).astype(np.uint8)], axis=1)


def masknet_input(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The MaskNet input of a batch of released arrays (`images`, `masks`): built per batch, never for a
    whole set (see training.TrainingData)."""
    return with_mask_channel(arrays["images"], arrays["masks"])


class FeatureSelection(nn.Module):
    """Spatial and/or channel gates. `rezero`: gate = 1 + a * tanh(g) with a learned scalar a that
    starts at 0 (the block is exactly the identity, and stays close to it until it helps);
    otherwise gate = 2 * sigmoid(g) with g's last layer zero-initialised."""

    def __init__(self, channels: int, gates: Gates = "both", rezero: bool = False) -> None:
        super().__init__()
        hidden = max(channels // 4, 4)
        self.spatial = (
            nn.Sequential(nn.Conv2d(channels + 1, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 1, 1))
            if gates in ("both", "spatial")
            else None
        )
        self.channel = (
            nn.Sequential(nn.Linear(channels + 1, hidden), nn.ReLU(), nn.Linear(hidden, channels))
            if gates in ("both", "channel")
            else None
        )
        self.scale = nn.Parameter(torch.zeros(2)) if rezero else None
        for branch in (self.spatial, self.channel):
            if branch is not None and not rezero:
                nn.init.zeros_(branch[-1].weight)
                nn.init.zeros_(branch[-1].bias)

    def _gate(self, logits: torch.Tensor, which: int) -> torch.Tensor:
        if self.scale is None:
            return 2 * torch.sigmoid(logits)
        return 1 + self.scale[which] * torch.tanh(logits)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visible = F.adaptive_avg_pool2d(mask, features.shape[-2:])  # share of visible input per position
        out = features
        if self.spatial is not None:
            out = out * self._gate(self.spatial(torch.cat([features, visible], 1)), 0)
        if self.channel is not None:
            weight = visible.sum(dim=(2, 3))
            pooled = (features * visible).sum(dim=(2, 3)) / weight.clamp_min(1e-6)
            area = weight / (visible.shape[-1] * visible.shape[-2])
            out = out * self._gate(self.channel(torch.cat([pooled, area], 1)), 1)[:, :, None, None]
        return out


class MaskNet(nn.Module):
    """Wraps a backbone built for C + 1 input channels (image + mask).

    gates: which gates follow each gated stage; gated_stages: gate after the first n stages only
    (None: all); rezero: the gate form (see FeatureSelection); visible_pool: the head averages
    features over visible positions only instead of over the whole map.
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        gates: Gates = "both",
        gated_stages: int | None = None,
        rezero: bool = False,
        visible_pool: bool = False,
    ) -> None:
        super().__init__()
        if gates not in GATES:
            raise ValueError(f"gates={gates!r}; expected one of {', '.join(GATES)}")
        self.backbone = backbone
        widths = [_out_channels(stage) for stage in backbone.stages]
        n_gated = len(widths) if gated_stages is None else gated_stages
        self.select = nn.ModuleList(
            FeatureSelection(w, gates, rezero) if i < n_gated and gates != "none" else nn.Identity()
            for i, w in enumerate(widths)
        )
        self.visible_pool = visible_pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image, mask = x[:, :-1], x[:, -1:]
        h = self.backbone.stem(torch.cat([image * mask, mask], 1))
        for stage, select in zip(self.backbone.stages, self.select, strict=True):
            h = stage(h)
            h = h if isinstance(select, nn.Identity) else select(h, mask)
        if not self.visible_pool:
            return self.backbone.head(h)
        visible = F.adaptive_avg_pool2d(mask, h.shape[-2:])
        pooled = (h * visible).sum(dim=(2, 3), keepdim=True) / visible.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        return self.backbone.head[1:](pooled)  # every backbone's head starts with its global average pool


def _out_channels(stage: nn.Module) -> int:
    channels = [m.out_channels for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return channels[-1]
