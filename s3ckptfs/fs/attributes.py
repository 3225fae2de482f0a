"""Attributes: chmod, chown and utimens.

A file not yet uploaded keeps its mode and mtime, and its commit stores them with
the object (``x-amz-meta-mode``, ``-mtime``). For an object already in S3, a new
mtime is kept for this mount only (``PathTable.mtime_overrides``) and a mode is
accepted without being stored: rewriting a multi-gigabyte object to change a
timestamp would cost a full server-side copy. chown is accepted (S3 has no owner
to set), so that tools like ``cp -p`` work.
"""

from __future__ import annotations

import errno
import stat
import time

from ..errors import FsError
from ..store import ObjectInfo
from .core import Core
from .lookup import Lookup


class Attributes:
    """chmod, chown, utimens. Thread-safe."""

    def __init__(self, core: Core, lookup: Lookup) -> None:
        self.table = core.table
        self.lookup = lookup

    def chmod(self, path: str, mode: int) -> None:
        """Kept for files not yet uploaded; accepted (not stored) for objects already in S3."""
        with self.table.lock:
            file = self.table.get(path)
            if file is not None:
                with file.lock:
                    file.mode = stat.S_IFMT(file.mode) | (mode & 0o7777)
                return
        if self.lookup.lookup(path) is None:
            raise FsError(errno.ENOENT, path)

    def chown(self, path: str, uid: int, gid: int) -> None:
        if self.lookup.lookup(path) is None:
            raise FsError(errno.ENOENT, path)

    def utimens(self, path: str, mtime: float | None) -> None:
        """Set the mtime: stored with the object if it is not yet uploaded, else kept for this mount."""
        mtime = time.time() if mtime is None else mtime
        with self.table.lock:
            file = self.table.get(path)
            if file is not None:
                with file.lock:
                    file.set_mtime_locked(mtime)
                return
        entry = self.lookup.lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if isinstance(entry, ObjectInfo):
            with self.table.lock:
                self.table.mtime_overrides[path] = mtime
