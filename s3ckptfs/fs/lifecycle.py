"""The life of a staged file: registered, closed (flush), synced (fsync), committed, retired.

A file opened for writing is registered in the path table. When its last
writer closes (``flush``), it is made durable on the cache disk and its commit
is requested from the uploader, which makes it an object in close order. Once
it is committed and no handle is open, it is retired: its staging file becomes
the cached copy of the new object, so reading back what was just written costs
no download. This class is also the uploader's listener (``committed``,
``settled``), the one way the uploader reports back.

Lock order (s3ckptfs/locks.py): the mount's lock, then a file's lock; neither is
held across an S3 request or an fsync.
"""

from __future__ import annotations

import errno
import logging
import os

from .. import locks
from ..errors import FsError, S3Error
from ..remoteops import RemoteOp
from ..metadata import DirInfo
from ..store import ObjectInfo
from ..staging import StagedFile
from ..uploader import Ticket, Uploader
from ..conditions import is_conflict
from .conflicts import CONFLICT, Conflicts, forget_kept
from .core import Core
from .durability import Durability
from .pending import PendingOps

log = logging.getLogger(__name__)


def free_staging(file: StagedFile) -> None:
    """Close and delete a staging file nobody uses any more."""
    file.close_fd()
    try:
        os.unlink(file.staging_path)
    except FileNotFoundError:
        pass


