"""Namespace operations: unlink, mkdir, rmdir, rename, symlinks and attributes.

Directories are prefixes with an optional ``dir/`` marker object (mkdir makes
one, so an empty directory survives; its metadata keeps the directory's
creation time). A rename of a staged file retargets its upload (no copy); a
rename of an object in S3 is a server-side copy and a delete. A directory rename
moves every object under it, and is not atomic across objects.

Unlink and rename wait for a commit request of the same file in flight (it
writes under the key the file had when it began), without the mount's lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import stat
import time
from typing import Iterator

from ..errors import FsError, S3Error
from ..metadata import MISSING, DirInfo
from ..s3client import ObjectInfo, object_metadata
from ..staging import StagedFile
from ..uploader import Uploader
from .core import DIR_MODE, Core, s3_errno
from .durability import Durability
from .lifecycle import Lifecycle
from .lookup import Lookup
from .opens import Opens

log = logging.getLogger(__name__)


class Namespace:
    """unlink, mkdir, rmdir, rename, symlink, readlink, chmod, chown, utimens. Thread-safe."""

    def __init__(self, core: Core, lookup: Lookup, opens: Opens, lifecycle: Lifecycle, durability: Durability,
                 uploader: Uploader) -> None:
        self.core = core
        self.table = core.table
        self.meta = core.meta
        self.store = core.store
        self.lookup = lookup
        self.opens = opens
        self.lifecycle = lifecycle
        self.durability = durability
        self.uploader = uploader

    @contextlib.contextmanager
    def _lock_between_commit_requests(self, *paths: str) -> Iterator[None]:
        """Hold the mount's lock at a moment when no file staged at ``paths`` has a commit request in flight.

        Unlink and rename wait for such a request (it writes under the key the file had
        when it began; letting them go first would let the object reappear after them).
        They wait here without the mount's lock, so that the rest of the mount goes on;
        the kernel still holds the directory while they wait.
        """
        while True:
            with self.table.lock:
                busy = None
                for file in map(self.table.get, paths):
                    if file is not None:
                        with file.lock:
                            if file.committing:
                                busy = file
                                break
                if busy is None:
                    yield
                    return
            with busy.lock:
                busy.wait_commit_request_locked()

    def unlink(self, path: str) -> None:
        key = self.core.key_for(path)
        with self._lock_between_commit_requests(path):
            self.lifecycle.clear_lost_locked(path, "deleted")
            file = self.table.get(path)
            only_here = file is not None and self.table.only_here_locked(file)
            if file is not None:
                self.lifecycle.discard_locked(file)
        if file is None:
            entry = self.lookup.lookup(path)
            if entry is None:
                raise FsError(errno.ENOENT, path)
            if isinstance(entry, DirInfo):
                raise FsError(errno.EISDIR, path)
        try:
            if not only_here:
                self.store.delete(key)
        except S3Error as err:
            raise s3_errno(err, f"delete {path}") from err
        finally:
            self.meta.forget(path)
            self.core.objects.invalidate(key)
            self.table.mtime_overrides.pop(path, None)
        self.meta.put(path, MISSING)
        self.core.handles.unname(path)  # open handles live on, nameless

    def mkdir(self, path: str, mode: int) -> None:
        """Make the directory here at once; its ``dir/`` marker is committed in close order, like a file.

        So mkdir never waits for S3, and the marker lands before any file closed in it later.
        """
        self.lookup.check_parent_is_dir(path)
        if self.lookup.lookup(path) is not None:
            raise FsError(errno.EEXIST, path)
        marker = self.opens.new_staged(path, stat.S_IFDIR | (mode & 0o7777))
        marker.key += "/"
        with self.table.lock:
            if self.table.dirs.get(path) is not None or self.table.get(path) is not None:
                raise FsError(errno.EEXIST, path)  # made by another thread since the lookup
            self.table.put_locked(marker)
            self.meta.forget(path)
            self.meta.put(path, DirInfo(marker.mtime))
            self.meta.put_created_dir(path)  # known empty: files can be created in it while S3 is away
        self.lifecycle.close_and_commit(marker)


    def rmdir(self, path: str) -> None:
        if path == "/":
            raise FsError(errno.EBUSY, path)
        entry = self.lookup.lookup(path)
        if entry is None:
            # Already gone: an implicit directory vanishes with its last object. Some
            # servers keep an empty folder until its key is deleted, so delete it anyway.
            try:
                self.store.delete(self.core.key_for(path) + "/")
            except S3Error as err:
                log.debug("rmdir %s: %s", path, err)
            self.meta.forget_tree(path)
            return
        if not isinstance(entry, DirInfo):
            raise FsError(errno.ENOTDIR, path)
        with self.table.lock:
            if self.table.live_below_locked(path):
                raise FsError(errno.ENOTEMPTY, path)
            marker = self.table.local_dir_locked(path)
            if marker is not None:  # made here, never in S3: nothing to delete there
                self.lifecycle.discard_locked(marker)
                self.meta.forget_tree(path)
                self.meta.put(path, MISSING)
                return
            pending = self.table.dirs.get(path)
            if pending is not None:
                self.lifecycle.discard_locked(pending)  # its marker is deleted below
        dir_key = self.core.key_for(path) + "/"
        try:
            files, dirs = self.store.list_dir(dir_key)
            if dirs or any(info.key != dir_key for info in files):
                raise FsError(errno.ENOTEMPTY, path)
            self.store.delete(dir_key)
        except S3Error as err:
            raise s3_errno(err, f"rmdir {path}") from err
        self.meta.forget_tree(path)
        self.meta.put(path, MISSING)

    def rename(self, old: str, new: str) -> None:
        if old == new:
            return
        if new.startswith(old.rstrip("/") + "/"):
            raise FsError(errno.EINVAL, f"cannot move {old} into itself")
        new_key = self.core.key_for(new)
        source = self.lookup.lookup(old)
        if source is None:
            raise FsError(errno.ENOENT, old)
        target = self.lookup.lookup(new)
        if isinstance(source, DirInfo):
            if target is not None and not isinstance(target, DirInfo):
                raise FsError(errno.ENOTDIR, new)
            if target is not None:
                self.rmdir(new)  # raises ENOTEMPTY unless it is empty
            self._rename_dir(old, new)
        else:
            if isinstance(target, DirInfo):
                raise FsError(errno.EISDIR, new)
            self.lookup.check_parent_is_dir(new)
            self._rename_file(old, new, new_key, source, target)
        handles = self.core.handles
        handles.unname(new)     # a replaced file lives on in its open handles, nameless
        handles.move(old, new)  # the kernel keeps open files on their inode, now named new
        self.meta.forget_tree(old)
        self.meta.forget_tree(new)
        # The kept listings (answers while S3 is away) learn the outcome; fresh answers come from S3.
        self.meta.note(old, MISSING)
        if isinstance(source, DirInfo):
            self.meta.note(new, source)
        else:
            self.meta.note(new, ObjectInfo(key=new_key, size=source.size, etag="", mtime=source.mtime,
                                           mode=source.mode))

    def _retarget_locked(self, file: StagedFile, new: str) -> bool:
        """Point a staged file at a new path. True if its committed object must move in S3 too.

        Called with the mount's lock held. A dirty file simply commits under the new
        key (an upload already started for the old key is aborted and redone); a
        clean one is already in S3 under the old key and is moved server-side.
        """
        with file.lock:
            file.wait_commit_request_locked()  # a commit under the old key lands first, then moves with it
            old_key = file.key
            file.path = new
            file.key = self.core.key_for(new) + ("/" if file.is_dir_marker else "")
            if file.upload_id is not None:
                self.uploader.abort_later(file.forget_upload_locked())
            moved_object = not file.dirty
            if file.journaled_version:
                self.core.journal.write(file.id, file.journal_record_locked())
        self.core.objects.invalidate(old_key)
        return moved_object

    def _rename_file(self, old: str, new: str, new_key: str, source: ObjectInfo,
                     target: ObjectInfo | None) -> None:
        old_key = self.core.key_for(old)
        with self._lock_between_commit_requests(old, new):
            self.lifecycle.clear_lost_locked(old, "renamed")
            self.lifecycle.clear_lost_locked(new, "replaced by a rename")
            file = self.table.staged.pop(old, None)
            only_here = file is not None and self.table.only_here_locked(file)
            replaced = self.table.get(new)
            if replaced is not None:
                self.lifecycle.discard_locked(replaced)
            if file is not None:
                move_remote = self._retarget_locked(file, new)
                self.table.staged[new] = file
                with file.lock:
                    # What was under the new name stays in S3 until this file's commit replaces it.
                    file.over_object = target is not None or (replaced is not None and replaced.over_object)
                    needs_commit = file.dirty and file.writers == 0 and not file.commit_queued
            else:
                move_remote, needs_commit = True, False
        if needs_commit:
            self.uploader.request_commit(file)
        if only_here:  # nothing in S3 under either name: the rename is local
            with self.table.lock:
                self.table.move_locked(old, new)
            return
        try:
            if move_remote:
                self.store.copy(old_key, new_key, source.size)
            self.store.delete(old_key)  # a dirty staged file may also have an older object there
        except S3Error as err:
            raise s3_errno(err, f"rename {old} -> {new}") from err
        self.core.objects.invalidate(old_key)
        self.core.objects.invalidate(new_key)
        with self.table.lock:
            self.table.move_locked(old, new)

    def _move_staged_locked(self, old: str, new: str) -> None:
        """Retarget every file and directory marker staged at or below ``old`` to ``new`` (mount's lock held)."""
        moving = self.table.staged_below_locked(old)
        if old in self.table.dirs:
            moving.append(self.table.dirs[old])
        for file in moving:
            self.table.drop_locked(file)
            self._retarget_locked(file, new + file.path[len(old):])
            self.table.put_locked(file)

    def _rename_dir(self, old: str, new: str) -> None:
        with self.table.lock:
            if self.table.local_dir_locked(old) is not None:  # all of it is here: no S3 request
                self._move_staged_locked(old, new)
                return
        old_prefix = self.core.key_for(old) + "/"
        new_prefix = self.core.key_for(new) + "/"
        store = self.store
        try:
            objects = list(store.list_all(old_prefix))
        except S3Error as err:
            raise s3_errno(err, f"rename {old} -> {new}") from err
        for info in objects:  # ENAMETOOLONG before any change
            self.core.key_for("/" + (new_prefix + info.key[len(old_prefix):])[len(self.core.prefix):])
        markers = [info for info in objects if info.key.endswith("/") and info.size == 0]
        files = [info for info in objects if info not in markers]
        try:
            # Markers first at the destination (a directory keeps its creation time), so
            # that no server has made an implicit folder there before the marker lands.
            for marker in sorted(markers, key=lambda m: m.key):
                original = store.head(marker.key)
                mtime = original.mtime if original else marker.mtime
                store.put(new_prefix + marker.key[len(old_prefix):], b"", object_metadata(mtime, DIR_MODE))
            # Staged files next, so that a commit racing with us lands under the new name,
            # or has landed under the old one and is in the listing taken above.
            with self.table.lock:
                self._move_staged_locked(old, new)
            listed = {info.key for info in objects}
            late = [info for info in store.list_all(old_prefix)  # committed before the retarget
                    if info.key not in listed and not info.key.endswith("/")]
            for info in files + late:
                store.copy(info.key, new_prefix + info.key[len(old_prefix):], info.size)
                store.delete(info.key)
                self.core.objects.invalidate(info.key)
            # Markers last, deepest first, then the directory's own key: some servers keep
            # an empty folder listed until the folder key itself is deleted.
            for marker in sorted(markers, key=lambda m: m.key, reverse=True):
                store.delete(marker.key)
            store.delete(old_prefix)
        except S3Error as err:
            raise s3_errno(err, f"rename {old} -> {new}") from err

    # -- symlinks --------------------------------------------------------------------------

    def symlink(self, path: str, target: str) -> None:
        """A symlink is a small object (body: the target) committed in order like any file."""
        self.lookup.check_parent_is_dir(path)
        if self.lookup.lookup(path) is not None:
            raise FsError(errno.EEXIST, path)
        file = self.opens.new_staged(path, stat.S_IFLNK | 0o777)
        file.write(target.encode("utf-8", "surrogateescape"), 0)
        with self.table.lock:
            self.lifecycle.register_locked(file)
        self.lifecycle.close_and_commit(file)

    def readlink(self, path: str) -> str:
        with self.table.lock:
            file = self.table.get(path)
        if file is not None:
            return file.read(file.size, 0).decode("utf-8", "surrogateescape")
        entry = self.lookup.lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if not isinstance(entry, ObjectInfo) or not entry.is_symlink:
            raise FsError(errno.EINVAL, path)
        try:
            return self.store.get_bytes(entry.key).decode("utf-8", "surrogateescape")
        except S3Error as err:
            raise s3_errno(err, f"readlink {path}") from err

    # -- attributes ------------------------------------------------------------------------

    def chmod(self, path: str, mode: int) -> None:
        """Kept for files not yet uploaded; accepted (not stored) for objects already in S3."""
        with self.table.lock:
            file = self.table.get(path)
            if file is not None:
                with file.lock:
                    file.mode = stat.S_IFMT(file.mode) | (mode & 0o7777)
                return
        if self.lookup.lookup(path) is None:
            raise FsError(errno.ENOENT, path)

    def chown(self, path: str, uid: int, gid: int) -> None:
        if self.lookup.lookup(path) is None:
            raise FsError(errno.ENOENT, path)

    def utimens(self, path: str, mtime: float | None) -> None:
        """Set the mtime: stored with the object if it is not yet uploaded, else kept for this mount."""
        mtime = time.time() if mtime is None else mtime
        with self.table.lock:
            file = self.table.get(path)
            if file is not None:
                with file.lock:
                    file.set_mtime_locked(mtime)
                return
        entry = self.lookup.lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if isinstance(entry, ObjectInfo):
            with self.table.lock:
                self.table.mtime_overrides[path] = mtime
