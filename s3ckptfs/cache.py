"""The cache directory: staging files, the journal, and the block cache of clean objects.

Layout of a cache dir::

    lock                 flock'd by the one daemon that owns this cache dir
    staging/<id>.data    the bytes of a file written through the mount, not yet in S3
    journal/<id>.json    a record per staged file that close() has returned for
    uploads/<hash>.json  every multipart upload started and not yet completed or aborted
    parthashes.db        SHA-256 of each part of the objects written here (with -o dedup=on; parthashes.py)
    objects/<hash>.data  sparse copies of S3 objects (downloaded blocks, or files
                         written here and since committed), keyed by key + ETag

Durability contract: a record is written (write to a temp name, fsync, rename,
fsync the directory) only after its staging file has been fsync'd, so a record
on disk always describes bytes that are on disk. Records are removed only after
S3 has confirmed the object. Staging files without a record belong to files
that were never closed successfully; they are discarded on start.

The one exception is ``local_sync=background``: close then writes the record
first, with ``data_synced: false`` and the kernel's boot id, and the staging
file is fsync'd just after, on a background thread, which then rewrites the
record with ``data_synced: true``. Until then the bytes are only in the page
cache: they survive the daemon dying, not the machine. A record that is still
unsynced and names another boot (``data_may_be_torn``) is never uploaded.
Records without these fields (older versions) were written after the fsync.

The object cache holds clean data only: it may be evicted at any time, least
recently used first, and is rebuilt from S3 on demand. It is not kept across
restarts (its index lives in memory).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import locks
from .errors import ConfigError

log = logging.getLogger(__name__)

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"


@functools.cache
def boot_id() -> str:
    """The kernel's id of this boot (random, new at every boot); '' if it cannot be read."""
    try:
        with open(BOOT_ID_PATH) as stream:
            return stream.read().strip()
    except OSError as exc:
        log.warning("cannot read the boot id (%s): a record not yet synced counts as lost at start", exc)
        return ""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        locks.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` durably: whoever reads the name sees the old bytes or the new, never a
    torn or empty file (a kill between create and write would otherwise leave one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        locks.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)


class CacheDir:
    """Owns the cache directory's layout and its lock."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.staging = self.root / "staging"
        self.journal_dir = self.root / "journal"
        self.objects = self.root / "objects"
        self.uploads = self.root / "uploads"
        self._lock_fd: int | None = None

    def node_id(self) -> str:
        """This cache dir's own id, made once: the node that writes through it (conditions.py: a
        node never takes its own earlier objects for another writer's)."""
        path = self.root / "node-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            node = uuid.uuid4().hex[:16]
            path.write_text(node + "\n")
            return node

    def prepare(self) -> None:
        """Create the layout and take the lock. Raises ConfigError if unusable or taken."""
        try:
            for path in (self.root, self.staging, self.journal_dir, self.objects, self.uploads):
                path.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write-probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"cache dir {self.root} is not writable: {exc.strerror or exc}") from None
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"cache dir {self.root} is in use by another s3ckptfs daemon (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        # Clean data is not indexed across restarts: start the object cache empty.
        shutil.rmtree(self.objects, ignore_errors=True)
        self.objects.mkdir(exist_ok=True)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def staging_path(self, file_id: str) -> Path:
        return self.staging / f"{file_id}.data"

    def disk_free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize



class UploadRegistry:
    """Multipart uploads this cache dir has started and not yet finished.

    An entry is written (and fsync'd) as soon as CreateMultipartUpload returns and
    removed once the upload is completed or aborted, so that after a crash the
    daemon aborts exactly its own leftovers and never another node's upload.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, upload_id: str) -> Path:
        return self.directory / (hashlib.sha256(upload_id.encode()).hexdigest()[:32] + ".json")

    def add(self, key: str, upload_id: str) -> None:
        write_atomically(self._path(upload_id), json.dumps({"key": key, "upload_id": upload_id}).encode())

    def remove(self, upload_id: str) -> None:
        try:
            os.unlink(self._path(upload_id))
        except FileNotFoundError:
            pass

    def load_all(self) -> list[tuple[str, str]]:
        found = []
        for path in self.directory.glob("*.json"):
            try:
                entry = json.loads(path.read_text())
                found.append((entry["key"], entry["upload_id"]))
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable upload record %s: %s", path, exc)
        return found


@dataclass
class CachedObject:
    """A sparse local copy of one version (key + ETag) of an S3 object."""

    key: str
    etag: str
    size: int
    path: Path
    block_size: int
    fd: int
    complete: bool = False
    present: set[int] = field(default_factory=set)
    inflight: dict[int, Future] = field(default_factory=dict)
    filled: dict[int, int] = field(default_factory=dict)  # in-flight block -> bytes from its start on disk
    readers: int = 0
    backing_id: int = 0        # FUSE passthrough of a complete copy (guarded by the mount's lock)
    pt_handles: int = 0        # open handles using that backing id
    detached: bool = False     # no longer in the cache: taken over by a writer as its staging file, or
                               # kept for the open handles of a file whose name is gone; fd closed at the end
    closed: bool = False       # ``fd`` is closed: its number may belong to another file now

    def block_count(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size

    def has_block(self, block: int) -> bool:
        return self.complete or block in self.present

    def cached_bytes(self) -> int:
        if self.complete:
            return self.size
        return sum(min(self.block_size, self.size - b * self.block_size) for b in self.present)


# A read waiting for bytes that S3 does not send fails (EIO) after this many seconds. The kernel
# retries a failed read-ahead with a read of its own, so a reader may see twice this.
READ_STALL_LIMIT = 12.0


class ObjectCache:
    """Clean object data on disk, bounded in bytes, evicted least recently used first.

    Downloads of the same block are shared: the first reader starts it, later
    readers wait on the same future. Lock order: ObjectCache._lock is a leaf
    (no other lock is taken while it is held).
    """

    COPIES_KEPT = 4096  # moves remembered for readers of a moved object's old version

    def __init__(self, directory: Path, block_size: int, limit_bytes: int) -> None:
        self.directory = directory
        self.block_size = block_size
        self.limit_bytes = limit_bytes
        self._lock = locks.new_lock("objects")
        self._progress = locks.new_condition(self._lock)   # a block grew or finished
        self._entries: OrderedDict[tuple[str, str], CachedObject] = OrderedDict()
        self._bytes = 0
        # (key, etag) -> the copy a move of this mount made of that object: a reader of the old
        # version reads on from it (same bytes), also when moves chain back to the same key.
        self._copies: OrderedDict[tuple[str, str], tuple[str, str]] = OrderedDict()

    def _new_path(self, key: str, etag: str) -> Path:
        # Unique per entry, so that a new entry never clobbers a file an old one still uses.
        digest = hashlib.sha256(f"{key}\0{etag}".encode()).hexdigest()[:32]
        return self.directory / f"{digest}-{uuid.uuid4().hex[:8]}.data"

    def adopt(self, key: str, etag: str, source: Path, size: int) -> bool:
        """Take a committed staging file as the complete cached copy of ``key``@``etag``.

        Returns False (and leaves ``source`` alone) if a copy of that version already exists.
        """
        with self._lock:
            if (key, etag) in self._entries:
                return False
            path = self._new_path(key, etag)
            os.rename(source, path)
            fd = os.open(path, os.O_RDWR)
            self._entries[(key, etag)] = CachedObject(key, etag, size, path, self.block_size, fd, complete=True)
            self._bytes += size
        self.evict()
        return True

    def acquire(self, key: str, etag: str, size: int) -> CachedObject:
        """The cached copy of ``key``@``etag`` (created empty if absent), pinned against eviction."""
        with self._lock:
            entry = self._entries.get((key, etag))
            if entry is None:
                path = self._new_path(key, etag)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                entry = CachedObject(key, etag, size, path, self.block_size, fd, complete=(size == 0))
                self._entries[(key, etag)] = entry
            else:
                self._entries.move_to_end((key, etag))
            entry.readers += 1
            return entry

    def release(self, entry: CachedObject) -> None:
        with self._lock:
            entry.readers -= 1
            self._close_if_done_locked(entry)  # the file itself now belongs to the writer, or is unlinked
        self.evict()

    @staticmethod
    def _close_fd_locked(entry: CachedObject) -> None:
        """Close the copy's descriptor once: a second close could close another file's, which took
        its number (a staging file then committed with the wrong bytes)."""
        if not entry.closed:
            entry.closed = True
            os.close(entry.fd)

    def _close_if_done_locked(self, entry: CachedObject) -> None:
        """A copy out of the cache is closed once nobody reads it and no download writes into it."""
        if entry.detached and entry.readers == 0 and not entry.inflight:
            self._close_fd_locked(entry)

    def take(self, key: str, etag: str, only_if: Callable[[CachedObject], bool]) -> CachedObject | None:
        """Remove the complete copy of ``key``@``etag`` from the cache, for a writer to use as is.

        Saves downloading what is already here. None unless it is complete, idle
        and ``only_if(entry)`` holds; its open readers keep their descriptor.
        """
        with self._lock:
            entry = self._entries.get((key, etag))
            if entry is None or not entry.complete or entry.inflight or not only_if(entry):
                return None
            del self._entries[(key, etag)]
            self._bytes -= entry.size
            entry.detached = True
            if entry.readers == 0:
                self._close_fd_locked(entry)
            return entry

    def detach(self, entry: CachedObject) -> None:
        """``entry`` is read by the open handles of a file whose name is gone (unlinked or replaced):
        it leaves the cache and stays theirs alone. The same bytes written again under that name
        have the same key and ETag but are another file: a truncate of that one, or a writer taking
        it over, must not change what these handles read."""
        with self._lock:
            if entry.detached or self._entries.get((entry.key, entry.etag)) is not entry:
                return
            del self._entries[(entry.key, entry.etag)]
            self._bytes -= entry.cached_bytes()
            entry.detached = True
            try:
                os.unlink(entry.path)  # its descriptor (and a passthrough backing file) keep the bytes
            except OSError as exc:
                log.warning("could not remove cached copy %s: %s", entry.path, exc)

    def fetch_block(self, entry: CachedObject, block: int, start: Callable[[CachedObject, int], Future]) -> Future | None:
        """A future for ``block`` of ``entry``: None if present, else the shared in-flight download."""
        with self._lock:
            if entry.has_block(block) or entry.closed:  # closed: out of the cache, nobody left to read it
                return None
            future = entry.inflight.get(block)
            if future is None:
                future = start(entry, block)
                entry.inflight[block] = future
            return future

    def block_progress(self, entry: CachedObject, block: int, nbytes: int) -> None:
        """The first ``nbytes`` of an in-flight ``block`` are on disk: readers of them may go on."""
        with self._lock:
            entry.filled[block] = nbytes
            self._progress.notify_all()

    def wait_for(self, entry: CachedObject, block: int, upto: int, download: Future,
                 stall_limit: float = READ_STALL_LIMIT) -> None:
        """Wait until ``block`` holds its first ``upto`` bytes; raises the download's error if it failed.

        A sequential reader follows the download as it streams, instead of waiting
        for the whole block (32 MiB by default) to arrive. If no byte of the block
        arrives for ``stall_limit`` seconds (S3 not answering), raises TimeoutError:
        the reader gets EIO instead of hanging with the S3 client's retries.
        """
        download.add_done_callback(self._wake_all)
        with self._lock:
            seen, since = entry.filled.get(block, 0), time.monotonic()
            while not (entry.has_block(block) or entry.filled.get(block, 0) >= upto or download.done()):
                self._progress.wait(1.0)
                now, filled = time.monotonic(), entry.filled.get(block, 0)
                if filled != seen:
                    seen, since = filled, now
                elif now - since > stall_limit:
                    raise TimeoutError(f"no bytes of {entry.key} from S3 for {stall_limit:g}s")
            if entry.has_block(block) or entry.filled.get(block, 0) >= upto:
                return
        download.result()  # raises what failed; a success has marked the block present

    def _wake_all(self, _: Future) -> None:
        with self._lock:
            self._progress.notify_all()

    def block_done(self, entry: CachedObject, block: int, ok: bool, nbytes: int) -> bool:
        """A download of ``block`` ended; True if it made the copy complete."""
        with self._lock:
            self._progress.notify_all()
            entry.inflight.pop(block, None)
            entry.filled.pop(block, None)
            self._close_if_done_locked(entry)  # its last reader went while this block was on its way
            if ok and not entry.complete and block not in entry.present:
                entry.present.add(block)
                self._bytes += 0 if entry.detached else nbytes
                if len(entry.present) == entry.block_count():
                    entry.complete = True
                    entry.present.clear()
                    return True
            return False

    def rename(self, key: str, etag: str, new_key: str, new_etag: str) -> None:
        """The object ``key``@``etag`` was moved to ``new_key`` (its copy there is ``new_etag``): its
        cached copy is that object's now. Readers passed through to it (the kernel reads the file
        itself) go on reading the file the new path names, so a writer can take it over."""
        with self._lock:
            self._copies.pop((new_key, new_etag), None)  # a new object there: where it went before is past
            self._copies[(key, etag)] = (new_key, new_etag)
            self._copies.move_to_end((key, etag))
            while len(self._copies) > self.COPIES_KEPT:
                self._copies.popitem(last=False)
            entry = self._entries.get((key, etag))
            if entry is None or (new_key, new_etag) in self._entries:
                return
            del self._entries[(key, etag)]
            entry.key, entry.etag = new_key, new_etag
            self._entries[(new_key, new_etag)] = entry

    def latest_copy(self, key: str, etag: str) -> tuple[str, str]:
        """Where the object ``key``@``etag`` is now, as far as moves made by this mount tell
        (``rename``): the last copy in the chain, or the object itself."""
        with self._lock:
            seen = {(key, etag)}
            while (key, etag) in self._copies:
                key, etag = self._copies[(key, etag)]
                if (key, etag) in seen:  # not expected (a copy's ETag is new), but never loop
                    break
                seen.add((key, etag))
            return key, etag

    def invalidate(self, key: str) -> None:
        """Forget every cached version of ``key`` (after overwrite, delete or rename)."""
        with self._lock:
            for cache_key in [k for k in self._entries if k[0] == key]:
                entry = self._entries[cache_key]
                if entry.readers == 0 and not entry.inflight:
                    del self._entries[cache_key]
                    self._drop_locked(entry)

    def used_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def evict(self, budget: int | None = None) -> None:
        """Drop least recently used, unpinned copies until under ``budget`` (default: the limit)."""
        limit = self.limit_bytes if budget is None else max(0, min(budget, self.limit_bytes))
        if self.limit_bytes <= 0:
            return
        with self._lock:
            for cache_key in list(self._entries):
                if self._bytes <= limit:
                    break
                entry = self._entries[cache_key]
                if entry.readers or entry.inflight:
                    continue
                del self._entries[cache_key]
                self._drop_locked(entry)

    def _drop_locked(self, entry: CachedObject, unlink: bool = True) -> None:
        self._bytes -= entry.cached_bytes()
        try:
            self._close_fd_locked(entry)
        except OSError:
            pass
        if unlink:
            try:
                os.unlink(entry.path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("could not remove cached copy %s: %s", entry.path, exc)
