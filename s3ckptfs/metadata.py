"""What S3 said about paths, remembered for a short time.

Python and torch stat many names that do not exist (imports, ``os.path.exists``
before a save); ``ls -l`` stats every entry after a listing. Both would be one
S3 request each without this cache. Three kinds of answer are kept, each with
an expiry:

* a file (ObjectInfo from HEAD, or from a listing without metadata),
* a directory (a prefix with something under it, or a ``dir/`` marker object),
* "does not exist" (``negative_ttl``).

A fresh listing of a directory also answers lookups of its children: a name
absent from it does not exist. Local changes (create, unlink, rename, mkdir,
commits) update or drop entries immediately, so this mount always sees its own
writes; other writers are seen after at most ``metadata_ttl`` seconds.

An answer from S3 is stored only if no local change happened while it was on
its way (``token`` / ``*_if_unchanged``): a LIST that started before a commit
must not overwrite what the commit recorded.

Listings are also kept past their TTL, for ``stale_if_error`` seconds, as the
last known state of a directory: when S3 errors or does not answer in time,
lookups and listings of that directory are answered from it (``get_stale``,
``get_stale_listing``). Local changes keep updating it (``put``), and a forgotten
name only makes it no longer fresh; a directory this mount created starts with
an empty listing (``put_created_dir``), so files can be created in it while S3
is away.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from . import locks



@dataclass(frozen=True)
class DirInfo:
    mtime: float | None = None   # None: not known yet (implicit prefix, or marker not read)


MISSING = object()


class MetadataCache:
    """Path -> ObjectInfo | DirInfo | MISSING, with expiry. Thread-safe; its lock is a leaf."""

    def __init__(self, ttl: float, negative_ttl: float, stale_if_error: float = 0.0) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_if_error = stale_if_error
        self._lock = locks.new_lock("metadata")
        self._entries: dict[str, tuple[float, float, object]] = {}  # path -> (fresh until, kept until, value)
        # directory -> [fresh until, usable as a stale answer until, children]
        self._listings: dict[str, list] = {}
        self._generation = 0  # bumped by every local change

    def token(self) -> int:
        """Take before asking S3; pass to ``*_if_unchanged`` with the answer."""
        with self._lock:
            return self._generation

    def get(self, path: str) -> object | None:
        """The cached answer for ``path`` (ObjectInfo, DirInfo or MISSING), or None if unknown."""
        now = time.monotonic()
        with self._lock:
            hit = self._entry_locked(path, now)
            if hit is not None and hit[0] > now:
                return hit[2]
            parent, _, name = path.rpartition("/")
            listing = self._listing_locked(parent or "/", now)
            if listing is not None and listing[0] > now:
                return listing[2].get(name, MISSING)
        return None

    def _entry_locked(self, path: str, now: float) -> tuple[float, float, object] | None:
        hit = self._entries.get(path)
        if hit is not None and hit[0] <= now and hit[1] <= now:
            del self._entries[path]
            return None
        return hit

    def _listing_locked(self, directory: str, now: float) -> list | None:
        """The listing kept for ``directory`` (fresh or stale), dropped once past both."""
        listing = self._listings.get(directory)
        if listing is not None and listing[0] <= now and listing[1] <= now:
            del self._listings[directory]
            return None
        return listing

    def get_stale(self, path: str) -> object | None:
        """The last known answer for ``path``, however old (within stale_if_error): ObjectInfo,
        DirInfo or MISSING from its parent's listing; else what was last seen of the path itself
        (never "does not exist" without a listing); None if nothing is known."""
        now = time.monotonic()
        parent, _, name = path.rpartition("/")
        with self._lock:
            listing = self._listing_locked(parent or "/", now)
            if listing is not None:
                return listing[2].get(name, MISSING)
            hit = self._entry_locked(path, now)
            return hit[2] if hit is not None and hit[2] is not MISSING else None

    def get_stale_listing(self, directory: str) -> dict[str, object] | None:
        """The last known listing of ``directory`` with local changes (within stale_if_error), or None."""
        with self._lock:
            listing = self._listing_locked(directory, time.monotonic())
            return dict(listing[2]) if listing is not None else None

    def put_created_dir(self, directory: str) -> None:
        """This mount created ``directory``: it is known to be empty."""
        with self._lock:
            self._generation += 1
            now = time.monotonic()
            self._listings[directory] = [now + self.ttl, now + max(self.ttl, self.stale_if_error), {}]

    def put(self, path: str, value: object) -> None:
        """Record a local change (or a fact this mount established itself)."""
        with self._lock:
            self._generation += 1
            self._put_locked(path, value)

    def put_if_unchanged(self, path: str, value: object, token: int) -> None:
        """Record an answer from S3, unless a local change happened since ``token``."""
        with self._lock:
            if token == self._generation:
                self._put_locked(path, value)

    def _put_locked(self, path: str, value: object) -> None:
        self._note_locked(path, value)
        ttl = self.negative_ttl if value is MISSING else self.ttl
        kept = 0.0 if value is MISSING else self.stale_if_error
        if ttl > 0 or kept > 0:
            now = time.monotonic()
            self._entries[path] = (now + ttl, now + max(ttl, kept), value)

    def _note_locked(self, path: str, value: object) -> None:
        """Apply a local change to the parent's kept listing, fresh or stale."""
        parent, _, name = path.rpartition("/")
        listing = self._listings.get(parent or "/")
        if listing is not None:
            if value is MISSING:
                listing[2].pop(name, None)
            else:
                listing[2][name] = value

    def note(self, path: str, value: object) -> None:
        """Record the outcome of a local change in the kept listing only (it may be stale now)."""
        with self._lock:
            self._generation += 1
            self._note_locked(path, value)

    def get_listing(self, directory: str) -> dict[str, object] | None:
        now = time.monotonic()
        with self._lock:
            listing = self._listing_locked(directory, now)
            if listing is not None and listing[0] > now:
                return dict(listing[2])
        return None

    def put_listing(self, directory: str, children: dict[str, object], token: int) -> None:
        """Record a listing from S3, unless a local change happened since ``token``."""
        if self.ttl <= 0 and self.stale_if_error <= 0:
            return
        with self._lock:
            if token != self._generation:
                return
            now = time.monotonic()
            self._listings[directory] = [now + self.ttl, now + max(self.ttl, self.stale_if_error), dict(children)]

    def forget(self, path: str) -> None:
        """Drop what is known of ``path``; its parent's listing is no longer fresh (kept as stale)."""
        with self._lock:
            self._generation += 1
            self._entries.pop(path, None)
            self._expire_locked(path.rpartition("/")[0] or "/")

    def _expire_locked(self, directory: str) -> None:
        listing = self._listings.get(directory)
        if listing is not None:
            listing[0] = 0.0

    def forget_tree(self, path: str) -> None:
        """Drop ``path``, everything under it, and its parent's listing."""
        prefix = path.rstrip("/") + "/"
        with self._lock:
            self._generation += 1
            for cached in [p for p in self._entries if p == path or p.startswith(prefix)]:
                del self._entries[cached]
            for cached in [p for p in self._listings if p == path or p.startswith(prefix)]:
                del self._listings[cached]
            self._expire_locked(path.rpartition("/")[0] or "/")
