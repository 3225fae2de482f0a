"""Watch mode, for nodes without FUSE: ship files from a local directory to S3 as they are closed.

It drives the same ``Filesystem`` the mount uses, without FUSE: when a file is
closed after writing (inotify IN_CLOSE_WRITE, through watchdog), its bytes are
copied into a staging file (``copy_file_range``: in the kernel, a reflink
where the filesystem can) and go through create / write / close, so the
journal, retries, ordered commit, status and metrics are the ones of a mount.
The copy also means a file rewritten in place while it uploads can never mix
two versions in S3.

A closed file waits ``settle`` seconds before it is staged: a temp file renamed
to its final name right after close (safetensors, DCP's ``.metadata``) is
uploaded once, under the final name, never under the temp one. Renames of files
already uploaded move the objects; deletes are mirrored with ``delete=True``.
On start, files that are missing in S3 or differ (size, or newer mtime) are
uploaded, and journaled uploads of an earlier run resume.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from . import locks
from .errors import FsError
from .fs import Filesystem

log = logging.getLogger(__name__)

COPY_CHUNK = 64 << 20


class Watcher(FileSystemEventHandler):
    """Turns events under ``root`` into filesystem operations on ``fs``."""

    def __init__(self, fs: Filesystem, root: Path, *, settle: float = 1.0, delete: bool = False) -> None:
        self.fs = fs
        self.root = root
        self.settle = settle
        self.delete = delete
        self._lock = locks.new_lock("watch.timers")
        self._timers: dict[str, threading.Timer] = {}
        self._observer = Observer()

    # -- paths -------------------------------------------------------------------------

    def _rel(self, local: str | bytes) -> str | None:
        """'/a/b' for root/a/b; None outside the root or for the root itself."""
        local = os.fsdecode(local)
        rel = os.path.relpath(local, self.root)
        if rel == "." or rel.startswith(".."):
            return None
        return "/" + rel.replace(os.sep, "/")

    # -- events ------------------------------------------------------------------------

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self._schedule(event.src_path)

    def on_moved(self, event: FileSystemEvent) -> None:
        old, new = self._rel(event.src_path), self._rel(event.dest_path)
        if old is None or new is None:
            return
        with self._lock:
            timer = self._timers.pop(old, None)
        if timer is not None:  # not staged yet: stage it under its final name only
            timer.cancel()
            if not event.is_directory:
                self._schedule(event.dest_path)
            return
        self._guard(f"rename {old} -> {new}", lambda: self._rename(old, new, event.dest_path))

    def on_deleted(self, event: FileSystemEvent) -> None:
        path = self._rel(event.src_path)
        if path is None:
            return
        with self._lock:
            timer = self._timers.pop(path, None)
        if timer is not None:
            timer.cancel()
        if self.delete:
            action = self.fs.rmdir if event.is_directory else self.fs.unlink
            self._guard(f"delete {path}", lambda: action(path))

    def _schedule(self, local: str) -> None:
        path = self._rel(local)
        if path is None:
            return
        timer = threading.Timer(self.settle, self._settled, args=(path, local))
        timer.daemon = True
        with self._lock:
            previous = self._timers.pop(path, None)
            self._timers[path] = timer
        if previous is not None:
            previous.cancel()
        timer.start()

    def _settled(self, path: str, local: str) -> None:
        with self._lock:
            if self._timers.get(path) is not threading.current_thread():
                return  # superseded by a newer close, a rename or a delete
            del self._timers[path]
        self._guard(f"upload {path}", lambda: self.stage(path, local))

    def _guard(self, what: str, action) -> None:
        try:
            action()
        except FileNotFoundError:
            log.debug("%s: the local file is gone", what)
        except OSError as exc:
            log.error("%s failed: %s", what, exc)

    # -- operations ----------------------------------------------------------------------

    def _ensure_parents(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        current = ""
        for part in parts:
            current += "/" + part
            try:
                self.fs.mkdir(current, 0o755)
            except FsError as exc:
                if exc.errno != errno.EEXIST:
                    raise

    def stage(self, path: str, local: str) -> None:
        """Copy ``local`` into a staging file and close it: journaled, then uploaded in order."""
        with open(local, "rb") as source:
            info = os.fstat(source.fileno())
            if not stat.S_ISREG(info.st_mode):
                return
            self._ensure_parents(path)
            fh = self.fs.create(path, info.st_mode & 0o7777, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                offset = 0
                while offset < info.st_size:
                    count = min(COPY_CHUNK, info.st_size - offset)
                    done = self.fs.write_with(
                        fh, offset, count,
                        lambda fd, at, n=count, src=offset: os.copy_file_range(source.fileno(), fd, n, src, at))
                    if done == 0:
                        break  # the file shrank while we copied: the next close brings the rest
                    offset += done
                self.fs.utimens(path, info.st_mtime)
                self.fs.flush(fh)
            finally:
                self.fs.release(fh)
        log.info("staged %s (%d bytes)", path, info.st_size)

    def _rename(self, old: str, new: str, local_new: str) -> None:
        try:
            self.fs.rename(old, new)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            if os.path.isfile(local_new):  # never uploaded under the old name: upload the new one
                self.stage(new, local_new)

    def reconcile(self) -> int:
        """Upload every file that S3 lacks or holds in another version. Returns how many."""
        count = 0
        for current, _dirs, files in os.walk(self.root):
            for name in files:
                local = os.path.join(current, name)
                path = self._rel(local)
                if path is None:
                    continue
                try:
                    info = os.stat(local)
                    remote = self.fs.getattr(path)
                except FileNotFoundError:
                    remote = None
                except FsError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    remote = None
                if remote is None or remote.size != info.st_size or remote.mtime + 1e-3 < info.st_mtime:
                    self._guard(f"upload {path}", lambda p=path, f=local: self.stage(p, f))
                    count += 1
        return count

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._observer.schedule(self, str(self.root), recursive=True)
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=10)
        with self._lock:
            pending = list(self._timers.items())
            self._timers.clear()
        for path, timer in pending:  # closed files still settling: stage them now
            timer.cancel()
            local = str(self.root) + path
            self._guard(f"upload {path}", lambda p=path, f=local: self.stage(p, f))

