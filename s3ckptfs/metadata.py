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
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass



@dataclass(frozen=True)
class DirInfo:
    mtime: float | None = None   # None: not known yet (implicit prefix, or marker not read)


MISSING = object()


class MetadataCache:
    """Path -> ObjectInfo | DirInfo | MISSING, with expiry. Thread-safe; its lock is a leaf."""

    def __init__(self, ttl: float, negative_ttl: float) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, object]] = {}
        self._listings: dict[str, tuple[float, dict[str, object]]] = {}
        self._generation = 0  # bumped by every local change

    def token(self) -> int:
        """Take before asking S3; pass to ``*_if_unchanged`` with the answer."""
        with self._lock:
            return self._generation

    def get(self, path: str) -> object | None:
        """The cached answer for ``path`` (ObjectInfo, DirInfo or MISSING), or None if unknown."""
        now = time.monotonic()
        with self._lock:
            hit = self._entries.get(path)
            if hit is not None:
                if hit[0] > now:
                    return hit[1]
                del self._entries[path]
            parent, _, name = path.rpartition("/")
            listing = self._listings.get(parent or "/")
            if listing is not None:
                if listing[0] > now:
                    return listing[1].get(name, MISSING)
                del self._listings[parent or "/"]
        return None

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
        ttl = self.negative_ttl if value is MISSING else self.ttl
        if ttl <= 0:
            return
        self._entries[path] = (time.monotonic() + ttl, value)
        parent, _, name = path.rpartition("/")
        listing = self._listings.get(parent or "/")
        if listing is not None:
            if value is MISSING:
                listing[1].pop(name, None)
            else:
                listing[1][name] = value

    def get_listing(self, directory: str) -> dict[str, object] | None:
        now = time.monotonic()
        with self._lock:
            listing = self._listings.get(directory)
            if listing is not None and listing[0] > now:
                return dict(listing[1])
        return None

    def put_listing(self, directory: str, children: dict[str, object], token: int) -> None:
        """Record a listing from S3, unless a local change happened since ``token``."""
        if self.ttl <= 0:
            return
        with self._lock:
            if token != self._generation:
                return
            self._listings[directory] = (time.monotonic() + self.ttl, dict(children))

    def forget(self, path: str) -> None:
        """Drop what is known of ``path`` and of its parent's listing."""
        with self._lock:
            self._generation += 1
            self._entries.pop(path, None)
            parent = path.rpartition("/")[0] or "/"
            self._listings.pop(parent, None)

    def forget_tree(self, path: str) -> None:
        """Drop ``path``, everything under it, and its parent's listing."""
        prefix = path.rstrip("/") + "/"
        with self._lock:
            self._generation += 1
            for cached in [p for p in self._entries if p == path or p.startswith(prefix)]:
                del self._entries[cached]
            for cached in [p for p in self._listings if p == path or p.startswith(prefix)]:
                del self._listings[cached]
            self._listings.pop(path.rpartition("/")[0] or "/", None)
