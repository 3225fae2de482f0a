"""Incremental checkpoints: a part whose bytes are already in S3 is copied there, not sent again.

Every part this node uploads is hashed (SHA-256, parthashes.py) from the bytes
read out of the staging file; when its object completes, the object's key,
ETag and part hashes are remembered. So are those of an object read here once
its copy in the cache is complete (``remember_read``), and those of a file
committed whole with one CopyObject (wholecopy.py, which asks ``whole_object``). Before a part is sent, its hash is looked
up: if a range of an object written here holds bytes with the same hash and
length, the part is made with UploadPartCopy from that range, conditional on
the object still having the ETag it had (``x-amz-copy-source-if-match``). The
bytes never cross the network.

Equality is decided from the bytes only (their hash), never from names or
sizes, and part boundaries stay those of partplan.py: a copied part is just a
part, resumed, verified and completed like any other.

What can go wrong, and what happens then:

* The source changed or is gone (overwritten, deleted by a rotation, renamed,
  by this node or another): the copy fails (PreconditionFailed, NoSuchKey, ...),
  the source is forgotten, and the part is sent. Nothing waits for ordering:
  a delete queued behind this file's commit runs after the copies anyway (the
  commit waits for its parts), and one that ran before makes the copy fail.
* The copy succeeded but holds other bytes than ours (a damaged hash store, a
  server bug): the CRC32C the server reports for the copied part is compared
  with that of the local bytes; on a mismatch the part is sent (replacing the
  copy). The whole-object checksum check at completion (uploader.py) covers
  copied parts like sent ones.
* Any other failure of a copy (the server away, a timeout): the part is sent.
  A copy is an optimisation; it never makes an upload fail.
* The multipart upload vanished (NoSuchUpload): raised, handled as for a sent part.

The same bytes saved twice in a row (Lightning's ``save_last=True`` writes the
state under two names, one right after the other) are the case that matters
most, and there the first object is not complete yet when the second file's
parts would go: an eager part (or one scheduled at close) whose bytes equal a
part another upload has sent and not yet completed is left stale. The commit
of the second file, which runs after the first one's (commits are ordered),
then finds the first object remembered and copies the part; once one part
of a file is left so, the file's other parts are not scheduled before its
commit either (each would be read and hashed once more only to be left). At
commit time a part is never left again, so nothing can wait on an upload that failed or was
dropped: at worst the part is sent then. The list of such pending parts is
kept for the last ``PENDING_UPLOADS`` uploads only.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from . import locks, partplan
from .dedupcost import DedupCosts
from .errors import S3Error
from .metrics import Metrics
from .parthashes import PartHashes, Source, part_digest
from .s3client import MULTIPART_COPY_THRESHOLD, crc32c
from .staging import StagedFile, read_padded
from .store import ObjectStore

log = logging.getLogger(__name__)

PENDING_UPLOADS = 64
COPY_CONCURRENCY = 4   # UploadPartCopy requests at once, beside the part sends


class Route(enum.Enum):
    """What becomes of a part read for upload (``Dedup.route``)."""
    SEND = "send"
    COPY = "copy"      # made from an equal range in S3, on the copy lane
    LEAVE = "leave"    # left stale for the file's commit


@dataclass(frozen=True)
class WholeMatch:
    """Object ``key`` (as ``etag``) holds exactly the file's bytes, part for part."""
    key: str
    etag: str
    ranges: list[tuple[int, int, str]]   # (start, length, digest) of the file's parts
    crcs: tuple[str, ...]                # their CRC32C, from the bytes read


