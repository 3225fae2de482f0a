"""Part uploads: the parts of multipart uploads, sent in parallel from staging files.

A part is submitted as soon as the writer has moved past its end
(``part_filled``), while the application is still writing, and again at commit
time for every part that is missing or stale (``schedule_stale_locked``). Parts
are read back from the staging file, so memory is bounded by concurrency x part
size. Eager parts (of files still being written) are limited to
``eager_uploads`` at once: on a small node the upload competes with the training
process for CPU; commit-time parts are not limited.

The multipart upload itself is created on first need, without the file's lock
(``_current_upload``): a hung CreateMultipartUpload must stall nothing but that
file's parts. Every upload created is recorded in the ``UploadRegistry`` until it
is completed or aborted, so a crash never leaves an orphan behind for long.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from . import locks, partplan
from .cache import UploadRegistry
from .dedup import Dedup, Route
from .errors import S3Error
from .s3client import crc32c, object_metadata
from .multipart import UploadedPart
from .staging import StagedFile, read_padded
from .store import ObjectStore

log = logging.getLogger(__name__)


@dataclass
class PartRead:
    """A part as read for upload: where it goes, and what was read (filled in once read)."""
    number: int
    key: str
    upload_id: str
    generation: int   # the part's generation before its bytes were read (a rewrite since makes it stale)
    epoch: int
    start: int
    length: int
    closed_size: int | None = None   # the file's size if no handle could write it when it was read
    crc: str = ""
    digest: str | None = None


@dataclass
class _UploadRef:
    id: str | None = None   # the upload the part was for, once known


class PartUploads:
    """The part-upload pool and the eager limit. Thread-safe; its lock is a leaf."""

    def __init__(self, s3: ObjectStore, *, concurrency: int, single_put_limit: int, eager_uploads: int | None,
                 registry: UploadRegistry, checksums: bool, upload_nice: int = 0,
                 backoff: Callable[[int], float] | None = None, dedup: Dedup | None = None) -> None:
        self.s3 = s3
        self.dedup = dedup or Dedup(s3, None)
        self.registry = registry
        self.checksums = checksums
        self.single_put_limit = single_put_limit
        self.eager_limit = concurrency if eager_uploads is None else min(eager_uploads, concurrency)
        self._eager_inflight = 0
        self._eager_waiting: deque[tuple[StagedFile, int]] = deque()
        self._lock = locks.new_lock("parts")
        self._upload_nice = upload_nice
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3ckptfs-part",
                                        initializer=self._lower_priority)
        self._misc_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="s3ckptfs-abort")
        self._backoff = backoff or (lambda attempt: min(30.0, 0.5 * 2 ** min(attempt - 1, 6)))
        self._stopping = threading.Event()
        self.answered_at = time.monotonic()  # when S3 last accepted a part (see Uploader.stalled_for)

    def _lower_priority(self) -> None:
        if self._upload_nice:
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._upload_nice)
            except OSError as exc:
                log.debug("could not lower upload thread priority: %s", exc)

    # -- part uploads ----------------------------------------------------------------

    def part_filled(self, file: StagedFile, number: int) -> None:
        """The writer moved past part ``number``: upload it now if it is stale and the eager limit allows."""
        with file.lock:
            if (file.deleted or file.size <= self.single_put_limit or file.upload.sending(number)
                    or file.part_up_to_date_locked(number)):
                return
        if self.dedup.parts_wait_for_commit(file.id):
            return  # left for the commit, with the file's other parts (dedup.py)
        with self._lock:
            if self._eager_inflight >= self.eager_limit:
                if self.eager_limit > 0:
                    self._eager_waiting.append((file, number))
                return
            self._eager_inflight += 1
        self._submit_eager(file, number)

    def _submit_eager(self, file: StagedFile, number: int) -> None:
        with file.lock:
            # A part queued while the file was written may come up after the file was
            # committed (and its staging fd closed): then there is nothing left to do.
            claimed = (file.dirty and file.fd >= 0 and not file.deleted and not file.part_up_to_date_locked(number)
                       and file.upload.claim(number))
        if claimed:
            self._pool.submit(self._upload_eager_part, file, number)
        else:
            self._eager_part_done()

    def _upload_eager_part(self, file: StagedFile, number: int) -> None:
        try:
            self._upload_part(file, number, defer=True)
        finally:
            self._eager_part_done()

    def _eager_part_done(self) -> None:
        """An eager slot is free: give it to the oldest waiting part."""
        with self._lock:
            if not self._eager_waiting:
                self._eager_inflight -= 1
                return
            file, number = self._eager_waiting.popleft()
        self._submit_eager(file, number)

    def schedule_stale_locked(self, file: StagedFile, defer: bool = False) -> list[int]:
        """Submit every stale part not already in flight; returns the stale part numbers.

        With ``defer``, a part equal to one another file is still uploading is left for
        the commit, which runs after that file's (see dedup.py), and then copied.
        """
        stale = file.stale_parts_locked()
        if not defer:
            self.dedup.commit_takes_parts(file.id)
        elif self.dedup.parts_wait_for_commit(file.id):
            return stale  # parts were left for the commit: the rest waits for it too (not read twice)
        for number in stale:
            if file.upload.claim(number):
                self._pool.submit(self._upload_part, file, number, defer)
        return stale

    def _current_upload(self, file: StagedFile) -> tuple[str, str] | None:
        """(key, upload id) of the multipart upload for the file's current key, created if needed.

        CreateMultipartUpload runs without file.lock; ``creating_upload`` makes the
        other parts of the file wait for it (on file.changed) instead of creating
        their own. None if the file no longer needs an upload.
        """
        while True:
            with file.lock:
                if file.deleted or not file.dirty or file.fd < 0 or file.size <= self.single_put_limit:
                    return None  # a file that small is one PUT at commit
                current = file.upload.for_key(file.key)
                if current is not None:
                    return file.key, current
                if file.creating_upload:
                    file.changed.wait_for(lambda: not file.creating_upload)
                    continue
                self.abort_later(file.upload.forget())
                file.begin_creating_upload_locked()
                key, metadata = file.key, object_metadata(file.mtime, file.mode, file.id)
            upload_id = None
            try:
                upload_id = self.s3.create_multipart(key, metadata, checksums=self.checksums)
                self.registry.add(key, upload_id)
            finally:
                with file.lock:
                    file.end_creating_upload_locked()
                    # Not adopted (aborted instead) if the file no longer needs it: renamed, deleted,
                    # or committed meanwhile, e.g. by a PUT after a truncate, and maybe retired.
                    adopted = (upload_id is not None and not file.deleted and file.key == key
                               and file.upload.id is None and file.dirty and file.fd >= 0
                               and file.size > self.single_put_limit)
                    if adopted:
                        file.upload.started(key, upload_id)
            if upload_id is not None and not adopted:
                self.abort_later((key, upload_id))  # renamed or deleted meanwhile

    def _upload_part(self, file: StagedFile, number: int, defer: bool = False) -> None:
        """Read part ``number``, and send it, or hand it to the copy lane (dedup.py decides which)."""
        handed_over = False
        try:
            with self._part_outcome(file, number) as upload:
                if defer and self.dedup.parts_wait_for_commit(file.id):
                    return  # left for the commit since it was scheduled (dedup.py, wholecopy.py)
                target = self._current_upload(file)
                if target is None:
                    return
                part = self._snapshot(file, number, target)
                if part is None:
                    return
                upload.id = part.upload_id
                data = read_padded(file.fd, part.start, part.length)
                part.crc, part.digest = crc32c(data), self.dedup.digest(data)
                route = self.dedup.route(file.id, part.upload_id, part.digest, part.start, part.length,
                                         part.closed_size, at_commit=not defer)
                if route is Route.LEAVE:
                    return  # stays stale: the commit copies it once the other file's object is complete
                if route is Route.COPY:
                    copy = part
                    handed_over = self.dedup.copy_in_lane(lambda: self._copy_part(file, copy, defer),
                                                          cancelled=lambda: self._settle(file, number),
                                                          length=part.length)
                    if handed_over:
                        return  # the lane settles it
                self._send(file, part, data)
        finally:
            if not handed_over:
                self._settle(file, number)

    def _copy_part(self, file: StagedFile, part: PartRead, defer: bool) -> None:
        """On the copy lane: make the part from an equal range in S3, or send it after all."""
        try:
            with self._part_outcome(file, part.number) as upload:
                if defer and self.dedup.parts_wait_for_commit(file.id):
                    # Queued while the file was written; since then found equal to an object, the
                    # file is copied whole at its commit: a part made now would be thrown away.
                    return
                upload.id = part.upload_id
                etag = self.dedup.copy_part(part.key, part.upload_id, part.number, part.length, part.digest,
                                            part.crc)
                if etag is not None:
                    self._record(file, part, etag, copied=True)
                    return
                # Read again (the lane holds no bytes); a rewrite meanwhile leaves the part stale anyway.
                data = read_padded(file.fd, part.start, part.length)
                part.crc, part.digest = crc32c(data), self.dedup.digest(data)
                self._send(file, part, data)
        finally:
            self._settle(file, part.number)

    def _snapshot(self, file: StagedFile, number: int, target: tuple[str, str]) -> PartRead | None:
        """What the part is to be at this moment; None if it no longer needs uploading."""
        with file.lock:
            if (file.deleted or not file.dirty or file.fd < 0 or number > file.part_count_locked()
                    or file.part_up_to_date_locked(number) or file.upload.id != target[1]):
                return None  # changed meanwhile: the commit schedules what is still stale
            return PartRead(number, *target, file.part_generation.get(number, 0), file.pt_epoch,
                            partplan.part_range(number, file.part_base)[0],
                            partplan.part_length(number, file.size, file.part_base),
                            closed_size=file.size if file.writers == 0 and file.pt_writers == 0 else None)

    def _send(self, file: StagedFile, part: PartRead, data: bytes | memoryview) -> None:
        checksum = part.crc if self.checksums else None
        self.dedup.send_begins()
        sent = 0
        try:
            etag = self.s3.upload_part(part.key, part.upload_id, part.number, data, checksum)
            sent = part.length
        finally:
            self.dedup.send_ended(sent)
        self.dedup.count(sent=part.length)
        self._record(file, part, etag, copied=False)

    def _record(self, file: StagedFile, part: PartRead, etag: str, copied: bool) -> None:
        self.answered_at = time.monotonic()  # S3 accepted the part, sent or copied
        checksum = part.crc if self.checksums else None
        with file.lock:
            file.upload.sent(part.number, UploadedPart(part.generation, part.length, etag, part.upload_id, checksum,
                                                       epoch=part.epoch, crc=part.crc, digest=part.digest), copied)

    @staticmethod
    def _settle(file: StagedFile, number: int) -> None:
        with file.lock:
            file.upload.settled(number)
            file.changed.notify_all()

    @contextlib.contextmanager
    def _part_outcome(self, file: StagedFile, number: int) -> Iterator[_UploadRef]:
        """Record a failure of the part's upload (or copy) on the file; never let a worker die silently."""
        upload = _UploadRef()
        try:
            yield upload
        except S3Error as err:
            with file.lock:
                if upload.id is not None and file.upload.id != upload.id:
                    return  # the upload was superseded (rename, commit, unlink): nothing lost
                if err.code == "NoSuchUpload":
                    # Aborted behind our back: start a new upload; every part becomes stale.
                    log.warning("multipart upload of %s vanished; restarting it", file.path)
                    gone = file.upload.forget()
                    if gone:
                        self.registry.remove(gone[1])
                    return
                file.upload.failed(err)
            log.warning("upload of part %d of %s failed: %s", number, file.path, err)
        except OSError as err:
            log.error("reading part %d of %s from the staging file failed: %s", number, file.path, err)
            with file.lock:
                file.upload.failed(S3Error("LocalIOError", str(err)))
        except Exception as err:  # never let a worker die silently
            log.exception("unexpected error uploading part %d of %s", number, file.path)
            with file.lock:
                file.upload.failed(S3Error("InternalError", repr(err)))

    def resume_upload(self, file: StagedFile, upload_id: str) -> int:
        """Adopt an upload an earlier run started for this file; keep the parts that match.

        A part is kept only if its size and its CRC32C (or, when the server lists no
        checksum, its MD5 ETag) equal those of the staging file's bytes now. Returns
        the number of parts kept (0: the upload is aborted instead).
        """
        try:
            listed = self.s3.list_parts(file.key, upload_id)
        except S3Error as err:
            log.info("earlier upload of %s cannot be resumed (%s)", file.path, err)
            listed = []
        kept: dict[int, UploadedPart] = {}
        with file.lock:
            count = file.part_count_locked()
            for number, size, etag, checksum in listed:
                if number > count or size != partplan.part_length(number, file.size, file.part_base):
                    continue
                start, _ = partplan.part_range(number, file.part_base)
                data = os.pread(file.fd, size, start)
                local_crc = crc32c(data)
                if checksum:
                    same = local_crc == checksum
                else:
                    same = hashlib.md5(data, usedforsecurity=False).hexdigest() == etag.strip('"')
                if same:
                    kept[number] = UploadedPart(0, size, etag, upload_id, local_crc if self.checksums else None,
                                                epoch=file.pt_epoch, crc=local_crc, digest=self.dedup.digest(data))
            if kept:
                file.upload.resumed(file.key, upload_id, kept)
        if not kept:
            self.abort_later((file.key, upload_id))
        return len(kept)

    def abort_later(self, stale: tuple[str, str] | None) -> None:
        """Abort a multipart upload that is no longer needed, in the background."""
        if stale is None:
            return
        key, upload_id = stale

        def abort() -> None:
            for attempt in itertools.count(1):
                try:
                    self.s3.abort_multipart(key, upload_id)
                except S3Error as err:
                    if err.code == "NoSuchUpload":
                        pass  # completed or aborted already: nothing left to abort
                    elif err.transient and not self._stopping.is_set():
                        # S3 away for now: try again in this run (not only at the next start).
                        if not self._stopping.wait(self._backoff(attempt)):
                            continue
                        return  # stopping: stays registered, aborted at the next start
                    else:
                        log.warning("could not abort multipart upload of %s: %s", key, err)
                        return  # stays registered: aborted at the next start
                self.registry.remove(upload_id)
                return

        self._misc_pool.submit(abort)

    def shutdown(self, wait: bool) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
        self._misc_pool.shutdown(wait=True)
