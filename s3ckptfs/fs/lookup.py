"""Lookups and listings: what exists at a path, merged from S3's answers and this mount's own files.

Directories are prefixes: a directory exists if a ``dir/`` marker object exists
(mkdir makes one, so an empty directory survives) or if any key lies under it.
Files staged here (written, not yet committed) shadow what S3 says of their
path. Answers from S3 are cached by ``MetadataCache`` for a short TTL; an answer
is stored only if no local change happened while it was on its way.

S3 is asked with a deadline (``metadata_deadline``, see bounded.py). When it
errors or does not answer in time, a directory this mount has listed or created
is answered from its last known listing merged with this mount's own files, for
up to ``stale_if_error`` seconds: a name absent from it does not exist, so a new
checkpoint can be created while S3 is away. A directory never listed here still
fails with EIO, after a longer bound: a resume during an outage must never read
"S3 unreachable" as "no checkpoint".
"""

from __future__ import annotations

import dataclasses
import errno
import logging

from ..errors import FsError, S3Error
from ..metadata import MISSING, DirInfo
from ..remoteops import MOVE_TREE
from ..store import ObjectInfo
from ..staging import StagedFile
from .bounded import BoundedRequests, Outage
from .core import DIR_MODE, FILE_MODE, SYMLINK_MAX, Core, Stat, parent_of, s3_errno

# Without a kept listing to answer from, a lookup waits this many deadlines (30 s by default)
# before EIO: long enough for the S3 client's retries through a storm of 503s.
NO_FALLBACK_DEADLINES = 15

log = logging.getLogger(__name__)


