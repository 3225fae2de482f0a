"""The only module that imports mfusepy: a thin translation from FUSE calls to ``Filesystem``.

It converts paths and handles in, stat dicts out, and every failure into a
``FuseOSError`` with an errno, because mfusepy turns any other exception into
EINVAL. No semantics live here, so the filesystem can be tested without FUSE.

libfuse3 is selected explicitly before mfusepy is imported: mfusepy prefers
libfuse2 when both are installed (s3fs-fuse pulls it in), and libfuse2 without
big_writes sends 4 KiB writes, about ten times slower than libfuse3's 1 MiB.
A libfuse 3.17 built by scripts/setup.sh into the environment
(``<sys.prefix>/lib/s3ckptfs-libfuse``) is preferred to the system's: with it,
files being written, and complete cached copies opened for reading, use FUSE
passthrough (the kernel reads and writes the local file itself; see docs/design.md). ``FUSE_LIBRARY_PATH`` overrides the choice.
"""

from __future__ import annotations

import ctypes.util
import errno
import fcntl
import functools
import logging
import os
import re
import struct
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import FsError, S3Error
from .fs import Filesystem, Stat
from .passthrough import PassthroughBackend
from .metrics import Metrics

log = logging.getLogger(__name__)


BUNDLED_LIBFUSE = Path(sys.prefix) / "lib" / "s3ckptfs-libfuse" / "libfuse3.so.4"
_library_note = ""


def _select_libfuse3() -> None:
    global _library_note
    if "FUSE_LIBRARY_PATH" in os.environ:
        return
    if BUNDLED_LIBFUSE.exists():
        try:
            ctypes.CDLL(str(BUNDLED_LIBFUSE))
            os.environ["FUSE_LIBRARY_PATH"] = str(BUNDLED_LIBFUSE)
            return
        except OSError as exc:
            _library_note = f"{BUNDLED_LIBFUSE} does not load ({exc}); "
    path = ctypes.util.find_library("fuse3")
    if path:
        os.environ["FUSE_LIBRARY_PATH"] = path


_select_libfuse3()
import mfusepy  # noqa: E402  (must follow the library selection above)

LIBFUSE_PATH = os.environ.get("FUSE_LIBRARY_PATH", "?")
LIBFUSE_MAJOR = mfusepy.fuse_version_major
LIBFUSE_VERSION = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)
KERNEL_READAHEAD = 1 << 20

_FUSE_BUF_IS_FD = 1 << 1
_FUSE_BUF_FD_SEEK = 1 << 2


class _FuseBuf(ctypes.Structure):
    # struct fuse_buf from fuse_common.h
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class _FuseBufVec(ctypes.Structure):
    # struct fuse_bufvec: the first buffer is inline (mfusepy declares it as a pointer)
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t), ("off", ctypes.c_size_t),
                ("buf", _FuseBuf * 1)]


_fuse_buf_size = mfusepy._libfuse.fuse_buf_size
_fuse_buf_size.argtypes = [ctypes.c_void_p]
_fuse_buf_size.restype = ctypes.c_size_t
_fuse_buf_copy = mfusepy._libfuse.fuse_buf_copy
_fuse_buf_copy.argtypes = [ctypes.POINTER(_FuseBufVec), ctypes.c_void_p, ctypes.c_int]
_fuse_buf_copy.restype = ctypes.c_ssize_t


_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]


def _fd_bufvec(fd: int, offset: int, size: int) -> int:
    """A malloc'd fuse_bufvec naming ``size`` bytes of ``fd`` at ``offset`` (libfuse frees it)."""
    address = _libc.malloc(ctypes.sizeof(_FuseBufVec))
    if not address:
        raise MemoryError("malloc failed")
    vec = _FuseBufVec.from_address(address)
    vec.count, vec.idx, vec.off = 1, 0, 0
    vec.buf[0] = _FuseBuf(size=size, flags=_FUSE_BUF_IS_FD | _FUSE_BUF_FD_SEEK, mem=None, fd=fd, pos=offset)
    return address


