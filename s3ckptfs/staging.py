"""A file being written through the mount: its staging file and its upload state.

A ``StagedFile`` is the unit of write-back. Its bytes live in a local staging
file (sparse, written with pwrite at disk speed); the object in S3 is replaced
only when a commit completes. It tracks, per multipart part, a write
generation: every write bumps the generation of the parts it touches *after*
the bytes are in the staging file, so a part uploaded with generation g holds
at least the bytes of every write counted in g. A part is up to date when it
was uploaded for the current upload id, at the current generation and length.

``version`` counts every change to content or metadata; ``committed_version``
is the version S3 holds. The file is dirty while they differ. Its way to S3 is
one ``CommitState`` (commitstate.py), changed only by the transition methods
here; other modules ask the predicates (``deleted``, ``commit_queued``...).

With FUSE passthrough (see docs/design.md) the kernel writes into the staging
file itself and the daemon never sees the writes: size and mtime are then
read from the staging file (``observe_locked``), and ``pt_epoch`` counts the
moments after which any byte may have changed (a writer opened, synced or
closed). A part uploaded at an older epoch is checked against the staging
file's bytes (CRC32C) before the upload completes.

No S3 request and no fsync is made with ``lock`` held (see s3ckptfs/locks.py for
the lock order): requests are prepared under it, sent without it, and their
outcome recorded under it again. ``committing`` (the SENDING state) and
``creating_upload`` say that such a request is in flight.
"""

from __future__ import annotations

import ctypes
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import locks, partplan
from .cache import boot_id
from .commitstate import CommitState, check_move
from .conditions import Expected
from .errors import S3Error
from .multipart import MultipartUpload
from .records import FileRecord


