"""The MLflow store: where it is, its first use (tables created under a lock), the experiment, links
to runs, and the process that owns each run, so a run left RUNNING by a killed process is set KILLED
when the next run starts in the same store on that host.

Nothing happens at import: the entry points (the CLI, `run_stage`, `pipeline_run`) call `configure`.
The store is `sqlite:///<project>/mlruns/mlflow.db` with artifacts in `mlruns/artifacts/`, unless
MLFLOW_TRACKING_URI says otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from desensitize.errors import DesensitizeError
from desensitize.paths import Paths
from desensitize.storage import sqlite_file, store_lock

log = logging.getLogger(__name__)

EXPERIMENT = "desensitize"
PREFIX = "desensitize."  # every tag this project sets
OWNER_HOST_TAG, OWNER_PID_TAG, OWNER_START_TAG = (PREFIX + f"owner.{key}" for key in ("host", "pid", "start"))


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


def owner_tags() -> dict[str, str]:
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
