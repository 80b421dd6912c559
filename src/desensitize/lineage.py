"""`desensitize lineage`: from a registered model version back to the data and masks it came from,
read from MLflow alone.

model version -> its registration run -> the training run that wrote those model bytes -> the
release it read -> the masks run that wrote that release (strategy, method, ratio, reference
model) -> the raw data that run read -> the attack run on that release (the gate verdict).
Each link is a digest one run recorded as output and the next as input (the DVC md5), so the
chain holds across pipeline executions and without parent runs; a link that cannot be found, or
a digest that disagrees, makes the chain incomplete and is named.
"""

from __future__ import annotations

import os
import re
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from desensitize.errors import DesensitizeError
from desensitize.paths import Paths
from desensitize.tracking import STAGE_TAG, configure, item_tag

_REF = re.compile(r"^(?P<name>[\w.-]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))?$")


def resolve_version(client: mlflow.MlflowClient, ref: str) -> Any:
    """NAME@ALIAS, NAME/VERSION, or NAME (its latest version)."""
    match = _REF.match(ref)
    if not match:
        raise DesensitizeError(f"{ref!r}: expected NAME, NAME@ALIAS or NAME/VERSION, e.g. masknet-mnist5k@champion")
    name, alias, version = match["name"], match["alias"], match["version"]
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none yet"
        raise DesensitizeError(f"no registered model {name!r} (registered: {known})") from None
    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version:
            return client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise DesensitizeError(f"registered model {name!r} has no {what}") from None
    versions = client.search_model_versions(f"name = '{name}'")
    return max(versions, key=lambda v: int(v.version))


def _producer(
    client: mlflow.MlflowClient, experiment_ids: list[str], stage: str, tag: str, digest: str, before: int
) -> Run | None:
    """The latest finished run of `stage` that recorded `digest` under `tag`, started by `before`."""
    runs = client.search_runs(
        experiment_ids,
        filter_string=(
            f"tags.`{STAGE_TAG}` = '{stage}' AND tags.`{tag}` = '{digest}' AND attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
    )
    return next((run for run in runs if run.info.start_time <= before), None)


def _run(run: Run | None, **extra: Any) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "parent_run_id": run.data.tags.get("mlflow.parentRunId"),
        **extra,
    }


def lineage(ref: str, paths: Paths) -> dict[str, Any]:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep stdout the chain alone
    configure(paths, create=False)
    client = mlflow.MlflowClient()
    mv = resolve_version(client, ref)
    problems: list[str] = []
    registration = client.get_run(mv.run_id)
    experiments = [registration.info.experiment_id]
    before = registration.info.start_time
    rtags = registration.data.tags
    model_digest = rtags.get(item_tag("input", "model/masknet"))
    aliases = sorted(mv.aliases)

    training = model_digest and _producer(
        client, experiments, "train", item_tag("output", "model/masknet"), model_digest, before
    )
    release_digest = training.data.tags.get(item_tag("input", "release")) if training else None
    masks = release_digest and _producer(
        client, experiments, "masks", item_tag("output", "release"), release_digest, before
    )
    attack = release_digest and _producer(
        client, experiments, "attack", item_tag("input", "release"), release_digest, before
    )
    mtags, mparams = (masks.data.tags, masks.data.params) if masks else ({}, {})
    raw_digest = mtags.get(item_tag("input", "raw/train"))

    released: dict[str, Any] = {}  # what the masks run released (the search may pick template, cell and ratio)
    if masks:
        try:
            released = mlflow.artifacts.load_dict(f"runs:/{masks.info.run_id}/metrics/masks.json")
        except (MlflowException, OSError) as exc:
            problems.append(f"masks run {masks.info.run_id}: no readable metrics/masks.json ({exc})")

    gate = None
    if attack:
        try:
            report = mlflow.artifacts.load_dict(f"runs:/{attack.info.run_id}/metrics/attack.json")["gate"]
            gate = {"passed": bool(report["passed"]), "enforced": report["enforced"], "message": report["message"]}
        except (MlflowException, OSError, KeyError) as exc:
            problems.append(f"attack run {attack.info.run_id}: no readable metrics/attack.json ({exc})")

    for what, value in (
        ("registration run's masknet digest", model_digest),
        ("training run", training),
        ("release digest", release_digest),
        ("masks run", masks),
        ("raw dataset digest", raw_digest),
        ("attack run", attack),
    ):
        if not value:
            problems.append(f"no {what} found")
    if release_digest and mv.tags.get("release_digest") != release_digest:
        problems.append(
            f"version tag release_digest {mv.tags.get('release_digest')} differs from the training run's "
            f"{release_digest}"
        )
    if gate is not None and mv.tags.get("gate") != ("passed" if gate["passed"] else "failed"):
        problems.append(f"version tag gate={mv.tags.get('gate')} differs from the attack run's verdict")

    return {
        "model": {
            "name": mv.name,
            "version": int(mv.version),
            "aliases": aliases,
            "source": mv.source,
            "registration_run_id": mv.run_id,
            "digest": model_digest,
            "tags": dict(mv.tags),
        },
        "training_run": _run(training or None, release_digest=release_digest),
        "release": {"path": "data/release", "digest": release_digest},
        "mask_run": _run(
            masks or None,
            strategy=mparams.get("masks.strategy"),
            method=mparams.get("masks.attribution.method"),
            hidden_ratio=released.get("hidden_ratio", mparams.get("masks.hidden_ratio")),
            scope=released.get("scope", mparams.get("masks.scope")),
            cell=released.get("cell", mparams.get("masks.cell")),
            template=released.get("template"),
            candidate=released.get("candidate"),
            reference_model_digest=mtags.get(item_tag("input", "model/reference")),
        ),
        "raw": {"path": "data/raw", "digest": raw_digest},
        "attack_run": _run(attack or None, gate=gate),
        "complete": not problems,
        "problems": problems,
    }


def format_text(chain: dict[str, Any]) -> str:
    m, t, mr, a = chain["model"], chain["training_run"], chain["mask_run"], chain["attack_run"]
    lines = [
        f"model         {m['name']} version {m['version']}"
        + (f" ({', '.join(m['aliases'])})" if m["aliases"] else "")
        + f": accuracy {m['tags'].get('accuracy', '?')}, gate {m['tags'].get('gate', '?')}, md5 {m['digest']}",
        f"training run  {t['run_id']} ({t['status']})" if t else "training run  NOT FOUND",
        f"release       {chain['release']['path']} md5 {chain['release']['digest']}",
        (
            f"mask run      {mr['run_id']}: {mr['strategy']} ({mr['method']}), {mr['scope']} scope, hidden ratio "
            f"{mr['hidden_ratio']}, cell {mr['cell']}"
            + (f", {mr['template']} template" if mr["template"] else "")
            + (f", search candidate '{mr['candidate']}'" if mr.get("candidate") else "")
            + f"; reference model md5 {mr['reference_model_digest']}"
        )
        if mr
        else "mask run      NOT FOUND",
        f"raw dataset   {chain['raw']['path']} md5 {chain['raw']['digest']}",
        (f"attack gate   {a['run_id']}: {a['gate']['message'] if a['gate'] else 'verdict not readable'}")
        if a
        else "attack gate   NOT FOUND",
    ]
    lines.append("chain complete" if chain["complete"] else "chain INCOMPLETE: " + "; ".join(chain["problems"]))
    return "\n".join(lines)
