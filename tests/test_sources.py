from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import make_params, write_idx
from desensitize.cli import app
from desensitize.errors import DesensitizeError
from desensitize.sources import load_source, read_idx


def test_mnist5k_ships_with_the_install():
    source = load_source(make_params(source="mnist5k").data)
    assert source.images.shape == (5000, 1, 28, 28)
    assert np.bincount(source.labels).tolist() == [500] * 10
    assert source.images.max() == 255 and source.images.min() == 0


def test_digits_are_stretched_to_uint8():
    source = load_source(make_params(source="digits").data)
    assert source.images.shape == (1797, 1, 8, 8)
    assert source.images.max() == 255
    assert len(source.class_names) == 10


def test_fashion_mnist_reads_idx_files(fashion_dir: Path):
    source = load_source(make_params(source="fashion-mnist", path=str(fashion_dir)).data)
    assert source.images.shape == (80, 1, 28, 28)
    expected = read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(source.images[60:, 0], expected)
    assert source.class_names[9] == "Ankle boot"


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(DesensitizeError, match="apt-get install dataset-fashion-mnist"):
        load_source(make_params(source="fashion-mnist", path=str(tmp_path)).data)


def test_imagefolder_resizes_and_labels_by_folder(tmp_path: Path):
    for k, (cls, size) in enumerate((("cat", (40, 30)), ("dog", (12, 12)), ("emu", (64, 64)))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", size, color=(k * 80, i * 50, 10)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image, ignored")
    source = load_source(make_params(source="imagefolder", path=str(tmp_path), image_size=16, channels=3).data)
    assert source.images.shape == (9, 3, 16, 16)
    assert source.class_names == ("cat", "dog", "emu")
    assert source.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert source.images[3, 0].max() == 80  # dog images are filled with red = 80


def test_cifar10_never_downloads(tmp_path: Path):
    with pytest.raises(DesensitizeError, match="CIFAR-10 not found"):
        load_source(make_params(source="cifar10", path=str(tmp_path)).data)


def _bad_fashion(tmp_path: Path, fashion_dir: Path) -> dict:
    images = fashion_dir / "train-images-idx3-ubyte.gz"
    plain = fashion_dir / "train-images-idx3-ubyte"
    write_idx(plain, read_idx(images))
    images.unlink()
    plain.write_bytes(plain.read_bytes()[:-100])  # truncated download
    return {"source": "fashion-mnist", "path": str(fashion_dir)}


def _unreadable_image(tmp_path: Path, fashion_dir: Path) -> dict:
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "imgs" / cls / "ok.png")
    (tmp_path / "imgs" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return {"source": "imagefolder", "path": str(tmp_path / "imgs")}


def _single_class(tmp_path: Path, fashion_dir: Path) -> dict:
    (tmp_path / "imgs" / "only").mkdir(parents=True)
    Image.new("L", (8, 8)).save(tmp_path / "imgs" / "only" / "x.png")
    return {"source": "imagefolder", "path": str(tmp_path / "imgs")}


def _unknown_source(tmp_path: Path, fashion_dir: Path) -> dict:
    return {"source": "imagenet"}


def _bad_fraction(tmp_path: Path, fashion_dir: Path) -> dict:
    return {"source": "digits", "split": {"train": 0.6, "test": 0.2, "public": -0.2}}


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (_bad_fashion, "train-images-idx3-ubyte: truncated or padded IDX file"),
        (_unreadable_image, "broken.jpg: unreadable image"),
        (_single_class, "found 1 class folder(s)"),
        (_unknown_source, "data.source = 'imagenet'"),
        (_bad_fraction, "data.split.public = -0.2"),
    ],
    ids=["truncated-idx", "unreadable-image", "single-class", "unknown-source", "bad-fraction"],
)
def test_bad_input_gives_one_error_line_and_keeps_previous_output(
    tmp_path: Path, fashion_dir: Path, monkeypatch: pytest.MonkeyPatch, make_bad, message
):
    project = tmp_path / "project"
    (project / "data" / "raw").mkdir(parents=True)
    (project / "data" / "raw" / "manifest.json").write_text("previous good output")
    (project / "params.yaml").write_text(yaml.safe_dump({"data": make_bad(tmp_path, fashion_dir)}))
    monkeypatch.chdir(project)

    result = CliRunner().invoke(app, ["ingest"])

    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]
    # Nothing half-written: the previous output is intact and no temporary files remain.
    assert sorted(p.name for p in (project / "data").iterdir()) == ["raw"]
    assert [p.name for p in (project / "data" / "raw").iterdir()] == ["manifest.json"]
    assert (project / "data" / "raw" / "manifest.json").read_text() == "previous good output"
