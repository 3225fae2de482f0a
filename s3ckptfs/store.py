"""What the filesystem core needs from an object store.

``S3Client`` (s3client.py, boto3) implements it for S3; the test suite has an
in-memory fake with injectable faults. Every method raises ``S3Error`` on
failure, never a transport library's exception.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

from .s3client import ObjectInfo


class ObjectStore(Protocol):
    def head(self, key: str) -> ObjectInfo | None:
        """The object's size, ETag and metadata, or None if there is no such key."""

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        """Objects directly under ``prefix`` and the names of the sub-prefixes (delimiter '/')."""

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, recursively."""

    def dir_summary(self, prefix: str) -> tuple[bool, bool, float | None]:
        """(anything under prefix, a marker object ``prefix`` exists, newest mtime seen)."""

    def get_range_into(self, key: str, start: int, length: int, fd: int, etag: str | None = None,
                       progress: Callable[[int], None] | None = None) -> None:
        """Write bytes [start, start+length) of the object into ``fd`` at ``start``; If-Match ``etag``."""

    def get_bytes(self, key: str) -> bytes:
        """The whole (small) object."""

    def put(self, key: str, body: bytes, metadata: dict[str, str] | None = None,
            checksum: str | None = None) -> str:
        """Write a whole object; returns its ETag."""

    def create_multipart(self, key: str, metadata: dict[str, str] | None = None, checksums: bool = False) -> str:
        """Start a multipart upload; returns its upload id."""

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes,
                    checksum: str | None = None) -> str:
        """Upload (or replace) one part; returns its ETag."""

    def complete_multipart(self, key: str, upload_id: str,
                           parts: list[tuple[int, str, str | None]]) -> tuple[str, str | None]:
        """Make the object from ``parts`` [(number, etag, checksum)]; returns (ETag, server checksum)."""

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an upload; its parts are discarded."""

    def list_parts(self, key: str, upload_id: str) -> list[tuple[int, int, str, str | None]]:
        """[(number, size, etag, checksum)] of an upload in progress."""

    def copy(self, src_key: str, dst_key: str, size: int) -> None:
        """Server-side copy (multipart above 5 GiB)."""

    def delete(self, key: str) -> None:
        """Delete a key (no error if absent)."""
