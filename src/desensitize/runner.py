"""Run one stage of the table in desensitize.pipeline inside its MLflow child run: what the CLI (and so
`dvc repro`) and the Prefect flow call."""

from __future__ import annotations

from typing import Any

from desensitize.config import Params
from desensitize.errors import DesensitizeError
from desensitize.paths import Paths
from desensitize.pipeline import STAGES
from desensitize.tracking import stage_run


def run_stage(name: str, params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run one stage with validated params inside its MLflow child run; returns the stage's metrics."""
    if name not in STAGES:
        raise DesensitizeError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    stage = STAGES[name]
    kwargs = {"device": device} if stage.uses_device else {}
    with stage_run(stage, params, paths) as record:
        return record(stage.function()(params, paths, **kwargs))
