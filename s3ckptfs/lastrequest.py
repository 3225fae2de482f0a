"""The last request of a commit: the PUT of a small file, or CompleteMultipartUpload.

It is what makes the object visible, so it runs without the file's lock: a slow or
retried request must not stall other operations on the file, nor (through the
mount's lock, taken before a file's) the whole mount. It is prepared under the
file's lock from a snapshot of the file (key, version, bytes or part list, mode,
mtime, what it expects of the key), sent without it, and its outcome recorded
(``finish``) under it again, in one step with leaving the SENDING state. While it
runs, ``file.committing`` is set: an unlink or rename meanwhile queues a delete of
the old key behind it (the request writes under the key the file had when it began).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from .cache import UploadRegistry
from .dedup import Dedup
from .errors import S3Error
from .s3client import composite_crc32c, crc32c, object_metadata
from .staging import Committed, Digest, StagedFile
from .store import ObjectStore

log = logging.getLogger(__name__)

# The last request of a commit, prepared under file.lock and run without it; it says what it wrote.
CommitCall = Callable[[], Committed]


class LastRequests:
    """Prepares and finishes the last request of commits. Stateless beyond its collaborators."""

    def __init__(self, s3: ObjectStore, registry: UploadRegistry, dedup: Dedup, checksums: bool,
                 abort_later: Callable[[tuple[str, str] | None], None]) -> None:
        self.s3 = s3
        self.registry = registry
        self.dedup = dedup
        self.checksums = checksums
        self.abort_later = abort_later

    def small_put_locked(self, file: StagedFile) -> CommitCall:
        """The PUT of a file up to the single-PUT limit (marks it SENDING)."""
        self.abort_later(file.upload.forget())
        version, key, size, mode, mtime = file.version, file.key, file.size, file.mode, file.mtime
        file_id = file.id
        expect = file.condition_locked()
        data = os.pread(file.fd, size, 0) if size else b""
        if len(data) < size:
            data += bytes(size - len(data))
        crc = crc32c(data)
        file.begin_send_locked()

        def put() -> Committed:
            etag = self.s3.put(key, data, object_metadata(mtime, mode, file_id), crc if self.checksums else None,
                               expect=expect)
            return Committed(key, etag, version, Digest(key, size, mode, mtime, (crc,)))
        return put

    def complete_locked(self, file: StagedFile) -> CommitCall:
        """CompleteMultipartUpload of a file whose parts are all in S3 (marks it SENDING)."""
        version, key, upload_id = file.version, file.key, file.upload.id
        assert upload_id is not None
        expect = file.condition_locked()
        size, mode, mtime = file.size, file.mode, file.mtime
        count = file.part_count_locked()
        uploaded = file.upload.parts
        parts = [(n, uploaded[n].etag, uploaded[n].checksum) for n in range(1, count + 1)]
        crcs = tuple(uploaded[n].crc or "" for n in range(1, count + 1))
        ranges = self.dedup.ranges_locked(file, count)
        file.begin_send_locked()

        def complete() -> Committed:
            etag, server_checksum = self.s3.complete_multipart(key, upload_id, parts, expect=expect)
            self.registry.remove(upload_id)
            if self.checksums and server_checksum:
                expected = composite_crc32c([checksum for _, _, checksum in parts])
                if server_checksum != expected:
                    # Never seen in practice; if it happens, S3 holds something other than our bytes.
                    log.error("checksum of %s in S3 is %s, expected %s: uploading it again",
                              file.path, server_checksum, expected)
                    with file.lock:
                        if file.upload.id == upload_id:
                            file.upload.forget()
                    raise S3Error("ChecksumMismatch", f"{key}: {server_checksum} != {expected}", transient=True)
            self.dedup.committed(key, etag, size, ranges, upload_id)

            return Committed(key, etag, version, Digest(key, size, mode, mtime, crcs) if all(crcs) else None,
                             upload_id)
        return complete

    @staticmethod
    def finish(file: StagedFile, request: CommitCall) -> Committed:
        """Run the request ``small_put_locked`` or ``complete_locked`` prepared; record its result and end SENDING at once."""
        outcome: Committed | None = None
        try:
            outcome = request()
        finally:
            with file.lock:
                file.end_send_locked(outcome)
                if outcome is not None and outcome.completed_upload is not None:
                    file.upload.completed(outcome.completed_upload)
        return outcome
