"""The only module that imports boto3: a small, thread-safe S3 surface for the layers above.

One boto3 client is shared by every thread (boto3 clients are thread-safe;
resources and sessions are not). Every botocore failure is turned into an
``S3Error`` here, so nothing above this module sees a botocore type. Part
scheduling, ordering and retries of whole operations live in ``uploader``;
this module only retries at the request level (botocore "standard" mode).

Object metadata written by s3ckptfs follows the convention that s3fs-fuse and
rclone also read: ``x-amz-meta-mtime`` (decimal seconds since the epoch) and
``x-amz-meta-mode`` (the full st_mode, octal). A symbolic link is an object
whose mode has S_IFLNK set and whose body is the link target.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
import threading
from typing import Any, Callable, Iterable, Iterator

import boto3
import botocore.exceptions as bex
from awscrt import checksums
from botocore.config import Config

from . import locks
from .errors import S3Error, TRANSIENT_CODES
from .store import ObjectInfo

log = logging.getLogger(__name__)

MULTIPART_COPY_THRESHOLD = 5 * (1 << 30)  # CopyObject's limit; above it, UploadPartCopy
_STREAM_CHUNK = 1 << 20


def crc32c(data: bytes | memoryview) -> str:
    """CRC32C as S3 writes it: base64 of the 4 big-endian bytes (hardware-accelerated)."""
    return base64.b64encode(checksums.crc32c(data).to_bytes(4, "big")).decode()


def crc32c_of_file(fd: int, size: int, chunk: int = 8 << 20) -> str:
    """CRC32C of a file's first ``size`` bytes (a hole past its end reads as zeros), as S3 writes it."""
    value, offset = 0, 0
    while offset < size:
        data = os.pread(fd, min(chunk, size - offset), offset)
        if not data:
            data = bytes(min(chunk, size - offset))
        value = checksums.crc32c(data, value)
        offset += len(data)
    return base64.b64encode(value.to_bytes(4, "big")).decode()


def condition_headers(expect: str | None) -> dict[str, str]:
    """boto3 arguments of a conditional write (conditions.py): None none, "" If-None-Match: *, else If-Match."""
    if expect is None:
        return {}
    return {"IfNoneMatch": "*"} if expect == "" else {"IfMatch": expect}


def body_digest(body: bytes | memoryview, checksum: str | None) -> dict[str, str]:
    """The request field that makes the server refuse ``body`` if it was damaged on the way.

    The CRC32C when the caller has one; else Content-MD5, which every S3 server checks.
    """
    if checksum:
        return {"ChecksumCRC32C": checksum}
    if not len(body):
        return {}
    return {"ContentMD5": base64.b64encode(hashlib.md5(body).digest()).decode()}


def composite_crc32c(part_checksums: list[str]) -> str:
    """The checksum S3 reports for a multipart object: CRC32C of the parts' CRC32Cs, '-N'."""
    joined = b"".join(base64.b64decode(c) for c in part_checksums)
    return f"{crc32c(joined)}-{len(part_checksums)}"


def object_metadata(mtime: float, mode: int, writer: str = "") -> dict[str, str]:
    """User metadata that s3ckptfs stores with each object it writes; ``writer``: the id of the
    staged file it was written from (a node recognises its own earlier commit by it)."""
    meta = {"mtime": f"{mtime:.9f}", "mode": f"{mode:o}"}
    if writer:
        meta["writer"] = writer
    return meta


def quoted(etag: str) -> str:
    """An ETag as HEAD and LIST give it: SeaweedFS answers a CopyObject with the same ETag
    unquoted, and a copy's version must compare equal to what a lookup of it finds."""
    return f'"{etag}"' if etag and not etag.startswith(('"', 'W/"')) else etag


def _info_from_head(key: str, response: dict) -> ObjectInfo:
    meta = response.get("Metadata", {}) or {}
    mtime = response["LastModified"].timestamp()
    mode = None
    try:
        if "mtime" in meta:
            mtime = float(meta["mtime"])
        if "mode" in meta:
            mode = int(meta["mode"], 8)
    except ValueError:
        log.warning("ignoring malformed s3ckptfs metadata on %s: %r", key, meta)
    return ObjectInfo(key=key, size=response["ContentLength"], etag=response.get("ETag", ""), mtime=mtime,
                      mode=mode if mode is not None else stat.S_IFREG | 0o644, writer=meta.get("writer", ""))


