"""An in-memory object store with the semantics the core relies on, and faults on demand.

``FakeStore`` implements ``s3ckptfs.store.ObjectStore`` closely enough for the
filesystem core: objects with MD5 ETags and the user metadata s3ckptfs writes
(read back by HEAD as ``S3Client`` does), ListObjectsV2 with a delimiter,
multipart uploads (parts replaceable until completion, ListParts, completion
checking every part's ETag and CRC32C, the composite checksum S3 reports),
server-side copy (whole objects, and parts from a range with If-Match on
the source: UploadPartCopy, bytes counted in ``copied_bytes`` beside
``sent_bytes``), idempotent delete, and ranged reads into a file descriptor,
conditional on the ETag (If-Match).

Faults: ``inject(fault, ops, key=..., where=..., times=...)`` makes matching
requests slow (``latency``), block until ``release()`` (``hang``), fail as a
refused connection or a 503 (both transient) or with AccessDenied (permanent),
or fail with any S3 error code. The rule added last wins; ``times`` limits a
rule to the next N matching requests. Every request is counted per operation
and per key (``count``) and logged in order (``calls``), faulted or not.

``connect()`` hands out another client of the same store. ``sever()`` on a
client makes all its requests fail from then on, including those it has
hanging, as a process that died would see its network go: a test "crashes" a
filesystem by severing its client and starts the next one on a new client.
Nothing here ever blocks for good: a hang gives up after ``hang_limit`` seconds
(RequestTimeout, transient) so that a forgotten ``release()`` fails a test
instead of deadlocking it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

from s3ckptfs import locks
from s3ckptfs.errors import S3Error
from s3ckptfs.s3client import _info_from_head, composite_crc32c, crc32c
from s3ckptfs.store import ObjectInfo

OPERATIONS = ("head", "list_dir", "list_page", "list_all", "dir_summary", "get_range_into", "get_bytes", "put",
              "create_multipart", "upload_part", "upload_part_copy", "complete_multipart", "abort_multipart", "list_parts", "copy",
              "copy_if_unchanged", "delete")
UPLOAD_OPERATIONS = ("put", "create_multipart", "upload_part", "complete_multipart")
MAX_KEYS = 1000          # one page of a listing
MAX_PART_NUMBER = 10_000


@dataclass(frozen=True)
class Fault:
    """What happens to a matching request.

    kind: ``ok`` (nothing), ``latency`` (wait ``seconds``, then serve), ``hang``
    (block until ``FakeStore.release()``; with ``seconds``, at most that long, then
    serve), ``error`` (raise S3Error(code, status, transient)).
    """

    kind: str
    seconds: float = 0.0
    code: str = ""
    status: int | None = None
    transient: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("ok", "latency", "hang", "error"):
            raise ValueError(f"unknown fault kind {self.kind!r}")

    def describe(self) -> str:
        if self.kind == "error":
            return f"{self.code} ({'transient' if self.transient else 'permanent'})"
        return f"{self.kind} {self.seconds:g}s" if self.seconds else self.kind


OK = Fault("ok")
HANG = Fault("hang")
REFUSE = Fault("error", code="ConnectionError", transient=True)           # connection refused or reset
ERROR503 = Fault("error", code="ServiceUnavailable", status=503, transient=True)
DENIED = Fault("error", code="AccessDenied", status=403)


def latency(seconds: float) -> Fault:
    return Fault("latency", seconds=seconds)


def hang(seconds: float = 0.0) -> Fault:
    """Block until released; with ``seconds`` > 0, at most that long (a short hang), then serve."""
    return Fault("hang", seconds=seconds)


def error(code: str, status: int | None = None, transient: bool = False) -> Fault:
    return Fault("error", code=code, status=status, transient=transient)


@dataclass
class Rule:
    """A fault for requests of ``ops`` (None: all) on ``key`` (None: any) for which ``where(op, key)`` holds."""

    fault: Fault
    ops: frozenset[str] | None
    key: str | None
    where: Callable[[str, str], bool] | None
    remaining: int | None            # None: until removed
    store: FakeStore
    hits: int = 0

    def matches(self, op: str, key: str) -> bool:
        return ((self.ops is None or op in self.ops) and (self.key is None or key == self.key)
                and (self.where is None or self.where(op, key)))

    def remove(self) -> None:
        self.store.remove(self)


@dataclass
class StoredObject:
    data: bytes
    etag: str                        # quoted, as S3 sends it
    metadata: dict[str, str]
    last_modified: float
    checksum: str | None = None      # CRC32C (composite "-N" for a multipart object)


@dataclass
class StoredPart:
    data: bytes
    etag: str
    crc: str


@dataclass
class Upload:
    key: str
    metadata: dict[str, str]
    checksums: bool
    parts: dict[int, StoredPart] = field(default_factory=dict)
    initiated: float = field(default_factory=time.time)


def _quoted_md5(data: bytes) -> str:
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


def _multipart_etag(parts: list[StoredPart]) -> str:
    joined = b"".join(bytes.fromhex(part.etag.strip('"')) for part in parts)
    return f'"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(parts)}"'


def _listed(key: str, obj: StoredObject) -> ObjectInfo:
    return ObjectInfo(key=key, size=len(obj.data), etag=obj.etag, mtime=obj.last_modified, mode=None)


class FakeClient:
    """One client of a FakeStore (implements ``s3ckptfs.store.ObjectStore``)."""

    def __init__(self, store: FakeStore) -> None:
        self._store = store
        self.severed = False

    def sever(self) -> None:
        """Every request of this client fails from now on, those hanging included (a dead process)."""
        with self._store._lock:
            self.severed = True
            self._store._changed.notify_all()

    # -- reads ------------------------------------------------------------------------

    def head(self, key: str) -> ObjectInfo | None:
        self._store._enter("head", key, self)
        with self._store._lock:
            obj = self._store._objects.get(key)
            if obj is None:
                return None
            response = {"Metadata": dict(obj.metadata), "ContentLength": len(obj.data), "ETag": obj.etag,
                        "LastModified": datetime.fromtimestamp(obj.last_modified, tz=timezone.utc)}
        return _info_from_head(key, response)

    def list_dir(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        self._store._enter("list_dir", prefix, self)
        with self._store._lock:
            files, prefixes = self._store._delimited_locked(prefix)
        return files, [common[len(prefix):].rstrip("/") for common in prefixes]

    def list_page(self, prefix: str) -> tuple[list[ObjectInfo], list[str], bool]:
        self._store._enter("list_page", prefix, self)
        with self._store._lock:
            files, prefixes = self._store._delimited_locked(prefix)
        # One page, as S3Client reads it: keys and common prefixes in key order.
        page = sorted([(info.key, info) for info in files] + [(common, None) for common in prefixes],
                      key=lambda entry: entry[0])
        first = page[:MAX_KEYS]
        return ([info for _, info in first if info is not None],
                [key[len(prefix):].rstrip("/") for key, info in first if info is None], len(page) <= MAX_KEYS)

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]:
        self._store._enter("list_all", prefix, self)
        with self._store._lock:
            found = [_listed(key, obj) for key, obj in sorted(self._store._objects.items())
                     if key.startswith(prefix)]
        yield from found

    def dir_summary(self, prefix: str) -> tuple[bool, bool, float | None]:
        self._store._enter("dir_summary", prefix, self)
        with self._store._lock:
            files, prefixes = self._store._delimited_locked(prefix)
        # The first page only, as S3Client reads it: keys and common prefixes in key order.
        page = sorted([(info.key, info) for info in files] + [(common, None) for common in prefixes],
                      key=lambda entry: entry[0])[:MAX_KEYS]
        contents = [info for _, info in page if info is not None]
        exists = bool(page)
        marker = any(info.key == prefix for info in contents)
        newest = max((info.mtime for info in contents if info.key != prefix), default=None)
        return exists, marker, newest

    def get_range_into(self, key: str, start: int, length: int, fd: int, etag: str | None = None,
                       file_offset: int | None = None, progress: Callable[[int], None] | None = None) -> int:
        if length <= 0:
            return 0  # S3Client sends no request either
        self._store._enter("get_range_into", key, self)
        with self._store._lock:
            obj = self._store._objects.get(key)
            if obj is None:
                raise S3Error("NoSuchKey", f"GET {key}", 404)
            if etag and etag.strip('"') != obj.etag.strip('"'):
                raise S3Error("PreconditionFailed", f"GET {key}: ETag is {obj.etag}, not {etag}", 412)
            if start >= len(obj.data):
                raise S3Error("InvalidRange", f"GET {key}: bytes={start}- of {len(obj.data)}", 416)
            data = obj.data[start:start + length]
        position = start if file_offset is None else file_offset
        written = 0
        chunk = self._store.chunk_size
        while written < len(data):  # streamed in pieces, as boto3 does: progress after each
            piece = memoryview(data)[written:written + chunk]
            while piece:
                n = os.pwrite(fd, piece, position + written)
                written += n
                piece = piece[n:]
            if progress is not None:
                progress(written)
        if written != length:
            raise S3Error("IncompleteRead", f"GET {key}: got {written} of {length} bytes", transient=True)
        return written

    def get_bytes(self, key: str, etag: str | None = None) -> bytes:
        self._store._enter("get_bytes", key, self)
        with self._store._lock:
            obj = self._store._objects.get(key)
            if obj is None:
                raise S3Error("NoSuchKey", f"GET {key}", 404)
            if etag and obj.etag != etag:
                raise S3Error("PreconditionFailed", f"GET {key}: ETag is {obj.etag}, not {etag}", 412)
            return obj.data

    # -- writes -----------------------------------------------------------------------

    def put(self, key: str, body: bytes, metadata: dict[str, str] | None = None, checksum: str | None = None,
            expect: str | None = None) -> str:
        self._store._enter("put", key, self)
        data = bytes(body)
        crc = crc32c(data)
        if checksum and checksum != crc:
            raise S3Error("BadDigest", f"PUT {key}: CRC32C {crc} != {checksum}", 400, transient=True)
        with self._store._lock:
            self._store._check_expected_locked(key, expect, "PUT")
            obj = StoredObject(data, _quoted_md5(data), dict(metadata or {}), self._store._now_locked(), crc)
            self._store._objects[key] = obj
            return obj.etag

    def create_multipart(self, key: str, metadata: dict[str, str] | None = None, checksums: bool = False) -> str:
        self._store._enter("create_multipart", key, self)
        upload_id = uuid.uuid4().hex
        with self._store._lock:
            self._store._uploads[upload_id] = Upload(key, dict(metadata or {}), checksums)
        return upload_id

    def upload_part(self, key: str, upload_id: str, part_number: int, body: bytes,
                    checksum: str | None = None) -> str:
        self._store._enter("upload_part", key, self)
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise S3Error("InvalidArgument", f"UploadPart {key}: part number {part_number}", 400)
        data = bytes(body)
        crc = crc32c(data)
        if checksum and checksum != crc:
            raise S3Error("BadDigest", f"UploadPart {key} #{part_number}: CRC32C {crc} != {checksum}", 400,
                          transient=True)
        with self._store._lock:
            upload = self._store._upload_locked(key, upload_id, "UploadPart")
            part = StoredPart(data, _quoted_md5(data), crc)
            upload.parts[part_number] = part  # a part sent again replaces the earlier one
            self._store.sent_bytes += len(data)
            return part.etag

    def _copy_source_locked(self, src_key: str, if_match: str, what: str) -> StoredObject:
        """The object a copy reads: NoSuchKey if gone, PreconditionFailed unless its ETag is ``if_match``."""
        source = self._store._objects.get(src_key)
        if source is None:
            raise S3Error("NoSuchKey", f"{what} {src_key}", 404)
        if if_match.strip('"') != source.etag.strip('"'):
            raise S3Error("PreconditionFailed", f"{what} {src_key}: ETag is {source.etag}", 412)
        return source

    def upload_part_copy(self, key: str, upload_id: str, part_number: int, src_key: str, start: int,
                         length: int, if_match: str) -> tuple[str, str | None]:
        """UploadPartCopy of a range, If-Match on the source (counted under the target ``key``)."""
        self._store._enter("upload_part_copy", key, self)
        with self._store._lock:
            source = self._copy_source_locked(src_key, if_match, "UploadPartCopy")
            if length <= 0 or start + length > len(source.data):
                raise S3Error("InvalidRange", f"UploadPartCopy {src_key}: {start}+{length}", 416)
            upload = self._store._upload_locked(key, upload_id, "UploadPartCopy")
            data = source.data[start:start + length]
            part = StoredPart(data, _quoted_md5(data), crc32c(data))
            upload.parts[part_number] = part
            self._store.copied_bytes += length
            return part.etag, part.crc if upload.checksums else None

    def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str, str | None]],
                           expect: str | None = None) -> tuple[str, str | None]:
        self._store._enter("complete_multipart", key, self)
        with self._store._lock:
            upload = self._store._upload_locked(key, upload_id, "CompleteMultipartUpload")
            self._store._check_expected_locked(key, expect, "CompleteMultipartUpload")
            if not parts:
                raise S3Error("MalformedXML", f"CompleteMultipartUpload {key}: no parts", 400)
            numbers = [number for number, _, _ in parts]
            if numbers != sorted(set(numbers)):
                raise S3Error("InvalidPartOrder", f"CompleteMultipartUpload {key}: {numbers}", 400)
            chosen: list[StoredPart] = []
            for index, (number, etag, checksum) in enumerate(parts):
                part = upload.parts.get(number)
                if part is None or part.etag.strip('"') != etag.strip('"'):
                    raise S3Error("InvalidPart", f"CompleteMultipartUpload {key}: part {number} ({etag})", 400)
                if upload.checksums and checksum != part.crc:
                    code = "InvalidRequest" if checksum is None else "InvalidPart"
                    raise S3Error(code, f"CompleteMultipartUpload {key}: part {number} checksum {checksum}", 400)
                if index < len(parts) - 1 and len(part.data) < self._store.min_part_size:
                    raise S3Error("EntityTooSmall", f"CompleteMultipartUpload {key}: part {number}", 400)
                chosen.append(part)
            server_checksum = composite_crc32c([part.crc for part in chosen]) if upload.checksums else None
            obj = StoredObject(b"".join(part.data for part in chosen), _multipart_etag(chosen),
                               upload.metadata, self._store._now_locked(), server_checksum)
            self._store._objects[key] = obj
            del self._store._uploads[upload_id]
            return obj.etag, server_checksum

    def abort_multipart(self, key: str, upload_id: str) -> None:
        self._store._enter("abort_multipart", key, self)
        with self._store._lock:
            upload = self._store._uploads.get(upload_id)
            if upload is not None and upload.key == key:
                del self._store._uploads[upload_id]

    def list_parts(self, key: str, upload_id: str) -> list[tuple[int, int, str, str | None]]:
        self._store._enter("list_parts", key, self)
        with self._store._lock:
            upload = self._store._upload_locked(key, upload_id, "ListParts")
            return [(number, len(part.data), part.etag, part.crc if upload.checksums else None)
                    for number, part in sorted(upload.parts.items())]

    def copy(self, src_key: str, dst_key: str, size: int, expect: str | None = None,
             source_etag: str | None = None) -> str:
        self._store._enter("copy", dst_key, self)
        with self._store._lock:
            self._store._check_expected_locked(dst_key, expect, "COPY")
            source = self._store._objects.get(src_key)
            if source is None:
                raise S3Error("NoSuchKey", f"COPY {src_key} -> {dst_key}", 404)
            if source_etag:
                self._store._check_expected_locked(src_key, source_etag, "COPY (source)")
            copied = StoredObject(source.data, _quoted_md5(source.data), dict(source.metadata),
                                  self._store._now_locked(), crc32c(source.data))
            self._store._objects[dst_key] = copied
            return copied.etag

    def copy_if_unchanged(self, src_key: str, dst_key: str, if_match: str,
                          metadata: dict[str, str]) -> tuple[str, str | None]:
        """CopyObject with If-Match; as SeaweedFS, the copy keeps the source's ETag and checksum."""
        self._store._enter("copy_if_unchanged", dst_key, self)
        with self._store._lock:
            source = self._copy_source_locked(src_key, if_match, "COPY")
            self._store._objects[dst_key] = StoredObject(source.data, source.etag, dict(metadata),
                                                         self._store._now_locked(), source.checksum)
            self._store.copied_bytes += len(source.data)
            return source.etag, source.checksum

    def delete(self, key: str, expect: str | None = None) -> None:
        self._store._enter("delete", key, self)
        with self._store._lock:
            if expect and key in self._store._objects:
                self._store._check_expected_locked(key, expect, "DELETE")
            self._store._objects.pop(key, None)


