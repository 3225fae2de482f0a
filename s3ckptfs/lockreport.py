"""What the lock-order checker saw: violations recorded in this process and in a log file.

locks.py finds violations; this module keeps them (``violations``,
``clear_violations``), appends each distinct one as a JSON line to the file
named by ``S3CKPTFS_LOCK_CHECK_LOG`` (daemons started by the tests inherit it),
and reads such a file back for the test fixtures (``read_log``). Its one lock
guards only its own records and is never taken on a hot path.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)


class LockOrderError(AssertionError):
    """A thread broke the lock order (raised only in strict mode, in the offending thread)."""


@dataclass(frozen=True)
class Violation:
    """One breach of the rules, as recorded."""

    thread: str
    rule: str                  # what happened, in words
    held: tuple[str, ...]      # names of the checked locks the thread held, in the order taken
    taking: str | None         # the lock being taken (or taken back after a wait), if any
    stack: str                 # the offending call site and a few callers

    def line(self) -> str:
        """One line of JSON, as appended to the S3CKPTFS_LOCK_CHECK_LOG file."""
        return json.dumps(asdict(self), sort_keys=True)

    def __str__(self) -> str:
        return (f"{self.rule} [thread {self.thread}; held: {', '.join(self.held) or 'nothing'}]\n"
                f"{self.stack.rstrip()}")


_report_lock = threading.Lock()    # the checker's own; guards the four below, never taken on the hot path
_violations: list[Violation] = []
_seen: set[tuple] = set()          # distinct violations already logged
_dropped = 0
MAX_RECORDED = 1000


def violations() -> list[Violation]:
    """Every violation recorded in this process so far (up to MAX_RECORDED)."""
    with _report_lock:
        return list(_violations)


def clear_violations() -> list[Violation]:
    """Forget the recorded violations; returns them."""
    global _dropped
    with _report_lock:
        found = list(_violations)
        _violations.clear()
        _seen.clear()
        _dropped = 0
        return found


def record(found: Violation, log_path: str | None) -> bool:
    """Keep ``found``; append it to ``log_path`` if it is the first of its kind. True if it is."""
    global _dropped
    site = (found.rule, found.held, found.taking, found.stack)
    with _report_lock:
        if len(_violations) < MAX_RECORDED:
            _violations.append(found)
        else:
            _dropped += 1
        first = site not in _seen
        _seen.add(site)
        if first and log_path:
            _append_line(log_path, found.line())
    return first


def _append_line(path: str, line: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot append to the lock check log %s: %s", path, exc)


def read_log(path: str | os.PathLike[str], offset: int = 0) -> list[dict]:
    """The violations a S3CKPTFS_LOCK_CHECK_LOG file holds from byte ``offset`` on (for test fixtures)."""
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            data = stream.read()
    except FileNotFoundError:
        return []
    found = []
    for raw in data.decode(errors="replace").splitlines():
        if raw.strip():
            try:
                found.append(json.loads(raw))
            except ValueError:
                found.append({"rule": raw})
    return found
