"""The checkpoint format: weights plus the spec that rebuilds the model (a backbone, or a MaskNet
around one). An `.npz`, never a pickle: loading a checkpoint cannot run code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from desensitize.errors import DesensitizeError
from desensitize.masknet import MaskNet
from desensitize.models import build_backbone
from desensitize.storage import read_arrays, write_arrays

SPEC = "spec"
STATE = "state/"


def build_model(spec: dict[str, Any]) -> nn.Module:
    """A classifier from its checkpoint spec: a backbone, or a MaskNet around one (`masknet`: true, or
    a dict of MaskNet options; `in_channels` counts the image channels only)."""
    if masknet := spec.get("masknet"):
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