_libc = ctypes.CDLL(None, use_errno=True)
_SYNC_FILE_RANGE_WRITE = 2
_FALLOC_FL_KEEP_SIZE = 1
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now, without waiting for it.

    Spreads the disk writes over the time the file is written, so that the fsync
    at close (which makes the journal's promise true) has little left to do.
    """
    _libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length),
                          ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))


def pwrite_all(fd: int, data: bytes, offset: int) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
    return done


def reserve_space(fd: int, offset: int, length: int) -> None:
    """Allocate disk blocks for a range beyond (or within) the file without changing its size.

    Writes into the range cannot then fail for lack of space. Raises OSError
    (ENOSPC, or EOPNOTSUPP where the filesystem cannot do it).
    """
    if length <= 0:
        return
    if _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


_close_seq_lock = locks.new_lock("close_seq")
_last_close_seq = 0


def next_close_seq() -> int:
    """An increasing number for each close that journals a file (wall-clock ns, so later runs count on)."""
    global _last_close_seq
    with _close_seq_lock:
        _last_close_seq = max(time.time_ns(), _last_close_seq + 1)
        return _last_close_seq


@dataclass(frozen=True)
class Digest:
    """What the last commit put in S3, to tell whether a passthrough file really changed since."""
    key: str
    size: int
    mode: int
    mtime: float
    crcs: tuple[str, ...]         # per part (or one for a single PUT)


@dataclass(frozen=True)
class Committed:
    """What a commit's last request wrote: ``version`` of the file is object ``key`` with ``etag``."""
    key: str
    etag: str
    version: int
    digest: Digest | None         # to tell later whether a passthrough file changed since
    completed_upload: str | None = None  # the multipart upload it completed (nothing left to abort)


def read_padded(fd: int, start: int, length: int) -> bytes:
    """``length`` bytes of a staging file from ``start`` (a hole at the end reads short: zeros)."""
    data = os.pread(fd, length, start)
    return data if len(data) == length else data.ljust(length, b"\0")


class StagedFile:
    """One file's staging data and upload state. Fields are guarded by ``lock``."""

    def __init__(self, file_id: str, path: str, key: str, staging_path: Path, fd: int, *,
                 size: int, mode: int, mtime: float, part_base: int) -> None:
        self.id = file_id
        self.path = path                  # path under the mount, e.g. "/run/step_10.pt"
        self.key = key                    # the S3 key the next commit writes
        self.staging_path = staging_path
        self.fd = fd
        self.size = size
        self.mode = mode
        self.mtime = mtime
        self.part_base = part_base
        self.lock = locks.new_lock("file")
        self.changed = locks.new_condition(self.lock)
        self.journal_lock = locks.new_lock("journal")  # serializes writing this file's journal record
        self.version = 1
        self._committed_version = 0       # the version S3 holds (0: none yet)
        self.part_generation: dict[int, int] = {}
        self.upload = MultipartUpload()   # its multipart upload and parts (multipart.py), under ``lock``
        self.handles = 0                  # open handles of any kind
        self.writers = 0                  # open handles that may write
        # The commit lifecycle: one state, changed only by the transition methods below.
        self._state = CommitState.IDLE
        self._queued_again = False        # a commit was asked for while one runs: it follows
        self._error: S3Error | None = None  # FAILED: what it gave up on; else the last transient error
        self._creating_upload = False     # CreateMultipartUpload in flight (sent without the lock)
        self.over_object = True           # an object may be under ``key`` already (False: known absent)
        self.expected: Expected | None = None  # what this node last knew of a key (conditions.py)
        self.conditional = False          # its commits carry ``expected`` as a condition
        self._last_etag = ""
        self._last_key = ""               # the key the last commit wrote (``last_etag`` is its object's)
        self._journaled_version = 0       # the version the journal record was last written for
        self._data_synced = True          # the staging file was fsync'd after the journaled version's writes
        self.close_seq = 0                # when it was last journaled at a close: recovery commits in this order
        self._renames = 0                 # times renamed: a commit requested before a rename writes nothing
        self.writeback_from = 0           # disk writeback was started for bytes before this offset
        self._write_error: int | None = None  # sticky: a failed write means never publish this file
        self.created = time.time()
        self._committed_digest: Digest | None = None
        # FUSE passthrough (decided when the first handle opens; all open handles share one mode)
        self.passthrough = False
        self.backing_id = 0               # kernel backing id while passthrough handles are open
        self.pt_handles = 0
        self.pt_writers = 0
        self.pt_epoch = 0                 # bumped whenever unseen writes may have happened
        self.observed: tuple[int, int] = (-1, -1)  # (size, mtime_ns) of the staging file last seen
        self.reserved_end = 0             # disk blocks are reserved up to here
        self.at_risk_from: int | None = None  # a reservation failed here: writes past it may have failed
        self.pt_filled = 0                # parts handed to eager upload by the passthrough poller

    # -- the commit lifecycle (see commitstate.py): asked by predicates, changed by transitions --

    @property
    def state(self) -> CommitState:
        return self._state

    @property
    def deleted(self) -> bool:
        """Unlinked or replaced: never uploaded again."""
        return self._state is CommitState.DELETED

    @property
    def commit_queued(self) -> bool:
        """A commit is queued that has not started (or was asked for again while one runs)."""
        return self._state is CommitState.QUEUED or self._queued_again

    @property
    def committing(self) -> bool:
        """The commit's last request is in flight: it may land under the key it began with."""
        return self._state is CommitState.SENDING

    @property
    def failure(self) -> S3Error | None:
        """What the commit gave up on (kept in the cache, shown by status), else None."""
        return self._error if self._state is CommitState.FAILED else None

    @property
    def retrying(self) -> S3Error | None:
        """The last transient error of a commit still being retried, else None."""
        return self._error if self._state in (CommitState.QUEUED, CommitState.UPLOADING) else None

    @property
    def creating_upload(self) -> bool:
        return self._creating_upload

    @property
    def committed_version(self) -> int:
        return self._committed_version

    @property
    def last_etag(self) -> str:
        return self._last_etag

    def etag_under(self, key: str) -> str:
        """The ETag of ``key``'s object from this file's last commit; "" if it wrote another key (a copy has its own)."""
        return self._last_etag if key == self._last_key else ""

    @property
    def committed_digest(self) -> Digest | None:
        return self._committed_digest

    @property
    def write_error(self) -> int | None:
        return self._write_error

    @property
    def journaled_version(self) -> int:
        return self._journaled_version

    @property
    def data_synced(self) -> bool:
        return self._data_synced

    def needs_commit_locked(self) -> bool:
        """Closed, changed since its last commit, and nothing queued, running or given up."""
        return (self.handles == 0 and self.dirty and self._state is CommitState.IDLE
                and self._write_error is None)  # IDLE is never "queued again" (finish clears it)

    def can_retire_locked(self) -> bool:
        """Closed, clean, and no commit queued and no part in flight: S3 holds it."""
        return not (self.handles or self.dirty or self.deleted or self.commit_queued or self.upload.inflight)

    def _move(self, new: CommitState) -> bool:
        if self._state is CommitState.DELETED:
            return False  # final: a commit finishing after an unlink changes nothing
        if not check_move(self.path, self._state, new):
            return False
        self._state = new
        return True

    def queue_commit_locked(self) -> None:
        """A close (or fsync) asks for a commit of the current content."""
        if self._state in (CommitState.UPLOADING, CommitState.SENDING):
            self._queued_again = True
        elif self._move(CommitState.QUEUED):
            self._error = None

    def start_commit_locked(self) -> None:
        """The commit thread (re)reads the file to commit it: what was asked so far is served."""
        self._queued_again = False
        if self._state is CommitState.FAILED:
            self._error = None
        self._move(CommitState.UPLOADING)

    def begin_send_locked(self) -> None:
        """The commit's last request is about to go, without the lock."""
        self._move(CommitState.SENDING)

    def end_send_locked(self, committed: Committed | None) -> None:
        """The last request returned: what it wrote, or None if it failed."""
        if committed is not None:
            self._committed_version = committed.version
            self._last_etag = committed.etag
            self._last_key = committed.key
            self.expected = Expected(committed.key, committed.etag)
            self._committed_digest = committed.digest
        self._move(CommitState.UPLOADING)
        self.changed.notify_all()

    def mark_unchanged_since_commit_locked(self, version: int) -> None:
        """The commit found S3 already holding ``version``'s bytes (a passthrough file closed unchanged)."""
        self._committed_version = version

    def mark_identical_locked(self, etag: str, key: str | None = None) -> None:
        """The staging file holds exactly object ``etag`` (opened over it, not yet written), read
        from ``key`` (default: its own). Read from another key (its path shows a move not yet
        made), nothing is known of the object its own key will hold: no expectation."""
        self._committed_version = self.version
        self._last_etag = etag
        self._last_key = key or self.key
        self.expected = Expected(self.key, etag) if key in (None, self.key) else None

    def saw_own_version_locked(self, etag: str) -> None:
        """The object under its key is an earlier version of this very file (conditions.py)."""
        self.expected = Expected(self.key, etag)

    def condition_locked(self) -> str | None:
        """What the next commit's last request expects of its key (``store.put``'s ``expect``), or None:
        only for a conditional file, and only while what it knows is about the key it writes."""
        if not self.conditional or self.expected is None or self.expected.key != self.key:
            return None
        return self.expected.etag

    def retry_locked(self, error: S3Error) -> None:
        """The commit failed transiently and will be tried again."""
        self._error = error

    def finish_commit_locked(self) -> None:
        """The commit thread is done with the file: S3 holds what it read, or there was nothing to do."""
        self._error = None
        again, self._queued_again = self._queued_again, False
        self._move(CommitState.QUEUED if again else CommitState.IDLE)

    def give_up_locked(self, error: S3Error) -> None:
        """The commit gave up: the data stays in the cache, ``failure`` says why."""
        self._queued_again = False
        if self._move(CommitState.FAILED):
            self._error = error

    def mark_deleted_locked(self) -> None:
        """Unlinked or replaced: never upload again (final)."""
        if self._move(CommitState.DELETED):
            self._error = None
            self._queued_again = False
            self.changed.notify_all()

    def begin_creating_upload_locked(self) -> None:
        self._creating_upload = True

    def end_creating_upload_locked(self) -> None:
        self._creating_upload = False
        self.changed.notify_all()

    def fail_writes_locked(self, code: int) -> None:
        """A write failed: the file is incomplete and never published (close reports ``code``)."""
        if self._write_error is None:
            self._write_error = code

    def journaled_locked(self, version: int = 0, synced: bool | None = None) -> None:
        """The journal record now stands for ``version`` (``synced``: its data was fsync'd)."""
        self._journaled_version = max(self._journaled_version, version)
        if synced is not None:
            self._data_synced = synced

    def restored_locked(self, synced: bool) -> None:
        """Recovered from its journal record at start-up."""
        self._journaled_version = self.version
        self._data_synced = synced

    # -- state derived under lock --------------------------------------------------

    @property
    def is_dir_marker(self) -> bool:
        """A directory made by mkdir on this mount: its commit PUTs the empty ``dir/`` marker object."""
        return stat.S_ISDIR(self.mode)

    @property
    def dirty(self) -> bool:
        return self.version != self.committed_version

    def part_count_locked(self) -> int:
        return partplan.part_count(self.size, self.part_base)

    def part_up_to_date_locked(self, number: int) -> bool:
        part = self.upload.part(number)
        return (part is not None and part.upload_id == self.upload.id
                and part.generation == self.part_generation.get(number, 0)
                and part.length == partplan.part_length(number, self.size, self.part_base))

    def stale_parts_locked(self) -> list[int]:
        return [n for n in range(1, self.part_count_locked() + 1) if not self.part_up_to_date_locked(n)]

    def touch_locked(self, start: int, end: int) -> None:
        """Record that bytes [start, end) changed (call after they are in the staging file)."""
        self.version += 1
        self.mtime = time.time()
        if end <= start:
            return
        first = partplan.part_number(start, self.part_base)
        last = partplan.part_number(end - 1, self.part_base)
        for number in range(first, last + 1):
            self.part_generation[number] = self.part_generation.get(number, 0) + 1

    def observe_locked(self) -> bool:
        """Passthrough: take size and mtime from the staging file. True (and a new version) if they changed."""
        if self.fd < 0:
            return False
        st = os.fstat(self.fd)
        seen = (st.st_size, st.st_mtime_ns)
        if seen == self.observed:
            return False
        self.observed = seen
        self.size = st.st_size
        self.mtime = st.st_mtime_ns / 1e9
        self.version += 1
        return True

    def may_have_changed_locked(self) -> None:
        """A passthrough writer synced or closed: any byte may have changed, unseen by the daemon."""
        self.observe_locked()
        self.version += 1
        self.pt_epoch += 1

    def set_mtime_locked(self, mtime: float) -> None:
        if self.passthrough and self.fd >= 0:
            # Keep the staging file's mtime equal, since passthrough files take theirs from it.
            self.observe_locked()
            ns = int(mtime * 1e9)
            os.utime(self.fd, ns=(ns, ns))
            self.observed = (self.size, ns)
        self.mtime = mtime

    def reserve_locked(self, end: int) -> bool:
        """Reserve disk blocks up to ``end``. False if the disk cannot hold them."""
        if end <= self.reserved_end:
            return True
        try:
            reserve_space(self.fd, self.reserved_end, end - self.reserved_end)
        except OSError:
            return False
        self.reserved_end = end
        return True

    def release_reservation_locked(self) -> None:
        """Give back the blocks reserved past the end of the file (keeping its mtime)."""
        if self.reserved_end > self.size and self.fd >= 0:
            st = os.fstat(self.fd)
            os.ftruncate(self.fd, st.st_size)   # also drops preallocated blocks past the end
            os.utime(self.fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.reserved_end = 0

    @property
    def renames(self) -> int:
        return self._renames

    def retarget_locked(self, path: str, key: str) -> tuple[str, tuple[str, str] | None]:
        """Renamed: from now on the file is ``path``, committed as ``key``.

        A commit requested before counts for nothing (``renames`` changed): the file's
        commit goes behind the changes queued before the rename (Uploader.requeue_commits).
        A commit request in flight lands under the old key, so the file becomes dirty, to be
        committed again under the new one. Returns (the old key, the multipart upload to abort).
        """
        old_key = self.key
        self.path = path
        self.key = key
        self._renames += 1
        if self.committing:
            self.version += 1
        return old_key, self.upload.forget()

    # -- data ----------------------------------------------------------------------

    def write(self, data: bytes, offset: int) -> int:
        """pwrite into the staging file, then account for it. Returns the bytes written."""
        return self.write_with(lambda fd, at: pwrite_all(fd, data, at), offset)

    def write_with(self, copy: Callable[[int, int], int], offset: int) -> int:
        """``copy(fd, offset)`` puts the bytes into the staging file; then account for them."""
        done = copy(self.fd, offset)
        with self.lock:
            if offset + done > self.size:
                self.size = offset + done
            self.touch_locked(offset, offset + done)
        return done

    def read(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def truncate_locked(self, length: int) -> None:
        os.ftruncate(self.fd, length)
        old = self.size
        self.size = length
        self.pt_filled = min(self.pt_filled, partplan.part_number(length, self.part_base) - 1)
        self.reserved_end = min(self.reserved_end, length)  # a shrink frees blocks reserved past the end
        low, high = min(old, length), max(old, length)
        # The part holding the new end changes, and so does every part up to the old end: after a
        # shrink they fall out of the object, but a later write past them brings them back as zeros,
        # so parts already sent with the old bytes must not count as sent.
        self.touch_locked(max(0, low - 1), max(low, high))

    def journal_record_locked(self) -> FileRecord:
        return FileRecord(id=self.id, path=self.path, key=self.key, size=self.size, mode=self.mode,
                          mtime=self.mtime, upload_id=self.upload.id, upload_key=self.upload.key,
                          data_synced=self.data_synced, boot_id=boot_id(), close_seq=self.close_seq,
                          expected_key=self.expected.key if self.expected else None,
                          expected_etag=self.expected.etag if self.expected else None)

    def close_fd(self) -> None:
        """Close the staging fd once (a second close could hit a reused descriptor number)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
