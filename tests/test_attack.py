from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import LENIENT_GATE, copy_project, tiny_params
from desensitize.attack import gate, inpainting, scores
from desensitize.attack.cache import cached_attack_suite, suite_digest
from desensitize.attack.suite import Scorer, Target, attack_suite, attacked_sample, attacker_data, sample_indices
from desensitize.cli import app
from desensitize.config import parse_params
from desensitize.errors import DesensitizeError
from desensitize.learning.checkpoints import load_checkpoint, save_checkpoint
from desensitize.masking.grid import apply_mask
from desensitize.paths import Paths
from desensitize.stages.attack import run_attack
from desensitize.stages.masks import generate_masks
from desensitize.storage import sha256_file

CPU = torch.device("cpu")
SIZE, N = 16, 64


def _center_mask() -> np.ndarray:
    mask = np.ones((SIZE, SIZE), dtype=np.uint8)
    mask[4:12, 4:12] = 0  # the central 8x8: 4 of 16 cells of 4x4
    return mask


class _Constant(nn.Module):
    """Predicts class 0 whatever the image: recognition recovery is exactly 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0]]).expand(len(x), -1)


def _gradients(rng: np.random.Generator, n: int) -> np.ndarray:
    """Smooth ramps a*x + b*y + c: the hidden centre is the continuation of the visible frame."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    a, b = rng.uniform(-0.5, 0.5, (2, n, 1, 1))
    c = rng.uniform(0.25, 0.75, (n, 1, 1))
    return np.rint(np.clip(a * x + b * y + c, 0, 1) * 255).astype(np.uint8)[:, None]


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 1, SIZE, SIZE), dtype=np.uint8)


LEARNED = {"widths": [8], "max_epochs": 3, "patience": 2, "batch_size": 32, "data_shares": []}


def _attack(raw, public, masks, labels=None, public_labels=None, classes=1, **attack) -> dict:
    labels = np.zeros(len(raw), dtype=np.int64) if labels is None else labels
    public_labels = np.zeros(len(public), dtype=np.int64) if public_labels is None else public_labels
    released = apply_mask(raw, masks, np.zeros((1, 1, 1, 1), dtype=np.uint8))
    cfg = parse_params({"attack": {"learned": LEARNED, **attack}}).attack
    return attack_suite(
        Target(released, masks, raw, labels),
        inpainting.public_data(public, public_labels),
        inpainting.release_fill("zero", [0], 0),
        cfg,
        num_classes=classes,
        model=_Constant(),
        device=CPU,
        seed=0,
    )


def _suite(make, n: int = N) -> dict:
    rng = np.random.default_rng(0)
    raw, public = make(rng, n), make(rng, 256)
    return _attack(raw, public, np.broadcast_to(_center_mask(), (n, SIZE, SIZE)).copy())


def test_gate_fails_where_the_hidden_region_continues_the_visible_part():
    result = _suite(_gradients)
    verdict = gate.check(result["attackers"], result["limits"])
    assert not verdict["passed"]
    broken = {(v["attacker"], v["score"]) for v in verdict["violations"]}
    assert ("biharmonic", "psnr_gain") in broken and ("biharmonic", "linkage_within_class") in broken
    assert result["attackers"]["biharmonic"]["psnr_gain"] > 10


def test_gate_passes_where_hidden_content_is_independent_noise():
    result = _suite(_noise, n=200)
    verdict = gate.check(result["attackers"], result["limits"])
    assert verdict["passed"], verdict["violations"]
    assert result["linkage_within_class_chance"] == pytest.approx(1 / 20)
    for s in result["attackers"].values():
        assert s["judged"]["psnr_gain"] < 1.0
        assert s["recognition_recovery"] == 0 and s["recognition_recovery_interval"] == (0.0, 0.0)


def test_a_sample_larger_than_the_release_is_cut_with_a_warning(caplog: pytest.LogCaptureFixture):
    """Both stages that attack (the gated mask search and the attack stage) take their sample here."""
    with caplog.at_level("WARNING", logger="desensitize.attack.suite"):
        assert attacked_sample(50, 40, seed=0).tolist() == sample_indices(50, 40, seed=0).tolist()
        assert not caplog.records
        assert attacked_sample(50, 100_000, seed=0).tolist() == list(range(50))
    assert "attack.sample = 100000, but the release has 50 train images: attacking all 50" in caplog.text


