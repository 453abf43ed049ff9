"""Atomic file writes, so a reader or a resumed run never sees a half-written file, and the
run lock, so two processes never train the same run folder at once."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import filelock
import torch


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=f".{path.name}.")
    try:
        with handle:
            write(handle)
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, path)
    except OSError as error:  # a full disk, a file-size limit: one line naming the file
        Path(handle.name).unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {error.strerror or error}") from None
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically. It is serialised in memory first, so
    that a failed write is the system's OSError (e.g. "File too large"), not torch's
    RuntimeError from its zip writer."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


class RunLocked(RuntimeError):
    """Another process is training in this run folder."""


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder/.lock`` or raise :class:`RunLocked` at once.

    ``filelock`` takes an operating-system lock on an open file (``flock`` on POSIX,
    ``msvcrt.locking`` on Windows), which the system releases when the holder exits, even on
    SIGKILL: a killed run never leaves a stale lock behind.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(folder / ".lock", timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        message = f"{folder} is being trained by another process; wait for it, or use another --out"
        raise RunLocked(message) from None
    try:
        yield
    finally:
        lock.release()