def translate(exc: Exception, what: str) -> S3Error:
    """Turn a botocore exception into an S3Error (the one place that knows botocore's types)."""
    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code") or "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        message = err.get("Message") or ""
        transient = code in TRANSIENT_CODES or (status is not None and status >= 500)
        return S3Error(code, f"{what}: {message}".rstrip(": "), status, transient=transient)
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectionClosedError, bex.ConnectTimeoutError,
                        bex.ReadTimeoutError, bex.ConnectionError)):
        return S3Error("ConnectionError", f"{what}: {exc}", transient=True)
    if isinstance(exc, bex.NoCredentialsError):
        return S3Error("NoCredentials", f"{what}: no AWS credentials found", 403)
    if isinstance(exc, bex.ProfileNotFound):
        return S3Error("ProfileNotFound", f"{what}: {exc}")
    if isinstance(exc, bex.BotoCoreError):
        return S3Error("ClientError", f"{what}: {exc}", transient=False)
    if isinstance(exc, OSError):
        return S3Error("ConnectionError", f"{what}: {exc}", transient=True)
    return S3Error("Unknown", f"{what}: {exc!r}")


def _checked_pages(pages: Iterable[dict], what: str) -> Iterator[dict]:
    """The pages of a paginator, checking before each request that no lock forbids one (locks.py, rule 3)."""
    pages = iter(pages)
    while True:
        locks.assert_no_locks_held(what)
        page = next(pages, None)
        if page is None:
            return
        yield page


