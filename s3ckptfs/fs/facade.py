"""``Filesystem``: the semantics of one mount, with no FUSE in sight: paths in, bytes and stat records out.

A thin facade over rooms with one job each, built and wired here:

* ``Lookup``      lookups, getattr, readdir (lookup.py)
* ``Opens``       create, open (opens.py)
* ``Reads``       reads, read-ahead, block downloads, hydration (reads.py)
* ``Writes``      write, truncate, backpressure (writes.py)
* ``Durability``  fsync and journal at close (durability.py)
* ``Lifecycle``   flush, fsync, release, commit-or-retire; the uploader's listener (lifecycle.py)
* ``Namespace``   unlink, mkdir, rmdir, rename, symlinks, attributes (namespace.py)
* ``Recovery``    resume from the journal, sync (recovery.py)

They share a ``Core`` (core.py) holding the mount's parts and the path table.
Paths are absolute within the mount ("/", "/run/step_1.pt"); the object key is
the mount's prefix plus the path without its leading slash. Every public method
either returns or raises ``FsError`` with the errno for the caller; S3 failures
are logged with their cause and mapped in errors.py.
"""

from __future__ import annotations

import errno
from typing import Callable, Iterable

from ..cache import CacheDir
from ..config import MountConfig
from ..dedup import Dedup
from ..errors import FsError
from ..listings import DB_NAME as LISTINGS_DB, KeptListings
from ..metrics import Metrics
from ..parthashes import DB_NAME as HASHES_DB, PartHashes
from ..passthrough import PassthroughBackend, PassthroughFiles
from ..staging import StagedFile
from ..store import ObjectStore
from ..uploader import Uploader
from .attributes import Attributes
from .core import Core, Stat
from .durability import Durability
from .lifecycle import Lifecycle
from .lookup import Lookup
from .namespace import Namespace
from .opens import Opens
from .pending import PendingOps
from .reads import Reads
from .recovery import Recovery
from .table import LostFile
from .writes import Writes


