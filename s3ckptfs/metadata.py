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
is away. A local change whose outcome is known (``settle``, ``drop``) keeps the
parent's listing fresh: it is applied to it, so the listing still says what S3
holds plus what this mount did.

A listing may be partial (the first page of a large directory): it then covers
the names up to its last entry (``through``), in S3's key order. A name past it
is not known to be absent, and ``readdir`` never takes a partial listing as the
directory's contents.

Kept listings can be saved and loaded (``take_changes``, ``load_listing``; see
listings.py) with the wall-clock time S3 gave them: a daemon restarted during an
outage answers from them under the same ``stale_if_error`` rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

from . import locks



@dataclass(frozen=True)
class DirInfo:
    mtime: float | None = None   # None: not known yet (implicit prefix, or marker not read)


MISSING = object()

# A kept listing: [fresh until, usable as a stale answer until, children, through, listed at (wall clock)]
FRESH, KEPT, CHILDREN, THROUGH, LISTED_AT = range(5)


class ListingChange(NamedTuple):
    """A kept listing as it is now (``children`` None: dropped), for saving it."""
    directory: str
    children: dict[str, object] | None
    listed_at: float
    through: str | None


def covers(through: str | None, name: str) -> bool:
    """Whether a listing that ends at ``through`` (None: complete) would hold ``name`` if it existed."""
    return through is None or name + "/" <= through