class S3Client:
    """Thread-safe operations on one bucket (implements ``store.ObjectStore``). Every method raises S3Error.

    Every method that makes a request first calls ``locks.assert_no_locks_held``:
    no S3 request under the mount's lock or a file's lock.
    """

    def __init__(self, bucket: str, *, endpoint_url: str | None = None, region: str | None = None,
                 profile: str | None = None, max_connections: int = 32, retry_attempts: int = 8,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0) -> None:
        self.bucket = bucket
        try:
            session = boto3.session.Session(profile_name=profile, region_name=region)
        except bex.BotoCoreError as exc:
            raise translate(exc, "session") from exc
        s3_config: dict[str, Any] = {"payload_signing_enabled": False}
        if endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"):
            s3_config["addressing_style"] = "path"
        config = Config(
            max_pool_connections=max_connections,
            retries={"mode": "standard", "max_attempts": retry_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # UNSIGNED-PAYLOAD: every body carries a digest the server checks (see body_digest),
            # so botocore's SHA-256 of each body (about 1 s of CPU per GiB here, on plain HTTP
            # always and on HTTPS too, as it does not count our checksum) would buy nothing.
            # Servers need not verify that SHA-256 at all: SeaweedFS does not.
            s3=s3_config,
            # Integrity is checked end to end by the uploader; skip botocore's per-request
            # checksum, which costs CPU that the training process needs on small nodes.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._local = threading.local()

    @property
    def endpoint(self) -> str:
        return self._client.meta.endpoint_url

    # -- reads ------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or None if it does not exist."""
        locks.assert_no_locks_held("S3 HEAD")
        try:
            response = self._client.head_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            err = translate(exc, f"HEAD {key}")
            if err.status == 404 or err.code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise err from exc
        return _info_from_head(key, response)

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        """Objects directly under ``prefix`` and the names of sub-prefixes (without the slash).

        Listing entries carry no user metadata: their ``mode`` is None.
        """
        locks.assert_no_locks_held("S3 LIST")
        files: list[ObjectInfo] = []
        dirs: list[str] = []
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                for item in page.get("Contents", []):
                    files.append(ObjectInfo(key=item["Key"], size=item["Size"], etag=item.get("ETag", ""),
                                            mtime=item["LastModified"].timestamp(), mode=None))
                for common in page.get("CommonPrefixes", []):
                    dirs.append(common["Prefix"][len(prefix):].rstrip("/"))
        except Exception as exc:
            raise translate(exc, f"LIST {prefix}") from exc
        return files, dirs

    def list_page(self, prefix: str) -> tuple[list[ObjectInfo], list[str], bool]:
        """The first page of ``list_dir`` (one request), and whether it holds the whole listing."""
        locks.assert_no_locks_held("S3 LIST")
        try:
            page = self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, Delimiter="/", MaxKeys=1000)
        except Exception as exc:
            raise translate(exc, f"LIST {prefix}") from exc
        files = [ObjectInfo(key=item["Key"], size=item["Size"], etag=item.get("ETag", ""),
                            mtime=item["LastModified"].timestamp(), mode=None) for item in page.get("Contents", [])]
        dirs = [common["Prefix"][len(prefix):].rstrip("/") for common in page.get("CommonPrefixes", [])]
        return files, dirs, not page.get("IsTruncated", False)

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursive).

        Each page is a request, made when the caller asks for the entry after the
        last of the page before: the caller must not hold the mount's or a file's lock then.
        """
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in _checked_pages(paginator.paginate(Bucket=self.bucket, Prefix=prefix), "S3 LIST"):
                for item in page.get("Contents", []):
                    yield ObjectInfo(key=item["Key"], size=item["Size"], etag=item.get("ETag", ""),
                                     mtime=item["LastModified"].timestamp(), mode=None)
        except locks.LockOrderError:
            raise
        except Exception as exc:
            raise translate(exc, f"LIST {prefix}") from exc

    def dir_summary(self, prefix: str) -> tuple[bool, bool, float | None]:
        """(anything under ``prefix``, a ``prefix`` marker object exists, newest LastModified of
        its direct children) from the first page of a delimited listing."""
        locks.assert_no_locks_held("S3 LIST")
        try:
            response = self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, Delimiter="/",
                                                    MaxKeys=1000)
        except Exception as exc:
            raise translate(exc, f"LIST {prefix}") from exc
        contents = response.get("Contents", [])
        exists = bool(contents or response.get("CommonPrefixes"))
        marker = any(item["Key"] == prefix for item in contents)
        newest = max((item["LastModified"].timestamp() for item in contents if item["Key"] != prefix),
                     default=None)
        return exists, marker, newest

    def get_range_into(self, key: str, start: int, length: int, fd: int, etag: str | None = None,
                       file_offset: int | None = None, progress: Callable[[int], None] | None = None) -> int:
        """Download ``[start, start+length)`` of ``key`` into ``fd`` at ``file_offset`` (default ``start``).

        Streams in 1 MiB pieces, so memory stays bounded; ``progress(bytes written so
        far)`` is called after each. With ``etag`` the GET is conditional: a changed
        object fails with PreconditionFailed instead of mixing two versions. Returns
        the number of bytes written.
        """
        if length <= 0:
            return 0
        locks.assert_no_locks_held("S3 GET")
        kwargs = {"Bucket": self.bucket, "Key": key, "Range": f"bytes={start}-{start + length - 1}"}
        if etag:
            kwargs["IfMatch"] = etag
        position = start if file_offset is None else file_offset
        written = 0
        try:
            body = self._client.get_object(**kwargs)["Body"]
        except Exception as exc:
            raise translate(exc, f"GET {key}") from exc
        try:
            chunks = body.iter_chunks(_STREAM_CHUNK)
            while True:
                try:
                    chunk = next(chunks, None)
                except Exception as exc:
                    raise translate(exc, f"GET {key}") from exc
                if chunk is None:
                    break
                view = memoryview(chunk)
                while view:  # a local disk error (ENOSPC) propagates as the OSError it is
                    n = os.pwrite(fd, view, position + written)
                    written += n
                    view = view[n:]
                if progress is not None:
                    progress(written)
        finally:
            body.close()
        if written != length:
            raise S3Error("IncompleteRead", f"GET {key}: got {written} of {length} bytes", transient=True)
        return written

    def get_bytes(self, key: str, etag: str | None = None) -> bytes:
        """The whole body of a small object (symlink targets), of version ``etag`` if given."""
        locks.assert_no_locks_held("S3 GET")
        try:
            extra = {"IfMatch": etag} if etag else {}
            return self._client.get_object(Bucket=self.bucket, Key=key, **extra)["Body"].read()
        except Exception as exc:
            raise translate(exc, f"GET {key}") from exc

    # -- writes -----------------------------------------------------------------------

    def put(self, key: str, body: bytes, metadata: dict[str, str] | None = None, checksum: str | None = None,
            expect: str | None = None) -> str:
        """One PUT; the object appears whole or not at all. Returns the ETag.

        The server rejects a body damaged on the way (BadDigest), by ``checksum``
        (CRC32C, see ``crc32c``) or else by its MD5 (see ``body_digest``).
        ``expect``: see ``condition_headers``.
        """
        locks.assert_no_locks_held("S3 PUT")
        extra = {**body_digest(body, checksum), **condition_headers(expect)}
        try:
            response = self._client.put_object(Bucket=self.bucket, Key=key, Body=body, Metadata=metadata or {},
                                               **extra)
        except Exception as exc:
            raise translate(exc, f"PUT {key}") from exc
        return response.get("ETag", "")

    def create_multipart(self, key: str, metadata: dict[str, str] | None = None, checksums: bool = False) -> str:
        locks.assert_no_locks_held("S3 CreateMultipartUpload")
        extra = {"ChecksumAlgorithm": "CRC32C"} if checksums else {}
        try:
            response = self._client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata=metadata or {},
                                                            **extra)
        except Exception as exc:
            raise translate(exc, f"CreateMultipartUpload {key}") from exc
        return response["UploadId"]

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes,
                    checksum: str | None = None) -> str:
        locks.assert_no_locks_held("S3 UploadPart")
        extra = body_digest(body, checksum)
        try:
            response = self._client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                PartNumber=part_number, Body=body, **extra)
        except Exception as exc:
            raise translate(exc, f"UploadPart {key} #{part_number}") from exc
        return response["ETag"]

    def upload_part_copy(self, key: str, upload_id: str, part_number: int, src_key: str, start: int,
                         length: int, if_match: str) -> tuple[str, str | None]:
        """UploadPartCopy of a byte range, conditional on the source's ETag (x-amz-copy-source-if-match)."""
        locks.assert_no_locks_held("S3 UploadPartCopy")
        try:
            response = self._client.upload_part_copy(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=part_number,
                CopySource={"Bucket": self.bucket, "Key": src_key}, CopySourceIfMatch=if_match,
                CopySourceRange=f"bytes={start}-{start + length - 1}")
        except Exception as exc:
            raise translate(exc, f"UploadPartCopy {src_key} -> {key} #{part_number}") from exc
        result = response.get("CopyPartResult", {})
        return result["ETag"], result.get("ChecksumCRC32C")

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str, str | None]],
                           expect: str | None = None) -> tuple[str, str | None]:
        """Make the object visible. ``parts``: (number, etag, crc32c or None), ascending.
        ``expect``: see ``condition_headers``.

        Returns the ETag and the object checksum the server computed (None if it gave none).
        """
        locks.assert_no_locks_held("S3 CompleteMultipartUpload")
        listed = []
        for number, etag, checksum in parts:
            entry = {"PartNumber": number, "ETag": etag}
            if checksum:
                entry["ChecksumCRC32C"] = checksum
            listed.append(entry)
        try:
            response = self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": listed},
                **condition_headers(expect))
        except Exception as exc:
            raise translate(exc, f"CompleteMultipartUpload {key}") from exc
        return response.get("ETag", ""), response.get("ChecksumCRC32C")

    def abort_multipart(self, key: str, upload_id: str) -> None:
        """Abort an upload; one that no longer exists is not an error."""
        locks.assert_no_locks_held("S3 AbortMultipartUpload")
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as exc:
            err = translate(exc, f"AbortMultipartUpload {key}")
            if err.code in ("NoSuchUpload", "404") or err.status == 404:
                return
            raise err from exc

    def list_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """(key, upload id, initiated as epoch seconds) of every unfinished multipart upload under ``prefix``."""
        locks.assert_no_locks_held("S3 ListMultipartUploads")
        found = []
        try:
            paginator = self._client.get_paginator("list_multipart_uploads")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    found.append((upload["Key"], upload["UploadId"], upload["Initiated"].timestamp()))
        except Exception as exc:
            raise translate(exc, f"ListMultipartUploads s3://{self.bucket}/{prefix}") from exc
        return found

    def list_parts(self, key: str, upload_id: str) -> list[tuple[int, int, str, str | None]]:
        """(number, size, etag, crc32c or None) of the parts an unfinished upload holds."""
        locks.assert_no_locks_held("S3 ListParts")
        found = []
        try:
            paginator = self._client.get_paginator("list_parts")
            for page in paginator.paginate(Bucket=self.bucket, Key=key, UploadId=upload_id):
                for part in page.get("Parts", []):
                    found.append((part["PartNumber"], part["Size"], part["ETag"], part.get("ChecksumCRC32C")))
        except Exception as exc:
            raise translate(exc, f"ListParts {key}") from exc
        return found

    def copy(self, src_key: str, dst_key: str, size: int, expect: str | None = None,
             source_etag: str | None = None) -> str:
        """Server-side copy, keeping metadata; the copy's ETag. Multipart copy above 5 GiB: the
        transfer manager sends no condition and returns no ETag, so ``expect`` and ``source_etag``
        are checked by a HEAD just before, and the ETag is read by one just after."""
        locks.assert_no_locks_held("S3 COPY")
        source = {"Bucket": self.bucket, "Key": src_key}
        try:
            if size < MULTIPART_COPY_THRESHOLD:
                response = self._client.copy_object(
                    Bucket=self.bucket, Key=dst_key, CopySource=source, MetadataDirective="COPY",
                    **condition_headers(expect), **({"CopySourceIfMatch": source_etag} if source_etag else {}))
                return quoted(str(response.get("CopyObjectResult", {}).get("ETag", "")))
            else:
                if expect is not None:
                    self._check_before_copy(dst_key, expect)
                if source_etag:
                    self._check_before_copy(src_key, source_etag)
                from boto3.s3.transfer import TransferConfig
                self._client.copy(source, self.bucket, dst_key,
                                  Config=TransferConfig(multipart_threshold=MULTIPART_COPY_THRESHOLD,
                                                        multipart_chunksize=1 << 30))
                copied = self.head(dst_key)  # a cached copy follows the move by it (ObjectCache.rename)
                return copied.etag if copied is not None else ""
        except Exception as exc:
            raise translate(exc, f"COPY {src_key} -> {dst_key}") from exc

    def copy_if_unchanged(self, src_key: str, dst_key: str, if_match: str,
                          metadata: dict[str, str]) -> tuple[str, str | None]:
        """CopyObject conditional on the source's ETag, with new metadata; (ETag, CRC32C or None)."""
        locks.assert_no_locks_held("S3 COPY")
        try:
            response = self._client.copy_object(
                Bucket=self.bucket, Key=dst_key, CopySource={"Bucket": self.bucket, "Key": src_key},
                CopySourceIfMatch=if_match, MetadataDirective="REPLACE", Metadata=metadata,
                ChecksumAlgorithm="CRC32C")
        except Exception as exc:
            raise translate(exc, f"COPY {src_key} -> {dst_key}") from exc
        result = response.get("CopyObjectResult", {})
        return result.get("ETag", ""), result.get("ChecksumCRC32C")

    def _check_before_copy(self, key: str, expect: str) -> None:
        there = self.head(key)
        if (there is not None) if expect == "" else (there is None or there.etag.strip('"') != expect.strip('"')):
            raise S3Error("PreconditionFailed", f"COPY: {key} holds "
                          f"{there.etag if there else 'no object'}, expected {expect or 'no object'}", 412)

    def delete(self, key: str, expect: str | None = None) -> None:
        locks.assert_no_locks_held("S3 DELETE")
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key, **({"IfMatch": expect} if expect else {}))
        except Exception as exc:
            raise translate(exc, f"DELETE {key}") from exc

    def check_access(self, prefix: str) -> None:
        """One ListObjectsV2 (max-keys 1) on the prefix: proves endpoint, credentials and bucket."""
        locks.assert_no_locks_held("S3 LIST")
        try:
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:
            raise translate(exc, f"LIST s3://{self.bucket}/{prefix}") from exc
