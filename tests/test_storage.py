from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from desensitize.errors import DesensitizeError
from desensitize.storage import (
    Shards,
    atomic_dir,
    atomic_path,
    read_arrays,
    rechunk,
    sha256_file,
    write_arrays,
    write_shard_stream,
    write_shards,
)


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


def test_shards_are_read_one_at_a_time_and_an_altered_or_missing_shard_is_refused(tmp_path: Path):
    images = np.random.default_rng(0).integers(0, 256, (7, 1, 4, 4), dtype=np.uint8)
    labels = np.arange(7, dtype=np.int64)
    entries = write_shards(tmp_path, "train", 3, images=images, labels=labels)
    assert [e["images"] for e in entries] == [3, 3, 1]
    shards = Shards(tmp_path, tuple(entries), hint="run the ingest stage again")
    assert len(shards) == 7 and shards.sizes == [3, 3, 1]
    pieces = list(shards)
    assert [len(p["labels"]) for p in pieces] == [3, 3, 1]
    np.testing.assert_array_equal(shards.read_all()["images"], images)
    np.testing.assert_array_equal(shards.read(1)["labels"], [3, 4, 5])

    data = bytearray((tmp_path / "train-001.npz").read_bytes())
    data[-1] ^= 1
    (tmp_path / "train-001.npz").write_bytes(bytes(data))
    walk = iter(shards)
    next(walk)  # shard 0 is intact and read before shard 1 is looked at
    with pytest.raises(DesensitizeError, match=r"train-001.npz: checksum differs .*; run the ingest stage again"):
        next(walk)
    (tmp_path / "train-002.npz").unlink()
    with pytest.raises(DesensitizeError, match=r"train-002.npz: shard is missing; run the ingest stage again"):
        shards.read(2)


def test_shards_written_from_pieces_of_any_size_are_the_shards_of_the_whole(tmp_path: Path):
    images = np.random.default_rng(1).integers(0, 256, (10, 1, 4, 4), dtype=np.uint8)
    labels = np.arange(10, dtype=np.int64)
    whole = write_shards(tmp_path / "whole", "train", 4, images=images, labels=labels)
    cuts = [0, 1, 2, 7, 7, 10]  # pieces of 1, 1, 5, 0 and 3 rows
    pieces = [{"images": images[a:b], "labels": labels[a:b]} for a, b in zip(cuts, cuts[1:], strict=False)]
    assert write_shard_stream(tmp_path / "pieces", "train", 4, pieces) == whole
    assert [len(p["labels"]) for p in rechunk(pieces, [2, 5])] == [2, 5]  # sizes run out: the rest is dropped
