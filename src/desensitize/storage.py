"""Atomic, deterministic writes of artifacts, the array shard format, and locks on a shared store.

Every artifact is built under a temporary name next to its target and renamed into place only
when complete, so a killed stage leaves nothing that a later stage (or DVC) would trust.
Shards are zip files of `.npy` members with fixed timestamps: the same arrays always give the
same bytes, hence the same sha256 and the same DVC hash.

A store that several processes use (the MLflow tracking store) is guarded, where one step must not
run in two of them at once, by an exclusive file lock (`store_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from desensitize.errors import DesensitizeError

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(uri: str, purpose: str) -> Iterator[None]:
    """Hold an exclusive lock for `purpose` on the store at `uri`, between the processes of this host:
    the file `<sqlite file>.<purpose>.lock` next to a SQLite store, else one in the temp directory
    named by the URI (so the clients of a tracking server on other hosts are not serialised)."""
    db = sqlite_file(uri)
    name = f"{purpose}.lock".replace("/", "_")
    if db is None:
        path = Path(tempfile.gettempdir()) / f"desensitize-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.{name}"
    else:
        path = db.with_name(f"{db.name}.{name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or its process dies
        yield


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` on success only."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; the artifact should get the usual mode
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; it replaces `target` on success only."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DesensitizeError(f"{path}: not found (run the stage that makes it first)") from None
    except json.JSONDecodeError as exc:
        raise DesensitizeError(f"{path}: not valid JSON ({exc})") from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts (metrics, params) as {dotted key: leaf}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def read_versioned_json(path: Path, version: int) -> Any:
    """Read a JSON record and refuse one written in another `format` version."""
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != version:
        found = record.get("format") if isinstance(record, dict) else None
        raise DesensitizeError(f"{path}: format {found!r}, expected {version}")
    return record


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Write arrays as an `.npz`-compatible zip whose bytes depend on the arrays only."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for name in sorted(arrays):
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, buffer.getvalue(), compresslevel=6)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        raise DesensitizeError(f"{path}: shard not found") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DesensitizeError(f"{path}: unreadable shard ({exc})") from None


def rechunk(pieces: Iterable[dict[str, np.ndarray]], sizes: Iterable[int]) -> Iterator[dict[str, np.ndarray]]:
    """The rows of aligned array pieces (same names, same first dimension within a piece), cut again into
    pieces of `sizes` rows; the last is short when the rows run out first. Holds at most one output
    piece plus one input piece."""
    sizes, held = iter(sizes), None
    size = next(sizes, None)
    for piece in pieces:
        held = piece if held is None else {name: np.concatenate([held[name], piece[name]]) for name in piece}
        while size is not None and len(next(iter(held.values()))) >= size:
            yield {name: array[:size] for name, array in held.items()}
            held = {name: array[size:] for name, array in held.items()}
            size = next(sizes, None)
    if held is not None and size is not None and len(next(iter(held.values()))):
        yield held


def write_shard_stream(
    directory: Path, prefix: str, shard_size: int, pieces: Iterable[dict[str, np.ndarray]]
) -> list[dict[str, Any]]:
    """Write aligned array pieces, in any sizes, as `<prefix>-000.npz`, ... of `shard_size` rows each (the
    last may be short), holding about one shard at a time; returns the shard entries. The bytes depend
    only on the rows and the shard size, not on how the pieces were cut."""
    entries = []
    for k, arrays in enumerate(rechunk(pieces, itertools.repeat(shard_size))):
        file = f"{prefix}-{k:03d}.npz"
        write_arrays(Path(directory) / file, **arrays)
        count = len(next(iter(arrays.values())))
        entries.append({"file": file, "images": count, "sha256": sha256_file(Path(directory) / file)})
    return entries


def write_shards(directory: Path, prefix: str, shard_size: int, **arrays: np.ndarray) -> list[dict[str, Any]]:
    """Write aligned arrays (same first dimension) as `<prefix>-000.npz`, ...; returns the shard entries."""
    return write_shard_stream(directory, prefix, shard_size, [arrays])


class ShardSource(Protocol):
    """Aligned arrays (same first dimension) in shards that can be read one at a time, in any order."""

    @property
    def sizes(self) -> list[int]: ...

    def read(self, k: int) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class InMemory:
    """Arrays already in memory, as a source of one shard."""

    arrays: dict[str, np.ndarray]

    @property
    def sizes(self) -> list[int]:
        return [len(next(iter(self.arrays.values())))]

    def read(self, k: int) -> dict[str, np.ndarray]:
        return self.arrays


@dataclass(frozen=True)
class Shards:
    """A split written by `write_shards`, read one shard at a time: whoever walks it holds one shard,
    so peak memory depends on the shard size, not on how many images the split has. Every shard is
    checked against its recorded sha256 when it is read; `hint` says what to do about one that differs."""

    directory: Path
    entries: tuple[dict[str, Any], ...]
    hint: str

    @property
    def sizes(self) -> list[int]:
        return [int(entry["images"]) for entry in self.entries]

    def __len__(self) -> int:
        return sum(self.sizes)

    def read(self, k: int) -> dict[str, np.ndarray]:
        """Shard k's arrays, refusing a missing shard or one whose sha256 differs from its entry."""
        path = Path(self.directory) / self.entries[k]["file"]
        if not path.is_file():
            raise DesensitizeError(f"{path}: shard is missing; {self.hint}")
        if sha256_file(path) != self.entries[k]["sha256"]:
            raise DesensitizeError(f"{path}: checksum differs from the recorded sha256; {self.hint}")
        return read_arrays(path)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return (self.read(k) for k in range(len(self.entries)))

    def read_all(self) -> dict[str, np.ndarray]:
        """Every shard concatenated: for the readers whose data is small (or that need it whole)."""
        parts: dict[str, list[np.ndarray]] = {}
        for arrays in self:
            for name, array in arrays.items():
                parts.setdefault(name, []).append(array)
        return {name: np.concatenate(arrays) for name, arrays in parts.items()}
