"""The MLflow model registry: a new version of a registered model, and the champion rule.

Every new version gets alias `challenger`. `champion` moves to it only when the privacy gate
passed, its accuracy is clearly above chance (desensitize.stats.above_chance), it is not below
the current champion's, and it was not trained in a DVC experiment; the version's tag
`champion_decision` says which and why. A version from an experiment (an override run, or an
engineer's `dvc exp run`) carries the experiment's name in its tag `dvc_experiment` and is never
champion: the champion is what a deployment serves, so it comes only from the committed params.yaml
that scheduled runs and `dvc repro` run, never from a what-if that nobody committed. The experiment's
version stays registered, visible and comparable. To promote what an experiment found: `dvc exp apply
NAME`, commit, then `dvc repro -s -f register` registers it again, from committed params. The champion alias
is set last, after the version's tags, so a crash half-way never leaves it on an unlabelled version.
Reading the champion's accuracy and moving the alias happen under one lock per store and model name
(desensitize.storage.store_lock: between the processes of one host), so two registrations at once
can neither both take it nor let the less accurate one keep it.
"""

from __future__ import annotations

from importlib.metadata import version as installed_version
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from torch import nn

from desensitize.storage import store_lock

MODEL = "masknet"
CHAMPION, CHALLENGER = "champion", "challenger"
EXPERIMENT_TAG = "dvc_experiment"  # version tag: the DVC experiment it was trained in
# What loading a version needs, pinned to the versions that wrote it. A `pickle` version: what
# unpickling imports besides this project's own package (`pip install -e .`), the packages
# `import desensitize.inference` loads (captum only for image-scope saliency releases, which attribute
# at inference). A `pt2` version (a torch.export program): torch alone (MLflow adds itself).
REQUIREMENTS = {
    "pickle": ("torch", "numpy", "pydantic", "captum", "matplotlib", "pillow", "pyyaml", "tqdm"),
    "pt2": ("torch",),
}
# A model version's description is a String(5000) column in MLflow's SQL store (SQLite does not
# enforce it, PostgreSQL and MySQL do).
MAX_DESCRIPTION = 5000


def model_name(source: str) -> str:
    return f"{MODEL}-{source}"


def version_description(card: str, card_artifact: str, *, limit: int = MAX_DESCRIPTION) -> str:
    """The model card as a version's description (markdown): whole when it fits in `limit`
    characters, else cut at a line end with a note pointing at the whole card, `card_artifact`."""
    if len(card) <= limit:
        return card
    note = f"\n\n*(Card cut to fit the registry's description field: the whole card is {card_artifact}.)*\n"
    cut = card[: max(0, limit - len(note))]
    cut = cut[: cut.rfind("\n") + 1] or cut  # at a line end, so no table row or link is left half-open
    return cut.rstrip("\n") + note


def _champion_accuracy(client: mlflow.MlflowClient, name: str) -> float | None:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return float(champion.tags.get("accuracy", "nan"))


def register_version(
    model: nn.Module,
    name: str,
    *,
    accuracy: float,
    gate_passed: bool,
    chance: dict[str, Any],
    tags: dict[str, str],
    input_example: np.ndarray | None = None,
    description: str | None = None,
    model_format: str = "pickle",
    format_reason: str | None = None,
    experiment: str | None = None,
) -> dict[str, Any]:
    """Log `model` in the active run and register it as a new version of `name` with `tags` (plus
    gate and accuracy) and `description`; `chance` is desensitize.stats.above_chance of its test
    accuracy. Returns the version, whether it became champion, and why.

    `input_example`, a few images as the pyfunc interface takes them (float32 (N, C, H, W) in
    [0, 1]), is logged with the model, and with the model's logits on it gives the signature.

    `model_format`: `pickle`, or `pt2` (torch.export; needs `input_example` with more than one image,
    so the batch size stays free); the version's tag `model_format` says which, and
    `model_format_reason` carries `format_reason` (why not pt2) when given.

    `experiment`: the DVC experiment the model was trained in (its tag `dvc_experiment`); such a
    version is never champion."""
    if model_format not in REQUIREMENTS:
        raise ValueError(f"model_format={model_format!r}; expected one of {', '.join(REQUIREMENTS)}")
    requirements = [f"{package}=={installed_version(package)}" for package in REQUIREMENTS[model_format]]
    signature = None
    if input_example is not None:
        with torch.no_grad():
            logits = model(torch.from_numpy(input_example)).detach().cpu().numpy()
        signature = infer_signature(input_example, logits)
    model_info = mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format=model_format,
        pip_requirements=requirements,
        signature=signature,
        input_example=input_example,
        registered_model_name=name,
        await_registration_for=60,
    )
    version = str(model_info.registered_model_version)
    client = mlflow.MlflowClient()
    if description:
        client.update_model_version(name, version, description=description)
    version_tags = {"gate": "passed" if gate_passed else "failed", "accuracy": repr(accuracy), **tags}
    version_tags["model_format"] = model_format
    if format_reason:
        version_tags["model_format_reason"] = format_reason
    if experiment:
        version_tags[EXPERIMENT_TAG] = experiment
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)

    with store_lock(mlflow.get_tracking_uri(), f"champion-{name}"):
        current = _champion_accuracy(client, name)
        refused = [] if gate_passed else ["privacy gate failed"]
        if experiment:
            refused.append(f"trained in DVC experiment {experiment!r} (champion comes only from committed params)")
        if not chance["above"]:
            refused.append(chance["message"])
        if current is not None and accuracy < current:
            refused.append(f"accuracy {accuracy:.4f} below the champion's {current:.4f}")
        promote = not refused
        why = (
            "; ".join(refused)
            if refused
            else f"accuracy {accuracy:.4f}"
            + (f" >= the previous champion's {current:.4f}" if current is not None else "")
        )
        client.set_model_version_tag(name, version, "champion_decision", f"{'' if promote else 'not '}champion: {why}")
        if promote:
            client.set_registered_model_alias(name, CHAMPION, version)
    return {"version": int(version), "champion": promote, "why": why}
