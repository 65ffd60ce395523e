"""Atomic file writes: every file this project writes appears whole or not at all (crash-safe outputs)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], binary: bool = False) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, then ``os.replace`` it into place.

    Readers never see a half-written file and a crash leaves the previous version intact; the temporary file is
    removed on any error. The result is world-readable like a normally created file (``mkstemp`` would give 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException as err:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        if is_disk_full(err):
            raise disk_full_error(path) from err
        raise


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it wraps) is a write that ran out of space (``ENOSPC``; torch's zip writer then
    reports only ``unexpected pos ...``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_error(path: str | os.PathLike) -> OSError:
    """An ``OSError(ENOSPC)`` naming the file that could not be written and the free space left beside it."""
    folder = Path(path).parent
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return OSError(errno.ENOSPC, f"cannot write {path}: the disk is full ({free} in {folder}); nothing was replaced")