def _copy_bufvec(source: int, size: int, fd: int, offset: int) -> int:
    """Move a FUSE write's data into ``fd`` at ``offset`` inside libfuse (spliced when possible)."""
    target = _FuseBufVec(count=1, idx=0, off=0)
    target.buf[0] = _FuseBuf(size=size, flags=_FUSE_BUF_IS_FD | _FUSE_BUF_FD_SEEK, mem=None, fd=fd, pos=offset)
    copied = _fuse_buf_copy(ctypes.byref(target), source, 0)
    if copied < 0:
        raise OSError(-copied, os.strerror(-copied))
    return copied


# FUSE passthrough (libfuse >= 3.17, Linux >= 6.9)
FUSE_CAP_PASSTHROUGH = 1 << 29          # fuse_common.h


def _fuse_ioctl_w(number: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (229 << 8) | number   # _IOW(FUSE_DEV_IOC_MAGIC, number, size)


FUSE_DEV_IOC_BACKING_OPEN = _fuse_ioctl_w(1, 16)    # struct fuse_backing_map {int32 fd; uint32 flags; uint64 padding}
FUSE_DEV_IOC_BACKING_CLOSE = _fuse_ioctl_w(2, 4)    # uint32 backing id
# struct fuse_file_info in 3.17: flags, bits, 2 x padding, fh, lock_owner, poll_events (u32), backing_id (i32), ...
# mfusepy's declaration ends before backing_id; it is written by offset.
FI_BACKING_ID_OFFSET = 36

_libfuse = mfusepy._libfuse
_libfuse.fuse_get_session.restype = ctypes.c_void_p
_libfuse.fuse_get_session.argtypes = [ctypes.c_void_p]
_libfuse.fuse_session_fd.restype = ctypes.c_int
_libfuse.fuse_session_fd.argtypes = [ctypes.c_void_p]


class _KernelBacking(PassthroughBackend):
    """Backing files registered with the kernel through ioctls on /dev/fuse."""

    def __init__(self, device_fd: int) -> None:
        self.device_fd = device_fd

    def open(self, fd: int) -> int:
        return fcntl.ioctl(self.device_fd, FUSE_DEV_IOC_BACKING_OPEN, bytearray(struct.pack("iIQ", fd, 0, 0)), True)

    def close(self, backing_id: int) -> None:
        fcntl.ioctl(self.device_fd, FUSE_DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("I", backing_id)), True)


def _set_backing_id(fi: Any, backing_id: int) -> None:
    ctypes.c_int32.from_address(ctypes.addressof(fi) + FI_BACKING_ID_OFFSET).value = backing_id


def _translate(method: Callable) -> Callable:
    """Run a FUSE operation; any failure leaves as FuseOSError(errno), never as a traceback."""

    name = method.__name__

    def fail(self, code: int, cause: BaseException) -> mfusepy.FuseOSError:
        self.metrics.count_error(name, code)
        error = mfusepy.FuseOSError(code)
        error.__cause__ = cause
        return error

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        self.metrics.count_operation(name)
        try:
            return method(self, *args, **kwargs)
        except mfusepy.FuseOSError as exc:
            raise fail(self, exc.errno, exc) from None
        except FsError as exc:
            raise fail(self, exc.errno or errno.EIO, exc) from None
        except S3Error as exc:
            log.error("%s: %s", name, exc)
            raise fail(self, exc.errno, exc) from None
        except OSError as exc:
            if exc.errno is None:
                log.exception("%s failed", name)
            raise fail(self, exc.errno or errno.EIO, exc) from None
        except Exception as exc:
            log.exception("unexpected error in %s", name)
            raise fail(self, errno.EIO, exc) from None

    return wrapper


