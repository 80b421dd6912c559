"""Where the independent units of work run: in this process one after another (`sync`), or as tasks on a
Dask cluster (`local`: a LocalCluster this run starts and stops; or the address of an existing scheduler).

A unit is a function of its own arguments: its seed comes from what it is (a sweep point's seed, a
candidate's name), never from the worker that runs it or when, so every scheduler gives the same
results. Torch's CPU kernels split their reductions by thread count, so each unit runs with
`compute.threads` torch threads wherever it runs, `sync` included; capped at the CPU cores of the
process that runs it (threads beyond the cores only wait on each other: 1000 threads on 2 cores made
a search epoch take a minute instead of a second), which the run's log says. Units that need the GPU ask for the
Dask resource `GPU`; only workers that declare it get them (a LocalCluster declares it on CUDA machines,
workers of an external cluster with `dask worker --resources GPU=1`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import torch

from desensitize.config import SCHEDULER_PATTERN, ComputeParams
from desensitize.errors import DesensitizeError

log = logging.getLogger(__name__)
SCHEDULER_ENV = "DESENSITIZE_SCHEDULER"  # overrides compute.scheduler
# True while a unit runs: the units it starts run in its process (a worker has no cluster of its own)
_IN_UNIT: ContextVar[bool] = ContextVar("desensitize_in_unit", default=False)
U = TypeVar("U")
R = TypeVar("R")


def scheduler(cfg: ComputeParams) -> str:
    """compute.scheduler, or the environment's override."""
    value = os.environ.get(SCHEDULER_ENV, "").strip() or cfg.scheduler
    if not re.fullmatch(SCHEDULER_PATTERN, value):
        raise DesensitizeError(
            f"{SCHEDULER_ENV}={value!r}: expected local, sync or a scheduler address (tcp://host:port; "
            "also tls://, inproc://, ucx://, ws:// or wss://)"
        )
    return value


def cores() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def unit_threads(threads: int) -> int:
    """The torch threads a unit runs with: compute.threads, capped at the CPU cores of this process."""
    return min(threads, cores())


def warn_if_capped(cfg: ComputeParams) -> None:
    """Say in the log when compute.threads is beyond this machine's cores, and what units run with."""
    if cfg.threads > cores():
        log.warning(
            "compute.threads = %(threads)d is more than the %(cores)d CPU cores here: capped at %(cores)d, so each "
            "unit runs with %(cores)d torch threads and gives the results of compute.threads = %(cores)d (a Dask "
            "worker caps at its own cores)",
            {"threads": cfg.threads, "cores": cores()},
        )


def cluster_kwargs(cfg: ComputeParams) -> dict[str, Any]:
    """LocalCluster arguments for `cfg`: `cfg.workers` worker processes, by default one per `threads` cores
    (one on a CUDA machine), each running one unit at a time and declaring the GPU resource where CUDA is
    present; no dashboard, no memory-limit restarts."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    workers = cfg.workers or (1 if gpus else max(1, cores() // cfg.threads))
    return {
        "n_workers": workers,
        "threads_per_worker": 1,  # one unit at a time per worker; the unit sets its own torch threads
        "processes": True,
        "dashboard_address": None,
        "memory_limit": 0,
        "resources": {"GPU": 1} if gpus else None,
        "silence_logs": logging.WARNING,
    }


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """This process's torch CPU threads set to `threads`, at most its cores, for the block (restored
    afterwards): work done in the process itself then gives what the same work gives as a unit."""
    previous = torch.get_num_threads()
    torch.set_num_threads(unit_threads(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_unit(fn: Callable[[U], R], threads: int, unit: U) -> R:
    """fn(unit) with `threads` torch CPU threads (torch_threads). Units it starts run in its process."""
    token = _IN_UNIT.set(True)
    try:
        with torch_threads(threads):
            return fn(unit)
    finally:
        _IN_UNIT.reset(token)


class Units(Protocol):
    """What runs units: an Executor, or the Prefect sweep flow's task runner."""

    def map(
        self,
        fn: Callable[[U], R],
        units: Sequence[U],
        *,
        gpu: bool = False,
        name: str = "unit",
        done: Callable[[int, R], None] | None = None,
    ) -> list[R]: ...


class Executor:
    """Runs units; `map` returns their results in the order of the units. On `local` the cluster starts at
    the first `map` of two or more units (a stage with one unit never pays for it) and stops with the
    `executor` context; where it would have one worker (cores <= threads, or one GPU) the units run
    in this process instead."""

    def __init__(self, cfg: ComputeParams, stack: contextlib.ExitStack | None = None) -> None:
        self.cfg = cfg
        self.where = "sync" if stack is None or _IN_UNIT.get() else scheduler(cfg)
        if self.where == "local" and cluster_kwargs(cfg)["n_workers"] == 1:
            self.where = "sync"  # a cluster of one worker runs the same units, only later
        self._stack = stack
        self._client: Any = None

    def map(
        self,
        fn: Callable[[U], R],
        units: Sequence[U],
        *,
        gpu: bool = False,
        name: str = "unit",
        done: Callable[[int, R], None] | None = None,
    ) -> list[R]:
        """fn over units; `gpu`: they need a GPU worker; `done(i, result)` is called as each one finishes."""
        if self.where == "sync" or len(units) < 2:
            results = []
            for i, unit in enumerate(units):
                results.append(run_unit(fn, self.cfg.threads, unit))
                if done:
                    done(i, results[-1])
            return results
        from distributed import as_completed

        client = self._connect()
        futures = client.map(
            run_unit,
            [fn] * len(units),
            [self.cfg.threads] * len(units),
            list(units),
            key=[f"{name}-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(units))],
            pure=False,
            resources={"GPU": 1} if gpu else None,
        )
        index = {future.key: i for i, future in enumerate(futures)}
        try:
            results: list[Any] = [None] * len(units)
            for future in as_completed(futures):
                i = index[future.key]
                results[i] = future.result()  # re-raises the unit's own exception
                if done:
                    done(i, results[i])
            return results
        finally:
            client.cancel(futures)

    def _connect(self) -> Any:
        if self._client is None:
            self._client = self._stack.enter_context(_client(self.where, self.cfg))
        return self._client


@contextlib.contextmanager
def _client(where: str, cfg: ComputeParams) -> Iterator[Any]:
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as exc:  # pragma: no cover - installed with the package
        raise DesensitizeError(f"compute.scheduler = {where}: needs dask.distributed ({exc})") from None
    if where != "local":
        try:
            client = Client(where, timeout="30s")
        except OSError as exc:
            raise DesensitizeError(f"compute.scheduler = {where}: cannot reach the Dask scheduler ({exc})") from None
        with client:
            client.forward_logging("desensitize", level=logging.INFO)  # the units' progress, in this process's log
            yield client
        return
    kwargs = cluster_kwargs(cfg)
    with dask.config.set({"distributed.scheduler.allowed-failures": cfg.retries}):
        with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
            client.forward_logging("desensitize", level=logging.INFO)
            log.info(
                "Dask LocalCluster: %d worker processes, %d torch thread(s) per unit", kwargs["n_workers"], cfg.threads
            )
            yield client


@contextlib.contextmanager
def executor(cfg: ComputeParams) -> Iterator[Executor]:
    """An Executor on the scheduler `cfg` names (inside a unit: in that unit's process, one after another);
    a LocalCluster it starts is stopped on exit."""
    if not _IN_UNIT.get():
        warn_if_capped(cfg)
    with contextlib.ExitStack() as stack:
        yield Executor(cfg, stack)
