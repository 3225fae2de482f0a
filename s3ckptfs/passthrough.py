"""FUSE passthrough: the kernel reads and writes local files itself, bypassing the daemon.

Two kinds of files are handed to the kernel: staging files of files being written
(and read while staged), and complete downloaded copies of objects opened for
reading (a checkpoint written or read once on this node is then loaded at local
disk speed). The kernel fails (EIO) any open of an inode it passes through to a
file that is not passed through to that same file, so every open of such an inode
shares its backing file: a writer takes over the cached copy its readers use.

For writers the daemon sees no write, so this module does what the write path did:
it decides per open session whether a staged file may be handed to the kernel
(room on the cache disk, cache_size, no ordinary open of the same inode), keeps
one refcounted kernel backing id per staged file, reserves disk blocks ahead of
the writer so that a write cannot fail unseen for lack of space, and polls the
staging files of open writers to drive eager uploads and disk writeback.
Correctness does not rest on the poller's guesses: the uploader checks every
early part by CRC32C before completing (see docs/design.md, "FUSE passthrough").
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from typing import Callable, Protocol

from . import locks
from . import partplan
from .cache import CacheDir, CachedObject, ObjectCache
from .config import Options
from .handles import Handle, HandleTable
from .staging import StagedFile, start_writeback

log = logging.getLogger(__name__)

# FUSE passthrough (see docs/design.md): writes bypass the daemon, so it polls the
# staging files of open writers, and reserves disk blocks ahead of them.
PT_POLL_INTERVAL = 0.15
PT_RESERVE_MIN = 64 << 20     # reserved ahead of a passthrough writer at first...
PT_RESERVE_MAX = 1 << 30      # ...growing with the file up to this
PT_HEADROOM = 1 << 30         # free disk beyond what the clean cache may still take


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class PassthroughBackend:
    """Kernel backing files for FUSE passthrough (implemented by the FUSE layer)."""

    def open(self, fd: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self, backing_id: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class StagedFiles(Protocol):
    """The files staged on the mount (the core's path table)."""

    def files(self) -> list[StagedFile]: ...

    def staged_bytes(self) -> int: ...


class PassthroughHost(Protocol):
    """What passthrough needs of the mount: its options, open handles, caches and staged files."""

    options: Options
    handles: HandleTable
    objects: ObjectCache
    cache_dir: CacheDir
    table: StagedFiles


class PassthroughFiles:
    """The passthrough side of one mount: backing ids, reservations, the poller."""

    def __init__(self, host: PassthroughHost, part_filled: Callable[[StagedFile, int], None]) -> None:
        self.host = host
        self._part_filled = part_filled  # hands a part the writer moved past to eager upload
        self.backing: PassthroughBackend | None = None
        self.active = False                  # new open sessions may use passthrough
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._refused: set[str] = set()      # reasons already logged for not using passthrough
        # Kernel backing ids, one per local file (the kernel allows one per inode): holders
        # are a staged file, a cached copy, or both when a writer took over the cached copy
        # that readers are passed through to.
        self._holders: dict[int, int] = {}
        self._file_of: dict[int, tuple[int, int]] = {}     # backing id -> (st_dev, st_ino)
        self._backing_of: dict[tuple[int, int], int] = {}
        self._holders_lock = locks.new_lock("passthrough.holders")

    def enable(self, backend: PassthroughBackend) -> None:
        self.backing = backend
        self.active = True
        threading.Thread(target=self._poll_loop, name="s3ckptfs-pt-poll", daemon=True).start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def attach_locked(self, file: StagedFile, path: str, writable: bool) -> int:
        """A handle of ``file`` opens (file.lock held): its backing id, or 0 for the ordinary path."""
        if file.handles == 0 and not file.backing_id:  # (else taken over from passed-through readers)
            file.passthrough = self.choose_locked(file, path)
        if file.passthrough and not file.backing_id:  # first handle of this session
            file.backing_id = self._open_backing(file.fd)
            if not file.backing_id:
                file.passthrough = False
                file.release_reservation_locked()
        if not file.passthrough:
            return 0
        file.pt_handles += 1
        if writable:
            file.pt_writers += 1
            file.pt_epoch += 1
        return file.backing_id

    def attach_cached_locked(self, entry: CachedObject, path: str) -> int:
        """A read-only open of a downloaded object (the mount's lock held): its backing id, or 0.

        Only a complete copy qualifies (the kernel would serve the holes of a partial
        one as zeros), and only while every other open of the path shares it.
        """
        if not self.active or self.host.options.passthrough != "auto" or not entry.complete \
                or self._others_on(path, entry.fd) == "other":
            return 0
        if not entry.backing_id:
            entry.backing_id = self._open_backing(entry.fd)
            if not entry.backing_id:
                return 0
        entry.pt_handles += 1
        return entry.backing_id

    def release_cached_locked(self, entry: CachedObject) -> None:
        """A passthrough reader of ``entry`` closed (the mount's lock held)."""
        entry.pt_handles -= 1
        if entry.pt_handles == 0 and entry.backing_id:
            backing_id, entry.backing_id = entry.backing_id, 0
            self._drop_backing(backing_id, entry.key)

    def _others_on(self, path: str, fd: int) -> str:
        """Other opens of ``path``: "none", all passed through to the file of ``fd`` ("same"), or "other"."""
        others = self.host.handles.open_on(path)
        if not others:
            return "none"
        identity = _identity(fd)
        with self._holders_lock:
            same = all(h.backing_id and self._file_of.get(h.backing_id) == identity for h in others)
        return "same" if same else "other"

    def kernel_backed_locked(self, path: str, backing_id: int) -> bool:
        """Whether another open of ``path`` has the kernel pass it through to another file.

        The kernel fails (EIO) any open of such an inode that is not passed through to
        that same file, so the daemon refuses it first, with a reason.
        """
        return any(h.backing_id and h.backing_id != backing_id for h in self.host.handles.open_on(path))

    def _open_backing(self, fd: int) -> int:
        """The backing id of ``fd``'s file (registered with the kernel once), or 0 (passthrough is then off)."""
        identity = _identity(fd)
        with self._holders_lock:
            backing_id = self._backing_of.get(identity)
            if backing_id:
                self._holders[backing_id] += 1
                return backing_id
        try:
            backing_id = self.backing.open(fd)  # type: ignore[union-attr]
        except OSError as exc:
            log.warning("FUSE passthrough turned off: the kernel refused a backing file (%s)", exc)
            self.active = False
            return 0
        with self._holders_lock:
            self._holders[backing_id] = 1
            self._file_of[backing_id] = identity
            self._backing_of[identity] = backing_id
        return backing_id

    def _drop_backing(self, backing_id: int, what: str) -> None:
        with self._holders_lock:
            self._holders[backing_id] -= 1
            if self._holders[backing_id] > 0:
                return
            del self._holders[backing_id]
            del self._backing_of[self._file_of.pop(backing_id)]
        try:
            if self.backing is not None:
                self.backing.close(backing_id)
        except OSError as exc:
            log.warning("closing passthrough backing file %d of %s failed: %s", backing_id, what, exc)

    def _refuse(self, reason: str) -> bool:
        if reason not in self._refused:
            self._refused.add(reason)
            log.info("FUSE passthrough not used for some files: %s", reason)
        return False

    def choose_locked(self, file: StagedFile, path: str) -> bool:
        """Whether a file's next open session uses passthrough (the mount's lock and file.lock held).

        Only with room to spare: a passthrough writer's ENOSPC reaches the writer alone,
        and cache_size cannot hold back a writer the daemon does not see.
        """
        if not self.active or not stat.S_ISREG(file.mode) or file.fd < 0:
            return False
        # The kernel refuses to mix passthrough and ordinary opens of one inode.
        others = self._others_on(path, file.fd)
        if others == "other":
            return False
        file.reserved_end = file.size
        file.at_risk_from = None
        if others == "same":
            # Readers are passed through to this very file (a writer took over their cached
            # copy): it must be passed through too. Space is reserved as far as it goes.
            self.reserve_locked(file)
            self._watch_locked(file)
            return True
        if self.host.options.cache_size and self.host.table.staged_bytes() + PT_RESERVE_MIN > self.host.options.cache_size:
            return self._refuse("cache_size reached (such writes wait for uploads, through the daemon)")
        clean_room = max(0, self.host.objects.limit_bytes - self.host.objects.used_bytes())
        if self.host.cache_dir.disk_free() - clean_room < PT_HEADROOM + PT_RESERVE_MIN:
            return self._refuse("cache disk nearly full (a failed write must be seen by the daemon)")
        if not file.reserve_locked(file.size + PT_RESERVE_MIN):
            return self._refuse("cannot reserve space in the cache dir (fallocate)")
        self._watch_locked(file)
        return True

    @staticmethod
    def _watch_locked(file: StagedFile) -> None:
        """Start noticing writes the daemon will not see: by size and mtime, and parts filled."""
        ns = int(file.mtime * 1e9)
        os.utime(file.fd, ns=(ns, ns))
        file.observed = (os.fstat(file.fd).st_size, ns)
        file.pt_filled = partplan.part_number(file.size, file.part_base) - 1

    def _poll_loop(self) -> None:
        """Drive eager uploads and disk writeback of passthrough writers, which the daemon does not see."""
        while not self._stop.is_set():
            files = [f for f in self.host.table.files() if f.pt_writers > 0]
            if not files:
                self._wake.wait()
                self._wake.clear()
                continue
            for file in files:
                try:
                    self._poll(file)
                except Exception:  # never let the poller die
                    log.exception("passthrough poll of %s failed", file.path)
            self._stop.wait(PT_POLL_INTERVAL)

    def _poll(self, file: StagedFile) -> None:
        with file.lock:
            if file.deleted or file.fd < 0 or not file.pt_writers:
                return
            file.observe_locked()
            size, base = file.size, file.part_base
            self.reserve_locked(file)
            # Writers of checkpoints write sequentially: parts a whole part below the end
            # are taken as written. A guess only: commit checks them (CRC32C) before completing.
            last = partplan.part_number(size - base, base) - 1 if size > base else 0
            first, file.pt_filled = file.pt_filled + 1, max(file.pt_filled, last)
            fd = file.fd
        for number in range(first, last + 1):
            self._part_filled(file, number)
        if last >= 1:
            filled_end = partplan.part_range(last, base)[1]
            if filled_end > file.writeback_from:
                start_writeback(fd, file.writeback_from, filled_end - file.writeback_from)
                file.writeback_from = filled_end
        if self.host.options.cache_size:
            self.host.objects.evict(self.host.options.cache_size - self.host.table.staged_bytes())

    def reserve_locked(self, file: StagedFile) -> None:
        """Keep disk blocks reserved ahead of a passthrough writer; note where that failed."""
        if file.at_risk_from is not None:
            return
        ahead = min(max(file.size, PT_RESERVE_MIN), PT_RESERVE_MAX)
        if file.reserved_end - file.size >= ahead // 2:
            return
        for amount in (ahead, ahead // 8, 0):
            if file.reserve_locked(file.size + amount):
                break
        if amount < ahead:  # less than a full window left on the disk
            file.at_risk_from = file.reserved_end
            log.warning("cache disk full: writes to %s past %d bytes may fail; if they do it will not be "
                        "uploaded", file.path, file.reserved_end)

    def settle(self, file: StagedFile) -> None:
        """A passthrough writer syncs or closes: take what it wrote; refuse to publish a possibly failed write."""
        with file.lock:
            if file.deleted or file.fd < 0:
                return
            file.may_have_changed_locked()
            if file.size > file.reserved_end and file.at_risk_from is None and not file.reserve_locked(file.size):
                file.at_risk_from = file.reserved_end
            if file.write_error is None and file.at_risk_from is not None and file.size >= file.at_risk_from:
                # The writer may have got ENOSPC past the reserved blocks; only it knows.
                file.fail_writes_locked(errno.ENOSPC)
                log.error("%s grew past the space that could be reserved in the cache; a write may have failed "
                          "(ENOSPC), so it will not be uploaded", file.path)
            elif file.size > partplan.max_object_size(file.part_base):
                file.fail_writes_locked(errno.EFBIG)

    def release_locked(self, file: StagedFile, handle: Handle) -> None:
        file.pt_handles -= 1
        if handle.writable:
            file.pt_writers -= 1
            # Written after close through a shared mapping (seen only as a change of the file)?
            if not file.deleted and file.observe_locked():
                file.pt_epoch += 1
            if file.pt_writers == 0:
                file.release_reservation_locked()
        if file.pt_handles == 0 and file.backing_id:
            backing_id, file.backing_id = file.backing_id, 0
            self._drop_backing(backing_id, file.path)