# libfuse (without hard_remove) keeps a file unlinked while open under such a name in its
# directory, renamed there by the filesystem's rename, and unlinks it at the last release.
# Calls on the file without a handle (fstat) then come with that name: with hard_remove
# they would come with no path at all, and libfuse answers them ESTALE itself.
_HIDDEN = re.compile(r"(?:^|/)\.fuse_hidden[0-9a-f]{16}$")


def _hidden(path: str | None) -> bool:
    return path is not None and _HIDDEN.search(path) is not None


def _stat_dict(st: Stat, uid: int, gid: int) -> dict[str, int]:
    mtime_ns = int(st.mtime * 1e9)
    return {"st_mode": st.mode, "st_size": st.size, "st_nlink": st.nlink, "st_uid": uid, "st_gid": gid,
            "st_mtime": mtime_ns, "st_ctime": mtime_ns, "st_atime": mtime_ns,
            "st_blksize": 1 << 20, "st_blocks": (st.size + 511) // 512}


class FuseOperations(mfusepy.Operations):
    """mfusepy callbacks for one mount."""

    use_ns = True

    def __init__(self, fs: Filesystem, metrics: Metrics, on_ready: Callable[[], None] | None = None) -> None:
        self.fs = fs
        self.metrics = metrics
        self._on_ready = on_ready
        self._uid = os.getuid()
        self._gid = os.getgid()

    def init_with_config(self, conn_info, config_3) -> None:
        if conn_info is not None:
            max_write = getattr(conn_info, "max_write", 0)
            log.info("FUSE ready: %s (libfuse %d.%d), max write %d KiB", LIBFUSE_PATH, *LIBFUSE_VERSION,
                     max_write // 1024)
        why_not = self._enable_passthrough(conn_info)
        if why_not:
            log.info("FUSE passthrough: off (%s%s)", _library_note, why_not)
        else:
            log.info("FUSE passthrough: active (files being written bypass the daemon)")
        if self._on_ready is not None:
            self._on_ready()

    def _enable_passthrough(self, conn_info) -> str | None:
        """Ask the kernel for passthrough; returns why it is off, or None if it is on."""
        if self.fs.options.passthrough == "off":
            return "-o passthrough=off"
        if LIBFUSE_VERSION < (3, 17):
            return (f"libfuse {LIBFUSE_VERSION[0]}.{LIBFUSE_VERSION[1]} at {LIBFUSE_PATH} has none; "
                    f"scripts/setup.sh builds 3.17 into {BUNDLED_LIBFUSE.parent}")
        if conn_info is None or not getattr(conn_info, "capable_ext", 0) & FUSE_CAP_PASSTHROUGH:
            return "the kernel does not offer it: needs Linux >= 6.9 with CONFIG_FUSE_PASSTHROUGH"
        if os.geteuid() != 0:
            return "registering backing files needs root (CAP_SYS_ADMIN)"
        try:
            fuse = _libfuse.fuse_get_context().contents.fuse
            device_fd = _libfuse.fuse_session_fd(_libfuse.fuse_get_session(fuse))
        except Exception as exc:  # noqa: BLE001 - any failure here only means no passthrough
            return f"no FUSE session fd: {exc}"
        if device_fd < 0:
            return "no FUSE session fd"
        conn_info.want_ext |= FUSE_CAP_PASSTHROUGH
        conn_info.want |= FUSE_CAP_PASSTHROUGH   # libfuse reconciles want with want_ext
        self.fs.enable_passthrough(_KernelBacking(device_fd))
        return None

    def _kept(self, path: str | None, fh: int | None) -> int | None:
        """The handle to use for ``path``: ``fh``, or one open on the unlinked file libfuse keeps
        as ``path`` (ENOENT if none: such a name never reaches S3)."""
        if fh is not None or not _hidden(path):
            return fh
        kept = self.fs.kept_open(path or "")
        if kept is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return kept

    @_translate
    def getattr(self, path: str, fh: int | None = None) -> dict[str, int]:
        fh = self._kept(path, fh)
        return _stat_dict(self.fs.getattr(None if fh is not None and _hidden(path) else path, fh),
                          self._uid, self._gid)

    @_translate
    def readdir(self, path: str, fh: int):
        entries: list[Any] = [".", ".."]
        for name, st in self.fs.readdir(path):
            entries.append((name, {"st_mode": st.mode} if st else None, 0) if st else name)
        return entries

    @_translate
    def open(self, path: str, flags: int) -> int:
        return self.fs.open(path, flags)

    @_translate
    def create(self, path: str, mode: int, flags: int) -> int:
        return self.fs.create(path, mode, flags)

    @_translate
    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.fs.read(fh, size, offset)

    @_translate
    def read_buf(self, path: str | None, bufpp, size: int, offset: int, fh: int) -> int:
        # Used by libfuse instead of read(): it reads (or splices) the bytes from our file itself.
        fd, start, length = self.fs.read_source(fh, size, offset)
        bufpp[0] = ctypes.cast(_fd_bufvec(fd, start, length), ctypes.POINTER(mfusepy.fuse_bufvec))
        return 0

    @_translate
    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return self.fs.write(fh, data, offset)

    @_translate
    def write_buf(self, path: str | None, bufvec, offset: int, fh: int) -> int:
        # Used by libfuse instead of write(): the data never becomes a Python object.
        source = ctypes.cast(bufvec, ctypes.c_void_p).value
        size = _fuse_buf_size(source)
        return self.fs.write_with(fh, offset, size, lambda fd, at: _copy_bufvec(source, size, fd, at))

    @_translate
    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        fh = self._kept(path, fh)
        self.fs.truncate(None if _hidden(path) else path, length, fh)
        return 0

    @_translate
    def flush(self, path: str, fh: int) -> int:
        self.fs.flush(fh)
        return 0

    @_translate
    def release(self, path: str, fh: int) -> int:
        self.fs.release(fh)
        return 0

    @_translate
    def fsync(self, path: str, datasync: int, fh: int) -> int:
        self.fs.fsync(fh)
        return 0

    @_translate
    def unlink(self, path: str) -> int:
        if not _hidden(path):  # a kept file's last release: it went with its handles
            self.fs.unlink(path)
        return 0

    @_translate
    def mkdir(self, path: str, mode: int) -> int:
        self.fs.mkdir(path, mode)
        return 0

    @_translate
    def rmdir(self, path: str) -> int:
        self.fs.rmdir(path)
        return 0

    @_translate
    def rename(self, old: str, new: str) -> int:
        if _hidden(new):  # libfuse keeps an open file it unlinks (or renames over) under a new name
            self.fs.unlink(old, keep_open_as=new)
        elif _hidden(old):
            raise mfusepy.FuseOSError(errno.ENOENT)
        else:
            self.fs.rename(old, new)
        return 0

    @_translate
    def symlink(self, target: str, source: str) -> int:
        # mfusepy: ``target`` is the new link's path, ``source`` what it points to.
        self.fs.symlink(target, source)
        return 0

    @_translate
    def readlink(self, path: str) -> str:
        return self.fs.readlink(path)

    @_translate
    def link(self, target: str, source: str) -> int:
        self.fs.link(target, source)
        return 0

    @_translate
    def chmod(self, path: str, mode: int) -> int:
        if not _hidden(path):  # an unlinked file's attributes go nowhere
            self.fs.chmod(path, mode)
        return 0

    @_translate
    def chown(self, path: str, uid: int, gid: int) -> int:
        if not _hidden(path):  # an unlinked file's attributes go nowhere
            self.fs.chown(path, uid, gid)
        return 0

    @_translate
    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        if not _hidden(path):  # an unlinked file's mtime goes nowhere
            self.fs.utimens(path, None if times is None else times[1] / 1e9)
        return 0

    @_translate
    def statfs(self, path: str) -> dict[str, int]:
        return self.fs.statfs()

    def access(self, path: str, amode: int) -> int:
        return 0


def raise_readahead(mountpoint: str, kib: int = KERNEL_READAHEAD // 1024) -> None:
    """Let the kernel read ahead ``kib`` on this mount (default 128 KiB: 8x more, smaller requests).

    The kernel proposes the read-ahead at FUSE init and a filesystem may only lower it;
    the mount's bdi setting in sysfs can raise it (root only; best effort).
    """
    device = os.stat(mountpoint).st_dev
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    try:
        with open(path, "w") as setting:
            setting.write(str(kib))
        log.info("kernel read-ahead on %s: %d KiB", mountpoint, kib)
    except OSError as exc:
        log.info("kernel read-ahead left as it is (%s: %s)", path, exc.strerror)


class _FUSE(mfusepy.FUSE):
    """mfusepy's FUSE with write_buf/read_buf accepting a NULL path (a file unlinked while open),
    truncate passing the file handle on (ftruncate), and open/create that hand the kernel a passthrough backing id when the file has one."""

    own_keep_cache = False

    def open(self, path, fip):  # noqa: D102 - same contract as mfusepy's
        fi = fip.contents
        fi.fh = self.operations.open(path.decode(self.encoding, self.errors), fi.flags)
        if not self._pass_through(fi) and self.own_keep_cache:
            fi.keep_cache = self.operations.fs.keep_cache(fi.fh)
        return 0

    def create(self, path, mode, fip):  # noqa: D102 - same contract as mfusepy's
        fi = fip.contents
        fi.fh = self.operations.create(path.decode(self.encoding, self.errors), mode, fi.flags)
        self._pass_through(fi)
        return 0

    def _pass_through(self, fi) -> bool:
        backing_id = self.operations.fs.backing_id(fi.fh)
        if backing_id:
            _set_backing_id(fi, backing_id)
        return bool(backing_id)

    def write_buf(self, path, buf, offset, fip):  # noqa: D102 - same contract as mfusepy's
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        return self.operations.write_buf(decoded, buf, offset, fip.contents.fh)

    def read_buf(self, path, bufpp, size, offset, fip):  # noqa: D102 - same contract as mfusepy's
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        return self.operations.read_buf(decoded, bufpp, size, offset, fip.contents.fh)

    def truncate_fuse_3(self, path, length, fip):  # noqa: D102 - same contract as mfusepy's
        # mfusepy drops the file info here, so an ftruncate of a file unlinked while open
        # (libfuse passes no path then) would reach us with neither path nor handle.
        decoded = None if path is None else path.decode(self.encoding, self.errors)
        return self.operations.truncate(decoded, length, fip.contents.fh if fip else None)


def serve(fs: Filesystem, mountpoint: str, *, fsname: str, allow_other: bool, metrics: Metrics,
          on_ready: Callable[[], None] | None = None) -> None:
    """Mount and serve until unmounted or signalled (blocks)."""
    # libfuse's auto_cache sets keep_cache on opens after the filesystem answered, and the
    # kernel refuses a passthrough open with keep_cache (EIO). Where passthrough may be used,
    # the daemon keeps the page cache itself: for objects read through it, while the ETag stays.
    own_keep_cache = LIBFUSE_VERSION >= (3, 17) and fs.options.passthrough != "off"
    # No hard_remove: libfuse then keeps a file unlinked while open under a hidden name (see
    # _HIDDEN), so that fstat and the like still reach us for it.
    options: dict[str, Any] = {"fsname": fsname, "subtype": "s3ckptfs",
                               "foreground": True, "auto_cache": not own_keep_cache}
    if fs.options.negative_ttl > 0:
        # The kernel remembers absent names as long as we do: a stat storm of missing
        # names (imports, exists() checks) then stays in the kernel. Names created
        # through this mount replace the kernel's negative entry at once.
        options["negative_timeout"] = fs.options.negative_ttl
    if allow_other:
        options["allow_other"] = True
    _FUSE.own_keep_cache = own_keep_cache
    _FUSE(FuseOperations(fs, metrics, on_ready), mountpoint, **options)
