"""What the framework callbacks share: wait for checkpoint directories to be in S3, and say so.

The callbacks log to the ``s3ckptfs.integrations`` logger, at INFO. A training
script often configures no logging at all, and then those lines would vanish;
so the logger gets a handler of its own that writes to stderr only while the
root logger has no handler (once ``logging.basicConfig`` or a framework sets
one up, the lines go there instead, and only there).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable

from .. import api

log = logging.getLogger("s3ckptfs.integrations")

# Below the 30 s that Kubernetes (terminationGracePeriodSeconds) and Slurm (KillWait) give by
# default between SIGTERM and SIGKILL, so that the outcome is logged before the kill.
DEFAULT_SIGTERM_TIMEOUT = 25.0


class _UntilConfigured(logging.StreamHandler):
    """Writes to stderr only while the root logger has no handler of its own."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def ensure_visible_logging() -> None:
    """Make sure the callbacks' INFO lines are seen, whatever the script did with logging."""
    if not any(isinstance(handler, _UntilConfigured) for handler in log.handlers):
        handler = _UntilConfigured(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def checkpoint_dirs(paths: Iterable[str | os.PathLike[str] | None]) -> list[str]:
    """The distinct paths among ``paths`` that are on an s3ckptfs mount (others are logged once and left)."""
    found: list[str] = []
    for path in paths:
        if path is None:
            continue
        text = os.path.abspath(os.fspath(path))
        if text in found:
            continue
        if api.find_mount(text) is None:
            log.warning("%s is not on an s3ckptfs mount; its checkpoints are not waited for", text)
            continue
        found.append(text)
    return found


def make_durable(paths: list[str], *, timeout: float | None, why: str, raise_errors: bool) -> bool:
    """Wait until everything closed under each of ``paths`` is in S3; log the outcome and the time.

    Returns True when all is in S3. A failure or a timeout is logged with the
    files concerned; it raises (``api.SyncError``) only when ``raise_errors``.
    """
    started = time.monotonic()
    deadline = None if timeout is None else started + timeout
    for path in paths:
        remaining = None if deadline is None else max(0.1, deadline - time.monotonic())
        try:
            api.sync(path, timeout=remaining)
        except api.SyncError as exc:
            kind = "still uploading" if isinstance(exc, api.SyncTimeoutError) else "failed"
            log.error("checkpoints under %s are NOT durable after %.1fs (%s); %d file(s) %s: %s", path,
                      time.monotonic() - started, why, len(exc.failed), kind,
                      "; ".join(f"{item.path}: {item.error}" for item in exc.failed[:10]))
            if raise_errors:
                raise
            return False
        except (api.S3ckptfsError, OSError) as exc:
            log.error("cannot wait for checkpoints under %s (%s): %s", path, why, exc)
            if raise_errors:
                raise
            return False
    if paths:
        log.info("checkpoints under %s durable in S3 after %.2fs (%s)", ", ".join(paths),
                 time.monotonic() - started, why)
    return True


def wait_until_durable(paths: Iterable[str | os.PathLike[str]], *, timeout: float | None, why: str) -> float:
    """Block until each of ``paths`` (files or directories on s3ckptfs mounts) is complete in S3.

    The one wait per rank of the checkpoint integrations: called after the rank's files
    are closed and before the framework lets a commit marker be written. Paths on no
    mount are logged once and not waited for. Raises ``api.SyncError`` (or
    ``api.S3ckptfsError``) when a file cannot be made durable: the save must fail
    rather than publish a marker for a checkpoint with a shard missing. Returns the
    seconds it took.
    """
    started = time.monotonic()
    make_durable(checkpoint_dirs(paths), timeout=timeout, why=why, raise_errors=True)
    return time.monotonic() - started
