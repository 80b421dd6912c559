from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import copy_project, tiny_params
from desensitize import inpainting, privacy
from desensitize.attack_suite import attack_suite
from desensitize.cli import app
from desensitize.config import GateThresholds, parse_params
from desensitize.errors import DesensitizeError
from desensitize.masks import apply_mask
from desensitize.paths import Paths
from desensitize.stages.attack import run_attack
from desensitize.stages.masks import generate_masks

CPU = torch.device("cpu")
SIZE, N = 16, 64


def _center_mask() -> np.ndarray:
    mask = np.ones((SIZE, SIZE), dtype=np.uint8)
    mask[4:12, 4:12] = 0  # the central 8x8: 4 of 16 cells of 4x4
    return mask


def _constant_classifier() -> nn.Module:
    """Predicts class 0 whatever the image: recognition recovery is exactly 0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0]))
    return model


def _gradients(rng: np.random.Generator, n: int) -> np.ndarray:
    """Smooth ramps a*x + b*y + c: the hidden centre is the continuation of the visible frame."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    a, b = rng.uniform(-0.5, 0.5, (2, n, 1, 1))
    c = rng.uniform(0.25, 0.75, (n, 1, 1))
    return np.rint(np.clip(a * x + b * y + c, 0, 1) * 255).astype(np.uint8)[:, None]


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 1, SIZE, SIZE), dtype=np.uint8)


def _suite(make) -> dict:
    rng = np.random.default_rng(0)
    raw, public = make(rng, N), make(rng, 256)
    masks = np.broadcast_to(_center_mask(), (N, SIZE, SIZE)).copy()
    released = apply_mask(raw, masks, np.zeros((1, 1, 1, 1), dtype=np.uint8))
    params = parse_params({"attack": {"learned": {"epochs": 3, "width": 8, "batch_size": 32}}})
    return attack_suite(
        released,
        masks,
        raw,
        np.zeros(N, dtype=np.int64),
        public,
        "zero",
        [0],
        params,
        _constant_classifier(),
        CPU,
    )


def test_gate_fails_where_the_hidden_region_continues_the_visible_part():
    result = _suite(_gradients)
    verdict = privacy.gate(result["attackers"], GateThresholds())
    assert not verdict["passed"]
    broken = {(v["attacker"], v["score"]) for v in verdict["violations"]}
    assert ("biharmonic", "psnr_gain") in broken and ("biharmonic", "linkage_top1") in broken
    assert result["attackers"]["biharmonic"]["psnr_gain"] > 10


def test_gate_passes_where_hidden_content_is_independent_noise():
    result = _suite(_noise)
    verdict = privacy.gate(result["attackers"], GateThresholds())
    assert verdict["passed"], verdict["violations"]
    for scores in result["attackers"].values():
        assert scores["psnr_gain"] < 1.0
        assert scores["linkage_top1"] <= 4 / N
        assert scores["recognition_recovery"] == 0


def test_only_hidden_pixels_count():
    rng = np.random.default_rng(1)
    raw = rng.random((5, 1, SIZE, SIZE)).astype(np.float32)
    masks = np.broadcast_to(_center_mask(), (5, SIZE, SIZE))
    recon = np.where(masks[:, None] == 0, raw, 1 - raw)  # every visible pixel wrong, every hidden one right
    assert privacy.psnr_hidden(recon, raw, masks) == privacy.PSNR_CAP
    assert privacy.ssim_hidden(raw, raw, masks) == pytest.approx(1.0)
    assert privacy.linkage_top1(recon, raw, masks) == 1.0
    wrong_inside = np.where(masks[:, None] == 0, 1 - raw, raw)  # the opposite: only hidden pixels wrong
    assert privacy.psnr_hidden(wrong_inside, raw, masks) < 10


def test_hidden_information_sees_a_mask_that_hides_only_background():
    images = np.zeros((10, 1, SIZE, SIZE), dtype=np.float32)
    images[:, :, 4:12, 4:12] = np.random.default_rng(0).random((10, 1, 8, 8))
    border_only = 1 - _center_mask()  # hides the blank frame, shows the content
    mean = images.mean(axis=0)
    assert privacy.hidden_information(images, np.broadcast_to(border_only, (10, SIZE, SIZE)), mean) == 0
    assert privacy.hidden_information(images, np.broadcast_to(_center_mask(), (10, SIZE, SIZE)), mean) == 1


def test_classical_attackers_keep_visible_pixels_and_restore_a_flat_image():
    released = np.full((3, 3, SIZE, SIZE), 120, dtype=np.uint8)
    masks = np.broadcast_to(_center_mask(), (3, SIZE, SIZE)).copy()
    released[:, :, 4:12, 4:12] = 0
    for name in inpainting.CLASSICAL:
        out = inpainting.classical(name, released, masks, radius=3)
        assert out.shape == released.shape and out.dtype == np.float32
        np.testing.assert_allclose(out, 120 / 255, atol=2 / 255)


def _project(tiny_project, tmp_path: Path, **attack) -> tuple[object, Paths]:
    paths = copy_project(tiny_project, tmp_path / "project")
    base = tiny_params().model_dump(mode="json")
    base["attack"] = {"sample": 100, "learned": {"epochs": 2, "width": 8}, **attack}
    params = parse_params(base)
    generate_masks(params, paths, device="cpu")
    return params, paths


def test_failed_gate_stops_the_stage_with_the_broken_threshold_named(tiny_project, tmp_path: Path):
    params, paths = _project(tiny_project, tmp_path, thresholds={"max_psnr_gain": 0, "max_linkage_top1": 0})
    with pytest.raises(DesensitizeError, match=r"privacy gate FAILED: .*linkage_top1 .* > 0 .*release blocked"):
        run_attack(params, paths, device="cpu")
    metrics = json.loads(paths.attack_metrics.read_text())  # the failure is recorded, not silent
    assert metrics["gate"]["passed"] is False and metrics["gate"]["overridden"] is False
    assert metrics["gate"]["violations"]
    assert set(metrics["attackers"]) == {"telea", "navier_stokes", "biharmonic", "learned"}
    assert metrics["linkage_chance"] == 1 / 100
    for figure in ("grid.png", "cell_restoration.png"):
        assert (paths.attack_reports / figure).read_bytes()[:4] == b"\x89PNG"
    cells = np.load(paths.attack_reports / "cell_restoration.npy")
    assert cells.shape == (4, 4)  # 8x8 digits, 2-pixel cells


def test_enforce_false_records_the_override_and_goes_on(tiny_project, tmp_path: Path, monkeypatch):
    params, paths = _project(
        tiny_project, tmp_path, thresholds={"max_linkage_top1": 0}, enforce=False, attackers=["telea"]
    )
    metrics = run_attack(params, paths, device="cpu")
    assert metrics["gate"]["passed"] is False and metrics["gate"]["overridden"] is True
    assert "overridden by attack.enforce: false" in metrics["gate"]["message"]
    assert "learned" not in metrics["attackers"]

    monkeypatch.chdir(paths.root)
    summary = CliRunner().invoke(app, ["summary"])
    assert summary.exit_code == 0
    assert "best attacker telea" in summary.output and "overridden by attack.enforce: false" in summary.output
