"""Namespace changes made in S3 later, in close order: deletes and moves of objects already in S3.

Unlink, rmdir and rename of objects that are already in S3 take effect on the
mount at once; the S3 side is a ``RemoteOp`` journaled in the cache dir and
queued behind the commits requested before it, on the uploader's one ordered
commit thread. So a rotation that deletes an old checkpoint never waits for S3,
a delete never overtakes the commit of a file closed before it, and a restart
of the daemon runs what was pending, in the same order.

Until its operation has run, the mount shows the new state from the path table
(``hides``: paths that no longer exist here; ``shows``: paths that exist here
under a new name, with what a lookup answers for them).

Each operation is safe to run again after a crash: a delete of a missing key
succeeds; a move whose source is gone but whose destination exists is done.

A move or a delete of one object carries what this node knew of the key it
replaces or removes (``expect``, as a commit does: conditions.py), sent as a
condition when the operation is ``conditional`` (resumed after a restart, or
every one with ``conditional_commits=all``). Refused because another node wrote
the key since, it is a conflict: the newer object stays, the operation is not
retried. An object this node wrote itself (a copy that landed before a crash)
is no conflict: the operation goes on without the condition.
"""

from __future__ import annotations

import functools
import logging
import stat
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from .conditions import ABSENT, Conflict, Expected, is_conflict
from .errors import S3Error
from .s3client import object_metadata
from .store import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)

DELETE = "delete"
MOVE = "move"
MARKER = "marker"  # recreate a directory's marker under a new key, if there is one
MOVE_TREE = "move_tree"  # move everything S3 holds under a prefix, listed when the operation runs
DIR_MODE = stat.S_IFDIR | 0o755
_GONE_CODES = ("NoSuchKey", "NotFound", "404")


