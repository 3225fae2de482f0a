"""The lock order of s3ckptfs, written once, and a run-time check of it.

Every lock of the package is made here, by the name of its row in ``ORDER``:
``new_lock("file")``, ``new_rlock("mount")``, ``new_condition(lock)``. The table
is the only statement of the lock order; module docstrings and docs/design.md
point here instead of repeating it.

The order, outermost first::

    mount -> uploader -> journal -> file -> leaves

    mount     PathTable.lock (fs/table.py), the mount's lock: the path table
              (staged files and directories, lost files, pending namespace
              changes, mtime overrides, versions seen at open) and the
              passthrough fields of cached copies
    uploader  Uploader._lock (+ _queue_changed): the commit queue
    journal   StagedFile.journal_lock: one file's journal record being written
              (held across its fsync, so never under the mount's or a file's lock)
    file      StagedFile.lock (+ changed): every field of one staged file
    leaves    parts, parthashes, listings, dedup, requests, outage, passthrough.holders, room,
              close_seq, metadata, objects, handles, watch.timers, linkproxy: each guards one
              small structure

The rules:

1. **Rank only goes up.** While a thread holds a lock of rank r it may take only
   locks of a higher rank. Two locks of the same rank (two files' locks) are
   never held at once, unless the rank's row says ``nests`` and why. A leaf is
   the end of the line: nothing is taken while a leaf is held.
2. **Re-entry only where the row says so, and why.** Taking again a re-entrant
   lock the thread already holds is always allowed, wherever it is on the
   thread's stack: it cannot block. Taking again a plain lock it holds is a
   self-deadlock, reported as such.
3. **Nothing slow under the mount's lock or a file's lock**: no S3 request, no
   fsync, no wait for another thread. Prepare under the lock, do the slow thing
   without it, record the outcome under it (the commit's last request does so,
   see uploader.py). ``assert_no_locks_held`` checks this at every S3 request
   (s3client.py calls it) and in ``fsync``; a ``wait`` on a condition checks it
   for every lock held besides the condition's own, and so does ``wait_for``
   when called, whether or not it then has to wait (whether it waits is a race).
4. **A wait gives back only its own lock.** While a thread waits on a
   condition, the other locks it holds stay held, so taking the condition's
   lock back after the wait must itself be in order: waiting on ``file.changed``
   while holding a leaf is reported before the wait begins.
5. A non-blocking ``acquire(blocking=False)`` is not checked against the order
   (it cannot wait, so it cannot deadlock); it is recorded as held.

Events (``threading.Event``), futures and the executors' own locks are not in
the table; waiting on them is waiting for another thread, which rule 3 forbids
under the mount's or a file's lock: call ``assert_no_locks_held("...")`` before
such a wait.

Checking is off by default, and then the factories return plain ``threading``
primitives: production pays nothing. With ``S3CKPTFS_LOCK_CHECK=1`` in the
environment when this module is imported (the test suite sets it, and every
daemon the tests start inherits it), or after ``enable()``, they return
wrappers that keep, per thread, the stack of checked locks held, and check each
acquisition and wait against the table. The bookkeeping is thread-local; the
only lock the checker takes is the one that guards the list of violations.

A violation is recorded (``violations()``: thread, rule broken, locks held, a
short stack), logged at ERROR once per distinct site, appended as one JSON line
to the file named by ``S3CKPTFS_LOCK_CHECK_LOG`` if set, and raised as
``LockOrderError`` in the offending thread only in ``strict`` mode (the
in-process tests). In a FUSE daemon an exception from a FUSE thread would reach
the caller as a strange errno, so the daemon logs and goes on; the test fixtures
fail a test whose daemon wrote to that file. Code that catches ``Exception`` may
swallow a raised LockOrderError; the record stays, and the fixtures look at it.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

from . import lockreport
# What the checker saw is kept in lockreport.py; these names are part of this module's interface.
from .lockreport import LockOrderError, Violation, clear_violations, read_log, violations  # noqa: F401

log = logging.getLogger(__name__)

ENV_CHECK = "S3CKPTFS_LOCK_CHECK"
ENV_LOG = "S3CKPTFS_LOCK_CHECK_LOG"

T = TypeVar("T")


@dataclass(frozen=True)
class LockKind:
    """One row of the lock order: every lock made with this name has this rank."""

    name: str
    rank: int                  # outermost first; a lock may be taken only under locks of lower rank
    where: str                 # the lock(s) of this kind in the code
    guards: str                # what it protects
    reentrant: bool = False    # made with new_rlock; ``why`` says why it must be
    nests: bool = False        # several locks of this kind may be held at once; ``why`` says in what order
    why: str = ""


LEAF = 90

ORDER: tuple[LockKind, ...] = (
    LockKind("mount", 10, "PathTable.lock (fs/table.py)",
             "the path table (staged files and directories, lost files, pending namespace changes, mtime "
             "overrides, versions seen at open); CachedObject.backing_id and pt_handles",
             reentrant=True,
             why="PassthroughFiles.choose_locked, called when a handle opens (create, open) with the "
                 "mount's and the file's lock held, asks PathTable.staged_bytes(), which takes the "
                 "mount's lock again; the rooms call each other's *_locked helpers under it"),
    LockKind("uploader", 20, "Uploader._lock, with the condition Uploader._queue_changed",
             "the commit queue (commits and namespace changes), the stopping flag"),
    LockKind("journal", 25, "StagedFile.journal_lock",
             "writing one file's journal record: the record written last is the newest (held across the "
             "record's fsync, which is why it ranks above the file's lock and is never taken under it)"),
    LockKind("file", 30, "StagedFile.lock, with the condition StagedFile.changed",
             "every field of one staged file; changed: a part or a commit request finished"),
    LockKind("parts", LEAF, "PartUploads._lock (parts.py)", "the eager-upload slots and their waiting list"),
    LockKind("parthashes", LEAF, "PartHashes._lock (parthashes.py)",
             "the SQLite connection holding the part hashes of objects written here"),
    LockKind("listings", LEAF, "KeptListings._lock (listings.py)",
             "the SQLite connection holding the kept listings saved in the cache dir"),
    LockKind("dedup", LEAF, "Dedup._lock (dedup.py)",
             "the bytes of parts sent and copied; parts sent for uploads not yet complete; the copy lane; "
             "the measured rates (auto)"),
    LockKind("linkproxy", LEAF, "TokenBucket._lock, LinkProxy._lock (linkproxy.py, the benchmark's link)",
             "a direction's byte balance; the proxy's open sockets"),
    LockKind("requests", LEAF, "BoundedRequests._count_lock (fs/bounded.py)", "its thread counts"),
    LockKind("outage", LEAF, "Outage._lock (fs/bounded.py)", "whether S3 is answering, and the fallback count"),
    LockKind("passthrough.holders", LEAF, "PassthroughFiles._holders_lock",
             "kernel backing ids: holders, the file of each id, the id of each file"),
    LockKind("room", LEAF, "Core.room (fs/core.py; a condition with a lock of its own)",
             "nothing but the wait: writers held back by cache_size wait on it for staged data to leave"),
    LockKind("close_seq", LEAF, "staging._close_seq_lock", "the last close sequence number handed out"),
    LockKind("metadata", LEAF, "MetadataCache._lock", "TTL entries, listings and the change generation"),
    LockKind("objects", LEAF, "ObjectCache._lock, with the condition ObjectCache._progress",
             "the cached copies, their blocks in flight and the bytes cached"),
    LockKind("handles", LEAF, "HandleTable._lock", "the open-file table"),
    LockKind("watch.timers", LEAF, "Watcher._lock", "the settle timer of each closed file (watch mode)"),
)

KINDS: dict[str, LockKind] = {kind.name: kind for kind in ORDER}

# Rule 3: no S3 request, fsync or wait for another thread while holding one of these.
NO_SLOW_CALLS_UNDER: tuple[str, ...] = ("mount", "file")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_checking = _env_on(ENV_CHECK)
_strict = False
_log_path: str | None = os.environ.get(ENV_LOG) or None

_tls = threading.local()           # .held: list of CheckedLock, in the order taken (re-entries repeated)


# -- switching ---------------------------------------------------------------------------

def enable(*, strict: bool | None = None, log_path: str | None = None) -> None:
    """Check locks made from now on; ``strict`` also raises LockOrderError at each violation."""
    global _checking, _strict, _log_path
    _checking = True
    if strict is not None:
        _strict = strict
    if log_path is not None:
        _log_path = log_path or None


def disable() -> None:
    """Make plain locks from now on (locks already made keep checking) and stop raising."""
    global _checking, _strict
    _checking = False
    _strict = False


def is_enabled() -> bool:
    return _checking


def is_strict() -> bool:
    return _strict


# -- factories ---------------------------------------------------------------------------

def _kind(name: str, reentrant: bool) -> LockKind:
    kind = KINDS.get(name)
    if kind is None:
        raise ValueError(f"lock {name!r} is not in the lock order (s3ckptfs/locks.py ORDER)")
    if kind.reentrant != reentrant:
        made, row = ("new_rlock", "not re-entrant") if reentrant else ("new_lock", "re-entrant")
        raise ValueError(f"lock {name!r} made with {made}, but its row in ORDER says it is {row}")
    return kind


def new_lock(name: str) -> threading.Lock | CheckedLock:
    """A lock of the row ``name``: ``threading.Lock`` unless checking is on."""
    kind = _kind(name, reentrant=False)
    if not _checking:
        return threading.Lock()
    return CheckedLock(kind, threading.Lock())


def new_rlock(name: str) -> threading.RLock | CheckedLock:
    """A re-entrant lock of the row ``name`` (its row must say why): ``threading.RLock`` unless checking is on."""
    kind = _kind(name, reentrant=True)
    if not _checking:
        return threading.RLock()
    return CheckedLock(kind, threading.RLock())


def new_condition(lock: threading.Lock | threading.RLock | CheckedLock,
                  ) -> threading.Condition | CheckedCondition:
    """A condition over ``lock`` (made by new_lock or new_rlock): checked if the lock is."""
    if isinstance(lock, CheckedLock):
        return CheckedCondition(lock)
    return threading.Condition(lock)


# -- the checked primitives ---------------------------------------------------------------

def _held() -> list[CheckedLock]:
    try:
        return _tls.held
    except AttributeError:
        _tls.held = held = []
        return held


class CheckedLock:
    """A lock whose every blocking acquisition is checked against ORDER.

    Must be released by the thread that took it (as every lock of the package is).
    """

    __slots__ = ("kind", "_inner")

    def __init__(self, kind: LockKind, inner: threading.Lock | threading.RLock) -> None:
        self.kind = kind
        self._inner = inner

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        held = _held()
        if blocking and held:
            _check_acquire(self, held)
        if not self._inner.acquire(blocking, timeout):
            return False
        held.append(self)
        return True

    def release(self) -> None:
        self._inner.release()   # raises (and changes nothing) if not held
        held = _held()
        for index in range(len(held) - 1, -1, -1):
            if held[index] is self:
                del held[index]
                break

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def locked(self) -> bool:
        return self._inner.locked()

    def __repr__(self) -> str:
        return f"<CheckedLock {self.kind.name} {self._inner!r}>"


class CheckedCondition:
    """``threading.Condition`` over a CheckedLock; a wait drops the lock from the thread's stack and puts it back."""

    __slots__ = ("_lock", "_cond")

    def __init__(self, lock: CheckedLock) -> None:
        self._lock = lock
        self._cond = threading.Condition(lock._inner)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def notify(self, n: int = 1) -> None:
        self._cond.notify(n)

    def notify_all(self) -> None:
        self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        self._check()
        return self._wait(timeout)

    def wait_for(self, predicate: Callable[[], T], timeout: float | None = None) -> T:
        """As ``threading.Condition.wait_for``.

        Checked when called, even if ``predicate`` already holds and nothing is
        waited for: a wait that happens only in a race is still a wait.
        """
        self._check()
        deadline = None
        remaining = timeout
        result = predicate()
        while not result:
            if remaining is not None:
                if deadline is None:
                    deadline = time.monotonic() + remaining
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
            self._wait(remaining)
            result = predicate()
        return result

    def _check(self) -> None:
        held = _held()
        own = self._lock
        if own not in held:
            raise RuntimeError("cannot wait on un-acquired lock")
        if len(held) > 1:
            _check_wait(own, [lock for lock in held if lock is not own])

    def _wait(self, timeout: float | None) -> bool:
        held = _held()
        own = self._lock
        count = sum(1 for lock in held if lock is own)
        # The wait releases the lock completely (every level of an RLock) and takes it back:
        # the stack must say so meanwhile, or another check in this thread would see it held.
        held[:] = [lock for lock in held if lock is not own]
        try:
            return self._cond.wait(timeout)
        finally:
            held.extend([own] * count)

    def __repr__(self) -> str:
        return f"<CheckedCondition {self._lock.kind.name}>"


