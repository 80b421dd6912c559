from __future__ import annotations

import numpy as np
import pytest

from desensitize.errors import DesensitizeError
from desensitize.masking.grid import (
    apply_mask,
    cell_scores,
    class_contrast,
    expand,
    fill_values,
    geometric_mask,
    grid_shape,
    hide_lowest,
    mask_from_maps,
    n_hidden_cells,
    random_masks,
    spread_ranks,
)
from desensitize.masking.templates import (
    TemplateStats,
    pooled_images,
    restorability,
    restorability_ranks,
    set_templates,
    template_mask,
)


def _hidden_cells(masks: np.ndarray, cell: int) -> np.ndarray:
    return (cell_scores(1 - masks.astype(float), cell) > 0).sum(axis=(-2, -1))


@pytest.mark.parametrize(("size", "cell"), [(28, 4), (28, 5), (28, 3), (32, 7), (8, 8), (9, 2)])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75, 0.9])
def test_exact_hidden_cell_count_for_any_grid(size: int, cell: int, ratio: float):
    gh, gw = grid_shape(size, size, cell)
    n_cells = gh * gw
    expected = int(np.floor(ratio * n_cells + 0.5))
    if not 0 < expected < n_cells:
        with pytest.raises(DesensitizeError, match="masks.hidden_ratio"):
            n_hidden_cells(n_cells, ratio)
        return
    maps = np.random.default_rng(0).random((5, size, size))
    masks = mask_from_maps(maps, cell, ratio)
    assert masks.shape == (5, size, size)
    assert _hidden_cells(masks, cell).tolist() == [expected] * 5
    # Whole cells only: every cell is entirely hidden or entirely visible.
    area = cell_scores(np.ones((size, size)), cell)
    assert set(np.unique(cell_scores(masks.astype(float), cell) / area)) <= {0.0, 1.0}
    random = random_masks(7, size, size, cell, ratio, seed=3)
    assert _hidden_cells(random, cell).tolist() == [expected] * 7
    for kind in ("center", "border"):
        assert _hidden_cells(geometric_mask(kind, size, size, cell, ratio), cell) == expected


def test_template_to_mask_by_hand():
    # 6x6 image, 3x3 cells -> 2x2 grid; attribution mass per cell: TL 4, TR 1, BL 3, BR 2.
    template = np.zeros((6, 6))
    template[0, 0], template[0, 5], template[5, 0], template[5, 5] = 4, 1, 3, 2
    np.testing.assert_array_equal(cell_scores(template, 3), [[4, 1], [3, 2]])
    mask = mask_from_maps(template, 3, 0.5)
    expected = np.zeros((6, 6), dtype=np.uint8)
    expected[:3, :3] = 1  # keep TL (4) and BL (3)
    expected[3:, :3] = 1
    np.testing.assert_array_equal(mask, expected)


def test_class_contrast_keeps_where_classes_differ_not_where_they_all_look():
    # 4x4 image, 2x2 cells. Class 0 looks at the top-left cell, class 1 at the bottom-right one, and
    # both as much at the top-right cell (the shared "centre"). Unequal class sizes must not matter.
    maps = np.zeros((5, 4, 4))
    maps[:, 0, 2] = 0.5  # top-right, every image
    maps[:2, 0, 0] = 0.5  # class 0 (2 images): top-left
    maps[2:, 3, 3] = 0.5  # class 1 (3 images): bottom-right
    labels = np.array([0, 0, 1, 1, 1])
    stats = TemplateStats()  # the set template statistics, as the masks stage gathers them shard by shard
    stats.add(maps[:3], np.zeros((3, 1, 4, 4), np.uint8), labels[:3])
    stats.add(maps[3:], np.zeros((2, 1, 4, 4), np.uint8), labels[3:])
    np.testing.assert_allclose(stats.mean(), maps.mean(axis=0))
    contrast = class_contrast(stats.class_means())
    np.testing.assert_allclose(cell_scores(contrast, 2), [[0.25, 0], [0, 0.25]])
    np.testing.assert_array_equal(hide_lowest(cell_scores(contrast, 2), 2), [[1, 0], [0, 1]])
    np.testing.assert_array_equal(hide_lowest(cell_scores(maps.mean(axis=0), 2), 3), [[0, 1], [0, 0]])


