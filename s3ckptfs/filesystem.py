"""All filesystem semantics, with no FUSE in sight: paths in, bytes and stat records out.

Paths are absolute within the mount ("/", "/run/step_1.pt"); the object key is
the mount's prefix plus the path without its leading slash. Directories are
prefixes: a directory exists if a ``dir/`` marker object exists (mkdir makes
one, so an empty directory survives) or if any key lies under it.

Writes never go to S3 directly. A file opened for writing becomes a
``StagedFile`` (see staging.py) whose bytes live in the cache dir; the
``Uploader`` uploads its parts while it is written and commits it, in close
order, when the last writer closes (``flush``), or on fsync. Until it is
committed, the staged copy is what this mount shows; afterwards its staging
file becomes the cached copy of the new object, so reading back what was just
written costs no download.

Every public method either returns or raises ``FsError`` with the errno for
the caller; S3 failures are logged with their cause and mapped in errors.py.

Lock order: Filesystem._lock -> Uploader._lock -> StagedFile.lock -> leaves
(MetadataCache, ObjectCache, HandleTable).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from . import partplan
from .cache import CacheDir, CachedObject, Journal, ObjectCache, UploadRegistry, fsync_dir
from .config import MountConfig
from .errors import FsError, S3Error
from .handles import Handle, HandleTable
from .metadata import MISSING, DirInfo, MetadataCache
from .metrics import Metrics
from .passthrough import PassthroughBackend, PassthroughFiles
from .s3client import ObjectInfo, object_metadata
from .staging import StagedFile, next_close_seq, pwrite_all, start_writeback
from .store import ObjectStore
from .uploader import Ticket, Uploader

log = logging.getLogger(__name__)

MAX_KEY_BYTES = 1024
SYMLINK_MAX = 4096       # objects larger than this cannot be symlinks: no HEAD needed to tell
DIR_MODE = stat.S_IFDIR | 0o755
FILE_MODE = stat.S_IFREG | 0o644


@dataclass(frozen=True)
class Stat:
    mode: int
    size: int
    mtime: float
    nlink: int = 1


@dataclass(frozen=True)
class LostFile:
    """A closed file whose data had not reached the disk when the machine went down (local_sync=background).

    Never uploaded; shown as failed by status and sync until its path is written
    again, renamed or deleted through the mount. Its record and staging file stay
    in the cache dir until then.
    """
    path: str
    key: str
    file_id: str
    size: int
    mtime: float
    reason: str = ("lost: the machine restarted before its data reached the cache disk (local_sync=background); "
                   "not uploaded, the object in S3 is unchanged; cleared when the path is written or deleted")


def _s3_errno(err: S3Error, what: str) -> FsError:
    code = err.errno
    if code == errno.EIO:
        log.error("%s: %s", what, err)
    else:
        log.info("%s: %s", what, err)
    return FsError(code, f"{what}: {err}")


class Filesystem:
    """The semantics of one mount. Thread-safe: FUSE calls it from many threads."""

    def __init__(self, config: MountConfig, s3: ObjectStore, cache_dir: CacheDir,
                 metrics: Metrics | None = None, *, backoff: Callable[[int], float] | None = None) -> None:
        opts = config.options
        self.config = config
        self.options = opts
        self.prefix = config.prefix
        self.s3 = s3
        self.cache_dir = cache_dir
        self.meta = MetadataCache(opts.metadata_ttl, opts.negative_ttl)
        self.journal = Journal(cache_dir.journal_dir)
        clean_limit = opts.cache_size or max(cache_dir.disk_free() // 2, 1 << 30)
        self.objects = ObjectCache(cache_dir.objects, opts.read_block, clean_limit)
        self.registry = UploadRegistry(cache_dir.uploads)
        self.uploader = Uploader(s3, concurrency=opts.upload_concurrency, single_put_limit=opts.single_put_limit,
                                 on_committed=self._on_committed, registry=self.registry,
                                 upload_nice=opts.upload_nice, eager_uploads=opts.eager_uploads,
                                 retry_window=opts.retry_window, checksums=opts.checksums, metrics=metrics,
                                 on_settled=self._commit_or_retire, backoff=backoff)
        self.downloads = ThreadPoolExecutor(max_workers=opts.download_concurrency,
                                            thread_name_prefix="s3ckptfs-get")
        # local_sync=background: staging files are fsync'd here after close, one at a time, in close order
        self.datasync = ThreadPoolExecutor(max_workers=1, thread_name_prefix="s3ckptfs-datasync")
        self._lost: dict[str, LostFile] = {}  # path -> file whose data a restart of the machine may have torn
        self.handles = HandleTable()
        self._lock = threading.RLock()
        self._staged: dict[str, StagedFile] = {}
        self._mtime_overrides: dict[str, float] = {}
        self._room = threading.Condition()  # notified when staged data leaves the cache
        self.mount_time = time.time()
        self.passthrough = PassthroughFiles(self)
        self._opened_versions: dict[str, tuple[str, str]] = {}  # path -> (key, ETag) at its last open

    # -- FUSE passthrough ---------------------------------------------------------------

    def enable_passthrough(self, backend: PassthroughBackend) -> None:
        """Called by the FUSE layer once the kernel has agreed to passthrough."""
        self.passthrough.enable(backend)

    def backing_id(self, fh: int) -> int:
        return self.handles.get(fh).backing_id

    def keep_cache(self, fh: int) -> bool:
        """Whether the kernel may keep its page cache of this file at open (FUSE keep_cache).

        Yes for an object read through the daemon whose ETag is the one seen at the last
        open of its path; never for staged files (written here, possibly behind the
        daemon's back).
        """
        handle = self.handles.get(fh)
        version = (handle.remote.key, handle.remote.etag) if handle.remote is not None else None
        with self._lock:
            previous = self._opened_versions.get(handle.path)
            if version is None:
                self._opened_versions.pop(handle.path, None)
            else:
                if len(self._opened_versions) > 100_000:  # bounded: forgetting only costs a re-read
                    self._opened_versions.clear()
                self._opened_versions[handle.path] = version
        return version is not None and bool(version[1]) and previous == version

    # -- paths and keys ----------------------------------------------------------------

    def key_for(self, path: str) -> str:
        """The S3 key of ``path``. Raises ENAMETOOLONG over S3's 1024-byte limit."""
        key = self.prefix + path.lstrip("/")
        try:
            encoded = key.encode("utf-8")
        except UnicodeEncodeError:
            # S3 keys are UTF-8; a name in another encoding cannot be stored as it is.
            raise FsError(errno.EILSEQ, f"{path!r} is not valid UTF-8, which S3 keys must be") from None
        if len(encoded) > MAX_KEY_BYTES - 1:  # room for a dir marker's '/'
            raise FsError(errno.ENAMETOOLONG, f"key for {path} is longer than S3 allows")
        return key

    @staticmethod
    def _parent(path: str) -> str:
        return path.rpartition("/")[0] or "/"

    def _staged_children(self, path: str) -> list[StagedFile]:
        with self._lock:
            return [f for f in self._staged_under_locked(path) if not f.deleted]

    def _staged_under_locked(self, path: str) -> list[StagedFile]:
        prefix = "/" if path == "/" else path + "/"
        return [f for p, f in self._staged.items() if p.startswith(prefix)]

    # -- lookup ------------------------------------------------------------------------

    def _lookup(self, path: str, attempts: int = 3) -> ObjectInfo | DirInfo | None:
        """What exists at ``path`` in S3 (or staged here): ObjectInfo, DirInfo or None."""
        if path == "/":
            return DirInfo(self.mount_time)
        with self._lock:
            staged = self._staged.get(path)
            if staged is not None:
                return None if staged.deleted else self._staged_info(staged)
            staged_children = [f for f in self._staged_under_locked(path) if not f.deleted]
        cached = self.meta.get(path)
        if cached is MISSING:
            return DirInfo(max(f.mtime for f in staged_children)) if staged_children else None
        if isinstance(cached, ObjectInfo) and cached.mode is None and cached.size <= SYMLINK_MAX:
            cached = None  # from a listing: HEAD tells whether it is a symlink
        if isinstance(cached, DirInfo) and cached.mtime is None:
            cached = None  # from a listing: its own listing tells its mtime
        if cached is not None:
            return cached  # type: ignore[return-value]
        key = self.key_for(path)
        token = self.meta.token()
        try:
            info = self.s3.head(key)
            if info is not None:
                self.meta.put_if_unchanged(path, info, token)
                return info
            exists, has_marker, newest = self.s3.dir_summary(key + "/")
            marker = self.s3.head(key + "/") if has_marker else None
        except S3Error as err:
            raise _s3_errno(err, f"lookup {path}") from err
        if exists:
            # A directory's mtime is its creation time, kept in its marker (mkdir makes one,
            # rename carries it over): directories sort in creation order, across remounts,
            # as checkpoint rotation needs. Without a marker (made by another tool): the
            # newest of its entries.
            if marker is not None:
                mtime: float | None = marker.mtime
            else:
                mtimes = [t for t in [newest, *(f.mtime for f in self._staged_children(path))] if t is not None]
                mtime = max(mtimes) if mtimes else None
            result = DirInfo(mtime)
            self.meta.put_if_unchanged(path, result, token)
            return result
        with self._lock:
            staged = self._staged.get(path)
            if staged is not None and not staged.deleted:
                return self._staged_info(staged)
            staged_children = [f for f in self._staged_under_locked(path) if not f.deleted]
            if staged_children:
                return DirInfo(max(f.mtime for f in staged_children))
            # A file committed (and retired from the staged table) while we asked S3 would
            # be in neither answer: if anything changed meanwhile, ask again.
            changed = self.meta.token() != token
            if not changed:
                self.meta.put_if_unchanged(path, MISSING, token)
        if changed and attempts > 1:
            return self._lookup(path, attempts - 1)
        return None

    @staticmethod
    def _staged_info(file: StagedFile) -> ObjectInfo:
        with file.lock:
            if file.pt_writers:
                file.observe_locked()  # written behind the daemon's back: ask the staging file
            return ObjectInfo(key=file.key, size=file.size, etag="", mtime=file.mtime, mode=file.mode)

    def _stat_of(self, path: str, entry: ObjectInfo | DirInfo) -> Stat:
        if isinstance(entry, DirInfo):
            return Stat(DIR_MODE, 0, entry.mtime if entry.mtime is not None else self.mount_time, nlink=2)
        mode = entry.mode if entry.mode is not None else FILE_MODE
        mtime = self._mtime_overrides.get(path, entry.mtime)
        return Stat(mode, entry.size, mtime)

    def getattr(self, path: str, fh: int | None = None) -> Stat:
        if fh is not None:
            handle = self.handles.get(fh)
            if handle.staged is not None:
                return self._stat_of(path, self._staged_info(handle.staged))
            if handle.remote is not None:
                return self._stat_of(path, handle.remote)
        entry = self._lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        return self._stat_of(path, entry)

    def readdir(self, path: str) -> list[tuple[str, Stat | None]]:
        """Names in directory ``path`` with what is known of them (listing + staged files)."""
        entry = self._lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if not isinstance(entry, DirInfo):
            raise FsError(errno.ENOTDIR, path)
        # The listing and the staged files must be one consistent view: a commit retires a
        # staged file (under self._lock) once it is in S3, so the S3 listing must be at
        # least as new as the last local change when the staged files are merged into it.
        dir_key = self.prefix if path == "/" else self.key_for(path) + "/"
        children: dict[str, object] | None = None
        for _attempt in range(5):
            with self._lock:
                cached = self.meta.get_listing(path)
                if cached is not None:
                    children = self._merge_staged_locked(path, cached)
                    break
                token = self.meta.token()
            try:
                files, dirs = self.s3.list_dir(dir_key)
            except S3Error as err:
                raise _s3_errno(err, f"list {path}") from err
            listed = self._listing_children(dir_key, files, dirs)
            with self._lock:
                if self.meta.token() == token:  # no local change while we listed
                    self.meta.put_listing(path, listed, token)
                    children = self._merge_staged_locked(path, listed)
                    break
        if children is None:  # changes kept racing with the listing: list once more, then trust it
            files, dirs = self.s3.list_dir(dir_key)
            with self._lock:
                children = self._merge_staged_locked(path, self._listing_children(dir_key, files, dirs))
        prefix = "/" if path == "/" else path + "/"
        result = []
        for name, child in sorted(children.items()):
            child_path = prefix + name
            result.append((name, self._stat_of(child_path, child) if child is not MISSING else None))
        return result

    @staticmethod
    def _listing_children(dir_key: str, files: list[ObjectInfo], dirs: list[str]) -> dict[str, object]:
        children: dict[str, object] = {}
        for info in files:
            name = info.key[len(dir_key):]
            if name:  # "" is this directory's own marker
                children[name] = info
        for name in dirs:
            if name:
                children[name] = DirInfo(None)  # a prefix shadows an object of the same name
        return children

    def _merge_staged_locked(self, path: str, children: dict[str, object]) -> dict[str, object]:
        """``children`` plus the files staged under ``path`` (call with self._lock held)."""
        merged = dict(children)
        prefix = "/" if path == "/" else path + "/"
        for staged_path, file in self._staged.items():
            if staged_path.startswith(prefix) and not file.deleted:
                name, sep, _ = staged_path[len(prefix):].partition("/")
                merged[name] = DirInfo(None) if sep else self._staged_info(file)
        return merged

    # -- open, create, read, write ----------------------------------------------------

    def _new_staged(self, path: str, mode: int, size: int = 0) -> StagedFile:
        file_id = uuid.uuid4().hex
        staging_path = self.cache_dir.staging_path(file_id)
        try:
            fd = os.open(staging_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO, f"cannot create staging file: {exc}") from exc
        if size:
            os.ftruncate(fd, size)
        return StagedFile(file_id, path, self.key_for(path), staging_path, fd, size=size, mode=mode,
                          mtime=time.time(), part_base=self.options.part_size)

    def _register_locked(self, file: StagedFile) -> None:
        previous = self._staged.get(file.path)
        if previous is not None and previous is not file:
            self._discard_locked(previous)
        self._clear_lost_locked(file.path, "written again")
        self._staged[file.path] = file
        self.meta.forget(file.path)
        self._mtime_overrides.pop(file.path, None)

    def _discard_locked(self, file: StagedFile) -> None:
        """The file is replaced or unlinked: never upload it again; free it once unused."""
        with file.lock:
            file.wait_commit_request_locked()  # its object, if being written now, lands before the delete
            file.deleted = True
            self.uploader.abort_later(file.forget_upload_locked())
            unused = file.handles == 0
            self.journal.remove(file.id)  # under file.lock, like every removal: see _sync_data
        if self._staged.get(file.path) is file:
            del self._staged[file.path]
        if unused:
            self._free_staging(file)
        self._room_freed()

    @staticmethod
    def _free_staging(file: StagedFile) -> None:
        file.close_fd()
        try:
            os.unlink(file.staging_path)
        except FileNotFoundError:
            pass

    def create(self, path: str, mode: int, flags: int) -> int:
        """Create (or replace) ``path`` as an empty file open for writing."""
        self._check_parent_is_dir(path)
        file = self._new_staged(path, stat.S_IFREG | (mode & 0o7777))
        with self._lock:
            self._register_locked(file)
            return self._open_handle_locked(file, path, flags, writable=True)

    def _check_parent_is_dir(self, path: str) -> None:
        parent = self._lookup(self._parent(path))
        if parent is None:
            raise FsError(errno.ENOENT, self._parent(path))
        if not isinstance(parent, DirInfo):
            raise FsError(errno.ENOTDIR, self._parent(path))

    def _refuse_if_passed_through_locked(self, path: str) -> None:
        """The kernel would fail this open (EIO): other opens pass its inode through to another file."""
        if self.passthrough.kernel_backed_locked(path, 0):
            log.warning("%s: refused an open while readers here have another version of it open "
                        "(FUSE passthrough allows one file per inode); retry once they close", path)
            raise FsError(errno.EBUSY, path)

    def _open_handle_locked(self, file: StagedFile, path: str, flags: int, writable: bool) -> int:
        with file.lock:
            backing = self.passthrough.attach_locked(file, path, writable)
            if not backing:
                self._refuse_if_passed_through_locked(path)
            file.handles += 1
            if writable:
                file.writers += 1
        fh = self.handles.add(Handle(path=path, flags=flags, writable=writable, staged=file, backing_id=backing))
        log.debug("open %s (fh %d, %s): %s", path, fh, "rw" if writable else "ro",
                  f"passthrough, backing id {backing}" if backing else "through the daemon")
        if backing and writable:
            self.passthrough.wake()
        return fh

    def open(self, path: str, flags: int) -> int:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        truncate = writable and bool(flags & os.O_TRUNC)
        with self._lock:
            file = self._staged.get(path)
            if file is not None:
                if truncate:
                    with file.lock:
                        file.truncate_locked(0)
                return self._open_handle_locked(file, path, flags, writable)
        entry = self._lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if isinstance(entry, DirInfo):
            raise FsError(errno.EISDIR, path)
        if not writable:
            cached = self.objects.acquire(entry.key, entry.etag, entry.size)
            try:
                with self._lock:
                    backing = self.passthrough.attach_cached_locked(cached, path)
                    if not backing:
                        self._refuse_if_passed_through_locked(path)
                    return self.handles.add(Handle(path=path, flags=flags, writable=False, remote=entry,
                                                   cached=cached, backing_id=backing))
            except FsError:
                self.objects.release(cached)
                raise
        with self._lock:
            fh = self._open_cached_copy_for_write_locked(path, entry, flags, truncate)
            if fh:
                return fh
            self._refuse_if_passed_through_locked(path)
        # Writing an existing object: bring it into the cache first, unless it is truncated anyway.
        file = self._new_staged(path, entry.mode or FILE_MODE)
        if not truncate:
            self._hydrate(file, entry)
        with file.lock:
            if not truncate:  # identical to the object until written
                file.committed_version = file.version
                file.last_etag = entry.etag
                file.mtime = entry.mtime
        with self._lock:
            existing = self._staged.get(path)
            if existing is not None:  # another thread won the race: share its copy
                self._free_staging(file)
                return self._open_handle_locked(existing, path, flags, writable)
            self._register_locked(file)
            try:
                return self._open_handle_locked(file, path, flags, writable)
            except FsError:
                self._discard_locked(file)  # a local copy only: S3 keeps the object
                raise

    def _open_cached_copy_for_write_locked(self, path: str, entry: ObjectInfo, flags: int, truncate: bool) -> int:
        """Open ``path`` for writing on its complete cached copy, moved to staging: no download.

        Only while every open of the path reads that copy through passthrough (or none
        is open); the writer then shares their backing file. Returns the fh, or 0.
        """
        existing = self._staged.get(path)
        if existing is not None:  # staged since the lookup
            if truncate:
                with existing.lock:
                    existing.truncate_locked(0)
            return self._open_handle_locked(existing, path, flags, writable=True)
        others = self.handles.open_on(path)  # new opens of path wait for Filesystem._lock

        def idle_or_passed_through(cached: CachedObject) -> bool:
            return cached.readers == cached.pt_handles and all(h.cached is cached and h.backing_id for h in others)

        cached = self.objects.take(entry.key, entry.etag, idle_or_passed_through) if entry.etag else None
        if cached is None:
            return 0
        file_id = uuid.uuid4().hex
        staging_path = self.cache_dir.staging_path(file_id)
        try:
            os.rename(cached.path, staging_path)
            fd = os.open(staging_path, os.O_RDWR)
        except OSError as exc:
            raise FsError(exc.errno or errno.EIO, f"cannot stage {path} from the cache: {exc}") from exc
        file = StagedFile(file_id, path, self.key_for(path), staging_path, fd, size=entry.size,
                          mode=entry.mode or FILE_MODE, mtime=entry.mtime, part_base=self.options.part_size)
        with file.lock:
            file.committed_version = file.version  # identical to the object until written
            file.last_etag = entry.etag
            if truncate:
                file.truncate_locked(0)
        self._register_locked(file)
        return self._open_handle_locked(file, path, flags, writable=True)

    def _hydrate(self, file: StagedFile, entry: ObjectInfo) -> None:
        """Fill a new staging file with the whole object (parallel ranged GETs)."""
        os.ftruncate(file.fd, entry.size)
        file.size = entry.size
        block = self.options.read_block
        futures = [self.downloads.submit(self.s3.get_range_into, entry.key, start,
                                         min(block, entry.size - start), file.fd, entry.etag or None)
                   for start in range(0, entry.size, block)]
        try:
            for future in futures:
                future.result()
        except S3Error as err:
            self._free_staging(file)
            raise _s3_errno(err, f"download {file.path}") from err
        except OSError as exc:
            self._free_staging(file)
            raise FsError(exc.errno or errno.EIO, f"download {file.path}: {exc}") from exc

    def read(self, fh: int, size: int, offset: int) -> bytes:
        fd, start, length = self.read_source(fh, size, offset)
        return os.pread(fd, length, start) if length else b""

    def read_source(self, fh: int, size: int, offset: int) -> tuple[int, int, int]:
        """Where the bytes of a read are: (fd, offset, length), present on local disk.

        The FUSE layer hands this to libfuse, which moves the bytes to the kernel
        without a copy in Python. The fd stays valid while the handle is open (a
        staged file is not retired and a cached copy is not evicted while open).
        """
        handle = self.handles.get(fh)
        if handle.staged is not None:
            file = handle.staged
            return file.fd, offset, max(0, min(size, file.size - offset))
        return self._read_remote(handle, size, offset)

    def _read_remote(self, handle: Handle, size: int, offset: int) -> tuple[int, int, int]:
        info, entry = handle.remote, handle.cached
        assert info is not None and entry is not None
        if offset >= info.size or size <= 0:
            return entry.fd, offset, 0
        end = min(offset + size, info.size)
        block = entry.block_size
        # Sequential means near where the last read ended: the kernel's own read-ahead
        # sends requests slightly out of order, and zip readers skip small gaps.
        if abs(offset - handle.next_offset) <= 2 * block:
            handle.window = min(max(handle.window * 2, block), self.options.read_ahead)
        else:
            handle.window = 0
        handle.next_offset = max(end, handle.next_offset) if handle.window else end
        ahead_end = min(info.size, end + handle.window)
        needed_last = (end - 1) // block
        waits: list[tuple[int, Future]] = []
        for number in range(offset // block, (ahead_end - 1) // block + 1):
            future = self.objects.fetch_block(entry, number, self._start_download)
            if future is not None and number <= needed_last:
                waits.append((number, future))
        for number, future in waits:
            try:
                self.objects.wait_for(entry, number, min(end - number * block, block), future)
            except S3Error as err:
                if err.code == "PreconditionFailed":
                    self.meta.forget(handle.path)
                    log.warning("%s changed in S3 while open; reopen to read the new version", handle.path)
                    raise FsError(errno.ESTALE, handle.path) from err
                raise _s3_errno(err, f"read {handle.path}") from err
            except OSError as exc:
                raise FsError(exc.errno or errno.EIO, f"read {handle.path}: {exc}") from exc
        return entry.fd, offset, end - offset

    def _start_download(self, entry: CachedObject, number: int) -> Future:
        return self.downloads.submit(self._download_block, entry, number)

    def _download_block(self, entry: CachedObject, number: int) -> None:
        start = number * entry.block_size
        length = min(entry.block_size, entry.size - start)
        ok = False
        try:
            self.s3.get_range_into(entry.key, start, length, entry.fd, entry.etag or None,
                                   progress=lambda done: self.objects.block_progress(entry, number, done))
            ok = True
        finally:
            self.objects.block_done(entry, number, ok, length)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        return self.write_with(fh, offset, len(data), lambda fd, at: pwrite_all(fd, data, at))

    def write_with(self, fh: int, offset: int, length: int, copy: Callable[[int, int], int]) -> int:
        """Write ``length`` bytes at ``offset``; ``copy(fd, offset)`` puts them into the staging fd.

        Lets the FUSE layer move request data into the staging file without a copy in
        Python; ``write`` is the same with bytes in hand.
        """
        handle = self.handles.get(fh)
        file = handle.staged
        if file is None or not handle.writable:
            raise FsError(errno.EBADF, "file not open for writing")
        if offset + length > partplan.max_object_size(file.part_base):
            raise FsError(errno.EFBIG, handle.path)
        if self.options.cache_size and offset + length > file.size:
            self._wait_for_room(offset + length - file.size)
        try:
            written = file.write_with(copy, offset)
        except OSError as exc:
            code = exc.errno or errno.EIO
            with file.lock:
                file.write_error = code  # the file is incomplete: close reports it, S3 never sees it
            log.error("write to %s failed: %s; the file will not be uploaded", handle.path, exc)
            raise FsError(code, f"write {handle.path}: {exc}") from exc
        # The part before the one this write starts in is behind the writer: upload it now,
        # and start writing it to disk, so that close has little left to fsync.
        behind = partplan.part_number(offset, file.part_base) - 1
        if behind >= 1:
            self.uploader.part_filled(file, behind)
            filled_end = partplan.part_range(behind, file.part_base)[1]
            if filled_end > file.writeback_from:
                start_writeback(file.fd, file.writeback_from, filled_end - file.writeback_from)
                file.writeback_from = filled_end
        return written

    def staged_bytes(self) -> int:
        with self._lock:
            return sum(f.size for f in self._staged.values() if not f.deleted)

    def _wait_for_room(self, incoming: int) -> None:
        """Block a growing write while staged data would exceed cache_size and uploads can free room.

        A single file larger than the cache is never blocked forever: when nothing is
        left to commit, the write goes ahead (and clean cached data makes room).
        """
        limit = self.options.cache_size
        waited = 0.0
        while self.staged_bytes() + incoming > limit and self.uploader.pending_commits():
            if waited == 0.0:
                log.info("cache full (%d bytes staged, limit %d): waiting for uploads", self.staged_bytes(), limit)
            with self._room:
                self._room.wait(0.5)
            waited += 0.5
        self.objects.evict(limit - self.staged_bytes() - incoming)

    def _room_freed(self) -> None:
        with self._room:
            self._room.notify_all()

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        if fh is not None:
            handle = self.handles.get(fh)
            if handle.staged is not None and handle.writable:
                with handle.staged.lock:
                    handle.staged.truncate_locked(length)
                    if handle.staged.pt_writers:
                        self.passthrough.reserve_locked(handle.staged)
                return
        with self._lock:
            file = self._staged.get(path)
            if file is not None:
                with file.lock:
                    file.truncate_locked(length)
                    if file.pt_writers:
                        self.passthrough.reserve_locked(file)
                    idle = file.writers == 0
                if idle:
                    self._make_durable(file)
                    self.uploader.request_commit(file)
                return
        entry = self._lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if isinstance(entry, DirInfo):
            raise FsError(errno.EISDIR, path)
        file = self._new_staged(path, entry.mode or FILE_MODE)
        if length:
            self._hydrate(file, entry)
        with file.lock:
            file.truncate_locked(length)
        with self._lock:
            self._register_locked(file)
        self._make_durable(file)
        self.uploader.request_commit(file)

    # -- close, fsync ------------------------------------------------------------------

    def _make_durable(self, file: StagedFile) -> None:
        """fsync the staging file and journal it, so the data survives a crash of this daemon.

        With local_sync=background the record is written first, marked not yet synced,
        and the fsync follows on the datasync thread (``_sync_data``): the data then
        survives the daemon dying at once, and the machine going down once that is done.
        """
        with file.lock:
            if file.deleted or not file.dirty or file.journaled_version == file.version:
                return
            version = file.version
        background = self.options.local_sync == "background"
        started = time.monotonic()
        try:
            if not background:
                os.fsync(file.fd)
                fsync_dir(self.cache_dir.staging)  # the file's name must survive a power loss too
            with file.lock:
                if file.deleted:
                    return  # unlinked meanwhile: its record is gone and must stay gone
                file.data_synced = not background
                file.close_seq = next_close_seq()
                self.journal.write(file.id, file.journal_record_locked())
                file.journaled_version = version
            log.debug("journaled %s (%d bytes) in %.3fs", file.path, file.size, time.monotonic() - started)
        except OSError as exc:
            with file.lock:
                file.write_error = exc.errno or errno.EIO
            raise FsError(exc.errno or errno.EIO, f"cannot journal {file.path}: {exc}") from exc
        if background:
            self._sync_data_later(file, version)

    def _sync_data_later(self, file: StagedFile, version: int) -> None:
        try:
            self.datasync.submit(self._sync_data, file, version, time.monotonic())
        except RuntimeError:  # shutting down: no thread left to do it
            self._sync_data(file, version, time.monotonic())

    def _sync_data(self, file: StagedFile, version: int, queued: float) -> None:
        """fsync the staging file journaled at ``version``, then mark its record synced.

        Nothing to do if the record is gone meanwhile (committed, replaced, unlinked)
        or was written again for a newer version (whose own sync is queued behind this one).
        Records are removed only under file.lock, so checking and rewriting under it
        never brings back a removed record.
        """
        fd = -1
        try:
            with file.lock:
                if (file.deleted or file.fd < 0 or file.journaled_version != version
                        or not self.journal.exists(file.id)):
                    return
                fd = os.dup(file.fd)  # the commit may close file.fd meanwhile
            os.fsync(fd)
            fsync_dir(self.cache_dir.staging)
            with file.lock:
                if file.deleted or file.journaled_version != version or not self.journal.exists(file.id):
                    return
                file.data_synced = True
                self.journal.write(file.id, file.journal_record_locked())
        except OSError as exc:
            log.error("background fsync of %s failed (%s): it is still uploaded from memory, but a restart "
                      "of the machine before that would lose it", file.path, exc)
            return
        finally:
            if fd >= 0:
                os.close(fd)
        log.debug("data of %s on disk %.3fs after it was journaled", file.path, time.monotonic() - queued)

    def flush(self, fh: int) -> None:
        """close(2) of one descriptor: make the data safe per the write mode."""
        handle = self.handles.get(fh)
        file = handle.staged
        if file is None or not handle.writable:
            return
        if handle.backing_id:
            self.passthrough.settle(file)
        with file.lock:
            if file.write_error is not None:
                raise FsError(file.write_error, f"{file.path}: an earlier write failed; not uploaded")
            if file.deleted or not file.dirty:
                return
            last_writer = file.writers <= 1
        self._make_durable(file)
        if not last_writer:
            return  # another descriptor still writes: commit when the last one closes
        ticket = self.uploader.request_commit(file)
        if self.options.write_mode == "sync":
            self._wait(ticket, file)

    def fsync(self, fh: int) -> None:
        """Return once this file's content is complete in S3."""
        handle = self.handles.get(fh)
        file = handle.staged
        if file is None:
            return
        if handle.backing_id and handle.writable:
            self.passthrough.settle(file)
        with file.lock:
            if file.deleted:
                return
            if file.write_error is not None:
                raise FsError(file.write_error, f"{file.path}: an earlier write failed; not uploaded")
            if not file.dirty:
                if file.failure is not None:
                    raise FsError(errno.EIO, f"{file.path}: {file.failure}")
                return
        self._make_durable(file)
        self._wait(self.uploader.request_commit(file), file)

    @staticmethod
    def _wait(ticket: Ticket, file: StagedFile) -> None:
        ticket.wait()
        if ticket.error is not None:
            raise FsError(ticket.error.errno if ticket.error.errno != errno.ENOENT else errno.EIO,
                          f"{file.path}: {ticket.error}")

    def release(self, fh: int) -> None:
        handle = self.handles.remove(fh)
        if handle.cached is not None:
            if handle.backing_id:
                with self._lock:
                    self.passthrough.release_cached_locked(handle.cached)
            self.objects.release(handle.cached)
        file = handle.staged
        if file is None:
            return
        with self._lock:
            with file.lock:
                file.handles -= 1
                if handle.writable:
                    file.writers -= 1
                if handle.backing_id:
                    self.passthrough.release_locked(file, handle)
                unused = file.handles == 0
            if unused and file.deleted:
                self._free_staging(file)
                return
            if unused and file.write_error is not None:
                self._discard_locked(file)  # never published; the path shows what S3 holds
                self.meta.forget(file.path)
                self._room_freed()
                return
        self._commit_or_retire(file)

    def _on_committed(self, file: StagedFile, key: str, etag: str, version: int) -> None:
        """Uploader callback: ``file`` at ``version`` is now object ``key`` with ``etag``."""
        self.objects.invalidate(key)
        with file.lock:
            if not file.dirty and not file.deleted:
                self.journal.remove(file.id)
        self.meta.put(file.path, ObjectInfo(key=key, size=file.size, etag=etag, mtime=file.mtime, mode=file.mode))
        self._retire_if_clean(file)

    def _commit_or_retire(self, file: StagedFile) -> None:
        """After a release, and after each commit (uploader callback): if the file is closed and
        changed since its last commit (written through a shared mapping after the last flush, or
        during a commit's request, whose end sees to it), commit it; else retire it if clean."""
        with file.lock:
            again = (file.handles == 0 and file.dirty and not file.deleted and not file.commit_queued
                     and not file.committing and file.failure is None and file.write_error is None)
        if again:
            self._make_durable(file)
            self.uploader.request_commit(file)
        else:
            self._retire_if_clean(file)

    def _retire_if_clean(self, file: StagedFile) -> None:
        """A committed, closed file: hand its staging file to the object cache.

        Done under Filesystem._lock, so that an open() sees either the staged file
        or the cached object, never the gap between them.
        """
        with self._lock:
            with file.lock:
                if (file.handles or file.dirty or file.deleted or file.commit_queued or file.inflight
                        or self._staged.get(file.path) is not file):
                    return
                del self._staged[file.path]
                info = ObjectInfo(key=file.key, size=file.size, etag=file.last_etag, mtime=file.mtime,
                                  mode=file.mode)
                file.close_fd()
            self._room_freed()
            kept = False
            if file.last_etag:
                try:
                    kept = self.objects.adopt(file.key, file.last_etag, file.staging_path, file.size)
                except OSError as exc:
                    log.warning("could not keep %s in the cache: %s", file.path, exc)
            self.meta.put(file.path, info)
        if not kept:
            self._free_staging(file)

    # -- namespace ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock_between_commit_requests(self, *paths: str) -> Iterator[None]:
        """Hold the mount's lock at a moment when no file staged at ``paths`` has a commit request in flight.

        Unlink and rename wait for such a request (it writes under the key the file had
        when it began; letting them go first would let the object reappear after them).
        They wait here without the mount's lock, so that the rest of the mount goes on;
        the kernel still holds the directory while they wait.
        """
        while True:
            with self._lock:
                busy = next((f for f in map(self._staged.get, paths) if f is not None and f.committing), None)
                if busy is None:
                    yield
                    return
            with busy.lock:
                busy.wait_commit_request_locked()

    def unlink(self, path: str) -> None:
        key = self.key_for(path)
        with self._lock_between_commit_requests(path):
            self._clear_lost_locked(path, "deleted")
            file = self._staged.get(path)
            if file is not None:
                self._discard_locked(file)
        if file is None:
            entry = self._lookup(path)
            if entry is None:
                raise FsError(errno.ENOENT, path)
            if isinstance(entry, DirInfo):
                raise FsError(errno.EISDIR, path)
        try:
            self.s3.delete(key)
        except S3Error as err:
            raise _s3_errno(err, f"delete {path}") from err
        finally:
            self.meta.forget(path)
            self.objects.invalidate(key)
            self._mtime_overrides.pop(path, None)
        self.meta.put(path, MISSING)
        self.handles.unname(path)  # open handles live on, nameless

    def mkdir(self, path: str, mode: int) -> None:
        key = self.key_for(path) + "/"
        self._check_parent_is_dir(path)
        if self._lookup(path) is not None:
            raise FsError(errno.EEXIST, path)
        now = time.time()
        try:
            self.s3.put(key, b"", object_metadata(now, stat.S_IFDIR | (mode & 0o7777)))
        except S3Error as err:
            raise _s3_errno(err, f"mkdir {path}") from err
        self.meta.forget(path)
        self.meta.put(path, DirInfo(now))

    def rmdir(self, path: str) -> None:
        if path == "/":
            raise FsError(errno.EBUSY, path)
        entry = self._lookup(path)
        if entry is None:
            # Already gone: an implicit directory vanishes with its last object. Some
            # servers keep an empty folder until its key is deleted, so delete it anyway.
            try:
                self.s3.delete(self.key_for(path) + "/")
            except S3Error as err:
                log.debug("rmdir %s: %s", path, err)
            self.meta.forget_tree(path)
            return
        if not isinstance(entry, DirInfo):
            raise FsError(errno.ENOTDIR, path)
        with self._lock:
            if any(not f.deleted for f in self._staged_under_locked(path)):
                raise FsError(errno.ENOTEMPTY, path)
        dir_key = self.key_for(path) + "/"
        try:
            files, dirs = self.s3.list_dir(dir_key)
            if dirs or any(info.key != dir_key for info in files):
                raise FsError(errno.ENOTEMPTY, path)
            self.s3.delete(dir_key)
        except S3Error as err:
            raise _s3_errno(err, f"rmdir {path}") from err
        self.meta.forget_tree(path)
        self.meta.put(path, MISSING)

    def rename(self, old: str, new: str) -> None:
        if old == new:
            return
        if new.startswith(old.rstrip("/") + "/"):
            raise FsError(errno.EINVAL, f"cannot move {old} into itself")
        new_key = self.key_for(new)
        source = self._lookup(old)
        if source is None:
            raise FsError(errno.ENOENT, old)
        target = self._lookup(new)
        if isinstance(source, DirInfo):
            if target is not None and not isinstance(target, DirInfo):
                raise FsError(errno.ENOTDIR, new)
            if target is not None:
                self.rmdir(new)  # raises ENOTEMPTY unless it is empty
            self._rename_dir(old, new)
        else:
            if isinstance(target, DirInfo):
                raise FsError(errno.EISDIR, new)
            self._check_parent_is_dir(new)
            self._rename_file(old, new, new_key, source)
        self.handles.unname(new)     # a replaced file lives on in its open handles, nameless
        self.handles.move(old, new)  # the kernel keeps open files on their inode, now named new
        self.meta.forget_tree(old)
        self.meta.forget_tree(new)

    def _retarget_locked(self, file: StagedFile, new: str) -> bool:
        """Point a staged file at a new path. True if its committed object must move in S3 too.

        Called with Filesystem._lock held. A dirty file simply commits under the new
        key (an upload already started for the old key is aborted and redone); a
        clean one is already in S3 under the old key and is moved server-side.
        """
        with file.lock:
            file.wait_commit_request_locked()  # a commit under the old key lands first, then moves with it
            old_key = file.key
            file.path = new
            file.key = self.key_for(new)
            if file.upload_id is not None:
                self.uploader.abort_later(file.forget_upload_locked())
            moved_object = not file.dirty
            if file.journaled_version:
                self.journal.write(file.id, file.journal_record_locked())
        self.objects.invalidate(old_key)
        return moved_object

    def _rename_file(self, old: str, new: str, new_key: str, source: ObjectInfo) -> None:
        old_key = self.key_for(old)
        with self._lock_between_commit_requests(old, new):
            self._clear_lost_locked(old, "renamed")
            self._clear_lost_locked(new, "replaced by a rename")
            file = self._staged.pop(old, None)
            replaced = self._staged.get(new)
            if replaced is not None:
                self._discard_locked(replaced)
            if file is not None:
                move_remote = self._retarget_locked(file, new)
                self._staged[new] = file
                with file.lock:
                    needs_commit = file.dirty and file.writers == 0 and not file.commit_queued
            else:
                move_remote, needs_commit = True, False
        if needs_commit:
            self.uploader.request_commit(file)
        try:
            if move_remote:
                self.s3.copy(old_key, new_key, source.size)
            self.s3.delete(old_key)  # a dirty staged file may also have an older object there
        except S3Error as err:
            raise _s3_errno(err, f"rename {old} -> {new}") from err
        self.objects.invalidate(old_key)
        self.objects.invalidate(new_key)
        if old in self._mtime_overrides:
            self._mtime_overrides[new] = self._mtime_overrides.pop(old)

    def _rename_dir(self, old: str, new: str) -> None:
        old_prefix = self.key_for(old) + "/"
        new_prefix = self.key_for(new) + "/"
        try:
            objects = list(self.s3.list_all(old_prefix))
        except S3Error as err:
            raise _s3_errno(err, f"rename {old} -> {new}") from err
        for info in objects:  # ENAMETOOLONG before any change
            self.key_for("/" + (new_prefix + info.key[len(old_prefix):])[len(self.prefix):])
        markers = [info for info in objects if info.key.endswith("/") and info.size == 0]
        files = [info for info in objects if info not in markers]
        try:
            # Markers first at the destination (a directory keeps its creation time), so
            # that no server has made an implicit folder there before the marker lands.
            for marker in sorted(markers, key=lambda m: m.key):
                original = self.s3.head(marker.key)
                mtime = original.mtime if original else marker.mtime
                self.s3.put(new_prefix + marker.key[len(old_prefix):], b"", object_metadata(mtime, DIR_MODE))
            # Staged files next, so that a commit racing with us lands under the new name,
            # or has landed under the old one and is in the listing taken above.
            with self._lock:
                for file in self._staged_under_locked(old):
                    del self._staged[file.path]
                    new_path = new + file.path[len(old):]
                    self._retarget_locked(file, new_path)
                    self._staged[new_path] = file
            listed = {info.key for info in objects}
            late = [info for info in self.s3.list_all(old_prefix)  # committed before the retarget
                    if info.key not in listed and not info.key.endswith("/")]
            for info in files + late:
                self.s3.copy(info.key, new_prefix + info.key[len(old_prefix):], info.size)
                self.s3.delete(info.key)
                self.objects.invalidate(info.key)
            # Markers last, deepest first, then the directory's own key: some servers keep
            # an empty folder listed until the folder key itself is deleted.
            for marker in sorted(markers, key=lambda m: m.key, reverse=True):
                self.s3.delete(marker.key)
            self.s3.delete(old_prefix)
        except S3Error as err:
            raise _s3_errno(err, f"rename {old} -> {new}") from err

    def symlink(self, path: str, target: str) -> None:
        """A symlink is a small object (body: the target) committed in order like any file."""
        self._check_parent_is_dir(path)
        if self._lookup(path) is not None:
            raise FsError(errno.EEXIST, path)
        file = self._new_staged(path, stat.S_IFLNK | 0o777)
        file.write(target.encode("utf-8", "surrogateescape"), 0)
        with self._lock:
            self._register_locked(file)
        self._make_durable(file)
        ticket = self.uploader.request_commit(file)
        if self.options.write_mode == "sync":
            self._wait(ticket, file)

    def readlink(self, path: str) -> str:
        with self._lock:
            file = self._staged.get(path)
        if file is not None:
            return file.read(file.size, 0).decode("utf-8", "surrogateescape")
        entry = self._lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if not isinstance(entry, ObjectInfo) or not entry.is_symlink:
            raise FsError(errno.EINVAL, path)
        try:
            return self.s3.get_bytes(entry.key).decode("utf-8", "surrogateescape")
        except S3Error as err:
            raise _s3_errno(err, f"readlink {path}") from err

    def link(self, target: str, source: str) -> None:
        raise FsError(errno.EPERM, "hard links are not possible on S3")

    # -- attributes --------------------------------------------------------------------

    def chmod(self, path: str, mode: int) -> None:
        """Kept for files not yet uploaded; accepted (not stored) for objects already in S3."""
        with self._lock:
            file = self._staged.get(path)
            if file is not None:
                with file.lock:
                    file.mode = stat.S_IFMT(file.mode) | (mode & 0o7777)
                return
        if self._lookup(path) is None:
            raise FsError(errno.ENOENT, path)

    def chown(self, path: str, uid: int, gid: int) -> None:
        if self._lookup(path) is None:
            raise FsError(errno.ENOENT, path)

    def utimens(self, path: str, mtime: float | None) -> None:
        """Set the mtime: stored with the object if it is not yet uploaded, else kept for this mount."""
        mtime = time.time() if mtime is None else mtime
        with self._lock:
            file = self._staged.get(path)
            if file is not None:
                with file.lock:
                    file.set_mtime_locked(mtime)
                return
        entry = self._lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if isinstance(entry, ObjectInfo):
            self._mtime_overrides[path] = mtime

    def statfs(self) -> dict[str, int]:
        block = 4096
        total = 1 << 50  # S3 has no capacity; report 1 PiB so that free-space checks pass
        return {"f_bsize": block, "f_frsize": block, "f_blocks": total // block, "f_bfree": total // block,
                "f_bavail": total // block, "f_files": 1 << 32, "f_ffree": 1 << 32, "f_namemax": 255}

    # -- whole-mount operations (sync, status, recovery, shutdown) ---------------------

    def staged_files(self) -> list[StagedFile]:
        with self._lock:
            return list(self._staged.values())

    def sync(self, under: str = "/", timeout: float | None = None) -> list[tuple[str, str]]:
        """Commit everything closed under ``under`` and wait; returns [(path, error)] of failures."""
        prefix = "/" if under == "/" else under.rstrip("/") + "/"
        tickets: list[tuple[StagedFile, Ticket]] = []
        for file in self.staged_files():
            if not (under == "/" or file.path == under or file.path.startswith(prefix)):
                continue
            with file.lock:
                wanted = file.dirty and not file.deleted and file.writers == 0
            if wanted:
                tickets.append((file, self.uploader.request_commit(file)))
        failures = [(lost.path, lost.reason) for lost in self.lost_files()
                    if under == "/" or lost.path == under or lost.path.startswith(prefix)]
        deadline = None if timeout is None else time.monotonic() + timeout
        for file, ticket in tickets:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not ticket.wait(remaining):
                failures.append((file.path, "timed out"))
            elif ticket.error is not None:
                failures.append((file.path, str(ticket.error)))
        return failures

    def recover(self) -> int:
        """Re-queue every journaled file left by an earlier run. Returns how many."""
        known = set()
        count = 0
        leftover_uploads = dict((upload_id, key) for key, upload_id in self.registry.load_all())
        # In close order, as the uploader would have committed them (records of older versions have no close_seq).
        for record in sorted(self.journal.load_all(), key=lambda r: int(r.get("close_seq", 0))):
            file_id = record.get("id", "")
            staging_path = self.cache_dir.staging_path(file_id)
            known.add(staging_path.name)
            if self.journal.data_may_be_torn(record):
                self._keep_lost(record, staging_path)
                continue  # its leftover multipart uploads are aborted below; the object in S3 is not touched
            if not staging_path.exists():
                log.error("journal record for %s has no staging file; dropping it", record.get("path"))
                self.journal.remove(file_id)
                continue
            fd = os.open(staging_path, os.O_RDWR)
            size = os.fstat(fd).st_size
            path = record["path"]
            file = StagedFile(file_id, path, record["key"], staging_path, fd, size=size,
                              mode=int(record.get("mode", FILE_MODE)), mtime=float(record.get("mtime", 0)),
                              part_base=self.options.part_size)
            file.journaled_version = file.version
            file.close_seq = int(record.get("close_seq", 0))
            file.data_synced = bool(record.get("data_synced", True))
            if not file.data_synced:  # the daemon died before the fsync; the page cache still holds the data
                self._sync_data_later(file, file.version)
            kept = 0
            for upload_id in [u for u, key in leftover_uploads.items() if key == file.key]:
                del leftover_uploads[upload_id]
                if not kept and size > self.options.single_put_limit:
                    kept = self.uploader.resume_upload(file, upload_id)
                else:
                    self.uploader.abort_later((file.key, upload_id))
            with self._lock:
                self._staged[path] = file
            self.uploader.request_commit(file)
            count += 1
            log.info("resuming upload of %s (%d bytes, %d part(s) already in S3) from the journal",
                     path, size, kept)
        # Uploads an earlier run started for files that were never closed: debris. Abort them.
        for upload_id, key in leftover_uploads.items():
            self.uploader.abort_later((key, upload_id))
        for leftover in self.cache_dir.staging.glob("*.data"):
            if leftover.name not in known:
                leftover.unlink()  # never closed successfully: nobody was promised this data
        return count

    def _keep_lost(self, record: dict, staging_path: Path) -> None:
        """Recovery met a record whose data a restart of the machine may have torn: report it, never upload it."""
        path = str(record.get("path", "?"))
        kept = staging_path.exists()
        size = staging_path.stat().st_size if kept else int(record.get("size", 0))
        with self._lock:
            self._lost[path] = LostFile(path=path, key=str(record.get("key", "")), file_id=str(record.get("id", "")),
                                        size=size, mtime=float(record.get("mtime", 0)))
        log.error("%s is not uploaded: its data may be incomplete (closed with local_sync=background, the machine "
                  "restarted before the data reached the disk); the object in S3, if any, is left as it was; "
                  "record %s, %s", path, self.journal.directory / f"{record.get('id', '')}.json",
                  f"bytes kept in {staging_path}" if kept else "no bytes left")

    def _clear_lost_locked(self, path: str, why: str) -> None:
        """The path of a lost file is written, renamed or deleted: forget the loss (with self._lock held)."""
        lost = self._lost.pop(path, None)
        if lost is None:
            return
        self.journal.remove(lost.file_id)
        try:
            os.unlink(self.cache_dir.staging_path(lost.file_id))
        except FileNotFoundError:
            pass
        log.info("%s, lost in a restart of the machine, is %s: no longer reported", path, why)

    def lost_files(self) -> list[LostFile]:
        with self._lock:
            return list(self._lost.values())

    def shutdown(self, drain_timeout: float) -> bool:
        self.passthrough.stop()
        self.datasync.shutdown(wait=True)  # a clean stop leaves every record synced
        drained = self.uploader.shutdown(drain_timeout)
        self.downloads.shutdown(wait=False, cancel_futures=True)
        return drained

    def state_metrics(self) -> dict[str, float]:
        """Gauges for the metrics endpoint, computed when scraped."""
        pending = list(self.iter_pending())
        return {"pending_uploads": sum(1 for f in pending if f.failure is None and not f.writers),
                "failed_uploads": sum(1 for f in pending if f.failure is not None) + len(self.lost_files()),
                "dirty_bytes": self.staged_bytes(), "clean_cache_bytes": self.objects.used_bytes()}

    def iter_pending(self) -> Iterable[StagedFile]:
        for file in self.staged_files():
            with file.lock:
                if file.dirty and not file.deleted:
                    yield file
