"""The MLflow runs of a pipeline execution: the parent run, and the child run every stage gets (its params,
metrics, artifacts, and each dataset or model it reads or writes, identified by its DVC md5).

Parent runs: `pipeline_run` opens one and exports its id in DESENSITIZE_MLFLOW_PARENT_RUN_ID, so
stage runs started in this process (the Prefect flow) and in its child processes (`dvc repro`
under `desensitize repro`, `dvc exp run` under an override run) attach to it. A stage started
without one (a bare `dvc repro`, a single CLI command) gets a stand-alone run. A run in a DVC
experiment carries the experiment's name in the tag `desensitize.dvc_experiment`. Lineage never
depends on parents: it links runs by the digests they recorded. What a stage reads and writes
(`Item`) is the stage table's to say (desensitize.orchestration.pipeline); this module records
whatever it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException

from desensitize.config import Params, get_dotted, load_params
from desensitize.errors import DesensitizeError
from desensitize.paths import Paths
from desensitize.storage import flatten, sha256_file
from desensitize.tracking.store import PREFIX, configure, end_orphaned_runs, owner_tags
from desensitize.tracking.versioning import code_version, dvc_experiment

log = logging.getLogger(__name__)

PARENT_ENV = "DESENSITIZE_MLFLOW_PARENT_RUN_ID"
STAGE_TAG = PREFIX + "stage"
KIND_TAG = PREFIX + "kind"
ERROR_TAG = PREFIX + "error"
EXPERIMENT_TAG = PREFIX + "dvc_experiment"  # the DVC experiment a run belongs to
_UNSAFE_KEY = re.compile(r"[^\w./ -]")


class DvcOutputSource(DatasetSource):
    """Where a logged dataset lives: a DVC output, by its path in the project (`dvc pull` it). A raw
    split also names its split and the DVC md5 of the whole `data/raw` it is part of (the lineage
    link; the dataset's own digest is the split's)."""

    def __init__(self, path: str, split: str | None = None, dvc_md5: str | None = None) -> None:
        self.path = path
        self.split = split
        self.dvc_md5 = dvc_md5

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self, **kwargs: Any) -> str:
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> DvcOutputSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        extra = {"split": self.split, "dvc_md5": self.dvc_md5}
        return {"path": self.path, **{key: value for key, value in extra.items() if value is not None}}

    @classmethod
    def from_dict(cls, source_dict: dict[Any, Any]) -> DvcOutputSource:
        return cls(source_dict["path"], source_dict.get("split"), source_dict.get("dvc_md5"))


def item_tag(direction: str, item: str) -> str:
    """The run tag holding an item's digest, e.g. `desensitize.output.release`."""
    return f"{PREFIX}{direction}.{item.replace('/', '.')}"


@dataclass(frozen=True)
class Item:
    """A dataset or model a stage reads or writes, as its run records it: `name` (raw/train, release,
    model/reference, ...), where it lives, and `digest`, the DVC md5 that lineage links runs by. A dataset
    is also logged with `mlflow.log_input`, by its own `dataset_digest` where it has one (a raw split's:
    the three splits share the DVC output data/raw), else by its digest."""

    name: str
    path: Path
    digest: str
    dataset_digest: str | None = None
    split: str | None = None  # a raw split: its name, recorded in the dataset's source


class Tracked(Protocol):
    """What `stage_run` records of a stage (desensitize.orchestration.pipeline.Stage is one)."""

    name: str
    params: tuple[str, ...]  # the dotted params keys it uses

    def items(self, direction: str, paths: Paths, params: Params) -> list[Item]: ...

    def artifacts(self, paths: Paths) -> tuple[Path, ...]: ...


# MLflow's dataset digest column holds 36 characters: a split's sha256 is logged by its first 32.
DATASET_DIGEST_CHARS = 32
DIGESTS_ARTIFACT = "digests/{direction}.json"


