"""The mount table and daemon processes, read without touching a mount.

Shared by the daemon, the tests and the benchmark. A FUSE mount whose daemon
died answers a ``stat`` with ENOTCONN, and one whose daemon hangs does not
answer at all, so nothing here stats a path that may be a mountpoint (no
``os.path.ismount``, no ``os.path.realpath`` of it): whether a path is mounted
is read from ``/proc/self/mountinfo``, and whether a daemon runs from
``/proc/<pid>``. The one exception, ``is_dead_fuse_mount``, probes a mount on a
helper thread and gives up after a timeout.

Files a daemon keeps in its cache dir: ``PID_FILE`` (its pid, while it runs)
and ``LOG_FILE`` (its log in background mode).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

PID_FILE = "s3ckptfs.pid"
LOG_FILE = "s3ckptfs.log"

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")
_MAX_SYMLINKS = 40  # as the kernel's path walk


def unescape_mount_field(raw: bytes) -> str:
    """Undo the octal escapes of the mount table (``\\040`` space, ``\\011`` tab, ``\\012``
    newline, ``\\134`` backslash); the bytes are then decoded as the OS decodes file names."""
    return os.fsdecode(_OCTAL_ESCAPE.sub(lambda match: bytes([int(match.group(1), 8)]), raw))


def mounted_paths() -> set[str]:
    """The mountpoints in this process's mount table (empty if it cannot be read)."""
    paths = set()
    try:
        with open(MOUNTINFO, "rb") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 4:
                    paths.add(unescape_mount_field(fields[4]))
    except OSError:
        pass
    return paths


def resolve_without_stat(path: str | os.PathLike[str]) -> str:
    """``path`` made absolute with its symlinks resolved, as the mount table names it.

    The parent directory is resolved with ``realpath``; the last component, which
    may be a mountpoint, only with ``readlink`` (which the kernel answers without
    asking a FUSE daemon), so that a dead or hung mount there cannot hang the caller.
    """
    current = os.path.abspath(os.fspath(path))
    for _ in range(_MAX_SYMLINKS):
        parent, name = os.path.split(current)
        current = os.path.join(os.path.realpath(parent), name) if name else parent
        try:
            target = os.readlink(current)
        except OSError:  # not a symlink (EINVAL), or not there: either way this is the name
            return current
        current = os.path.normpath(os.path.join(os.path.dirname(current), target))
    return current


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """Whether something is mounted at ``path``; never stats it."""
    return resolve_without_stat(path) in mounted_paths()


def is_dead_fuse_mount(path: str | os.PathLike[str], timeout: float = 2.0) -> bool:
    """Whether ``path`` is a mount whose FUSE daemon is gone (a stat answers ENOTCONN).

    The stat runs on a helper thread: a live daemon that does not answer within
    ``timeout`` seconds counts as not dead (the thread is left to finish on its own).
    """
    if not is_mounted(path):
        return False
    answer: list[int] = []

    def probe() -> None:
        try:
            os.stat(path)
            answer.append(0)
        except OSError as exc:
            answer.append(exc.errno or 0)

    prober = threading.Thread(target=probe, name="s3ckptfs-mount-probe", daemon=True)
    prober.start()
    prober.join(timeout)
    return answer == [errno.ENOTCONN]


def fusermount() -> str:
    """The fusermount command of libfuse 3 (or 2, if only that is installed)."""
    return shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"


def unmount(path: str | os.PathLike[str], lazy: bool = False,
            timeout: float | None = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``fusermount3 -u PATH`` (``-uz`` with ``lazy``: detach now, finish when no longer busy).

    Returns the finished command (its ``stderr`` says why it failed); raises
    ``subprocess.TimeoutExpired`` if it takes longer than ``timeout`` seconds.
    """
    return subprocess.run([fusermount(), "-uz" if lazy else "-u", os.fspath(path)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout, check=False)


def unmount_until_gone(path: str | os.PathLike[str], timeout: float | None = 60.0) -> list[str]:
    """Unmount ``path`` if it is mounted: plainly first, lazily if that is not enough.

    Returns what had to be forced (empty if nothing was mounted or ``-u`` sufficed).
    """
    problems: list[str] = []
    if not is_mounted(path):
        return problems
    unmount(path, timeout=timeout)
    if is_mounted(path):
        problems.append(f"fusermount3 -u {path} failed; lazy unmount used")
        unmount(path, lazy=True, timeout=timeout)
        if is_mounted(path):
            problems.append(f"{path} is still mounted after fusermount3 -uz")
    return problems


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, which has exited, is not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout: float, interval: float = 0.05) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; whether it did."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def read_pid(cache_dir: str | os.PathLike[str]) -> int | None:
    """The pid a daemon recorded in ``cache_dir`` (it is there while the daemon runs), if any."""
    try:
        return int((Path(cache_dir) / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
