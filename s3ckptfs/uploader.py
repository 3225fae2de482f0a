"""Write-back: eager part uploads in parallel, and commits one at a time in close order.

Two kinds of work, two kinds of threads:

* Part uploads run on a bounded pool (``upload_concurrency`` threads), see
  parts.py: eagerly while the file is written, and at commit time for every
  part that is missing or stale.
* Commits run on one thread, strictly in the order they were requested
  (``request_commit``, called from close/fsync). The commit of a file waits for
  its parts, then completes the multipart upload (or PUTs a small file). Since
  completion is what makes an object visible, objects appear in S3 in the order
  their files were closed, while the bytes of later files still flow in
  parallel. A ``latest`` pointer written after a checkpoint can never appear
  before the checkpoint does.

Failures: request-level retries are botocore's; a commit that still fails with
a transient error (5xx, SlowDown, timeouts, resets, the server away) is retried
with capped exponential backoff and jitter, for as long as ``retry_window``
allows (0: without limit), holding back the commits queued after it so the
order holds. A permanent error (AccessDenied, NoSuchBucket, bad credentials)
marks the file failed at once, keeps its data and journal record, and fails
the waiters with the cause; ``sync`` or a restart tries it again.

Files written through FUSE passthrough (docs/design.md) get their eager parts
from a guess (sequential writing), so before such a file's upload completes,
every part read while a writer may still have changed it is compared (CRC32C)
with the staging file's bytes, and uploaded again if they differ. A commit of
such a file whose bytes equal what its last commit put in S3 does nothing.

The last request of a commit (PUT or CompleteMultipartUpload) is lastrequest.py's.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from typing import Callable

from . import locks
from .cache import UploadRegistry
from .conditions import Conflict, is_conflict
from .dedup import Dedup
from .errors import S3Error
from .lastrequest import LastRequests
from .listener import CommitListener
from .metrics import Metrics
from .multipart import UploadedPart
from .parts import PartUploads
from .ptcheck import passthrough_unchanged, unverified_parts_locked, verify_parts
from .remoteops import RemoteOp
from .staging import StagedFile
from .store import ObjectStore
from .wholecopy import CopyRefused, WholeCopy


log = logging.getLogger(__name__)

BACKOFF_CAP = 30.0
# How long a delete or a move over a name waits for the old object's blocks that open handles
# still read (RemoteOp.readers_first): long enough for a checkpoint, short enough not to stall
# the queue behind it when S3 is slow.
READERS_FIRST_WAIT = 60.0


class Ticket:
    """The outcome of one commit: wait for it, then check ``error``."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.error: S3Error | None = None

    def finish(self, error: S3Error | None = None) -> None:
        self.error = error
        self._event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    @property
    def done(self) -> bool:
        return self._event.is_set()


@dataclass
class Commit:
    """One item of the ordered queue: a file's commit, or a namespace change (``op``) to make in S3.

    A file's commit is bound to the file's place in the order of changes when it was
    requested: a rename since then queues it again (``Uploader.requeue_commits``)."""
    file: StagedFile | None
    op: RemoteOp | None = None
    renames: int = 0  # the file's rename count when the commit was requested
    journaled: threading.Event | None = None  # a namespace change runs once this is set
    ticket: Ticket = field(default_factory=Ticket)
    attempts: int = 0
    requested: float = field(default_factory=time.monotonic)
    not_before: float = 0.0   # (monotonic) the commit thread does not start it earlier
    started: bool = False     # the commit thread has begun it


def default_backoff(attempt: int) -> float:
    """Seconds before retrying a failed commit: capped exponential, with jitter."""
    return min(BACKOFF_CAP, 0.5 * 2 ** min(attempt - 1, 10)) * random.uniform(0.5, 1.0)