def _log_items(items: list[Item], direction: str, paths: Paths) -> None:
    """Datasets go through `mlflow.log_input`; every item's digest (the DVC md5 that lineage links
    by) is also a tag, for search, and all of them an artifact (digests/input.json, output.json),
    which unlike a tag cannot be edited afterwards. A raw split's dataset digest is its own, the DVC
    md5 of `data/raw` is in its source."""
    for item in items:
        mlflow.set_tag(item_tag(direction, item.name), item.digest)
        if item.name.startswith("model/"):
            continue
        where = item.path.resolve().relative_to(paths.root.resolve()).as_posix()
        source = DvcOutputSource(where, split=item.split, dvc_md5=item.digest if item.split else None)
        digest = item.dataset_digest[:DATASET_DIGEST_CHARS] if item.dataset_digest else item.digest
        mlflow.log_input(MetaDataset(source, name=item.name, digest=digest), context=direction)
    if items:
        mlflow.log_dict({item.name: item.digest for item in items}, DIGESTS_ARTIFACT.format(direction=direction))


def _safe_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """Flattened, with the characters MLflow refuses in names replaced."""
    return {_UNSAFE_KEY.sub("_", key): value for key, value in flatten(tree).items()}


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in _safe_keys(metrics).items() if isinstance(v, int | float)}  # bools as 0 / 1


def _stage_params(stage: Tracked, params: Params) -> dict[str, str]:
    """The params keys the stage uses (its dvc.yaml list), flattened to dotted names."""
    data = params.model_dump(mode="json")
    return {k: str(v) for k, v in _safe_keys({key: get_dotted(data, key) for key in stage.params}).items()}


def params_hash(params: Params) -> str:
    return hashlib.sha256(params.model_dump_json().encode()).hexdigest()


def _run_tags(paths: Paths, params: Params | None) -> dict[str, str]:
    """Code and data versions: git commit and dirty flag, the dvc.lock and params hashes."""
    version = code_version()
    tags = {
        PREFIX + "git_commit": version["git_commit"] or "unknown",
        PREFIX + "git_dirty": str(version["git_dirty"]).lower(),
        PREFIX + "package_version": version["package"],
        PREFIX + "dvc_lock_sha256": sha256_file(paths.dvc_lock) if paths.dvc_lock.is_file() else "none",
    }
    if version["git_commit"]:
        tags["mlflow.source.git.commit"] = version["git_commit"]
    if params is not None:
        tags[PREFIX + "params_sha256"] = params_hash(params)
    if experiment := dvc_experiment():
        tags[EXPERIMENT_TAG] = experiment
    return tags


def _parent_run_id() -> str | None:
    """The pipeline run to attach to, if one was exported and exists in this store."""
    parent = os.environ.get(PARENT_ENV) or None
    if parent is None:
        return None
    try:
        mlflow.MlflowClient().get_run(parent)
    except MlflowException:
        log.warning("%s=%s is not a run in this MLflow store; tracking this stage stand-alone", PARENT_ENV, parent)
        return None
    return parent


@contextlib.contextmanager
def stage_run(stage: Tracked, params: Params, paths: Paths) -> Iterator[Callable[[dict[str, Any]], dict[str, Any]]]:
    """A child run around one stage. Yields `record(metrics)`, which the caller passes the stage's
    result through. A stage that raises leaves its run FAILED, with the error as a tag and only
    the artifacts it wrote itself."""
    end_orphaned_runs(configure(paths))
    tags = {**_run_tags(paths, params), **owner_tags(), KIND_TAG: "stage", STAGE_TAG: stage.name}
    if mlflow.active_run() is not None:  # in-process under pipeline_run (or a caller's own run)
        run = mlflow.start_run(run_name=stage.name, nested=True, tags=tags)
    else:
        run = mlflow.start_run(run_name=stage.name, parent_run_id=_parent_run_id(), tags=tags)
    with run:
        mlflow.log_params(_stage_params(stage, params))
        _log_items(stage.items("input", paths, params), "input", paths)
        started = time.time()
        result: dict[str, Any] = {}

        def record(metrics: dict[str, Any]) -> dict[str, Any]:
            result.update(metrics)
            return metrics

        try:
            yield record
        except BaseException as exc:
            mlflow.set_tag(ERROR_TAG, " ".join(str(exc).split())[:4000] or type(exc).__name__)
            _log_artifacts(stage, paths, since=started)
            raise
        _log_items(stage.items("output", paths, params), "output", paths)
        mlflow.log_metrics(_numeric(result))
        _log_artifacts(stage, paths)


