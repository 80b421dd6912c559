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
from desensitize.config import ClassifierParams
from desensitize.data.splits import load_split
from desensitize.inference import MaskedClassifier, SetMaskClassifier, export_format
from desensitize.learning.checkpoints import build_model
from desensitize.learning.training import train_classifier
from desensitize.masking.grid import apply_mask
from desensitize.masknet import MaskNet, with_mask_channel
from desensitize.models import build_backbone
from desensitize.paths import Paths
from desensitize.release import MaskSettings, load_released
from desensitize.runtime.device import seed_everything, to_float
from desensitize.stages.baselines import train_baselines
from desensitize.stages.evaluate import evaluate
from desensitize.stages.masks import generate_masks
from desensitize.stages.train import train_on_release
from desensitize.stats import wilson_interval


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


@pytest.mark.parametrize(
    ("backbone", "masknet"),
    [
        ("small_cnn", False),
        ("small_cnn", True),
        ("small_cnn", {"visible_pool": True, "rezero": True}),
        ("resnet18", True),
    ],
)
def test_a_set_mask_classifier_masks_as_the_release_does_and_exports(backbone: str, masknet: bool | dict):
    """SetMaskClassifier, what a set-scope release with a constant fill is registered as, computes in
    torch what the release and training compute with numpy, on floats in [0, 1] off the uint8 grid too,
    and torch.export captures it (eval mode: batch norm's running stats, no dropout) with
    the batch size left free."""
    channels, size = (1, 8) if backbone == "small_cnn" else (3, 32)
    torch.manual_seed(0)
    model = build_model({"backbone": backbone, "in_channels": channels, "num_classes": 10, "masknet": masknet})
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # running stats that are not the identity
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    model.eval()
    rng = np.random.default_rng(0)
    mask = (rng.random((size, size)) > 0.5).astype(np.uint8)
    fill = (17 + 40 * np.arange(channels, dtype=np.uint8)).reshape(1, channels, 1, 1)
    classifier = SetMaskClassifier(model, mask, fill, mask_channel=bool(masknet)).eval()
    raw = rng.integers(0, 256, (5, channels, size, size), dtype=np.uint8)
    raw[0, :, :2] = 0
    raw[0, :, -2:] = 255
    masks = np.broadcast_to(mask, (5, size, size))
    released = apply_mask(raw, masks, fill)
    floats = raw.astype(np.float32) / 255 + rng.uniform(-0.4, 0.4, raw.shape).astype(np.float32) / 255
    floats = np.clip(floats, 0, 1)  # off the grid, inside [0, 1]: what the model accepts
    with torch.no_grad():
        expected = model(to_float(with_mask_channel(released, masks) if masknet else released))
        torch.testing.assert_close(classifier(torch.from_numpy(floats)), expected)
        example = (torch.from_numpy(floats[:2]),)
        exported = torch.export.export(classifier, example, dynamic_shapes=[{0: torch.export.Dim.AUTO}]).module()
        torch.testing.assert_close(exported(torch.from_numpy(floats)), expected)
        torch.testing.assert_close(exported(torch.from_numpy(floats[:1])), expected[:1])


def test_the_exported_program_itself_refuses_values_outside_0_1_and_nan(tmp_path: Path):
    """What the registry stores as pt2, saved and loaded with torch alone (no code of ours): images in
    [0, 1] give the classifier's logits; 0..255 floats, a value a little outside [0, 1] or a NaN raise an
    error that says what the model accepts, from the program itself."""
    torch.manual_seed(0)
    model = build_model({"backbone": "small_cnn", "in_channels": 1, "num_classes": 10, "masknet": True}).eval()
    mask = (np.random.default_rng(0).random((8, 8)) > 0.5).astype(np.uint8)
    classifier = SetMaskClassifier(model, mask, np.zeros((1, 1, 1, 1), np.uint8), mask_channel=True).eval()
    images = torch.rand(4, 1, 8, 8)
    images[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # the ends of the range are accepted
    with torch.no_grad():
        program = torch.export.export(classifier, (images[:2],), dynamic_shapes=[{0: torch.export.Dim.AUTO}])
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), classifier(images))
        nan = images.clone()
        nan[1, 0, 3, 3] = float("nan")
        for bad, problem in (
            (images * 255, "values outside"),
            (images - 1e-3, "values outside"),
            (nan, "NaN"),
        ):
            with pytest.raises(RuntimeError, match=rf"input images hold {problem}.*float32 .* in \[0, 1\]"):
                loaded(bad)
            with pytest.raises(RuntimeError, match=rf"input images hold {problem}"):
                classifier(bad)


def test_only_a_set_mask_with_a_constant_fill_is_registered_as_pt2():
    def settings(**changes: object) -> MaskSettings:
        return MaskSettings.model_construct(**{"strategy": "saliency", "scope": "set", "fill": "zero", **changes})

    assert export_format(settings()) == ("pt2", None)
    assert export_format(settings(strategy="random", fill="mean")) == ("pt2", None)
    for changes, why in (
        ({"scope": "image"}, "image-scope saliency masks run captum attribution at inference"),
        ({"scope": "image", "strategy": "random"}, "image-scope random masks are drawn per image"),
        ({"fill": "noise"}, "the noise fill draws fresh random values"),
    ):
        model_format, reason = export_format(settings(**changes))
        assert model_format == "pickle" and reason.startswith(why), reason
        assert reason.endswith("loading needs the desensitize package and unpickles its code")


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
    assert json.loads(paths.evaluate_metrics.read_text()) == metrics["accuracy"]  # the headline
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

        # A set-scope release: the classifier in torch alone (what the registry stores as pt2) gives its
        # logits on raw floats, with the release's zero fill and with a mean fill; a noise fill has none.
        floats = torch.from_numpy(raw_test.images.astype(np.float32) / 255)
        with torch.no_grad():
            torch.testing.assert_close(classifier.exportable()(floats), classifier(floats))
            classifier.info = classifier.info.model_copy(update={"fill": "mean"})
            classifier.fill_value = np.asarray([91], dtype=np.uint8)
            torch.testing.assert_close(classifier.exportable()(floats), classifier(floats))
        classifier.info = classifier.info.model_copy(update={"fill": "noise"})
        assert classifier.exportable() is None
