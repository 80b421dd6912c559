"""Backbones built by name, and the checkpoint format.

Every backbone is `stem -> stages -> head`, so later parts of the pipeline can address a stage
by name (Grad-CAM's layer, MaskNet's feature selection after each stage). No ReLU is in-place:
several captum methods need the pre-activation values intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from desensitize.errors import DesensitizeError
from desensitize.storage import read_arrays, write_arrays

SPEC = "spec"
STATE = "state/"


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


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A classifier from its checkpoint spec: a backbone, or a MaskNet around one (`masknet`: true, or
    a dict of MaskNet options; `in_channels` counts the image channels only)."""
    if masknet := spec.get("masknet"):
        from desensitize.masknet import MaskNet

        options = masknet if isinstance(masknet, dict) else {}
        return MaskNet(build_backbone(spec["backbone"], spec["in_channels"] + 1, spec["num_classes"]), **options)
    return build_backbone(spec["backbone"], spec["in_channels"], spec["num_classes"])


def save_checkpoint(path: Path, model: nn.Module, **spec: Any) -> None:
    """Save weights with what it takes to rebuild the model (`backbone`, `in_channels`, `num_classes`...).

    The file is an `.npz` of the state dict plus the spec as JSON, written deterministically:
    the same weights always give the same bytes, so DVC sees a retrained-but-identical model
    as unchanged. No pickle: loading it cannot run code.
    """
    arrays = {f"{STATE}{name}": t.detach().cpu().numpy() for name, t in model.state_dict().items()}
    arrays[SPEC] = np.frombuffer(json.dumps(spec, sort_keys=True).encode(), dtype=np.uint8)
    write_arrays(path, **arrays)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model saved by `save_checkpoint`; returns it in eval mode with its spec."""
    path = Path(path)
    if not path.is_file():
        raise DesensitizeError(f"{path}: model not found (run the stage that trains it first)")
    try:
        arrays = read_arrays(path)
        spec = json.loads(arrays.pop(SPEC).tobytes())
        model = build_model(spec)
        state = {name.removeprefix(STATE): torch.from_numpy(a) for name, a in arrays.items()}
        model.load_state_dict(state)
    except (DesensitizeError, RuntimeError, KeyError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DesensitizeError(f"{path}: not a usable checkpoint ({reason})") from None
    return model.to(device).eval(), spec