class Lookup:
    """Answers lookups, getattr and readdir. Thread-safe."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.table = core.table
        self.meta = core.meta
        self.requests = BoundedRequests(core.options.metadata_deadline)
        # The second request of a lookup, sent beside the first on a pool of its own (a lookup
        # waiting on a thread of ``requests`` must never wait for a free thread of that pool).
        self.side_requests = BoundedRequests(core.options.metadata_deadline)
        self.outage = Outage(core.metrics.stale_answers.inc)

    def _ask(self, what: str, request, can_fall_back: bool):
        """``request()`` within the deadline (longer when there is nothing to fall back on).

        During an outage, a lookup with a kept answer does not wait at all; a probe in
        the background notices when S3 is back.
        """
        if can_fall_back and self.outage.active:
            self.requests.probe(request, self.outage.answered)
            raise S3Error("Timeout", f"{what}: S3 is unreachable", transient=True)
        deadline = self.requests.deadline * (1 if can_fall_back else NO_FALLBACK_DEADLINES)
        result = self.requests.call(what, request, deadline)
        self.outage.answered()
        return result

    def _fall_back(self, what: str, err: S3Error, answer: object | None) -> object:
        """The kept answer when S3 failed transiently; else the error, as the caller's errno."""
        if answer is None or not err.transient:
            raise s3_errno(err, what) from err
        self.outage.fell_back(what, err)
        return answer

    def lookup(self, path: str, attempts: int = 3) -> ObjectInfo | DirInfo | None:
        """What exists at ``path`` in S3 (or staged here): ObjectInfo, DirInfo or None."""
        if path == "/":
            return DirInfo(self.core.mount_time)
        with self.table.lock:
            known, local = self._local_locked(path)
            if known and not _maybe_symlink(local):
                return local
            staged_children = self.table.live_below_locked(path)
        if known:  # shown by a pending move, from a listing that does not tell a symlink from a file
            return self._with_mode(path, local)  # type: ignore[arg-type]
        cached = self._kept(path)
        if cached is None and self._list_first(parent_of(path), path):
            cached = self._kept(path)
        if cached is MISSING:
            return DirInfo(max(f.mtime for f in staged_children)) if staged_children else None
        if cached is not None:
            return cached  # type: ignore[return-value]
        key = self.core.key_for(path)
        token = self.meta.token()
        store = self.core.store

        def ask() -> tuple[ObjectInfo | None, bool, ObjectInfo | None, float | None]:
            # HEAD of the name and LIST below it at once: a name that does not exist yet (every
            # new checkpoint's) costs one round trip, not two. The LIST is wasted on a file.
            below = self.side_requests.start(lambda: store.dir_summary(key + "/"))
            info = store.head(key)
            if info is not None:
                return info, True, None, None
            exists, has_marker, newest = below.result()
            return None, exists, store.head(key + "/") if has_marker else None, newest

        try:
            info, exists, marker, newest = self._ask(f"lookup {path}", ask, self.meta.get_stale(path) is not None)
        except S3Error as err:
            # What is known now (a file may have been committed and retired while S3 was asked).
            with self.table.lock:
                known, local = self._local_locked(path)
                if known:
                    return local
                stale = self.meta.get_stale(path)
                if stale is MISSING and self.table.live_below_locked(path):
                    stale = DirInfo(max(f.mtime for f in self.table.live_below_locked(path)))
            answer = self._fall_back(f"lookup {path}", err, stale)
            return None if answer is MISSING else answer  # type: ignore[return-value]
        if info is not None:
            self.meta.put_if_unchanged(path, info, token)
            return info
        if exists:
            # A directory's mtime is its creation time, kept in its marker (mkdir makes one,
            # rename carries it over): directories sort in creation order, across remounts,
            # as checkpoint rotation needs. Without a marker (made by another tool): the
            # newest of its entries.
            if marker is not None:
                mtime: float | None = marker.mtime
            else:
                mtimes = [t for t in [newest, *(f.mtime for f in self.table.live_below(path))] if t is not None]
                mtime = max(mtimes) if mtimes else None
            result = DirInfo(mtime)
            self.meta.put_if_unchanged(path, result, token)
            return result
        with self.table.lock:
            staged = self.table.get(path)
            if staged is not None and not staged.deleted:
                return staged_info(staged)
            shown = self.table.moved.get(path)
            if shown is not None:
                return shown[0]  # type: ignore[return-value]
            staged_children = self.table.live_below_locked(path)
            if staged_children:
                return DirInfo(max(f.mtime for f in staged_children))
            # A file committed (and retired from the staged table) while we asked S3 would
            # be in neither answer: if anything changed meanwhile, ask again.
            changed = self.meta.token() != token
            if not changed:
                self.meta.put_if_unchanged(path, MISSING, token)
        if changed and attempts > 1:
            return self.lookup(path, attempts - 1)
        return None

    def with_etag(self, path: str, entry: ObjectInfo) -> ObjectInfo:
        """``entry`` with the ETag of the object its key holds now, when it has none (a path shown
        after a move made here: the copy's ETag is not known). A read must name the version it
        reads: a cached copy of an earlier object under the same key, still open elsewhere,
        would otherwise be taken for it. Unchanged if S3 does not answer."""
        if entry.etag:
            return entry
        try:
            info = self._ask(f"lookup {path}", lambda: self.core.store.head(entry.key), True)
        except S3Error:
            return entry
        if info is None or not info.etag:
            return entry
        return dataclasses.replace(entry, etag=info.etag, size=info.size)

    def _with_mode(self, path: str, shown: ObjectInfo) -> ObjectInfo:
        """``shown`` with its mode, from a HEAD of the key it is read from (as it is when S3 is away)."""
        try:
            info = self._ask(f"lookup {path}", lambda: self.core.store.head(shown.key), True)
        except S3Error:
            return shown
        return dataclasses.replace(shown, mode=info.mode) if info is not None else shown

    def locations(self, path: str) -> list[ObjectInfo]:
        """Where the bytes of file ``path`` may be in S3 now, most likely first: what a lookup
        answers, then, while a pending move shows the path, that move's source and destination
        keys (the object a move shows may itself still be on its way from an earlier move)."""
        self.meta.forget(path)
        entry = self.lookup(path)
        if not isinstance(entry, ObjectInfo):
            return []
        found = [entry]
        with self.table.lock:
            shown = self.table.moved.get(path)
        if shown is not None:
            moved, op = shown
            key = self.core.key_for(path)  # where the move puts it
            source = op.key + key[len(op.dst):] if op.kind == MOVE_TREE and key.startswith(op.dst) else op.key
            # The source holds the object shown, in its version; what the copy's ETag will be is
            # not known. (Unconditional at the source, a read could take a newer file committed
            # there after the move.)
            at_source = moved.etag if isinstance(moved, ObjectInfo) and moved.key == source else ""
            for place, etag in ((source, at_source), (key, "")):
                if place not in (entry.key, *(f.key for f in found)):
                    found.append(dataclasses.replace(entry, key=place, etag=etag))
        return found

    def _kept(self, path: str) -> object | None:
        """The answer kept for ``path`` that needs no request (ObjectInfo, DirInfo, MISSING), or None."""
        cached = self.meta.get(path)
        if isinstance(cached, ObjectInfo) and (cached.listed or (cached.mode is None and cached.size <= SYMLINK_MAX)):
            return None  # from a listing: HEAD tells its mtime and mode (a symlink or not)
        if isinstance(cached, DirInfo) and cached.mtime is None:
            return None  # from a listing: its own listing tells its mtime
        return cached

    def _list_first(self, directory: str, path: str) -> bool:
        """The first lookup in a directory with no kept listing lists it (one page); True if kept.

        From then on the directory answers for every name in it, present or absent, also
        while S3 is away. When the LIST fails, a lookup of ``path`` that has a kept answer
        goes on to use it; one that has none fails now, as its own request would have.
        """
        meta = self.meta
        if (meta.ttl <= 0 and meta.stale_if_error <= 0) or meta.has_listing(directory):
            return False
        with self.table.lock:
            if self.table.contents_known_locked(directory) or self.table.hidden_locked(directory):
                return False
        dir_key = self.core.dir_key(directory)
        for _attempt in range(3):
            token = meta.token()
            can_fall_back = meta.get_stale(path) is not None
            try:
                files, dirs, complete = self._ask(f"list {directory}", lambda: self.core.store.list_page(dir_key),
                                                  can_fall_back)
            except S3Error as err:
                if can_fall_back and err.transient:
                    return False
                raise s3_errno(err, f"lookup {path}") from err
            children = listing_children(dir_key, files, dirs)
            through = None if complete else max([f.key[len(dir_key):] for f in files] + [d + "/" for d in dirs])
            if meta.put_listing(directory, children, token, through):
                if through is not None:
                    log.info("%s: more entries than one LIST page; kept the first %d (names up to %r): "
                             "other names are looked up in S3", directory, len(children), through)
                return True
        return False

    def _local_locked(self, path: str) -> tuple[bool, ObjectInfo | DirInfo | None]:
        """(True, answer) if this mount's own state answers for ``path`` (mount's lock held)."""
        table = self.table
        staged = table.get(path)
        if staged is not None:
            return True, None if staged.deleted else staged_info(staged)
        made_here = table.dirs.get(path)
        if made_here is not None and not made_here.deleted:
            return True, DirInfo(made_here.mtime)
        shown = table.moved.get(path)
        if shown is not None:
            return True, shown[0]  # type: ignore[return-value]
        if table.hidden_locked(path) or table.contents_known_locked(parent_of(path)):
            # Removed here (S3 may still have it until its op runs), or in a directory made
            # here whose contents S3 cannot hold yet: only this mount's files are there.
            children = table.live_below_locked(path)
            return True, DirInfo(max(f.mtime for f in children)) if children else None
        return False, None

    def stat_of(self, path: str, entry: ObjectInfo | DirInfo) -> Stat:
        if isinstance(entry, DirInfo):
            return Stat(DIR_MODE, 0, entry.mtime if entry.mtime is not None else self.core.mount_time, nlink=2)
        mode = entry.mode if entry.mode is not None else FILE_MODE
        mtime = self.table.mtime_overrides.get(path, entry.mtime)
        return Stat(mode, entry.size, mtime)

    def getattr(self, path: str, fh: int | None = None) -> Stat:
        if fh is not None:
            handle = self.core.handles.get(fh)
            if handle.staged is not None:
                return self.stat_of(path, staged_info(handle.staged))
            if handle.remote is not None:
                return self.stat_of(path, handle.remote)
        entry = self.lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        return self.stat_of(path, entry)

    def check_parent_is_dir(self, path: str) -> None:
        parent = self.lookup(parent_of(path))
        if parent is None:
            raise FsError(errno.ENOENT, parent_of(path))
        if not isinstance(parent, DirInfo):
            raise FsError(errno.ENOTDIR, parent_of(path))

    def readdir(self, path: str) -> list[tuple[str, Stat | None]]:
        """Names in directory ``path`` with what is known of them (listing + staged files)."""
        children = self.children(path)
        prefix = "/" if path == "/" else path + "/"
        result = []
        for name, child in sorted(children.items()):
            result.append((name, self.stat_of(prefix + name, child) if child is not MISSING else None))
        return result

    def children(self, path: str) -> dict[str, object]:
        """Name -> ObjectInfo | DirInfo of directory ``path``: S3's listing merged with this mount's changes."""
        entry = self.lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if not isinstance(entry, DirInfo):
            raise FsError(errno.ENOTDIR, path)
        # The listing and the staged files must be one consistent view: a commit retires a
        # staged file (under the mount's lock) once it is in S3, so the S3 listing must be at
        # least as new as the last local change when the staged files are merged into it.
        dir_key = self.core.dir_key(path)
        children: dict[str, object] | None = None
        with self.table.lock:
            if self.table.contents_known_locked(path):  # made here, nothing else of it in S3
                children = self._merge_staged_locked(path, {})
        for _attempt in range(0 if children is not None else 5):
            with self.table.lock:
                cached = self.meta.get_listing(path)
                if cached is not None:
                    children = self._merge_staged_locked(path, cached)
                    break
                token = self.meta.token()
            listed, fresh = self._list(path, dir_key)
            with self.table.lock:
                if not fresh:  # S3 away: the kept listing as it is now (a commit may have updated it)
                    children = self._merge_staged_locked(path, self.meta.get_stale_listing(path) or listed)
                    break
                if self.meta.token() == token:  # no local change while we listed
                    self.meta.put_listing(path, listed, token)
                    children = self._merge_staged_locked(path, listed)
                    break
        if children is None:  # changes kept racing with the listing: list once more, then trust it
            listed, _ = self._list(path, dir_key)
            with self.table.lock:
                children = self._merge_staged_locked(path, listed)
        return children

    def known_children(self, path: str, fresh: bool = True) -> dict[str, object] | None:
        """Directory ``path``'s children as known here without a request (merged with local changes):
        from a complete listing (fresh only, unless ``fresh`` is False), or None."""
        with self.table.lock:
            if self.table.contents_known_locked(path):
                return self._merge_staged_locked(path, {})
            if fresh:
                listing = self.meta.get_listing(path)
            else:
                listing = self.meta.get_stale_listing(path) if self.meta.listing_complete(path) else None
            return None if listing is None else self._merge_staged_locked(path, listing)

    def _list(self, path: str, dir_key: str) -> tuple[dict[str, object], bool]:
        """The children S3 lists under ``dir_key``, and True; or the kept listing and False."""
        stale = self.meta.get_stale_listing(path)
        try:
            files, dirs = self._ask(f"list {path}", lambda: self.core.store.list_dir(dir_key), stale is not None)
        except S3Error as err:
            return self._fall_back(f"list {path}", err, stale), False  # type: ignore[return-value]
        return listing_children(dir_key, files, dirs), True

    def _merge_staged_locked(self, path: str, children: dict[str, object]) -> dict[str, object]:
        """``children`` plus the files staged under ``path`` (call with the mount's lock held)."""
        prefix = "/" if path == "/" else path + "/"
        table = self.table
        merged = {name: child for name, child in children.items() if not table.hidden_locked(prefix + name)}
        for moved_path, entry in table.moved_below_locked(path):
            name, sep, _ = moved_path[len(prefix):].partition("/")
            if not sep:
                merged[name] = entry
            elif not isinstance(merged.get(name), DirInfo):
                merged[name] = DirInfo(None)
        for staged_path, file in self.table.staged.items():
            if staged_path.startswith(prefix) and not file.deleted:
                name, sep, _ = staged_path[len(prefix):].partition("/")
                merged[name] = DirInfo(None) if sep else staged_info(file)
        for dir_path, marker in self.table.dirs.items():
            if dir_path.startswith(prefix) and not marker.deleted:
                name, sep, _ = dir_path[len(prefix):].partition("/")
                if sep or not isinstance(merged.get(name), DirInfo) or merged[name].mtime is None:
                    merged[name] = DirInfo(None if sep else marker.mtime)
        return merged


def _maybe_symlink(entry: object) -> bool:
    """An entry from a listing, small enough to be a symlink: only a HEAD tells."""
    return isinstance(entry, ObjectInfo) and entry.mode is None and entry.size <= SYMLINK_MAX


def listing_children(dir_key: str, files: list[ObjectInfo], dirs: list[str]) -> dict[str, object]:
    children: dict[str, object] = {}
    for info in files:
        name = info.key[len(dir_key):]
        if name:  # "" is this directory's own marker
            children[name] = dataclasses.replace(info, listed=True)
    for name in dirs:
        if name:
            children[name] = DirInfo(None)  # a prefix shadows an object of the same name
    return children


def staged_info(file: StagedFile) -> ObjectInfo:
    """What a staged file looks like to lookups (takes file.lock)."""
    with file.lock:
        if file.pt_writers:
            file.observe_locked()  # written behind the daemon's back: ask the staging file
        return ObjectInfo(key=file.key, size=file.size, etag="", mtime=file.mtime, mode=file.mode)