def test_a_sample_too_small_to_show_privacy_fails_safe():
    """Noise again, but 20 images: with 1 chance hit expected, the linkage interval cannot rule out
    3x chance, so the gate fails although no attacker learns anything."""
    result = _suite(_noise, n=20)
    verdict = gate.check(result["attackers"], result["limits"])
    assert not verdict["passed"]
    assert {v["score"] for v in verdict["violations"]} == {"linkage_within_class"}
    assert all(v["point"] <= v["threshold"] < v["value"] for v in verdict["violations"])


def test_images_equal_to_their_class_mean_give_no_gain_over_the_class_mean_guess():
    rng = np.random.default_rng(3)
    patterns = rng.integers(0, 256, (2, 1, SIZE, SIZE), dtype=np.uint8)  # one image per class, repeated
    labels, public_labels = np.arange(40) % 2, np.arange(60) % 2
    masks = np.broadcast_to(_center_mask(), (40, SIZE, SIZE)).copy()
    result = _attack(patterns[labels], patterns[public_labels], masks, labels, public_labels, classes=2)
    assert result["best_blind"] == "class_mean_fill"
    assert result["blind"]["class_mean_fill"]["psnr_hidden"] == scores.PSNR_CAP
    for name, s in result["attackers"].items():
        assert s["psnr_gain"] <= 0 and s["psnr_gain_interval"][1] <= 0, name


def _mirrored(rng: np.random.Generator, n: int) -> np.ndarray:
    """8x8 images whose right half mirrors the left (random 2x2 blocks): the hidden right half is
    predictable, but only an attacker that saw enough images learns how."""
    left = rng.integers(0, 256, (n, 1, 4, 2), dtype=np.uint8).repeat(2, axis=2).repeat(2, axis=3)
    return np.concatenate([left, left[..., ::-1]], axis=3)


def test_more_attacker_data_that_helps_is_projected_and_the_gate_fails_safe():
    rng = np.random.default_rng(5)
    raw, public = _mirrored(rng, 200), _mirrored(rng, 640)
    mask = np.ones((8, 8), dtype=np.uint8)
    mask[:, 4:] = 0
    learned = {**LEARNED, "max_epochs": 30, "patience": 5, "data_shares": [0.05, 0.2]}
    result = _attack(raw, public, np.broadcast_to(mask, (200, 8, 8)).copy(), attackers=["learned"], learned=learned)
    scaling = result["learned"]["scaling"]
    counts = [point["images"] for point in scaling["points"]]
    assert counts == sorted(counts) and counts[-1] == 576  # 90% of 640, the rest held out
    gains = [point["scores"]["psnr_gain"] for point in scaling["points"]]
    assert gains[-1] > gains[0] + 1, gains  # more data clearly helps
    fit = scaling["fits"]["psnr_gain"]
    assert not fit["flat"] and fit["slope_per_doubling"] > 0 and fit["added"] > 0
    learned_scores = result["attackers"]["learned"]
    upper = learned_scores["psnr_gain_interval"][1]
    assert learned_scores["judged"]["psnr_gain"] == pytest.approx(upper + fit["added"])
    # A threshold the measured interval clears but the projected attacker does not: the gate fails.
    limits = {**result["limits"], "psnr_gain": upper + fit["added"] / 2, "linkage_within_class": 1.0}
    verdict = gate.check(result["attackers"], limits)
    assert [(v["attacker"], v["score"]) for v in verdict["violations"]] == [("learned", "psnr_gain")]


def test_an_attacker_on_the_release_learns_only_from_visible_pixels():
    """A released image (known where visible) re-masked with another released mask: the input shows
    what both masks leave visible; the loss counts what it knows but the second mask hides."""
    images = np.full((1, 1, 2, 2), 200, dtype=np.uint8)
    known = np.array([[[1, 1], [1, 0]]], dtype=np.uint8)
    draw = np.array([[[1, 0], [0, 0]]], dtype=np.uint8)
    model = inpainting.UNet(1, 4)
    x, y, weight = inpainting._batch(
        inpainting.AttackerData(images, known, np.zeros(1, dtype=np.int64)), draw, np.zeros((1, 1, 1, 1)), model, CPU
    )
    np.testing.assert_array_equal(x[0, 1].numpy(), [[1, 0], [0, 0]])  # the mask channel: known and drawn
    np.testing.assert_allclose(x[0, 0].numpy(), [[200 / 255, 0], [0, 0]], rtol=1e-6)
    np.testing.assert_array_equal(weight[0, 0].numpy(), [[0, 1], [1, 0]])


