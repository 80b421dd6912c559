"""The Prefect flow `desensitization-pipeline`: the stages of dvc.yaml as tasks, then DVC versioning.

A run without overrides (the schedule's) runs the committed params.yaml and dvc.yaml in the checkout
(it refuses, naming them, when either has uncommitted changes). Each stage task calls
`desensitize.orchestration.runner.run_stage`, as the CLI (and so `dvc repro`) does; a stage runs only
when DVC says it is stale. Afterwards the stages that ran are committed to DVC (`dvc commit`) and the
cache is pushed (`dvc push`), so a Prefect run leaves the same records as `dvc repro` + `dvc push`. A
failed privacy gate fails the run and pushes nothing.

A run with overrides is a DVC experiment named after the flow run, in a workspace of its own
(desensitize.orchestration.experiment.run_experiment, which `desensitize repro --set` calls too): the
checkout's files stay as they are, and `dvc exp show` lists the experiment.

    python flows/pipeline.py                        # one run, here, with the committed params.yaml
    python flows/pipeline.py --set masks.template=restorability --set masks.cell=7 --set masks.hidden_ratio=0.9375
    python flows/pipeline.py --serve                # long-running local scheduler (nightly, UTC)

`prefect deploy --all` deploys it from prefect.yaml onto a process work pool (README: operators).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from desensitize.cli import SetOption
from desensitize.config import Params
from desensitize.errors import DesensitizeError
from desensitize.orchestration.experiment import checkout_lock, require_committed, run_experiment
from desensitize.orchestration.overrides import experiment_name, parse_set
from desensitize.orchestration.pipeline import STAGES, check_for_dvc
from desensitize.orchestration.runner import run_stage
from desensitize.paths import Paths
from desensitize.reporting.summary import run_report
from desensitize.tracking import versioning
from desensitize.tracking.runs import pipeline_run
from desensitize.tracking.store import run_link

FLOW_NAME = "desensitization-pipeline"
NIGHTLY_CRON = "0 2 * * *"  # 02:00 UTC; prefect.yaml has the same schedule for the deployment
IO_BOUND_STAGES = {"ingest"}  # read sources from disk or a share: worth retrying
IO_RETRIES = 2
IO_RETRY_DELAYS = [2, 10]  # seconds before the first and the second retry


def _unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a transient failure, not bad input: a DesensitizeError never succeeds on retry."""
    return not isinstance(state.result(raise_on_failure=False), DesensitizeError)


def _run_name() -> str:
    """The project, the start time and the overrides, e.g. `desensitize 2026-11-26 02:00Z masks.cell=7`."""
    parameters = flow_run.parameters
    project = Path(parameters.get("params_file", "params.yaml")).resolve().parent.name
    overrides = parameters.get("overrides") or {}
    name = f"{project} {datetime.now(UTC):%Y-%m-%d %H:%M}Z"
    return " ".join([name, *(f"{key}={value}" for key, value in sorted(overrides.items()))])


def _stage(name: str, params: Params, root: Path, device: str) -> dict[str, Any]:
    return run_stage(name, params, Paths(root), device)


def stage_task(name: str):
    """One task per stage in STAGES, so a stage added there is run here too. No Prefect caching:
    DVC decides what is up to date. Training stages get no retries (CPU-bound, deterministic)."""
    retries = (
        {"retries": IO_RETRIES, "retry_delay_seconds": IO_RETRY_DELAYS, "retry_condition_fn": _unless_user_error}
        if name in IO_BOUND_STAGES
        else {}
    )
    return task(_stage, name=name, task_run_name=name, cache_policy=NO_CACHE, **retries)


@task(
    name="dvc-status",
    task_run_name="dvc-status-{stage}",
    cache_policy=NO_CACHE,
    retries=IO_RETRIES,
    retry_delay_seconds=IO_RETRY_DELAYS,
)
def is_stale(root: Path, stage: str) -> bool:
    """Asked just before the stage would run, so the outputs of upstream stages that ran in this
    flow are seen, exactly as `dvc repro` decides."""
    return bool(versioning.stage_changes(root, stage))


