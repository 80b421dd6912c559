"""The Prefect flow `desensitization-sweep`: the privacy-utility frontier (desensitize.orchestration.sweep) with every
seed's workspace and every point a Prefect task on a Dask cluster (prefect-dask's DaskTaskRunner).

The runner follows the params' `compute` section (or DESENSITIZE_SCHEDULER): `local` starts a Dask
LocalCluster sized to the machine for the run, an address (tcp://host:port) sends the tasks to an
existing scheduler, `sync` runs them one after another in the flow's process. The points are the
same units, with the same seeds and torch threads, that `desensitize sweep` runs, so the results are
the same either way. MLflow records the sweep as one parent run with a child per point.

    python flows/sweep.py --seeds 0,1,2 --ratios 0.75,0.875,0.9375 --cells 4,7
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import dask
import typer
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from desensitize.config import ComputeParams, load_params
from desensitize.orchestration.sweep import run_sweep
from desensitize.orchestration.sweep_plan import check_axes
from desensitize.paths import Paths
from desensitize.runtime.compute import cluster_kwargs, run_unit, scheduler, warn_if_capped

FLOW_NAME = "desensitization-sweep"
U = TypeVar("U")
R = TypeVar("R")

unit_task = task(run_unit, name="unit", cache_policy=NO_CACHE)


class TaskUnits:
    """Units as Prefect tasks on the flow's task runner; results in the order of the units."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def map(
        self,
        fn: Callable[[U], R],
        units: Sequence[U],
        *,
        gpu: bool = False,
        name: str = "unit",
        done: Callable[[int, R], None] | None = None,
    ) -> list[R]:
        with dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext():
            futures = [
                unit_task.with_options(task_run_name=f"{name}-{i}").submit(fn, self.threads, unit)
                for i, unit in enumerate(units)
            ]
        index = {future.task_run_id: i for i, future in enumerate(futures)}
        results: list[Any] = [None] * len(units)
        for future in as_completed(futures):
            i = index[future.task_run_id]
            results[i] = future.result()
            if done:
                done(i, results[i])
        return results


def task_runner(cfg: ComputeParams) -> TaskRunner:
    """The flow's task runner for `cfg` (desensitize.runtime.compute's scheduler choice)."""
    where = scheduler(cfg)
    if where == "sync":
        return ThreadPoolTaskRunner(max_workers=1)
    if where == "local":
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster_kwargs(cfg))
    return DaskTaskRunner(address=where)


@flow(name=FLOW_NAME, validate_parameters=True)
def desensitization_sweep(
    params_file: str = "params.yaml",
    out: str = "reports/sweep",
    seeds: list[int] = [0],  # noqa: B006 - Prefect reads the defaults as parameters
    scopes: list[str] = ["set"],  # noqa: B006
    ratios: list[float] = [0.75, 0.875, 0.9375],  # noqa: B006
    cells: list[int] = [4, 7],  # noqa: B006
    strategies: list[str] = ["saliency", "random"],  # noqa: B006
    templates: list[str] = ["mean", "class_contrast", "mean_spread", "restorability"],  # noqa: B006
    searched: bool = True,
    attack: bool = True,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """The sweep of `desensitize sweep` (same axes, same results), its units as tasks; returns the rows."""
    path = Path(params_file).resolve()
    params = load_params(path)
    check_axes(seeds=seeds, scopes=scopes, ratios=ratios, cells=cells, strategies=strategies, templates=templates)
    warn_if_capped(params.compute)  # the units run as tasks here, not through desensitize's executor
    return run_sweep(
        params,
        Path(out) if Path(out).is_absolute() else path.parent / out,
        seeds=seeds,
        scopes=scopes,
        ratios=ratios,
        cells=cells,
        strategies=strategies,
        templates=templates,
        searched=searched,
        attack=attack,
        device=device,
        track=Paths(path.parent),
        units=TaskUnits(params.compute.threads),
    )


def run(params_file: str = "params.yaml", **parameters: Any) -> Any:
    """The flow on the task runner the params' `compute` section names; returns its final state."""
    cfg = load_params(Path(params_file)).compute
    with dask.config.set({"distributed.scheduler.allowed-failures": cfg.retries}):
        chosen = desensitization_sweep.with_options(task_runner=task_runner(cfg))
        return chosen(params_file=params_file, **parameters, return_state=True)


def _list(text: str, kind: type) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def main(
    params: Annotated[str, typer.Option("--params", "-p", help="The project's params.yaml.")] = "params.yaml",
    out: Annotated[str, typer.Option(help="Where the results go (relative: to the project).")] = "reports/sweep",
    seeds: str = "0",
    scopes: str = "set",
    ratios: str = "0.75,0.875,0.9375",
    cells: str = "4,7",
    strategies: str = "saliency,random",
    templates: str = "mean,class_contrast,mean_spread,restorability",
    searched: bool = True,
    attack: bool = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Run the sweep once as a Prefect flow (comma-separated axes, as `desensitize sweep`)."""
    state = run(
        params,
        out=out,
        seeds=_list(seeds, int),
        scopes=_list(scopes, str),
        ratios=_list(ratios, float),
        cells=_list(cells, int),
        strategies=_list(strategies, str),
        templates=_list(templates, str),
        searched=searched,
        attack=attack,
        device=device,
    )
    if not state.is_completed():
        typer.echo(f"error: {state.message}", err=True)
        raise typer.Exit(2)


if __name__ == "__main__":
    cli()
