"""The release's model card and data card (reports/cards/), written by the `register` stage from
params, metrics and the attack report, and logged to MLflow with the registered version.

Both are deterministic (no timestamps, no registry version numbers): the same release and models
give the same cards, so DVC sees an unchanged card as unchanged. The registry links a version to
them; `desensitize lineage` gives the rest of the chain.
"""

from __future__ import annotations

from typing import Any

from desensitize.config import Params
from desensitize.paths import Paths
from desensitize.release import ReleaseInfo, read_release_info
from desensitize.reporting.records import accuracy_with_interval, read_report
from desensitize.storage import atomic_path


def _gate_lines(attack: dict[str, Any], params: Params) -> list[str]:
    t = params.attack.thresholds
    level = f"{attack['confidence']:.0%}"
    lines = [
        f"Privacy gate ({'enforced' if attack['gate']['enforced'] else 'not enforced: attack.enforce is false'}): "
        f"**{attack['gate']['message']}**.",
        "",
        f"Thresholds, compared with the upper end of each score's {level} interval (for the learned attacker "
        f"plus what its data-scaling curve projects at {params.attack.assumed_attacker_images} attacker images): "
        f"PSNR gain over the best label-aware blind guess ({attack['best_blind']}) <= {t.max_psnr_gain:g} dB; "
        f"top-1 linkage within class <= {t.max_linkage_x_chance:g} x chance "
        f"({attack['linkage_within_class_chance']:.4f}); recognition recovery <= {t.max_recognition_recovery:g}. "
        f"Sample: {attack['sample']} released train images.",
        "",
        "| attacker | PSNR gain (dB) | linkage within class | linkage all | recognition recovery "
        "| judged gain / within |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in attack["attackers"].items():
        cells = [
            f"{s[key]:{fmt}} [{s[key + '_interval'][0]:{fmt}}, {s[key + '_interval'][1]:{fmt}}]"
            for key, fmt in (
                ("psnr_gain", "+.2f"),
                ("linkage_within_class", ".3f"),
                ("linkage_top1", ".3f"),
                ("recognition_recovery", "+.3f"),
            )
        ]
        judged = f"{s['judged']['psnr_gain']:+.2f} / {s['judged']['linkage_within_class']:.3f}"
        lines.append(f"| {name} | {' | '.join(cells)} | {judged} |")
    lines += [
        "",
        f"Strongest attacker: {attack['best_attacker']}. Share of the images' content under the mask "
        f"(hidden information): {attack['hidden_information']:.3f}.",
        "",
    ]
    return lines


def _mask_line(info: ReleaseInfo) -> str:
    template = f", {info.template} template" if info.template else ""
    method = f" ({info.method} attribution{template})" if info.method else ""
    line = (
        f"{info.strategy}{method} mask, {info.scope} scope: {info.n_hidden_cells} of {info.n_cells} "
        f"cells of {info.cell}x{info.cell} pixels hidden ({info.hidden_ratio:.1%}; "
        f"{info.hidden_ratio_pixels:.1%} of pixels), {info.fill} fill."
    )
    if info.search and info.privacy == "gate":
        n = len(info.search["candidates"])
        line += (
            f" Chosen by the privacy-constrained mask search: candidate '{info.candidate}', the most useful "
            f"candidate (of {n} searched) that passed the full privacy gate."
        )
        if info.search.get("cost"):
            line += (
                f" What the release cost (held-out utility, README: the mask search): {info.search['cost']}; "
                "the thresholds are the owner's to set in params.yaml."
            )
    elif info.search:
        line += f" Chosen by the mask search (utility only, no privacy constraint): candidate '{info.candidate}'."
    return line


def _input_line(info: ReleaseInfo) -> str:
    """What the registered model accepts (desensitize.inference.check_input refuses the rest)."""
    shape = ", ".join(map(str, info.image_shape))
    return (
        f"Input: float32 images (N, {shape}) with values in [0, 1], the raw uint8 levels divided by 255. A "
        "wrong dtype or shape is refused by the signature; values outside [0, 1] (0..255 floats, say) and NaN "
        "are refused by the model itself with an error that says so, never clipped."
    )


def _use_lines(source: str, model_format: str, format_reason: str | None) -> list[str]:
    """How to load the registered model, by its format (desensitize.inference.export_format)."""
    uri = f"models:/masknet-{source}@champion"
    if model_format == "pt2":
        return [
            "Format `pt2`: a `torch.export` program with the mask and fill as constants; loading it needs torch "
            "and MLflow only and unpickles no code (with `MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false` MLflow "
            f"checks that before loading). `mlflow.pyfunc.load_model('{uri}').predict(images)` with "
            "float32 images (N, C, H, W) in [0, 1] (raw uint8 / 255) gives the logits, and "
            f"`mlflow.pytorch.load_model('{uri}')` a torch module to call on `torch.from_numpy(images)`. Its "
            "tensors are on the CPU: where CUDA is present, pass `model_config={'device': 'cpu'}` to pyfunc.",
        ]
    why = f" ({format_reason})" if format_reason else ""
    return [
        f"Format `pickle`{why}: a pickled `desensitize.inference.MaskedClassifier`. Install this project's "
        "package first (`pip install desensitize`, with its pinned requirements); loading runs its code, so "
        f"load only versions from a registry you trust. `mlflow.pytorch.load_model('{uri}')"
        ".predict(raw_uint8_images)` gives class indices; the pyfunc interface takes float32 images in [0, 1] "
        "and gives the logits.",
    ]


def write_cards(
    params: Params,
    paths: Paths,
    *,
    release_digest: str,
    raw_digest: str,
    model_format: str,
    format_reason: str | None = None,
) -> None:
    """`model_format` (and, for pickle, `format_reason`): how the register stage stores the model."""
    info = read_release_info(paths.release)
    attack = read_report(paths, "attack")
    evaluation = read_report(paths, "evaluate")
    acc = evaluation["accuracy"]
    train = params.train
    source = params.data.source
    model = [
        f"# Model card: masknet-{source}",
        "",
        "Our implementation of the feature selection MaskNet (arXiv 2312.08975): a "
        f"{train.backbone} backbone that reads the masked image and its mask, trained by the receiver "
        "of the release on nothing but the release.",
        "",
        "## Use",
        "",
        f"Recognition of {source} images ({len(info.class_names)} classes, shape "
        f"{'x'.join(map(str, info.image_shape))}). The registered model takes raw images and applies the "
        "release's mask itself, so it never sees what the release hides.",
        "",
        _input_line(info),
        "",
        *_use_lines(source, model_format, format_reason),
        "",
        "## Training",
        "",
        f"Data: the release `data/release`, DVC md5 `{release_digest}` ({info.counts['train']} train images). "
        f"{_mask_line(info)}",
        f"Settings: {train.epochs} epochs, batch {train.batch_size}, learning rate {train.lr:g}, weight decay "
        f"{train.weight_decay:g}, seed {params.seed}.",
        "",
        "## Evaluation",
        "",
        f"Accuracy on {evaluation['n_test']} masked test images (raw is the owner's upper bound):",
        "",
        "| model | accuracy [95% interval over the test images] |",
        "|---|---|",
        *(f"| {name} | {accuracy_with_interval(evaluation, name)} |" for name in acc),
        "",
        f"MaskNet over plain: {evaluation['masknet_over_plain']:+.4f}. This mask over a random one of the "
        f"same ratio: {evaluation['saliency_over_random']:+.4f}. These are one run's figures (seed {params.seed}): "
        "besides the test sample (the interval), they move with the seed and, for trained models, with the "
        "machine (floating-point order); compare releases on several seeds.",
        "",
        "## Privacy of the data it was trained on",
        "",
        *_gate_lines(attack, params),
        "## Limitations",
        "",
        "Passing the gate means no tested attacker beat the thresholds, not that hidden content is "
        "unrecoverable. The model is only valid on images masked by this release's rule.",
        "",
        f"Lineage: `desensitize lineage masknet-{source}@champion`.",
        "",
    ]
    data = [
        f"# Data card: the masked release of {source}",
        "",
        f"`data/release`, DVC md5 `{release_digest}`, made from `data/raw` (DVC md5 `{raw_digest}`).",
        "",
        "## Content",
        "",
        "| split | images |",
        "|---|---|",
        *(f"| {split} | {count} |" for split, count in info.counts.items()),
        "",
        f"Classes: {', '.join(info.class_names)}. Images: uint8, shape {'x'.join(map(str, info.image_shape))}.",
        "",
        f"Masking: {_mask_line(info)} Hidden pixels hold the declared fill only, never a value computed from "
        "the image.",
        "",
        "Never in the release: raw pixels at hidden positions, attribution maps, the reference model, file "
        "names or metadata of the source, the `public` split. `desensitize verify-release data/release` "
        "proves it against `data/raw`.",
        "",
        "## Inpainting attacks on this release",
        "",
        *_gate_lines(attack, params),
    ]
    for name, lines in (("model_card.md", model), ("data_card.md", data)):
        with atomic_path(paths.cards / name) as tmp:
            tmp.write_text("\n".join(lines))
