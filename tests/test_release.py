from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import FAILING_GATE, LENIENT_GATE, TINY_SEARCH, copy_project, tiny_params
from desensitize.bundle.verify import verify_release
from desensitize.cli import app
from desensitize.data.splits import load_split
from desensitize.errors import DesensitizeError
from desensitize.masking.grid import channel_mean
from desensitize.paths import Paths
from desensitize.release import RELEASE_JSON, load_released
from desensitize.stages.ingest import ingest
from desensitize.stages.masks import generate_masks
from desensitize.storage import sha256_file, write_arrays


def _copy(tiny_project, tmp_path: Path) -> Paths:
    return copy_project(tiny_project, tmp_path / "project")


def _checksums(paths: Paths) -> dict:
    release = json.loads((paths.release / RELEASE_JSON).read_text())
    return {e["file"]: e["sha256"] for split in release["shards"].values() for e in split}


def _utilities(metrics: dict) -> dict[str, float]:
    return {c["template"]: c["utility"] for c in metrics["search"]["candidates"]}


def test_saliency_set_release_is_verified_and_holds_only_what_may_leave(tiny_project, tmp_path: Path):
    paths = _copy(tiny_project, tmp_path)
    metrics = generate_masks(tiny_params(), paths, device="cpu")

    assert metrics["n_cells"] == 16 and metrics["n_hidden_cells"] == 8 and metrics["hidden_ratio"] == 0.5
    assert metrics["attribution_images_per_second"] > 0
    for key in ("reference_accuracy_on_masked_test", "reference_accuracy_on_random_masked_test"):
        assert 0 <= metrics[key] <= 1
    assert sorted(p.name for p in paths.release.iterdir()) == ["release.json", "test-000.npz", "train-000.npz"]
    assert verify_release(paths.release, paths.raw)["splits"]["train"]["hidden_ratio_pixels"] == 0.5
    released, raw = load_released(paths.release, "train"), load_split(paths.raw, "train")
    assert (released.masks == released.masks[0]).all()  # one mask for the set
    hidden = np.broadcast_to(released.masks[:, None] == 0, raw.images.shape)
    assert (released.images[hidden] == 0).all() and (raw.images[hidden] > 0).any()
    release = json.loads((paths.release / RELEASE_JSON).read_text())
    assert set(release["shards"]) == {"train", "test"}  # never the public split
    scores = _utilities(metrics)  # the default masks.template = search scored every candidate
    assert list(scores) == ["mean", "class_contrast", "mean_spread", "restorability"]
    assert all(0 < v <= 1 for v in scores.values())
    assert release["template"] == metrics["template"] == max(scores, key=scores.__getitem__)
    assert (
        release["candidate"] == metrics["candidate"] == metrics["search"]["chosen"] == f"{metrics['template']} c2 h0.5"
    )
    for figure in ("template.png", "mask.png", "samples.png"):
        assert (paths.masks_reports / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("scope", ["image", "set"])
def test_same_seed_same_masks_and_checksums(tiny_project, tmp_path: Path, scope: str):
    params = tiny_params(scope=scope, fill="noise")
    first, second = _copy(tiny_project, tmp_path / "a"), _copy(tiny_project, tmp_path / "b")
    first_metrics = generate_masks(params, first, device="cpu")
    assert generate_masks(params, second, device="cpu")["search"] == first_metrics["search"]
    assert _checksums(first) == _checksums(second)
    masks = load_released(first.release, "train").masks
    distinct = len({m.tobytes() for m in masks})
    assert distinct == 1 if scope == "set" else distinct > 10  # image scope: masks follow each image
    verify_release(first.release, first.raw)

    other = tiny_params(scope=scope, fill="noise").model_copy(update={"seed": 1})
    generate_masks(other, second, device="cpu")
    assert _checksums(first) != _checksums(second)


def test_template_search_releases_the_mask_of_the_best_scoring_candidate(tiny_project, tmp_path: Path):
    searched = _copy(tiny_project, tmp_path / "search")
    scores = _utilities(generate_masks(tiny_params(), searched, device="cpu"))
    masks = {}
    for name in ("mean", "class_contrast", "mean_spread", "restorability"):
        paths = _copy(tiny_project, tmp_path / name)
        metrics = generate_masks(tiny_params(template=name), paths, device="cpu")
        assert metrics["template"] == name and metrics["search"] is None
        masks[name] = load_released(paths.release, "train").masks[0]
    assert len({mask.tobytes() for mask in masks.values()}) >= 3  # real candidates
    best = max(scores, key=scores.__getitem__)
    np.testing.assert_array_equal(load_released(searched.release, "train").masks[0], masks[best])


def test_each_restorability_weight_is_a_template_and_the_random_search_gets_as_many_draws(tiny_project, tmp_path):
    search = {**TINY_SEARCH, "templates": ["mean", "restorability"], "restorability_weights": [1.0, 0.25]}
    names, weights = {}, {}
    for strategy in ("saliency", "random"):
        paths = _copy(tiny_project, tmp_path / strategy)
        record = generate_masks(tiny_params(strategy=strategy, search=search), paths, device="cpu")["search"]
        names[strategy] = [c["name"] for c in record["candidates"]]
        weights[strategy] = [c.get("restorability_weight") for c in record["candidates"]]
    assert names["saliency"] == ["mean c2 h0.5", "restorability c2 h0.5", "restorability w0.25 c2 h0.5"]
    assert names["random"] == [f"random {k} set c2 h0.5" for k in range(3)]  # the same budget
    assert weights == {"saliency": [None, 1.0, 0.25], "random": [None] * 3}
    with pytest.raises(DesensitizeError, match="restorability_weights"):
        tiny_params(search={**search, "restorability_weights": [0.5, 0.5]})


def test_a_holdout_too_small_names_the_key_and_writes_nothing(tiny_project, tmp_path: Path):
    paths = _copy(tiny_project, tmp_path)
    with pytest.raises(DesensitizeError, match=r"masks.search.holdout = 0.0001 holds out 0 of \d+ train images"):
        generate_masks(tiny_params(search={**TINY_SEARCH, "holdout": 0.0001}), paths, device="cpu")
    assert not paths.release.exists() and not paths.masks_metrics.exists()


@pytest.mark.parametrize("strategy", ["random", "center", "border"])
def test_baseline_strategies_release_the_same_amount(tiny_project, tmp_path: Path, strategy: str):
    paths = _copy(tiny_project, tmp_path)
    metrics = generate_masks(tiny_params(strategy=strategy, fill="mean", template="mean"), paths, device="cpu")
    assert metrics["n_hidden_cells"] == 8 and metrics["attribution_images_per_second"] is None
    verify_release(paths.release, paths.raw)
    if strategy == "random":
        assert metrics["reference_accuracy_on_masked_test"] == metrics["reference_accuracy_on_random_masked_test"]


@pytest.fixture
def released(tiny_project, tmp_path: Path) -> Paths:
    paths = _copy(tiny_project, tmp_path)
    generate_masks(tiny_params(), paths, device="cpu")
    return paths


def _rewrite_shard(paths: Paths, change, k: int = 0) -> None:
    """Edit train shard k and re-sign it, so that only the content check can catch the change."""
    shard = paths.release / f"train-{k:03d}.npz"
    with np.load(shard) as data:
        arrays = {name: data[name].copy() for name in data.files}
    change(arrays)
    write_arrays(shard, **arrays)
    release = json.loads((paths.release / RELEASE_JSON).read_text())
    release["shards"]["train"][k]["sha256"] = sha256_file(shard)
    (paths.release / RELEASE_JSON).write_text(json.dumps(release))


def test_verify_catches_one_leaked_raw_pixel(released: Paths):
    raw = load_split(released.raw, "train").images
    masks = load_released(released.release, "train").masks
    i, c, y, x = (int(v) for v in np.argwhere((masks[:, None] == 0) & (raw > 0))[0])

    def leak(arrays):
        arrays["images"][i, c, y, x] = raw[i, c, y, x]

    _rewrite_shard(released, leak)
    with pytest.raises(
        DesensitizeError, match=rf"train image {i}, channel {c}, pixel \(row {y}, col {x}\).*raw pixel leaked"
    ):
        verify_release(released.release, released.raw)


def test_verify_catches_an_extra_file_and_an_extra_array(released: Paths):
    np.save(released.release / "attribution.npy", np.zeros((8, 8)))
    with pytest.raises(DesensitizeError, match="attribution.npy: file not allowed"):
        verify_release(released.release, released.raw)
    (released.release / "attribution.npy").unlink()

    _rewrite_shard(released, lambda arrays: arrays.update(template=np.zeros((8, 8))))
    with pytest.raises(DesensitizeError, match=r"arrays not allowed in a release: \['template'\]"):
        verify_release(released.release, released.raw)


def test_verify_catches_an_altered_checksum_and_cli_exits_nonzero(released: Paths, monkeypatch):
    monkeypatch.chdir(released.root)
    ok = CliRunner().invoke(app, ["verify-release", "data/release"])
    assert ok.exit_code == 0 and "ok: data/release verified" in ok.output

    release = json.loads((released.release / RELEASE_JSON).read_text())
    release["shards"]["test"][0]["sha256"] = "0" * 64
    (released.release / RELEASE_JSON).write_text(json.dumps(release))
    result = CliRunner().invoke(app, ["verify-release", "data/release"])
    assert result.exit_code == 2
    assert "test-000.npz: checksum differs" in result.output


def test_verify_names_a_missing_shard_in_one_line(released: Paths, monkeypatch):
    (released.release / "test-000.npz").unlink()
    monkeypatch.chdir(released.root)
    result = CliRunner().invoke(app, ["verify-release", "data/release"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line == (
        "error: data/release/test-000.npz: shard listed in release.json is missing (the release bundle is "
        "incomplete; make it again)"
    )


def test_a_failed_verification_leaves_no_release(tiny_project, tmp_path: Path, monkeypatch):
    paths = _copy(tiny_project, tmp_path)

    def broken(*args, **kwargs):
        raise DesensitizeError("simulated verification failure")

    monkeypatch.setattr("desensitize.stages.masks.verify_release", broken)
    with pytest.raises(DesensitizeError, match="simulated"):
        generate_masks(tiny_params(), paths, device="cpu")
    assert not paths.release.exists()
    assert sorted(p.name for p in paths.release.parent.iterdir()) == ["raw"]


def test_the_gated_search_releases_a_candidate_that_passed_the_full_gate_and_records_the_search(
    tiny_project, tmp_path: Path
):
    paths = _copy(tiny_project, tmp_path)
    params = tiny_params(privacy="gate", attack={"thresholds": LENIENT_GATE})
    metrics = generate_masks(params, paths, device="cpu")
    search = metrics["search"]
    candidates = {c["name"]: c for c in search["candidates"]}
    chosen = candidates[metrics["candidate"]]
    assert chosen["passed"] is True and set(chosen["full"]) == {
        "psnr_gain",
        "linkage_within_class",
        "recognition_recovery",
    }
    # The most useful candidate passes a lenient gate: nothing more useful was skipped.
    assert chosen["utility"] == max(c["utility"] for c in candidates.values())
    assert all(c["screen"] is not None for c in candidates.values())  # every candidate was screened
    assert search["screen_agreement"]["candidates"] == 1
    release = json.loads((paths.release / RELEASE_JSON).read_text())
    assert release["candidate"] == metrics["candidate"] and release["privacy"] == "gate"
    assert release["search"] == search == json.loads((paths.masks_reports / "search.json").read_text())
    verify_release(paths.release, paths.raw)
    # Amortized scoring searched cell sets beyond the grid, and recorded the price of each level of privacy:
    # the gate's own level (10,000x chance here) is the release, the looser ones the default 5x and 10x.
    assert search["scoring"] == "amortized" and any(name.startswith("cells c2 ") for name in candidates)
    assert [(row["level"], row["gate"]) for row in search["tradeoff"]] == [(5, False), (10, False), (10_000, True)]
    assert search["tradeoff"][-1]["candidate"] == metrics["candidate"] and "cost" in search
    assert (paths.masks_reports / "tradeoff.png").stat().st_size > 0
    assert f"'{metrics['candidate']}'" in (paths.masks_reports / "summary.md").read_text()


def test_when_no_candidate_passes_the_gate_the_stage_names_the_closest_and_releases_nothing(
    tiny_project, tmp_path: Path
):
    paths = _copy(tiny_project, tmp_path)
    params = tiny_params(privacy="gate", attack={"thresholds": FAILING_GATE})
    with pytest.raises(DesensitizeError, match=r"no mask candidate passes the privacy gate .*closest: .+ \(utility"):
        generate_masks(params, paths, device="cpu")
    assert not paths.release.exists() and not paths.masks_metrics.exists()
    record = json.loads((paths.masks_reports / "search.json").read_text())
    assert record["chosen"] is None and len(record["candidates"]) >= 16  # the grid and every single cell
    assert all(row["candidate"] is None for row in record["tradeoff"] if row["gate"])


def test_a_search_grid_that_cannot_mask_these_images_names_the_key_before_any_work(tiny_project, tmp_path: Path):
    paths = _copy(tiny_project, tmp_path)
    with pytest.raises(DesensitizeError, match=r"masks.search.hidden_ratios: 0.9 hides 4 of the 4 cells of 4 pixels"):
        generate_masks(
            tiny_params(search={**TINY_SEARCH, "cells": [2, 4], "hidden_ratios": [0.5, 0.9]}), paths, device="cpu"
        )
    with pytest.raises(DesensitizeError, match=r"masks.search.cells: cell 16 is larger than the 8x8 images"):
        generate_masks(tiny_params(search={**TINY_SEARCH, "cells": [16]}), paths, device="cpu")
    assert not paths.release.exists() and not paths.masks_reports.exists()


def test_summary_says_when_the_search_released_nothing(tmp_path: Path, monkeypatch):
    paths = Paths(tmp_path)
    paths.masks_reports.mkdir(parents=True)
    (paths.masks_reports / "search.json").write_text(json.dumps({"chosen": None, "candidates": []}))
    paths.metrics.mkdir()
    paths.report("attack").parent.mkdir(parents=True)
    paths.report("attack").write_text("{}")  # an earlier run's: must not be shown as this one's
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["summary"])
    assert result.exit_code == 0
    assert "masks      no release: no mask candidate passes the privacy gate" in result.output
    assert "attack " not in result.output


def _declare(paths: Paths, **changes) -> None:
    """Edit release.json's settings (not the shards): what verify-release must catch."""
    path = paths.release / RELEASE_JSON
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_verify_checks_the_declared_grid_and_ratios_against_the_masks(released: Paths, monkeypatch):
    original = (released.release / RELEASE_JSON).read_text()
    cases = [  # the tiny release: 8x8 images, 2-pixel cells, 8 of 16 cells hidden
        ({"hidden_ratio": 0.9}, r"release.json: hidden_ratio 0.9, but 8 of 16 cells hidden is 0.5"),
        (
            {"hidden_ratio_requested": 0.9},
            r"release.json: hidden_ratio_requested 0.9 hides 14 of 16 cells, n_hidden_cells says 8",
        ),
        (
            {"hidden_ratio_requested": 0.75, "hidden_ratio": 0.75, "n_hidden_cells": 12},
            r"train image 0: 8 hidden cells, release.json says 12 of 16",
        ),
        ({"cell": 4}, r"release.json: cell 4 cuts 8x8 images into a 2x2 grid, grid says \[4, 4\]"),
        ({"n_cells": 20}, r"release.json: n_cells 20, but a 4x4 grid has 16 cells"),
        ({"cell": 4, "grid": [2, 2], "n_cells": 4, "n_hidden_cells": 2}, r"masks do not hide whole 4x4 cells"),
        ({"hidden_ratio_pixels": 0.9}, r"release.json: hidden_ratio_pixels 0.9, but the train masks hide 0.5"),
        ({"image_shape": [1, 16, 16]}, r"release.json: image_shape \[1, 16, 16\], the raw images are \[1, 8, 8\]"),
    ]
    for changes, message in cases:
        _declare(released, **changes)
        with pytest.raises(DesensitizeError, match=message):
            verify_release(released.release, released.raw)
        (released.release / RELEASE_JSON).write_text(original)

    _declare(released, hidden_ratio=0.9)
    monkeypatch.chdir(released.root)
    result = CliRunner().invoke(app, ["verify-release", "data/release"])
    assert result.exit_code == 2 and "hidden_ratio 0.9, but 8 of 16 cells hidden is 0.5" in result.output


def test_verify_checks_the_declared_fill_against_the_raw_data_and_the_hidden_pixels(released: Paths, monkeypatch):
    original = (released.release / RELEASE_JSON).read_text()
    mean = channel_mean([load_split(released.raw, "train").images]).tolist()
    assert mean != [0]
    cases = [
        (
            {"fill_value": [33]},  # the true fill is 0, as is much of the raw background: no leak to report
            r"release.json: fill_value \[33\] does not match fill 'zero' \(expected \[0\]\)",
        ),
        (
            {"fill": "mean"},
            rf"release.json: fill 'mean' declares fill_value \[0\], but the per-channel mean of the raw "
            rf"train images is \[{mean[0]}\]",
        ),
        (
            {"fill": "mean", "fill_value": mean},
            rf"train: declared fill_value \[{mean[0]}\] \(fill 'mean'\), but the hidden pixels of channel 0 hold 0",
        ),
        ({"fill_seed": 5}, r"release.json: fill_seed 5, but fill 'zero' draws no noise \(expected null\)"),
    ]
    for changes, message in cases:
        _declare(released, **changes)
        with pytest.raises(DesensitizeError, match=message) as raised:
            verify_release(released.release, released.raw)
        assert "leaked" not in str(raised.value)
        (released.release / RELEASE_JSON).write_text(original)

    _declare(released, fill="mean")
    monkeypatch.chdir(released.root)
    result = CliRunner().invoke(app, ["verify-release", "data/release"])
    assert result.exit_code == 2 and "fill 'mean' declares fill_value [0]" in result.output


def test_verify_needs_the_seed_of_a_noise_fill(tiny_project, tmp_path: Path):
    paths = _copy(tiny_project, tmp_path)
    generate_masks(tiny_params(strategy="center", fill="noise"), paths, device="cpu")
    verify_release(paths.release, paths.raw)
    _declare(paths, fill_seed=None)
    with pytest.raises(DesensitizeError, match=r"release.json: fill 'noise' needs the fill_seed it was drawn with"):
        verify_release(paths.release, paths.raw)
    _declare(paths, fill_seed=7)
    with pytest.raises(
        DesensitizeError, match=r"train image 0, .*hidden pixel holds \d+, not the noise of fill_seed 7"
    ):
        verify_release(paths.release, paths.raw)


def test_a_rerun_of_the_masks_stage_writes_byte_identical_outputs(tiny_project, tmp_path: Path):
    """DVC hashes data/release (and the stage's other outputs): identical shards must give identical bytes,
    or every downstream stage reruns and `register` adds a duplicate version."""
    paths = _copy(tiny_project, tmp_path)
    params = tiny_params(template="mean")

    def outputs() -> dict[str, str]:
        files = [*paths.release.rglob("*"), *paths.masks_reports.rglob("*"), paths.masks_metrics]
        assert paths.report("masks") in files
        return {p.relative_to(paths.root).as_posix(): sha256_file(p) for p in files if p.is_file()}

    generate_masks(params, paths, device="cpu")
    first = outputs()
    time.sleep(1.1)  # a creation time in seconds would differ
    metrics = generate_masks(params, paths, device="cpu")
    assert outputs() == first
    assert metrics["attribution_images_per_second"] > 0  # returned to the MLflow run, kept out of the file
    assert "attribution_images_per_second" not in json.loads(paths.report("masks").read_text())


@pytest.mark.parametrize(
    "masks",
    [{}, {"template": "mean", "scope": "image", "fill": "noise"}],
    ids=["set-search", "image-noise"],
)
def test_a_release_made_shard_by_shard_is_the_one_shard_release(tiny_project, tmp_path: Path, masks: dict):
    """Raw data in 100-image shards (11 train shards): the stage attributes, gathers the template
    statistics, masks, writes and verifies shard by shard, and must release the same images under the
    same mask, after the same search, as from one shard; verification names a defect in a later shard
    by its index in the split."""
    one = _copy(tiny_project, tmp_path / "one")
    params = tiny_params(**masks)
    sharded = params.model_copy(update={"data": params.data.model_copy(update={"shard_size": 100})})
    many = Paths(tmp_path / "many")
    ingest(sharded, many)
    shutil.copytree(one.reference_model.parent, many.reference_model.parent)
    assert len(json.loads((many.raw / "manifest.json").read_text())["shards"]["train"]) > 2

    expected, got = generate_masks(params, one, device="cpu"), generate_masks(sharded, many, device="cpu")
    expected.pop("attribution_images_per_second"), got.pop("attribution_images_per_second")
    assert got == expected  # the search's every candidate and score, the reference's accuracies
    for split in ("train", "test"):
        a, b = load_released(one.release, split), load_released(many.release, split)
        for name in ("images", "labels", "masks"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert len(_checksums(many)) > 2 and verify_release(many.release, many.raw) == {
        **verify_release(one.release, one.raw),
        "release": str(many.release),
    }

    raw = load_split(many.raw, "train").images
    hidden = (load_released(many.release, "train").masks[:, None] == 0) & (raw > 0)
    i, c, y, x = (int(v) for v in np.argwhere(hidden[200:300])[0])

    def leak(arrays):
        arrays["images"][i, c, y, x] = raw[200 + i, c, y, x]

    _rewrite_shard(many, leak, k=2)
    with pytest.raises(DesensitizeError, match=rf"train image {200 + i}, channel {c}, pixel \(row {y}, col {x}\)"):
        verify_release(many.release, many.raw)