class Filesystem:
    """The semantics of one mount. Thread-safe: FUSE calls it from many threads."""

    def __init__(self, config: MountConfig, store: ObjectStore, cache_dir: CacheDir,
                 metrics: Metrics | None = None, *, backoff: Callable[[int], float] | None = None) -> None:
        core = Core(config, store, cache_dir, metrics or Metrics())
        opts = core.options
        self.core = core
        self.config = config
        self.options = opts
        self.cache_dir = cache_dir
        self.objects = core.objects
        self.handles = core.handles
        self.durability = Durability(core)
        self.lifecycle = Lifecycle(core, self.durability)
        hashes = PartHashes(cache_dir.root / HASHES_DB) if opts.dedup != "off" else None
        self.dedup = Dedup(store, hashes, core.metrics, adaptive=opts.dedup == "auto")
        self.uploader = Uploader(store, concurrency=opts.upload_concurrency, single_put_limit=opts.single_put_limit,
                                 dedup=self.dedup,
                                 listener=self.lifecycle, registry=core.registry, upload_nice=opts.upload_nice,
                                 eager_uploads=opts.eager_uploads, retry_window=opts.retry_window,
                                 checksums=opts.checksums, metrics=metrics, backoff=backoff)
        self.lifecycle.uploader = self.uploader
        core.passthrough = self.passthrough = PassthroughFiles(core, self.uploader.part_filled)
        self.lookup = Lookup(core)
        self.reads = Reads(core)
        self.reads.locations = self.lookup.locations
        if self.dedup.enabled:
            self.reads.object_complete = lambda entry: self.dedup.remember_read(
                entry.key, entry.etag, entry.size, entry.fd, opts.part_size)
        self.opens = Opens(core, self.lookup, self.reads, self.lifecycle)
        self.writes = Writes(core, self.lookup, self.opens, self.reads, self.lifecycle, self.durability,
                             self.uploader)
        self.pending = PendingOps(core, self.uploader, self.lifecycle.conflicts)
        self.lifecycle.pending = self.pending
        self.namespace = Namespace(core, self.lookup, self.opens, self.reads, self.lifecycle, self.durability,
                                   self.pending, self.uploader)
        self.attributes = Attributes(core, self.lookup)
        self.recovery = Recovery(core, self.durability, self.pending, self.uploader)
        # Kept listings outlive the process: a restart during an outage answers from them.
        self.kept_listings = KeptListings(cache_dir.root / LISTINGS_DB if opts.stale_if_error > 0 else None,
                                          config.source)
        self.kept_listings.start(core.meta)

    # -- FUSE passthrough ----------------------------------------------------------------

    def enable_passthrough(self, backend: PassthroughBackend) -> None:
        """Called by the FUSE layer once the kernel has agreed to passthrough."""
        self.passthrough.enable(backend)

    def backing_id(self, fh: int) -> int:
        return self.handles.get(fh).backing_id

    def keep_cache(self, fh: int) -> bool:
        return self.opens.keep_cache(fh)

    # -- the operations, by room -----------------------------------------------------------

    def key_for(self, path: str) -> str:
        return self.core.key_for(path)

    def getattr(self, path: str, fh: int | None = None) -> Stat:
        return self.lookup.getattr(path, fh)

    def readdir(self, path: str) -> list[tuple[str, Stat | None]]:
        return self.lookup.readdir(path)

    def create(self, path: str, mode: int, flags: int) -> int:
        return self.opens.create(path, mode, flags)

    def open(self, path: str, flags: int) -> int:
        return self.opens.open(path, flags)

    def read(self, fh: int, size: int, offset: int) -> bytes:
        return self.reads.read(fh, size, offset)

    def read_source(self, fh: int, size: int, offset: int) -> tuple[int, int, int]:
        return self.reads.read_source(fh, size, offset)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        return self.writes.write(fh, data, offset)

    def write_with(self, fh: int, offset: int, length: int, copy: Callable[[int, int], int]) -> int:
        return self.writes.write_with(fh, offset, length, copy)

    def truncate(self, path: str | None, length: int, fh: int | None = None) -> None:
        self.writes.truncate(path, length, fh)

    def flush(self, fh: int) -> None:
        self.lifecycle.flush(fh)

    def fsync(self, fh: int) -> None:
        self.lifecycle.fsync(fh)

    def release(self, fh: int) -> None:
        self.lifecycle.release(fh)

    def unlink(self, path: str, keep_open_as: str = "") -> None:
        self.namespace.unlink(path, keep_open_as)

    def kept_open(self, name: str) -> int | None:
        """A file handle open on the unlinked file kept as ``name`` (see ``unlink``), or None."""
        return self.handles.kept(name)

    def mkdir(self, path: str, mode: int) -> None:
        self.namespace.mkdir(path, mode)

    def rmdir(self, path: str) -> None:
        self.namespace.rmdir(path)

    def rename(self, old: str, new: str) -> None:
        self.namespace.rename(old, new)

    def symlink(self, path: str, target: str) -> None:
        self.namespace.symlink(path, target)

    def readlink(self, path: str) -> str:
        return self.namespace.readlink(path)

    def link(self, target: str, source: str) -> None:
        raise FsError(errno.EPERM, "hard links are not possible on S3")

    def chmod(self, path: str, mode: int) -> None:
        self.attributes.chmod(path, mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.attributes.chown(path, uid, gid)

    def utimens(self, path: str, mtime: float | None) -> None:
        self.attributes.utimens(path, mtime)

    def statfs(self) -> dict[str, int]:
        block = 4096
        total = 1 << 50  # S3 has no capacity; report 1 PiB so that free-space checks pass
        return {"f_bsize": block, "f_frsize": block, "f_blocks": total // block, "f_bfree": total // block,
                "f_bavail": total // block, "f_files": 1 << 32, "f_ffree": 1 << 32, "f_namemax": 255}

    # -- whole-mount operations (sync, status, recovery, shutdown) -----------------------

    def staged_files(self) -> list[StagedFile]:
        return self.core.table.files()

    def staged_bytes(self) -> int:
        return self.core.table.staged_bytes()

    def lost_files(self) -> list[LostFile]:
        return self.core.table.lost_files()

    def sync(self, under: str = "/", timeout: float | None = None) -> list[tuple[str, str]]:
        return self.recovery.sync(under, timeout)

    def recover(self) -> int:
        return self.recovery.recover()

    def note_outage(self, reason: str) -> None:
        """S3 did not answer the start-up check: lookups answer from kept listings at once."""
        self.lookup.outage.begin(reason)

    def s3_status(self) -> dict[str, object]:
        """Whether S3 answers metadata requests, for ``status``."""
        return self.lookup.outage.status()

    def shutdown(self, drain_timeout: float) -> bool:
        self.passthrough.stop()
        self.durability.shutdown()
        drained = self.uploader.shutdown(drain_timeout)
        self.reads.shutdown()
        self.dedup.shutdown(wait=False)
        self.lookup.requests.shutdown()
        self.lookup.side_requests.shutdown()
        self.kept_listings.stop()
        return drained

    def join_threads(self, timeout: float = 10.0) -> bool:
        """After ``shutdown``: wait for the threads it leaves running (part uploads, downloads, the
        commit thread). A daemon exits right after shutdown; a process that goes on calls this.
        True if they all stopped."""
        self.reads.downloads.shutdown(wait=True, cancel_futures=True)
        self.dedup.shutdown(wait=True)
        return self.uploader.join(timeout)

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