class MetadataCache:
    """Path -> ObjectInfo | DirInfo | MISSING, with expiry. Thread-safe; its lock is a leaf."""

    def __init__(self, ttl: float, negative_ttl: float, stale_if_error: float = 0.0) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_if_error = stale_if_error
        self._lock = locks.new_lock("metadata")
        self._entries: dict[str, tuple[float, float, object]] = {}  # path -> (fresh until, kept until, value)
        self._listings: dict[str, list] = {}  # directory -> a kept listing (FRESH, KEPT, ...)
        self._generation = 0  # bumped by every local change
        self._changed: set[str] = set()  # directories whose kept listing changed since take_changes

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
            if listing is not None and listing[FRESH] > now:
                return self._child_locked(listing, name)
        return None

    @staticmethod
    def _child_locked(listing: list, name: str) -> object | None:
        """What ``listing`` says of ``name``: its entry, MISSING if it covers the name, else None."""
        found = listing[CHILDREN].get(name)
        if found is not None:
            return found
        return MISSING if covers(listing[THROUGH], name) else None

    def _entry_locked(self, path: str, now: float) -> tuple[float, float, object] | None:
        hit = self._entries.get(path)
        if hit is not None and hit[0] <= now and hit[1] <= now:
            del self._entries[path]
            return None
        return hit

    def _listing_locked(self, directory: str, now: float) -> list | None:
        """The listing kept for ``directory`` (fresh or stale), dropped once past both."""
        listing = self._listings.get(directory)
        if listing is not None and listing[FRESH] <= now and listing[KEPT] <= now:
            del self._listings[directory]
            self._changed.add(directory)
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
                known = self._child_locked(listing, name)
                if known is not None:
                    return known
            hit = self._entry_locked(path, now)
            return hit[2] if hit is not None and hit[2] is not MISSING else None

    def get_stale_listing(self, directory: str) -> dict[str, object] | None:
        """The last known listing of ``directory`` with local changes (within stale_if_error), or None.
        It may be partial (``listing_complete``)."""
        with self._lock:
            listing = self._listing_locked(directory, time.monotonic())
            return dict(listing[CHILDREN]) if listing is not None else None

    def listing_complete(self, directory: str) -> bool:
        """Whether a kept listing of ``directory`` exists and holds all of it."""
        with self._lock:
            listing = self._listing_locked(directory, time.monotonic())
            return listing is not None and listing[THROUGH] is None

    def has_listing(self, directory: str) -> bool:
        """Whether any listing of ``directory`` is kept (fresh or stale, whole or partial)."""
        with self._lock:
            return self._listing_locked(directory, time.monotonic()) is not None

    def put_created_dir(self, directory: str) -> None:
        """This mount created ``directory``: it is known to be empty."""
        with self._lock:
            self._generation += 1
            self._new_listing_locked(directory, {}, None)

    def _new_listing_locked(self, directory: str, children: dict[str, object], through: str | None) -> None:
        now = time.monotonic()
        self._listings[directory] = [now + self.ttl, now + max(self.ttl, self.stale_if_error), children, through,
                                     time.time()]
        self._changed.add(directory)

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
                listing[CHILDREN].pop(name, None)
            else:
                listing[CHILDREN][name] = value
            self._changed.add(parent or "/")

    def note(self, path: str, value: object) -> None:
        """Record the outcome of a local change in the kept listing only (it may be stale now)."""
        with self._lock:
            self._generation += 1
            self._note_locked(path, value)

    def get_listing(self, directory: str) -> dict[str, object] | None:
        now = time.monotonic()
        with self._lock:
            listing = self._listing_locked(directory, now)
            if listing is not None and listing[FRESH] > now and listing[THROUGH] is None:
                return dict(listing[CHILDREN])
        return None

    def put_listing(self, directory: str, children: dict[str, object], token: int,
                    through: str | None = None) -> bool:
        """Record a listing from S3 (partial: up to ``through``), unless a local change happened
        since ``token``. True if recorded."""
        if self.ttl <= 0 and self.stale_if_error <= 0:
            return False
        with self._lock:
            if token != self._generation:
                return False
            self._new_listing_locked(directory, dict(children), through)
            return True

    def drop(self, path: str) -> None:
        """Forget the answer kept for ``path`` itself; its parent's listing stays fresh (a file staged
        here shadows what the listing says of it)."""
        with self._lock:
            self._generation += 1
            self._entries.pop(path, None)

    def settle(self, path: str, value: object, tree: bool = False) -> None:
        """A local change with a known outcome: ``path`` (and with ``tree`` everything below it) is
        forgotten, and its parent's listing, fresh or stale, learns ``value`` (MISSING: gone) and
        stays as fresh as it was."""
        prefix = path.rstrip("/") + "/"
        with self._lock:
            self._generation += 1
            self._entries.pop(path, None)
            if tree:
                for cached in [p for p in self._entries if p.startswith(prefix)]:
                    del self._entries[cached]
                for cached in [p for p in self._listings if p == path or p.startswith(prefix)]:
                    del self._listings[cached]
                    self._changed.add(cached)
            self._note_locked(path, value)

    def listings_below(self, path: str) -> dict[str, list]:
        """Copies of the listings kept for directory ``path`` and every directory below it."""
        prefix = path.rstrip("/") + "/"
        with self._lock:
            return {d: [*listing[:CHILDREN], dict(listing[CHILDREN]), *listing[CHILDREN + 1:]]
                    for d, listing in self._listings.items() if d == path or d.startswith(prefix)}

    def put_moved_listings(self, old: str, new: str, listings: dict[str, list]) -> None:
        """``listings_below(old)`` as the listings of the same directories under ``new``: stale (S3
        has not moved them yet), as whole or partial as they were."""
        with self._lock:
            self._generation += 1
            for directory, listing in listings.items():
                moved = new + directory[len(old):]
                self._listings[moved] = [0.0, *listing[KEPT:]]
                self._changed.add(moved)

    def take_changes(self) -> list[ListingChange]:
        """The kept listings changed (or dropped) since the last call, as they are now."""
        with self._lock:
            changed, self._changed = self._changed, set()
            found = []
            for directory in sorted(changed):
                listing = self._listings.get(directory)
                if listing is None:
                    found.append(ListingChange(directory, None, 0.0, None))
                else:
                    found.append(ListingChange(directory, dict(listing[CHILDREN]), listing[LISTED_AT],
                                               listing[THROUGH]))
            return found

    def load_listing(self, directory: str, children: dict[str, object], listed_at: float,
                     through: str | None) -> None:
        """A listing kept by an earlier run, given by S3 at ``listed_at`` (wall clock): fresh and kept
        for what is left of ``metadata_ttl`` and ``stale_if_error`` since then."""
        age = max(0.0, time.time() - listed_at)
        now = time.monotonic()
        if age >= max(self.ttl, self.stale_if_error):
            return
        with self._lock:
            if directory not in self._listings:
                self._listings[directory] = [now + self.ttl - age, now + max(self.ttl, self.stale_if_error) - age,
                                             dict(children), through, listed_at]

    def forget(self, path: str) -> None:
        """Drop what is known of ``path``; its parent's listing is no longer fresh (kept as stale)."""
        with self._lock:
            self._generation += 1
            self._entries.pop(path, None)
            self._expire_locked(path.rpartition("/")[0] or "/")

    def _expire_locked(self, directory: str) -> None:
        listing = self._listings.get(directory)
        if listing is not None:
            listing[FRESH] = 0.0

    def forget_tree(self, path: str) -> None:
        """Drop ``path``, everything under it, and its parent's listing."""
        prefix = path.rstrip("/") + "/"
        with self._lock:
            self._generation += 1
            for cached in [p for p in self._entries if p == path or p.startswith(prefix)]:
                del self._entries[cached]
            for cached in [p for p in self._listings if p == path or p.startswith(prefix)]:
                del self._listings[cached]
                self._changed.add(cached)
            self._expire_locked(path.rpartition("/")[0] or "/")