class FakeStore(FakeClient):
    """The store's state, its faults and counters; also a client of itself that is never severed by others."""

    def __init__(self, *, min_part_size: int = 0, chunk_size: int = 64 << 10, hang_limit: float = 30.0) -> None:
        super().__init__(self)
        self.min_part_size = min_part_size   # S3 wants 5 MiB; tests use KiB-sized parts
        self.chunk_size = chunk_size         # bytes per piece of a streamed GET
        self.hang_limit = hang_limit
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._objects: dict[str, StoredObject] = {}
        self._uploads: dict[str, Upload] = {}
        self._rules: list[Rule] = []
        self._counts: Counter[tuple[str, str]] = Counter()
        self._hanging: list[tuple[str, str]] = []
        self._release_generation = 0
        self._last_time = 0.0
        self.calls: list[tuple[str, str]] = []   # (operation, key) of every request, in order
        self.sent_bytes = 0                      # part bytes received by UploadPart
        self.copied_bytes = 0                    # part bytes made by UploadPartCopy

    def connect(self) -> FakeClient:
        """Another client of this store (one per filesystem instance, so that each can be severed)."""
        return FakeClient(self)

    # -- faults -----------------------------------------------------------------------

    def inject(self, fault: Fault, ops: str | Iterable[str] | None = None, *, key: str | None = None,
               where: Callable[[str, str], bool] | None = None, times: int | None = None) -> Rule:
        """Apply ``fault`` to matching requests (the newest matching rule wins); returns the rule."""
        if isinstance(ops, str):
            ops = (ops,)
        chosen = None if ops is None else frozenset(ops)
        unknown = (chosen or frozenset()) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"unknown operations {sorted(unknown)}")
        rule = Rule(fault, chosen, key, where, times, self)
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove(self, rule: Rule) -> None:
        with self._lock:
            if rule in self._rules:
                self._rules.remove(rule)

    def clear_faults(self) -> None:
        """Remove every rule and let every hanging request go on."""
        with self._lock:
            self._rules.clear()
        self.release()

    def release(self) -> None:
        """Let every request hanging now go on, and stop hanging new ones (hang rules are removed)."""
        with self._lock:
            self._rules = [rule for rule in self._rules if rule.fault.kind != "hang"]
            self._release_generation += 1
            self._changed.notify_all()

    def hanging(self, op: str | None = None, key: str | None = None) -> int:
        with self._lock:
            return self._hanging_locked(op, key)

    def _hanging_locked(self, op: str | None, key: str | None) -> int:
        return sum(1 for o, k in self._hanging if (op is None or o == op) and (key is None or k == key))

    def wait_hanging(self, op: str | None = None, key: str | None = None, count: int = 1,
                     timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` matching requests hang. False on timeout."""
        with self._lock:
            return self._changed.wait_for(lambda: self._hanging_locked(op, key) >= count, timeout)

    # -- counters and contents ------------------------------------------------------------

    def count(self, op: str | None = None, key: str | None = None) -> int:
        """Requests made so far (faulted ones included) of ``op`` on ``key`` (None: any)."""
        with self._lock:
            return sum(n for (o, k), n in self._counts.items()
                       if (op is None or o == op) and (key is None or k == key))

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        """Key -> body of every object under ``prefix``."""
        with self._lock:
            return {key: obj.data for key, obj in sorted(self._objects.items()) if key.startswith(prefix)}

    def stored(self, key: str) -> StoredObject | None:
        with self._lock:
            return self._objects.get(key)

    def list_uploads(self, prefix: str) -> list[tuple[str, str, float]]:
        """(key, upload id, initiated as epoch seconds) of the unfinished multipart uploads under ``prefix``."""
        self._enter("list_uploads", prefix, self)
        with self._lock:
            return sorted((u.key, upload_id, u.initiated) for upload_id, u in self._uploads.items()
                          if u.key.startswith(prefix))

    def uploads(self, prefix: str = "") -> list[tuple[str, str]]:
        """(key, upload id) of every unfinished multipart upload under ``prefix``."""
        with self._lock:
            return sorted((u.key, upload_id) for upload_id, u in self._uploads.items() if u.key.startswith(prefix))

    def put_object(self, key: str, data: bytes, metadata: dict[str, str] | None = None,
                   last_modified: float | None = None) -> str:
        """Store an object as another writer would, without counting it or applying faults."""
        with self._lock:
            when = self._now_locked() if last_modified is None else last_modified
            obj = StoredObject(bytes(data), _quoted_md5(bytes(data)), dict(metadata or {}), when, crc32c(data))
            self._objects[key] = obj
            return obj.etag

    # -- internals --------------------------------------------------------------------

    def _now_locked(self) -> float:
        # Wall-clock time, made strictly increasing so that LastModified orders writes.
        self._last_time = max(time.time(), self._last_time + 1e-6)
        return self._last_time

    def _check_expected_locked(self, key: str, expect: str | None, what: str) -> None:
        """A conditional write: "" wants no object under ``key`` (If-None-Match: *), an ETag that object."""
        if expect is None:
            return
        current = self._objects.get(key)
        if (current is None) if expect == "" else (current is not None
                                                   and current.etag.strip('"') == expect.strip('"')):
            return
        raise S3Error("PreconditionFailed", f"{what} {key}: expected {expect or 'no object'}, "
                      f"found {current.etag if current else 'none'}", 412)

    def _upload_locked(self, key: str, upload_id: str, what: str) -> Upload:
        upload = self._uploads.get(upload_id)
        if upload is None or upload.key != key:
            raise S3Error("NoSuchUpload", f"{what} {key}: upload {upload_id} does not exist", 404)
        return upload

    def _delimited_locked(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        """ListObjectsV2 with Delimiter='/': (Contents, CommonPrefixes) under ``prefix``."""
        files: list[ObjectInfo] = []
        prefixes: set[str] = set()
        for key, obj in sorted(self._objects.items()):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            cut = rest.find("/")
            if cut < 0:
                files.append(_listed(key, obj))
            else:
                prefixes.add(prefix + rest[:cut + 1])
        return files, sorted(prefixes)

    def _refused(self, op: str, key: str) -> S3Error:
        return S3Error("ConnectionError", f"{op} {key}: connection refused (client severed)", transient=True)

    def _enter(self, op: str, key: str, client: FakeClient) -> None:
        """Count the request, then apply the fault of the newest matching rule (may block or raise)."""
        locks.assert_no_locks_held(f"S3 {op}")  # as S3Client does: never under the mount's or a file's lock
        with self._lock:
            if client.severed:
                raise self._refused(op, key)
            self._counts[(op, key)] += 1
            self.calls.append((op, key))
            rule = next((r for r in reversed(self._rules) if r.matches(op, key)), None)
            if rule is None:
                return
            rule.hits += 1
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    self._rules.remove(rule)
            fault = rule.fault
            if fault.kind == "ok":
                return
            if fault.kind == "error":
                raise S3Error(fault.code, f"{op} {key}: injected", fault.status, transient=fault.transient)
            if fault.kind == "latency":
                deadline = time.monotonic() + fault.seconds
                self._changed.wait_for(lambda: client.severed or time.monotonic() >= deadline, fault.seconds)
            else:
                self._hang_locked(op, key, fault, client)
            if client.severed:
                raise self._refused(op, key)

    def _hang_locked(self, op: str, key: str, fault: Fault, client: FakeClient) -> None:
        generation = self._release_generation
        limit = fault.seconds if fault.seconds > 0 else self.hang_limit
        deadline = time.monotonic() + limit
        entry = (op, key)
        self._hanging.append(entry)
        self._changed.notify_all()
        try:
            while not client.severed and self._release_generation == generation:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if fault.seconds > 0:
                        return  # a short hang is over: serve the request
                    raise S3Error("RequestTimeout", f"{op} {key}: hung for {limit:.0f}s and never released",
                                  transient=True)
                self._changed.wait(remaining)
        finally:
            self._hanging.remove(entry)
            self._changed.notify_all()
