from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from conftest import make_params
from desensitize.data.sources import Source, drop_duplicates, image_digests
from desensitize.data.splits import _allocate, load_split, split_indices
from desensitize.errors import DesensitizeError
from desensitize.paths import SPLITS, Paths
from desensitize.stages.ingest import ingest


def _shard_hashes(raw: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(raw.iterdir())}


def test_mnist5k_splits_are_disjoint_stratified_and_reproducible(tmp_path: Path):
    params = make_params(source="mnist5k")
    first, second = Paths(tmp_path / "a"), Paths(tmp_path / "b")
    manifest = ingest(params, first)
    ingest(params, second)

    # Same params -> byte-identical shards and manifest.
    assert _shard_hashes(first.raw) == _shard_hashes(second.raw)

    splits = {name: load_split(first.raw, name) for name in SPLITS}
    assert [len(splits[n].images) for n in SPLITS] == [3000, 1000, 1000]
    for name in SPLITS:
        assert np.bincount(splits[name].labels).tolist() == [len(splits[name].images) // 10] * 10
        assert manifest["counts"][name]["7"] == len(splits[name].images) // 10
    # No image content is shared between splits.
    digests = {name: set(image_digests(splits[name].images)) for name in SPLITS}
    assert not digests["train"] & digests["test"]
    assert not digests["train"] & digests["public"]
    assert not digests["test"] & digests["public"]
    assert sum(len(d) for d in digests.values()) == 5000


def test_another_seed_gives_another_split(tmp_path: Path):
    labels = np.repeat(np.arange(4), 25)
    a = split_indices(labels, make_params().data.split, seed=0)
    b = split_indices(labels, make_params().data.split, seed=1)
    assert set(a["train"].tolist()) != set(b["train"].tolist())
    np.testing.assert_array_equal(a["test"], split_indices(labels, make_params().data.split, seed=0)["test"])


def test_duplicates_are_dropped_before_splitting(tmp_path: Path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    images[20:] = images[:20]  # every image twice
    source, dropped = drop_duplicates(Source(images, np.arange(40) % 2, ("a", "b")))
    assert dropped == 20 and len(source.images) == 20
    assert len(set(image_digests(source.images))) == 20


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 333])
def test_allocation_never_overdraws(n: int):
    counts = _allocate(n, (0.6, 0.2, 0.2))
    assert sum(counts) == n and min(counts) >= 0
    assert sum(_allocate(n, (0.3, 0.1, 0.1))) == round(0.5 * n)


def test_subset_fractions_take_a_subset(tmp_path: Path):
    params = make_params(source="digits", split={"train": 0.3, "test": 0.1, "public": 0.1})
    manifest = ingest(params, Paths(tmp_path))
    total = sum(sum(c.values()) for c in manifest["counts"].values())
    assert abs(total - 0.5 * 1797) <= 10


def test_a_tampered_shard_is_refused(tmp_path: Path):
    paths = Paths(tmp_path)
    ingest(make_params(source="digits"), paths)
    shard = paths.raw / "test-000.npz"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DesensitizeError, match="test-000.npz: checksum differs from the recorded sha256"):
        load_split(paths.raw, "test")
    load_split(paths.raw, "train")  # the untouched shards still load
