"""S3Client against the real server: the conditions on copies and deletes, and the multipart copy.

Conditional namespace changes (conditions.py, remoteops.py) rely on the server refusing a
CopyObject or DeleteObject whose condition fails; the multipart copy of objects over
5 GiB (tried here with the threshold lowered) must name the copy's ETag, so that cached
copies and later conditions follow a move.
"""

from __future__ import annotations

from typing import Any

import pytest

from s3ckptfs import devserver, s3client
from s3ckptfs.conditions import is_conflict
from s3ckptfs.errors import S3Error

MiB = 1 << 20


@pytest.fixture
def client(s3server: devserver.SeaweedServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> s3client.S3Client:
    for name, value in s3server.env().items():
        monkeypatch.setenv(name, value)
    return s3client.S3Client(bucket, endpoint_url=s3server.endpoint_url, region=devserver.REGION, retry_attempts=1)


def refused(call) -> bool:
    try:
        call()
    except S3Error as err:
        return is_conflict(err)
    return False


def test_copies_and_deletes_are_refused_when_their_condition_fails(client: s3client.S3Client, s3: Any,
                                                                   bucket: str) -> None:
    source = s3.put_object(Bucket=bucket, Key="src", Body=b"source")["ETag"]
    there = s3.put_object(Bucket=bucket, Key="dst", Body=b"newer")["ETag"]
    assert refused(lambda: client.copy("src", "dst", 6, expect=""))              # believed absent
    assert refused(lambda: client.copy("src", "dst", 6, expect='"0123"'))        # another version
    assert refused(lambda: client.copy("src", "dst", 6, expect=there, source_etag='"0123"'))
    assert refused(lambda: client.delete("dst", expect='"0123"'))
    assert s3.get_object(Bucket=bucket, Key="dst")["Body"].read() == b"newer"
    etag = client.copy("src", "dst", 6, expect=there, source_etag=source)
    assert etag == s3.head_object(Bucket=bucket, Key="dst")["ETag"]
    client.delete("dst", expect=etag)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="dst")


def test_a_multipart_copy_names_the_copys_etag_and_checks_its_conditions(client: s3client.S3Client, s3: Any,
                                                                         bucket: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3client, "MULTIPART_COPY_THRESHOLD", MiB)   # as for an object over 5 GiB
    body = bytes(range(256)) * (8 * 1024)                            # 2 MiB
    s3.put_object(Bucket=bucket, Key="big", Body=body)
    s3.put_object(Bucket=bucket, Key="taken", Body=b"x")
    assert refused(lambda: client.copy("big", "taken", len(body), expect=""))
    etag = client.copy("big", "moved", len(body), expect="")
    assert etag and etag == s3.head_object(Bucket=bucket, Key="moved")["ETag"]
    assert s3.get_object(Bucket=bucket, Key="moved")["Body"].read() == body
