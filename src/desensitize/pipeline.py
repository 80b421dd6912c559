"""The pipeline's stages, in order: the one table that the CLI (and so `dvc repro`) and the Prefect
flow both run from (through desensitize.runner), so every caller executes the same function for a
stage, tracked the same way. Each stage's code is `desensitize.stages.<name>`.

Each entry also says what MLflow should record about the stage: the params keys it uses (the same
lists as dvc.yaml; a test keeps them equal), the datasets and models it reads and writes (logged
with their DVC md5, which is how `desensitize lineage` links runs), and the files worth keeping as
run artifacts. Artifacts are an explicit list: figures that show raw images (masks/samples.png,
attack/grid.png) stay out of MLflow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desensitize.paths import Paths

RAW_SPLITS = ("raw/train", "raw/test", "raw/public")


def _none(paths: Paths) -> tuple[Path, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"; imported on use, so `desensitize --help` stays fast
    uses_device: bool = True
    params: tuple[str, ...] = ("seed",)  # dotted params keys, as listed in dvc.yaml
    reads: tuple[str, ...] = ()  # items of desensitize.tracking.ITEMS
    writes: tuple[str, ...] = ()
    artifacts: Callable[[Paths], tuple[Path, ...]] = _none

    def function(self) -> Callable[..., dict[str, Any]]:
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "ingest",
            "desensitize.stages.ingest:ingest",
            uses_device=False,
            params=("seed", "data"),
            writes=RAW_SPLITS,
            artifacts=lambda p: (p.raw / "manifest.json",),
        ),
        Stage(
            "reference",
            "desensitize.stages.reference:train_reference",
            params=("seed", "reference"),
            reads=("raw/train", "raw/test"),
            writes=("model/reference",),
            artifacts=lambda p: (p.reference_metrics, p.reference_history),
        ),
        Stage(
            "masks",
            "desensitize.stages.masks:generate_masks",
            params=("seed", "data.shard_size", "masks", "reference", "attack"),
            reads=("raw/train", "raw/test", "raw/public", "model/reference"),
            writes=("release",),
            artifacts=lambda p: (
                p.masks_metrics,
                p.release / "release.json",
                p.masks_reports / "template.png",
                p.masks_reports / "mask.png",
                p.masks_reports / "search.json",  # every candidate's scores, also when none passed
            ),
        ),
        Stage(
            "attack",
            "desensitize.stages.attack:run_attack",
            params=("seed", "attack"),
            reads=("raw/train", "raw/public", "release", "attack-sample", "model/reference"),
            artifacts=lambda p: (
                p.attack_metrics,
                p.attack_reports / "summary.md",
                p.attack_reports / "cell_restoration.png",
                p.attack_reports / "scaling.png",
            ),
        ),
        Stage(
            "train",
            "desensitize.stages.train:train_on_release",
            params=("seed", "train"),
            reads=("release",),
            writes=("model/plain", "model/masknet"),
            artifacts=lambda p: (p.train_history("plain"), p.train_history("masknet")),
        ),
        Stage(
            "baselines",
            "desensitize.stages.baselines:train_baselines",
            params=("seed", "train"),
            reads=("raw/train",),
            writes=("model/raw", "model/plain_random"),  # release.json only
            artifacts=lambda p: (p.train_history("raw"), p.train_history("plain_random")),
        ),
        Stage(
            "evaluate",
            "desensitize.stages.evaluate:evaluate",
            reads=("raw/test", "release", "model/raw", "model/plain_random", "model/plain", "model/masknet"),
            artifacts=lambda p: (
                p.evaluate_metrics,
                p.evaluate_reports / "summary.md",
                *sorted(p.evaluate_reports.glob("confusion_*.png")),
            ),
        ),
        Stage(
            "register",
            "desensitize.stages.register:register",
            uses_device=False,
            params=("seed", "data", "masks", "attack", "train"),
            reads=("release", "model/masknet", "model/reference"),
            artifacts=lambda p: (p.cards / "model_card.md", p.cards / "data_card.md"),
        ),
    )
}