def test_only_hidden_pixels_count():
    rng = np.random.default_rng(1)
    raw = rng.random((5, 1, SIZE, SIZE)).astype(np.float32)
    masks = np.broadcast_to(_center_mask(), (5, SIZE, SIZE))
    recon = np.where(masks[:, None] == 0, raw, 1 - raw)  # every visible pixel wrong, every hidden one right
    assert (scores.psnr_per_image(recon, raw, masks) == scores.PSNR_CAP).all()
    assert scores.ssim_hidden(raw, raw, masks) == pytest.approx(1.0)
    assert scores.linkage_hits(recon, raw, masks).all()
    wrong_inside = np.where(masks[:, None] == 0, 1 - raw, raw)  # the opposite: only hidden pixels wrong
    assert scores.psnr_per_image(wrong_inside, raw, masks).mean() < 10


def test_hidden_information_sees_a_mask_that_hides_only_background():
    images = np.zeros((10, 1, SIZE, SIZE), dtype=np.float32)
    images[:, :, 4:12, 4:12] = np.random.default_rng(0).random((10, 1, 8, 8))
    border_only = 1 - _center_mask()  # hides the blank frame, shows the content
    mean = images.mean(axis=0)
    assert scores.hidden_information(images, np.broadcast_to(border_only, (10, SIZE, SIZE)), mean) == 0
    assert scores.hidden_information(images, np.broadcast_to(_center_mask(), (10, SIZE, SIZE)), mean) == 1


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
    learned = {"widths": [8], "max_epochs": 2, "patience": 1, "data_shares": [0.5]}
    base["attack"] = {"sample": 100, "learned": learned, **attack}
    params = parse_params(base)
    generate_masks(params, paths, device="cpu")
    return params, paths


def test_failed_gate_stops_the_stage_with_the_broken_threshold_named(tiny_project, tmp_path: Path, monkeypatch):
    params, paths = _project(tiny_project, tmp_path, thresholds={"max_psnr_gain": 0, "max_linkage_x_chance": 1})
    with pytest.raises(
        DesensitizeError,
        match=r"privacy gate FAILED: .*linkage_within_class .* > .*x within-class chance.*release blocked",
    ):
        run_attack(params, paths, device="cpu")
    metrics = json.loads(paths.report("attack").read_text())  # the failure is recorded, not silent
    assert json.loads(paths.attack_metrics.read_text())["gate_passed"] is False  # and in the headline
    assert metrics["gate"]["passed"] is False and metrics["gate"]["overridden"] is False
    assert metrics["gate"]["violations"]
    assert set(metrics["attackers"]) == {"telea", "navier_stokes", "biharmonic", "learned"}
    assert set(metrics["blind"]) == {"mean_fill", "class_mean_fill"}
    assert metrics["linkage_chance"] == 1 / 100
    assert metrics["learned"]["width"] == 8 and len(metrics["learned"]["scaling"]["points"]) == 2
    for figure in ("grid.png", "cell_restoration.png", "scaling.png"):
        assert (paths.attack_reports / figure).read_bytes()[:4] == b"\x89PNG"
    cells = np.load(paths.attack_reports / "cell_restoration.npy")
    assert cells.shape == (4, 4)  # 8x8 digits, 2-pixel cells

    # Figures of an earlier release are not shown as this one's.
    paths.report("evaluate").parent.mkdir(parents=True, exist_ok=True)
    paths.report("evaluate").write_text(json.dumps({"accuracy": {"masknet": 0.9}}))
    os.utime(paths.report("evaluate"), (0, 0))
    monkeypatch.chdir(paths.root)
    summary = CliRunner().invoke(app, ["summary"])
    assert summary.exit_code == 0 and "privacy gate FAILED" in summary.output
    assert "evaluate   not run: the privacy gate blocked this release" in summary.output


def test_enforce_false_records_the_override_and_goes_on(tiny_project, tmp_path: Path, monkeypatch):
    params, paths = _project(
        tiny_project, tmp_path, thresholds={"max_linkage_x_chance": 1}, enforce=False, attackers=["telea"]
    )
    metrics = run_attack(params, paths, device="cpu")
    assert metrics["gate"]["passed"] is False and metrics["gate"]["overridden"] is True
    assert "overridden by attack.enforce: false" in metrics["gate"]["message"]
    assert "learned" not in metrics["attackers"]

    monkeypatch.chdir(paths.root)
    summary = CliRunner().invoke(app, ["summary"])
    assert summary.exit_code == 0
    assert "best attacker telea" in summary.output and "overridden by attack.enforce: false" in summary.output