def _out_of_order(kind: LockKind, held: Iterable[CheckedLock]) -> CheckedLock | None:
    """The first held lock that ``kind`` may not be taken under, or None."""
    for other in held:
        rank = other.kind.rank
        if rank > kind.rank or (rank == kind.rank and not kind.nests):
            return other
    return None


def _check_acquire(lock: CheckedLock, held: list[CheckedLock]) -> None:
    kind = lock.kind
    if lock in held:   # identity: CheckedLock has no __eq__
        if kind.reentrant:
            return     # re-entry never blocks
        _violation(f"takes {kind.name} again while holding it: it is not re-entrant, "
                   f"so the thread would wait for itself", held, lock)
        return
    above = _out_of_order(kind, held)
    if above is not None:
        same = above.kind.rank == kind.rank
        _violation(f"takes {kind.name} (rank {kind.rank}) while holding {above.kind.name} (rank {above.kind.rank})"
                   + (": two locks of one rank at once" if same else ": out of order"), held, lock)


def _check_wait(own: CheckedLock, others: list[CheckedLock]) -> None:
    """Before a wait on ``own``'s condition: nothing slow-forbidden held, and ``own`` can be taken back in order."""
    if not others:
        return
    blocking = [lock.kind.name for lock in others if lock.kind.name in NO_SLOW_CALLS_UNDER]
    if blocking:
        _violation(f"waits on a condition of {own.kind.name} while holding {', '.join(blocking)}, "
                   f"which the wait does not release", others + [own], own)
    above = _out_of_order(own.kind, others)
    if above is not None:
        _violation(f"waits on a condition of {own.kind.name}, which it must take back after the wait while "
                   f"holding {above.kind.name} (rank {above.kind.rank}): out of order", others + [own], own)


