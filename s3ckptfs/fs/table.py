"""The path table: which paths this mount holds locally, guarded by the mount's lock.

A path is in the table while a ``StagedFile`` stands for it: the file is being
written, or was written here and is not yet committed and retired to the object
cache. Directories made here by mkdir are staged the same way, in ``dirs``: their
``dir/`` marker object is committed in close order like any file, so mkdir never
waits for S3. The table also keeps the files a restart of the machine may have torn
(``LostFile``, reported until their path is written or deleted), mtimes set on
objects already in S3 (kept for this mount only), and the version of each object
seen at its last open (for the kernel's page cache).

Namespace changes of objects already in S3 are made there later, in close order
(see remoteops.py); until then the table shows their outcome: ``gone`` holds the
paths that no longer exist here (a path below a gone directory is gone too), and
``moved`` the paths that exist here under their new name.

The table is data. The rooms change it with the mount's lock (``lock``) held and
do the slow part of their work (S3 requests, fsync) without it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from .. import locks

from ..conditions import Expected
from ..remoteops import MOVE, RemoteOp
from ..staging import StagedFile


@dataclass(frozen=True)
class LostFile:
    """What the mount keeps but will not send: a closed file whose data had not reached the disk when
    the machine went down (local_sync=background), or a file or namespace change S3 refused as a
    conflict (``state`` "conflict", conflicts.py).

    Never uploaded; shown by status and sync until its path is written again, renamed
    or deleted through the mount. Its record and staging file stay in the cache dir
    until then.
    """
    path: str
    key: str
    file_id: str
    size: int
    mtime: float
    reason: str = ("lost: the machine restarted before its data reached the cache disk (local_sync=background); "
                   "not uploaded, the object in S3 is unchanged; cleared when the path is written or deleted")
    state: str = "failed"   # "conflict": set aside after S3 refused it (conflicts.py)


def under(path: str, candidate: str) -> bool:
    """Whether ``candidate`` is ``path`` itself or lies below it."""
    return path == "/" or candidate == path or candidate.startswith(path.rstrip("/") + "/")


class PathTable:
    """path -> StagedFile, lost files, mtime overrides. Every method expects ``lock`` held unless it says."""

    def __init__(self) -> None:
        # The mount's lock; re-entrant, see its row in s3ckptfs/locks.py.
        self.lock = locks.new_rlock("mount")
        self.staged: dict[str, StagedFile] = {}
        self.dirs: dict[str, StagedFile] = {}   # directories made here whose marker is not yet committed
        self.lost: dict[str, LostFile] = {}
        self.mtime_overrides: dict[str, float] = {}
        self.opened_versions: dict[str, tuple[str, str]] = {}  # path -> (key, ETag) at its last open
        self.gone: dict[str, RemoteOp] = {}       # path -> the pending op that removes it from S3
        self.moved: dict[str, tuple[object, RemoteOp]] = {}  # path -> (its entry, the pending op that moves it)
        self.ops: dict[str, RemoteOp] = {}        # op id -> namespace change not yet made in S3
        self.failed_ops: dict[str, str] = {}      # op id -> why it was given up (kept; sync tries again)
        # Markers of directories made here that a rename filled from S3 (objects moved in under
        # them): once those moves have run, the table no longer holds all they contain.
        self.filled_from_s3: weakref.WeakSet[StagedFile] = weakref.WeakSet()

    def get(self, path: str) -> StagedFile | None:
        return self.staged.get(path)

    def hidden_locked(self, path: str) -> bool:
        """Whether ``path`` (or a directory above it) was removed here, its removal in S3 pending."""
        if not self.gone:
            return False
        while True:
            if path in self.gone:
                return True
            if path == "/":
                return False
            path = path.rpartition("/")[0] or "/"

    def moved_below_locked(self, path: str) -> list[tuple[str, object]]:
        """(path, entry) of the paths shown under a new name strictly below directory ``path``."""
        prefix = "/" if path == "/" else path + "/"
        return [(p, entry) for p, (entry, _) in self.moved.items() if p.startswith(prefix)]

    def entries_of(self, file: StagedFile) -> dict[str, StagedFile]:
        """The dict that holds ``file``: files or directory markers."""
        return self.dirs if file.is_dir_marker else self.staged

    def holds(self, file: StagedFile) -> bool:
        return self.entries_of(file).get(file.path) is file

    def put_locked(self, file: StagedFile) -> None:
        self.entries_of(file)[file.path] = file

    def drop_locked(self, file: StagedFile) -> None:
        if self.holds(file):
            del self.entries_of(file)[file.path]

    def staged_below_locked(self, path: str) -> list[StagedFile]:
        """Files and directory markers staged strictly below directory ``path`` (deleted ones included)."""
        prefix = "/" if path == "/" else path + "/"
        return ([f for p, f in self.staged.items() if p.startswith(prefix)]
                + [d for p, d in self.dirs.items() if p.startswith(prefix)])

    def live_below_locked(self, path: str) -> list[StagedFile]:
        return [f for f in self.staged_below_locked(path) if not f.deleted]

    def live_below(self, path: str) -> list[StagedFile]:
        with self.lock:
            return self.live_below_locked(path)

    def local_dir_locked(self, path: str) -> StagedFile | None:
        """The marker of directory ``path`` if it was made here and is not yet in S3, else None.

        Commits go in close order, so nothing under such a directory is in S3 yet
        either: it can be listed, renamed or removed without asking S3.
        """
        if not self.contents_known_locked(path):
            return None
        marker = self.dirs[path]
        with marker.lock:
            return None if marker.committing else marker

    def contents_known_locked(self, path: str) -> bool:
        """Whether this mount knows all of directory ``path``: made here, its marker not yet in S3,
        and no rename moved objects of S3 into it (``filled_from_s3``).

        Weaker than ``local_dir_locked``: the marker's PUT may be in flight. Commits go in
        close order, so whatever else S3 holds under the directory was committed after the
        marker, by this mount, and is still in the path table. Lookups and listings then need
        no S3 request (a rename or removal still does: the marker may have landed).
        """
        marker = self.dirs.get(path)
        if marker is None or marker.deleted or marker in self.filled_from_s3:
            return False
        with marker.lock:
            # A marker whose commit gave up no longer holds back the files under it.
            return marker.committed_version == 0 and marker.failure is None

    def only_here_locked(self, file: StagedFile) -> bool:
        """Whether no object can be under ``file``'s key: it never committed and replaced none."""
        with file.lock:
            if file.committed_version or file.committing or file.over_object:
                return False
        return True

    def files(self) -> list[StagedFile]:
        """Every staged file and directory marker."""
        with self.lock:
            return list(self.staged.values()) + list(self.dirs.values())

    def staged_bytes(self) -> int:
        with self.lock:
            return sum(f.size for f in self.staged.values() if not f.deleted)

    def expected_after_move_locked(self, path: str, key: str) -> Expected | None:
        """What this node knows of ``key`` while a pending move of its own brings an object to ``path``:
        what the move expects there (the move lands first, and its copy is this node's own write,
        conditions.py), or None if nothing is known."""
        shown = self.moved.get(path)
        if shown is None:
            return None
        op = shown[1]
        if op.kind != MOVE or op.dst != key or op.expect is None:
            return None
        return Expected(key, op.expect)

    def lost_files(self) -> list[LostFile]:
        with self.lock:
            return list(self.lost.values())

    def move_locked(self, old: str, new: str) -> None:
        """Carry the per-path facts of ``old`` to ``new`` (a rename)."""
        if old in self.mtime_overrides:
            self.mtime_overrides[new] = self.mtime_overrides.pop(old)

    def note_open_locked(self, path: str, version: tuple[str, str] | None) -> tuple[str, str] | None:
        """Remember the object version opened at ``path``; returns the one seen at the previous open."""
        previous = self.opened_versions.get(path)
        if version is None:
            self.opened_versions.pop(path, None)
        else:
            if len(self.opened_versions) > 100_000:  # bounded: forgetting only costs a re-read
                self.opened_versions.clear()
            self.opened_versions[path] = version
        return previous
