"""The `register` stage: the MaskNet trained on the release becomes a new version of the
registered model `masknet-<data.source>`, with the release's mask built in, and the release's
model card and data card are written.

Every new version gets alias `challenger`. `champion` moves to it only when the privacy gate
passed (metrics/attack.json) and its accuracy (metrics/evaluate.json) is not below the current
champion's. A gate-failed release (reachable only with attack.enforce: false) is thus registered,
visible and comparable, but never served as `models:/NAME@champion`; the champion alias is set
last, after the version's tags, so a crash half-way never leaves it on an unlabelled version.
"""

from __future__ import annotations

import logging
from importlib.metadata import version as installed_version
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from desensitize.cards import write_cards
from desensitize.config import Params
from desensitize.errors import DesensitizeError
from desensitize.inference import MaskedClassifier
from desensitize.paths import Paths
from desensitize.release import read_release_info
from desensitize.storage import read_json
from desensitize.tracking import dvc_md5

log = logging.getLogger(__name__)
MODEL = "masknet"
CHAMPION, CHALLENGER = "champion", "challenger"
# What unpickling the model imports besides this project's own package (`pip install -e .`): the
# packages `import desensitize.inference` loads, pinned to the versions that wrote it.
REQUIREMENTS = ("torch", "numpy", "pydantic", "captum", "matplotlib", "pillow", "pyyaml", "tqdm")


def model_name(params: Params) -> str:
    return f"{MODEL}-{params.data.source}"


def _champion_accuracy(client: mlflow.MlflowClient, name: str) -> float | None:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return float(champion.tags.get("accuracy", "nan"))


def register(params: Params, paths: Paths) -> dict[str, Any]:
    """Run the stage inside its MLflow run (see run_stage); returns what was registered."""
    run = mlflow.active_run()
    if run is None:
        raise DesensitizeError("the register stage logs into an MLflow run: run it through run_stage / the CLI")
    gate = read_json(paths.attack_metrics)["gate"]
    evaluation = read_json(paths.evaluate_metrics)
    accuracy = float(evaluation["accuracy"][MODEL])
    info = read_release_info(paths.release)
    release_digest = dvc_md5(paths.release)
    image_saliency = info["scope"] == "image" and info["strategy"] == "saliency"
    classifier = MaskedClassifier(
        paths.model(MODEL), paths.release, device="cpu", seed=params.seed,
        reference_path=paths.reference_model if image_saliency else None, masks=params.masks if image_saliency else None,
    )  # fmt: skip
    write_cards(params, paths, release_digest=release_digest, raw_digest=dvc_md5(paths.raw))

    name = model_name(params)
    requirements = [f"{package}=={installed_version(package)}" for package in REQUIREMENTS]
    model_info = mlflow.pytorch.log_model(
        classifier, name="model", serialization_format="pickle", pip_requirements=requirements,
        registered_model_name=name, await_registration_for=60,
    )  # fmt: skip
    version = str(model_info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {
        "gate": "passed" if gate["passed"] else "failed",
        "accuracy": repr(accuracy),
        "release_digest": release_digest,
        "model_digest": dvc_md5(paths.model(MODEL)),
        "mask_strategy": info["strategy"],
        "mask_method": str(info["method"]),
        "mask_template": str(info.get("template")),  # set scope: the template the mask came from
        "mask_scope": info["scope"],
        "hidden_ratio": repr(info["hidden_ratio"]),
        "registration_run_id": run.info.run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)

    current = _champion_accuracy(client, name)
    promote = bool(gate["passed"]) and (current is None or not accuracy < current)
    if promote:
        client.set_registered_model_alias(name, CHAMPION, version)
    why = (
        "privacy gate failed" if not gate["passed"]
        else f"accuracy {accuracy:.4f} below the champion's {current:.4f}" if not promote
        else f"accuracy {accuracy:.4f}" + (f" >= the previous champion's {current:.4f}" if current is not None else "")
    )  # fmt: skip
    log.info("registered %s version %s (%s); champion %s: %s", name, version, CHALLENGER,
             "moved to it" if promote else "unchanged", why)  # fmt: skip
    return {"version": int(version), "champion": promote, "gate_passed": bool(gate["passed"]), "accuracy": accuracy}
