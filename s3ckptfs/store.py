"""What the filesystem core needs from an object store, and nothing more.

``S3Client`` (s3client.py, over boto3) implements this interface for real S3;
``tests/fakestore.py`` implements it in memory, so that the core runs in a test
without a server or FUSE. The core (filesystem, uploader, passthrough, cache,
watch) depends on this protocol only, never on boto3.

Contract shared by every method: a failed request raises ``S3Error`` (errors.py)
whose ``code`` is the S3 error code (``NoSuchKey``, ``AccessDenied``,
``PreconditionFailed``, ...) or a transport class (``ConnectionError``), and
whose ``transient`` says whether the same request may succeed later. Nothing
else escapes, except a local ``OSError`` while writing downloaded bytes to a
file descriptor. Request-level retries are the implementation's business; the
callers retry whole operations (see uploader.py).

Object metadata follows the convention s3client.py documents: ``mtime``
(decimal seconds) and ``mode`` (octal st_mode) as user metadata, written by
``s3client.object_metadata`` and read back into ``ObjectInfo`` by ``head``.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    """What the store says of one object. ``mode``/``mtime`` come from metadata when present."""

    key: str
    size: int
    etag: str
    mtime: float
    mode: int | None = None       # None when only a listing was seen (no metadata)
    # From a listing: LastModified (whole seconds on many servers) stands for the mtime, and the
    # mode is unknown. A HEAD, when S3 answers, gives the file's own (x-amz-meta-mtime, -mode).
    listed: bool = field(default=False, compare=False)
    writer: str = field(default="", compare=False)  # the staged file it was written from (x-amz-meta-writer)

    @property
    def is_symlink(self) -> bool:
        return self.mode is not None and stat.S_ISLNK(self.mode)


class ObjectStore(Protocol):
    """Thread-safe operations on one bucket. Every method raises S3Error on failure."""

    # -- reads ------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        """The object's info with its metadata (``mode`` never None), or None if it does not exist.

        Without s3ckptfs metadata, ``mtime`` is LastModified and ``mode`` a regular file's.
        """
        ...

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        """ListObjectsV2 with delimiter '/': the objects directly under ``prefix`` (a ``prefix``
        marker object included) and the names of sub-prefixes, without their slash.

        Listing entries carry no user metadata: their ``mode`` is None, ``mtime`` is LastModified.
        """
        ...

    def list_page(self, prefix: str) -> tuple[list[ObjectInfo], list[str], bool]:
        """One ListObjectsV2 request with delimiter '/' (up to 1000 entries): what ``list_dir``
        returns from its first page, and whether that page was the whole listing."""
        ...

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursive, no metadata); may raise while iterated."""
        ...

    def dir_summary(self, prefix: str) -> tuple[bool, bool, float | None]:
        """From the first page of a delimited listing of ``prefix``: (anything under it, a ``prefix``
        marker object exists, newest LastModified of its direct children other than the marker)."""
        ...

    def get_range_into(self, key: str, start: int, length: int, fd: int, etag: str | None = None,
                       file_offset: int | None = None, progress: Callable[[int], None] | None = None) -> int:
        """Download ``[start, start+length)`` of ``key`` into ``fd`` at ``file_offset`` (default ``start``).

        ``progress(bytes written so far)`` is called as the bytes arrive. With ``etag``
        the read is conditional: an object whose ETag differs fails with
        PreconditionFailed instead of mixing two versions. Fewer bytes than ``length``
        fail with IncompleteRead (transient). Returns the number of bytes written.
        """
        ...

    def get_bytes(self, key: str, etag: str | None = None) -> bytes:
        """The whole body of a small object (symlink targets). A missing key fails with NoSuchKey;
        with ``etag``, another version fails with PreconditionFailed."""
        ...

    # -- writes -----------------------------------------------------------------------

    def put(self, key: str, body: bytes, metadata: dict[str, str] | None = None,
            checksum: str | None = None, expect: str | None = None) -> str:
        """One PUT: the object appears whole or not at all. Returns the ETag.

        A body that does not match ``checksum`` (CRC32C, base64) fails with BadDigest (transient).
        ``expect`` makes it conditional (conditions.py): ``""`` (``ABSENT``) writes only where
        no object is (If-None-Match: *), an ETag only over that object (If-Match); a key
        that does not match fails with PreconditionFailed.
        """
        ...

    def create_multipart(self, key: str, metadata: dict[str, str] | None = None, checksums: bool = False) -> str:
        """Start a multipart upload of ``key`` with ``metadata``; returns its upload id.

        With ``checksums`` the parts carry CRC32Cs and completion reports the object's composite checksum.
        """
        ...

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes,
                    checksum: str | None = None) -> str:
        """Upload (or replace, before completion) one part; returns its ETag.

        An unknown or finished upload fails with NoSuchUpload; a body that does not
        match ``checksum`` with BadDigest (transient).
        """
        ...

    def upload_part_copy(self, key: str, upload_id: str, part_number: int, src_key: str, start: int,
                         length: int, if_match: str) -> tuple[str, str | None]:
        """Make (or replace) one part from bytes ``[start, start+length)`` of object ``src_key``, server-side.

        Conditional: a source whose ETag is not ``if_match`` fails with PreconditionFailed,
        a missing one with NoSuchKey, an unknown upload with NoSuchUpload. Returns the
        part's ETag and the CRC32C the server computed for it (None if it gave none).
        """
        ...

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str, str | None]],
                           expect: str | None = None) -> tuple[str, str | None]:
        """Make the object visible from ``parts``: (number, etag, crc32c or None), ascending.

        ``expect``: conditional as for ``put`` (PreconditionFailed; the upload is kept).

        Returns the object's ETag and the composite checksum the server computed
        (``s3client.composite_crc32c``), or None if it gave none. An ETag or checksum
        that does not match the uploaded part fails with InvalidPart; an unknown
        upload with NoSuchUpload.
        """
        ...

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an upload and drop its parts; one that no longer exists is not an error."""
        ...

    def list_parts(self, key: str, upload_id: str) -> list[tuple[int, int, str, str | None]]:
        """(number, size, etag, crc32c or None) of the parts an unfinished upload holds, ascending."""
        ...

    def copy(self, src_key: str, dst_key: str, size: int, expect: str | None = None,
             source_etag: str | None = None) -> str:
        """Server-side copy keeping the metadata (``size``: the source's, to choose the method).

        Returns the copy's ETag ("" when the server does not say). A missing source fails
        with NoSuchKey. ``expect``: conditional on the destination, as for ``put``;
        ``source_etag``: only if the source still is that object (PreconditionFailed).
        """
        ...

    def copy_if_unchanged(self, src_key: str, dst_key: str, if_match: str,
                          metadata: dict[str, str]) -> tuple[str, str | None]:
        """Server-side copy of a whole object with new ``metadata``, if its ETag still is ``if_match``.

        A changed source fails with PreconditionFailed, a missing one with NoSuchKey.
        Returns the new object's ETag and the CRC32C the server gives for it (full
        or composite ``-N``), or None if it gave none.
        """
        ...

    def delete(self, key: str, expect: str | None = None) -> None:
        """Delete one object; a missing one is not an error. ``expect``: only if its ETag still is that
        (PreconditionFailed otherwise)."""
        ...
