"""The files fedmeta writes: atomic, with a content hash checked on every read, and locks.

Every tensor or array file (checkpoints, weights, caches of decoded datasets, pre-training and
attack rounds) is safetensors with JSON metadata, one of which is ``sha256``: a digest of every
tensor's name, dtype, shape and bytes, computed before writing and checked after reading, so a
truncated, corrupt or altered file is told apart from a good one (``CorruptFile`` names it).
Nothing is unpickled. Writes go to a unique temporary file in the same folder, are ``fsync``-ed,
then renamed over the target: a kill leaves the old file or the new one, never half of one.

Locks are ``flock`` locks on a file that names its holder (pid, host, command): the kernel
releases them when the holder dies, even by ``kill -9``, so a stale lock cannot outlive a crash.
(``fcntl`` is POSIX; fedmeta's Flower deployment is POSIX-only too.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

T = TypeVar("T")

DIGEST = "sha256"
META_DIGEST = "meta-sha256"
"""SHA-256 of the JSON metadata (checkpoint progress, a cached round's user ids): files written
before it existed carry none and are read as before."""


class CorruptFile(RuntimeError):
    """A file fedmeta wrote earlier cannot be read back as written."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


class Locked(RuntimeError):
    """Another process holds a lock; the message names it."""


# --- hashes -------------------------------------------------------------------------------------


def _bytes(value: Tensor | np.ndarray) -> memoryview:
    if isinstance(value, Tensor):  # as uint8, so bfloat16 and friends hash too (no copy when contiguous on CPU)
        value = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return memoryview(np.ascontiguousarray(value)).cast("B")


def content_digest(tensors: Mapping[str, Tensor | np.ndarray]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name]
        digest.update(json.dumps([name, str(value.dtype), list(value.shape)]).encode())
        digest.update(_bytes(value))
    return digest.hexdigest()


# --- writing and reading ------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` all at once (unique temporary file, fsync, rename)."""
    _atomically(path, lambda tmp: tmp.write_bytes(data))


def _atomically(path: Path, write: Callable[[Path], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_tensors(path: Path, tensors: Mapping[str, Tensor], meta: dict[str, Any] | None = None) -> None:
    """Atomically write ``tensors`` with JSON-able ``meta`` and their content digest."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {k: json.dumps(v) for k, v in (meta or {}).items()}
    # as a JSON string like the other entries, so that a fedmeta from before it reads the file too
    header |= {DIGEST: content_digest(cpu), META_DIGEST: json.dumps(_meta_digest(header))}
    _atomically(path, lambda tmp: save_file(cpu, tmp, metadata=header))


def read_tensors(path: Path, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and JSON metadata ``write_tensors`` wrote, checked against their digest."""
    tensors, header = _read(path, lambda p: load_file(str(p)))
    return {k: v.to(device) for k, v in tensors.items()}, header


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``write_tensors`` for NumPy arrays (the decoded-dataset caches)."""
    header = {DIGEST: content_digest(arrays)}
    _atomically(path, lambda tmp: save_arrays(dict(arrays), str(tmp), metadata=header))


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    return _read(path, _load_arrays)[0]


NUMPY_DTYPES = {"U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16, "I32": np.int32, "I64": np.int64,
                "F16": np.float16, "F32": np.float32, "F64": np.float64, "BOOL": np.bool_}


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """safetensors' own NumPy loader copies out of a memory map, so a 1.27 GB dataset peaks at
    twice that; reading each array straight into its own buffer keeps the peak at one copy."""
    arrays = {}
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        start = 8 + length
        for name, info in header.items():
            if name == "__metadata__":
                continue
            array = np.empty(info["shape"], dtype=NUMPY_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            f.seek(start + begin)
            if f.readinto(memoryview(array).cast("B")) != end - begin or array.nbytes != end - begin:
                raise ValueError(f"array {name} is cut short")
            arrays[name] = array
    return arrays


def _read(path: Path, load: Callable[[Path], dict]) -> tuple[dict, dict[str, Any]]:
    try:
        with safe_open(str(path), "np") as f:
            raw = dict(f.metadata() or {})
        values = load(path)
        header = {k: json.loads(v) for k, v in raw.items() if k not in (DIGEST, META_DIGEST)}
    except (SafetensorError, OSError, ValueError, KeyError, struct.error) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CorruptFile(path, f"unreadable ({err}); file sha256 {_file_digest(path)}") from None
    expected = raw.get(DIGEST)
    if expected is None:
        raise CorruptFile(path, f"carries no {DIGEST} (written by an older fedmeta, or not by fedmeta)")
    actual = content_digest(values)
    if actual != expected:
        raise CorruptFile(path, f"content {DIGEST} is {actual}, written as {expected}")
    meta = {k: v for k, v in raw.items() if k not in (DIGEST, META_DIGEST)}
    if META_DIGEST in raw and (found := _meta_digest(meta)) != (written := json.loads(raw[META_DIGEST])):
        raise CorruptFile(path, f"metadata {DIGEST} is {found}, written as {written}")
    return values, header


def _meta_digest(header: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(dict(header), sort_keys=True).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        return f"not readable ({err.strerror or err})"


# --- locks --------------------------------------------------------------------------------------


def holder() -> str:
    """Who this process is, as a lock file records it."""
    command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    return f"pid {os.getpid()} on {socket.gethostname()} ({command})"


@contextlib.contextmanager
def lock(path: Path, what: str, wait: float = 0.0, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block.

    ``wait = 0``: fail at once with ``Locked`` ("``what`` is in use by ..."); else wait up to
    ``wait`` seconds, calling ``waiting(holder)`` once when the wait starts."""
    fd = acquire(path, what, wait, waiting)
    try:
        yield
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def acquire(path: Path, what: str, wait: float = 0.0, waiting: Callable[[str], None] | None = None) -> int:
    """``lock`` without the block: the locked file descriptor (closing it releases the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _wait_for(fd, path, what, wait, waiting)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, (holder() + "\n").encode(), 0)
    return fd


def _wait_for(fd: int, path: Path, what: str, wait: float, waiting: Callable[[str], None] | None) -> None:
    deadline, told = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            owner = path.read_text().strip() or "another process"
            if time.monotonic() >= deadline:
                raise Locked(f"{what} is in use by {owner}") from None
            if waiting is not None and not told:
                waiting(owner)
                told = True
            time.sleep(0.5)


# --- cache entries ------------------------------------------------------------------------------


def cached(path: Path, what: str, read: Callable[[Path], T], build: Callable[[], T]) -> T:
    """The cache entry at ``path``: ``read`` if it is there and intact, else ``build()`` (which
    writes it). A corrupt entry is named and rebuilt. Processes that share the cache build an
    entry once: while one builds, the others wait on its lock, then read what it wrote."""
    if (value := intact(path, read)) is not None:
        return value
    say = lambda owner: tqdm.write(f"{what}: waiting for {owner}, which is building it")
    with lock(path.with_name(path.name + ".lock"), what, wait=math.inf, waiting=say):
        if (value := intact(path, read)) is not None:
            return value
        return build()


def intact(path: Path, read: Callable[[Path], T]) -> T | None:
    """``read(path)`` if the entry is there and intact, else None (a corrupt one is named and removed)."""
    if not path.is_file():
        return None
    try:
        return read(path)
    except CorruptFile as err:
        tqdm.write(f"rebuilding a corrupt cache entry: {err}")
        path.unlink(missing_ok=True)
        return None
