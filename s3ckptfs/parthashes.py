"""What the parts of the objects this node wrote hold: a SHA-256 per part, kept in the cache dir.

A part of a file about to be uploaded whose SHA-256 equals that of a byte range
of an object still in S3 under the same ETag can be built server-side
(UploadPartCopy) instead of being sent: see dedup.py. This module only
remembers, per object key, the ETag the object had when it was written here and
the hash of each of its parts, and answers "which ranges of which objects hold
bytes with this hash and length".

Why SHA-256: two parts are declared equal by their hashes alone, so an
accidental collision must be out of the question, which rules out CRC32C (the
per-part checksum S3 checks). Measured on this machine, over 8 MiB buffers:
SHA-256 0.60 s of CPU per GiB (the CPU's SHA instructions), SHA-1 0.59,
BLAKE2b 1.15, MD5 1.50, CRC32C 0.02. SHA-256 is as cheap as anything strong,
and much cheaper than sending the bytes.

Stored in SQLite (``parthashes.db``, write-ahead log): it survives restarts, a
crash or power loss at worst forgets the last objects remembered (never a torn
or wrong entry), and an entry is looked up by hash without reading the rest.
An entry is never trusted on its own: every copy is conditional on the
remembered ETag (If-Match), and the copied part's CRC32C is checked against the
local bytes. The store is bounded: beyond ``max_parts`` remembered parts, the
objects remembered longest ago are forgotten. A file that cannot be opened
(damaged, from an older format) is dropped and started afresh: it is a cache.

Thread-safe; its lock is a leaf of the lock order (locks.py). Callers must not
hold a file's or the mount's lock (the database may fsync).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from . import locks

log = logging.getLogger(__name__)

DB_NAME = "parthashes.db"
DEFAULT_MAX_PARTS = 200_000        # 1.6 TB of 8 MiB parts; about 30 MB on disk
_SCHEMA = 1


def part_digest(data: bytes | memoryview) -> str:
    """The strong hash two parts are compared by (hex SHA-256; releases the GIL on large buffers)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Source:
    """A byte range of an object in S3 (as it was under ``etag``) known to hold a part's bytes."""
    key: str
    etag: str
    start: int
    length: int


class PartHashes:
    """Part hashes of the objects written here, by key; ``path`` None keeps them in memory only."""

    def __init__(self, path: Path | None, max_parts: int = DEFAULT_MAX_PARTS) -> None:
        self.max_parts = max_parts
        self._lock = locks.new_lock("parthashes")
        self._path = path
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        target = ":memory:" if self._path is None else str(self._path)
        try:
            return self._connect(target)
        except sqlite3.DatabaseError as exc:
            assert self._path is not None
            log.warning("part hashes in %s unreadable (%s): starting afresh", self._path, exc)
            for suffix in ("", "-wal", "-shm"):
                Path(str(self._path) + suffix).unlink(missing_ok=True)
            return self._connect(target)

    @staticmethod
    def _connect(target: str) -> sqlite3.Connection:
        db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, _SCHEMA):
            db.executescript("DROP TABLE IF EXISTS objects; DROP TABLE IF EXISTS parts;")
        db.executescript("""
            CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, etag TEXT NOT NULL, size INTEGER NOT NULL,
                                                seq INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS parts (digest TEXT NOT NULL, length INTEGER NOT NULL, key TEXT NOT NULL,
                                              start INTEGER NOT NULL);
            CREATE INDEX IF NOT EXISTS parts_by_digest ON parts (digest, length);
            CREATE INDEX IF NOT EXISTS parts_by_key ON parts (key);
            CREATE INDEX IF NOT EXISTS objects_by_seq ON objects (seq);
        """)
        db.execute(f"PRAGMA user_version={_SCHEMA}")
        db.execute("SELECT count(*) FROM parts").fetchone()  # a damaged file fails here, not later
        return db

    def remember(self, key: str, etag: str, size: int, parts: list[tuple[int, int, str]]) -> None:
        """Object ``key`` is now ``etag`` (``size`` bytes) whose parts are ``(start, length, digest)``."""
        if not parts or len(parts) > self.max_parts:
            return
        try:
            with self._lock:
                db = self._db
                db.execute("BEGIN")
                try:
                    self._forget_locked(key)
                    seq = db.execute("SELECT coalesce(max(seq), 0) + 1 FROM objects").fetchone()[0]
                    db.execute("INSERT INTO objects VALUES (?, ?, ?, ?)", (key, etag, size, seq))
                    db.executemany("INSERT INTO parts VALUES (?, ?, ?, ?)",
                                   [(digest, length, key, start) for start, length, digest in parts])
                    self._bound_locked()
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            log.warning("could not remember the part hashes of %s: %s", key, exc)

    def find(self, digest: str, length: int, limit: int = 3) -> list[Source]:
        """Ranges holding bytes with this hash and length, the most recently written object first."""
        try:
            with self._lock:
                rows = self._db.execute(
                    "SELECT p.key, o.etag, p.start FROM parts p JOIN objects o ON o.key = p.key "
                    "WHERE p.digest = ? AND p.length = ? ORDER BY o.seq DESC LIMIT ?",
                    (digest, length, limit)).fetchall()
        except sqlite3.Error as exc:
            log.warning("part hash lookup failed: %s", exc)
            return []
        return [Source(key, etag, start, length) for key, etag, start in rows]

    def object_parts(self, key: str, etag: str) -> tuple[int, list[tuple[int, int, str]]] | None:
        """(size, [(start, length, digest)] ascending) of ``key`` if remembered as ``etag``, else None."""
        try:
            with self._lock:
                row = self._db.execute("SELECT size FROM objects WHERE key = ? AND etag = ?", (key, etag)).fetchone()
                if row is None:
                    return None
                parts = self._db.execute("SELECT start, length, digest FROM parts WHERE key = ? ORDER BY start",
                                         (key,)).fetchall()
        except sqlite3.Error as exc:
            log.warning("part hash lookup of %s failed: %s", key, exc)
            return None
        return row[0], [(start, length, digest) for start, length, digest in parts]

    def forget(self, key: str, etag: str | None = None) -> None:
        """Forget ``key`` (only if still remembered as ``etag``, when given): it changed or is gone."""
        try:
            with self._lock:
                row = self._db.execute("SELECT etag FROM objects WHERE key = ?", (key,)).fetchone()
                if row is None or (etag is not None and row[0] != etag):
                    return
                self._db.execute("BEGIN")
                self._forget_locked(key)
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            log.warning("could not forget the part hashes of %s: %s", key, exc)

    def known(self, key: str) -> tuple[str, int] | None:
        """(etag, size) remembered for ``key``, or None."""
        with self._lock:
            row = self._db.execute("SELECT etag, size FROM objects WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], row[1])

    def part_total(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM parts").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _forget_locked(self, key: str) -> None:
        self._db.execute("DELETE FROM parts WHERE key = ?", (key,))
        self._db.execute("DELETE FROM objects WHERE key = ?", (key,))

    def _bound_locked(self) -> None:
        total = self._db.execute("SELECT count(*) FROM parts").fetchone()[0]
        while total > self.max_parts:
            oldest = self._db.execute("SELECT key FROM objects ORDER BY seq LIMIT 1").fetchone()
            if oldest is None:
                return
            removed = self._db.execute("DELETE FROM parts WHERE key = ?", (oldest[0],)).rowcount
            self._db.execute("DELETE FROM objects WHERE key = ?", (oldest[0],))
            total -= removed
