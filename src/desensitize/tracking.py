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

Several processes may share a store: its first use (MLflow creates the tables and migrates them) and the
champion move of the registry hold an exclusive lock per store (`store_lock`). Every run records the
process that owns it (host, pid, process start); a run left RUNNING by a process that was killed is
set KILLED when the next run starts in the same store on that host (`end_orphaned_runs`).

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
import socket
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
from desensitize.storage import flatten, sha256_file, sqlite_file, store_lock
from desensitize.versioning import code_version, dvc_md5

log = logging.getLogger(__name__)

PARENT_ENV = "DESENSITIZE_MLFLOW_PARENT_RUN_ID"
EXPERIMENT = "desensitize"
PREFIX = "desensitize."
STAGE_TAG = PREFIX + "stage"
KIND_TAG = PREFIX + "kind"
ERROR_TAG = PREFIX + "error"
OWNER_HOST_TAG, OWNER_PID_TAG, OWNER_START_TAG = (PREFIX + f"owner.{key}" for key in ("host", "pid", "start"))
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


def configure(paths: Paths, *, create: bool = True) -> str:
    """Point MLflow at the project's store and experiment; returns the experiment id.

    The first use of a store creates its tables, which two processes must not do at once: writers
    get there under `store_lock`. With `create=False` (readers such as `lineage`, which take no lock,
    so a read-only store will do) a missing SQLite store is an error, not a new empty one."""
    uri = tracking_uri(paths)
    db = sqlite_file(uri)
    if db is not None and not create and not db.is_file():
        raise DesensitizeError(f"no MLflow tracking store at {db}: run the pipeline first (`make run`)")
    mlflow.set_tracking_uri(uri)
    with store_lock(uri, "init") if create else contextlib.nullcontext():
        experiment = mlflow.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            if not create:
                raise DesensitizeError(
                    f"no {EXPERIMENT!r} experiment in the MLflow store {uri}: run the pipeline first"
                )
            # Next to a SQLite store, not in ./mlruns of whatever directory the process started in.
            location = (db.parent / "artifacts").resolve().as_uri() if db is not None else None
            try:
                experiment_id = mlflow.create_experiment(EXPERIMENT, artifact_location=location)
            except MlflowException:  # another host's process created it meanwhile
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


def _process_start(pid: int) -> str | None:
    """When process `pid` of this host started, `<boot id>/<clock ticks after boot>` (Linux /proc); None
    when it is gone (a zombie included) or cannot be seen. With the pid it names one process: a later
    process given the same pid started at another time."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces: fields 3 on
    return None if fields[0] == "Z" else f"{boot}/{fields[19]}"  # field 3 the state, field 22 the start


def _owner_tags() -> dict[str, str]:
    """The process that owns a run, so a later run can tell whether it is gone."""
    pid = os.getpid()
    return {
        OWNER_HOST_TAG: socket.gethostname(),
        OWNER_PID_TAG: str(pid),
        OWNER_START_TAG: _process_start(pid) or "unknown",
    }


def end_orphaned_runs(experiment_id: str) -> list[str]:
    """Set KILLED every RUNNING run of the experiment whose owning process, on this host, is gone (a
    process killed by SIGKILL or out of memory cannot end its run); returns their ids.

    Runs owned by another host are left alone: whether their process lives cannot be seen from here.
    So are runs without an owner's start time (older runs, or a host without /proc)."""
    client = mlflow.MlflowClient()
    query = f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST_TAG}` = '{socket.gethostname()}'"
    orphans: list[str] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], query, page_token=token)
        orphans += [run.info.run_id for run in page if _orphaned(run.data.tags)]
        token = page.token
        if not token:
            break
    for run_id in orphans:
        client.set_terminated(run_id, status="KILLED")
    if orphans:
        log.warning(
            "%d MLflow run(s) left RUNNING by a process of this host that is gone, now KILLED: %s",
            len(orphans),
            ", ".join(orphans),
        )
    return orphans


def _orphaned(tags: dict[str, str]) -> bool:
    started = tags.get(OWNER_START_TAG, "unknown")
    return started != "unknown" and _process_start(int(tags[OWNER_PID_TAG])) != started


@contextlib.contextmanager
def stage_run(stage: Stage, params: Params, paths: Paths) -> Iterator[Callable[[dict[str, Any]], dict[str, Any]]]:
    """A child run around one stage. Yields `record(metrics)`, which the caller passes the stage's
    result through. A stage that raises leaves its run FAILED, with the error as a tag and only
    the artifacts it wrote itself."""
    end_orphaned_runs(configure(paths))
    tags = {**_run_tags(paths, params), **_owner_tags(), KIND_TAG: "stage", STAGE_TAG: stage.name}
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
    end_orphaned_runs(configure(paths))
    run_tags = {**_run_tags(paths, _params_or_none(paths)), **_owner_tags(), KIND_TAG: "pipeline", **(tags or {})}
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
    run_tags = {**_run_tags(paths, None), **_owner_tags(), KIND_TAG: "sweep", **(tags or {})}
    with mlflow.start_run(run_name="sweep", tags=run_tags) as run:
        yield run.info.run_id


def log_sweep_point(parent_id: str, name: str, params: Params, row: dict[str, Any]) -> str:
    """A finished sweep point as a child of `parent_id`: its seed and masks settings as params, its row's
    numbers (accuracies, privacy scores, limits; booleans as 0 / 1) as metrics, its text (family,
    template, best attacker, why a searched point released nothing) as tags. Returns the run id."""
    text = {k: str(v)[:4000] for k, v in row.items() if isinstance(v, str)}
    tags = {**_owner_tags(), KIND_TAG: "sweep_point", **{PREFIX + k: v for k, v in text.items()}}
    with mlflow.start_run(run_name=name, parent_run_id=parent_id, nested=True, tags=tags) as run:
        mlflow.log_params({"seed": params.seed, **_safe_keys({"masks": params.masks.model_dump(mode="json")})})
        mlflow.log_metrics(_numeric({k: v for k, v in row.items() if v is not None and k not in text}))
        return run.info.run_id