def test_the_gate_says_when_the_reference_model_is_too_weak_for_recognition_recovery(tiny_project, tmp_path: Path):
    params, paths = _project(tiny_project, tmp_path, attackers=["telea"], enforce=False)
    healthy = run_attack(params, paths, device="cpu")
    assert healthy["reference_raw_test"]["above"] and "too weak" not in healthy["gate"]["message"]
    assert "Reference model on raw test images: accuracy" in (paths.attack_reports / "summary.md").read_text()

    model, spec = load_checkpoint(paths.reference_model)  # every weight zeroed: one class for every image
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.zero_()
    save_checkpoint(paths.reference_model, model, **spec)
    weak = run_attack(params, paths, device="cpu")
    assert not weak["reference_raw_test"]["above"] and weak["reference_raw_test"]["p_value"] > 0.01
    too_weak = "the reference model is too weak for recognition recovery to mean anything: its raw test accuracy"
    assert too_weak in weak["gate"]["message"] and "not clearly above chance" in weak["gate"]["message"]
    assert "too weak for recognition recovery to mean anything" in (paths.attack_reports / "summary.md").read_text()


def test_per_image_masks_give_the_attacker_the_release_itself():
    public = inpainting.public_data(np.zeros((3, 1, 4, 4), np.uint8), np.zeros(3, np.int64))
    masks = np.random.default_rng(0).integers(0, 2, (2, 4, 4)).astype(np.uint8)
    released, labels = np.full((2, 1, 4, 4), 9, np.uint8), np.ones(2, np.int64)
    data = attacker_data(public, released, masks, labels, "image", release_data=True)
    assert len(data.images) == 5
    np.testing.assert_array_equal(data.known[3:], masks)  # it knows the released pixels where visible only
    assert len(attacker_data(public, released, masks, labels, "set", True).images) == 3  # one mask: nothing to add
    assert len(attacker_data(public, released, masks, labels, "image", False).images) == 3


def test_the_attack_stage_reuses_the_searchs_run_on_the_released_candidate_and_only_that(tiny_project, tmp_path):
    paths = copy_project(tiny_project, tmp_path / "project")
    params = tiny_params(privacy="gate", attack={"thresholds": LENIENT_GATE})
    masks = generate_masks(params, paths, device="cpu")
    chosen = next(c for c in masks["search"]["candidates"] if c["name"] == masks["candidate"])
    metrics = run_attack(params, paths, device="cpu")
    assert metrics["reused_from_search"] is True
    worst = {s: max(a["judged"][s] for a in metrics["attackers"].values()) for s in chosen["full"]}
    assert worst == pytest.approx(chosen["full"])  # the verdict the search saw is the stage's
    assert "its result is reused" in (paths.attack_reports / "summary.md").read_text()

    # Anything else attacked (another sample here) is attacked afresh.
    other = params.model_copy(update={"attack": params.attack.model_copy(update={"sample": 150})})
    assert run_attack(other, paths, device="cpu")["reused_from_search"] is False


