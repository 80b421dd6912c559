"""The `desensitize` command: one sub-command per pipeline stage, each a thin caller of src/.

dvc.yaml runs these commands; the Prefect flow calls the same functions directly. Each stage is
tracked in MLflow by `run_stage`; `desensitize repro` wraps `dvc repro` in one parent run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import mlflow
import typer
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from tqdm.auto import tqdm

from desensitize.config import load_params
from desensitize.errors import DesensitizeError
from desensitize.orchestration.pipeline import check_for_dvc
from desensitize.orchestration.runner import run_stage
from desensitize.paths import Paths

app = typer.Typer(
    help="Desensitize an image set by masking, with recognition support (arXiv 2312.08975). "
    "Each command is one pipeline stage; `dvc repro` runs them in order.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The params file (see params.yaml).")]
DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        envvar="DESENSITIZE_DEVICE",  # how an override run passes its device to the stages dvc.yaml runs
        help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
    ),
]
F = TypeVar("F", bound=Callable[..., Any])
SetOption = Annotated[  # desensitize repro and the flow's command line (flows/pipeline.py)
    list[str],
    typer.Option(
        "--set",
        "-S",
        help="An override KEY=VALUE (repeatable; the value is YAML, e.g. masks.search.hidden_ratios=[0.75,0.875]): "
        "the run becomes a DVC experiment in a workspace of its own, the checkout untouched.",
    ),
]


class _TqdmHandler(logging.Handler):
    """Log lines go through tqdm.write so they do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def _configure_logging(verbose: bool) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("desensitize")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def _restore_hint() -> str:
    """Under `dvc repro` (DVC sets DVC_STAGE for the command it runs), DVC deleted the stage's previous
    outputs before running it; they are still in the DVC cache."""
    stage = os.environ.get("DVC_STAGE")
    if not stage:
        return ""
    return (
        f" (dvc repro removed the previous outputs of stage {stage!r} before running it; "
        f"'dvc checkout {stage}' restores them from the DVC cache; add --force to also replace what this run "
        "wrote, such as reports/masks/search.json)"
    )


