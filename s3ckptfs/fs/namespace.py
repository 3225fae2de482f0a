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

import errno
import logging
import stat
from concurrent.futures import Future

from ..errors import FsError, S3Error
from ..metadata import MISSING, DirInfo
from ..remoteops import DELETE, MARKER, MOVE, MOVE_TREE, RemoteOp
from ..store import ObjectInfo
from ..staging import StagedFile
from ..uploader import Uploader
from .core import Core, s3_errno
from .durability import Durability
from .expectations import etag_seen_locked, known_at_locked
from .lifecycle import Lifecycle
from .lookup import Lookup
from .opens import Opens
from .pending import PendingOps
from .reads import Reads
from .treemove import kept_entries, known_subtree

log = logging.getLogger(__name__)

# How long the delete of an open file's unlinked name waits before it starts: a rename onto
# the name that follows at once (libfuse unlinks an open target first) drops it instead.
REPLACE_GRACE = 0.25


class Namespace:
    """unlink, mkdir, rmdir, rename, symlink, readlink, chmod, chown, utimens. Thread-safe."""

    def __init__(self, core: Core, lookup: Lookup, opens: Opens, reads: Reads, lifecycle: Lifecycle,
                 durability: Durability, pending: PendingOps, uploader: Uploader) -> None:
        self.core = core
        self.table = core.table
        self.meta = core.meta
        self.store = core.store
        self.lookup = lookup
        self.opens = opens
        self.reads = reads
        self.lifecycle = lifecycle
        self.durability = durability
        self.pending = pending
        self.uploader = uploader

    def unlink(self, path: str, keep_open_as: str = "") -> None:
        """Remove ``path``; files open on it live on, nameless, or answering to ``keep_open_as``
        (``HandleTable.kept``), the private name the FUSE layer gives them."""
        key = self.core.key_for(path)
        entry: ObjectInfo | DirInfo | None = None
        with self.table.lock:
            file = self.table.get(path)
        if file is None:
            entry = self.lookup.lookup(path)
            if entry is None:
                raise FsError(errno.ENOENT, path)
            if isinstance(entry, DirInfo):
                raise FsError(errno.EISDIR, path)
        with self.table.lock:
            self.lifecycle.clear_lost_locked(path, "deleted")
            file = self.table.get(path)
            op = None
            if file is None or not self.table.only_here_locked(file):
                # The object goes from S3 later, in close order; if still the one this node saw.
                op = RemoteOp(DELETE, key, hides=(path,), expect=etag_seen_locked(self.table, path, key, file, entry))
                # An open file's name is unlinked by libfuse before a rename onto it too: its delete
                # waits a moment, for that rename to drop it (no gap without the name in S3).
                self.pending.show_locked(op, hold=REPLACE_GRACE if keep_open_as else 0.0)
            if file is not None:
                self.lifecycle.discard_locked(file)
            self.table.mtime_overrides.pop(path, None)
        self.core.objects.invalidate(key)
        if op is not None:
            op.readers_first = self._keep_for_readers(path)
            self.pending.submit(op)
        else:
            self.meta.put(path, MISSING)
        self._unname(path, keep_open_as)  # open handles live on

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
            self.meta.put(path, DirInfo(marker.mtime))
            self.meta.put_created_dir(path)  # known empty: files can be created in it while S3 is away
        self.lifecycle.close_and_commit(marker)

    def rmdir(self, path: str) -> None:
        if path == "/":
            raise FsError(errno.EBUSY, path)
        dir_key = self.core.key_for(path) + "/"
        entry = self.lookup.lookup(path)
        if entry is None:
            # Already gone: an implicit directory vanishes with its last object. Some
            # servers keep an empty folder until its key is deleted, so delete it anyway.
            self.pending.queue(RemoteOp(DELETE, dir_key))
            self.meta.forget_tree(path)
            return
        if not isinstance(entry, DirInfo):
            raise FsError(errno.ENOTDIR, path)
        if self.lookup.children(path):
            raise FsError(errno.ENOTEMPTY, path)
        with self.table.lock:
            if self.table.live_below_locked(path) or self.table.moved_below_locked(path):
                raise FsError(errno.ENOTEMPTY, path)
            marker = self.table.local_dir_locked(path)
            if marker is None:
                marker = self.table.dirs.get(path)  # its marker may be in S3 (or on its way): deleted after
                local = False
            else:
                local = True
            if marker is not None:
                self.lifecycle.discard_locked(marker)
        if local:  # made here, never in S3: nothing to delete there
            self.meta.settle(path, MISSING, tree=True)
            self.meta.put(path, MISSING)
            return
        self.pending.queue(RemoteOp(DELETE, dir_key, hides=(path,)))

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
            self._rename_dir(old, new, source)
        else:
            if isinstance(target, DirInfo):
                raise FsError(errno.EISDIR, new)
            self.lookup.check_parent_is_dir(new)
            self._rename_file(old, new, new_key, source, target)
        self._unname(new)       # a replaced file lives on in its open handles, nameless
        self.core.handles.move(old, new)  # the kernel keeps open files on their inode, now named new

    def _keep_for_readers(self, path: str) -> list[Future]:
        """Downloads of the rest of the object that handles open on ``path`` read: its name is about
        to be unlinked or replaced, and they read on what they opened (a local file's open
        descriptors keep its bytes). The change in S3 waits for them (``RemoteOp.readers_first``)."""
        downloads: list[Future] = []
        for handle in self.core.handles.open_on(path):
            if handle.cached is not None:
                downloads += self.reads.fetch_rest(handle.cached)
        return downloads

    def _unname(self, path: str, kept_as: str = "") -> None:
        """``path`` no longer names the file its open handles read: the cached copies they read
        become theirs alone (``ObjectCache.detach``)."""
        for handle in self.core.handles.unname(path, kept_as):
            if handle.cached is not None:
                self.core.objects.detach(handle.cached)

    def _retarget_locked(self, file: StagedFile, new: str,
                         rewrite: list[StagedFile]) -> tuple[ObjectInfo | None, bool]:
        """Point a staged file at a new path (mount's lock held).

        Returns (the object its old key holds, if it must move in S3; whether the old key
        may hold an object to delete); the file is added to ``rewrite``: the caller rewrites
        its journal record, and, once the rename's own changes are queued, requeues its commit
        (``_requeue_locked``). A dirty file simply commits under the new key, behind every change
        queued before the rename and by it (an upload already started for the old key is
        aborted and redone); a clean one is
        already in S3 under the old key and is moved server-side: until that move has run,
        the new path shows the object under its old key, even once the file is retired. A
        commit request in flight is not waited for: it lands under the old key, and the
        file commits again under the new one, before the old key is deleted.
        """
        new_key = self.core.key_for(new) + ("/" if file.is_dir_marker else "")
        with file.lock:
            old_may_hold = bool(file.committed_version or file.committing or file.over_object)
            old_key, upload = file.retarget_locked(new, new_key)
            self.uploader.abort_later(upload)
            moved = None if file.dirty else ObjectInfo(key=old_key, size=file.size, etag=file.etag_under(old_key),
                                                       mtime=file.mtime, mode=file.mode)
        rewrite.append(file)
        self.core.objects.invalidate(old_key)
        return moved, old_may_hold

    def _rename_file(self, old: str, new: str, new_key: str, source: ObjectInfo,
                     target: ObjectInfo | DirInfo | None) -> None:
        old_key = self.core.key_for(old)
        op: RemoteOp | None = RemoteOp(MOVE, old_key, new_key, source.size, hides=(old,))
        rewrite: list[StagedFile] = []
        with self.table.lock:
            self.lifecycle.clear_lost_locked(old, "renamed")
            self.lifecycle.clear_lost_locked(new, "replaced by a rename")
            # The old object under the new name stays until this rename replaces it.
            cancelled = self.pending.cancel_delete_locked(new, new_key)
            file = self.table.staged.pop(old, None)
            replaced = self.table.get(new)
            if replaced is not None:
                self.lifecycle.discard_locked(replaced)
            needs_commit = False
            known = known_at_locked(self.table, self.opens, new, new_key, target, replaced, cancelled)
            if op is not None:
                op.expect = known.etag if known is not None else None
            if file is None:  # an object in S3: it shows under the new name until it is moved there
                shows: dict[str, object] = {new: source}
                if source.key == old_key and old not in self.table.moved:  # else a copy's ETag, not known yet
                    op.source_etag = source.etag or None
            else:
                shows = {}
                with file.lock:  # what its old key holds, as far as this node knows (a delete's condition)
                    seen = file.expected if (file.expected is not None and file.expected.key == old_key
                                             and not file.committing) else None
                moved, old_may_hold = self._retarget_locked(file, new, rewrite)
                self.table.staged[new] = file
                with file.lock:
                    # What was under the new name stays in S3 until this file's commit replaces it.
                    file.over_object = (target is not None or cancelled is not None
                                        or (replaced is not None and replaced.over_object))
                    needs_commit = file.dirty and file.writers == 0 and not file.commit_queued
                if moved is not None:
                    shows = {new: moved}
                    op.source_etag = moved.etag or None
                else:  # it commits under the new key; the old key is deleted after that
                    op = (RemoteOp(DELETE, old_key, hides=(old,), expect=seen.etag if seen else None)
                          if old_may_hold else None)
                    with file.lock:
                        file.expected = known
            self.table.move_locked(old, new)
            if op is not None:
                self.pending.show_locked(op, shows)
            self._requeue_locked(rewrite)
            log.debug("rename %s -> %s: %s%s; in S3: %s", old, new,
                      f"staged ({file.state.value})" if file is not None else "an object in S3",
                      ", replacing a staged file" if replaced is not None else "",
                      op.label if op is not None else "nothing (not there yet)")
        self._rewrite_records(rewrite)
        if op is not None:
            if op.kind == MOVE:  # it replaces what the new name's readers opened
                op.readers_first = self._keep_for_readers(new)
            self.pending.submit(op)
        if needs_commit:
            self.uploader.request_commit(file)
        self._note_rename(old, new, new_key, source)

    def _note_rename(self, old: str, new: str, new_key: str, source: ObjectInfo | DirInfo) -> None:
        """The kept listings (answers while S3 is away) learn the outcome; fresh answers come from S3."""
        self.meta.settle(old, MISSING, tree=True)
        if isinstance(source, DirInfo):
            self.meta.settle(new, source, tree=True)
        else:
            self.meta.settle(new, ObjectInfo(key=new_key, size=source.size, etag="", mtime=source.mtime,
                                             mode=source.mode), tree=True)

    def _requeue_locked(self, files: list[StagedFile]) -> None:
        """Renamed files commit behind every change made so far, the rename's own included
        (mount's lock held): a move of the object the file replaced, or of its own committed
        bytes, must reach S3 before a newer version of the file. They keep their order among
        themselves: a directory's marker commits before what is in it, which a directory still
        uncommitted counts on (``PathTable.contents_known_locked``)."""
        self.uploader.requeue_commits(files)

    def _rewrite_records(self, files: list[StagedFile]) -> None:
        for file in files:
            self.durability.rewrite_record(file)

    def _move_staged_locked(self, old: str, new: str, rewrite: list[StagedFile],
                            markers: bool = False) -> list[tuple[RemoteOp, dict[str, object]]]:
        """Retarget every file and directory marker staged at or below ``old`` to ``new`` (mount's lock held).

        Returns the operations S3 needs for the files: a move of each one already
        committed, a delete of each old key that may hold an older object. With
        ``markers``, also a delete of each marker whose PUT may have gone under its old key
        (a directory made here, renamed as its marker's commit began sending); else markers
        are the caller's to move.
        """
        moving = self.table.staged_below_locked(old)
        if old in self.table.dirs:
            moving.append(self.table.dirs[old])
        ops = []
        for file in moving:
            old_key = file.key
            self.table.drop_locked(file)
            moved, old_may_hold = self._retarget_locked(file, new + file.path[len(old):], rewrite)
            self.table.put_locked(file)
            if file.is_dir_marker and not markers:
                # Its directory is moved with S3 requests that put objects under it before its
                # own marker commits: S3 holds what the table will not (contents_known_locked).
                self.table.filled_from_s3.add(file)
            if file.is_dir_marker and markers and not file.deleted:
                with file.lock:  # (a marker's over_object says nothing: it is never looked up first)
                    sent = file.committing or bool(file.committed_version)
                if sent:
                    ops.append((RemoteOp(DELETE, old_key), {}))
                continue
            if file.deleted or file.is_dir_marker:
                continue  # markers are moved with their directory
            if moved is not None:
                ops.append((RemoteOp(MOVE, old_key, file.key, file.size), {file.path: moved}))
            elif old_may_hold:
                ops.append((RemoteOp(DELETE, old_key), {}))
        return ops

    def _rename_dir(self, old: str, new: str, source: DirInfo) -> None:
        """Move a directory: at once here; in S3 as queued copies and deletes, in order.

        Markers are copied first (a directory keeps its creation time), files moved,
        then the old markers deleted, deepest first, the directory's own last (some
        servers list an empty folder until its own key is deleted). Until the last
        of them has run, the new tree is shown from the path table.
        """
        rewrite: list[StagedFile] = []
        with self.table.lock:
            # All of it is here: no S3 request. (Not if a pending move brings an object into it:
            # that object reaches S3 under the old name, and must be moved on from there.)
            if self.table.local_dir_locked(old) is not None and not self.table.moved_below_locked(old):
                # ... unless a commit began sending since that check (the commit thread does
                # not take the mount's lock): what it writes under an old key is deleted after it.
                late = self._move_staged_locked(old, new, rewrite, markers=True)
                for op, shown in late:
                    self.pending.show_locked(op, shown)
                self._requeue_locked(rewrite)
                # Under the lock: a moved file committed and retired meanwhile must find the new
                # listing (a listing made after it would never learn of it).
                self._note_rename(old, new, "", source)
                self.meta.put_created_dir(new)
                local = True
            else:
                local = False
        if local:
            self._rewrite_records(rewrite)
            for op, _ in late:
                self.pending.submit(op)
            return
        entries = known_subtree(self.lookup, old)
        if entries is None:  # not all known now: moved in S3 as listed when its turn comes
            self._rename_tree_later(old, new, source)
            return
        key_for = self.core.key_for
        for path, _ in entries:  # ENAMETOOLONG before any change
            key_for(new + path[len(old):])
        dirs = [old] + [path for path, entry in entries if isinstance(entry, DirInfo)]
        with self.table.lock:
            moving = [f for f in self.table.staged_below_locked(old) if not f.is_dir_marker]
            staged = {f.path for f in moving}
            ops = [RemoteOp(MARKER, key_for(d) + "/", key_for(new + d[len(old):]) + "/") for d in sorted(dirs)]
            shows: list[dict[str, object]] = [{} for _ in ops]
            for path, entry in entries:
                if isinstance(entry, ObjectInfo) and path not in staged:
                    ops.append(RemoteOp(MOVE, key_for(path), key_for(new + path[len(old):]), entry.size))
                    shows.append({new + path[len(old):]: entry})
            for op, shown in self._move_staged_locked(old, new, rewrite):
                ops.append(op)
                shows.append(shown)
            for d in sorted(dirs, reverse=True):
                ops.append(RemoteOp(DELETE, key_for(d) + "/"))
                shows.append({})
            # The last operation keeps the old tree hidden and the new directories shown.
            ops[-1].hides = (old,)
            shows[-1] = {new + d[len(old):]: (source if d == old else DirInfo(None)) for d in dirs}
            self._note_rename(old, new, "", source)
            for d in dirs:  # the new tree's listings start empty and learn each entry as it is shown
                self.meta.put_created_dir(new + d[len(old):])
            for op, shown in zip(ops, shows):
                self.pending.show_locked(op, shown)
            # Markers land before the moved files commit under the new name: a server that made
            # the folder implicitly first would not keep the marker's mtime (SeaweedFS does not).
            self._requeue_locked(rewrite)
        self._rewrite_records(rewrite)
        for op in ops:
            self.pending.submit(op)

    def _rename_tree_later(self, old: str, new: str, source: DirInfo) -> None:
        """Rename directory ``old`` to ``new`` here now; in S3 with one ordered MOVE_TREE operation."""
        key_for = self.core.key_for
        known = kept_entries(self.lookup, old)
        for path, _ in known:  # ENAMETOOLONG before any change
            key_for(new + path[len(old):])
        listings = self.meta.listings_below(old)
        rewrite: list[StagedFile] = []
        table = self.table
        with table.lock:
            staged = {f.path for f in table.staged_below_locked(old) if not f.is_dir_marker}
            op = RemoteOp(MOVE_TREE, key_for(old) + "/", key_for(new) + "/", hides=(old,))
            shows: dict[str, object] = {new: source}
            # What the mount shows of the old tree: its kept listings, and what earlier changes still
            # pending show there (a tree renamed again before its first move ran).
            for path, entry in [*known, *table.moved_below_locked(old)]:
                if path not in staged and not table.hidden_locked(path):
                    shows[new + path[len(old):]] = entry
            file_ops = self._move_staged_locked(old, new, rewrite)
            self._note_rename(old, new, "", source)
            self.meta.put_moved_listings(old, new, listings)
            self.pending.show_locked(op, shows)
            for file_op, shown in file_ops:
                self.pending.show_locked(file_op, shown)
            # The moved files commit under their new names after the move: they replace what it brings.
            self._requeue_locked(rewrite)
        self._rewrite_records(rewrite)
        log.debug("rename %s -> %s: %d known entries shown, the rest moved in S3 as listed then", old, new, len(known))
        self.pending.submit(op)
        for file_op, _ in file_ops:
            self.pending.submit(file_op)

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
                with file.lock:  # not retired meanwhile (its staging fd closed): a short local read
                    if file.deleted:
                        raise FsError(errno.ENOENT, path)
                    if not stat.S_ISLNK(file.mode):
                        raise FsError(errno.EINVAL, path)
                    return file.read(file.size, 0).decode("utf-8", "surrogateescape")
        entry = self.lookup.lookup(path)
        if entry is None:
            raise FsError(errno.ENOENT, path)
        if not isinstance(entry, ObjectInfo) or not entry.is_symlink:
            raise FsError(errno.EINVAL, path)
        try:
            # Following the link if it moves meanwhile: a renamed link is moved in S3 later. In its
            # version where known: its old key may hold a newer file by now.
            body = self.reads.following(path, entry, lambda now: self.store.get_bytes(now.key, now.etag or None))
            return body.decode("utf-8", "surrogateescape")
        except S3Error as err:
            raise s3_errno(err, f"readlink {path}") from err
