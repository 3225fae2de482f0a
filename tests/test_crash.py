"""SIGKILL of the daemon at points of a large checkpoint's life, then a restart on the same cache dir.

Crash points: while the file is being written; after close, while its parts
upload; after every part is uploaded, before CompleteMultipartUpload. After the
restart a closed checkpoint must arrive byte-identical (reusing the parts S3
already holds), a checkpoint that was never closed must leave nothing in S3,
and no multipart upload may be left over.
"""

from __future__ import annotations

import errno
import os
import re

import pytest

from conftest import wait_for
from faultproxy import healing_proxy, running_proxy
from test_faults import (assert_no_orphan_uploads, object_exists, parts_done, s3_sha256, status,
                         write_random)

MiB = 1 << 20
GiB = 1 << 30
PART = 8 * MiB  # the daemon's default part_size

running_proxy = pytest.fixture(running_proxy)
fault_proxy = pytest.fixture(healing_proxy, name="fault_proxy")

PART_UPLOAD = re.compile(r"^PUT \S*[?&]partNumber=")


def part_uploads(proxy) -> int:
    """UploadPart requests the proxy has seen."""
    return sum(1 for line in proxy.requests if PART_UPLOAD.search(line))


def wait_arrival(mount, s3, key: str, timeout: float) -> None:
    """Wait for ``key`` to appear in S3 on its own (no sync): the restart must resume the upload."""
    try:
        wait_for(lambda: object_exists(s3, mount.bucket, key), timeout=timeout, interval=0.5)
    except TimeoutError:
        pytest.fail(f"{key} not in S3 {timeout:.0f}s after the restart: {status(mount)}")


def restart_and_check_arrival(mount, fault_proxy, s3, key: str, digest: str, timeout: float) -> None:
    """Heal the proxy, restart on the same cache dir: the object arrives whole, nothing is left over."""
    fault_proxy.passthrough()
    fault_proxy.requests.clear()
    mount.remount()
    wait_arrival(mount, s3, key, timeout=timeout)
    mount.sync()
    assert s3_sha256(s3, mount.bucket, key) == digest
    assert_no_orphan_uploads(s3, mount.bucket)


def test_kill_while_writing_leaves_nothing(bucket, mount_factory, s3):
    """Killed while the checkpoint is written: the writer gets an error (with FUSE passthrough,
    where the kernel writes the cache file itself, at close); after the restart nothing of it is
    in S3, not even a multipart upload of its early parts."""
    mount = mount_factory(bucket, "p")
    key = mount.key("partial.pt")
    f = open(mount.path / "partial.pt", "wb")
    try:
        write_random(f, 128 * MiB)
        f.flush()
        wait_for(lambda: parts_done(s3, bucket, key) >= 1, timeout=60, interval=0.2)
        mount.kill()
        with pytest.raises(OSError) as info:
            for _ in range(64):
                f.write(os.urandom(4 * MiB))
                f.flush()
            f.close()
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV), info.value
    finally:
        try:
            f.close()
        except OSError:
            pass
    mount.remount()
    mount.sync()
    assert not object_exists(s3, bucket, key)
    assert not (mount.path / "partial.pt").exists()
    assert_no_orphan_uploads(s3, bucket)


@pytest.mark.parametrize("size", [256 * MiB, GiB], ids=["256MiB", "1GiB"])
def test_kill_after_close_during_upload(fault_proxy, bucket, mount_factory, s3, size):
    """Killed after close returned, with some parts in S3: the restart finishes the upload,
    byte-identical, without uploading again the parts S3 already holds."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url)
    key = mount.key("step_1000.pt")
    total_parts = size // PART
    if size < GiB:
        fault_proxy.delay(5)  # about 13 MB/s per connection: the upload outlives close
    with open(mount.path / "step_1000.pt", "wb") as f:
        digest = write_random(f, size)
    assert not object_exists(s3, bucket, key)
    wait_for(lambda: parts_done(s3, bucket, key) >= 2, timeout=120, interval=0.2)
    mount.kill()
    assert not object_exists(s3, bucket, key), "upload finished before the kill; make it slower"
    done_before = parts_done(s3, bucket, key)
    assert done_before < total_parts
    restart_and_check_arrival(mount, fault_proxy, s3, key, digest, timeout=180)
    reuploaded = part_uploads(fault_proxy)
    assert reuploaded <= total_parts - done_before, (
        f"{reuploaded} parts uploaded after the restart; {done_before} of {total_parts} were already in S3")


def test_kill_between_parts_and_completion(fault_proxy, bucket, mount_factory, s3):
    """Killed when every part is in S3 but CompleteMultipartUpload has not succeeded: the
    restart completes the upload from the parts S3 holds, without uploading any again."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url)
    key = mount.key("step_2000.pt")
    size = 256 * MiB
    fault_proxy.slowdown(1.0, match=r"^POST \S*[?&]uploadId=")  # only CompleteMultipartUpload
    with open(mount.path / "step_2000.pt", "wb") as f:
        digest = write_random(f, size)
    wait_for(lambda: parts_done(s3, bucket, key) == size // PART and fault_proxy.stats["errors"] >= 1,
             timeout=120, interval=0.5)
    mount.kill()
    assert not object_exists(s3, bucket, key)
    restart_and_check_arrival(mount, fault_proxy, s3, key, digest, timeout=120)
    assert part_uploads(fault_proxy) == 0, f"parts uploaded again after the restart: {fault_proxy.requests}"


def test_second_daemon_on_same_cache_dir_is_refused(bucket, mount_factory, s3):
    """A second mount using a cache dir that a live daemon holds fails with one clear line,
    leaves nothing mounted, and does not disturb the first mount."""
    first = mount_factory(bucket, "p")
    (first.path / "before").write_bytes(b"1")
    second = mount_factory.new(bucket, "p", cache_dir=first.cache_dir)
    result = second.start(check=False)
    assert result.returncode != 0, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("s3ckptfs: error: ") and "cache dir" in lines[0] and "in use" in lines[0], lines
    assert str(first.pid) in lines[0], lines
    assert not second.mounted
    second.pid = None
    (first.path / "after").write_bytes(b"2")
    first.sync()
    assert s3.get_object(Bucket=bucket, Key=first.key("after"))["Body"].read() == b"2"
    assert (first.cache_dir / "s3ckptfs.pid").read_text().strip() == str(first.pid)
    first.unmount()


def test_restart_commits_journaled_files_in_close_order(fault_proxy, bucket, mount_factory, s3):
    """Files closed while S3 refuses their uploads are journaled; after a kill and a restart
    they still appear in close order, so a ``latest`` pointer never lands before its checkpoint."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url)
    names = [f"step-{i:02d}.pt" for i in range(12)] + ["latest"]
    fault_proxy.slowdown(1.0, match=r"^PUT ")  # every upload refused, so each stays pending
    for name in names:
        (mount.path / name).write_bytes(name.encode() * 1000)
    mount.kill()
    fault_proxy.passthrough()
    fault_proxy.requests.clear()
    mount.remount()
    mount.sync()
    uploaded = [line.split()[1].split("?")[0].rsplit("/", 1)[-1] for line in fault_proxy.requests
                if line.startswith("PUT ") and ".s3ckptfs-condition-probe-" not in line]
    assert uploaded == names, uploaded
    for name in names:
        assert s3.get_object(Bucket=bucket, Key=mount.key(name))["Body"].read() == name.encode() * 1000
