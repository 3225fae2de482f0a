"""The multipart upload of one staged file: its id, the parts S3 holds, the parts on their way.

Every staged file owns one ``MultipartUpload`` (``StagedFile.upload``). It is the
only place these facts live, and its methods are the only way they change, each
named for the event it records; the part scheduler (parts.py), the commit
(uploader.py), the passthrough checks (ptcheck.py) and the whole-file copy
(wholecopy.py) ask and tell it, they do not write its fields. Like the rest of
the file's state it is guarded by the file's lock: call every method with
``StagedFile.lock`` held.

An upload is bound to one key. A part recorded for an upload that has since been
dropped (renamed, completed, aborted) is not recorded: its bytes went to an upload
nobody will complete.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from .errors import S3Error


@dataclass(frozen=True)
class UploadedPart:
    generation: int
    length: int
    etag: str
    upload_id: str
    checksum: str | None = None   # CRC32C of the bytes sent, checked by the server
    epoch: int = 0                # the file's pt_epoch when the bytes were read (or last verified)
    crc: str | None = None        # CRC32C of the bytes sent, whether or not the server got it
    digest: str | None = None     # SHA-256 of the part's bytes (dedup.py), None when dedup is off


class MultipartUpload:
    """One file's multipart upload and its parts. Not thread-safe: the file's lock guards it."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._key: str | None = None
        self._parts: dict[int, UploadedPart] = {}
        self._inflight: set[int] = set()
        self._error: S3Error | None = None
        self.bytes_uploaded = 0           # progress shown by status (sent or copied)
        self.bytes_copied = 0             # of which made server-side (dedup.py)

    # -- questions -----------------------------------------------------------------

    @property
    def id(self) -> str | None:
        return self._id

    @property
    def key(self) -> str | None:
        return self._key

    def for_key(self, key: str) -> str | None:
        """The upload id if there is an upload for ``key``, else None."""
        return self._id if self._id is not None and self._key == key else None

    @property
    def parts(self) -> Mapping[int, UploadedPart]:
        """Parts recorded for the current upload (read only)."""
        return self._parts

    def part(self, number: int) -> UploadedPart | None:
        return self._parts.get(number)

    @property
    def inflight(self) -> frozenset[int]:
        return frozenset(self._inflight)

    def sending(self, number: int) -> bool:
        return number in self._inflight

    def any_sent(self) -> bool:
        """Whether any part is recorded for the current upload."""
        return self._id is not None and any(part.upload_id == self._id for part in self._parts.values())

    # -- transitions -----------------------------------------------------------------

    def started(self, key: str, upload_id: str) -> None:
        """CreateMultipartUpload answered (or an earlier run's upload is resumed) for ``key``."""
        self._id, self._key = upload_id, key

    def forget(self) -> tuple[str, str] | None:
        """Drop the upload (its key changed, it completed, the file went); returns (key, id) to abort."""
        stale = (self._key, self._id) if self._id is not None else None
        self._id = None
        self._key = None
        self._parts.clear()
        return stale

    def completed(self, upload_id: str) -> None:
        """CompleteMultipartUpload of ``upload_id`` succeeded: nothing is left to abort."""
        if self._id == upload_id:
            self.forget()

    def claim(self, number: int) -> bool:
        """Part ``number`` is about to be read and sent; False if it already is."""
        if number in self._inflight:
            return False
        self._inflight.add(number)
        return True

    def settled(self, number: int) -> None:
        """The attempt to send part ``number`` is over, whatever came of it."""
        self._inflight.discard(number)

    def sent(self, number: int, part: UploadedPart, copied: bool = False) -> bool:
        """S3 holds ``part`` as part ``number``; recorded only if its upload is still the current one."""
        if part.upload_id != self._id:
            return False
        self._parts[number] = part
        self.bytes_uploaded += part.length
        self.bytes_copied += part.length if copied else 0
        return True

    def resumed(self, key: str, upload_id: str, parts: dict[int, UploadedPart]) -> None:
        """An earlier run's upload, whose listed ``parts`` still match the staging file, is adopted."""
        self.started(key, upload_id)
        self._parts.update(parts)
        self.bytes_uploaded = sum(part.length for part in parts.values())

    def verified(self, number: int, part: UploadedPart, epoch: int) -> None:
        """Part ``number`` still matches the staging file at ``epoch`` (a passthrough writer's)."""
        if self._parts.get(number) is part:
            self._parts[number] = dataclasses.replace(part, epoch=epoch)

    def discarded(self, number: int, part: UploadedPart) -> None:
        """Part ``number`` no longer matches the staging file: it is sent again."""
        if self._parts.get(number) is part:
            del self._parts[number]
            self.bytes_uploaded -= part.length

    def failed(self, error: S3Error) -> None:
        """Sending a part failed; the commit waiting for the parts raises it."""
        self._error = error

    def take_error(self) -> S3Error | None:
        """The last part failure, cleared (the commit reports or retries it once)."""
        error, self._error = self._error, None
        return error
