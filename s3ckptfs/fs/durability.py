"""Durability on the cache disk: a closed file's data and journal record survive a crash.

``make_durable`` runs at close (and fsync, truncate, symlink) before the commit is
requested: the staging file is fsync'd, then its journal record is written, so a
daemon that dies after close resumes the upload from the journal. With
``local_sync=background`` the record is written first, marked not yet synced,
and the fsync follows on one background thread, in close order; the record is
then rewritten as synced (only while it still describes that version).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from .. import locks
from ..cache import fsync_dir
from ..errors import FsError
from ..staging import StagedFile, next_close_seq
from .core import Core

log = logging.getLogger(__name__)


class Durability:
    """Journals closed files, fsyncing their data at close or just after. Thread-safe."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.journal = core.journal
        self.background = core.options.local_sync == "background"
        # local_sync=background: staging files are fsync'd here after close, one at a time, in close order
        self.datasync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3ckptfs-datasync")

    def make_durable(self, file: StagedFile) -> None:
        """fsync the staging file and journal it, so the data survives a crash of this daemon.

        Raises FsError (and marks the file's write failed) if the disk refuses.
        """
        fd = -1
        started = time.monotonic()
        try:
            with file.lock:
                if file.deleted or not file.dirty or file.journaled_version == file.version:
                    return
                version = file.version
                # The commit thread may commit this very version and retire the file (closing
                # file.fd) while it is fsync'd here, without the lock: sync a descriptor of our own.
                fd = -1 if self.background else os.dup(file.fd)
            if not self.background:
                locks.fsync(fd)
                fsync_dir(self.core.cache_dir.staging)  # the file's name must survive a power loss too
            if not self._write_record(file, version, synced=not self.background, closing=True):
                return  # unlinked meanwhile: its record is gone and must stay gone
            log.debug("journaled %s (%d bytes) in %.3fs", file.path, file.size, time.monotonic() - started)
        except OSError as exc:
            with file.lock:
                file.fail_writes_locked(exc.errno or errno.EIO)
            raise FsError(exc.errno or errno.EIO, f"cannot journal {file.path}: {exc}") from exc
        finally:
            if fd >= 0:
                os.close(fd)
        if self.background:
            self.sync_data_later(file, version)

    def _write_record(self, file: StagedFile, version: int, *, synced: bool | None = None,
                      closing: bool = False, only_if_journaled: int | None = None) -> bool:
        """Write the file's journal record, without the file's lock (the record is fsync'd).

        ``journal_lock`` makes the record written last the newest. Records are removed
        under file.lock (discard, commit): if that happened while this one was being
        written, it is removed again. False if the file was deleted meanwhile.
        """
        with file.journal_lock:
            with file.lock:
                if file.deleted:
                    return False
                if only_if_journaled is not None and file.journaled_version != only_if_journaled:
                    return True  # journaled again since, for a newer version
                if synced is not None:
                    file.journaled_locked(synced=synced)
                if closing:
                    file.close_seq = next_close_seq()
                record = file.journal_record_locked()
            self.journal.write(file.id, record.to_dict())
            with file.lock:
                if file.deleted or (not file.dirty and file.committed_version >= version):
                    self.journal.remove(file.id)  # deleted, or committed, while it was written
                    return not file.deleted
                file.journaled_locked(version)
        return True

    def rewrite_record(self, file: StagedFile) -> None:
        """The file's path or key changed (rename): its record, if it has one, says so.

        It takes a new place in close order too, as its commit did in the uploader's queue
        (``Uploader.requeue_commits``): after a restart it commits behind the changes made
        before the rename, as it would have without the restart.
        """
        with file.lock:
            version = file.journaled_version
        if version:
            self._write_record(file, version, closing=True)

    def sync_data_later(self, file: StagedFile, version: int) -> None:
        try:
            self.datasync.submit(self._sync_data, file, version, time.monotonic())
        except RuntimeError:  # shutting down: no thread left to do it
            self._sync_data(file, version, time.monotonic())

    def _sync_data(self, file: StagedFile, version: int, queued: float) -> None:
        """fsync the staging file journaled at ``version``, then mark its record synced.

        Nothing to do if the record is gone meanwhile (committed, replaced, unlinked)
        or was written again for a newer version (whose own sync is queued behind this one).
        """
        fd = -1
        try:
            with file.lock:
                if (file.deleted or file.fd < 0 or file.journaled_version != version
                        or not self.journal.exists(file.id)):
                    return
                fd = os.dup(file.fd)  # the commit may close file.fd meanwhile
            locks.fsync(fd)
            fsync_dir(self.core.cache_dir.staging)
            self._write_record(file, version, synced=True, only_if_journaled=version)
        except OSError as exc:
            log.error("background fsync of %s failed (%s): it is still uploaded from memory, but a restart "
                      "of the machine before that would lose it", file.path, exc)
            return
        finally:
            if fd >= 0:
                os.close(fd)
        log.debug("data of %s on disk %.3fs after it was journaled", file.path, time.monotonic() - queued)

    def shutdown(self) -> None:
        self.datasync.shutdown(wait=True)  # a clean stop leaves every record synced
