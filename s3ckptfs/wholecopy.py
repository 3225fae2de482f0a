"""A file whose bytes are exactly those of an object written here is committed with one CopyObject.

The case is the same state saved under a second name (Lightning's
``save_last=True``, ``cp step_1000.pt best.pt``): every part would be copied
with UploadPartCopy anyway (dedup.py), and one CopyObject costs the server
less than a multipart upload of copies (on SeaweedFS 4.48, 256 MiB: 0.7-0.9 s
against 1.2-1.5 s for 32 part copies into an upload with CRC32C checksums).

Only at commit time, only with dedup on, and only for a file with at least
half of it not yet made as parts (``MOSTLY_LEFT``; the upload holding the parts
copied or sent while it was written is aborted once the copy is made, and used
if the copy is refused): the file's bytes are hashed part by part (dedup.Dedup.whole_object) and compared with the remembered parts of an
object of the same size. The copy is conditional on the source's ETag; if it
is refused for any lasting reason the commit goes on as a multipart upload
(``CopyRefused``). The checksum the server gives for the copy is checked
against the local bytes: a composite one against the parts' CRC32C, a
full-object one against the CRC32C of the whole staging file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from .dedup import Dedup, WholeMatch
from .errors import S3Error
from .s3client import composite_crc32c, crc32c_of_file, object_metadata
from .staging import Committed, Digest, StagedFile
from .store import ObjectStore

log = logging.getLogger(__name__)

INFLIGHT_WAIT = 1.0   # seconds a whole-file copy waits for parts already on their way
# A whole-file copy is made when at least this share of the file is still to be made as parts:
# the parts already made are then thrown away (the upload is aborted). Below it, copying the rest
# part by part costs the server less: on SeaweedFS 4.48, 1 GiB, CopyObject took 0.58x the time of
# UploadPartCopy of every part (3.58 s against 6.18 s, docs/bench/1gib-dedup.md).
MOSTLY_LEFT = 0.5


class CopyRefused(Exception):
    """The whole-object copy cannot be made: commit the file the usual way."""


@dataclass(frozen=True)
class Candidate:
    match: WholeMatch
    version: int
    pt_epoch: int
    size: int


def _bytes_made_locked(file: StagedFile) -> int:
    """Bytes of the file its current upload holds as parts already."""
    current = file.upload.id
    if current is None:
        return 0
    return sum(part.length for part in file.upload.parts.values() if part.upload_id == current)


def _copyable_locked(file: StagedFile, single_put_limit: int, parts_may_be_in_flight: bool = False) -> bool:
    """To be committed, big enough for parts, and most of it not yet made (see MOSTLY_LEFT).

    A writer may still be open: the commit starts at the last writer's flush, which comes
    before its release (waiting for writers to be gone made the copy a race lost under load).
    A write after the comparison is a new version (passthrough: seen at the writer's release),
    which ``still_valid_locked`` refuses, or which is committed again after the copy."""
    mostly_left = file.size - _bytes_made_locked(file) >= MOSTLY_LEFT * file.size
    return (not file.deleted and file.dirty and file.fd >= 0 and file.size > single_put_limit
            and mostly_left and (parts_may_be_in_flight or not file.upload.inflight))


class WholeCopy:
    def __init__(self, s3: ObjectStore, dedup: Dedup, single_put_limit: int,
                 abort_later: Callable[[tuple[str, str] | None], None]) -> None:
        self.s3 = s3
        self.abort_later = abort_later
        self.dedup = dedup
        self.single_put_limit = single_put_limit

    def candidate(self, file: StagedFile) -> Candidate | None:
        """The object the file's bytes equal, if any (reads and hashes the file; no lock held)."""
        if not self.dedup.enabled:
            return None
        with file.lock:
            if not _copyable_locked(file, self.single_put_limit, parts_may_be_in_flight=True):
                return None
            snapshot = (file.version, file.pt_epoch, file.size)
            fd, base = file.fd, file.part_base
        try:
            match = self.dedup.whole_object(fd, snapshot[2], base)
        except OSError as err:  # the staging file closed meanwhile: the commit finds out why
            log.debug("%s: not compared with objects in S3: %s", file.path, err)
            return None
        if match is None:
            return None
        # Parts scheduled at close and not started yet stay for this commit (parts.py); wait a
        # little for those already started (a part takes well under a second): if one of them
        # uploads, or is still on its way (S3 slow or away), the file goes part by part after all.
        self.dedup.leave_for_commit(file.id)
        with file.lock:
            file.changed.wait_for(lambda: not file.upload.inflight or file.deleted, timeout=INFLIGHT_WAIT)
        return Candidate(match, *snapshot)

    def still_valid_locked(self, file: StagedFile, candidate: Candidate) -> bool:
        """Nothing was written, truncated or uploaded since the file was compared."""
        return ((file.version, file.pt_epoch, file.size) == (candidate.version, candidate.pt_epoch, candidate.size)
                and _copyable_locked(file, self.single_put_limit))

    def begin_locked(self, file: StagedFile, candidate: Candidate) -> Callable[[], Committed]:
        """Prepare the copy as the commit's last request (the caller marks the file SENDING)."""
        match = candidate.match
        version, key, size, mode, mtime, fd = file.version, file.key, file.size, file.mode, file.mtime, file.fd
        path, file_id = file.path, file.id
        replaced = file.upload.id   # parts made early: aborted once the copy is made, kept if it is refused

        def copy() -> Committed:
            try:
                etag, checksum = self.s3.copy_if_unchanged(match.key, key, match.etag, object_metadata(mtime, mode, file_id))
            except S3Error as err:
                if err.transient:
                    raise
                self.dedup.source_gone(match.key, match.etag)
                raise CopyRefused(f"copy of {match.key} refused: {err}") from err
            if checksum and checksum != _expected_checksum(checksum, match, fd, size):
                log.error("copy of %s to %s has checksum %s, not that of %s's bytes: uploading it",
                          match.key, key, checksum, path)
                self.dedup.source_gone(match.key, match.etag)
                raise CopyRefused(f"copy of {match.key} holds other bytes")
            with file.lock:
                stale = file.upload.forget() if replaced is not None and file.upload.id == replaced else None
            self.abort_later(stale)
            self.dedup.commit_takes_parts(file_id)  # done: no part of this version is left for later
            self.dedup.committed(key, etag, size, match.ranges, None)
            self.dedup.count(copied=size)
            log.debug("%s: copied from %s in S3", path, match.key)
            return Committed(key, etag, version, Digest(key, size, mode, mtime, match.crcs))
        return copy


def _expected_checksum(given: str, match: WholeMatch, fd: int, size: int) -> str | None:
    """The checksum the copy must have: composite (``-N``) from the parts, else of the whole file."""
    if "-" in given:
        return composite_crc32c(list(match.crcs))
    try:
        return crc32c_of_file(fd, size)
    except OSError:
        return given  # the staging file is gone (unlinked meanwhile): nothing to compare with
