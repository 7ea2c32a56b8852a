"""Writing files that readers may look at any time (the store, the artifact cache)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["is_disk_full", "write_atomically"]

# A file that cannot grow: the filesystem is full, the user's quota is spent, or
# the file would pass a size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ). All
# three are the operator's to fix, not a bug: callers say RESOURCE_EXHAUSTED or
# go without the file, never INTERNAL.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says a file could not be written for lack of room."""
    return isinstance(error, OSError) and error.errno in _DISK_FULL


def write_atomically(path: Path, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Writes `data` (bytes, or pieces written one after another) to `path` through a `.tmp-*` file in the same directory (mode
    0600, as mkstemp makes it), fsynced and renamed over `path`: a reader sees the
    old file or the whole new one, and a crash mid-write leaves no half file (the
    store and the cache delete `.tmp-*` leftovers). The caller fsyncs the directory
    where the rename itself must survive a crash."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                for piece in data:
                    f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
