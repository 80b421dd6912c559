"""The feature selection MaskNet: a backbone that knows which pixels are hidden.

Input: (N, C + 1, H, W), the released image and its mask as the last channel (1 = visible).
Hidden pixels are zeroed before the first layer, so whatever the fill was (zero, mean, noise)
the logits cannot depend on it. After every stage a feature selection module multiplies the
features by
- a spatial gate computed from [features, the mask resized to the stage], and
- a channel gate computed from features pooled over *visible* positions only,
so the network can keep features computed from visible content and drop those dominated by the
hole. Both gates start as the identity (2 * sigmoid(0) = 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from desensitize.models import Backbone


class FeatureSelection(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 4, 4)
        self.spatial = nn.Sequential(
            nn.Conv2d(channels + 1, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, 1, 1)
        )
        self.channel = nn.Sequential(nn.Linear(channels + 1, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        for last in (self.spatial[-1], self.channel[-1]):
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        visible = F.adaptive_avg_pool2d(mask, features.shape[-2:])  # share of visible input per position
        spatial = 2 * torch.sigmoid(self.spatial(torch.cat([features, visible], 1)))
        weight = visible.sum(dim=(2, 3))
        pooled = (features * visible).sum(dim=(2, 3)) / weight.clamp_min(1e-6)
        area = weight / (visible.shape[-1] * visible.shape[-2])
        channel = 2 * torch.sigmoid(self.channel(torch.cat([pooled, area], 1)))[:, :, None, None]
        return features * spatial * channel


class MaskNet(nn.Module):
    """Wraps a backbone built for C + 1 input channels (image + mask)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone
        widths = [_out_channels(stage) for stage in backbone.stages]
        self.select = nn.ModuleList(FeatureSelection(w) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image, mask = x[:, :-1], x[:, -1:]
        h = self.backbone.stem(torch.cat([image * mask, mask], 1))
        for stage, select in zip(self.backbone.stages, self.select, strict=True):
            h = select(stage(h), mask)
        return self.backbone.head(h)


def _out_channels(stage: nn.Module) -> int:
    channels = [m.out_channels for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return channels[-1]
