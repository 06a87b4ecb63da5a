"""Finding, verifying and caching the dataset files.

Nothing is downloaded: datasets are read from a data root (``data.root`` in the config, else the
``FEDMETA_DATA`` environment variable, else ``../shared/data`` next to the working directory or the
checkout). Every file is checked against the SHA-256 listed in ``SHA256SUMS`` beside this module, so
a truncated copy fails loudly, naming the file and the checksum it should have.

Decoding (JPEG, LANCZOS resizing) is slow, so decoded arrays are cached, keyed by
the checksums of their inputs and the processing parameters (``FEDMETA_CACHE``, default
``~/.cache/fedmeta``), as safetensors with a content hash (``fedmeta.storage``): nothing cached is
unpickled, and a corrupt entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from fedmeta.storage import cached, read_arrays, write_arrays

_MANIFEST = Path(__file__).with_name("SHA256SUMS")
_CHUNK = 1 << 22


class DataError(RuntimeError):
    """A dataset file is missing, unreadable or not what it should be."""


@cache
def expected_checksums() -> dict[str, str]:
    """Relative path -> expected SHA-256, for every file fedmeta reads."""
    table = {}
    for line in _MANIFEST.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        table[name.strip()] = digest
    return table


def default_root() -> Path | None:
    """The data root used when none is configured (see module docstring)."""
    env = os.environ.get("FEDMETA_DATA")
    if env:
        return Path(env)
    for base in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def resolve_root(root: str | None) -> Path:
    """The configured data root, or the default one; raises ``DataError`` if there is none."""
    path = Path(root).expanduser() if root else default_root()
    if path is None or not path.is_dir():
        where = f"'{path}'" if path else "no data root"
        raise DataError(
            f"{where}: dataset folder not found. Set data.root (--set data.root=DIR) or the "
            "FEDMETA_DATA environment variable to the folder that holds omniglot/, mini-imagenet/, "
            "mnist/ and fashion-mnist/."
        )
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verified(root: Path, name: str) -> Path:
    """``root/name`` after checking that it exists and has its expected SHA-256."""
    path = root / name
    expected = expected_checksums().get(name)
    if not path.is_file():
        raise DataError(f"missing dataset file {path} (expected sha256 {expected})")
    if expected is not None:
        actual = sha256_of(path)
        if actual != expected:
            raise DataError(
                f"corrupt dataset file {path}: sha256 is {actual}, expected {expected}"
            )
    return path


def cache_dir() -> Path:
    """The cache folder (``FEDMETA_CACHE``, default ``~/.cache/fedmeta``), created if need be."""
    path = Path(os.environ.get("FEDMETA_CACHE", Path.home() / ".cache" / "fedmeta"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot use the cache folder {path} (FEDMETA_CACHE): {err.strerror or err}") from None
    return path


def cached_array(key_parts: list[str], build: Callable[[], np.ndarray], name: str) -> np.ndarray:
    """Load the array cached under a key made of ``key_parts``, or build and cache it.

    The key must cover every input that determines the array (file checksums, sizes, options):
    a change in any of them builds a new cache entry instead of silently reusing a stale one. The
    entry carries a content hash: a corrupt one is rebuilt; runs sharing the cache decode once.
    """
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{key}.safetensors"

    def build_and_write() -> np.ndarray:
        array = build()
        write_arrays(path, {"array": array})
        return array

    return cached(path, f"{name} cache {path.name}", lambda p: read_arrays(p)["array"], build_and_write)
