from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from desensitize.errors import DesensitizeError
from desensitize.learning.checkpoints import load_checkpoint, save_checkpoint
from desensitize.models import build_backbone
from desensitize.runtime.device import best_device


@pytest.mark.parametrize(
    ("name", "shape"),
    [("small_cnn", (1, 28, 28)), ("small_cnn", (1, 8, 8)), ("small_cnn", (3, 32, 32)), ("resnet18", (3, 32, 32))],
)
def test_backbones_map_images_to_logits(name: str, shape: tuple[int, int, int]):
    model = build_backbone(name, shape[0], 7).eval()
    assert model(torch.rand(2, *shape)).shape == (2, 7)
    # captum needs pre-activation values intact: no in-place ReLU anywhere.
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    assert len(model.stages) >= 3


def test_unknown_backbone_is_named():
    with pytest.raises(DesensitizeError, match="unknown backbone 'vgg'"):
        build_backbone("vgg", 1, 10)


def test_checkpoint_round_trip_restores_the_same_function(tmp_path: Path):
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 1, 10).eval()
    save_checkpoint(tmp_path / "m.npz", model, backbone="small_cnn", in_channels=1, num_classes=10)
    loaded, spec = load_checkpoint(tmp_path / "m.npz")
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(loaded(x), model(x))
    assert spec["num_classes"] == 10 and not loaded.training


def test_damaged_checkpoint_is_refused(tmp_path: Path):
    (tmp_path / "m.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(DesensitizeError, match="m.npz: not a usable checkpoint"):
        load_checkpoint(tmp_path / "m.npz")
    with pytest.raises(DesensitizeError, match="model not found"):
        load_checkpoint(tmp_path / "missing.npz")


def test_device_choice():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert best_device("auto").type == expected
    assert best_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DesensitizeError, match="CUDA is not available"):
            best_device("cuda")
    with pytest.raises(DesensitizeError, match="expected auto, cpu"):
        best_device("tpu")


@pytest.mark.gpu
def test_reference_training_runs_on_cuda():
    from desensitize.config import ClassifierParams
    from desensitize.learning.training import predict, train_classifier

    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8).numpy()
    labels = (images.reshape(64, -1).mean(1) > 127.5).astype("int64")
    model = build_backbone("small_cnn", 1, 2)
    train_classifier(
        model,
        images,
        labels,
        ClassifierParams(epochs=1, batch_size=16, lr=1e-3, weight_decay=0),
        seed=0,
        device=torch.device("cuda"),
    )
    assert next(model.parameters()).is_cuda
    assert predict(model, images, torch.device("cuda")).shape == (64,)


def test_checkpoint_bytes_depend_on_the_weights_only(tmp_path: Path):
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 1, 10)
    save_checkpoint(tmp_path / "a.npz", model, backbone="small_cnn", in_channels=1, num_classes=10)
    save_checkpoint(tmp_path / "b.npz", model, backbone="small_cnn", in_channels=1, num_classes=10)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
