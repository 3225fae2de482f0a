"""Abort the multipart uploads a lost node left under a prefix.

A node that dies while writing leaves its unfinished multipart uploads in S3:
the one of a shard it was writing, and any whose CreateMultipartUpload was
answered after it died. Their parts cost storage and are invisible to listings.
A restarted node aborts those of its own cache dir; a node that never comes
back (its local disk gone) needs this:

    s3ckptfs cleanup s3://BUCKET/PREFIX --older-than 1d

aborts every upload under the prefix started more than the given age ago
(default one day, as ``rclone cleanup``), and says which. The age is what keeps
live nodes safe: an upload of a node that is writing right now is younger than
any sensible limit (an upload lives from the first part of a file to its
commit). ``-o cleanup_older_than=DURATION`` runs it once at mount, in the
background, sparing the uploads the mount's own cache dir will resume.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from .errors import S3Error

log = logging.getLogger(__name__)

DEFAULT_OLDER_THAN = "1d"


class UploadLister(Protocol):
    def list_uploads(self, prefix: str) -> list[tuple[str, str, float]]: ...

    def abort_multipart(self, key: str, upload_id: str) -> None: ...


@dataclass(frozen=True)
class LeftUpload:
    """An unfinished multipart upload: its key, id, and when it was started (epoch seconds)."""

    key: str
    upload_id: str
    initiated: float

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.initiated))
        return f"{self.key} (upload {self.upload_id}, started {started}, {format_age(now - self.initiated)} ago)"


def format_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def older_uploads(store: UploadLister, prefix: str, older_than: float, now: float | None = None,
                  keep: Iterable[str] = ()) -> list[LeftUpload]:
    """The uploads under ``prefix`` started more than ``older_than`` seconds before ``now``, oldest
    first, but those in ``keep`` (upload ids). Raises S3Error if they cannot be listed."""
    now = time.time() if now is None else now
    spared = set(keep)
    found = [LeftUpload(key, upload_id, initiated) for key, upload_id, initiated in store.list_uploads(prefix)
             if upload_id not in spared and now - initiated > older_than]
    return sorted(found, key=lambda upload: (upload.initiated, upload.key))


def abort_older(store: UploadLister, prefix: str, older_than: float, *, now: float | None = None,
                keep: Iterable[str] = (), dry_run: bool = False,
                report: Callable[[LeftUpload, S3Error | None], None] = lambda upload, error: None
                ) -> tuple[list[LeftUpload], list[LeftUpload]]:
    """Abort the uploads ``older_uploads`` finds; ``report`` is told of each, with the error if it failed.

    Returns (aborted, failed). ``dry_run`` lists without aborting. Raises S3Error if the
    listing fails (nothing is aborted then).
    """
    aborted: list[LeftUpload] = []
    failed: list[LeftUpload] = []
    for upload in older_uploads(store, prefix, older_than, now, keep):
        try:
            if not dry_run:
                store.abort_multipart(upload.key, upload.upload_id)
        except S3Error as error:
            failed.append(upload)
            report(upload, error)
            continue
        aborted.append(upload)
        report(upload, None)
    return aborted, failed


def run_at_mount(store: UploadLister, prefix: str, older_than: float, keep: Iterable[str]) -> None:
    """``-o cleanup_older_than``: abort and log; a failure is logged, never raised (the mount goes on)."""
    now = time.time()

    def report(upload: LeftUpload, error: S3Error | None) -> None:
        if error is None:
            log.info("cleanup: aborted multipart upload %s", upload.describe(now))
        else:
            log.warning("cleanup: could not abort multipart upload %s: %s", upload.describe(now), error)

    try:
        aborted, failed = abort_older(store, prefix, older_than, now=now, keep=keep, report=report)
    except S3Error as error:
        log.warning("cleanup: cannot list the multipart uploads under %s: %s", prefix or "the bucket", error)
        return
    log.info("cleanup: %d multipart upload(s) older than %s aborted under %s%s", len(aborted),
             format_age(older_than), prefix or "the bucket", f", {len(failed)} failed" if failed else "")
