"""MLflow tracking: where the store is, the parent run of a pipeline execution, and the child run
every stage gets (its params, metrics, artifacts, and each dataset or model it reads or writes,
identified by its DVC md5).

Nothing happens at import: the entry points (the CLI, `run_stage`, `pipeline_run`) call
`configure`. The store is `sqlite:///<project>/mlruns/mlflow.db` with artifacts in
`mlruns/artifacts/`, unless MLFLOW_TRACKING_URI says otherwise.

Parent runs: `pipeline_run` opens one and exports its id in DESENSITIZE_MLFLOW_PARENT_RUN_ID, so
stage runs started in this process (the Prefect flow) and in its child processes (`dvc repro`
under `desensitize repro`) attach to it. A stage started without one (a bare `dvc repro`, a
single CLI command) gets a stand-alone run. Lineage never depends on parents: it links runs by
the digests they recorded.

Digests are computed with DVC's own hashing (dvc_data) rather than read from dvc.lock, because
under `dvc repro` a stage runs before DVC writes its outputs into the lock; the value is the same
one DVC then records, and it is also right for a Prefect run that has not reached `dvc commit`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException

from desensitize.config import Params, get_dotted, load_params
from desensitize.errors import DesensitizeError
from desensitize.paths import Paths
from desensitize.pipeline import Stage
from desensitize.splits import split_digest
from desensitize.storage import flatten, sha256_file
from desensitize.versioning import code_version, dvc_md5

log = logging.getLogger(__name__)

PARENT_ENV = "DESENSITIZE_MLFLOW_PARENT_RUN_ID"
EXPERIMENT = "desensitize"
PREFIX = "desensitize."
STAGE_TAG = PREFIX + "stage"
KIND_TAG = PREFIX + "kind"
ERROR_TAG = PREFIX + "error"
_UNSAFE_KEY = re.compile(r"[^\w./ -]")


def tracking_uri(paths: Paths) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(paths.mlruns / 'mlflow.db').resolve()}"


def run_link(paths: Paths, run_id: str) -> str:
    """Where to look at a run: its page on a tracking server, or the store and the UI command."""
    uri = tracking_uri(paths)
    experiment = mlflow.get_run(run_id).info.experiment_id
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return f"run {run_id} of experiment {experiment} in {uri} (browse: mlflow ui --backend-store-uri {uri})"


def _sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def configure(paths: Paths, *, create: bool = True) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id.

    With `create=False` (readers such as `lineage`) a missing SQLite store is an error, not a new
    empty one."""
    uri = tracking_uri(paths)
    db = _sqlite_file(uri)
    if db is not None and not create and not db.is_file():
        raise DesensitizeError(f"no MLflow tracking store at {db}: run the pipeline first (`make run`)")
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        if not create:
            raise DesensitizeError(f"no {EXPERIMENT!r} experiment in the MLflow store {uri}: run the pipeline first")
        # Next to a SQLite store, not in ./mlruns of whatever directory the process started in.
        location = (db.parent / "artifacts").resolve().as_uri() if db is not None else None
        try:
            experiment_id = mlflow.create_experiment(EXPERIMENT, artifact_location=location)
        except MlflowException:  # another process created it meanwhile
            experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


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


def _item_path(item: str, paths: Paths) -> Path:
    kind, _, name = item.partition("/")
    if kind == "raw":
        return paths.raw
    if kind in ("release", "attack-sample"):
        return paths.release
    if kind == "model":
        return paths.reference_model if name == "reference" else paths.model(name)
    raise DesensitizeError(f"unknown tracked item {item!r}")


def _digest(item: str, paths: Paths, params: Params) -> str:
    digest = dvc_md5(_item_path(item, paths))
    if item != "attack-sample":
        return digest
    # Not a DVC output: the seeded sample of the release that the attackers get, named by the
    # release digest and the sample's indices.
    from desensitize.attack_suite import sample_indices
    from desensitize.release import read_release_info

    n = read_release_info(paths.release).counts["train"]
    indices = sample_indices(n, params.attack.sample, params.seed).astype("<i8")
    return hashlib.md5(digest.encode() + indices.tobytes()).hexdigest()


# MLflow's dataset digest column holds 36 characters: a split's sha256 is logged by its first 32.
DATASET_DIGEST_CHARS = 32
DIGESTS_ARTIFACT = "digests/{direction}.json"


def _log_items(items: tuple[str, ...], direction: str, paths: Paths, params: Params) -> None:
    """Datasets go through `mlflow.log_input`; every item's digest (the DVC md5 that lineage links
    by) is also a tag, for search, and all of them an artifact (digests/input.json, output.json),
    which unlike a tag cannot be edited afterwards. A raw split's dataset digest is its own
    (desensitize.splits.split_digest), the DVC md5 of `data/raw` is in its source."""
    recorded = {}
    for item in items:
        path = _item_path(item, paths)
        if not path.exists():
            continue
        digest = _digest(item, paths, params)
        mlflow.set_tag(item_tag(direction, item), digest)
        recorded[item] = digest
        if item.startswith("model/"):
            continue
        where = path.resolve().relative_to(paths.root.resolve()).as_posix()
        kind, _, split = item.partition("/")
        if kind == "raw":
            source = DvcOutputSource(where, split=split, dvc_md5=digest)
            dataset_digest = split_digest(paths.raw, split)[:DATASET_DIGEST_CHARS]
        else:
            source, dataset_digest = DvcOutputSource(where), digest
        mlflow.log_input(MetaDataset(source, name=item, digest=dataset_digest), context=direction)
    if recorded:
        mlflow.log_dict(recorded, DIGESTS_ARTIFACT.format(direction=direction))


def _safe_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """Flattened, with the characters MLflow refuses in names replaced."""
    return {_UNSAFE_KEY.sub("_", key): value for key, value in flatten(tree).items()}


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in _safe_keys(metrics).items() if isinstance(v, int | float)}  # bools as 0 / 1


def _stage_params(stage: Stage, params: Params) -> dict[str, str]:
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
def stage_run(stage: Stage, params: Params, paths: Paths) -> Iterator[Callable[[dict[str, Any]], dict[str, Any]]]:
    """A child run around one stage. Yields `record(metrics)`, which the caller passes the stage's
    result through. A stage that raises leaves its run FAILED, with the error as a tag and only
    the artifacts it wrote itself."""
    configure(paths)
    tags = {**_run_tags(paths, params), KIND_TAG: "stage", STAGE_TAG: stage.name}
    if mlflow.active_run() is not None:  # in-process under pipeline_run (or a caller's own run)
        run = mlflow.start_run(run_name=stage.name, nested=True, tags=tags)
    else:
        run = mlflow.start_run(run_name=stage.name, parent_run_id=_parent_run_id(), tags=tags)
    with run:
        mlflow.log_params(_stage_params(stage, params))
        _log_items(stage.reads, "input", paths, params)
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
        _log_items(stage.writes, "output", paths, params)
        mlflow.log_metrics(_numeric(result))
        _log_artifacts(stage, paths)


def _log_artifacts(stage: Stage, paths: Paths, since: float | None = None) -> None:
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
def pipeline_run(paths: Paths, *, tags: dict[str, str] | None = None) -> Iterator[str]:
    """The parent run of one pipeline execution; yields its id. Stage runs started meanwhile, in
    this process or in child processes, become its children. It ends FAILED if the body raises,
    and keeps the dvc.lock the execution left behind (tag and artifact)."""
    configure(paths)
    run_tags = {**_run_tags(paths, _params_or_none(paths)), KIND_TAG: "pipeline", **(tags or {})}
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
