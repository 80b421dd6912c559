from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from desensitize.storage import atomic_dir, atomic_path, read_arrays, sha256_file, write_arrays


def test_shards_are_byte_identical_across_writes_and_load_with_numpy(tmp_path: Path):
    images = np.random.default_rng(0).integers(0, 256, (5, 1, 4, 4), dtype=np.uint8)
    labels = np.arange(5, dtype=np.int64)
    write_arrays(tmp_path / "a.npz", images=images, labels=labels)
    time.sleep(2.1)  # zip timestamps have 2 s resolution: a time-stamped writer would differ now
    write_arrays(tmp_path / "b.npz", labels=labels, images=images)
    assert sha256_file(tmp_path / "a.npz") == sha256_file(tmp_path / "b.npz")
    with np.load(tmp_path / "a.npz") as loaded:
        np.testing.assert_array_equal(loaded["images"], images)
    np.testing.assert_array_equal(read_arrays(tmp_path / "b.npz")["labels"], labels)


def test_atomic_path_leaves_target_untouched_on_failure(tmp_path: Path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_dir_replaces_whole_directory_only_on_success(tmp_path: Path):
    target = tmp_path / "raw"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