# -- slow calls ------------------------------------------------------------------------------

def assert_no_locks_held(what: str, ranks: Iterable[str] = NO_SLOW_CALLS_UNDER) -> None:
    """Call before something slow (an S3 request, an fsync, a wait for another thread).

    A violation if this thread holds a checked lock of one of the rows ``ranks``
    (by default the mount's lock or a file's lock). One test of a module-level
    flag when checking is off.
    """
    if not _checking:
        return
    held = getattr(_tls, "held", None)
    if not held:
        return
    names = [lock.kind.name for lock in held if lock.kind.name in ranks]
    if names:
        _violation(f"{what} while holding {', '.join(dict.fromkeys(names))}", held, None)


def fsync(fd: int, ranks: Iterable[str] = NO_SLOW_CALLS_UNDER) -> None:
    """``os.fsync(fd)``, checked: never under the mount's lock or a file's lock (or ``ranks``)."""
    assert_no_locks_held("fsync", ranks)
    os.fsync(fd)


# -- what the checker saw -------------------------------------------------------------------

def held_locks() -> tuple[str, ...]:
    """Names of the checked locks this thread holds, in the order taken (for tests and debugging)."""
    return tuple(lock.kind.name for lock in getattr(_tls, "held", ()))


def _call_site() -> str:
    """A short stack from the first frame outside this module."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return "".join(traceback.format_stack(frame, limit=8))


def _violation(rule: str, held: Iterable[CheckedLock], taking: CheckedLock | None) -> None:
    if getattr(_tls, "reporting", False):
        return  # a violation while reporting one (a logging handler taking a checked lock): not twice
    _tls.reporting = True
    try:
        found = Violation(thread=threading.current_thread().name, rule=rule,
                          held=tuple(lock.kind.name for lock in held),
                          taking=taking.kind.name if taking is not None else None, stack=_call_site())
        first = lockreport.record(found, _log_path)
        if first:
            log.error("lock order violated: %s", found)
    finally:
        _tls.reporting = False
    if _strict:
        raise LockOrderError(str(found))


def describe() -> str:
    """The table as text, outermost first (for docs and debugging)."""
    lines = []
    for kind in ORDER:
        flags = [flag for flag, on in (("re-entrant", kind.reentrant), ("nests", kind.nests)) if on]
        label = f"{kind.name}{' (' + ', '.join(flags) + ')' if flags else ''}"
        rank = "leaf" if kind.rank == LEAF else str(kind.rank)
        lines.append(f"{rank:>4}  {label:<22} {kind.where}: {kind.guards}"
                     + (f" -- {kind.why}" if kind.why else ""))
    return "\n".join(lines)