@task(name="dvc-commit", cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def dvc_commit(root: Path, stages: list[str]) -> None:
    versioning.commit(root, stages)


@task(name="dvc-push", cache_policy=NO_CACHE, retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS)
def dvc_push(root: Path) -> int:
    return versioning.push(root)


def run_stages(params: Params, root: Path, device: str, executed: list[str], skipped: list[str]) -> None:
    """Every stage in STAGES order, skipping those DVC finds up to date; appends to the lists as it
    goes, so a caller still knows what completed when a stage raises."""
    for name in STAGES:
        if is_stale(root, name):
            stage_task(name)(name, params, root, device)
            executed.append(name)
        else:
            skipped.append(name)


def publish_report(
    paths: Paths, executed: list[str], skipped: list[str], error: str | None, mlflow_run_url: str | None
) -> None:
    """The run's Markdown artifact: metrics table, gate verdict, and the MLflow run when given."""
    publish(run_report(paths, executed=executed, skipped=skipped, error=error, mlflow_run_url=mlflow_run_url))


def publish(markdown: str) -> None:
    create_markdown_artifact(markdown, key="desensitization-report", description="Metrics and privacy gate of this run")


experiment_task = task(run_experiment, name="dvc-exp-run", cache_policy=NO_CACHE)


@flow(name=FLOW_NAME, flow_run_name=_run_name, validate_parameters=True)
def desensitization_pipeline(
    params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Run the desensitization pipeline of the DVC project holding `params_file`. Without `overrides`:
    on the committed params.yaml and dvc.yaml, in the checkout, then version its outputs. With
    `overrides` (dotted key -> value, e.g. {"masks.cell": 7}): as a DVC experiment named after this
    flow run, in a workspace of its own; the checkout's files stay as they are."""
    logger = get_run_logger()
    path = Path(params_file).resolve()
    root = path.parent
    if path.name != "params.yaml":
        raise DesensitizeError(f"{path}: dvc.yaml's stages read params.yaml beside it; pass that file")
    tags = {"prefect.flow_run_id": str(flow_run.id)}
    if overrides:
        name = experiment_name(flow_run.name or "", str(flow_run.id)[:8])
        run = experiment_task(root, overrides, name, device=device, tags=tags)
        publish(run.report)
        if run.error:
            raise DesensitizeError(run.error)
        logger.info("DVC experiment %s (%s): ran %s", run.name, run.rev, run.executed or "nothing")
        return {"experiment": run.name, "rev": run.rev, "executed": run.executed, "skipped": run.skipped}
    versioning.check_project(root)  # before any work: a run that could not be pushed does not start
    require_committed(root)
    params = check_for_dvc(path)  # every key DVC reads, a source for it to watch, a grid that fits
    paths = Paths(root)
    executed: list[str] = []
    skipped: list[str] = []
    # It writes the checkout: other runs that would (or would copy it, for an experiment) wait.
    # One MLflow parent run for this flow run: the stage runs become its children, and it keeps
    # the dvc.lock that the DVC commit below writes.
    with checkout_lock(root), pipeline_run(paths, tags=tags) as parent_id:
        link = run_link(paths, parent_id)
        try:
            run_stages(params, root, device, executed, skipped)
        except Exception as exc:
            # As `dvc repro` does, keep the records of the stages that completed; push nothing.
            if executed:
                dvc_commit(root, executed)
            publish_report(paths, executed, skipped, str(exc), link)
            raise
        if executed:
            dvc_commit(root, executed)
        pushed = dvc_push(root)
    publish_report(paths, executed, skipped, None, link)
    logger.info("ran %s; up to date: %s; %d files pushed", executed or "nothing", skipped or "nothing", pushed)
    return {"executed": executed, "skipped": skipped, "pushed": pushed}


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def main(
    params: Annotated[str, typer.Option("--params", "-p", help="The project's params.yaml.")] = "params.yaml",
    set_: SetOption = [],  # noqa: B006 - typer reads a list default
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    serve: Annotated[
        bool, typer.Option(help=f"Serve the flow on a schedule ({NIGHTLY_CRON} UTC) until stopped.")
    ] = False,
) -> None:
    """Run the pipeline once as a Prefect flow, or serve it nightly (a long-running local scheduler)."""
    try:
        overrides = parse_set(set_)
    except DesensitizeError as exc:
        raise typer.BadParameter(str(exc)) from None
    parameters = {"params_file": params, "overrides": overrides, "device": device}
    if serve:
        from prefect.schedules import Cron

        desensitization_pipeline.serve(
            name="nightly-local", schedules=[Cron(NIGHTLY_CRON, timezone="UTC")], parameters=parameters
        )
    else:
        state = desensitization_pipeline(**parameters, return_state=True)
        if not state.is_completed():
            typer.echo(f"error: {state.message}", err=True)
            raise typer.Exit(2)


if __name__ == "__main__":
    cli()
