"""Run one stage of the table in desensitize.orchestration.pipeline inside its MLflow child run: what the CLI (and so
`dvc repro`) and the Prefect flow call. Under torchrun with several processes (desensitize.runtime.distributed)
only the stages that train run, every rank computing and rank 0 alone writing and tracking."""

from __future__ import annotations

from typing import Any

from desensitize.config import Params
from desensitize.errors import DesensitizeError
from desensitize.orchestration.pipeline import STAGES
from desensitize.paths import Paths
from desensitize.tracking.runs import stage_run


def run_stage(name: str, params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
    """Run one stage with validated params inside its MLflow child run; returns the stage's metrics."""
    if name not in STAGES:
        raise DesensitizeError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    stage = STAGES[name]
    from desensitize.runtime.distributed import process_group, world  # torch: imported on use, as the stages are

    if not stage.distributed and (size := world().size) > 1:
        served = ", ".join(other.name for other in STAGES.values() if other.distributed)
        raise DesensitizeError(
            f"stage {name!r} runs in one process, not under torchrun with {size} processes: run "
            f"`desensitize {name}` (torchrun --nproc-per-node N serves the stages that train: {served})"
        )
    with process_group(device) as rank:
        if not rank.is_main:  # computes beside rank 0, which alone writes outputs and tracks the run
            return stage.run(params, paths, device)
        with stage_run(stage, params, paths) as record:
            return record(stage.run(params, paths, device))
