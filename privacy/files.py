"""Crash-safe, private file writes shared by every module that persists state.

Everything medfed writes (keys, ledgers, audit logs, the image cache, the SuperLink's
database) belongs to the account that runs it: files 0600, folders 0700. The entry points
call :func:`private_files` so that files other code creates (NumPy, SQLite, Flower) follow.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from privacy.errors import ServiceError

PRIVATE_UMASK = 0o077


def private_files() -> None:
    """Make every file and folder this process creates readable by its own account only
    (umask 077, inherited by the processes it starts). Called by each entry point."""
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if missing and make it 0700; returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


class LockTimeout(ServiceError, TimeoutError):
    """Another process held a lock longer than the caller would wait."""


def atomic_write(path: Path, write: Callable[[IO[bytes]], object], *, mode: int = 0o600) -> None:
    """Write ``path`` atomically: temp file in the same folder, fsync, rename, fsync dir.

    A crash at any point leaves either the old file or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``data``."""
    atomic_write(path, lambda fh: fh.write(data), mode=mode)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``obj`` as indented JSON."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), mode=mode)


@contextmanager
def exclusive_lock(path: Path, *, timeout: float = 120.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the ``with`` block.

    Processes that write the same file take the same lock, so a read inside the block
    sees every earlier write and no write is lost. Waits at most ``timeout`` seconds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{path} stayed locked for {timeout:.0f} s by another process; "
                                      "retry when it has finished") from None
                time.sleep(0.01)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
