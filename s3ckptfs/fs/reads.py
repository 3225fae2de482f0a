"""Reads: bytes from the staging file or the cached copy, downloaded by block when missing.

An object read through the mount is fetched in blocks of ``read_block`` bytes by
parallel ranged GETs into a sparse cached copy (ObjectCache), validated by ETag.
A sequential reader's read-ahead window doubles per read up to ``read_ahead``;
a reader waits only for the bytes it asked for, not the whole block.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from ..cache import CachedObject
from ..errors import FsError, S3Error
from ..handles import Handle
from ..store import ObjectInfo
from ..staging import StagedFile
from .core import Core, s3_errno
from .lifecycle import free_staging

log = logging.getLogger(__name__)
T = TypeVar("T")

# S3 answers that an object read by key is no longer what the lookup said: moved or replaced since.
_GONE_OR_CHANGED = ("NoSuchKey", "NotFound", "404", "PreconditionFailed")
# How long a read waits for the path to name something new once its object moved: a move
# made in S3 deletes the old key a moment before the mount stops showing it there.
FOLLOW_WAIT = 5.0


class Reads:
    """read, read-ahead, block downloads and whole-object hydration. Thread-safe."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.downloads = ThreadPoolExecutor(max_workers=core.options.download_concurrency,
                                            thread_name_prefix="s3ckptfs-get")
        # path -> where its bytes may be in S3 now, most likely first (Lookup.locations)
        self.locations: Callable[[str], list[ObjectInfo]] | None = None
        # told of each object whose copy here became complete by downloads (dedup.py hashes it)
        self.object_complete: Callable[[CachedObject], None] | None = None

    def following(self, path: str, entry: ObjectInfo, fetch: Callable[[ObjectInfo], T],
                  accept: Callable[[ObjectInfo], bool] = lambda place: True) -> T:
        """``fetch(entry)``; if S3 says the object moved or changed since ``entry`` was looked up,
        ``fetch`` it where ``path``'s bytes may be now (those places that ``accept`` takes).

        A rename of an object already in S3 is made there later, in close order (remoteops.py):
        until then the path shows the object under its old key, which the move deletes once
        it has copied it. Moves can chain (``rename a b; rename b a``): the bytes are then under
        the first move's source, then its destination, then the second's destination, and
        ``locations`` names each place. Raises the S3Error when none of them holds the bytes
        within ``FOLLOW_WAIT``.
        """
        deadline = time.monotonic() + FOLLOW_WAIT
        delay = 0.005
        while True:
            try:
                return fetch(entry)
            except S3Error as err:
                if err.code not in _GONE_OR_CHANGED or self.locations is None:
                    raise
                failed = (entry.key, entry.etag)
                for place in self.locations(path):
                    if (place.key, place.etag) == failed or not accept(place):
                        continue
                    try:
                        result = fetch(place)
                    except S3Error as again:
                        if again.code not in _GONE_OR_CHANGED:
                            raise
                        continue
                    log.info("%s: %s@%s is gone (%s); read %s", path, entry.key, entry.etag or "?", err.code,
                             place.key)
                    return result
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)  # between a move's copy and the mount showing its outcome
                delay = min(delay * 2, 0.25)
                now = [place for place in self.locations(path) if accept(place)]
                if not now:
                    raise
                entry = now[0]

    def hydrate(self, file: StagedFile, entry: ObjectInfo) -> ObjectInfo:
        """Fill a new staging file with the whole object at ``file.path`` (parallel ranged GETs),
        following it if it moves meanwhile (``following``). Returns what it read."""
        try:
            return self.following(file.path, entry, lambda now: self._hydrate_from(file, now))
        except S3Error as err:
            free_staging(file)
            raise s3_errno(err, f"download {file.path}") from err
        except OSError as exc:
            free_staging(file)
            raise FsError(exc.errno or errno.EIO, f"download {file.path}: {exc}") from exc

    def _hydrate_from(self, file: StagedFile, entry: ObjectInfo) -> ObjectInfo:
        os.ftruncate(file.fd, entry.size)
        file.size = entry.size
        block = self.core.options.read_block
        store = self.core.store
        futures = [self.downloads.submit(store.get_range_into, entry.key, start,
                                         min(block, entry.size - start), file.fd, entry.etag or None)
                   for start in range(0, entry.size, block)]
        first_error: BaseException | None = None
        for future in futures:  # all of them: none may still write into the file when it is refilled
            try:
                future.result()
            except (S3Error, OSError) as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return entry

    def fetch_rest(self, entry: CachedObject) -> list[Future]:
        """Start downloading every block of ``entry`` not cached yet; their downloads.

        For handles still reading an object whose name is unlinked or replaced: the change
        in S3 waits for these (``RemoteOp.readers_first``), so they read on what they opened."""
        if entry.complete or entry.size == 0:
            return []
        blocks = range((entry.size + entry.block_size - 1) // entry.block_size)
        fetches = (self.core.objects.fetch_block(entry, number, self._start_download) for number in blocks)
        return [future for future in fetches if future is not None]

    def read(self, fh: int, size: int, offset: int) -> bytes:
        fd, start, length = self.read_source(fh, size, offset)
        return os.pread(fd, length, start) if length else b""

    def read_source(self, fh: int, size: int, offset: int) -> tuple[int, int, int]:
        """Where the bytes of a read are: (fd, offset, length), present on local disk.

        The FUSE layer hands this to libfuse, which moves the bytes to the kernel
        without a copy in Python. The fd stays valid while the handle is open (a
        staged file is not retired and a cached copy is not evicted while open).
        """
        handle = self.core.handles.get(fh)
        if handle.staged is not None:
            file = handle.staged
            return file.fd, offset, max(0, min(size, file.size - offset))
        return self._read_remote(handle, size, offset)

    def _read_remote(self, handle: Handle, size: int, offset: int) -> tuple[int, int, int]:
        """Read through the handle's cached copy; if its object moved in S3 since the open (a
        rename made there in close order, maybe a chain of them), read on from where the same
        bytes are now: the copy a move of this mount made of it (``ObjectCache.latest_copy``),
        else another key of the same size that the path's pending moves name (``following``)."""
        reading = handle.remote
        assert reading is not None

        def read_at(place: ObjectInfo) -> tuple[int, int, int]:
            key, etag = self.core.objects.latest_copy(place.key, place.etag)
            place = dataclasses.replace(place, key=key, etag=etag)
            if (place.key, place.etag) != (handle.remote.key, handle.remote.etag):
                self._read_on_from(handle, place)
            return self._read_blocks(handle, size, offset)

        def where_it_may_be(place: ObjectInfo) -> bool:
            # Another key of the same size, where a pending move takes it; or, opened with no
            # version known (a path shown by a move whose copy had not landed), what its key holds.
            # Not for a file whose name is gone: its path names another file now.
            return (handle.named and place.size == reading.size
                    and (place.key != reading.key or not reading.etag))

        try:
            return self.following(handle.path, reading, read_at, where_it_may_be)
        except S3Error as err:
            if err.code == "PreconditionFailed":
                self.core.meta.forget(handle.path)
                log.warning("%s changed in S3 while open; reopen to read the new version", handle.path)
                raise FsError(errno.ESTALE, handle.path) from err
            raise s3_errno(err, f"read {handle.path}") from err

    def _read_on_from(self, handle: Handle, place: ObjectInfo) -> None:
        old = handle.cached
        handle.cached = self.core.objects.acquire(place.key, place.etag, place.size)
        handle.remote = place
        if old is not None:
            self.core.objects.release(old)
        log.info("%s moved in S3 while open: reading on from %s", handle.path, place.key)

    def _read_blocks(self, handle: Handle, size: int, offset: int) -> tuple[int, int, int]:
        info, entry = handle.remote, handle.cached
        assert info is not None and entry is not None
        if offset >= info.size or size <= 0:
            return entry.fd, offset, 0
        end = min(offset + size, info.size)
        block = entry.block_size
        # Sequential means near where the last read ended: the kernel's own read-ahead
        # sends requests slightly out of order, and zip readers skip small gaps.
        if abs(offset - handle.next_offset) <= 2 * block:
            handle.window = min(max(handle.window * 2, block), self.core.options.read_ahead)
        else:
            handle.window = 0
        handle.next_offset = max(end, handle.next_offset) if handle.window else end
        ahead_end = min(info.size, end + handle.window)
        needed_last = (end - 1) // block
        waits: list[tuple[int, Future]] = []
        objects = self.core.objects
        for number in range(offset // block, (ahead_end - 1) // block + 1):
            future = objects.fetch_block(entry, number, self._start_download)
            if future is not None and number <= needed_last:
                waits.append((number, future))
        for number, future in waits:
            try:
                objects.wait_for(entry, number, min(end - number * block, block), future)
            except S3Error as err:
                if err.code in _GONE_OR_CHANGED:
                    raise  # moved or changed since the open: _read_remote follows it
                raise s3_errno(err, f"read {handle.path}") from err
            except TimeoutError as exc:
                log.error("read %s: %s", handle.path, exc)
                raise FsError(errno.EIO, f"read {handle.path}: {exc}") from exc
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
            self.core.store.get_range_into(entry.key, start, length, entry.fd, entry.etag or None,
                                           progress=lambda done: self.core.objects.block_progress(entry, number,
                                                                                                  done))
            ok = True
        finally:
            if self.core.objects.block_done(entry, number, ok, length) and self.object_complete is not None:
                self.object_complete(entry)

    def shutdown(self) -> None:
        self.downloads.shutdown(wait=False, cancel_futures=True)
