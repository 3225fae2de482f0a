"""The Python API for training code: wait until checkpoints are in S3, and ask a mount its state.

Both calls talk to the daemon that serves the mount over its control socket
(see ``control.py``), exactly as ``s3ckptfs sync`` and ``s3ckptfs status``
do, so they work from any process on the node, in any framework, and need
nothing but the standard library: importing ``s3ckptfs`` loads neither boto3
nor FUSE, and never torch.

    import s3ckptfs
    torch.save(state, "/mnt/ckpt/step_1000.pt")
    s3ckptfs.sync("/mnt/ckpt/step_1000.pt")      # returns once the object is complete in S3

A path is matched to its daemon through the daemons' registration files in
the runtime directories (the caller's, then the node's ``/run/s3ckptfs``):
the first directory on the way down from ``/`` that a daemon serves (a FUSE
mountpoint or a watched directory). Nothing inside a mount is stat'ed, so a
hung mount cannot hang the lookup. A mount seen at another path than the
daemon's (a container that mounts the node's mountpoint elsewhere) is found
by its source URL in the mount table, provided the runtime directory is
shared with the container.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import control

__all__ = ["S3ckptfsError", "NotMountedError", "SyncError", "SyncTimeoutError", "FailedUpload",
           "find_mount", "sync", "status"]


class S3ckptfsError(Exception):
    """Base class of the errors this API raises."""


class NotMountedError(S3ckptfsError):
    """No s3ckptfs daemon serves the path (not mounted, or the daemon is gone)."""


@dataclass(frozen=True)
class FailedUpload:
    """A file that is not in S3: its local path, and why (the daemon's message)."""

    path: str
    error: str


class SyncError(S3ckptfsError):
    """Some files closed under the path are not in S3. ``failed`` lists them.

    Their data stays in the mount's cache (and its journal): the daemon keeps
    it until the upload succeeds or the file is deleted.
    """

    def __init__(self, message: str, failed: list[FailedUpload]) -> None:
        super().__init__(message)
        self.failed = failed


class SyncTimeoutError(SyncError):
    """``timeout`` passed before every file was in S3. ``failed`` lists those still pending."""


@dataclass(frozen=True)
class _Daemon:
    """A daemon as it registered itself in a runtime directory (it may be gone since)."""

    mountpoint: str
    socket: Path
    source: str


def _runtime_dirs() -> list[Path]:
    # A user's own daemons, then the node's (root's): a training job finds the mount systemd serves.
    dirs = [control.runtime_dir()]
    if control.SYSTEM_RUNTIME_DIR not in dirs:
        dirs.append(control.SYSTEM_RUNTIME_DIR)
    return dirs


def _registered() -> list[_Daemon]:
    found = []
    for directory in _runtime_dirs():
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                info = json.loads((directory / name).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and info.get("mountpoint"):
                found.append(_Daemon(str(info["mountpoint"]).rstrip("/") or "/",
                                     directory / (name[:-len(".json")] + ".sock"), str(info.get("source", ""))))
    return found


def _mount_table() -> dict[str, tuple[str, str]]:
    """This process's mounts: mountpoint -> (filesystem type, source), from /proc/self/mountinfo."""
    table = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                before, _, after = line.partition(" - ")
                fields, rest = before.split(), after.split()
                if len(fields) > 4 and len(rest) > 1:
                    unescape = lambda text: text.encode().decode("unicode_escape")  # noqa: E731
                    table[unescape(fields[4])] = (rest[0], unescape(rest[1]))
    except OSError:
        pass
    return table


def _locate(path: str | os.PathLike[str]) -> tuple[_Daemon, str, str]:
    """(daemon, mountpoint as this process sees it, path inside the mount: '/' or '/a/b').

    Resolves symlinks component by component from the root, and stops at the
    first directory a daemon serves, so no path inside a mount is stat'ed. A
    mount seen at another path than the daemon's (a container mounting the
    host's mountpoint elsewhere) is matched by its source URL.
    """
    absolute = os.path.abspath(os.fspath(path))
    daemons = _registered()
    by_path = {}
    for daemon in daemons:
        head, tail = os.path.split(daemon.mountpoint)
        by_path[os.path.join(os.path.realpath(head), tail)] = daemon  # above the mount: safe to resolve
        by_path[daemon.mountpoint] = daemon
    mounts = _mount_table()

    def served(resolved: str) -> tuple[_Daemon, str] | None:
        """The deepest directory among ``resolved`` (free of symlinks) and its parents that a daemon serves."""
        probe = resolved
        while True:
            if probe in by_path:
                return by_path[probe], probe
            fstype, source = mounts.get(probe, ("", ""))
            if fstype == "fuse.s3ckptfs":
                same_source = [daemon for daemon in daemons if daemon.source == source]
                if not same_source:
                    raise NotMountedError(f"{probe} is an s3ckptfs mount of {source}, but its daemon's control "
                                          f"socket is not in {' or '.join(map(str, _runtime_dirs()))}")
                return same_source[0], probe
            if probe == "/":
                return None
            probe = os.path.dirname(probe)

    parts = [part for part in absolute.split("/") if part]
    resolved = "/"
    for index in range(len(parts) + 1):
        if index:
            candidate = os.path.join(resolved, parts[index - 1])
            # A mountpoint is never a symlink; not resolving it keeps a hung mount from hanging us.
            resolved = candidate if candidate in mounts else os.path.realpath(candidate)
        found = served(resolved)
        if found is not None:
            daemon, mountpoint = found
            inside = "/".join([resolved[len(mountpoint):].strip("/"), *parts[index:]]).strip("/")
            return daemon, mountpoint, "/" + inside
    raise NotMountedError(f"{absolute} is not on an s3ckptfs mount (no daemon serves it)")


def find_mount(path: str | os.PathLike[str]) -> str | None:
    """The mountpoint (or watched directory) of the s3ckptfs daemon serving ``path``, or None.

    ``path`` need not exist; nothing inside the mount is touched.
    """
    try:
        return _locate(path)[1]
    except NotMountedError:
        return None


def _request(daemon: _Daemon, message: dict, on_progress: Callable[[dict], None] | None = None,
             timeout: float | None = None) -> dict:
    try:
        return control.request(daemon.mountpoint, message, on_progress, timeout=timeout, socket_file=daemon.socket)
    except control.ControlError as exc:
        raise NotMountedError(str(exc)) from None


def status(mountpoint: str | os.PathLike[str], timeout: float = 30.0) -> dict[str, Any]:
    """The state of the mount serving ``mountpoint`` (or any path inside it).

    Returns exactly what ``s3ckptfs status --json`` prints: ``pending`` (a list
    of files not yet in S3, each with ``path``, ``key``, ``size``, ``uploaded``
    (of which ``copied``: parts made in S3 from equal bytes already there, with
    ``-o dedup=on``), ``age``, ``state`` (open, pending, retrying or failed) and
    ``error``), ``objects_committed``, ``bytes_committed``, ``clean_cache_bytes``,
    ``dedup`` (on or off) and the part bytes ``part_bytes_sent`` and
    ``part_bytes_copied`` since the mount.
    Raises NotMountedError if no daemon answers, TimeoutError if it does not
    answer within ``timeout`` seconds.
    """
    daemon, _, _ = _locate(mountpoint)
    return _request(daemon, {"cmd": "status"}, timeout=timeout)


def sync(path: str | os.PathLike[str], timeout: float | None = None,
         on_progress: Callable[[dict], None] | None = None) -> float:
    """Block until every file closed under ``path`` is complete in S3; return the seconds it took.

    ``path`` is a file or directory on an s3ckptfs mount, or the mountpoint
    itself (everything). Files still open for writing are not waited for
    (one held open under ``path`` delays the call by ``RELEASE_GRACE``: a
    file just closed counts as open until the kernel's release reaches the
    daemon, and the call waits for that).
    ``on_progress`` is called about twice a second with
    ``{"files", "bytes_total", "bytes_done", "bytes_copied"}`` while uploads are
    in flight (``bytes_copied``: of ``bytes_done``, those copied in S3, not sent).

    Raises SyncError (listing the files) if an upload failed,
    SyncTimeoutError (listing the files still pending) if ``timeout`` seconds
    pass first, and NotMountedError if no daemon serves ``path``. A timeout
    does not cancel anything: the uploads go on.
    """
    started = time.monotonic()
    daemon, mount, inside = _locate(path)
    _await_releases(daemon, inside, min(RELEASE_GRACE, timeout) if timeout is not None else RELEASE_GRACE)
    remaining = None if timeout is None else max(0.1, timeout - (time.monotonic() - started))
    try:
        answer = _request(daemon, {"cmd": "sync", "path": inside}, on_progress, timeout=remaining)
    except TimeoutError:
        pending = _pending_under(daemon, mount, inside)
        raise SyncTimeoutError(f"{len(pending)} file(s) under {path} not in S3 after {timeout:g}s",
                               pending) from None
    if "failed" not in answer:
        raise SyncError(f"sync of {path} failed: {answer.get('error', 'no answer')}", [])
    failed = [FailedUpload(_local(mount, item["path"]), item["error"]) for item in answer["failed"]]
    if failed:
        names = ", ".join(item.path for item in failed[:5]) + (" ..." if len(failed) > 5 else "")
        raise SyncError(f"{len(failed)} file(s) under {path} are not in S3: {names}", failed)
    return time.monotonic() - started


# close(2) returns once the kernel has sent FLUSH; the RELEASE that tells the daemon the file
# is closed follows asynchronously, and until it arrives the daemon counts the file as open
# (and a sync does not wait for it). A sync right after a close waits this long at most for
# such files to be released; a file really held open under the path costs that delay once.
RELEASE_GRACE = 0.5


def _open_under(daemon: _Daemon, inside: str) -> set[str]:
    prefix = inside.rstrip("/") + "/"
    answer = _request(daemon, {"cmd": "status"}, timeout=10)
    return {item["path"] for item in answer.get("pending", []) if item["state"] == "open"
            and (inside == "/" or item["path"] == inside or item["path"].startswith(prefix))}


def _await_releases(daemon: _Daemon, inside: str, limit: float) -> None:
    """Wait (at most ``limit`` seconds) until no file under ``inside`` counts as open for writing."""
    deadline = time.monotonic() + limit
    while _open_under(daemon, inside) and time.monotonic() < deadline:
        time.sleep(0.01)


def _local(mountpoint: str, inside: str) -> str:
    return os.path.join(mountpoint, inside.lstrip("/")) if inside.strip("/") else mountpoint


def _pending_under(daemon: _Daemon, mountpoint: str, inside: str) -> list[FailedUpload]:
    """Files under ``inside`` the daemon still has to upload (best effort: [] if it does not answer)."""
    try:
        answer = _request(daemon, {"cmd": "status"}, timeout=10)
    except (S3ckptfsError, OSError):
        return []
    prefix = inside.rstrip("/") + "/"
    found = []
    for item in answer.get("pending", []):
        if item["state"] == "open":
            continue
        if inside == "/" or item["path"] == inside or item["path"].startswith(prefix):
            found.append(FailedUpload(_local(mountpoint, item["path"]),
                                      item.get("error") or f"{item['state']}: "
                                      f"{item['uploaded']}/{item['size']} bytes uploaded"))
    return found
