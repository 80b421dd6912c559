from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from desensitize.config import AttributionParams
from desensitize.errors import DesensitizeError
from desensitize.masking.attribution import attribution_maps
from desensitize.masking.grid import mask_from_maps
from desensitize.models import build_backbone

CPU = torch.device("cpu")


def _linear(h: int = 6, w: int = 6, classes: int = 3) -> tuple[nn.Module, torch.Tensor]:
    """A linear classifier over pixels whose weights are known: its saliency is |W[target]|."""
    torch.manual_seed(0)
    weights = torch.randn(classes, 1, h, w)
    model = nn.Sequential(nn.Flatten(), nn.Linear(h * w, classes, bias=True))
    with torch.no_grad():
        model[1].weight.copy_(weights.reshape(classes, -1))
    return model, weights


def test_saliency_of_a_linear_model_is_its_weights():
    model, weights = _linear()
    images = torch.rand(10, 1, 6, 6)
    targets = torch.arange(10) % 3
    maps = attribution_maps(model, images, targets, AttributionParams(method="saliency"), device=CPU, seed=0)
    expected = weights[targets, 0].abs()
    expected = expected / expected.sum(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(10))


def test_integrated_gradients_of_a_linear_model_is_input_times_weight():
    model, weights = _linear()
    images = torch.rand(4, 1, 6, 6)
    targets = torch.tensor([0, 1, 2, 0])
    maps = attribution_maps(
        model,
        images,
        targets,
        AttributionParams(method="integrated_gradients", ig_steps=8),
        device=CPU,
        seed=0,
        batch_size=2,
    )
    expected = (images[:, 0] * weights[targets, 0]).abs()
    torch.testing.assert_close(maps, expected / expected.sum(dim=(1, 2), keepdim=True))


def test_set_template_and_mask_of_a_linear_model_by_hand():
    # One class whose weight is large on the left half: the left half must stay visible.
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    weight = torch.ones(4, 4)
    weight[:, :2] = 10.0
    with torch.no_grad():
        model[1].weight.copy_(weight.reshape(1, -1))
    maps = attribution_maps(
        model,
        torch.rand(5, 1, 4, 4),
        torch.zeros(5, dtype=torch.long),
        AttributionParams(method="saliency"),
        device=CPU,
        seed=0,
    )
    template = maps.mean(0).numpy()
    np.testing.assert_allclose(template, weight.numpy() / weight.sum().item(), rtol=1e-6)
    mask = mask_from_maps(template, 2, 0.5)
    expected = np.zeros((4, 4), dtype=np.uint8)
    expected[:, :2] = 1
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize(
    "cfg",
    [
        AttributionParams(method="saliency", noise_tunnel=True, nt_samples=3),
        AttributionParams(method="gradient_shap", shap_samples=4),
        AttributionParams(method="grad_cam", gradcam_layer="stages.1"),
        AttributionParams(method="occlusion", occlusion_window=4, occlusion_stride=4),
        AttributionParams(method="integrated_gradients", ig_steps=4, noise_tunnel=True, nt_samples=2),
    ],
    ids=lambda c: c.method + ("+nt" if c.noise_tunnel else ""),
)
def test_every_method_gives_seeded_normalised_maps(cfg: AttributionParams):
    torch.manual_seed(0)
    model = build_backbone("small_cnn", 1, 4).eval()
    images, targets = torch.rand(6, 1, 12, 12), torch.tensor([0, 1, 2, 3, 0, 1])
    maps = attribution_maps(model, images, targets, cfg, device=CPU, seed=7, batch_size=4)
    assert maps.shape == (6, 12, 12) and (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(1, 2)), torch.ones(6))
    again = attribution_maps(model, images, targets, cfg, device=CPU, seed=7, batch_size=4)
    torch.testing.assert_close(maps, again)


def test_grad_cam_points_at_the_discriminative_region():
    # Feature 0 lives in the top-left quadrant, feature 1 in the bottom-right; class 0 reads only
    # feature 0, so its Grad-CAM (channel weights x activations) must sit in the top-left.
    layer = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 8 * 8, 2))
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        layer.bias.zero_()
        model[3].weight.zero_()
        model[3].weight.view(2, 2, 8, 8)[0, 0] = 1.0
    images = torch.zeros(3, 2, 8, 8)
    images[:, 0, :4, :4] = torch.rand(3, 4, 4) + 0.5
    images[:, 1, 4:, 4:] = torch.rand(3, 4, 4) + 0.5
    cfg = AttributionParams(method="grad_cam", gradcam_layer="0")
    maps = attribution_maps(model, images, torch.zeros(3, dtype=torch.long), cfg, device=CPU, seed=0)
    assert maps[:, :4, :4].sum(dim=(1, 2)).min() > 0.9


def test_unknown_grad_cam_layer_is_named():
    model = build_backbone("small_cnn", 1, 2)
    with pytest.raises(DesensitizeError, match="gradcam_layer = 'stages.9'.*stages.1"):
        attribution_maps(
            model,
            torch.rand(2, 1, 8, 8),
            torch.zeros(2, dtype=torch.long),
            AttributionParams(method="grad_cam", gradcam_layer="stages.9"),
            device=CPU,
            seed=0,
        )


@pytest.mark.gpu
def test_attribution_on_cuda_matches_cpu():
    model, _ = _linear()
    images, targets = torch.rand(8, 1, 6, 6), torch.arange(8) % 3
    cfg = AttributionParams(method="saliency")
    on_gpu = attribution_maps(model, images, targets, cfg, device=torch.device("cuda"), seed=0)
    torch.testing.assert_close(on_gpu, attribution_maps(model, images, targets, cfg, device=CPU, seed=0))


_MASKS_WITH_THREADS = """
import json, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
from desensitize.config import parse_params
from desensitize.paths import Paths
from desensitize.release import read_release_info
from desensitize.stages.masks import generate_masks
params = parse_params(json.loads(sys.argv[2]))
from pathlib import Path
paths = Paths(Path(sys.argv[3]))
generate_masks(params, paths, device="cpu")
info = read_release_info(paths.release)
print(json.dumps({split: [e.sha256 for e in entries] for split, entries in info.shards.items()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["set", "image"])
def test_masks_given_a_reference_model_do_not_depend_on_the_thread_count(tiny_project, tmp_path, scope):
    """What the README claims is byte-reproducible across machines: given the same reference model, the
    masks stage (a fixed template, no training) writes the same shards with 1 and 2 CPU threads."""
    import json
    import subprocess
    import sys

    from conftest import copy_project

    params, _ = tiny_project
    settings = params.model_dump(mode="json")
    settings["masks"].update(template="mean", scope=scope)
    shards = []
    for threads in (1, 2):
        paths = copy_project(tiny_project, tmp_path / f"threads{threads}")
        result = subprocess.run(
            [sys.executable, "-c", _MASKS_WITH_THREADS, str(threads), json.dumps(settings), str(paths.root)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        shards.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert shards[0] == shards[1]
