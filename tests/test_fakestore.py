"""The fake store keeps the S3 semantics the core relies on, and its faults do what they say."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time

import pytest

import fakestore
from fakestore import FakeStore
from s3ckptfs.errors import S3Error
from s3ckptfs.s3client import composite_crc32c, crc32c, object_metadata


def test_put_head_and_metadata_as_s3client_reads_them():
    store = FakeStore()
    etag = store.put("p/a", b"hello", object_metadata(1234.5, stat.S_IFREG | 0o600))
    assert etag == f'"{hashlib.md5(b"hello").hexdigest()}"'
    info = store.head("p/a")
    assert (info.key, info.size, info.etag, info.mtime, info.mode) == ("p/a", 5, etag, 1234.5, stat.S_IFREG | 0o600)
    plain = store.put_object("p/plain", b"x")  # written by another tool: no metadata
    info = store.head("p/plain")
    assert info.etag == plain and info.mode == stat.S_IFREG | 0o644 and info.mtime > 0
    assert store.head("p/missing") is None
    with pytest.raises(S3Error) as bad:
        store.put("p/a", b"hello", checksum=crc32c(b"other"))
    assert bad.value.code == "BadDigest" and bad.value.transient


def test_delimited_listing_and_dir_summary():
    store = FakeStore()
    for key in ["p/", "p/a", "p/b", "p/d/", "p/d/x", "p/e/f/g", "q/z"]:
        store.put_object(key, b"1")
    files, dirs = store.list_dir("p/")
    assert [f.key for f in files] == ["p/", "p/a", "p/b"]
    assert all(f.mode is None for f in files)
    assert dirs == ["d", "e"]
    assert [i.key for i in store.list_all("p/d/")] == ["p/d/", "p/d/x"]
    exists, marker, newest = store.dir_summary("p/")
    assert exists and marker and newest == store.stored("p/b").last_modified
    assert store.dir_summary("p/e/") == (True, False, None)
    assert store.dir_summary("p/nothing/") == (False, False, None)


def test_multipart_upload_replace_list_complete_and_checksum():
    store = FakeStore()
    upload = store.create_multipart("k", object_metadata(1.0, stat.S_IFREG | 0o644), checksums=True)
    first = store.upload_part("k", upload, 1, b"a" * 10, crc32c(b"a" * 10))
    store.upload_part("k", upload, 2, b"b" * 3, crc32c(b"b" * 3))
    first = store.upload_part("k", upload, 1, b"c" * 10, crc32c(b"c" * 10))  # replaced before completion
    parts = store.list_parts("k", upload)
    assert [(n, size) for n, size, _, _ in parts] == [(1, 10), (2, 3)]
    assert parts[0][2] == first and parts[0][3] == crc32c(b"c" * 10)
    assert store.head("k") is None, "invisible until complete"
    with pytest.raises(S3Error, match="InvalidPart"):
        store.complete_multipart("k", upload, [(1, '"0000"', parts[0][3]), (2, parts[1][2], parts[1][3])])
    with pytest.raises(S3Error, match="InvalidRequest"):
        store.complete_multipart("k", upload, [(1, parts[0][2], None), (2, parts[1][2], parts[1][3])])
    etag, checksum = store.complete_multipart("k", upload, [(n, e, c) for n, _, e, c in parts])
    assert checksum == composite_crc32c([parts[0][3], parts[1][3]])
    assert etag.endswith('-2"')
    assert store.objects() == {"k": b"c" * 10 + b"b" * 3}
    assert store.head("k").mtime == 1.0
    with pytest.raises(S3Error) as gone:
        store.upload_part("k", upload, 3, b"late")
    assert gone.value.code == "NoSuchUpload" and gone.value.status == 404
    store.abort_multipart("k", upload)  # no longer exists: not an error
    assert store.uploads() == []


def test_small_parts_are_refused_when_asked_for():
    store = FakeStore(min_part_size=5)
    upload = store.create_multipart("k")
    parts = [(1, store.upload_part("k", upload, 1, b"abc"), None), (2, store.upload_part("k", upload, 2, b"d"), None)]
    with pytest.raises(S3Error, match="EntityTooSmall"):
        store.complete_multipart("k", upload, parts)


def test_ranged_reads_into_an_fd_with_if_match(tmp_path):
    store = FakeStore(chunk_size=3)
    etag = store.put("k", b"0123456789")
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        seen = []
        assert store.get_range_into("k", 2, 5, fd, etag, progress=seen.append) == 5
        assert os.pread(fd, 5, 2) == b"23456" and seen == [3, 5]
        with pytest.raises(S3Error) as short:
            store.get_range_into("k", 8, 4, fd, file_offset=0)
        assert short.value.code == "IncompleteRead" and short.value.transient
        store.put("k", b"changed")
        with pytest.raises(S3Error) as changed:
            store.get_range_into("k", 0, 3, fd, etag)
        assert changed.value.code == "PreconditionFailed"
        with pytest.raises(S3Error, match="NoSuchKey"):
            store.get_range_into("missing", 0, 1, fd)
        assert store.get_range_into("k", 0, 0, fd) == 0
    finally:
        os.close(fd)


def test_copy_keeps_metadata_and_delete_is_idempotent():
    store = FakeStore()
    store.put("a", b"data", object_metadata(7.0, stat.S_IFLNK | 0o777))
    store.copy("a", "b", 4)
    assert store.get_bytes("b") == b"data" and store.head("b").is_symlink and store.head("b").mtime == 7.0
    store.delete("a")
    store.delete("a")
    assert store.objects() == {"b": b"data"}
    with pytest.raises(S3Error, match="NoSuchKey"):
        store.copy("a", "c", 4)


@pytest.mark.parametrize("fault, code, transient, errno_name", [
    (fakestore.REFUSE, "ConnectionError", True, "EIO"),
    (fakestore.ERROR503, "ServiceUnavailable", True, "EIO"),
    (fakestore.DENIED, "AccessDenied", False, "EACCES"),
])
def test_error_faults(fault, code, transient, errno_name):
    import errno

    store = FakeStore()
    store.inject(fault, "put", times=2)
    for _ in range(2):
        with pytest.raises(S3Error) as failed:
            store.put("k", b"x")
        assert failed.value.code == code and failed.value.transient == transient
        assert failed.value.errno == getattr(errno, errno_name)
    store.put("k", b"x")  # the next N calls only
    assert store.count("put") == 3 and store.count("put", "k") == 3 and store.count("head") == 0


def test_newest_rule_wins_and_rules_match_keys_and_predicates():
    store = FakeStore()
    store.inject(fakestore.ERROR503)                        # everything fails...
    store.inject(fakestore.OK, "put", key="fine")           # ...but PUT of "fine"
    store.inject(fakestore.DENIED, where=lambda op, key: key.startswith("secret/"))
    store.put("fine", b"1")
    with pytest.raises(S3Error, match="ServiceUnavailable"):
        store.put("other", b"1")
    with pytest.raises(S3Error, match="AccessDenied"):
        store.head("secret/x")
    store.clear_faults()
    assert store.head("fine") is not None


def test_latency_and_short_hang_delay_then_serve():
    store = FakeStore()
    store.inject(fakestore.latency(0.05), "put", times=1)
    store.inject(fakestore.hang(0.05), "head", times=1)
    started = time.monotonic()
    store.put("k", b"x")
    assert store.head("k") is not None
    assert time.monotonic() - started >= 0.1


def test_hang_until_released():
    store = FakeStore()
    store.inject(fakestore.HANG, "put", key="k")
    done = threading.Event()
    worker = threading.Thread(target=lambda: (store.put("k", b"x"), done.set()), daemon=True)
    worker.start()
    assert store.wait_hanging("put", "k", timeout=5)
    assert not done.wait(0.1) and store.objects() == {}
    store.put("other", b"y")  # only the matching request hangs
    store.release()
    worker.join(5)
    assert done.is_set() and store.objects() == {"k": b"x", "other": b"y"}
    store.put("k", b"z")  # release removed the hang
    assert store.hanging() == 0


def test_forgotten_hang_gives_up_instead_of_deadlocking():
    store = FakeStore(hang_limit=0.1)
    store.inject(fakestore.HANG)
    with pytest.raises(S3Error) as timed_out:
        store.head("k")
    assert timed_out.value.code == "RequestTimeout" and timed_out.value.transient


def test_a_severed_client_fails_even_while_hanging():
    store = FakeStore()
    client = store.connect()
    store.inject(fakestore.HANG, "complete_multipart")
    errors = []

    def complete():
        try:
            client.complete_multipart("k", "nope", [(1, "e", None)])
        except S3Error as exc:
            errors.append(exc)

    worker = threading.Thread(target=complete, daemon=True)
    worker.start()
    assert store.wait_hanging("complete_multipart", timeout=5)
    client.sever()
    worker.join(5)
    assert [e.code for e in errors] == ["ConnectionError"] and errors[0].transient
    with pytest.raises(S3Error, match="ConnectionError"):
        client.head("k")
    assert store.head("k") is None, "other clients of the store are not affected"


def test_s3client_and_the_fake_implement_the_whole_interface():
    import inspect

    from fakestore import FakeClient
    from s3ckptfs.s3client import S3Client
    from s3ckptfs.store import ObjectStore

    methods = [name for name, _ in inspect.getmembers(ObjectStore, inspect.isfunction) if not name.startswith("_")]
    assert len(methods) == 17
    for name in methods:
        expected = inspect.signature(getattr(ObjectStore, name))
        for implementation in (S3Client, FakeClient):
            found = inspect.signature(getattr(implementation, name))
            assert list(found.parameters) == list(expected.parameters), (implementation.__name__, name)
            assert [p.default for p in found.parameters.values()] == [p.default for p in expected.parameters.values()]


def test_upload_part_copy_takes_a_range_conditional_on_the_source_etag():
    store = FakeStore()
    etag = store.put("src", b"0123456789")
    upload = store.create_multipart("dst", checksums=True)
    with pytest.raises(S3Error, match="PreconditionFailed"):
        store.upload_part_copy("dst", upload, 1, "src", 2, 4, '"not-it"')
    with pytest.raises(S3Error, match="NoSuchKey"):
        store.upload_part_copy("dst", upload, 1, "gone", 2, 4, etag)
    part_etag, crc = store.upload_part_copy("dst", upload, 1, "src", 2, 4, etag)
    assert crc == crc32c(b"2345")
    store.complete_multipart("dst", upload, [(1, part_etag, crc)])
    assert store.objects() == {"src": b"0123456789", "dst": b"2345"}
    assert (store.count("upload_part_copy"), store.copied_bytes, store.sent_bytes) == (3, 4, 0)
