"""Checks before committing a file written through FUSE passthrough.

The daemon does not see a passthrough writer's writes: parts uploaded early are
a guess (the writer writes sequentially) and are checked against the staging
file's bytes (CRC32C) before the upload completes; a file closed without a
change since its last commit is recognised as such and not uploaded again.
"""

from __future__ import annotations

import logging

from . import partplan
from .s3client import crc32c
from .multipart import UploadedPart
from .staging import StagedFile, read_padded

log = logging.getLogger(__name__)


def unverified_parts_locked(file: StagedFile) -> list[tuple[int, UploadedPart]]:
    """Uploaded parts whose bytes a passthrough writer may have changed since they were read."""
    if not file.pt_epoch:
        return []
    return [(number, part) for number, part in sorted(file.upload.parts.items())
            if part.epoch != file.pt_epoch and part.upload_id == file.upload.id]


def verify_parts(file: StagedFile, parts: list[tuple[int, UploadedPart]]) -> None:
    """Keep each part whose CRC32C still matches the staging file; drop the others (uploaded again)."""
    changed = 0
    for number, part in parts:
        with file.lock:
            if file.deleted or file.fd < 0 or file.upload.part(number) is not part:
                continue
            epoch, fd = file.pt_epoch, file.fd
        start, _ = partplan.part_range(number, file.part_base)
        data = read_padded(fd, start, part.length)
        same = part.crc is not None and crc32c(data) == part.crc
        with file.lock:
            if file.upload.part(number) is not part:
                continue
            if same:
                file.upload.verified(number, part, epoch)
            else:
                file.upload.discarded(number, part)
                changed += 1
    if changed:
        log.info("%s: %d part(s) uploaded early were rewritten since; uploading them again", file.path, changed)


def passthrough_unchanged(file: StagedFile, single_put_limit: int) -> tuple[str, str, int] | None:
    """If S3 already holds exactly the file's bytes, mark it clean and return (key, etag, version)
    for the commit listener; else None."""
    with file.lock:
        if file.fd >= 0 and not file.deleted:
            file.observe_locked()
            if file.pt_writers:  # a writer is still open (fsync): parts read so far need a check
                file.pt_epoch += 1
        digest = file.committed_digest
        if (digest is None or not file.dirty or file.deleted or file.write_error is not None or file.fd < 0
                or (digest.key, digest.size, digest.mode, digest.mtime)
                != (file.key, file.size, file.mode, file.mtime)):
            return None
        version, fd, size = file.version, file.fd, file.size
    if part_crcs(fd, size, file.part_base, single_put_limit) != digest.crcs:
        return None
    with file.lock:
        if file.committed_digest is not digest or file.size != size or file.version != version:
            return None
        file.mark_unchanged_since_commit_locked(version)
        result = (file.key, file.last_etag, version)
    log.debug("%s: unchanged since its last commit", file.path)
    return result


def part_crcs(fd: int, size: int, base: int, single_put_limit: int) -> tuple[str, ...]:
    """CRC32C of the object's parts (one for a file uploaded with a single PUT)."""
    if size <= single_put_limit:
        return (crc32c(read_padded(fd, 0, size)),)
    return tuple(crc32c(read_padded(fd, start, length)) for start, length in partplan.parts(size, base))