class Dedup:
    """Copy-instead-of-send for parts; ``hashes`` None: off (parts are always sent, nothing hashed)."""

    def __init__(self, s3: ObjectStore, hashes: PartHashes | None, metrics: Metrics | None = None,
                 copy_concurrency: int = COPY_CONCURRENCY, adaptive: bool = False) -> None:
        self.s3 = s3
        self.hashes = hashes
        self.metrics = metrics or Metrics()
        self._lock = locks.new_lock("dedup")
        self.bytes_sent = 0
        self.bytes_copied = 0
        # parts sent for uploads not yet complete: (digest, length) -> upload id, and the reverse
        self._pending: dict[tuple[str, int], str] = {}
        self._pending_by_upload: dict[str, list[tuple[str, int]]] = {}
        self._left_for_commit: dict[str, None] = {}   # ids of files with a part left for their commit
        self._hasher: ThreadPoolExecutor | None = None   # hashes objects read here (remember_read)
        self.copy_concurrency = copy_concurrency
        self.costs = DedupCosts(adaptive)   # -o dedup=auto: copy only while copies pay (dedupcost.py)
        self._copy_backlog = 0   # bytes handed to the copy lane and not copied yet
        self._copy_lane: ThreadPoolExecutor | None = None   # UploadPartCopy requests (copy_in_lane)

    @property
    def enabled(self) -> bool:
        return self.hashes is not None

    def digest(self, data: bytes | memoryview) -> str | None:
        """The part's hash (None when dedup is off)."""
        return part_digest(data) if self.hashes is not None else None

    def copy_part(self, key: str, upload_id: str, number: int, length: int, digest: str | None,
                  crc: str) -> str | None:
        """Make part ``number`` of the upload from an equal range already in S3; its ETag, or None.

        None: nothing equal is known, or every copy failed; the caller sends the bytes (recorded
        as on their way, see ``sending``). Raises S3Error only for NoSuchUpload (the upload itself is gone).
        """
        etag = self._copy_from_any(key, upload_id, number, length, digest, crc)
        if etag is None:
            self.sending(upload_id, digest, length)
        return etag

    def _copy_from_any(self, key: str, upload_id: str, number: int, length: int, digest: str | None,
                       crc: str) -> str | None:
        if self.hashes is None or digest is None:
            return None
        for source in self.hashes.find(digest, length):
            try:
                etag, server_crc = self._timed_copy(key, upload_id, number, length, source)
            except S3Error as err:
                if err.code == "NoSuchUpload":
                    raise
                if err.transient:
                    log.info("copy of part %d of %s from %s failed (%s): sending it", number, key, source.key, err)
                    return None
                log.debug("copy source %s (%s) no longer holds its bytes (%s)", source.key, source.etag, err)
                self.source_gone(source.key, source.etag)
                continue
            if server_crc and server_crc != crc:
                log.warning("part %d of %s copied from %s has CRC32C %s, not %s: sending it",
                            number, key, source.key, server_crc, crc)
                self.hashes.forget(source.key, source.etag)
                return None
            self.count(copied=length)
            return etag
        return None

    def _timed_copy(self, key: str, upload_id: str, number: int, length: int,
                    source: Source) -> tuple[str, str | None]:
        """UploadPartCopy from ``source``, its time measured for ``auto`` (dedupcost.py)."""
        with self._lock:
            self.costs.copies.begin(time.monotonic())
        copied = 0
        try:
            answer = self.s3.upload_part_copy(key, upload_id, number, source.key, source.start, length, source.etag)
            copied = length
        finally:
            with self._lock:
                self.costs.copies.end(copied, time.monotonic())
        return answer

    def whole_object(self, fd: int, size: int, part_base: int) -> WholeMatch | None:
        """An object written here that holds exactly the bytes of the staging file ``fd``, or None.

        Decided from the bytes: every part's hash must equal that of the object's
        part at the same offset, and the sizes must be equal. The first part finds
        the candidates; the last is compared next (a next step's save that differs
        at all usually differs at its end too), so a file that is not a copy costs
        about two parts' hashes.
        """
        if self.hashes is None or size > MULTIPART_COPY_THRESHOLD:
            return None
        plan = partplan.parts(size, part_base)
        if len(plan) < 2:
            return None
        read: dict[int, tuple[str, str]] = {}   # part index -> (digest, crc)

        def part(index: int) -> tuple[str, str]:
            if index not in read:
                data = read_padded(fd, *plan[index])
                read[index] = (part_digest(data), crc32c(data))
            return read[index]

        order = [0, len(plan) - 1] + list(range(1, len(plan) - 1))
        for source in self.hashes.find(part(0)[0], plan[0][1]):
            if source.start != 0:
                continue
            known = self.hashes.object_parts(source.key, source.etag)
            if known is None or known[0] != size or [(start, length) for start, length, _ in known[1]] != plan:
                continue
            if all(part(index)[0] == known[1][index][2] for index in order):
                return WholeMatch(source.key, source.etag, known[1], tuple(part(index)[1] for index in range(len(plan))))
        return None

    def remember_read(self, key: str, etag: str, size: int, fd: int, part_base: int) -> None:
        """An object read here is whole in the cache: hash its parts in the background, as a file of
        its size written here would be cut, so that a save that shares them copies them.

        Why: a node that resumes from a checkpoint (a new node after a preemption) has
        written nothing yet; its first save shares most bytes with the one it read.
        The copy in the cache is read through a duplicate descriptor, which stays
        valid if the copy is evicted meanwhile. An etag-less entry is never remembered.
        """
        if self.hashes is None or not etag or size < 2 * part_base or self.hashes.known(key) == (etag, size):
            return
        try:
            own = os.dup(fd)
        except OSError:
            return
        with self._lock:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3ckptfs-hash")
            hasher = self._hasher
        try:
            job = hasher.submit(self._hash_read, key, etag, size, own, part_base)
        except RuntimeError:  # shut down
            os.close(own)
            return
        job.add_done_callback(lambda done: os.close(own) if done.cancelled() else None)

    def _hash_read(self, key: str, etag: str, size: int, fd: int, part_base: int) -> None:
        try:
            ranges = []
            for start, length in partplan.parts(size, part_base):
                data = os.pread(fd, length, start)
                if len(data) < length:
                    return  # not what was downloaded after all
                ranges.append((start, length, part_digest(data)))
            if self.hashes is not None and self.hashes.known(key) in (None, (etag, size)):
                self.hashes.remember(key, etag, size, ranges)   # unless written here meanwhile
        except Exception:  # never let a hasher die silently; this is only an optimisation
            log.exception("hashing the parts of %s failed", key)
        finally:
            os.close(fd)

    def shutdown(self, wait: bool) -> None:
        """Stop hashing objects read (what is queued is dropped; ``wait``: for the one being hashed),
        and the copy lane (a copy not started is cancelled, its part left stale; ``wait``: for those running)."""
        with self._lock:
            hasher, lane = self._hasher, self._copy_lane
        for pool in (hasher, lane):
            if pool is not None:
                pool.shutdown(wait=wait, cancel_futures=True)

    def source_gone(self, key: str, etag: str) -> None:
        """Object ``key`` no longer is ``etag`` (a copy from it was refused): never copy from it again."""
        if self.hashes is not None:
            self.hashes.forget(key, etag)

    def _in_other_upload_locked(self, upload_id: str, digest: str, length: int) -> bool:
        """Whether an upload other than ``upload_id`` sent these bytes and has not completed yet."""
        other = self._pending.get((digest, length))
        return other is not None and other != upload_id

    # -- the one decision per part, and the lane copies run in

    def route(self, file_id: str, upload_id: str, digest: str | None, start: int, length: int,
              closed_size: int | None, at_commit: bool) -> Route:
        """What becomes of a part just read (and hashed) for ``upload_id``: sent, copied, or left.

        LEAVE (only before the file's commit, ``at_commit`` False): its bytes are in another
        upload not complete yet, or another part of the file was left so, or the file is
        closed (``closed_size``: its size then, else None) and the part lies at the same
        offset of a remembered object of its size: the file may be a whole copy of it, which
        its commit makes with one CopyObject (wholecopy.py); the file's parts wait for the
        commit, which copies or sends them (see the module's docstring). COPY: an equal range
        is remembered; the caller hands the part to ``copy_in_lane`` (a copy that fails is
        sent from there). SEND: recorded as on its way (``sending``) before the caller sends it.
        """
        if self.hashes is None or digest is None:
            return Route.SEND
        if not at_commit and self.parts_wait_for_commit(file_id):
            return Route.LEAVE
        copies_pay = self.costs.copies_pay()
        sources = self.hashes.find(digest, length) if copies_pay else []
        with self._lock:
            # Checked and recorded at once: equal parts of two files routed together both went.
            waits = copies_pay and not at_commit and self._in_other_upload_locked(upload_id, digest, length)
            if not waits and not sources:
                self._sending_locked(upload_id, digest, length)
        if waits:
            self.leave_for_commit(file_id)
            return Route.LEAVE
        if not sources:
            return Route.SEND
        if not at_commit and closed_size is not None and any(
                source.start == start and self._size_of(source) == closed_size for source in sources):
            self.leave_for_commit(file_id)
            return Route.LEAVE
        with self._lock:
            backlog, sends = self._copy_backlog, self.costs.sends.running
        if not self.costs.lane_takes(length, backlog, sends, self.copy_concurrency):
            self.sending(upload_id, digest, length)
            return Route.SEND   # the lane is full and the link idle: both work
        return Route.COPY

    def _size_of(self, source: Source) -> int | None:
        known = self.hashes.known(source.key) if self.hashes is not None else None
        return known[1] if known is not None and known[0] == source.etag else None

    def copy_in_lane(self, job: Callable[[], None], cancelled: Callable[[], None], length: int) -> bool:
        """Run ``job`` (a part's copy of ``length`` bytes, see ``copy_part``) on the copy lane; False if
        the lane is shut down.

        Why a lane of its own: a copy spends the server's work, a send the link; with both on the
        same threads, copies of unchanged parts at the front of a file kept the link idle. The
        part threads hand copies over and go on to send. ``cancelled`` runs instead of ``job``
        if the lane shuts down before it starts.
        """
        with self._lock:
            if self._copy_lane is None:
                self._copy_lane = ThreadPoolExecutor(max_workers=self.copy_concurrency,
                                                     thread_name_prefix="s3ckptfs-copy")
            lane = self._copy_lane
            self._copy_backlog += length

        def run() -> None:
            try:
                job()
            finally:
                self._copy_left(length)
        try:
            future = lane.submit(run)
        except RuntimeError:  # shut down
            self._copy_left(length)
            return False

        def done(future: Future[None]) -> None:
            if future.cancelled():
                self._copy_left(length)
                cancelled()
        future.add_done_callback(done)
        return True

    def _copy_left(self, length: int) -> None:
        with self._lock:
            self._copy_backlog -= length

    # -- files whose parts wait for their commit

    def leave_for_commit(self, file_id: str) -> None:
        """A part of the file was left for its commit: so are its other parts (``parts_wait_for_commit``)."""
        with self._lock:
            while len(self._left_for_commit) >= PENDING_UPLOADS * 16:
                del self._left_for_commit[next(iter(self._left_for_commit))]
            self._left_for_commit[file_id] = None

    def parts_wait_for_commit(self, file_id: str) -> bool:
        """Whether the file's stale parts are left for its commit (none is read or sent before)."""
        with self._lock:
            return file_id in self._left_for_commit

    def commit_takes_parts(self, file_id: str) -> None:
        """The file's commit runs: no part of it is left any more (it sends or copies them all)."""
        with self._lock:
            self._left_for_commit.pop(file_id, None)

    def sending(self, upload_id: str, digest: str | None, length: int) -> None:
        """A part with ``digest`` is about to be sent (not copied) for ``upload_id``.

        Recorded before the request, so that an equal part of a file written right
        after waits for this one (see the module's docstring) even while it is on the wire.
        """
        if digest is not None:
            with self._lock:
                self._sending_locked(upload_id, digest, length)

    def _sending_locked(self, upload_id: str, digest: str, length: int) -> None:
        if upload_id not in self._pending_by_upload:
            while len(self._pending_by_upload) >= PENDING_UPLOADS:
                self._drop_pending_locked(next(iter(self._pending_by_upload)))
            self._pending_by_upload[upload_id] = []
        self._pending.setdefault((digest, length), upload_id)
        self._pending_by_upload[upload_id].append((digest, length))

    def _drop_pending_locked(self, upload_id: str) -> None:
        for entry in self._pending_by_upload.pop(upload_id, []):
            if self._pending.get(entry) == upload_id:
                del self._pending[entry]

    def send_begins(self) -> None:
        """A part send starts (the link's time per byte is measured from these, dedupcost.py)."""
        with self._lock:
            self.costs.sends.begin(time.monotonic())

    def send_ended(self, sent: int) -> None:
        """It ended, with ``sent`` bytes accepted (0: it failed)."""
        with self._lock:
            self.costs.sends.end(sent, time.monotonic())

    def count(self, sent: int = 0, copied: int = 0) -> None:
        """Bytes sent or copied (the metrics and ``s3ckptfs status``)."""
        with self._lock:
            self.bytes_sent += sent
            self.bytes_copied += copied
        if sent:
            self.metrics.part_bytes.labels("sent").inc(sent)
        if copied:
            self.metrics.part_bytes.labels("copied").inc(copied)

    @staticmethod
    def ranges_locked(file: StagedFile, count: int) -> list[tuple[int, int, str]] | None:
        """(start, length, digest) of the file's parts as about to be completed; None if one is unhashed."""
        ranges = []
        for number in range(1, count + 1):
            part = file.upload.parts[number]
            if part.digest is None:
                return None
            ranges.append((partplan.part_range(number, file.part_base)[0], part.length, part.digest))
        return ranges

    def committed(self, key: str, etag: str, size: int, ranges: list[tuple[int, int, str]] | None,
                  upload_id: str) -> None:
        """Object ``key`` now is ``etag`` (completed from ``upload_id``): remember its part hashes
        (or forget what it was)."""
        if self.hashes is None:
            return
        if ranges:
            self.hashes.remember(key, etag, size, ranges)
        else:
            self.hashes.forget(key)
        with self._lock:  # after remembering: an equal part never finds neither
            self._drop_pending_locked(upload_id)
