"""Writes: bytes into the staging file at disk speed, parts handed to the uploader as they fill.

A write lands in the staging file with pwrite (or a splice from the FUSE
request, see ``write_with``). When the writer moves past a part, that part is
uploaded at once and its disk writeback is started, so that close has little
left to upload or fsync. With ``cache_size`` set, a write that grows the staged
data past it waits while uploads can free room (backpressure, never ENOSPC).
"""

from __future__ import annotations

import errno
import logging
from typing import Callable

from .. import partplan
from ..errors import FsError
from ..metadata import DirInfo
from ..staging import pwrite_all, start_writeback
from ..uploader import Uploader
from .core import FILE_MODE, Core
from .durability import Durability
from .lifecycle import Lifecycle
from .lookup import Lookup
from .opens import Opens
from .reads import Reads

log = logging.getLogger(__name__)


class Writes:
    """write, truncate and write backpressure. Thread-safe."""

    def __init__(self, core: Core, lookup: Lookup, opens: Opens, reads: Reads, lifecycle: Lifecycle,
                 durability: Durability, uploader: Uploader) -> None:
        self.core = core
        self.table = core.table
        self.lookup = lookup
        self.opens = opens
        self.reads = reads
        self.lifecycle = lifecycle
        self.durability = durability
        self.uploader = uploader

    def write(self, fh: int, data: bytes, offset: int) -> int:
        return self.write_with(fh, offset, len(data), lambda fd, at: pwrite_all(fd, data, at))

    def write_with(self, fh: int, offset: int, length: int, copy: Callable[[int, int], int]) -> int:
        """Write ``length`` bytes at ``offset``; ``copy(fd, offset)`` puts them into the staging fd.

        Lets the FUSE layer move request data into the staging file without a copy in
        Python; ``write`` is the same with bytes in hand.
        """
        handle = self.core.handles.get(fh)
        file = handle.staged
        if file is None or not handle.writable:
            raise FsError(errno.EBADF, "file not open for writing")
        if offset + length > partplan.max_object_size(file.part_base):
            raise FsError(errno.EFBIG, handle.path)
        if self.core.options.cache_size and offset + length > file.size:
            self._wait_for_room(offset + length - file.size)
        try:
            written = file.write_with(copy, offset)
        except OSError as exc:
            code = exc.errno or errno.EIO
            with file.lock:
                file.fail_writes_locked(code)  # the file is incomplete: close reports it, S3 never sees it
            log.error("write to %s failed: %s; the file will not be uploaded", handle.path, exc)
            raise FsError(code, f"write {handle.path}: {exc}") from exc
        # The part before the one this write starts in is behind the writer: upload it now,
        # and start writing it to disk, so that close has little left to fsync.
        behind = partplan.part_number(offset, file.part_base) - 1
        if behind >= 1:
            self.uploader.part_filled(file, behind)
            filled_end = partplan.part_range(behind, file.part_base)[1]
            if filled_end > file.writeback_from:
                start_writeback(file.fd, file.writeback_from, filled_end - file.writeback_from)
                file.writeback_from = filled_end
        return written

    def _wait_for_room(self, incoming: int) -> None:
        """Block a growing write while staged data would exceed cache_size and uploads can free room.

        A single file larger than the cache is never blocked forever: when nothing is
        left to commit, the write goes ahead (and clean cached data makes room).
        """
        limit = self.core.options.cache_size
        waited = 0.0
        while self.table.staged_bytes() + incoming > limit and self.uploader.pending_commits():
            if waited == 0.0:
                log.info("cache full (%d bytes staged, limit %d): waiting for uploads",
                         self.table.staged_bytes(), limit)
            with self.core.room:
                self.core.room.wait(0.5)
            waited += 0.5
        self.core.objects.evict(limit - self.table.staged_bytes() - incoming)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        """Set the size of the file open as ``fh`` (ftruncate), else of ``path``."""
        passthrough = self.core.passthrough
        if fh is not None:
            handle = self.core.handles.get(fh)
            if handle.staged is not None and handle.writable:
                with handle.staged.lock:
                    handle.staged.truncate_locked(length)
                    if handle.staged.pt_writers:
                        passthrough.reserve_locked(handle.staged)
                return
        if path is None:  # the file's name is gone (unlinked while open): only its handle names it
            raise FsError(errno.EBADF, "truncate of a file without a name needs its handle open for writing")
        with self.table.lock:
            file = self.table.get(path)
            if file is not None:
                with file.lock:
                    file.truncate_locked(length)
                    if file.pt_writers:
                        passthrough.reserve_locked(file)
                    idle = file.writers == 0
        if file is not None:
            if idle:  # no writer will close it: commit now (fsync outside the mount's lock)
                self.durability.make_durable(file)
                self.uploader.request_commit(file)
            return
        entry = self.lookup.lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if isinstance(entry, DirInfo):
            raise FsError(errno.EISDIR, path)
        entry = self.lookup.with_etag(path, entry)  # the cached copy is found by its version
        with self.table.lock:
            # Readers passed through to the complete cached copy see the truncate only if it is
            # made to that very file.
            file = self.opens.take_cached_copy_locked(path, entry) if self.table.get(path) is None else None
            if file is not None:
                with file.lock:
                    file.truncate_locked(length)
                self.opens.stage_existing_locked(file)
        if file is None:
            file = self.opens.new_staged(path, entry.mode or FILE_MODE)
            if length:
                self.reads.hydrate(file, entry)
            with file.lock:
                file.truncate_locked(length)
            with self.table.lock:
                self.opens.stage_existing_locked(file)
        self.durability.make_durable(file)
        self.uploader.request_commit(file)
