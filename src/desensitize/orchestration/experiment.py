"""Override runs: a run with overrides is a DVC experiment in a workspace of its own, never a change to
the checkout, so an ad-hoc run never changes what the schedule runs.

`run_experiment` is the one implementation behind the Prefect flow's `overrides` and `desensitize
repro --set`. It validates the overrides on top of the committed params.yaml (a bad key or value fails
at once, naming the key), then, under a shared lock on the checkout, clones the checkout's git
repository into `.dvc/tmp/overrides/<name>/` (hard-linked objects, HEAD checked out) and copies in what
the checkout has not committed (dvc.lock, metrics/, plots/, the cards: the records of the last runs),
so the experiment starts where the checkout stands and reruns only what its overrides touch. The
clone's DVC cache is the project's own (`cache.dir`), not a copy: outputs are checked out from it and
new ones land in it. The checkout's attack cache (.cache/attack) is hard-linked in, so a candidate the
scheduled search already attacked is not attacked again. In the clone it runs `dvc exp run -n <name>
-S ++key=value ...`; stages run as `desensitize <stage>` there, tracked into the project's MLflow
store (an absolute MLFLOW_TRACKING_URI) as children of one parent run tagged with the experiment's
name. A finished experiment's ref is pushed into the checkout's git repository, where `dvc exp show`
lists it and `dvc exp apply` / `dvc exp branch` keep it; the clone is then removed. A failed one
records no experiment (as `dvc exp run`); its stage runs stay in MLflow, FAILED.

Each override run has its own clone, so two at once share nothing but the DVC cache and the MLflow
store, both safe to share. (`dvc exp run --temp` in the checkout itself would not do: it stashes and
restores the checkout's files while it sets up, and two at once take each other's queued entries.)
A run without overrides writes the checkout: it holds `checkout_lock` exclusively, so override runs
copy the checkout only between such runs, never half-way through one.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from desensitize.errors import DesensitizeError
from desensitize.orchestration.overrides import experiment_name, set_args
from desensitize.orchestration.pipeline import STAGES, check_for_dvc
from desensitize.paths import Paths
from desensitize.reporting.summary import run_report, text
from desensitize.storage import sqlite_file
from desensitize.tracking import versioning
from desensitize.tracking.runs import ERROR_TAG, EXPERIMENT_TAG, PARENT_ENV, STAGE_TAG, pipeline_run
from desensitize.tracking.store import run_link, tracking_uri

log = logging.getLogger(__name__)

COMMITTED = ("params.yaml", "dvc.yaml")  # what every run reads as committed
WORKSPACES = Path(".dvc") / "tmp" / "overrides"  # ignored by git (.dvc/.gitignore) and by DVC
LOCK = Path(".dvc") / "tmp" / "desensitize-checkout.lock"
DEVICE_ENV = "DESENSITIZE_DEVICE"  # the stage commands' --device (desensitize.cli)


def require_committed(root: Path) -> None:
    """Fail, naming them, when params.yaml or dvc.yaml differ from the commit checked out: a run without
    overrides runs the committed ones, and an override run starts from them."""
    changed = versioning.uncommitted(root, COMMITTED)
    if changed:
        raise DesensitizeError(
            f"{root}: uncommitted changes to {', '.join(changed)} (git status); runs read the committed "
            "params.yaml and dvc.yaml, so that an ad-hoc change never becomes what the schedule runs: commit "
            "the change, or drop it (`git checkout -- params.yaml dvc.yaml`), and pass a what-if as overrides"
        )


@contextlib.contextmanager
def checkout_lock(root: Path, *, shared: bool = False) -> Iterator[None]:
    """Between the processes of this host: exclusive for a run that writes the checkout (a run without
    overrides), shared for one that copies it (an override run setting up its workspace)."""
    path = root / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another run of %s to finish (it holds %s)", root, path)
            fcntl.flock(handle, mode)  # released when the file is closed, or its process dies
        yield


@dataclass
class ExperimentRun:
    """What an override run did: the experiment (`rev`: its commit, None when it failed), the stages
    that ran (the others were up to date or restored from DVC's run cache), the error that stopped it,
    the MLflow parent run, and the run's Markdown report and summary lines (read from its workspace)."""

    name: str
    parent_run_id: str = ""
    mlflow_run: str = ""
    rev: str | None = None
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None
    report: str = ""
    summary: str = ""


def run_experiment(
    root: Path,
    overrides: dict[str, Any],
    name: str,
    *,
    device: str = "auto",
    tags: dict[str, str] | None = None,
    dvc_args: Sequence[str] = (),
) -> ExperimentRun:
    """Run the pipeline of the DVC project at `root` with `overrides` as the DVC experiment `name`, in a
    workspace of its own (see the module's docstring); `dvc_args` go to `dvc exp run` (targets, -f, ...).
    Raises DesensitizeError before any work on bad input; a failure of the run itself is returned in
    `error`, with the report of what it did."""
    root = root.resolve()
    if not overrides:
        raise DesensitizeError("an override run needs overrides; a run without them runs in the checkout")
    params = check_for_dvc(root / "params.yaml", overrides)
    if experiment_name(name) != name:
        raise DesensitizeError(f"{name!r}: not a valid experiment name; {experiment_name(name)!r} would be")
    require_committed(root)
    cache = versioning.cache_dir(root)  # and so: a DVC project
    head = _git(root, "rev-parse", "HEAD").strip()
    if _git(root, "for-each-ref", "--format=%(refname)", f"refs/exps/{head[:2]}/{head[2:]}/{name}"):
        raise DesensitizeError(f"an experiment named {name!r} exists on this commit: choose another name")
    args = set_args(params, overrides)
    store = Paths(root)
    uri = _absolute(tracking_uri(store))
    with checkout_lock(root, shared=True):
        workspace = _make_workspace(root, name, cache)
    result = ExperimentRun(name=name)
    try:
        command = [sys.executable, "-m", "dvc", "exp", "run", "-n", name, *args, *dvc_args]
        try:
            with pipeline_run(
                Paths(workspace), store=store, params=params, tags={EXPERIMENT_TAG: name, **(tags or {})}
            ) as parent_id:
                result.parent_run_id = parent_id
                result.mlflow_run = run_link(store, parent_id)
                log.info("DVC experiment %s: %s (in %s)", name, " ".join(command[1:]), workspace)
                env = {
                    **os.environ,
                    # `desensitize` and `dvc` of this interpreter first: dvc.yaml's commands call them.
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "MLFLOW_TRACKING_URI": uri,  # the project's store, not one in the workspace
                    PARENT_ENV: parent_id,
                    DEVICE_ENV: device,
                }
                status, tail = _stream(command, workspace, env)
                if status != 0:
                    raise DesensitizeError(_failure(name, parent_id, tail))
                result.rev = _publish(workspace, root, name)
        except DesensitizeError as exc:
            result.error = str(exc)
        if result.parent_run_id:
            result.executed, failed = _stages_run(result.parent_run_id)
            stop = list(STAGES).index(failed) if failed else len(STAGES)
            result.skipped = [stage for stage in list(STAGES)[:stop] if stage not in result.executed]
        paths = Paths(workspace)
        result.report = run_report(
            paths,
            executed=result.executed,
            skipped=result.skipped,
            error=result.error,
            mlflow_run_url=result.mlflow_run or None,
            experiment=_describe(result),
        )
        result.summary = text(paths)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return result


def _describe(result: ExperimentRun) -> str:
    if result.rev is None:
        return f"`{result.name}`: not recorded (DVC records an experiment only when it completes)"
    return (
        f"`{result.name}` ({result.rev[:7]}): `dvc exp show` lists it; `dvc exp apply {result.name}` brings it "
        f"into the workspace, `dvc exp branch {result.name} BRANCH` keeps it as a branch"
    )


def _absolute(uri: str) -> str:
    """A relative SQLite path means one in the current directory: fixed here, as the stages run elsewhere."""
    db = sqlite_file(uri)
    return f"sqlite:///{db.resolve()}" if db is not None and not db.is_absolute() else uri


def _git(cwd: Path, *args: str) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise DesensitizeError(f"git {' '.join(args)} in {cwd}: {' '.join(result.stderr.split())}")
    return result.stdout


def _make_workspace(root: Path, name: str, cache: Path) -> Path:
    """The experiment's own checkout: HEAD of `root`'s repository, with `root`'s uncommitted files (tracked
    changes and untracked files git does not ignore) copied in, and `root`'s DVC cache as its cache."""
    workspace = root / WORKSPACES / name
    if workspace.exists():
        raise DesensitizeError(f"{workspace} exists: another run named {name!r} is running (or was killed)")
    workspace.parent.mkdir(parents=True, exist_ok=True)
    head = _git(root, "rev-parse", "HEAD").strip()
    try:
        _git(root, "clone", "--quiet", "--local", "--no-checkout", ".", str(workspace))  # objects hard-linked
        _git(workspace, "checkout", "--quiet", "--detach", head)
        changed = _git(root, "diff", "--name-only", "--no-renames", "-z", "HEAD").split("\0")
        untracked = _git(root, "ls-files", "--others", "--exclude-standard", "-z").split("\0")
        for relative in filter(None, dict.fromkeys(changed + untracked)):
            source, target = root / relative, workspace / relative
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
            elif not source.exists():
                target.unlink(missing_ok=True)
        _configure_dvc(root, workspace, cache)
        _link_attack_cache(Paths(root), Paths(workspace))
        for key in ("user.name", "user.email"):  # DVC commits the experiment; git needs someone to sign it
            if subprocess.run(["git", "config", key], cwd=root, capture_output=True).returncode != 0:
                _git(workspace, "config", key, "desensitize" if key == "user.name" else "desensitize@localhost")
    except BaseException:
        shutil.rmtree(workspace, ignore_errors=True)
        raise
    return workspace


def _link_attack_cache(checkout: Paths, workspace: Paths) -> None:
    """The checkout's attack cache (full attack-suite results by the digest of their inputs), hard-linked
    in: a candidate the scheduled run's search already attacked is not attacked again (on MNIST-5k that
    is most of an override run's masks stage). Entries are written by rename, so what the experiment
    adds or evicts stays in its own directory."""
    if not checkout.attack_cache.is_dir():
        return
    workspace.attack_cache.mkdir(parents=True, exist_ok=True)
    for entry in checkout.attack_cache.iterdir():
        if entry.is_file() and not entry.name.startswith("."):  # not an atomic write in progress
            try:
                os.link(entry, workspace.attack_cache / entry.name)
            except OSError:  # another file system, or no hard links: a copy will do
                shutil.copy2(entry, workspace.attack_cache / entry.name)


def _configure_dvc(root: Path, workspace: Path, cache: Path) -> None:
    """The checkout's local DVC settings (remotes' credentials, cache type), with its cache as the cache."""
    from dvc.config import Config

    local = root / ".dvc" / "config.local"
    if local.is_file():
        shutil.copy2(local, workspace / ".dvc" / "config.local")
    with Config(dvc_dir=str(workspace / ".dvc")).edit("local") as config:
        config["cache"]["dir"] = str(cache)


def _stream(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run `command`, passing its output on to stderr line by line; returns its status and last lines."""
    tail: collections.deque[str] = collections.deque(maxlen=200)
    with subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        try:
            assert process.stdout is not None
            for line in process.stdout:
                sys.stderr.write(line)
                tail.append(line.rstrip("\n"))
        except BaseException:  # a cancelled flow run, Ctrl-C: stop DVC and the stage it runs, then go
            _stop_tree(process.pid)
            raise
    return process.returncode, list(tail)


def _stop_tree(pid: int) -> None:
    """Terminate a process and its descendants (it stays in our process group, so that a signal to the
    group reaches it too)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        processes = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=30)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _stages_run(parent_id: str) -> tuple[list[str], str | None]:
    """The stages that completed under the parent run, in pipeline order, and the one that failed."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [mlflow.get_run(parent_id).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    status = {run.data.tags.get(STAGE_TAG): run.info.status for run in runs}
    failed = next((stage for stage in STAGES if status.get(stage) == "FAILED"), None)
    return [stage for stage in STAGES if status.get(stage) == "FINISHED"], failed


def _failure(name: str, parent_id: str, tail: list[str]) -> str:
    """Why the experiment failed: the failed stage's error as its run recorded it, else DVC's last error."""
    import mlflow

    runs = mlflow.MlflowClient().search_runs(
        [mlflow.get_run(parent_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_id}' AND attributes.status = 'FAILED'",
    )
    for run in runs:
        if error := run.data.tags.get(ERROR_TAG):
            return f"experiment {name}: stage {run.data.tags.get(STAGE_TAG)} failed: {error}"
    errors = [line for line in tail if line.startswith(("ERROR", "error:"))]
    return f"experiment {name} failed: {' '.join((errors or tail[-3:] or ['no output'])[-1].split())}"


def _publish(workspace: Path, root: Path, name: str) -> str:
    """Push the experiment's ref (refs/exps/<baseline>/<name>, DVC's layout) from its workspace into the
    checkout's repository; returns the experiment's commit."""
    refs = [
        ref
        for ref in _git(workspace, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
        if ref.endswith(f"/{name}") and not ref.startswith("refs/exps/exec/")
    ]
    if len(refs) != 1:
        raise DesensitizeError(f"experiment {name}: expected one experiment ref in {workspace}, found {refs}")
    rev = _git(workspace, "rev-parse", refs[0]).strip()
    _git(workspace, "push", "--quiet", str(root), f"{rev}:{refs[0]}")
    return rev
