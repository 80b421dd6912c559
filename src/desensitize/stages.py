"""The pipeline's stages, in order: the one table that the CLI (and so `dvc repro`) and the Prefect
flow both run from, so every caller executes the same function for a stage."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from desensitize.config import Params
from desensitize.errors import DesensitizeError
from desensitize.paths import Paths


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"; imported on use, so `desensitize --help` stays fast
    uses_device: bool = True

    def function(self) -> Callable[..., dict[str, Any]]:
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("ingest", "desensitize.ingest:ingest", uses_device=False),
        Stage("reference", "desensitize.reference:train_reference"),
        Stage("masks", "desensitize.masking:generate_masks"),
        Stage("attack", "desensitize.attacking:run_attack"),
        Stage("train", "desensitize.recognition:train_on_release"),
        Stage("baselines", "desensitize.recognition:train_baselines"),
        Stage("evaluate", "desensitize.evaluating:evaluate"),
    )
}


def run_stage(name: str, params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run one stage with validated params; returns the stage's metrics."""
    if name not in STAGES:
        raise DesensitizeError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    stage = STAGES[name]
    kwargs = {"device": device} if stage.uses_device else {}
    return stage.function()(params, paths, **kwargs)