class Lifecycle:
    """Registers, closes, commits and retires staged files. Thread-safe."""

    def __init__(self, core: Core, durability: Durability) -> None:
        self.core = core
        self.table = core.table
        self.durability = durability
        self.uploader: Uploader  # set by the facade once the uploader exists (it needs this listener)
        self.pending: PendingOps  # set by the facade (it needs the uploader)
        self.conflicts = Conflicts(core)
        self.write_mode = core.options.write_mode

    # -- the path table ------------------------------------------------------------------

    def register_locked(self, file: StagedFile) -> None:
        """``file`` now stands for its path (mount's lock held); a file it replaces is discarded."""
        previous = self.table.get(file.path)
        if previous is not None and previous is not file:
            self.discard_locked(previous)
        self.clear_lost_locked(file.path, "written again")
        self.table.staged[file.path] = file
        self.core.meta.drop(file.path)  # the staged file shadows it; the parent's listing stays fresh
        self.table.mtime_overrides.pop(file.path, None)

    def discard_locked(self, file: StagedFile) -> None:
        """The file is replaced or unlinked (mount's lock held): never upload it again; free it once unused.

        A commit request of it in flight is not waited for: what it writes is replaced or
        deleted by what is queued after it (a later commit, or a delete in close order).
        """
        with file.lock:
            file.mark_deleted_locked()
            self.uploader.abort_later(file.upload.forget())
            unused = file.handles == 0
            self.core.journal.remove(file.id)  # under file.lock, like every removal: see Durability
        self.table.drop_locked(file)
        if unused:
            free_staging(file)
        self.core.room_freed()

    def clear_lost_locked(self, path: str, why: str) -> None:
        """The path of a lost file is written, renamed or deleted: forget the loss (mount's lock held)."""
        lost = self.table.lost.pop(path, None)
        if lost is None:
            return
        forget_kept(self.core, lost)
        log.info("%s, %s, is %s: no longer reported", path,
                 "set aside after a conflict" if lost.state == CONFLICT else "lost in a restart of the machine", why)

    # -- close and fsync -----------------------------------------------------------------

    def close_and_commit(self, file: StagedFile) -> None:
        """Make the file durable here and queue its commit; in sync mode, wait for it."""
        self.durability.make_durable(file)
        ticket = self.uploader.request_commit(file)
        if self.write_mode == "sync":
            self.wait(ticket, file)

    def flush(self, fh: int) -> None:
        """close(2) of one descriptor: make the data safe per the write mode."""
        handle = self.core.handles.get(fh)
        file = handle.staged
        if file is None or not handle.writable:
            return
        if handle.backing_id:
            self.core.passthrough.settle(file)
        with file.lock:
            if file.write_error is not None:
                raise FsError(file.write_error, f"{file.path}: an earlier write failed; not uploaded")
            if file.deleted or not file.dirty:
                return
            last_writer = file.writers <= 1
        if not last_writer:
            self.durability.make_durable(file)
            return  # another descriptor still writes: commit when the last one closes
        self.close_and_commit(file)

    def fsync(self, fh: int) -> None:
        """Return once this file's content is complete in S3."""
        handle = self.core.handles.get(fh)
        file = handle.staged
        if file is None:
            return
        if handle.backing_id and handle.writable:
            self.core.passthrough.settle(file)
        with file.lock:
            if file.deleted:
                return
            if file.write_error is not None:
                raise FsError(file.write_error, f"{file.path}: an earlier write failed; not uploaded")
            if not file.dirty:
                if file.failure is not None:
                    raise FsError(errno.EIO, f"{file.path}: {file.failure}")
                return
        self.durability.make_durable(file)
        self.wait(self.uploader.request_commit(file), file)

    def wait(self, ticket: Ticket, file: StagedFile) -> None:
        """Wait for the commit (fsync, sync-mode close); EIO once S3 has answered nothing for
        ``sync_stall_limit`` seconds. The file stays staged and is uploaded when S3 answers."""
        locks.assert_no_locks_held(f"wait for the commit of {file.path}")
        limit = self.core.options.sync_stall_limit
        while not ticket.wait(None if not limit else 0.5):
            stalled = self.uploader.stalled_for()
            if stalled >= limit:
                raise FsError(errno.EIO, f"{file.path}: S3 has answered nothing for {stalled:.0f}s; the file "
                                         "is kept in the cache and uploaded once S3 answers")
        if ticket.error is not None:
            raise FsError(ticket.error.errno if ticket.error.errno != errno.ENOENT else errno.EIO,
                          f"{file.path}: {ticket.error}")

    def release(self, fh: int) -> None:
        handle = self.core.handles.remove(fh)
        passthrough = self.core.passthrough
        if handle.cached is not None:
            if handle.backing_id:
                with self.table.lock:
                    passthrough.release_cached_locked(handle.cached)
            self.core.objects.release(handle.cached)
        file = handle.staged
        if file is None:
            return
        with self.table.lock:
            with file.lock:
                file.handles -= 1
                if handle.writable:
                    file.writers -= 1
                if handle.backing_id:
                    passthrough.release_locked(file, handle)
                unused = file.handles == 0
                refused = unused and is_conflict(file.failure)
            if unused and file.deleted:
                free_staging(file)
                return
            if unused and file.write_error is not None:
                self.discard_locked(file)  # never published; the path shows what S3 holds
                self.core.meta.forget(file.path)
                self.core.room_freed()
                return
        if refused:
            self.conflicts.file_refused(file)
            return
        self.settled(file)

    # -- the uploader's listener -----------------------------------------------------------

    def committed(self, file: StagedFile, key: str, etag: str, version: int) -> None:
        """``file`` at ``version`` is now object ``key`` with ``etag``."""
        self.core.objects.invalidate(key)
        with file.lock:
            if not file.dirty and not file.deleted:
                self.core.journal.remove(file.id)
        with self.table.lock:
            # Only while the file still stands for its path under that key: a file replaced or
            # renamed while its request was in flight wrote an object the path no longer names,
            # and its ETag recorded there sent the path's next reader to a version S3 no longer
            # has (ESTALE on a `latest` read right after it was replaced).
            if self.table.holds(file) and file.key == key:
                self.core.meta.put(file.path, self._entry(file, etag))
        self.retire_if_clean(file)

    @staticmethod
    def _entry(file: StagedFile, etag: str) -> ObjectInfo | DirInfo:
        """What S3 holds for a committed file (or directory marker)."""
        if file.is_dir_marker:
            return DirInfo(file.mtime)
        return ObjectInfo(key=file.key, size=file.size, etag=etag, mtime=file.mtime, mode=file.mode)

    def conflicted(self, file: StagedFile) -> None:
        """S3 refused ``file``'s commit: another node wrote its key since (conflicts.py)."""
        self.conflicts.file_refused(file)

    def op_copied(self, op: RemoteOp, etag: str) -> None:
        """A move's destination holds the object (with ``etag``); its source is deleted next."""
        self.pending.op_copied(op, etag)

    def op_done(self, op: RemoteOp, error: S3Error | None) -> None:
        """A namespace change has been made in S3, or given up."""
        self.pending.op_done(op, error)

    def settled(self, file: StagedFile) -> None:
        """After a release, and after each commit: if the file is closed and changed since its
        last commit (written through a shared mapping after the last flush, or during a
        commit's request, whose end sees to it), commit it; else retire it if clean."""
        with file.lock:
            again = file.needs_commit_locked()
        if again:
            self.durability.make_durable(file)
            self.uploader.request_commit(file)
        else:
            self.retire_if_clean(file)

    def retire_if_clean(self, file: StagedFile) -> None:
        """A committed, closed file: hand its staging file to the object cache.

        Done under the mount's lock, so that an open() sees either the staged file
        or the cached object, never the gap between them.
        """
        with self.table.lock:
            with file.lock:
                if not file.can_retire_locked() or not self.table.holds(file):
                    return
                # A clean file holds no upload; one left by a request that returned late is aborted.
                self.uploader.abort_later(file.upload.forget())
                self.table.drop_locked(file)
                # Renamed since its last commit, the file's object reaches its key by a move, as a
                # copy with an ETag of its own: the move records it once made (the path shows the
                # move until then). The old object's ETag recorded here would send readers to a
                # version S3 does not hold (ESTALE).
                etag = file.etag_under(file.key)
                info = self._entry(file, etag)
                file.close_fd()
            self.core.room_freed()
            kept = False
            if etag and not file.is_dir_marker:
                try:
                    kept = self.core.objects.adopt(file.key, etag, file.staging_path, file.size)
                except OSError as exc:
                    log.warning("could not keep %s in the cache: %s", file.path, exc)
            if etag or file.is_dir_marker:
                self.core.meta.put(file.path, info)
        if not kept:
            free_staging(file)