class Uploader:
    """Schedules part uploads and ordered commits. Thread-safe."""

    def __init__(self, s3: ObjectStore, *, concurrency: int, single_put_limit: int,
                 listener: CommitListener, registry: UploadRegistry, upload_nice: int = 0,
                 eager_uploads: int | None = None, retry_window: float = 0.0, checksums: bool = True,
                 metrics: Metrics | None = None, backoff: Callable[[int], float] | None = None,
                 dedup: Dedup | None = None) -> None:
        self.s3 = s3
        self._backoff = backoff or default_backoff
        self.metrics = metrics or Metrics()
        self.checksums = checksums
        self.registry = registry
        self.retry_window = retry_window
        self.single_put_limit = single_put_limit
        self.parts = PartUploads(s3, concurrency=concurrency, single_put_limit=single_put_limit,
                                 eager_uploads=eager_uploads, registry=registry, checksums=checksums,
                                 upload_nice=upload_nice, backoff=self._backoff, dedup=dedup)
        self.whole_copy = WholeCopy(s3, self.parts.dedup, single_put_limit, self.parts.abort_later)
        self.last = LastRequests(s3, registry, self.parts.dedup, checksums, self.parts.abort_later)
        # The part side, as the core calls it.
        self.part_filled = self.parts.part_filled
        self.resume_upload = self.parts.resume_upload
        self.abort_later = self.parts.abort_later
        self._listener = listener
        self._lock = locks.new_lock("uploader")
        self._queue_changed = locks.new_condition(self._lock)
        self._queue: deque[Commit] = deque()
        self._stopping = False
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._commit_loop, name="s3ckptfs-commit", daemon=True)
        self._thread.start()
        self.objects_committed = 0
        self.bytes_committed = 0
        self._head_started = time.monotonic()   # when the commit at the head of the queue began
        self._answered_at = time.monotonic()    # when a commit or namespace change last succeeded

    # -- commits ---------------------------------------------------------------------

    def request_commit(self, file: StagedFile) -> Ticket:
        """Queue a commit of the file's current content (or join the one already queued)."""
        with self._lock:
            if self._stopping:
                ticket = Ticket()
                ticket.finish(S3Error("ShuttingDown", "the daemon is stopping"))
                return ticket
            for commit in self._queue:
                # Join a commit not yet started, and requested since the file's last rename (one
                # from before gives up when it starts: its waiters moved to the one queued after).
                if (commit.file is file and commit.attempts == 0 and file.commit_queued
                        and commit.renames == file.renames):
                    return commit.ticket
            with file.lock:
                file.queue_commit_locked()
                # A passthrough file committed before may be unchanged (fsync, then close): its
                # commit compares it first, and schedules the parts itself if it changed.
                may_be_unchanged = bool(file.pt_epoch) and file.committed_digest is not None
                if file.size > self.single_put_limit and not may_be_unchanged:
                    self.parts.schedule_stale_locked(file, defer=True)  # the remaining parts, in parallel
                commit = Commit(file, renames=file.renames)
            self._queue.append(commit)
            self._queue_changed.notify_all()
            return commit.ticket

    def requeue_commits(self, files: list[StagedFile]) -> None:
        """``files`` were renamed: their commits now write other keys, so they go to the back of the queue,
        in the order they had (a directory's marker ahead of what it holds).

        A commit is bound to the file's place in the order of the changes made on the mount
        (``Commit.renames``): changes queued since then may still concern the new key's earlier
        occupant (a move of it elsewhere, a delete), or the file's own object (moved to the new
        key), and must reach S3 first. Every commit of the files not yet started moves behind
        them, bound to the new key; one at the head gives up at its next step (``_commit_once``
        sees the rename) and hands its waiters to a commit queued behind them. Call without the
        files' locks, once the rename's own changes are queued."""
        moving = {id(file) for file in files}
        with self._lock:
            head = self._queue[0] if self._queue else None
            behind: list[Commit] = []
            if head is not None and head.file is not None and id(head.file) in moving:
                with head.file.lock:
                    if head.renames != head.file.renames:  # it ends QUEUED: one follows it
                        head.file.queue_commit_locked()
                        behind.append(Commit(head.file, renames=head.file.renames, ticket=head.ticket))
                        head.ticket = Ticket()  # its waiters now wait for the commit under the new key
            for commit in [c for c in list(self._queue)[1:] if c.file is not None and id(c.file) in moving]:
                self._queue.remove(commit)
                commit.renames = commit.file.renames  # set at renames, under the mount's lock the caller holds
                behind.append(commit)
            self._queue.extend(behind)
            self._queue_changed.notify_all()

    def request_op(self, op: RemoteOp, ticket: Ticket | None = None, journaled: threading.Event | None = None,
                   hold: float = 0.0) -> Ticket:
        """Queue a namespace change behind every commit requested so far. ``ticket``: the one its
        waiters already hold; ``journaled``: set once its journal record is written (it does
        not run before: a change made in S3 must be on disk to be made again after a crash).
        With ``hold``, it is not started for that many seconds (everything behind it waits too),
        so that ``cancel_op`` can still drop it."""
        with self._lock:
            commit = Commit(None, op, ticket=ticket or Ticket(), journaled=journaled,
                            not_before=time.monotonic() + hold if hold else 0.0)
            if self._stopping:  # journaled: made at the next start
                commit.ticket.finish(S3Error("ShuttingDown", "the daemon is stopping"))
                return commit.ticket
            self._queue.append(commit)
            self._queue_changed.notify_all()
            return commit.ticket

    def cancel_op(self, op: RemoteOp) -> bool:
        """Drop a queued namespace change that has not started; True if it was dropped."""
        with self._lock:
            for i, commit in enumerate(self._queue):
                if commit.op is op and not commit.started:
                    del self._queue[i]
                    commit.ticket.finish()
                    self._queue_changed.notify_all()
                    return True
        return False

    def stalled_for(self) -> float:
        """Seconds the ordered queue has waited on S3 without any answer (0 when nothing is queued):
        since the head commit began, or since S3 last accepted a part or a commit, if later."""
        with self._lock:
            if not self._queue:
                return 0.0
            since = max(self._head_started, self._answered_at, self.parts.answered_at)
        return max(0.0, time.monotonic() - since)

    def pending_ops(self) -> list[Commit]:
        with self._lock:
            return [commit for commit in self._queue if commit.op is not None]

    def pending_commits(self) -> list[Commit]:
        with self._lock:
            return list(self._queue)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no commit is queued or running. Returns False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._queue_changed.wait(remaining)
        return True

    def _commit_loop(self) -> None:
        while True:
            with self._lock:
                while True:
                    while not self._queue and not self._stop_event.is_set():
                        self._queue_changed.wait()
                    if not self._queue:
                        return
                    commit = self._queue[0]
                    held = commit.not_before - time.monotonic()
                    if held <= 0 or self._stop_event.is_set():
                        break
                    self._queue_changed.wait(held)  # a held change: it may be dropped meanwhile
                commit.started = True
                self._head_started = time.monotonic()
            error = self._run_op(commit) if commit.op is not None else self._commit_with_retries(commit)
            with self._lock:
                self._queue.popleft()
                self._queue_changed.notify_all()
            commit.ticket.finish(error)

    def _with_retries(self, commit: Commit, what: str, attempt: Callable[[], None],
                      retrying: Callable[[S3Error], None], give_up: Callable[[S3Error], None]) -> S3Error | None:
        """Run ``attempt`` until it succeeds; returns None, or the error it gave up on.

        A transient error is retried with capped exponential backoff for as long as
        ``retry_window`` allows, holding back everything queued behind it, so the order
        holds; ``retrying`` is told of each one. ``give_up`` is told of the last error.
        """
        started = time.monotonic()
        while True:
            commit.attempts += 1
            try:
                attempt()
                self._answered_at = time.monotonic()
                return None
            except S3Error as err:
                error = err
            except OSError as err:
                error = S3Error("LocalIOError", f"{what}: {err}")
            except Exception as err:
                log.exception("unexpected error: %s", what)
                error = S3Error("InternalError", repr(err))
            out_of_time = self.retry_window > 0 and time.monotonic() - started > self.retry_window
            if not error.transient or out_of_time or self._stop_event.is_set():
                give_up(error)
                return error
            delay = self._backoff(commit.attempts)
            if commit.attempts == 1 or commit.attempts % 10 == 0:
                log.warning("%s failed (%s); retrying (attempt %d, next in %.1fs)", what, error,
                            commit.attempts, delay)
            retrying(error)
            self._stop_event.wait(delay)

    def _run_op(self, commit: Commit) -> S3Error | None:
        """Make a namespace change in S3, retrying transient errors like a commit."""
        op = commit.op
        assert op is not None
        while commit.journaled is not None and not commit.journaled.wait(0.5):
            if self._stop_event.is_set():  # journaled by then or never shown: made at the next start
                return S3Error("ShuttingDown", "the daemon is stopping")
        if op.readers_first:
            _, late = futures_wait(op.readers_first, timeout=READERS_FIRST_WAIT)
            if late:
                log.warning("%s: %d block(s) for readers of the old object still downloading after %.0f s; "
                            "going on (they may fail with ESTALE)", op.label, len(late), READERS_FIRST_WAIT)
            op.readers_first = []

        def attempt() -> None:
            op.run(self.s3, copied=lambda etag: self._listener.op_copied(op, etag))
            # One line per namespace change made in S3, in close order: a user missing a file
            # can see when and why its key went.
            log.info("%s (%s) made in S3", op.label, ", ".join(op.describe()) or "no path shown")
            self._listener.op_done(op, None)

        def give_up(error: S3Error) -> None:
            if not self._stop_event.is_set():  # else journaled: made at the next start
                log.error("%s failed: %s", op.label, error)
                self._listener.op_done(op, error)

        return self._with_retries(commit, op.label, attempt, lambda error: None, give_up)

    def _own_earlier_version(self, file: StagedFile) -> bool:
        """A refused conditional commit: is the object there this node's own earlier write?

        A commit that landed just before the daemon died, or a move this node made, leaves the
        journal expecting what was there before. Such an object names a file of this node as its
        writer (file ids start with the cache dir's node id): the file now expects it, and the
        commit goes again. Conditions guard against other nodes; this node's writes are in order."""
        with file.lock:
            key, file_id = file.key, file.id
        try:
            info = self.s3.head(key)
        except S3Error:
            return False
        if info is None or info.writer.split("-", 1)[0] != file_id.split("-", 1)[0]:  # another node's
            return False
        with file.lock:
            if file.key == key:
                file.saw_own_version_locked(info.etag)
        log.info("%s: S3 holds its own earlier version (%s); committing over it", file.path, info.etag)
        return True

    def _commit_with_retries(self, commit: Commit) -> S3Error | None:
        file = commit.file
        assert file is not None
        with file.lock:
            refused = file.failure if is_conflict(file.failure) else None
        if refused is not None:
            return refused  # a conflict is never retried (conditions.py)

        def attempt() -> None:
            try:
                wrote = self._commit_once(file, commit.renames)
            except S3Error as error:
                with file.lock:
                    renamed = file.renames != commit.renames
                if is_conflict(error) and renamed:
                    # Refused for the key the file had before a rename made while the request was
                    # on its way: nothing of it was written; the commit queued behind the rename
                    # writes the new key, and its own condition decides there. (Reported as a
                    # conflict, the file was set aside under its new name: gone from the mount.)
                    log.info("%s: a commit under its old key was refused (%s); it commits under its "
                             "new key", file.path, error)
                    wrote = False
                elif is_conflict(error):
                    if self._own_earlier_version(file):
                        raise S3Error("PreconditionFailed", f"{file.path}: S3 holds this file's own earlier "
                                      "version (committed before a restart): committing again over it",
                                      transient=True) from error
                    with file.lock:
                        path, expected = file.path, file.expected
                    raise Conflict(path, expected, error) from error
                else:
                    raise
            if wrote:
                self.metrics.upload_seconds.observe(time.monotonic() - commit.requested)
            with file.lock:
                file.finish_commit_locked()
            self._listener.settled(file)

        def retrying(error: S3Error) -> None:
            with file.lock:
                file.retry_locked(error)

        def give_up(error: S3Error) -> None:
            self.metrics.upload_failures.inc()
            if is_conflict(error):  # never retried: the key holds what another writer put there since
                log.error("%s", error)
                with file.lock:
                    self.abort_later(file.upload.forget())
                    file.give_up_locked(error)
                    file.over_object = False  # the object there is not ours: an unlink here must not delete it
                self._listener.conflicted(file)
                return
            log.error("upload of %s failed, data kept in the cache: %s", file.path, error)
            with file.lock:
                file.give_up_locked(error)

        return self._with_retries(commit, f"upload of {file.path}", attempt, retrying, give_up)

    def _commit_once(self, file: StagedFile, renames: int, try_copy: bool = True) -> bool:
        """Make S3 hold the file's current content under its key, or raise S3Error.

        Returns True if an object was written, False if there was nothing to do (also when
        the file was renamed since the commit was requested, ``renames`` ago: the commit
        queued behind the rename writes it).
        ``try_copy``: a file equal to an object written here is copied from it (wholecopy.py).
        """
        if file.pt_epoch:
            with file.lock:
                file.start_commit_locked()  # the commit thread works on it from here (finish ends it)
                # Parts the close sent on their way settle first: a file with a part in flight
                # does not retire, and nothing retires it once the part lands.
                file.changed.wait_for(lambda: not file.upload.inflight or file.deleted, timeout=5.0)
            unchanged = passthrough_unchanged(file, self.single_put_limit)
            if unchanged is not None:
                self._listener.committed(file, *unchanged)
                return False
        # A conditional commit is a PUT or a completion: the whole-file copy carries no condition.
        candidate = self.whole_copy.candidate(file) if try_copy and not file.conditional else None
        while True:
            unverified: list[tuple[int, UploadedPart]] = []
            with file.lock:
                file.start_commit_locked()
                if file.deleted or file.write_error is not None:
                    self.abort_later(file.upload.forget())
                    return False
                if file.renames != renames:
                    return False  # renamed: the commit queued behind the rename writes it
                if not file.dirty:
                    return False
                if file.size <= self.single_put_limit:
                    call = self.last.small_put_locked(file)
                    break
                if file.upload.id is not None and file.upload.for_key(file.key) is None:
                    self.abort_later(file.upload.forget())  # renamed: restart under the new key
                if candidate is not None and self.whole_copy.still_valid_locked(file, candidate):
                    call = self.whole_copy.begin_locked(file, candidate)
                    file.begin_send_locked()
                    break
                candidate = None
                stale = self.parts.schedule_stale_locked(file)
                if not stale and not file.upload.inflight:
                    unverified = unverified_parts_locked(file)
                    if not unverified:
                        file.upload.take_error()  # every part is in S3 now: an earlier failure is moot
                        call = self.last.complete_locked(file)
                        break
                else:
                    # Check early parts while the last ones upload, not after: it is CPU and
                    # page-cache reads that would otherwise add to the time until durable.
                    unverified = unverified_parts_locked(file)
                    if not unverified:
                        file.changed.wait_for(lambda: not file.upload.inflight or file.deleted, timeout=5.0)
                        error = file.upload.take_error() if not file.upload.inflight else None
                        if error is not None:
                            raise error
            if unverified:
                verify_parts(file, unverified)
        try:
            result = self.last.finish(file, call)
        except CopyRefused as refused:
            log.info("%s: %s; uploading it", file.path, refused)
            return self._commit_once(file, renames, try_copy=False)
        self.objects_committed += 1
        self.bytes_committed += file.size
        self.metrics.uploaded_objects.inc()
        self.metrics.uploaded_bytes.inc(file.size)
        self._listener.committed(file, result.key, result.etag, result.version)
        return True

    # -- lifecycle -------------------------------------------------------------------

    def shutdown(self, drain_timeout: float) -> bool:
        """Stop taking commits, wait up to ``drain_timeout`` for queued ones. True if all finished."""
        with self._lock:
            self._stopping = True
        drained = self.wait_idle(drain_timeout)
        self._stop_event.set()
        with self._lock:
            self._queue_changed.notify_all()
        self._thread.join(timeout=5)
        self.parts.shutdown(wait=drained)
        return drained

    def join(self, timeout: float) -> bool:
        """After ``shutdown``: wait for running part uploads and the commit thread. True if they stopped."""
        self.parts.shutdown(wait=True)
        self._thread.join(timeout)
        return not self._thread.is_alive()
