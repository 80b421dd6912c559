"""The `register` stage: the MaskNet trained on the release becomes a new version of the registered
model `masknet-<data.source>`, with the release's mask built in (desensitize.inference), and the
release's model card and data card are written. A set-scope release with a zero or mean fill is
registered as a torch.export program (`pt2`: loads with torch alone), any other as a pickle of
MaskedClassifier (desensitize.inference.export_format says which and why).

A gate-failed release (reachable only with attack.enforce: false), a model whose test accuracy
is not clearly above chance (the majority-class rate of the test split, desensitize.stats), or one
trained in a DVC experiment (DVC names it in DVC_EXP_NAME: an override run, `dvc exp run`) is
registered, visible and comparable, but never becomes `champion` (desensitize.tracking.registry).
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
import numpy as np

from desensitize import stats
from desensitize.bundle.verify import verified_release
from desensitize.config import Params
from desensitize.errors import DesensitizeError
from desensitize.inference import MaskedClassifier, export_format
from desensitize.paths import Paths
from desensitize.release import load_released
from desensitize.reporting.cards import write_cards
from desensitize.reporting.records import read_report
from desensitize.tracking.registry import CHALLENGER, MODEL, model_name, register_version, version_description
from desensitize.tracking.versioning import dvc_experiment, dvc_md5

log = logging.getLogger(__name__)
EXAMPLE_IMAGES = 2


def register(params: Params, paths: Paths) -> dict[str, Any]:
    """Run the stage inside its MLflow run (see desensitize.orchestration.runner); returns what was registered."""
    run = mlflow.active_run()
    if run is None:
        raise DesensitizeError("the register stage logs into an MLflow run: run it through run_stage / the CLI")
    info = verified_release(paths.release, paths.raw)
    gate = read_report(paths, "attack")["gate"]
    accuracy = float(read_report(paths, "evaluate")["accuracy"][MODEL])
    labels = load_released(paths.release, "test").labels  # the test images that accuracy was measured on
    chance = stats.above_chance(round(accuracy * len(labels)), labels)
    release_digest = dvc_md5(paths.release)
    image_saliency = info.scope == "image" and info.strategy == "saliency"
    classifier = MaskedClassifier(
        paths.model(MODEL),
        paths.release,
        device="cpu",
        seed=params.seed,
        reference_path=paths.reference_model if image_saliency else None,
        masks=params.masks if image_saliency else None,
    )
    model_format, format_reason = export_format(info)
    model = classifier.exportable() if model_format == "pt2" else classifier
    write_cards(
        params,
        paths,
        release_digest=release_digest,
        raw_digest=dvc_md5(paths.raw),
        model_format=model_format,
        format_reason=format_reason,
    )

    name = model_name(params.data.source)
    tags = {
        "release_digest": release_digest,
        "model_digest": dvc_md5(paths.model(MODEL)),
        "mask_strategy": info.strategy,
        "mask_method": str(info.method),
        "mask_template": str(info.template),  # set scope: the template the mask came from
        "mask_candidate": str(info.candidate),  # the mask-search candidate released
        "mask_cell": str(info.cell),
        "mask_scope": info.scope,
        "hidden_ratio": repr(info.hidden_ratio),
        "registration_run_id": run.info.run_id,
    }
    card = paths.cards / "model_card.md"
    where = card.resolve().relative_to(paths.root.resolve()).as_posix()
    description = version_description(card.read_text(), f"the artifact `{where}` of run {run.info.run_id}")
    # The input example: two released train images (masked, what the receiver has), as pyfunc takes
    # them; two, so that a pt2 export keeps the batch size free.
    example = load_released(paths.release, "train").images[:EXAMPLE_IMAGES].astype(np.float32) / np.float32(255)
    result = register_version(
        model,
        name,
        accuracy=accuracy,
        gate_passed=bool(gate["passed"]),
        chance=chance,
        tags=tags,
        input_example=example,
        description=description,
        model_format=model_format,
        format_reason=format_reason,
        experiment=dvc_experiment(),
    )
    log.log(
        logging.INFO if chance["above"] else logging.WARNING,
        "registered %s version %s (%s); champion %s: %s",
        name,
        result["version"],
        CHALLENGER,
        "moved to it" if result["champion"] else "unchanged",
        result["why"],
    )
    return {
        "version": result["version"],
        "champion": result["champion"],
        "gate_passed": bool(gate["passed"]),
        "accuracy": accuracy,
        "above_chance": chance["above"],
        "chance_p_value": chance["p_value"],
        "champion_decision": result["why"],
    }
