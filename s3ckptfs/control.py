"""The control channel between the CLI (sync, status, unmount) and a running daemon.

A unix socket per mount, found from the mountpoint alone: its name is a hash
of the mountpoint's real path, in a runtime directory (``/run/s3ckptfs`` for
root, ``$XDG_RUNTIME_DIR/s3ckptfs`` or ``/tmp/s3ckptfs-UID`` otherwise). A
file beside it (``.json``) names the daemon's pid, mountpoint and cache dir.

Protocol: the client sends one JSON object on a line; the daemon answers with
zero or more ``{"progress": ...}`` lines followed by one final object that has
an ``"ok"`` key. Commands: ``status``, ``sync`` (with optional ``path``).

Access: the socket is the daemon owner's alone, unless the mount is shared
with other users (``allow_other``): then they may ask for ``sync`` and
``status`` too (the root runtime directory is the node's, so a training job
running as a user finds the mount that root serves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


SYSTEM_RUNTIME_DIR = Path("/run/s3ckptfs")


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "s3ckptfs" if xdg else Path(f"/tmp/s3ckptfs-{os.geteuid()}")


def socket_path(mountpoint: str | os.PathLike) -> Path:
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:20]
    return runtime_dir() / f"{digest}.sock"


def info_path(mountpoint: str | os.PathLike) -> Path:
    return socket_path(mountpoint).with_suffix(".json")


def read_info(mountpoint: str | os.PathLike) -> dict | None:
    try:
        return json.loads(info_path(mountpoint).read_text())
    except (OSError, ValueError):
        return None


Handler = Callable[[dict, Callable[[dict], None]], dict]


class ControlServer:
    """Serves control requests for one mount on a background thread."""

    def __init__(self, mountpoint: str, handler: Handler, info: dict, shared: bool = False) -> None:
        """``shared``: other users may connect (the mount is ``allow_other``)."""
        self.path = socket_path(mountpoint)
        self._info_path = info_path(mountpoint)
        self._handler = handler
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if shared:
            # Others must find the socket (list the dir, read the info file) and connect to it.
            os.chmod(self.path.parent, os.stat(self.path.parent).st_mode & 0o777 | 0o755)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        os.chmod(self.path, 0o666 if shared else 0o600)
        self._sock.listen(16)
        self._info_path.write_text(json.dumps(info))
        os.chmod(self._info_path, 0o644 if shared else 0o600)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="s3ckptfs-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), name="s3ckptfs-control-conn", daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as stream:
            def send(message: dict) -> None:
                stream.write(json.dumps(message).encode() + b"\n")
                stream.flush()

            try:
                request = json.loads(stream.readline() or b"{}")
                send(self._handler(request, lambda progress: send({"progress": progress})))
            except (OSError, ValueError) as exc:
                log.debug("control connection ended: %s", exc)
            except Exception as exc:
                log.exception("control request failed")
                try:
                    send({"ok": False, "error": repr(exc)})
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            for path in (self.path, self._info_path):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass


class ControlError(Exception):
    """The daemon could not be reached."""


def request(mountpoint: str, message: dict, on_progress: Callable[[dict], None] | None = None,
            timeout: float | None = None, socket_file: Path | None = None) -> dict:
    """Send one request to the daemon serving ``mountpoint``; return its final answer.

    ``socket_file`` names the socket directly (found from its info file), so
    the mountpoint need not be resolved. ``timeout`` bounds the whole exchange:
    TimeoutError once it has passed.
    """
    path = socket_file or socket_path(mountpoint)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ControlError(f"no s3ckptfs daemon answers for {mountpoint} ({exc.strerror})") from None
    deadline = None if timeout is None else time.monotonic() + timeout
    with sock, sock.makefile("rwb") as stream:
        stream.write(json.dumps(message).encode() + b"\n")
        stream.flush()
        while True:
            if deadline is not None:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
            line = stream.readline()
            if not line:
                raise ControlError(f"the daemon for {mountpoint} closed the connection")
            answer = json.loads(line)
            if "progress" in answer:
                if on_progress is not None:
                    on_progress(answer["progress"])
                continue
            return answer
