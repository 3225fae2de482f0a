"""Kept listings saved in the cache dir, so that a restarted daemon knows the directories it used.

``MetadataCache`` keeps the last listing of every directory this mount has
listed, looked up in or made, updated by every local change; while S3 is
away, lookups and listings are answered from them (``stale_if_error``). Kept
only in memory, they would be gone after a restart, and a daemon restarted
during an outage (upgrade, OOM, crash) could not even create a file in its
checkpoint directory. So they are written here, in the background, with the
wall-clock time S3 gave them: a new daemon loads them as listings of that age,
answering from them while S3 is away under the same rule, and asking S3
first when it answers.

Stored in SQLite (``listings.db`` in the cache dir, write-ahead log), one row
per (mount source, directory): a cache dir used for another prefix neither
answers for this one nor makes it look known. Bounded: at most
``max_dirs`` directories, the ones saved longest ago forgotten first, and a
listing of more than ``max_entries`` names is not kept (its directory is
listed again after a restart). A damaged file is started afresh: it is a
cache.

What a kill -9 can lose: the changes of the last ``interval`` seconds (0.5 s)
before it. Those are changes this mount made (a commit, an unlink, a rename);
pending ones are in the journal and shown again from it.

Thread-safe; its lock is a leaf of the lock order (locks.py). Never called with
the mount's or a file's lock held (the database may fsync).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from . import locks
from .metadata import DirInfo, ListingChange, MetadataCache
from .store import ObjectInfo

log = logging.getLogger(__name__)

DB_NAME = "listings.db"
DEFAULT_MAX_DIRS = 10_000
DEFAULT_MAX_ENTRIES = 100_000
_SCHEMA = 1


def encode(children: dict[str, object]) -> str:
    out = {}
    for name, entry in children.items():
        if isinstance(entry, DirInfo):
            out[name] = {"d": 1, "m": entry.mtime}
        elif isinstance(entry, ObjectInfo):
            out[name] = {"k": entry.key, "s": entry.size, "e": entry.etag, "m": entry.mtime, "o": entry.mode}
    return json.dumps(out, separators=(",", ":"))


def decode(text: str) -> dict[str, object]:
    children: dict[str, object] = {}
    for name, rec in json.loads(text).items():
        if rec.get("d"):
            children[name] = DirInfo(rec.get("m"))
        else:
            children[name] = ObjectInfo(key=rec["k"], size=int(rec["s"]), etag=rec.get("e", ""),
                                        mtime=float(rec["m"]), mode=rec.get("o"))
    return children


class KeptListings:
    """The kept listings of one mount source in ``path``; ``path`` None keeps nothing."""

    def __init__(self, path: Path | None, source: str, max_dirs: int = DEFAULT_MAX_DIRS,
                 max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.source = source
        self.max_dirs = max_dirs
        self.max_entries = max_entries
        self._path = path
        self._lock = locks.new_lock("listings")
        self._db = self._open() if path is not None else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush: Callable[[], None] = lambda: None

    def _open(self) -> sqlite3.Connection | None:
        assert self._path is not None
        try:
            return _connect(str(self._path))
        except sqlite3.DatabaseError as exc:
            log.warning("kept listings in %s unreadable (%s): starting afresh", self._path, exc)
            for suffix in ("", "-wal", "-shm"):
                Path(str(self._path) + suffix).unlink(missing_ok=True)
            try:
                return _connect(str(self._path))
            except sqlite3.Error as again:
                log.warning("kept listings disabled: %s", again)
                return None

    def load(self) -> Iterator[tuple[str, dict[str, object], float, str | None]]:
        """(directory, children, listed at, through) of every listing kept for this source."""
        if self._db is None:
            return
        try:
            with self._lock:
                rows = self._db.execute("SELECT directory, children, listed_at, through FROM listings "
                                        "WHERE source = ?", (self.source,)).fetchall()
        except sqlite3.Error as exc:
            log.warning("could not read the kept listings: %s", exc)
            return
        for directory, children, listed_at, through in rows:
            try:
                yield directory, decode(children), float(listed_at), through
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("kept listing of %s unreadable (%s): ignored", directory, exc)

    def save(self, changes: list[ListingChange]) -> None:
        """Write the changed listings (and drop the dropped ones)."""
        if self._db is None or not changes:
            return
        rows, gone = [], []
        now = time.time()
        for change in changes:
            if change.children is None or len(change.children) > self.max_entries:
                gone.append((self.source, change.directory))
            else:
                rows.append((self.source, change.directory, change.listed_at, change.through,
                             encode(change.children), now))
        try:
            with self._lock:
                db = self._db
                db.execute("BEGIN")
                try:
                    db.executemany("DELETE FROM listings WHERE source = ? AND directory = ?", gone)
                    db.executemany("INSERT OR REPLACE INTO listings VALUES (?, ?, ?, ?, ?, ?)", rows)
                    extra = db.execute("SELECT count(*) FROM listings").fetchone()[0] - self.max_dirs
                    if extra > 0:
                        db.execute("DELETE FROM listings WHERE rowid IN (SELECT rowid FROM listings "
                                   "ORDER BY saved_at LIMIT ?)", (extra,))
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            log.warning("could not save %d kept listing(s): %s", len(changes), exc)

    def start(self, meta: MetadataCache, interval: float = 0.5) -> None:
        """Load what is kept into ``meta``, then save its changes every ``interval`` seconds."""
        loaded = 0
        for directory, children, listed_at, through in self.load():
            meta.load_listing(directory, children, listed_at, through)
            loaded += 1
        if loaded:
            log.info("loaded %d kept listing(s) of %s from the cache dir", loaded, self.source)
        if self._db is None:
            return

        def run() -> None:
            while not self._stop.wait(interval):
                self.save(meta.take_changes())

        self._flush = lambda: self.save(meta.take_changes())
        self._thread = threading.Thread(target=run, name="s3ckptfs-listings", daemon=True)
        self._thread.start()

    def save_now(self) -> None:
        """Save what changed since the last save now (the background thread does so every interval)."""
        self._flush()

    def stop(self, flush: bool = True) -> None:
        """Stop saving; with ``flush``, save what changed last."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            if flush:
                self._flush()
        if self._db is not None:
            with self._lock:
                self._db.close()
                self._db = None


def knows(path: Path, source: str) -> bool:
    """Whether the kept listings at ``path`` hold any of ``source`` (without creating the file)."""
    if not path.is_file():
        return False
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return db.execute("SELECT 1 FROM listings WHERE source = ? LIMIT 1", (source,)).fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:
        return False


def _connect(target: str) -> sqlite3.Connection:
    db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, _SCHEMA):
        db.execute("DROP TABLE IF EXISTS listings")
    db.execute("CREATE TABLE IF NOT EXISTS listings (source TEXT NOT NULL, directory TEXT NOT NULL, "
               "listed_at REAL NOT NULL, through TEXT, children TEXT NOT NULL, saved_at REAL NOT NULL, "
               "PRIMARY KEY (source, directory))")
    db.execute(f"PRAGMA user_version={_SCHEMA}")
    db.execute("SELECT count(*) FROM listings").fetchone()  # a damaged file fails here, not later
    return db
