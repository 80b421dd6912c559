from __future__ import annotations

import builtins
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import copy_project, tiny_params
from desensitize.checkpoints import build_model
from desensitize.config import ClassifierParams
from desensitize.inference import MaskedClassifier
from desensitize.masknet import MaskNet, with_mask_channel
from desensitize.models import build_backbone
from desensitize.paths import Paths
from desensitize.privacy import wilson_interval
from desensitize.release import load_released
from desensitize.splits import load_split
from desensitize.stages.baselines import train_baselines
from desensitize.stages.evaluate import evaluate
from desensitize.stages.masks import generate_masks
from desensitize.stages.train import train_on_release
from desensitize.training import seed_everything, train_classifier


@pytest.mark.parametrize(("backbone", "shape"), [("small_cnn", (1, 28, 28)), ("resnet18", (3, 32, 32))])
def test_masknet_logits_ignore_hidden_pixels(backbone: str, shape: tuple[int, int, int]):
    torch.manual_seed(0)
    model = MaskNet(build_backbone(backbone, shape[0] + 1, 10)).eval()
    assert len(model.select) == len(model.backbone.stages)
    mask = (torch.rand(4, 1, *shape[1:]) > 0.5).float()
    images = torch.rand(4, *shape)
    other = torch.where(mask.bool(), images, torch.rand(4, *shape))  # only hidden pixels change
    a, b = model(torch.cat([images, mask], 1)), model(torch.cat([other, mask], 1))
    assert a.shape == (4, 10)
    torch.testing.assert_close(a, b)
    # ...while a visible pixel does matter.
    changed = images.clone()
    changed[mask.expand_as(images).bool()] += 0.5
    assert not torch.allclose(a, model(torch.cat([changed, mask], 1)))


def test_masknet_training_lowers_the_loss_on_a_tiny_set():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 128)
    images = rng.integers(0, 60, (128, 1, 12, 12)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 0, :, 6 * label : 6 * label + 6] += 180
    masks = (rng.random((128, 12, 12)) > 0.3).astype(np.uint8)
    seed_everything(0)
    model = build_model({"backbone": "small_cnn", "in_channels": 1, "num_classes": 2, "masknet": True})
    history = train_classifier(
        model,
        with_mask_channel(images * masks[:, None], masks),
        labels.astype(np.int64),
        ClassifierParams(epochs=4, batch_size=32, lr=3e-3, weight_decay=0),
        seed=0,
        device=torch.device("cpu"),
    )
    assert history.epochs[-1]["loss"] < 0.5 * history.epochs[0]["loss"]


def _released_project(tiny_project, tmp_path: Path) -> tuple[object, Paths]:
    paths = copy_project(tiny_project, tmp_path / "project")
    params = tiny_params(hidden_ratio=0.25)
    generate_masks(params, paths, device="cpu")
    return params, paths


def test_trainer_opens_nothing_but_the_release(tiny_project, tmp_path: Path, monkeypatch):
    params, paths = _released_project(tiny_project, tmp_path)
    opened: list[Path] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            opened.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    train_on_release(params, paths, device="cpu")

    reads = {
        p
        for p in opened
        if p.is_relative_to(paths.root.resolve())
        and not p.is_relative_to(paths.model("x").parent.resolve())
        and not p.is_relative_to((paths.root / "plots").resolve())
    }
    assert reads, "the spy saw no reads"
    assert all(p.is_relative_to(paths.release.resolve()) for p in reads), reads


def test_pipeline_models_evaluate_and_inference_masks_new_images(tiny_project, tmp_path: Path):
    params, paths = _released_project(tiny_project, tmp_path)
    train_on_release(params, paths, device="cpu")
    train_baselines(params, paths, device="cpu")
    metrics = evaluate(params, paths, device="cpu")

    assert set(metrics["accuracy"]) == {"raw", "plain_random", "plain", "masknet"}
    assert metrics["masknet_over_plain"] == pytest.approx(metrics["accuracy"]["masknet"] - metrics["accuracy"]["plain"])
    assert json.loads(paths.report("evaluate").read_text()) == metrics  # the whole record
    assert json.loads(paths.evaluate_metrics.read_text()) == {"accuracy": metrics["accuracy"]}  # the headline
    for name in metrics["accuracy"]:
        assert (paths.evaluate_reports / f"confusion_{name}.png").is_file()
        assert paths.train_history(name).read_text().startswith("epoch,loss,train_accuracy")

    # One call: load the model, hand it raw images, get the same predictions as on the release.
    raw_test = load_split(paths.raw, "test")
    released_test = load_released(paths.release, "test")
    for name in ("plain", "masknet"):
        classifier = MaskedClassifier(paths.model(name), paths.release, device="cpu")
        masked, masks = classifier.release(raw_test.images)
        np.testing.assert_array_equal(masked, released_test.images)
        correct = int((classifier.predict(raw_test.images) == raw_test.labels).sum())
        assert correct / len(raw_test.labels) == pytest.approx(metrics["accuracy"][name])
        # One run's accuracy carries its 95% interval over the test images (Wilson), in the metrics and the table.
        lo, hi = metrics["accuracy_interval"][name]
        assert (lo, hi) == pytest.approx(wilson_interval(correct, len(raw_test.labels)))
        assert lo < metrics["accuracy"][name] < hi and hi - lo > 0.02  # a few hundred test images: not a point
        assert (
            f"{metrics['accuracy'][name]:.4f} [{lo:.4f}, {hi:.4f}]"
            in (paths.evaluate_reports / "summary.md").read_text()
        )

        # A version registered before release.json had a typed model pickled its info as a dict (with
        # the creation time release.json held then).
        old = pickle.loads(pickle.dumps(classifier))
        old.info = {**classifier.info.model_dump(mode="json"), "created": "2024-01-01T00:00:00+00:00"}
        restored = pickle.loads(pickle.dumps(old))
        assert restored.info == classifier.info
        np.testing.assert_array_equal(restored.predict(raw_test.images), classifier.predict(raw_test.images))