@dataclass
class RemoteOp:
    """One change to make in S3: delete ``key``; move ``key`` to ``dst`` (copy, then delete); or
    recreate the directory marker ``key`` as ``dst`` with its mtime (some servers, SeaweedFS
    among them, cannot copy a marker: they store it as a directory)."""

    kind: str
    key: str
    dst: str = ""
    size: int = 0
    hides: tuple[str, ...] = ()                           # mount paths gone until this has run
    shows: dict[str, dict] = field(default_factory=dict)  # mount path -> entry record, until this has run
    close_seq: int = 0
    id: str = field(default_factory=lambda: "op-" + uuid.uuid4().hex)
    expect: str | None = None   # MOVE: what dst held as this node last saw it; DELETE: key's ETag
    source_etag: str | None = None  # MOVE: the source's ETag as this node saw it
    conditional: bool = False   # send ``expect`` (set when queued or resumed; not journaled)
    node_id: str = ""           # objects written by this node are no conflict
    # A tree move tells of each object it moved: (the source as listed, its new key, the copy's ETag).
    object_moved: Callable[[ObjectInfo, str, str], None] | None = field(default=None, repr=False, compare=False)
    # Downloads of the object this deletes or replaces, for handles still reading it (its name
    # unlinked or renamed over): the change waits for them, a while (not journaled: after a
    # restart no handle is left).
    readers_first: list[Future] = field(default_factory=list, repr=False, compare=False)

    @property
    def label(self) -> str:
        return f"delete {self.key}" if self.kind == DELETE else f"{self.kind} {self.key} -> {self.dst}"

    def moved_key(self, key: str) -> str:
        """Where this operation moves ``key`` (an object it shows under a new name)."""
        if self.kind == MOVE_TREE and key.startswith(self.key):
            return self.dst + key[len(self.key):]
        return self.dst

    @property
    def path(self) -> str:
        """The mount path it is about, for reports: what it shows, else what it removes, else its key."""
        return next(iter(self.shows), None) or (self.hides[0] if self.hides else self.key)

    def paths(self) -> list[str]:
        return [*self.hides, *self.shows]

    def describe(self) -> list[str]:
        """What the change does to the mount's paths, for the log."""
        return [*(f"{path} removed" for path in self.hides), *(f"{path} shown" for path in self.shows)]

    def run(self, store: ObjectStore, copied: Callable[[str], None] | None = None) -> None:
        """Make the change in S3 (raises S3Error). A move calls ``copied(etag)`` once the destination
        holds the object, before the source is deleted: the mount then shows the destination, with
        the copy's ETag ("" if not known), so that no reader is sent to a key about to go and a
        read names the version it reads."""
        if self.kind == MOVE_TREE:
            move_tree(store, self.key, self.dst, self.object_moved)
            return
        if self.kind == MARKER:
            marker = store.head(self.key)
            if marker is not None:  # else an implicit directory: nothing to recreate
                mode = marker.mode if marker.mode and stat.S_ISDIR(marker.mode) else DIR_MODE
                store.put(self.dst, b"", object_metadata(marker.mtime, mode))
            return
        if self.kind == MOVE:
            try:
                etag = self._copy(store)
            except S3Error as err:
                present = store.head(self.dst) if err.code in _GONE_CODES else None
                if present is None:
                    raise
                etag = present.etag
                log.info("%s: source already gone and destination present (moved before a restart)", self.label)
            if copied is not None:
                copied(etag)
            self._delete(store, self.key, self.source_etag, source=True)
            return
        self._delete(store, self.key, self.expect)

    def _copy(self, store: ObjectStore) -> str:
        """The move's copy, conditional on the source and destination this node saw, if it is
        conditional; refused, a ``Conflict`` unless what is there is this node's own write (a copy
        that landed before a crash): then again without the conditions."""
        expect, source = (self.expect, self.source_etag) if self.conditional else (None, None)
        if expect is None and source is None:
            return store.copy(self.key, self.dst, self.size)
        try:
            return store.copy(self.key, self.dst, self.size, expect=expect, source_etag=source)
        except S3Error as err:
            if not is_conflict(err):
                raise
            at_source = store.head(self.key)
            if not self._as_known(store.head(self.dst), expect) or not (
                    at_source is None or self._as_known(at_source, source)):  # a source gone: moved already
                raise Conflict(self.path, Expected(self.dst, expect) if expect is not None else None, err,
                               f"this node's object stays under {self.key}") from err
            log.info("%s: what is there is this node's own; going on without conditions", self.label)
            return store.copy(self.key, self.dst, self.size)

    def _delete(self, store: ObjectStore, key: str, etag: str | None, source: bool = False) -> None:
        """Delete ``key`` if it still holds ``etag`` (when conditional) or this node's own write.
        Refused: a move's source written again by another node meanwhile is left alone (the
        move is made); a delete is a ``Conflict``."""
        if self.conditional and etag == ABSENT and not source:
            # Nothing was there but what a move of this node brings: only its own write may go.
            there = store.head(key)
            if there is None:
                return
            if not self._as_known(there, None, own_only=True):
                raise Conflict(self.path, Expected(key, ABSENT), S3Error("PreconditionFailed", key, 412),
                               "this node's delete is not made")
            store.delete(key)
            return
        etag = etag if self.conditional and etag else None
        try:
            store.delete(key, expect=etag)
            return
        except S3Error as err:
            if err.code in _GONE_CODES:
                return
            if not is_conflict(err):
                raise
            there = store.head(key)
            if there is None:
                return
            if not self._as_known(there, None, own_only=True):
                if source:
                    log.warning("%s: %s was written again by another writer meanwhile; left in place", self.label, key)
                    return
                raise Conflict(self.path, Expected(key, etag or ""), err, "this node's delete is not made") from err
        store.delete(key)

    def _as_known(self, there: ObjectInfo | None, known: str | None, own_only: bool = False) -> bool:
        """Whether ``there`` (None: no object) is what this node knew of its key (``known``: an
        ETag, ``ABSENT``, None for nothing known), or an object this node wrote."""
        if not own_only:
            if known is None:
                return True
            if there is None:
                return known == ABSENT
            if known != ABSENT and there.etag.strip('"') == known.strip('"'):
                return True
        return there is not None and bool(self.node_id) and there.writer.split("-", 1)[0] == self.node_id

    def record(self) -> dict:
        return {"op": self.kind, "id": self.id, "key": self.key, "dst": self.dst, "size": self.size,
                "hides": list(self.hides), "shows": self.shows, "close_seq": self.close_seq,
                **({"expect": self.expect} if self.expect is not None else {}),
                **({"source_etag": self.source_etag} if self.source_etag else {})}

    @classmethod
    def from_record(cls, record: dict) -> RemoteOp:
        return cls(kind=str(record["op"]), key=str(record["key"]), dst=str(record.get("dst", "")),
                   size=int(record.get("size", 0)), hides=tuple(record.get("hides", ())),
                   shows=dict(record.get("shows", {})), close_seq=int(record.get("close_seq", 0)),
                   id=str(record["id"]), expect=record.get("expect"), source_etag=record.get("source_etag"))


def move_tree(store: ObjectStore, src: str, dst: str,
              moved: Callable[[ObjectInfo, str, str], None] | None = None) -> None:
    """Move every object under prefix ``src`` to the same name under ``dst``, as a directory rename.

    For a directory whose content this mount did not know when it was renamed: what
    is there is listed now. Markers are recreated first (a directory keeps its
    creation time; some servers cannot copy a marker), then objects are moved, then
    the old markers deleted deepest first and the old directory's key once more at
    the end (some servers list an emptied folder until then). Safe to run again:
    what a first run moved is no longer under ``src``.
    """
    objects = [info for info in store.list_all(src)]
    dirs = {src}
    for info in objects:
        rest = info.key[len(src):]
        parts = rest.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            dirs.add(src + "/".join(parts[:depth]) + "/")
    for directory in sorted(dirs):
        RemoteOp(MARKER, directory, dst + directory[len(src):]).run(store)
    for info in objects:
        if not info.key.endswith("/"):
            key = dst + info.key[len(src):]
            copied = None if moved is None else functools.partial(moved, info, key)
            RemoteOp(MOVE, info.key, key, info.size).run(store, copied)
    for directory in sorted(dirs, reverse=True):
        store.delete(directory)
    log.info("moved %d object(s) under %s to %s", sum(1 for o in objects if not o.key.endswith("/")), src, dst)
