"""The local S3 server and the bucket fixtures behave as the other tests assume."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import get_bytes, list_keys
from s3ckptfs import devserver

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]  # starts servers of its own too


def test_server_round_trip(s3: Any, bucket: str) -> None:
    """Objects written with the admin identity can be listed and read back."""
    s3.put_object(Bucket=bucket, Key="a/one", Body=b"1")
    s3.put_object(Bucket=bucket, Key="a/two", Body=b"22")
    s3.put_object(Bucket=bucket, Key="b", Body=b"333")
    assert list_keys(s3, bucket) == ["a/one", "a/two", "b"]
    assert list_keys(s3, bucket, "a/") == ["a/one", "a/two"]
    assert get_bytes(s3, bucket, "a/two") == b"22"


def test_multipart_upload(s3: Any, bucket: str) -> None:
    """Multipart uploads with parts of different sizes complete (the daemon relies on it)."""
    upload = s3.create_multipart_upload(Bucket=bucket, Key="big")
    first, second = b"a" * (5 * 1024 * 1024), b"b" * 1234
    parts = []
    for number, body in enumerate((first, second), start=1):
        etag = s3.upload_part(Bucket=bucket, Key="big", UploadId=upload["UploadId"],
                              PartNumber=number, Body=body)["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    s3.complete_multipart_upload(Bucket=bucket, Key="big", UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": parts})
    assert get_bytes(s3, bucket, "big") == first + second


def test_reader_cannot_write(reader_s3: Any, s3: Any, bucket: str) -> None:
    """The reader identity lists and reads but is denied writes (for EACCES tests)."""
    s3.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert list_keys(reader_s3, bucket) == ["k"]
    assert get_bytes(reader_s3, bucket, "k") == b"v"
    with pytest.raises(Exception, match="AccessDenied"):
        reader_s3.put_object(Bucket=bucket, Key="w", Body=b"x")


def test_buckets_are_fresh(s3: Any, bucket: str) -> None:
    """Each test gets a new, empty bucket with a valid name."""
    assert list_keys(s3, bucket) == []
    assert 3 <= len(bucket) <= 63 and bucket == bucket.lower()


def test_two_servers_do_not_collide(s3server: devserver.SeaweedServer,
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    """A second server gets its own ports and its own data."""
    other = devserver.start(tmp_path_factory.mktemp("seaweedfs-second"))
    try:
        assert other.s3_port != s3server.s3_port
        mine, theirs = s3server.client(), other.client()
        name = "collide-check"
        theirs.create_bucket(Bucket=name)
        theirs.put_object(Bucket=name, Key="only-there", Body=b"x")
        assert name not in {b["Name"] for b in mine.list_buckets()["Buckets"]}
    finally:
        other.stop()
    assert other.process.poll() is not None
