"""The pipeline's stages, in order: the one table that the CLI (and so `dvc repro`) and the Prefect
flow both run from (through desensitize.orchestration.runner), so every caller executes the same function for a
stage, tracked the same way. Each stage's code is `desensitize.stages.<name>`.

Each entry also says what MLflow should record about the stage: the params keys it uses (the same
lists as dvc.yaml; a test keeps them equal), the datasets and models it reads and writes (logged
with their DVC md5, which is how `desensitize lineage` links runs), and the files worth keeping as
run artifacts. Artifacts are an explicit list: figures that show raw images (masks/samples.png,
attack/grid.png) stay out of MLflow.

`check_for_dvc` checks a params file as DVC will read it, for every caller that runs the stages
through DVC (`desensitize check-params`, `desensitize repro`, the Prefect flow).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from desensitize.config import (
    EMBEDDED,
    DataParams,
    Params,
    get_dotted,
    parse_params,
    read_params_file,
    with_overrides,
)
from desensitize.errors import DesensitizeError
from desensitize.paths import Paths
from desensitize.tracking.runs import Item

RAW_SPLITS = ("raw/train", "raw/test", "raw/public")


def _none(paths: Paths) -> tuple[Path, ...]:
    return ()


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"; imported on use, so `desensitize --help` stays fast
    uses_device: bool = True
    distributed: bool = False  # trains under torchrun with several processes (desensitize.runtime.distributed)
    params: tuple[str, ...] = ("seed",)  # dotted params keys, as listed in dvc.yaml
    reads: tuple[str, ...] = ()  # tracked items (see item_path)
    writes: tuple[str, ...] = ()
    artifacts: Callable[[Paths], tuple[Path, ...]] = _none

    def function(self) -> Callable[..., dict[str, Any]]:
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)

    def items(self, direction: str, paths: Paths, params: Params) -> list[Item]:
        """What the stage reads (`input`) or writes (`output`) and exists now, with its digests."""
        names = self.reads if direction == "input" else self.writes
        return [tracked_item(name, paths, params) for name in names if item_path(name, paths).exists()]

    def run(self, params: Params, paths: Paths, device: str = "auto") -> dict[str, Any]:
        """The stage's function on `paths`, untracked (desensitize.orchestration.runner tracks it)."""
        return self.function()(params, paths, **({"device": device} if self.uses_device else {}))


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
            distributed=True,
            params=("seed", "reference"),
            reads=("raw/train", "raw/test"),
            writes=("model/reference",),
            artifacts=lambda p: (p.reference_metrics, p.report("reference"), p.reference_history),
        ),
        Stage(
            "masks",
            "desensitize.stages.masks:generate_masks",
            params=("seed", "data.shard_size", "masks", "reference", "attack", "compute.threads"),
            reads=("raw/train", "raw/test", "raw/public", "model/reference"),
            writes=("release",),
            artifacts=lambda p: (
                p.masks_metrics,
                p.report("masks"),
                p.release / "release.json",
                p.masks_reports / "template.png",
                p.masks_reports / "mask.png",
                p.masks_reports / "search.json",  # every candidate's scores, also when none passed
                p.masks_reports / "tradeoff.png",
                p.masks_reports / "summary.md",
            ),
        ),
        Stage(
            "attack",
            "desensitize.stages.attack:run_attack",
            params=("seed", "attack", "compute.threads"),
            reads=("raw/train", "raw/public", "release", "attack-sample", "model/reference"),
            artifacts=lambda p: (
                p.attack_metrics,
                p.report("attack"),
                p.attack_reports / "summary.md",
                p.attack_reports / "cell_restoration.png",
                p.attack_reports / "scaling.png",
            ),
        ),
        Stage(
            "train",
            "desensitize.stages.train:train_on_release",
            distributed=True,
            params=("seed", "train"),
            reads=("release",),
            writes=("model/plain", "model/masknet"),
            artifacts=lambda p: (p.train_history("plain"), p.train_history("masknet")),
        ),
        Stage(
            "baselines",
            "desensitize.stages.baselines:train_baselines",
            distributed=True,
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
                p.report("evaluate"),
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


def item_path(item: str, paths: Paths) -> Path:
    """Where a tracked item lives: raw/<split>, release, attack-sample (a sample of the release), model/<name>."""
    kind, _, name = item.partition("/")
    if kind == "raw":
        return paths.raw
    if kind in ("release", "attack-sample"):
        return paths.release
    if kind == "model":
        return paths.reference_model if name == "reference" else paths.model(name)
    raise DesensitizeError(f"unknown tracked item {item!r}")


def tracked_item(item: str, paths: Paths, params: Params) -> Item:
    """An item with its digests: the DVC md5 of its output; a raw split also with its own digest
    (desensitize.data.splits.split_digest); the attack sample, which is not a DVC output, by the release's
    md5 and the seeded sample's indices."""
    from desensitize.data.splits import split_digest
    from desensitize.tracking.versioning import dvc_md5

    path = item_path(item, paths)
    digest = dvc_md5(path)
    kind, _, name = item.partition("/")
    if kind == "raw":
        return Item(item, path, digest, dataset_digest=split_digest(paths.raw, name), split=name)
    if item == "attack-sample":
        from desensitize.attack.suite import sample_indices
        from desensitize.release import read_release_info

        n = read_release_info(paths.release).counts["train"]
        indices = sample_indices(n, params.attack.sample, params.seed).astype("<i8")
        digest = hashlib.md5(digest.encode() + indices.tobytes()).hexdigest()
    return Item(item, path, digest)


# Params keys dvc.yaml interpolates: ${data.path} is the ingest stage's source dep.
TEMPLATED = ("data.path",)


def dvc_keys() -> list[str]:
    """Every key DVC reads from params.yaml: each stage's params (as listed in dvc.yaml), then the
    interpolated ones."""
    return list(dict.fromkeys([*(key for stage in STAGES.values() for key in stage.params), *TEMPLATED]))


def check_for_dvc(params_file: Path, overrides: dict[str, Any] | None = None) -> Params:
    """Validate the params file that `dvc repro` reads, with `overrides` (dotted key -> value) set on
    top when given, and fail before any work on what DVC or a later stage would reject: a bad key or
    value, keys missing from the file, no path for DVC to watch as the source, a mask grid that does
    not fit the images. Returns the validated params."""
    if not params_file.is_file():
        raise DesensitizeError(
            f"{params_file}: params file not found; every dvc.yaml stage reads its params from it "
            "(`git checkout params.yaml` restores the repository's)"
        )
    raw = read_params_file(params_file)
    origin = str(params_file)
    if overrides:
        origin = f"{params_file} with overrides"
        raw = with_overrides(raw, overrides, origin)
    params = parse_params(raw, origin=origin)
    _check_keys(raw, params_file)
    _check_watched(params.data, params_file)
    _check_grid(params, params_file)
    return params


def _has(tree: Any, key: str) -> bool:
    try:
        get_dotted(tree, key)
    except (KeyError, TypeError):  # a missing key, or a level that is not a mapping
        return False
    return True


def _check_keys(raw: Any, params_file: Path) -> None:
    missing: list[str] = []
    for key in dvc_keys():
        if not _has(raw, key) and not any(key.startswith(f"{gone}.") for gone in missing):
            missing.append(key)
    if missing:
        raise DesensitizeError(
            f"{params_file}: missing {', '.join(missing)}; dvc.yaml's stages read these keys from the file "
            "itself, so the defaults that check-params prints do not count: copy them from the repository's "
            "params.yaml"
        )


def _check_watched(data: DataParams, params_file: Path) -> None:
    """data.path names what DVC watches for the source: it must be set, and exist as the source needs."""
    from desensitize.data.sources import WATCHED

    want = f"set it to {WATCHED[data.source]}"
    if data.path is None:
        raise DesensitizeError(
            f"{params_file}: data.path is null, but DVC watches it as the source of the ingest stage "
            f"(dvc.yaml: ${{data.path}}), so that a changed source reruns ingest; for source {data.source!r} {want}"
        )
    # DVC resolves the dep against dvc.yaml's directory, which holds params.yaml.
    where = data.path if data.path.is_absolute() else params_file.parent / data.path
    file = data.source in EMBEDDED
    if not (where.is_file() if file else where.is_dir()):
        problem = "not found" if not where.exists() else f"not a {'file' if file else 'directory'}"
        raise DesensitizeError(
            f"{params_file}: data.path = {str(data.path)!r}: {problem} (at {where}); for source {data.source!r} {want}"
        )


def _check_grid(params: Params, params_file: Path) -> None:
    """The masks stage's grid check, on the size the source's images will have."""
    from desensitize.data.sources import image_size
    from desensitize.search.candidates import check_grid

    size = image_size(params.data)
    try:
        check_grid(params.masks, size, size)
    except DesensitizeError as exc:
        raise DesensitizeError(f"{params_file}: {exc} (source {params.data.source!r})") from None