def test_the_attack_cache_keys_on_every_input(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    masks = np.ones((40, 8, 8), np.uint8)
    masks[:, 2:6, 2:6] = 0
    labels = np.arange(40) % 2
    target = Target(apply_mask(raw, masks, np.zeros((1, 1, 1, 1), np.uint8)), masks, raw, labels)
    public = inpainting.public_data(raw, labels)
    fill = inpainting.release_fill("zero", [0], 0)
    cfg = parse_params({"attack": {"sample": 40, "attackers": ["telea"]}}).attack
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    kwargs = {"num_classes": 2, "model": model, "device": torch.device("cpu"), "seed": 0}
    key = suite_digest(target, public, fill, cfg, **kwargs)
    changed = [
        suite_digest(Target(target.released, masks, raw, 1 - labels), public, fill, cfg, **kwargs),
        suite_digest(target, public, inpainting.release_fill("mean", [9], 0), cfg, **kwargs),
        suite_digest(target, public, fill, cfg.model_copy(update={"gallery": 5}), **kwargs),
        suite_digest(target, public, fill, cfg, **{**kwargs, "seed": 1}),
        suite_digest(target, public, fill, cfg, **{**kwargs, "model": nn.Sequential(nn.Flatten(), nn.Linear(64, 2))}),
    ]
    assert len({key, *changed}) == 6
    first = cached_attack_suite(tmp_path, target, public, fill, cfg, **kwargs)
    second = cached_attack_suite(tmp_path, target, public, fill, cfg, **kwargs)
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["attackers"]["telea"]["psnr_gain"] == first["attackers"]["telea"]["psnr_gain"]
    np.testing.assert_array_equal(second["reconstructions"]["telea"], first["reconstructions"]["telea"])


def test_a_rerun_of_the_attack_stage_writes_the_same_metrics_and_keeps_timings_for_mlflow(tiny_project, tmp_path):
    """Its report is a dependency of `register`: a wall time in it would register a duplicate version."""
    params, paths = _project(tiny_project, tmp_path, enforce=False)
    first = run_attack(params, paths, device="cpu")
    files = (paths.attack_metrics, paths.report("attack"))
    digests = [sha256_file(p) for p in files]
    shutil.rmtree(paths.attack_cache)  # attacked afresh, the attackers take other wall times
    run_attack(params, paths, device="cpu")
    assert [sha256_file(p) for p in files] == digests
    assert "seconds" not in paths.report("attack").read_text()
    assert first["attackers"]["learned"]["seconds"] > 0  # returned to the MLflow run only


class _ReadsOneRegion(nn.Module):
    """A reference model that reads the top-left 4x4 region only: class 1 where it holds a checkerboard
    (of either phase), class 0 where it is flat. Its magnitude of correlation with the checkerboard decides."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("checker", torch.tensor(np.indices((4, 4)).sum(axis=0) % 2 * 2.0 - 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = ((x[:, 0, :4, :4] - 0.5) * self.checker).sum(dim=(1, 2)).abs()
        return torch.stack([0.8 - s, s - 0.8], dim=1)


def _one_region(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """8x8 images, half of each class: the top-left 4x4 region flat at 128 (class 0) or a faint checkerboard
    of random phase around it (class 1, +-26 levels); everything else uniform noise."""
    labels = np.arange(n) % 2
    images = rng.integers(0, 256, (n, 1, 8, 8)).astype(np.int64)
    phase = rng.integers(0, 2, n)[:, None, None]
    checker = (np.indices((4, 4)).sum(axis=0)[None] + phase) % 2 * 2 - 1
    images[:, 0, :4, :4] = 128 + np.where(labels[:, None, None] == 1, 26 * checker, 0)
    return images.astype(np.uint8), labels


def test_recognition_recovery_is_known_by_construction_and_fails_the_gate_alone():
    """The mask hides the region the reference model reads, and the noise beside it. Released (zero fill)
    and blind guesses (the class means of the public images: the checkerboard's phases average out) leave
    the region flat, so the model says class 0 for every image: half right. An attacker that restores the
    region exactly (and guesses the noise blind) makes it right on every image: recovery exactly +0.5,
    with PSNR gain and linkage far under their limits, so the production gate fails on recovery alone; an
    attacker that cannot restore the region recovers nothing and passes."""
    rng = np.random.default_rng(0)
    raw, labels = _one_region(rng, 400)
    public, public_labels = _one_region(rng, 400)
    masks = np.ones((400, 8, 8), dtype=np.uint8)
    masks[:, :4, :] = 0  # the region and the noise to its right
    released = apply_mask(raw, masks, np.zeros((1, 1, 1, 1), dtype=np.uint8))
    cfg = parse_params({}).attack  # production thresholds, gallery and confidence
    target = Target(released, masks, raw, labels)
    scorer = Scorer(
        target, inpainting.public_data(public, public_labels), cfg, num_classes=2, model=_ReadsOneRegion(), device=CPU,
        seed=0,
    )  # fmt: skip
    blind = scorer.blind[scorer.best_blind]
    restores = blind.copy()
    restores[:, :, :4, :4] = raw[:, :, :4, :4] / 255  # the region exactly, the noise as the blind guess
    assert scorer.baseline_correct.mean() == 0.5
    attackers = {"restores": scorer(restores), "cannot": scorer(blind)}
    for s in attackers.values():
        s["judged"] = gate.upper_ends(s)
    assert attackers["restores"]["recognition_recovery"] == 0.5
    assert attackers["cannot"]["recognition_recovery"] == 0.0
    low, high = attackers["restores"]["recognition_recovery_interval"]
    assert 0.44 < low < 0.5 < high < 0.56  # +-1.96 x sqrt(0.25 / 400) = +-0.049 around 0.5
    assert attackers["restores"]["psnr_gain"] < 0.5 and attackers["restores"]["linkage_within_class"] < 0.1
    limits = gate.limits(cfg.thresholds, scorer.linkage_within_class_chance)
    verdict = gate.check(attackers, limits)
    assert [(v["attacker"], v["score"]) for v in verdict["violations"]] == [("restores", "recognition_recovery")]
    assert gate.check({"cannot": attackers["cannot"]}, limits)["passed"]
