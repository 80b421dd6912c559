"""Backbones built by name.

Every backbone is `stem -> stages -> head`, so later parts of the pipeline can address a stage
by name (Grad-CAM's layer, MaskNet's feature selection after each stage). No ReLU is in-place:
several captum methods need the pre-activation values intact.
"""

from __future__ import annotations

import torch
from torch import nn

from desensitize.errors import DesensitizeError


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class Backbone(nn.Module):
    def __init__(self, stem: nn.Module, stages: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


def small_cnn(in_channels: int, num_classes: int, width: int = 16) -> Backbone:
    """A VGG-style CNN for 28x28 inputs (works from 8x8 up): 28 -> 14 -> 7 spatial, 16-32-64 channels."""
    w1, w2, w3 = width, 2 * width, 4 * width
    return Backbone(
        stem=nn.Identity(),
        stages=[
            nn.Sequential(*_conv_bn_relu(in_channels, w1), *_conv_bn_relu(w1, w1), nn.MaxPool2d(2)),
            nn.Sequential(*_conv_bn_relu(w1, w2), *_conv_bn_relu(w2, w2), nn.MaxPool2d(2)),
            nn.Sequential(*_conv_bn_relu(w2, w3)),
        ],
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(w3, num_classes)),
    )


def resnet18(in_channels: int, num_classes: int) -> Backbone:
    """CIFAR-style ResNet-18: a 3x3 stride-1 stem and no max-pool, for 32x32 inputs and up."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None, num_classes=num_classes)
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    return Backbone(
        stem=stem,
        stages=[net.layer1, net.layer2, net.layer3, net.layer4],
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.fc),
    )


BACKBONES = {"small_cnn": small_cnn, "resnet18": resnet18}


def build_backbone(name: str, in_channels: int, num_classes: int) -> Backbone:
    try:
        return BACKBONES[name](in_channels, num_classes)
    except KeyError:
        raise DesensitizeError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}") from None
