"""Pending namespace changes: deletes and moves of objects in S3, shown here at once, made there in order.

``queue`` journals a ``RemoteOp`` (remoteops.py), shows its outcome in the path
table (``gone``/``moved``) and queues it behind the commits requested so far.
``op_done`` is called by the uploader once S3 agrees: the table stops showing
the change (S3 answers for it now). An operation S3 refused for good stays
journaled and shown, is reported by ``status`` and ``sync``, and is tried again
by ``sync`` and at the next start; one refused by its condition (a conflict:
another node wrote the key since, remoteops.py) is set aside (conflicts.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from ..errors import S3Error
from ..metadata import MISSING, DirInfo
from ..remoteops import DELETE, MOVE, RemoteOp
from ..store import ObjectInfo
from ..staging import next_close_seq
from ..uploader import Ticket, Uploader
from ..conditions import Expected, is_conflict
from .conflicts import Conflicts
from .core import Core
from .table import under

log = logging.getLogger(__name__)


def entry_record(entry: object) -> dict:
    if isinstance(entry, DirInfo):
        return {"dir": True, "mtime": entry.mtime}
    assert isinstance(entry, ObjectInfo)
    return {"key": entry.key, "size": entry.size, "etag": entry.etag, "mtime": entry.mtime, "mode": entry.mode}


def entry_from_record(record: dict) -> ObjectInfo | DirInfo:
    if record.get("dir"):
        return DirInfo(record.get("mtime"))
    return ObjectInfo(key=record["key"], size=int(record["size"]), etag=record.get("etag", ""),
                      mtime=float(record["mtime"]), mode=record.get("mode"))


class PendingOps:
    """Queues namespace changes for S3 and shows them until they are made. Thread-safe."""

    def __init__(self, core: Core, uploader: Uploader, conflicts: Conflicts) -> None:
        self.core = core
        self.table = core.table
        self.uploader = uploader
        self.conflicts = conflicts
        # op id -> its outcome, from the moment the change is shown (mount's lock): a sync that
        # comes between show and submit waits for it instead of reporting it missing.
        self._tickets: dict[str, Ticket] = {}
        self._journaled: dict[str, threading.Event] = {}  # op id -> set once its record is on disk

    def queue(self, op: RemoteOp, shows: dict[str, object] | None = None) -> Ticket:
        """Show ``op``'s outcome here, journal it, and queue it for S3. Call without the mount's lock."""
        with self.table.lock:
            self.show_locked(op, shows)
        return self.submit(op)

    def show_locked(self, op: RemoteOp, shows: dict[str, object] | None = None, hold: float = 0.0) -> None:
        """The mount shows ``op``'s outcome from now on, and ``op`` takes its place in the uploader's
        order (mount's lock held): behind every change made on the mount before it, ahead of every
        change after. It runs once ``submit`` has journaled it, which must follow."""
        op.close_seq = next_close_seq()
        op.shows = {path: entry_record(entry) for path, entry in (shows or {}).items()}
        self._set_condition(op, resumed=False)
        self._show_locked(op)
        ticket = self._tickets[op.id] = Ticket()
        self._journaled[op.id] = journaled = threading.Event()
        self.uploader.request_op(op, ticket, journaled, hold)  # hold: see Uploader.request_op
        for path in op.hides:
            self.core.meta.settle(path, MISSING, tree=True)
        for path, entry in (shows or {}).items():
            self.core.meta.settle(path, entry)

    def submit(self, op: RemoteOp) -> Ticket:
        """Journal ``op`` (fsync: call without the mount's lock); the uploader may run it from then on."""
        with self.table.lock:
            ticket = self._tickets.get(op.id) or Ticket()
            journaled = self._journaled.pop(op.id, None)
        try:
            self.core.journal.write(op.id, op.record)  # read in turn: its condition may change meanwhile
        finally:
            if journaled is not None:
                journaled.set()  # also when the disk refused the record: S3 still gets the change
        with self.table.lock:
            dropped = op.id not in self.table.ops
        if dropped:  # cancelled meanwhile (cancel_delete_locked): never to be made, after a restart either
            self.core.journal.remove(op.id)
        return ticket

    def _show_locked(self, op: RemoteOp) -> None:
        table = self.table
        table.ops[op.id] = op
        op.object_moved = self._object_moved
        for path in op.hides:
            table.gone[path] = op
            # Paths shown under a new name at or below it (a directory renamed twice, its first
            # moves still pending) are removed again: they are not there any more.
            for shown in [p for p in table.moved if under(path, p)]:
                del table.moved[shown]
        for path, record in op.shows.items():
            table.moved[path] = (entry_from_record(record), op)

    def cancel_delete_locked(self, path: str, key: str) -> RemoteOp | None:
        """``key`` is about to be overwritten by a rename onto ``path`` (mount's lock held): a queued
        delete of it, not yet started, would only make the name vanish from S3 until then, so it
        is dropped. Returns it if it was. (libfuse unlinks a name that is open before a rename onto it.)"""
        op = self.table.gone.get(path)
        if (op is None or op.kind != DELETE or op.key != key or op.hides != (path,) or op.shows
                or not self.uploader.cancel_op(op)):
            return None
        del self.table.gone[path]
        self.table.ops.pop(op.id, None)
        self._tickets.pop(op.id, None)
        self.core.journal.remove(op.id)
        return op

    def op_copied(self, op: RemoteOp, etag: str = "") -> None:
        """Uploader listener: a move's destination holds the object, and its source is deleted next.

        S3 answers for the paths it shows from now on (with the copy's ETag): a reader opening
        one between the delete and ``op_done`` would otherwise be sent to a key that is gone
        (ENOENT), and one reading the source already follows to the destination.
        """
        with self.table.lock:
            self.core.objects.invalidate(op.dst)
            if op.kind == MOVE and etag:
                # The bytes cached for the object shown are the destination's: a truncate or an open
                # for writing of the new path takes them over, and readers passed through see it.
                # (Shown under another key than the source's: the object an earlier move of this
                # one brought to the source, gone from that key now.)
                for record in op.shows.values():
                    source = entry_from_record(record)
                    if isinstance(source, ObjectInfo) and source.etag:
                        self.core.objects.rename(source.key, source.etag, op.dst, etag)
            self._stop_showing_locked(op, etag)
            rewrite = self._expect_copy_locked(op, etag) if op.kind == MOVE and op.expect is not None else []
        for later in rewrite:  # journaled again (fsync: without the lock); made meanwhile, removed again
            self.core.journal.write(later.id, later.record)
            with self.table.lock:
                if later.id not in self.table.ops:
                    self.core.journal.remove(later.id)

    def _expect_copy_locked(self, op: RemoteOp, etag: str) -> list[RemoteOp]:
        """A file written over the path this move brought an object to, and a delete of it, expected
        what the move expected (``PathTable.expected_after_move_locked``): they now expect the copy,
        this node's write, which may name another writer (the source's). Returns the deletes."""
        before = Expected(op.dst, op.expect or "")
        deletes = [later for later in self.table.ops.values()
                   if later.kind == DELETE and later.key == op.dst and later.expect == op.expect]
        for later in deletes:
            later.expect = etag or None
        # A file there now was written after a delete queued behind this move, which removes the
        # copy before the file commits: it expects nothing there, as it did (rewritten, a restart's
        # conditional commit found the key empty and took its own file for a conflict).
        if any(later.kind == DELETE and later.key == op.dst for later in self.table.ops.values()):
            return deletes
        for path in op.shows:
            file = self.table.staged.get(path)
            if file is None:
                continue
            with file.lock:
                if file.key == op.dst and file.expected == before:
                    file.expected = Expected(op.dst, etag) if etag else None
        return deletes

    def _object_moved(self, source: ObjectInfo, key: str, etag: str) -> None:
        """A tree move put ``source`` under ``key`` (a copy with ``etag``): as for a move of one
        object (``op_copied``), its cached copy is that object's now."""
        if source.etag and etag:
            self.core.objects.rename(source.key, source.etag, key, etag)

    def _stop_showing_locked(self, op: RemoteOp, etag: str = "") -> None:
        """S3 answers for the paths ``op`` shows: the table stops showing them (mount's lock held).

        A moved object is shown with the copy's ``etag``: without it, a read of the path would
        take whatever its key holds when the read arrives, e.g. a newer file committed there
        after a second rename moved this one on."""
        table = self.table
        for path, record in op.shows.items():
            shown = table.moved.get(path)
            if shown is not None and shown[1] is op:
                del table.moved[path]
                entry = entry_from_record(record)
                if isinstance(entry, ObjectInfo) and op.dst:
                    copied = etag if op.kind == MOVE else ""  # a tree move copies many objects
                    entry = dataclasses.replace(entry, key=op.moved_key(entry.key), etag=copied)
                # S3 answers for it now; the kept listing stays whole.
                self.core.meta.settle(path, entry)

    def op_done(self, op: RemoteOp, error: S3Error | None) -> None:
        """Uploader listener: S3 now agrees with ``op`` (or refused it: then it stays shown and journaled,
        unless refused by its condition: then it is set aside)."""
        table = self.table
        with table.lock:
            if error is not None and is_conflict(error):
                self._set_aside_locked(op, error)
            elif error is not None:
                table.failed_ops[op.id] = str(error)
                return
        if error is not None:
            self.conflicts.mark_op_record(op, error)
            return
        with table.lock:
            table.ops.pop(op.id, None)
            table.failed_ops.pop(op.id, None)
            self._tickets.pop(op.id, None)
            if op.dst:
                self.core.objects.invalidate(op.dst)  # a copy made here of what the key held before
            for path in op.hides:
                if table.gone.get(path) is op:
                    del table.gone[path]
                # A listing taken before the change must not be merged after it (token).
                self.core.meta.settle(path, MISSING, tree=True)
            self._stop_showing_locked(op)
        self.core.journal.remove(op.id)

    def _set_aside_locked(self, op: RemoteOp, error: S3Error) -> None:
        """Refused by its condition: S3 answers for its paths again (the newer object at its
        destination, its source where it was), and the refusal is reported (conflicts.py)."""
        table = self.table
        table.ops.pop(op.id, None)
        table.failed_ops.pop(op.id, None)
        self._tickets.pop(op.id, None)
        for path in op.paths():
            if table.gone.get(path) is op:
                del table.gone[path]
            shown = table.moved.get(path)
            if shown is not None and shown[1] is op:
                del table.moved[path]
            self.core.meta.forget(path)
        self.core.objects.invalidate(op.dst or op.key)
        self.conflicts.op_refused_locked(op, error)

    def recover(self, record: dict) -> None:
        """A journaled operation an earlier run did not finish: show it and queue it again."""
        op = RemoteOp.from_record(record)
        self._set_condition(op, resumed=True)
        with self.table.lock:
            self._show_locked(op)
            self._tickets[op.id] = ticket = Ticket()
        self.uploader.request_op(op, ticket)
        log.info("resuming %s from the journal", op.label)

    def _set_condition(self, op: RemoteOp, resumed: bool) -> None:
        """Conditional as a commit would be (conditions.py): resumed from the journal, or every one
        with ``conditional_commits=all``."""
        mode = self.core.options.conditional_commits
        op.conditional = mode == "all" or (resumed and mode != "off")
        op.node_id = self.core.node_id

    def retry_failed(self, path: str = "/") -> list[tuple[RemoteOp, Ticket]]:
        """Queue again the given-up operations touching ``path``; returns them with their tickets."""
        with self.table.lock:
            again = [self.table.ops[op_id] for op_id in list(self.table.failed_ops) if op_id in self.table.ops]
            again = [op for op in again if any(under(path, p) for p in op.paths())]
            for op in again:
                del self.table.failed_ops[op.id]
                self._tickets[op.id] = Ticket()
            tickets = [(op, self._tickets[op.id]) for op in again]
        return [(op, self.uploader.request_op(op, ticket)) for op, ticket in tickets]

    def pending(self, path: str = "/") -> list[tuple[RemoteOp, Ticket | None]]:
        """Operations not yet made in S3 that touch ``path``, with their tickets (None: given up)."""
        with self.table.lock:
            ops = [(op, None if op.id in self.table.failed_ops else self._tickets.get(op.id))
                   for op in self.table.ops.values()]
        return [(op, ticket) for op, ticket in ops if path == "/" or any(under(path, p) for p in op.paths())]

    def status(self) -> list[dict]:
        """One row per pending operation, for ``s3ckptfs status``."""
        with self.table.lock:
            rows = [(op, self.table.failed_ops.get(op.id)) for op in self.table.ops.values()]
        now = time.time()
        return [{"path": (op.paths() or [op.key])[0], "key": op.key, "size": 0, "uploaded": 0,
                 "age": round(max(0.0, now - op.close_seq / 1e9), 1),  # close_seq is wall-clock ns
                 "state": "failed" if error else "pending", "error": error, "operation": op.label}
                for op, error in rows]
