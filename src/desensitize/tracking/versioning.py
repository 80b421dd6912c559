"""Code and data versions: the git commit of the code, what a checkout has not committed, the DVC
experiment a process runs in, DVC digests of outputs, and the DVC bookkeeping for a caller that
runs stages in-process (the Prefect flow) instead of through `dvc repro`: which stages are stale,
recording the ones that ran, pushing to the remote.

Done this way, a run leaves the same dvc.lock and cache as `dvc repro` would, so `dvc status`
is clean afterwards and `dvc repro` finds nothing to do. And who holds the project's DVC locks, for a
`dvc repro` that DVC refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import desensitize
from desensitize.errors import DesensitizeError

if TYPE_CHECKING:
    from dvc.repo import Repo

log = logging.getLogger(__name__)


def code_version() -> dict[str, Any]:
    """Package version and, when run from a git checkout, the commit and whether it was dirty."""
    here = Path(__file__).resolve().parent
    version: dict[str, Any] = {"package": desensitize.__version__, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        version.update(git_commit=commit, git_dirty=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def uncommitted(root: Path, files: Sequence[str]) -> list[str]:
    """Those of `files` (paths in the git checkout `root`) that differ from the commit checked out:
    changed, staged, deleted or untracked, each as `git status --short` shows it (`M params.yaml`)."""
    try:
        result = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=all", "--", *files],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise DesensitizeError(f"{root}: git status failed ({exc})") from None
    if result.returncode != 0:
        raise DesensitizeError(f"{root}: not a git checkout ({' '.join(result.stderr.split())})")
    return [" ".join(line.split()) for line in result.stdout.splitlines() if line.strip()]


# DVC sets it for the stage commands of every experiment (`dvc exp run`, an override run).
DVC_EXP_NAME = "DVC_EXP_NAME"


def dvc_experiment() -> str | None:
    """The name of the DVC experiment this process runs a stage of, None outside one."""
    return os.environ.get(DVC_EXP_NAME) or None


def dvc_md5(path: Path) -> str:
    """The md5 DVC records for an output (a directory's ends in `.dir`), hashed by DVC's own code."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    path = Path(path)
    if not path.exists():
        raise DesensitizeError(f"{path}: not found, cannot compute its DVC digest")
    staging = HashFileDB(MemoryFileSystem(global_store=False), "/staging")
    _, _, obj = build(staging, str(path.resolve()), LocalFileSystem(), "md5")
    return obj.hash_info.value


@contextlib.contextmanager
def open_repo(root: Path) -> Iterator[Repo]:
    """The DVC project at `root`, entered as the working directory: DVC resolves stage names and
    paths against it, as the `dvc` command does. A fresh handle each time, so no stale index is
    reused. The flow runs its tasks one after another, so the directory change cannot race."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    with contextlib.chdir(root):
        try:
            repo = Repo(".")
        except NotDvcRepoError:
            raise DesensitizeError(
                f"{root}: not a DVC project (no .dvc/ directory; run `git init && dvc init`)"
            ) from None
        try:
            yield repo
        finally:
            repo.close()


def cache_dir(root: Path) -> Path:
    """The DVC cache directory of the project at `root` (.dvc/cache unless its config says otherwise)."""
    with open_repo(root) as repo:
        return Path(repo.cache.local_cache_dir).resolve()


def check_project(root: Path) -> str:
    """Fail before any work unless `root` is a DVC project with dvc.yaml and a default remote;
    returns the remote's name."""
    if not (root / "dvc.yaml").is_file():
        raise DesensitizeError(f"{root}: no dvc.yaml; the flow runs the stages of a DVC project")
    with open_repo(root) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise DesensitizeError(
                f"{root}: no default DVC remote, so the outputs could not be pushed; "
                "add one with `dvc remote add -d NAME URL` (see .dvc/config)"
            )
        if name not in repo.config["remote"]:
            raise DesensitizeError(f"{root}: the default DVC remote {name!r} is not defined in .dvc/config")
        return name


def stage_changes(root: Path, stage: str) -> dict[str, Any]:
    """What `dvc status STAGE` reports for this stage alone: empty when it is up to date."""
    from dvc.exceptions import DvcException

    with open_repo(root) as repo:
        try:
            return repo.status(targets=[stage])
        except DvcException as exc:
            raise DesensitizeError(f"dvc status {stage}: {exc}") from None


def commit(root: Path, stages: Sequence[str]) -> None:
    """`dvc commit -f STAGE...`: cache the outputs and write dvc.lock for stages that just ran.
    The lock then holds the deps, params and outs hashes `dvc repro` would have written."""
    from dvc.exceptions import DvcException

    with open_repo(root) as repo:
        for stage in stages:
            try:
                repo.commit(stage, force=True)
            except DvcException as exc:
                raise DesensitizeError(f"dvc commit {stage}: {exc}") from None
    log.info("dvc commit: %s", ", ".join(stages))


def push(root: Path) -> int:
    """`dvc push` to the default remote; returns how many files were uploaded."""
    from dvc.exceptions import DvcException

    with open_repo(root) as repo:
        try:
            pushed = repo.push()
        except DvcException as exc:
            raise DesensitizeError(f"dvc push: {exc}") from None
    log.info("dvc push: %d files uploaded", pushed)
    return pushed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def dvc_lock_holders(root: Path) -> list[str]:
    """The live processes that hold the DVC project's locks now, as `PID n (command)`: the repo lock
    (`.dvc/tmp/lock`, held while DVC collects and records stages; probed without waiting, and let go at
    once) and the stage locks in `.dvc/tmp/rwlock` (held while a stage's command runs). Empty when none."""
    tmp = Path(root) / ".dvc" / "tmp"
    holders: dict[int, str] = {}
    try:
        stage_locks = json.loads((tmp / "rwlock").read_text())
    except (OSError, ValueError):
        stage_locks = {}
    for mode in ("read", "write"):
        for infos in (stage_locks.get(mode) or {}).values():
            for info in infos if isinstance(infos, list) else [infos]:
                pid = info.get("pid") if isinstance(info, dict) else None
                if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
                    holders[pid] = str(info.get("cmd", "dvc"))
    if (tmp / "lock").is_file():
        with open(tmp / "lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # how DVC (zc.lockfile) takes it
            except BlockingIOError:
                handle.seek(0)
                text = handle.read().strip()
                pid = int(text) if text.isdigit() else None
                holders.setdefault(pid or 0, "dvc")
            else:
                fcntl.flock(handle, fcntl.LOCK_UN)
    return [f"PID {pid}: {cmd}" if pid else "a process holding .dvc/tmp/lock" for pid, cmd in sorted(holders.items())]
