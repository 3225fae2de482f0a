"""Conflicts set aside: what S3 refused stays on this node, and the mount shows S3's newer object.

A commit, move or delete refused by its condition (conditions.py) means another
node wrote the key since this one last saw it. The newer object wins everywhere,
this mount included: the path shows what S3 holds, so a job resumed on a node
that came back late reads the newest ``latest``, as every other node does. What
this node had is kept and reported, as a ``LostFile`` of state ``conflict``
(``status``, ``sync`` exit 1, the log):

* a file's bytes stay in its staging file, its journal record marked with the
  conflict, so that a restart reports it again instead of sending it again;
* a move's object stays in S3 under its old key (shown there again);
* a delete is not made.

Writing, renaming or deleting the path on the mount clears the report and the
kept bytes (``Lifecycle.clear_lost_locked``), as for files lost in a restart of
the machine. A file still open when its commit is refused is set aside when the
last handle closes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

from ..conditions import is_conflict
from ..errors import S3Error
from ..records import FileRecord
from ..remoteops import RemoteOp
from ..staging import StagedFile
from .core import Core
from .table import LostFile

log = logging.getLogger(__name__)

CONFLICT = "conflict"  # LostFile.state of what is set aside


class Conflicts:
    """Sets refused files and namespace changes aside. Thread-safe."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.table = core.table

    def file_refused(self, file: StagedFile) -> None:
        """``file``'s commit was refused: once no handle has it open, set it aside (no lock held).

        The table lets go of it first, then its record is journaled with the conflict: a crash
        in between resumes it from its old record, to be refused and set aside again."""
        with self.table.lock:
            with file.lock:
                if file.deleted or file.handles or not is_conflict(file.failure) or not self.table.holds(file):
                    return
                error = str(file.failure)
                record = dataclasses.replace(file.journal_record_locked(), conflict=error)
                file.mark_deleted_locked()
                file.close_fd()
            self.table.drop_locked(file)
            self._keep_locked(LostFile(path=file.path, key=file.key, file_id=file.id, size=file.size,
                                       mtime=file.mtime, reason=_file_reason(error, str(file.staging_path)),
                                       state=CONFLICT))
            self.core.objects.invalidate(file.key)
        self.core.room_freed()
        self._journal(file.path, file.id, record.to_dict())

    def op_refused_locked(self, op: RemoteOp, error: S3Error) -> None:
        """A namespace change refused by its condition (mount's lock held; the caller has stopped
        showing it): report it until its path is written, renamed or deleted here."""
        self._keep_locked(LostFile(path=op.path, key=op.dst or op.key, file_id=op.id, size=op.size,
                                   mtime=time.time(), reason=f"{error}; the mount shows the newer object",
                                   state=CONFLICT))

    def mark_op_record(self, op: RemoteOp, error: S3Error) -> None:
        """Journal the refusal with the operation (no lock held): a restart reports it, does not run it."""
        self._journal(op.path, op.id, lambda: {**op.record(), "conflict": str(error)})

    def _journal(self, path: str, record_id: str, record: dict | Callable[[], dict]) -> None:
        """Write the record of something set aside (fsync'd: no lock held); if its report was cleared
        meanwhile (the path written, renamed or deleted), remove it again."""
        self.core.journal.write(record_id, record)
        with self.table.lock:
            kept = self.table.lost.get(path)
            if kept is None or kept.file_id != record_id:
                self.core.journal.remove(record_id)

    def recover(self, record: dict) -> bool:
        """A journal record of something set aside before a restart: report it again. False if it is not one."""
        error = record.get("conflict")
        if not error:
            return False
        if "op" in record:
            op = RemoteOp.from_record(record)
            kept = LostFile(path=op.path, key=op.dst or op.key, file_id=op.id, size=op.size, mtime=time.time(),
                            reason=f"{error}; the mount shows the newer object", state=CONFLICT)
        else:
            file = FileRecord.from_dict(record)
            staging = self.core.cache_dir.staging_path(file.id)
            kept = LostFile(path=file.path, key=file.key, file_id=file.id, size=file.size, mtime=file.mtime,
                            reason=_file_reason(str(error), str(staging)), state=CONFLICT)
        with self.table.lock:
            self._keep_locked(kept)
        log.error("%s", kept.reason)
        return True

    def _keep_locked(self, kept: LostFile) -> None:
        older = self.table.lost.get(kept.path)
        if older is not None and older.file_id != kept.file_id:
            # One report per path: a newer version of it refused in turn replaces the older one.
            log.warning("%s: dropping what an earlier report kept (%s): a newer version is set aside",
                        kept.path, older.reason)
            forget_kept(self.core, older)
        self.table.lost[kept.path] = kept
        self.core.meta.forget(kept.path)  # S3 answers for the path from now on


def forget_kept(core: Core, kept: LostFile) -> None:
    """Drop what a report kept in the cache dir: its journal record and its bytes, if any."""
    core.journal.remove(kept.file_id)
    try:
        os.unlink(core.cache_dir.staging_path(kept.file_id))
    except FileNotFoundError:
        pass


def _file_reason(error: str, staging: str) -> str:
    return (f"{error} ({staging}); the mount shows the newer object; cleared when the path is written, renamed "
            "or deleted here")
