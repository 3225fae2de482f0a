"""Opening files: new staged files for writers, cached copies for readers.

A read-only open of an object acquires its entry in the object cache (blocks
are fetched as read). A writable open makes the path a ``StagedFile``: a new
empty one for create or O_TRUNC, otherwise a copy of the object, taken over
from a complete cached copy when possible, else downloaded whole first.
Several handles on one path share one StagedFile, so a reader sees a writer's
bytes. With FUSE passthrough, opens get a kernel backing id (see
passthrough.py); the kernel allows one backing file per inode, so an open that
would mix them is refused with EBUSY.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

from ..cache import CachedObject
from ..conditions import ABSENT, Expected
from ..errors import FsError
from ..handles import Handle
from ..metadata import MISSING, DirInfo
from ..store import ObjectInfo
from ..staging import StagedFile
from .core import FILE_MODE, Core, parent_of
from .lifecycle import Lifecycle, free_staging
from .lookup import Lookup
from .reads import Reads

log = logging.getLogger(__name__)


class Opens:
    """create and open. Thread-safe."""

    def __init__(self, core: Core, lookup: Lookup, reads: Reads, lifecycle: Lifecycle) -> None:
        self.core = core
        self.table = core.table
        self.lookup = lookup
        self.reads = reads
        self.lifecycle = lifecycle

    def new_staged(self, path: str, mode: int, size: int = 0) -> StagedFile:
        """A new, empty (or ``size`` bytes of zeros) staging file for ``path``; not yet registered."""
        file_id = self.core.new_file_id()
        staging_path = self.core.cache_dir.staging_path(file_id)
        try:
            fd = os.open(staging_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO, f"cannot create staging file: {exc}") from exc
        if size:
            os.ftruncate(fd, size)
        return StagedFile(file_id, path, self.core.key_for(path), staging_path, fd, size=size, mode=mode,
                          mtime=time.time(), part_base=self.core.options.part_size)

    def create(self, path: str, mode: int, flags: int) -> int:
        """Create (or replace) ``path`` as an empty file open for writing."""
        self.lookup.check_parent_is_dir(path)
        file = self.new_staged(path, stat.S_IFREG | (mode & 0o7777))
        with self.table.lock:
            previous = self.table.get(path)
            # No object under the key to replace: the kernel's lookup just found none, or the
            # directory was made here and is not in S3 yet. Unlink and rename then stay local.
            file.over_object = ((previous is not None and previous.over_object)
                                or (self.core.meta.get_stale(path) is not MISSING
                                    and self.table.local_dir_locked(parent_of(path)) is None))
            file.expected = previous.expected if previous is not None else self.known_locked(file.key, path)
            file.conditional = self.core.options.conditional_commits == "all"
            self.lifecycle.register_locked(file)
            return self._open_handle_locked(file, path, flags, writable=True)

    def known_locked(self, key: str, path: str) -> Expected | None:
        """What this node knows of ``key`` as ``path`` is created: the object lookup or a listing saw
        (or none, ``ABSENT``), or None if nothing is known (the commit is then unconditional).
        Pending changes come first: the commit runs after them, so a path they remove is absent
        then, and one a move brings an object to holds a copy whose ETag is not known yet: the
        move's own expectation stands (its copy is this node's write; refused, so is the commit)."""
        if path in self.table.moved:
            return self.table.expected_after_move_locked(path, key)
        if self.table.hidden_locked(path):
            return Expected(key, ABSENT)
        known = self.core.meta.get(path)
        if known is None:
            known = self.core.meta.get_stale(path)
        if known is MISSING or (known is None and self.table.local_dir_locked(parent_of(path)) is not None):
            return Expected(key, ABSENT)
        if isinstance(known, ObjectInfo) and known.etag:
            return Expected(key, known.etag)
        return None

    def _refuse_if_passed_through_locked(self, path: str) -> None:
        """The kernel would fail this open (EIO): other opens pass its inode through to another file."""
        if self.core.passthrough.kernel_backed_locked(path, 0):
            log.warning("%s: refused an open while readers here have another version of it open "
                        "(FUSE passthrough allows one file per inode); retry once they close", path)
            raise FsError(errno.EBUSY, path)

    def _open_handle_locked(self, file: StagedFile, path: str, flags: int, writable: bool) -> int:
        passthrough = self.core.passthrough
        with file.lock:
            backing = passthrough.attach_locked(file, path, writable)
            if not backing:
                self._refuse_if_passed_through_locked(path)
            file.handles += 1
            if writable:
                file.writers += 1
        fh = self.core.handles.add(Handle(path=path, flags=flags, writable=writable, staged=file,
                                          backing_id=backing))
        log.debug("open %s (fh %d, %s): %s", path, fh, "rw" if writable else "ro",
                  f"passthrough, backing id {backing}" if backing else "through the daemon")
        if backing and writable:
            passthrough.wake()
        return fh

    def open(self, path: str, flags: int) -> int:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        truncate = writable and bool(flags & os.O_TRUNC)
        with self.table.lock:
            file = self.table.get(path)
            if file is not None:
                if truncate:
                    with file.lock:
                        file.truncate_locked(0)
                return self._open_handle_locked(file, path, flags, writable)
        entry = self.lookup.lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if isinstance(entry, DirInfo):
            raise FsError(errno.EISDIR, path)
        if not writable:
            return self._open_for_reading(path, entry, flags)
        entry = self.lookup.with_etag(path, entry)  # the cached copy is found by its version
        with self.table.lock:
            fh = self._open_cached_copy_for_write_locked(path, entry, flags, truncate)
            if fh:
                return fh
            self._refuse_if_passed_through_locked(path)
        # Writing an existing object: bring it into the cache first, unless it is truncated anyway.
        file = self.new_staged(path, entry.mode or FILE_MODE)
        if not truncate:
            entry = self.reads.hydrate(file, entry)
        with file.lock:
            file.conditional = self.core.options.conditional_commits == "all"
            if not truncate:  # identical to the object until written
                file.mark_identical_locked(entry.etag, entry.key)
                file.mtime = entry.mtime
            elif entry.etag and entry.key == file.key:  # (another key: a move not yet made shows it)
                file.expected = Expected(file.key, entry.etag)
        with self.table.lock:
            existing = self.table.get(path)
            if existing is not None:  # another thread won the race: share its copy
                free_staging(file)
                return self._open_handle_locked(existing, path, flags, writable)
            self.stage_existing_locked(file)
            try:
                return self._open_handle_locked(file, path, flags, writable)
            except FsError:
                self.lifecycle.discard_locked(file)  # a local copy only: S3 keeps the object
                raise

    def _open_for_reading(self, path: str, entry: ObjectInfo, flags: int) -> int:
        entry = self.lookup.with_etag(path, entry)
        cached = self.core.objects.acquire(entry.key, entry.etag, entry.size)
        try:
            with self.table.lock:
                backing = self.core.passthrough.attach_cached_locked(cached, path)
                if not backing:
                    self._refuse_if_passed_through_locked(path)
                return self.core.handles.add(Handle(path=path, flags=flags, writable=False, remote=entry,
                                                    cached=cached, backing_id=backing))
        except FsError:
            self.core.objects.release(cached)
            raise

    def _open_cached_copy_for_write_locked(self, path: str, entry: ObjectInfo, flags: int, truncate: bool) -> int:
        """Open ``path`` for writing on its complete cached copy, moved to staging: no download.

        Only while every open of the path reads that copy through passthrough (or none
        is open); the writer then shares their backing file. Returns the fh, or 0.
        """
        existing = self.table.get(path)
        if existing is not None:  # staged since the lookup
            if truncate:
                with existing.lock:
                    existing.truncate_locked(0)
            return self._open_handle_locked(existing, path, flags, writable=True)
        file = self.take_cached_copy_locked(path, entry)
        if file is None:
            return 0
        if truncate:
            with file.lock:
                file.truncate_locked(0)
        self.stage_existing_locked(file)
        return self._open_handle_locked(file, path, flags, writable=True)

    def take_cached_copy_locked(self, path: str, entry: ObjectInfo) -> StagedFile | None:
        """A staged file made of ``path``'s complete cached copy (moved, not copied), not yet
        registered; None unless every open of the path reads that copy through passthrough
        (or none is open): they go on reading the same local file, so they see its changes."""
        others = self.core.handles.open_on(path)  # new opens of path wait for the mount's lock

        def idle_or_passed_through(cached: CachedObject) -> bool:
            return cached.readers == cached.pt_handles and all(h.cached is cached and h.backing_id for h in others)

        cached = self.core.objects.take(entry.key, entry.etag, idle_or_passed_through) if entry.etag else None
        if cached is None:
            return None
        file_id = self.core.new_file_id()
        staging_path = self.core.cache_dir.staging_path(file_id)
        try:
            os.rename(cached.path, staging_path)
            fd = os.open(staging_path, os.O_RDWR)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO, f"cannot stage {path} from the cache: {exc}") from exc
        file = StagedFile(file_id, path, self.core.key_for(path), staging_path, fd, size=entry.size,
                          mode=entry.mode or FILE_MODE, mtime=entry.mtime, part_base=self.core.options.part_size)
        with file.lock:
            file.conditional = self.core.options.conditional_commits == "all"
            file.mark_identical_locked(entry.etag, entry.key)  # identical to the object until written
        return file

    def stage_existing_locked(self, file: StagedFile) -> None:
        """``file`` now stands for the existing file at its path, opened for writing or truncated
        (mount's lock held). It is the same file to those who have it open: readers reading
        through the daemon read it from now on, as on a local disk. (Readers passed through to
        another local file cannot follow: the kernel reads that file itself.)"""
        self.lifecycle.register_locked(file)
        for handle in self.core.handles.open_on(file.path):
            if handle.staged is None and not handle.backing_id:
                with file.lock:
                    file.handles += 1
                handle.staged = file  # its cached copy stays acquired until it is released

    def keep_cache(self, fh: int) -> bool:
        """Whether the kernel may keep its page cache of this file at open (FUSE keep_cache).

        Yes for an object read through the daemon whose ETag is the one seen at the last
        open of its path; never for staged files (written here, possibly behind the
        daemon's back).
        """
        handle = self.core.handles.get(fh)
        version = (handle.remote.key, handle.remote.etag) if handle.remote is not None else None
        with self.table.lock:
            previous = self.table.note_open_locked(handle.path, version)
        return version is not None and bool(version[1]) and previous == version
