from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from conftest import make_params, write_idx
from desensitize.cli import app
from desensitize.data.sources import load_source, read_idx
from desensitize.errors import DesensitizeError


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


def _one_image_folder(root: Path, image: Image.Image, name: str = "x.png") -> Path:
    """Two classes, `a` holding `image` and `b` a black 8x8 greyscale image."""
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
    image.save(root / "a" / name)
    Image.new("L", (8, 8)).save(root / "b" / "x.png")
    return root


def _load_one(root: Path, channels: int = 1) -> np.ndarray:
    """The `a` image of `_one_image_folder`, as ingest reads it: (8, 8) or (3, 8, 8)."""
    source = load_source(make_params(source="imagefolder", path=str(root), image_size=8, channels=channels).data)
    image = source.images[source.labels.tolist().index(0)]
    return image[0] if channels == 1 else image


GRADIENT = np.arange(64, dtype=np.int64).reshape(8, 8) * 1000  # 0..63000: 16-bit values


def test_imagefolder_scales_16_bit_greyscale_by_its_range(tmp_path: Path):
    image = Image.fromarray(GRADIENT.astype(np.uint16))
    assert image.mode == "I;16"
    pixels = _load_one(_one_image_folder(tmp_path, image))
    np.testing.assert_array_equal(pixels, np.rint(GRADIENT / 257).astype(np.uint8))  # not clipped to white
    rgb = _load_one(tmp_path, channels=3)
    np.testing.assert_array_equal(rgb, np.broadcast_to(pixels, (3, 8, 8)))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (GRADIENT.astype(np.int32) // 1000 * 4, GRADIENT // 1000 * 4),  # I, 0..252: already 8-bit levels
        (GRADIENT.astype(np.int32), np.rint(GRADIENT / 257)),  # I, 0..63000: 16-bit levels
        (GRADIENT.astype(np.float32) / 63000, np.rint(GRADIENT / 63000 * 255)),  # F, fractions of 0..1
        (GRADIENT.astype(np.float32) // 1000, GRADIENT // 1000),  # F, whole numbers 0..63
    ],
    ids=["I-8bit", "I-16bit", "F-fraction", "F-integral"],
)
def test_imagefolder_reads_32_bit_and_float_images_by_their_values(tmp_path: Path, values, expected):
    image = Image.fromarray(values)
    assert image.mode in ("I", "F")
    pixels = _load_one(_one_image_folder(tmp_path, image, "x.tif"))
    np.testing.assert_array_equal(pixels, np.asarray(expected, dtype=np.uint8))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (GRADIENT.astype(np.int32) * 100, r"x.tif: 32-bit integer image with values 0..6.3e\+06"),
        (GRADIENT.astype(np.int32) - 5, "x.tif: 32-bit integer image with values -5..62995"),
        (GRADIENT.astype(np.float32) / 1000 + 0.5, r"x.tif: floating-point image with values 0.5..63.5"),
    ],
    ids=["I-beyond-16bit", "I-negative", "F-fractions-beyond-1"],
)
def test_imagefolder_refuses_a_range_it_cannot_map_to_8_bits(tmp_path: Path, values, message):
    with pytest.raises(DesensitizeError, match=message):
        _load_one(_one_image_folder(tmp_path, Image.fromarray(values), "x.tif"))


def _half_transparent(mode: str) -> Image.Image:
    """Grey 200 (red 200 in colour), opaque on the left half and fully transparent on the right."""
    colour = {"LA": (200, 255), "RGBA": (200, 0, 0, 255)}[mode]
    image = Image.new(mode, (8, 8), colour)
    alpha = Image.new("L", (8, 8), 255)
    alpha.paste(0, (4, 0, 8, 8))
    image.putalpha(alpha)
    return image


def _palette_transparent() -> Image.Image:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([255, 255, 255, 200, 0, 0] + [0, 0, 0] * 254)
    image.paste(0, (4, 0, 8, 8))  # index 0: white, declared transparent
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    "make",
    [lambda: _half_transparent("LA"), lambda: _half_transparent("RGBA"), _palette_transparent],
    ids=["LA", "RGBA", "P-transparency"],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_composites_transparent_pixels_onto_black(tmp_path: Path, make, channels: int):
    pixels = _load_one(_one_image_folder(tmp_path, make()), channels)
    if channels == 1:
        pixels = pixels[None]
    opaque = pixels[:, :, :4]
    assert (pixels[:, :, 4:] == 0).all()  # transparent: black, not the colour under the alpha
    assert opaque.max() > 0 and (opaque == opaque[:, :1, :1]).all()


@pytest.mark.parametrize(
    ("image", "grey", "rgb"),
    [
        (Image.new("1", (8, 8), 1), 255, (255, 255, 255)),
        (Image.new("L", (8, 8), 90), 90, (90, 90, 90)),
        (Image.new("RGB", (8, 8), (255, 0, 0)), 76, (255, 0, 0)),  # ITU-R 601-2 luma of red
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), 76, (255, 0, 0)),  # red in CMYK
    ],
    ids=["1-bit", "L", "RGB", "CMYK"],
)
def test_imagefolder_converts_opaque_modes_to_the_requested_channels(tmp_path: Path, image, grey, rgb):
    name = "x.tif" if image.mode == "CMYK" else "x.png"
    assert (_load_one(_one_image_folder(tmp_path, image, name)) == grey).all()
    np.testing.assert_array_equal(_load_one(tmp_path, channels=3)[:, 0, 0], rgb)


def test_imagefolder_skips_hidden_files_and_macos_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = _one_image_folder(tmp_path, Image.new("L", (8, 8), 90))
    (root / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (root / "b" / ".DS_Store").write_bytes(b"Bud1 not an image")
    (root / "a" / "__MACOSX").mkdir()
    (root / "a" / "__MACOSX" / "._y.png").write_bytes(b"\x00\x05\x16\x07")
    (root / "__MACOSX" / "a").mkdir(parents=True)  # not a class either
    with caplog.at_level("INFO", logger="desensitize.data.sources"):
        source = load_source(make_params(source="imagefolder", path=str(root), image_size=8).data)
    assert source.class_names == ("a", "b") and len(source.images) == 2
    assert "skipped 3 hidden files and __MACOSX entries" in caplog.text


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
