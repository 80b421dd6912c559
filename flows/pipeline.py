"""The Prefect flow `desensitization-pipeline`: the stages of dvc.yaml as tasks, then DVC versioning.

Each stage task calls `desensitize.orchestration.runner.run_stage`, as the CLI (and so `dvc repro`) does; a
stage runs only when DVC says it is stale. Afterwards the stages that ran are committed to DVC
(`dvc commit`) and the cache is pushed (`dvc push`), so a Prefect run leaves the same records as
`dvc repro` + `dvc push`. A failed privacy gate fails the run and pushes nothing.

    python flows/pipeline.py                        # one run, here, with params.yaml
    python flows/pipeline.py --set masks.hidden_ratio=0.5
    python flows/pipeline.py --serve                # long-running local scheduler (nightly, UTC)

`prefect deploy --all` deploys it from prefect.yaml onto a process work pool (README: operators).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from desensitize.config import Params, write_overrides
from desensitize.errors import DesensitizeError
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
    """The project, the start time and the overrides, e.g. `desensitize 2026-11-26 02:00Z masks.hidden_ratio=0.5`."""
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
    markdown = run_report(paths, executed=executed, skipped=skipped, error=error, mlflow_run_url=mlflow_run_url)
    create_markdown_artifact(markdown, key="desensitization-report", description="Metrics and privacy gate of this run")


@flow(name=FLOW_NAME, flow_run_name=_run_name, validate_parameters=True)
def desensitization_pipeline(
    params_file: str = "params.yaml", overrides: dict[str, Any] | None = None, device: str = "auto"
) -> dict[str, Any]:
    """Run the desensitization pipeline of the DVC project holding `params_file` and version its
    outputs. `overrides` (dotted key -> value, e.g. {"masks.hidden_ratio": 0.5}) are validated and
    then written into the params file, like `dvc exp run -S`, so DVC records the values used."""
    logger = get_run_logger()
    path = Path(params_file).resolve()
    root = path.parent
    if path.name != "params.yaml":
        raise DesensitizeError(f"{path}: dvc.yaml's stages read params.yaml beside it; pass that file")
    versioning.check_project(root)  # before any work: a run that could not be pushed does not start
    write_overrides(path, overrides or {})
    params = check_for_dvc(path)  # every key DVC reads, a source for it to watch, a grid that fits
    paths = Paths(root)
    executed: list[str] = []
    skipped: list[str] = []
    # One MLflow parent run for this flow run: the stage runs become its children, and it keeps
    # the dvc.lock that the DVC commit below writes.
    with pipeline_run(paths, tags={"prefect.flow_run_id": str(flow_run.id)}) as parent_id:
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


def _parse_set(values: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE, e.g. masks.hidden_ratio=0.5")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@cli.command()
def main(
    params: Annotated[str, typer.Option("--params", "-p", help="The project's params.yaml.")] = "params.yaml",
    set_: Annotated[list[str], typer.Option("--set", "-S", help="An override KEY=VALUE (repeatable).")] = [],  # noqa: B006 - typer reads a list default
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    serve: Annotated[
        bool, typer.Option(help=f"Serve the flow on a schedule ({NIGHTLY_CRON} UTC) until stopped.")
    ] = False,
) -> None:
    """Run the pipeline once as a Prefect flow, or serve it nightly (a long-running local scheduler)."""
    parameters = {"params_file": params, "overrides": _parse_set(set_), "device": device}
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
