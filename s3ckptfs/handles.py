"""The open-file table: what each file handle refers to, and its read-ahead state.

A handle refers either to a ``StagedFile`` (the file was opened for writing or
was written on this node and is not yet retired to the object cache) or to one
version of a remote object (key + ETag) read through the object cache. Several
handles on one path share one StagedFile, so a reader sees a writer's bytes.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass

from . import locks
from .cache import CachedObject
from .errors import FsError
from .store import ObjectInfo
from .staging import StagedFile


@dataclass
class Handle:
    path: str
    flags: int
    writable: bool
    staged: StagedFile | None = None
    remote: ObjectInfo | None = None
    cached: CachedObject | None = None
    next_offset: int = 0       # where a sequential reader would read next
    window: int = 0            # current read-ahead, grows while reads stay sequential
    backing_id: int = 0        # FUSE passthrough: the kernel reads and writes the backing file itself
    named: bool = True         # False once its name was unlinked or renamed over (the open file lives on)
    kept_as: str = ""          # a private name the FUSE layer gave the file when its name was unlinked


class HandleTable:
    """fh (int) -> Handle. Thread-safe; its lock is a leaf."""

    def __init__(self) -> None:
        self._lock = locks.new_lock("handles")
        self._handles: dict[int, Handle] = {}
        self._numbers = itertools.count(1)

    def add(self, handle: Handle) -> int:
        with self._lock:
            fh = next(self._numbers)
            self._handles[fh] = handle
            return fh

    def get(self, fh: int) -> Handle:
        with self._lock:
            handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF, f"unknown file handle {fh}")
        return handle

    def open_on(self, path: str) -> list[Handle]:
        """The handles opened under ``path``."""
        with self._lock:
            return [h for h in self._handles.values() if h.path == path and h.named]

    def unname(self, path: str, kept_as: str = "") -> list[Handle]:
        """``path`` was unlinked or replaced: handles open on it no longer refer to that name.
        With ``kept_as``, they answer to that private name from now on (``kept``). Returns them."""
        with self._lock:
            unnamed = [h for h in self._handles.values() if h.path == path and h.named]
            for handle in unnamed:
                handle.named = False
                handle.kept_as = kept_as
        return unnamed

    def kept(self, name: str) -> int | None:
        """The fh of a handle still open on the file kept as ``name`` by ``unname``, if any."""
        with self._lock:
            return next((fh for fh, handle in self._handles.items() if name and handle.kept_as == name), None)

    def move(self, old: str, new: str) -> None:
        """A rename: handles opened under ``old`` (or below it) now live under ``new``."""
        below = old.rstrip("/") + "/"
        with self._lock:
            for handle in self._handles.values():
                if not handle.named:
                    continue
                if handle.path == old:
                    handle.path = new
                elif handle.path.startswith(below):
                    handle.path = new.rstrip("/") + "/" + handle.path[len(below):]

    def remove(self, fh: int) -> Handle:
        with self._lock:
            handle = self._handles.pop(fh, None)
        if handle is None:
            raise FsError(errno.EBADF, f"unknown file handle {fh}")
        return handle
