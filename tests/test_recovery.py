"""Restart after a crash: journaled files resume, reusing the parts already in S3."""

from __future__ import annotations

import hashlib
import os
import re

from conftest import get_bytes, list_keys, wait_for

MiB = 1 << 20


def test_killed_after_close_resumes_with_parts_already_uploaded(bucket, mount_factory, s3):
    mount = mount_factory(bucket, "crash", options={"upload_concurrency": 2, "eager_uploads": 2})
    data = os.urandom(96 * MiB)
    (mount.path / "ckpt.pt").write_bytes(data)  # close returned: the file is journaled
    # Kill once some parts are in S3 but before the object is complete.
    wait_for(lambda: any(s3.list_parts(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
                         for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])), timeout=60)
    mount.kill()
    assert list_keys(s3, bucket, mount.key("ckpt.pt")) in ([], [mount.key("ckpt.pt")])

    mount.remount()  # same cache dir
    mount.sync()
    body = get_bytes(s3, bucket, mount.key("ckpt.pt"))
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
    wait_for(lambda: not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), timeout=15)
    resumed = re.search(r"resuming upload of /ckpt.pt \(\d+ bytes, (\d+) part", mount.log_tail(2000))
    if resumed is None:  # the object was already complete when the daemon died
        assert "resuming upload" not in mount.log_tail(2000)
    else:
        assert int(resumed.group(1)) >= 1, "parts already in S3 should be reused"


def test_killed_while_writing_leaves_nothing_behind(bucket, mount_factory, s3):
    mount = mount_factory(bucket, "midwrite")
    f = open(mount.path / "partial.pt", "wb")
    try:
        for _ in range(40):
            f.write(os.urandom(MiB))
        f.flush()
        wait_for(lambda: s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), timeout=30)
        # Recorded in the cache dir too: a kill between S3's answer and that record leaves the
        # upload to the bucket's lifecycle rule (README, Limitations), which a loaded machine can hit.
        wait_for(lambda: any((mount.cache_dir / "uploads").glob("*.json")), timeout=30)
        mount.kill()
    finally:
        try:
            f.close()
        except OSError:
            pass  # the daemon is gone: the writer gets an error, as it should
    mount.remount()
    mount.sync()
    assert list_keys(s3, bucket, mount.key("")) == []
    wait_for(lambda: not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), timeout=15)
    assert list(os.scandir(mount.cache_dir / "staging")) == []
