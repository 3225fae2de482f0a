"""What every room of the filesystem core shares: the mount's parts, its paths and its stat records.

``Core`` is plain wiring: the configuration, the object store, the cache dir with
its journal and object cache, the metadata cache, the open-file table and the
path table. It owns no behaviour beyond turning paths into keys; each room
(lookup, opens, reads, writes, lifecycle, namespace, recovery) holds one job and
reaches the others through the ``Filesystem`` facade's wiring, never by import
of a room above it.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
import uuid
from dataclasses import dataclass

from .. import locks
from ..cache import CacheDir, ObjectCache, UploadRegistry
from ..journal import Journal
from ..config import MountConfig
from ..errors import FsError, S3Error
from ..handles import HandleTable
from ..metadata import MetadataCache
from ..metrics import Metrics
from ..passthrough import PassthroughFiles
from ..store import ObjectStore
from .table import PathTable

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


def s3_errno(err: S3Error, what: str) -> FsError:
    """The FsError an S3 failure becomes at the filesystem boundary (logged with its cause)."""
    code = err.errno
    if code == errno.EIO:
        log.error("%s: %s", what, err)
    else:
        log.info("%s: %s", what, err)
    return FsError(code, f"{what}: {err}")


def parent_of(path: str) -> str:
    return path.rpartition("/")[0] or "/"


class Core:
    """The parts of one mount that every room uses. Built once by the facade."""

    def __init__(self, config: MountConfig, store: ObjectStore, cache_dir: CacheDir, metrics: Metrics) -> None:
        opts = config.options
        self.config = config
        self.options = opts
        self.prefix = config.prefix
        self.store = store
        self.cache_dir = cache_dir
        self.metrics = metrics
        self.meta = MetadataCache(opts.metadata_ttl, opts.negative_ttl, opts.stale_if_error)
        self.journal = Journal(cache_dir.journal_dir)
        clean_limit = opts.cache_size or max(cache_dir.disk_free() // 2, 1 << 30)
        self.objects = ObjectCache(cache_dir.objects, opts.read_block, clean_limit)
        self.registry = UploadRegistry(cache_dir.uploads)
        self.handles = HandleTable()
        self.table = PathTable()
        self.mount_time = time.time()
        self.room = locks.new_condition(locks.new_lock("room"))  # notified when staged data leaves the cache
        self.passthrough: PassthroughFiles  # set by the facade
        # Staged files' ids start with it; objects carry their file's id (x-amz-meta-writer).
        self.node_id = cache_dir.node_id()

    def new_file_id(self) -> str:
        return f"{self.node_id}-{uuid.uuid4().hex}"

    def room_freed(self) -> None:
        with self.room:
            self.room.notify_all()

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

    def dir_key(self, path: str) -> str:
        """The prefix of the keys under directory ``path`` (the mount's prefix for "/")."""
        return self.prefix if path == "/" else self.key_for(path) + "/"