def _log_artifacts(stage: Tracked, paths: Paths, since: float | None = None) -> None:
    root = paths.root.resolve()
    for path in stage.artifacts(paths):
        if path.is_file() and (since is None or path.stat().st_mtime >= since):
            where = path.resolve().parent.relative_to(root).as_posix()
            mlflow.log_artifact(str(path), artifact_path=None if where == "." else where)


def _params_or_none(paths: Paths) -> Params | None:
    if not paths.params_file.is_file():
        return None
    try:
        return load_params(paths.params_file)
    except DesensitizeError:
        return None  # the stages will report it, with the key


@contextlib.contextmanager
def pipeline_run(
    paths: Paths, *, tags: dict[str, str] | None = None, store: Paths | None = None, params: Params | None = None
) -> Iterator[str]:
    """The parent run of one pipeline execution in `paths`; yields its id. Stage runs started
    meanwhile, in this process or in child processes, become its children. It ends FAILED if the
    body raises, and keeps the dvc.lock the execution left behind (tag and artifact).

    An execution outside its project (a DVC experiment's own workspace) tracks into the project's
    store, `store`, and names the `params` it runs with (its workspace's file gets them later)."""
    end_orphaned_runs(configure(store or paths))
    params = params if params is not None else _params_or_none(paths)
    run_tags = {**_run_tags(paths, params), **owner_tags(), KIND_TAG: "pipeline", **(tags or {})}
    previous = os.environ.get(PARENT_ENV)
    with mlflow.start_run(run_name="pipeline", tags=run_tags) as run:
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous
            if paths.dvc_lock.is_file():
                mlflow.set_tag(PREFIX + "dvc_lock_sha256", sha256_file(paths.dvc_lock))
                mlflow.log_artifact(str(paths.dvc_lock))


@contextlib.contextmanager
def sweep_run(paths: Paths, *, tags: dict[str, str] | None = None) -> Iterator[str]:
    """The parent run of one sweep; yields its id. Each point gets a child run (`log_sweep_point`)."""
    end_orphaned_runs(configure(paths))
    run_tags = {**_run_tags(paths, None), **owner_tags(), KIND_TAG: "sweep", **(tags or {})}
    with mlflow.start_run(run_name="sweep", tags=run_tags) as run:
        yield run.info.run_id


def log_sweep_point(parent_id: str, name: str, params: Params, row: dict[str, Any]) -> str:
    """A finished sweep point as a child of `parent_id`: its seed and masks settings as params, its row's
    numbers (accuracies, privacy scores, limits; booleans as 0 / 1) as metrics, its text (family,
    template, best attacker, why a searched point released nothing) as tags. Returns the run id."""
    text = {k: str(v)[:4000] for k, v in row.items() if isinstance(v, str)}
    tags = {**owner_tags(), KIND_TAG: "sweep_point", **{PREFIX + k: v for k, v in text.items()}}
    with mlflow.start_run(run_name=name, parent_run_id=parent_id, nested=True, tags=tags) as run:
        mlflow.log_params({"seed": params.seed, **_safe_keys({"masks": params.masks.model_dump(mode="json")})})
        mlflow.log_metrics(_numeric({k: v for k, v in row.items() if v is not None and k not in text}))
        return run.info.run_id
