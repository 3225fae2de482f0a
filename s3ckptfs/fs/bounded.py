"""Metadata requests with a deadline: the FUSE path never rides the S3 client's whole retry budget.

A lookup or listing asks S3 through ``BoundedRequests.call``: the request runs
on a small pool of daemon threads, and the caller waits at most ``deadline``
seconds for it. Past that, the caller gets ``S3Error("Timeout")`` and answers
from what the mount knows (see lookup.py); the request itself goes on in the
background and its answer is dropped. The threads are daemon threads so that a
request hung on an unreachable server never holds up the daemon's exit.

``Outage`` counts and logs such fallbacks once per outage, not once per call.
While an outage lasts, lookups that can be answered from a kept listing do not
wait for S3 at all: one request at a time goes out as a probe (``probe``), and
the first answer from S3 ends the outage.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Callable, TypeVar

from .. import locks
from ..errors import S3Error

log = logging.getLogger(__name__)

T = TypeVar("T")


class BoundedRequests:
    """Runs store requests on daemon threads; callers wait for each at most a deadline."""

    def __init__(self, deadline: float, threads: int = 8, idle_exit: float = 30.0) -> None:
        self.deadline = deadline
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._probing = threading.Event()
        self._max_threads = threads
        self._idle_exit = idle_exit
        self._threads = 0          # started and not exited
        self._idle = 0             # of which waiting for work
        self._count_lock = locks.new_lock("requests")

    def _submit(self, future: Future, call: Callable[[], object]) -> None:
        """Queue a call; start a thread for it if none is idle (up to the limit). Threads exit when idle."""
        with self._count_lock:
            start = self._idle == 0 and self._threads < self._max_threads
            if start:
                self._threads += 1
        self._work.put((future, call))
        if start:
            threading.Thread(target=self._serve, name="s3ckptfs-meta", daemon=True).start()

    def _serve(self) -> None:
        while True:
            with self._count_lock:
                self._idle += 1
            try:
                item = self._work.get(timeout=self._idle_exit)
            except queue.Empty:
                item = None  # idle long enough: exit (a sentinel None from shutdown does the same)
            with self._count_lock:
                self._idle -= 1
                if item is None:
                    if not self._work.empty() and self._idle_exit > 0.01:
                        continue  # work came in as it timed out, counted on this thread
                    self._threads -= 1
                    return
            future, call = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(call())
            except BaseException as exc:  # handed to the waiting caller
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Let idle threads go now (a request still hanging ends with the process or its timeout)."""
        self._idle_exit = 0.01
        with self._count_lock:
            waiting = self._idle
        for _ in range(waiting):
            self._work.put(None)

    def start(self, request: Callable[[], T]) -> Future:
        """Send ``request`` now on a thread of this pool; its Future holds the answer or the error."""
        future: Future = Future()
        self._submit(future, request)
        return future

    def call(self, what: str, request: Callable[[], T], deadline: float | None = None) -> T:
        """``request()``'s result, or its S3Error, or S3Error("Timeout") after ``deadline`` seconds."""
        limit = self.deadline if deadline is None else deadline
        future: Future = Future()
        self._submit(future, request)
        try:
            return future.result(timeout=limit)
        except FutureTimeout:
            future.cancel()
            raise S3Error("Timeout", f"{what}: no answer from S3 within {limit:g}s", transient=True) from None


    def probe(self, request: Callable[[], object], on_answer: Callable[[], None]) -> None:
        """Send ``request`` in the background unless a probe is already out; ``on_answer`` if S3 answers."""
        if self._probing.is_set():
            return
        self._probing.set()

        def run() -> None:
            try:
                request()
            except S3Error:
                return
            finally:
                self._probing.clear()
            on_answer()

        self._submit(Future(), run)


class Outage:
    """Counts answers given from kept listings while S3 fails; logs the start and end of each outage."""

    def __init__(self, on_fallback: Callable[[], None] | None = None) -> None:
        self._lock = locks.new_lock("outage")
        self._since: str | None = None
        self._started = 0.0
        self._on_fallback = on_fallback
        self.fallbacks = 0

    @property
    def active(self) -> bool:
        """S3 failed a request and has not answered one since."""
        return self._since is not None

    def begin(self, reason: str) -> None:
        """S3 is known not to answer (the daemon's start-up check): no lookup waits for it."""
        with self._lock:
            if self._since is None:
                self._since, self._started = reason, time.time()
        log.warning("S3 is not answering (%s): lookups and listings of directories this mount knows are "
                    "answered from their kept listings; new files are kept here until S3 is back", reason)

    def status(self) -> dict[str, object]:
        with self._lock:
            if self._since is None:
                return {"answering": True}
            return {"answering": False, "since": round(self._started, 3), "error": self._since,
                    "answered_from_kept_listings": self.fallbacks}

    def fell_back(self, what: str, err: S3Error) -> None:
        with self._lock:
            self.fallbacks += 1
            first = self._since is None
            if first:
                self._since, self._started = str(err), time.time()
        if self._on_fallback is not None:
            self._on_fallback()
        if first:
            log.warning("S3 is not answering (%s): lookups and listings of directories this mount knows are "
                        "answered from their last known listing; new files are kept here until S3 is back",
                        err)

    def answered(self) -> None:
        if self._since is None:
            return
        with self._lock:
            was, self._since = self._since, None
        if was is not None:
            log.warning("S3 answers again; %d lookup(s) were answered from kept listings meanwhile",
                        self.fallbacks)
