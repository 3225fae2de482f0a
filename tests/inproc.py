"""The filesystem core in a test process: no FUSE, no server, restarts in milliseconds.

``InProcessMount`` wires a real ``Filesystem`` the way ``daemon.run`` does
(CacheDir prepared and locked, Metrics, ``recover()``), over a client of a
``FakeStore``, with part sizes in KiB (set on the options object past its
validation, which production keeps) and a retry backoff in milliseconds.

``crash()`` stops an instance the way SIGKILL would, as far as the cache dir
and the store can tell: its store client is severed first (every request it
makes or has hanging fails from then on, so nothing more reaches the store),
then its threads are stopped without draining and its descriptors and the
cache dir's lock are dropped. Whatever the cache dir holds at that moment is
what the next ``start()`` recovers from, with a fresh client.

``Vfs`` does what the kernel and fuse_ops do before a call reaches the
Filesystem (path walk, EEXIST/EISDIR/ENOTDIR checks, open-or-create,
flush and release at close), so that a test can speak POSIX to the core and
compare it with a local directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Iterator

from fakestore import FakeClient, FakeStore
from s3ckptfs.cache import CacheDir
from s3ckptfs.config import KiB, MountConfig, Options
from s3ckptfs.fs import Filesystem
from s3ckptfs.metrics import Metrics

PREFIX = "mnt/"
SHM = Path("/dev/shm")

# Sizes far below S3's limits, so that KiB of data take the multipart paths.
SMALL_SIZES = {"part_size": 4 * KiB, "single_put_limit": 6 * KiB, "read_block": 16 * KiB, "read_ahead": 64 * KiB}
# dedup stays off unless a test asks for it (the daemon's default too).
DEFAULTS = {"upload_concurrency": 2, "download_concurrency": 2, "passthrough": "off",
            "metadata_ttl": 5.0, "negative_ttl": 5.0, "dedup": "off"}
_VALIDATED_SIZES = ("part_size", "read_block")   # the only options whose minimum is above what tests use


def fast_backoff(attempt: int) -> float:
    """Retry a failed commit after milliseconds, not seconds."""
    return 0.001 * min(attempt, 10)


def small_options(**overrides: object) -> Options:
    """Options for in-process tests: KiB sizes (see SMALL_SIZES), validated as usual otherwise.

    ``part_size`` and ``read_block`` below S3's limits are set on the frozen object after
    validation: production validation stays as it is, only these tests step past it.
    """
    values = {**DEFAULTS, **SMALL_SIZES, **overrides}
    unknown = set(values) - {f.name for f in fields(Options)}
    if unknown:
        raise TypeError(f"unknown options {sorted(unknown)}")
    relaxed = {name: values.pop(name) for name in _VALIDATED_SIZES}
    options = Options(**values)  # type: ignore[arg-type]
    for name, value in relaxed.items():
        object.__setattr__(options, name, value)
    return options


@contextlib.contextmanager
def fast_tmp_dir(fallback: Path) -> Iterator[Path]:
    """A scratch directory in memory (/dev/shm) when there is one: fsync costs nothing there."""
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="s3ckptfs-test-", dir=SHM))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        fallback.mkdir(parents=True, exist_ok=True)
        yield fallback


class InProcessMount:
    """One mount's lifetimes over the same cache dir and store: start, crash, stop, start again."""

    def __init__(self, store: FakeStore, cache_root: Path, options: Options | None = None,
                 prefix: str = PREFIX) -> None:
        self.store = store
        self.cache_root = cache_root
        self.options = options or small_options()
        self.prefix = prefix
        self.config = MountConfig(bucket="fake-bucket", prefix=prefix, mountpoint=Path("/nonexistent-mountpoint"),
                                  cache_dir=cache_root, options=self.options)
        self.fs: Filesystem | None = None
        self.client: FakeClient | None = None
        self.cache: CacheDir | None = None
        self.recovered = 0
        self.starts = 0

    def key(self, path: str) -> str:
        return self.prefix + path.lstrip("/")

    def start(self) -> Filesystem:
        """Start a Filesystem on the cache dir as the daemon does, and recover what it holds."""
        assert self.fs is None, "already running"
        self.client = self.store.connect()
        self.cache = CacheDir(self.cache_root)
        self.cache.prepare()
        metrics = Metrics()
        self.fs = Filesystem(self.config, self.client, self.cache, metrics, backoff=fast_backoff)
        metrics.add_state(self.fs.state_metrics)
        self.recovered = self.fs.recover()
        self.starts += 1
        return self.fs

    def crash(self) -> None:
        """Stop at once, as a killed process: no drain, nothing more reaches the store or the cache dir."""
        fs, client = self._running()
        client.sever()
        fs.shutdown(0)
        self._stop_threads(fs)
        self._drop(fs)

    def stop(self, drain_timeout: float = 30.0) -> bool:
        """A clean stop (unmount): drain uploads for up to ``drain_timeout``. True if all finished."""
        fs, _ = self._running()
        drained = fs.shutdown(drain_timeout)
        self._stop_threads(fs)
        self._drop(fs)
        return drained

    def restart(self, crash: bool = False, drain_timeout: float = 30.0) -> Filesystem:
        """Crash or stop (see ``stop``) the running instance, then start a new one."""
        if self.fs is not None:
            if crash:
                self.crash()
            else:
                self.stop(drain_timeout)
        return self.start()

    def close(self) -> None:
        """Teardown: let hangs go and stop whatever still runs, without waiting for uploads."""
        if self.fs is not None:
            self.crash()

    def _running(self) -> tuple[Filesystem, FakeClient]:
        assert self.fs is not None and self.client is not None, "not running"
        return self.fs, self.client

    @staticmethod
    def _stop_threads(fs: Filesystem) -> None:
        # Filesystem.shutdown leaves running part uploads and downloads behind (a daemon exits
        # right after it); a test process goes on, so wait for them before the next instance.
        assert fs.join_threads(10), "the commit thread did not stop"

    def _drop(self, fs: Filesystem) -> None:
        """Close what a dead process would have lost: staging and cache descriptors, the cache dir lock."""
        files = {id(f): f for f in fs.staged_files()}
        for handle in list(fs.handles._handles.values()):
            if handle.staged is not None:
                files[id(handle.staged)] = handle.staged
            if handle.cached is not None:
                _close_quietly(handle.cached.fd)
        for file in files.values():
            file.close_fd()
        for entry in list(fs.objects._entries.values()):
            _close_quietly(entry.fd)
        assert self.cache is not None
        self.cache.release()
        self.fs = self.client = self.cache = None


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Vfs:
    """POSIX calls on paths, turned into Filesystem calls the way the kernel and fuse_ops would.

    Paths are relative to ``root`` (a directory path in the mount, like "/seq1").
    Errors are OSError with the errno a process would see.
    """

    def __init__(self, fs: Filesystem, root: str = "") -> None:
        self.fs = fs
        self.root = root.rstrip("/")

    def path(self, rel: str | os.PathLike[str] = "") -> str:
        rel = os.fspath(rel).strip("/")
        return f"{self.root}/{rel}" if rel else (self.root or "/")

    def _stat(self, path: str) -> os.stat_result | None:
        try:
            st = self.fs.getattr(path)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return os.stat_result((st.mode, 0, 0, st.nlink, 0, 0, st.size, int(st.mtime), int(st.mtime), int(st.mtime)))

    def _walk(self, path: str) -> os.stat_result | None:
        """The kernel's path walk: every parent must be a directory. The final entry's stat, or None."""
        parts = [p for p in path.split("/") if p]
        current = ""
        for part in parts[:-1]:
            current += "/" + part
            st = self._stat(current)
            if st is None:
                raise OSError(errno.ENOENT, f"{current}: no such directory")
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(errno.ENOTDIR, f"{current}: not a directory")
        return self._stat(path)

    def stat(self, rel: str) -> os.stat_result:
        path = self.path(rel)
        st = self._walk(path)
        if st is None:
            raise OSError(errno.ENOENT, path)
        return st

    def exists(self, rel: str) -> bool:
        try:
            self.stat(rel)
        except OSError:
            return False
        return True

    def is_file(self, rel: str) -> bool:
        try:
            return stat.S_ISREG(self.stat(rel).st_mode)
        except OSError:
            return False

    def is_dir(self, rel: str) -> bool:
        try:
            return stat.S_ISDIR(self.stat(rel).st_mode)
        except OSError:
            return False

    # -- files --------------------------------------------------------------------------

    def open(self, rel: str, flags: int, mode: int = 0o644) -> int:
        """open(2): returns a Filesystem file handle."""
        path = self.path(rel)
        st = self._walk(path)
        if st is None:
            if not flags & os.O_CREAT:
                raise OSError(errno.ENOENT, path)
            return self.fs.create(path, stat.S_IFREG | mode, flags)
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise OSError(errno.EEXIST, path)
        if stat.S_ISDIR(st.st_mode) and (flags & os.O_ACCMODE) != os.O_RDONLY:
            raise OSError(errno.EISDIR, path)
        return self.fs.open(path, flags)

    def close(self, fh: int) -> None:
        """close(2): flush (its error is close's), then release."""
        try:
            self.fs.flush(fh)
        finally:
            self.fs.release(fh)

    def write_at(self, rel: str, offset: int, data: bytes) -> int:
        fh = self.open(rel, os.O_WRONLY | os.O_CREAT)
        try:
            written = self.fs.write(fh, data, offset)
        except BaseException:
            self.fs.release(fh)
            raise
        self.close(fh)
        return written

    def append(self, rel: str, data: bytes) -> int:
        fh = self.open(rel, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            written = self.fs.write(fh, data, self.fs.getattr(self.path(rel), fh).size)
        except BaseException:
            self.fs.release(fh)
            raise
        self.close(fh)
        return written

    def write_file(self, rel: str, data: bytes) -> None:
        """open(O_WRONLY|O_CREAT|O_TRUNC), write, close: what ``Path.write_bytes`` does."""
        fh = self.open(rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            if data:
                self.fs.write(fh, data, 0)
        except BaseException:
            self.fs.release(fh)
            raise
        self.close(fh)

    def read_bytes(self, rel: str) -> bytes:
        path = self.path(rel)
        st = self._walk(path)
        if st is None:
            raise OSError(errno.ENOENT, path)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, path)
        fh = self.fs.open(path, os.O_RDONLY)
        try:
            chunks = []
            offset = 0
            while True:
                chunk = self.fs.read(fh, 64 * KiB, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
            return b"".join(chunks)
        finally:
            self.fs.release(fh)

    def truncate(self, rel: str, size: int) -> None:
        path = self.path(rel)
        st = self._walk(path)
        if st is None:
            raise OSError(errno.ENOENT, path)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, path)
        self.fs.truncate(path, size)

    def unlink(self, rel: str) -> None:
        path = self.path(rel)
        st = self._walk(path)
        if st is None:
            raise OSError(errno.ENOENT, path)
        if stat.S_ISDIR(st.st_mode):
            raise OSError(errno.EISDIR, path)
        self.fs.unlink(path)

    def rename(self, src: str, dst: str) -> None:
        old, new = self.path(src), self.path(dst)
        source = self._walk(old)
        if source is None:
            raise OSError(errno.ENOENT, old)
        target = self._walk(new)
        if old == new:
            return
        if new.startswith(old + "/"):
            raise OSError(errno.EINVAL, f"cannot move {old} into itself")
        if old.startswith(new + "/"):
            raise OSError(errno.ENOTEMPTY, new)
        if target is not None:
            if stat.S_ISDIR(source.st_mode) and not stat.S_ISDIR(target.st_mode):
                raise OSError(errno.ENOTDIR, new)
            if not stat.S_ISDIR(source.st_mode) and stat.S_ISDIR(target.st_mode):
                raise OSError(errno.EISDIR, new)
        self.fs.rename(old, new)

    def symlink(self, target: str, rel: str) -> None:
        path = self.path(rel)
        if self._walk(path) is not None:
            raise OSError(errno.EEXIST, path)
        self.fs.symlink(path, target)

    def fsync_file(self, rel: str) -> None:
        """open for writing, fsync, close."""
        fh = self.open(rel, os.O_WRONLY)
        try:
            self.fs.fsync(fh)
        except BaseException:
            self.fs.release(fh)
            raise
        self.close(fh)

    # -- directories --------------------------------------------------------------------

    def mkdir(self, rel: str, mode: int = 0o755) -> None:
        path = self.path(rel)
        if self._walk(path) is not None:
            raise OSError(errno.EEXIST, path)
        self.fs.mkdir(path, mode)

    def rmdir(self, rel: str) -> None:
        path = self.path(rel)
        st = self._walk(path)
        if st is None:
            raise OSError(errno.ENOENT, path)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, path)
        self.fs.rmdir(path)

    def listdir(self, rel: str = "") -> list[str]:
        path = self.path(rel)
        st = self._walk(path)
        if st is None:
            raise OSError(errno.ENOENT, path)
        return [name for name, _ in self.fs.readdir(path)]

    def tree(self, with_bytes: bool = False) -> dict[str, bytes | None]:
        """Relative path -> bytes (or b"" without ``with_bytes``) for files, None for directories."""
        found: dict[str, bytes | None] = {}

        def visit(rel: str) -> None:
            for name, st in self.fs.readdir(self.path(rel)):
                child = f"{rel}/{name}" if rel else name
                mode = st.mode if st is not None else self.fs.getattr(self.path(child)).mode
                if stat.S_ISDIR(mode):
                    found[child] = None
                    visit(child)
                else:
                    found[child] = self.read_bytes(child) if with_bytes else b""

        visit("")
        return found


def store_tree(store: FakeStore, prefix: str) -> dict[str, bytes | None]:
    """What the store holds under ``prefix`` as a tree: files with their bytes, directories (markers
    and the parents of every key) as None."""
    found: dict[str, bytes | None] = {}
    for key, data in store.objects(prefix).items():
        rel = key[len(prefix):]
        if not rel:
            continue
        parts = rel.rstrip("/").split("/")
        for depth in range(1, len(parts)):
            found["/".join(parts[:depth])] = None
        found[rel.rstrip("/")] = None if rel.endswith("/") else data
    return found


def local_tree(root: Path) -> dict[str, bytes | None]:
    """The same shape for a local directory."""
    found: dict[str, bytes | None] = {}
    for current, subdirs, files in os.walk(root):
        rel = os.path.relpath(current, root)
        for name in subdirs:
            found[os.path.normpath(os.path.join(rel, name))] = None
        for name in files:
            found[os.path.normpath(os.path.join(rel, name))] = Path(current, name).read_bytes()
    return found