def _user_errors(command: F) -> F:
    """Turn a DesensitizeError, or a failure of the MLflow tracking store, into one `error: ...` line on
    stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except DesensitizeError as exc:
            typer.echo(f"error: {' '.join(str(exc).split())}{_restore_hint()}", err=True)
            raise typer.Exit(2) from None
        except (MlflowException, SQLAlchemyError) as exc:
            # A DBAPI error's own message, without the SQL statement SQLAlchemy adds to it.
            detail = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
            typer.echo(
                f"error: the MLflow tracking store {mlflow.get_tracking_uri()} failed: "
                f"{' '.join(str(detail).split())[:500]} (check it, or MLFLOW_TRACKING_URI, and run again)",
                err=True,
            )
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    _configure_logging(verbose)


@app.command()
@_user_errors
def ingest(params: ParamsOption = Path("params.yaml")) -> None:
    """Read the source named by data.source and write seeded, stratified, disjoint train / test /
    public shards plus manifest.json to data/raw/."""
    run_stage("ingest", load_params(params), Paths())


@app.command()
@_user_errors
def reference(params: ParamsOption = Path("params.yaml"), device: DeviceOption = "auto") -> None:
    """Train the owner's reference classifier on raw train images, test it on raw test images;
    writes models/reference.npz, metrics/reference.json and reports/reference/."""
    run_stage("reference", load_params(params), Paths(), device)


@app.command("check-params")
@_user_errors
def check_params(params: ParamsOption = Path("params.yaml")) -> None:
    """Validate the params file as `dvc repro` will read it (every key dvc.yaml lists, a source path for
    DVC to watch, a mask grid that fits the images) and print the full settings, defaults included."""
    typer.echo(check_for_dvc(params).model_dump_json(indent=2))


@app.command()
@_user_errors
def masks(params: ParamsOption = Path("params.yaml"), device: DeviceOption = "auto") -> None:
    """Attribute every train image with the reference model (captum), build the mask, and write the
    verified release bundle to data/release/, metrics/masks.json and reports/masks/."""
    run_stage("masks", load_params(params), Paths(), device)


@app.command("verify-release")
@_user_errors
def verify_release(
    path: Annotated[Path, typer.Argument(help="The release bundle directory, e.g. data/release.")],
    raw: Annotated[Path, typer.Option(help="The raw data the bundle was made from.")] = Path("data/raw"),
) -> None:
    """Prove a release bundle safe to hand out: only allowed files, checksums intact, every hidden
    pixel exactly the declared fill (no raw value), visible pixels equal to raw, whole cells hidden
    at the declared ratio, and the declared grid, ratios and fill value true of the masks and the raw
    data. Exits 2 naming the first offending item."""
    from desensitize.bundle.verify import verify_release as run

    summary = run(path, raw)
    for split, facts in summary["splits"].items():
        typer.echo(f"ok: {split}: {facts['images']} images, {facts['hidden_ratio_pixels']:.1%} of pixels hidden")
    typer.echo(f"ok: {path} verified against {raw}")


@app.command()
@_user_errors
def attack(params: ParamsOption = Path("params.yaml"), device: DeviceOption = "auto") -> None:
    """The privacy gate: inpainting attackers (OpenCV, scikit-image, a U-Net trained on the public
    split) try to restore the release's hidden pixels; writes metrics/attack.json (headline) and
    reports/attack/ (everything). Exits 2 when an attacker breaks a threshold (unless attack.enforce is false)."""
    run_stage("attack", load_params(params), Paths(), device)


@app.command()
@_user_errors
def summary() -> None:
    """Print the headline figures of the last pipeline run (from the stages' reports/*/report.json)."""
    from desensitize.reporting.summary import text

    typer.echo(text(Paths()))


@app.command()
@_user_errors
def train(params: ParamsOption = Path("params.yaml"), device: DeviceOption = "auto") -> None:
    """The trainer's view: from data/release alone, train `plain` (masked images as ordinary ones)
    and `masknet` (the feature selection MaskNet, which also reads the mask) into models/."""
    run_stage("train", load_params(params), Paths(), device)


@app.command()
@_user_errors
def baselines(params: ParamsOption = Path("params.yaml"), device: DeviceOption = "auto") -> None:
    """Owner side: train `raw` (raw images, the upper bound) and `plain_random` (a random mask of the
    release's ratio, grid, scope and fill) with the same backbone, epochs and seed."""
    run_stage("baselines", load_params(params), Paths(), device)


@app.command()
@_user_errors
def evaluate(params: ParamsOption = Path("params.yaml"), device: DeviceOption = "auto") -> None:
    """Accuracy of raw / plain_random / plain / masknet on their masked test sets; writes
    metrics/evaluate.json, confusion matrices and a table in reports/evaluate/."""
    run_stage("evaluate", load_params(params), Paths(), device)


@app.command()
@_user_errors
def register(params: ParamsOption = Path("params.yaml")) -> None:
    """Register models/masknet.npz, with the release's mask built in, as a new version of
    `masknet-<data.source>` (alias challenger; champion only if the privacy gate passed and it is clearly
    above chance and not less accurate than the champion); writes the model and data cards to reports/cards/."""
    run_stage("register", load_params(params), Paths())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_user_errors
def repro(
    ctx: typer.Context,
    set_: SetOption = [],  # noqa: B006 - typer reads a list default
    name: Annotated[
        str | None, typer.Option(help="With --set: the experiment's name (default repro-<UTC time>-<random>).")
    ] = None,
) -> None:
    """`dvc repro` inside one MLflow parent run, whose children are the stage runs (what `make run`
    does). Extra arguments go to `dvc repro`. A bare `dvc repro` works too, with stand-alone stage runs.
    With --set, the run is a DVC experiment instead, as the Prefect flow's overrides are: `dvc exp run
    -n NAME -S KEY=VALUE` in a clone of this checkout that shares its DVC cache, on the committed
    params.yaml (refused while params.yaml or dvc.yaml has uncommitted changes); this checkout's files
    stay as they are, `dvc exp show` lists the experiment, and extra arguments go to `dvc exp run`."""
    from desensitize.tracking.runs import pipeline_run
    from desensitize.tracking.versioning import dvc_lock_holders

    if set_:
        _experiment(set_, name, ctx.args)
        return
    if name is not None:
        raise DesensitizeError("--name names the experiment of an override run: it needs --set")
    paths = Paths()
    check_for_dvc(paths.params_file)  # before the MLflow run: a file DVC would reject starts nothing
    with pipeline_run(paths) as run_id:
        result = subprocess.run([sys.executable, "-m", "dvc", "repro", *ctx.args], check=False)
        # DVC names no reason in its exit status: a refusal for its lock is told by who holds the lock now.
        holders = dvc_lock_holders(paths.root) if result.returncode != 0 else []
        if holders:
            raise DesensitizeError(
                f"dvc repro exited with status {result.returncode}: another run holds this project's DVC lock "
                f"({', '.join(holders)}); MLflow run {run_id} marked FAILED. Wait for that run to end, then run "
                "again"
            )
        if result.returncode != 0:
            raise DesensitizeError(
                f"dvc repro exited with status {result.returncode}; MLflow run {run_id} marked FAILED. DVC "
                "removes a stage's outputs before running it: 'dvc checkout' restores the outputs dvc.lock "
                "records (the last successful run) from the DVC cache (--force also replaces what the failed "
                "stage wrote)"
            )
    typer.echo(f"MLflow pipeline run {run_id}")


def _experiment(items: list[str], name: str | None, dvc_args: list[str]) -> None:
    from desensitize.orchestration.experiment import run_experiment
    from desensitize.orchestration.overrides import default_name, parse_set

    run = run_experiment(Path.cwd(), parse_set(items), name or default_name(), dvc_args=dvc_args)
    if run.error:
        failed = f"; MLflow run {run.parent_run_id} marked FAILED" if run.parent_run_id else ""
        raise DesensitizeError(f"{run.error}{failed}; this checkout is untouched")
    typer.echo(run.summary)
    typer.echo(
        f"DVC experiment {run.name} ({run.rev[:7] if run.rev else '?'}): `dvc exp show` lists it, `dvc exp apply "
        f"{run.name}` brings it into this workspace\nMLflow pipeline run {run.parent_run_id}"
    )


@app.command()
@_user_errors
def lineage(
    model: Annotated[
        str, typer.Argument(help="NAME@ALIAS, NAME/VERSION or NAME (latest), e.g. masknet-mnist5k@champion.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the chain as JSON.")] = False,
) -> None:
    """For auditors: the chain model version -> training run -> release digest -> mask run (strategy,
    method, ratio, reference model digest) -> raw dataset digest -> attack gate verdict, read from
    MLflow. Exits 1 when a link is missing or a digest disagrees."""
    from desensitize.tracking.lineage import format_text
    from desensitize.tracking.lineage import lineage as trace

    chain = trace(model, Paths())
    typer.echo(json.dumps(chain, indent=2, sort_keys=True) if as_json else format_text(chain))
    if not chain["complete"]:
        raise typer.Exit(1)


def _split(text: str, kind: type) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise DesensitizeError(f"{text!r}: expected a comma-separated list of {kind.__name__}") from None


@app.command()
@_user_errors
def sweep(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Where the results and the per-point workspaces go.")] = Path(
        "reports/sweep"
    ),
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0",
    scopes: Annotated[str, typer.Option(help="Comma-separated mask scopes: set, image.")] = "set,image",
    ratios: Annotated[str, typer.Option(help="Comma-separated hidden ratios.")] = "0.25,0.5,0.75,0.875,0.9375",
    cells: Annotated[str, typer.Option(help="Comma-separated cell sizes (pixels).")] = "4,7",
    strategies: Annotated[
        str, typer.Option(help="Comma-separated strategies: saliency, random, ...")
    ] = "saliency,random",
    templates: Annotated[
        str,
        typer.Option(
            help="Comma-separated set-scope saliency templates: mean, class_contrast, mean_spread, restorability "
            "(one point each; random and image-scope saliency points have none)."
        ),
    ] = "mean,class_contrast,mean_spread,restorability",
    searched: Annotated[
        bool,
        typer.Option(
            help="Per seed and scope, also the searched mask (masks.template search, masks.privacy gate): "
            "the search picks template, cell and ratio and releases only a candidate that passes the gate."
        ),
    ] = True,
    attack: Annotated[bool, typer.Option(help="Run the attack suite at every point (privacy axis).")] = True,
    device: DeviceOption = "auto",
) -> None:
    """The privacy-utility frontier: run masks -> attack -> train -> baselines -> evaluate for every
    seed x scope x cell x ratio x strategy (x template for set-scope saliency), without a privacy
    constraint, plus the gated searched mask per seed and scope (other settings from the params
    file). Writes results.csv, summary.md (mean +- std over seeds, accuracy at the gate's limits) and
    frontier.png to --out when every point has finished; meanwhile each finished point goes to
    partial.jsonl there, and an interrupted sweep (Ctrl-C, SIGTERM) run again with the same options
    resumes from it, leaving the previous complete results in place until then."""
    from desensitize.orchestration.sweep import SweepInterrupted, run_sweep
    from desensitize.orchestration.sweep_plan import check_axes

    base = load_params(params)
    axes = {
        "seeds": _split(seeds, int),
        "scopes": _split(scopes, str),
        "ratios": _split(ratios, float),
        "cells": _split(cells, int),
        "strategies": _split(strategies, str),
        "templates": _split(templates, str),
    }
    check_axes(**axes)
    try:
        with _sigterm_as_interrupt():
            run_sweep(
                base, out, **axes, searched=searched, attack=attack, device=device, track=Paths(params.resolve().parent)
            )
    except SweepInterrupted as exc:  # says what was kept; the exit status says which signal
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        raise typer.Exit(128 + exc.signum) from None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt(SIGTERM), as Ctrl-C does, so a sweep stops the same way."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
