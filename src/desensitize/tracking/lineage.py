"""`desensitize lineage`: from a registered model version back to the data and masks it came from,
read from MLflow alone.

model version -> its registration run -> the training run that wrote those model bytes -> the
release it read -> the masks run that wrote that release (strategy, method, ratio, reference
model) -> the raw data that run read -> the attack run on that release (the gate verdict).
Each link is a digest one run recorded as output and the next as input (the DVC md5), so the
chain holds across pipeline executions and without parent runs; a link that cannot be found, or
a digest that disagrees, makes the chain incomplete and is named.

Tags can be edited in the MLflow UI; what a run logged as dataset inputs, artifacts and metrics
cannot. So every tag the chain reads is checked against those: each run's digest tags against its
dataset inputs and its `digests/*.json` artifacts (desensitize.tracking.runs), the version's tags against
its registration run's record, the masks run's `release.json` and the attack run's verdict. A tag
that no longer matches is named and breaks the chain; one with no record to check it against (a run
tracked before the records existed) is listed as unverified.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from desensitize.errors import DesensitizeError
from desensitize.paths import Paths
from desensitize.tracking.runs import DIGESTS_ARTIFACT, EXPERIMENT_TAG, STAGE_TAG, item_tag
from desensitize.tracking.store import configure

CONTEXT_TAG = "mlflow.data.context"

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
    client: mlflow.MlflowClient,
    experiment_ids: list[str],
    stage: str,
    direction: str,
    item: str,
    digest: str,
    before: int,
) -> Run | None:
    """The latest finished run of `stage` that recorded `digest` for `item` (as `direction`), started
    by `before`. A dataset is found by the run's dataset inputs, which cannot be edited; a model by
    its digest tag (then checked against the run's digests artifact)."""
    if item.startswith("model/"):
        link = f"tags.`{item_tag(direction, item)}` = '{digest}'"
    else:
        link = f"datasets.name = '{item}' AND datasets.digest = '{digest}' AND datasets.context = '{direction}'"
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{STAGE_TAG}` = '{stage}' AND {link} AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    return next((run for run in runs if run.info.start_time <= before), None)


def _load_dict(uri: str) -> dict[str, Any] | None:
    try:
        return mlflow.artifacts.load_dict(uri)
    except (MlflowException, OSError, ValueError):
        return None


def _stage_report(run_id: str, stage: str) -> dict[str, Any]:
    """A stage run's whole record: the artifact reports/<stage>/report.json, or for a run tracked before
    the metrics files were cut to headline figures, metrics/<stage>.json, which held all of it."""
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/reports/{stage}/report.json")
    except (MlflowException, OSError):
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/metrics/{stage}.json")


def _record(run: Run) -> dict[tuple[str, str], str]:
    """The digests a run logged where no one can edit them: its dataset inputs (a raw split's DVC md5
    is in its source) and its digests/*.json artifacts, by (direction, item)."""
    record = {}
    for dataset_input in run.inputs.dataset_inputs if run.inputs else []:
        context = next((tag.value for tag in dataset_input.tags if tag.key == CONTEXT_TAG), None)
        try:
            source = json.loads(dataset_input.dataset.source)
        except ValueError:
            source = {}
        dvc_md5 = source.get("dvc_md5") if isinstance(source, dict) else None
        record[(context, dataset_input.dataset.name)] = dvc_md5 or dataset_input.dataset.digest
    for direction in ("input", "output"):
        logged = _load_dict(f"runs:/{run.info.run_id}/{DIGESTS_ARTIFACT.format(direction=direction)}") or {}
        record.update({(direction, item): str(digest) for item, digest in logged.items()})
    return record


class _Checks:
    """Tags compared with what was logged beside them: mismatches (problems) and tags with no record."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        self.unverified: list[str] = []
        self._records: dict[str, dict[tuple[str, str], str]] = {}

    def record(self, run: Run) -> dict[tuple[str, str], str]:
        if run.info.run_id not in self._records:
            self._records[run.info.run_id] = _record(run)
        return self._records[run.info.run_id]

    def compare(self, what: str, value: str | None, logged: str | None, where: str) -> None:
        if value is None:
            return
        if logged is None:
            self.unverified.append(f"{what} (no {where} to check it against)")
        elif value != logged:
            self.problems.append(
                f"{what} is {value} but {where} says {logged}: the tag no longer matches what it describes "
                "(edited after the run?)"
            )

    def run_tag(self, run: Run | None, direction: str, item: str) -> None:
        """A run's digest tag for `item` against the digest the run logged for it."""
        if not run:
            return
        tag = item_tag(direction, item)
        stage = run.data.tags.get(STAGE_TAG, "?")
        self.compare(
            f"{stage} run {run.info.run_id} tag {tag}",
            run.data.tags.get(tag),
            self.record(run).get((direction, item)),
            f"its logged {direction} record",
        )


def _released_settings(masks: Run | None) -> dict[str, Any] | None:
    """The masks run's release.json artifact (the settings the version's mask tags come from)."""
    return _load_dict(f"runs:/{masks.info.run_id}/data/release/release.json") if masks else None


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

    training = model_digest and _producer(client, experiments, "train", "output", "model/masknet", model_digest, before)
    release_digest = training.data.tags.get(item_tag("input", "release")) if training else None
    masks = release_digest and _producer(client, experiments, "masks", "output", "release", release_digest, before)
    attack = release_digest and _producer(client, experiments, "attack", "input", "release", release_digest, before)
    mtags, mparams = (masks.data.tags, masks.data.params) if masks else ({}, {})
    raw_digest = mtags.get(item_tag("input", "raw/train"))

    released: dict[str, Any] = {}  # what the masks run released (the search may pick template, cell and ratio)
    if masks:
        try:
            released = _stage_report(masks.info.run_id, "masks")
        except (MlflowException, OSError) as exc:
            problems.append(f"masks run {masks.info.run_id}: no readable reports/masks/report.json ({exc})")

    gate = None
    if attack:
        try:
            report = _stage_report(attack.info.run_id, "attack")["gate"]
            gate = {"passed": bool(report["passed"]), "enforced": report["enforced"], "message": report["message"]}
        except (MlflowException, OSError, KeyError) as exc:
            problems.append(f"attack run {attack.info.run_id}: no readable reports/attack/report.json ({exc})")

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

    # Every tag read above, and the version's own, against what was logged beside it.
    checks = _Checks(problems)
    checks.run_tag(registration, "input", "model/masknet")
    checks.run_tag(training, "output", "model/masknet")
    checks.run_tag(training, "input", "release")
    checks.run_tag(masks, "output", "release")
    checks.run_tag(masks, "input", "raw/train")
    checks.run_tag(masks, "input", "model/reference")
    checks.run_tag(attack, "input", "release")
    logged = checks.record(registration)
    where = f"registration run {registration.info.run_id}'s logged input record"
    checks.compare(
        "version tag model_digest", mv.tags.get("model_digest"), logged.get(("input", "model/masknet")), where
    )
    checks.compare("version tag release_digest", mv.tags.get("release_digest"), logged.get(("input", "release")), where)
    accuracy = registration.data.metrics.get("accuracy")
    checks.compare(
        "version tag accuracy",
        mv.tags.get("accuracy"),
        None if accuracy is None else repr(float(accuracy)),
        f"registration run {registration.info.run_id}'s accuracy metric",
    )
    checks.compare(
        "version tag registration_run_id", mv.tags.get("registration_run_id"), mv.run_id, "the version's run"
    )
    settings = _released_settings(masks or None)
    if masks:
        for tag, key, text in (
            ("mask_strategy", "strategy", str),
            ("mask_method", "method", str),
            ("mask_template", "template", str),
            ("mask_candidate", "candidate", str),
            ("mask_cell", "cell", str),
            ("mask_scope", "scope", str),
            ("hidden_ratio", "hidden_ratio", repr),
        ):
            checks.compare(
                f"version tag {tag}",
                mv.tags.get(tag),
                text(settings[key]) if settings and key in settings else None,
                f"masks run {masks.info.run_id}'s release.json",
            )
    raw_splits = {
        name.removeprefix("raw/"): d.dataset.digest
        for d in (masks.inputs.dataset_inputs if masks and masks.inputs else [])
        if (name := d.dataset.name).startswith("raw/")
    }

    return {
        "model": {
            "name": mv.name,
            "version": int(mv.version),
            "aliases": aliases,
            "source": mv.source,
            "registration_run_id": mv.run_id,
            "dvc_experiment": rtags.get(EXPERIMENT_TAG),  # an override run's or `dvc exp run`'s
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
        "raw": {"path": "data/raw", "digest": raw_digest, "splits": raw_splits},
        "attack_run": _run(attack or None, gate=gate),
        "complete": not problems,
        "problems": problems,
        "unverified": checks.unverified,
    }


def format_text(chain: dict[str, Any]) -> str:
    m, t, mr, a = chain["model"], chain["training_run"], chain["mask_run"], chain["attack_run"]
    lines = [
        f"model         {m['name']} version {m['version']}"
        + (f" ({', '.join(m['aliases'])})" if m["aliases"] else "")
        + f": accuracy {m['tags'].get('accuracy', '?')}, gate {m['tags'].get('gate', '?')}, md5 {m['digest']}"
        + (f", registered by DVC experiment {m['dvc_experiment']}" if m.get("dvc_experiment") else ""),
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
        f"raw dataset   {chain['raw']['path']} md5 {chain['raw']['digest']}"
        + "".join(f", {split} {digest}" for split, digest in chain["raw"].get("splits", {}).items()),
        (f"attack gate   {a['run_id']}: {a['gate']['message'] if a['gate'] else 'verdict not readable'}")
        if a
        else "attack gate   NOT FOUND",
    ]
    lines += [f"unverified    {what}" for what in chain.get("unverified", [])]
    lines.append("chain complete" if chain["complete"] else "chain INCOMPLETE: " + "; ".join(chain["problems"]))
    return "\n".join(lines)