def test_spread_keeps_the_best_cells_apart_before_filling_in():
    # 3x4 grid: a hot 2x2 block at the top left, a warm cell at the right, a cool one bottom left.
    scores = np.array([[9.0, 8, 0, 1], [7, 6, 0, 5], [2, 0, 0, 0]])
    ranks = spread_ranks(scores)
    # Best first, skipping cells next to a kept one (diagonals count): 9, then 5 (8, 7 and 6 touch
    # the 9), then 2 (it touches 7 and 6, which were skipped); every other cell touches one of the
    # three. After them the skipped cells in score order: 8 first.
    np.testing.assert_array_equal(hide_lowest(ranks, 12 - 4), [[1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
    # ... then 7, 6 and 1.
    np.testing.assert_array_equal(hide_lowest(ranks, 12 - 7), [[1, 1, 0, 1], [1, 1, 0, 1], [1, 0, 0, 0]])
    assert sorted(ranks.ravel()) == list(range(1, 13))  # a strict order of all cells
    # Without spread the hot block is kept whole; with it the same number of cells is hidden.
    maps = np.repeat(np.repeat(scores, 2, axis=0), 2, axis=1)  # 2-pixel cells
    plain, spread = mask_from_maps(maps, 2, 2 / 3), mask_from_maps(maps, 2, 2 / 3, spread=True)
    assert plain.sum() == spread.sum() == 4 * 4  # 4 cells of 4 pixels visible
    assert plain[:4, :4].all() and not spread[:4, :4].all()


def test_partial_edge_cells_and_ties():
    # 5x5 with cell 2 -> 3x3 grid whose last row/column is 1 pixel thick.
    np.testing.assert_array_equal(cell_scores(np.ones((5, 5)), 2), [[4, 4, 2], [4, 4, 2], [2, 2, 1]])
    # All scores tied: the lowest indices are hidden first, deterministically.
    np.testing.assert_array_equal(hide_lowest(np.zeros((2, 2)), 2), [[0, 0], [1, 1]])
    np.testing.assert_array_equal(
        expand(np.array([[1, 0], [0, 1]], dtype=np.uint8), 3, 3, 2), [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    )


def test_random_masks_are_seeded_and_vary_per_image():
    a = random_masks(20, 28, 28, 4, 0.5, seed=1)
    np.testing.assert_array_equal(a, random_masks(20, 28, 28, 4, 0.5, seed=1))
    assert not np.array_equal(a, random_masks(20, 28, 28, 4, 0.5, seed=2))
    assert not np.array_equal(a, random_masks(20, 28, 28, 4, 0.5, seed=1, stream=1))
    assert len({m.tobytes() for m in a}) == 20
    single = random_masks(None, 28, 28, 4, 0.5, seed=1)
    assert single.shape == (28, 28)


def test_center_hides_the_middle_and_border_the_rim():
    center = geometric_mask("center", 8, 8, 2, 0.25)  # 4 of 16 cells
    expected = np.ones((8, 8), dtype=np.uint8)
    expected[2:6, 2:6] = 0
    np.testing.assert_array_equal(center, expected)
    border = geometric_mask("border", 8, 8, 2, 0.75)  # the 12 rim cells
    np.testing.assert_array_equal(border, 1 - expected)


def test_apply_mask_keeps_visible_pixels_and_fills_the_rest():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 6, 6), dtype=np.uint8)
    mask = mask_from_maps(rng.random((6, 6)), 3, 0.5)
    hidden = mask == 0
    for kind, mean in (("zero", None), ("mean", np.array([10, 20, 30]))):
        fill = fill_values(kind, images.shape, mean, seed=0, stream=0)
        out = apply_mask(images, mask, fill)
        np.testing.assert_array_equal(out[:, :, ~hidden], images[:, :, ~hidden])
        expected = 0 if kind == "zero" else mean[None, :, None]
        assert (out[:, :, hidden] == expected).all()
    # Noise is fresh per image and per pixel, seeded, and does not depend on the image content.
    noise = fill_values("noise", images.shape, None, seed=5, stream=0)
    np.testing.assert_array_equal(noise, fill_values("noise", images.shape, None, seed=5, stream=0))
    assert not np.array_equal(noise, fill_values("noise", images.shape, None, seed=5, stream=1))
    out = apply_mask(images, np.stack([mask] * 4), noise)
    np.testing.assert_array_equal(out[:, :, hidden], noise[:, :, hidden])
    assert len(np.unique(out[:, :, hidden])) > 100


def test_set_templates_do_not_depend_on_how_the_train_split_is_sharded():
    rng = np.random.default_rng(0)
    maps = rng.random((60, 8, 8)).astype(np.float32)
    maps /= maps.sum(axis=(1, 2), keepdims=True)
    images = rng.integers(0, 256, (60, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 3, 60)
    whole, parts = TemplateStats([2, 4]), TemplateStats([2, 4])
    whole.add(maps, images, labels)
    for a, b in ((0, 7), (7, 31), (31, 60)):
        parts.add(maps[a:b], images[a:b], labels[a:b])

    names = ["mean", "class_contrast", "mean_spread", "restorability"]
    for cell, keep in ((2, 6), (4, 2)):
        x = pooled_images(images, cell)  # the covariance as it was computed on the whole split
        for c in range(3):
            x[labels == c] -= x[labels == c].mean(axis=0)
        np.testing.assert_allclose(parts.within_class_covariance(cell), x.T @ x / 60, rtol=1e-10, atol=1e-15)
        one, many = set_templates(whole, names, cell, keep), set_templates(parts, names, cell, keep)
        assert list(one) == names and [one[name][:2] for name in names] == [
            ("mean", None),
            ("class_contrast", None),
            ("mean_spread", None),
            ("restorability", 1.0),
        ]
        for name in names:
            np.testing.assert_allclose(many[name][2], one[name][2], rtol=1e-12)
            np.testing.assert_array_equal(
                template_mask(name, many[name][2], cell, 0.5, (8, 8)),
                template_mask(name, one[name][2], cell, 0.5, (8, 8)),
            )
    np.testing.assert_allclose(parts.mean(), maps.mean(axis=0), rtol=1e-6)
    means = np.stack([maps[labels == c].mean(axis=0) for c in range(3)])
    np.testing.assert_allclose(
        set_templates(parts, ["class_contrast"], 2, 6)["class_contrast"][2], means.std(axis=0), rtol=1e-5
    )
    weighted = set_templates(parts, ["restorability"], 2, 6, [1.0, 0.25])
    assert list(weighted) == ["restorability", "restorability w0.25"]
    assert [v[:2] for v in weighted.values()] == [("restorability", 1.0), ("restorability", 0.25)]


def test_the_restorability_weight_trades_what_the_rest_gives_away_for_class_evidence():
    # 2x2 cells of one pooled value each: cells 0 and 1 are the same pixel (each predicts the other),
    # cells 2 and 3 independent noise; cell 0 carries the most class evidence.
    cov = np.array([[1.0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    evidence = np.array([[0.4, 0.3], [0.15, 0.15]])
    assert restorability(cov, np.array([[1, 0], [0, 0]])) == pytest.approx(1 / 3, rel=1e-2)  # cell 1 of 3 hidden

    def kept(weight: float, keep: int) -> set[int]:
        ranks = restorability_ranks(evidence, cov, keep, weight).ravel()
        return set(np.argsort(-ranks, kind="stable")[:keep].tolist())

    assert kept(1.0, 1) == {2}  # 0.4 - 1/3 < 0.15 - 0: the cell that gives nothing of the rest away
    assert kept(1.0, 2) == {2, 3}
    assert kept(0.25, 1) == {0}  # 0.4 - 1/12 > 0.15: evidence weighs more
    assert kept(0.0, 2) == {0, 1}  # evidence alone
