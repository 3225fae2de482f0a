"""The write-back engine through a real mount: commit order, cache limit, full disk, sync."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest

from conftest import assert_enospc_left_nothing, get_bytes, list_keys, tmpfs_dir, wait_for

MiB = 1 << 20


def staging_bytes(cache_dir) -> int:
    """Disk space used by staging files (not yet committed data)."""
    total = 0
    for entry in os.scandir(cache_dir / "staging"):
        try:
            total += entry.stat().st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def test_objects_appear_in_close_order(mnt, s3):
    """A small pointer file closed after a big checkpoint never becomes visible first."""
    snapshots: list[list[str]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            snapshots.append(list_keys(s3, mnt.bucket, mnt.key("")))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        (mnt.path / "step_100.pt").write_bytes(os.urandom(48 * MiB))
        (mnt.path / "latest").write_text("step_100.pt")
        mnt.sync()
        time.sleep(0.1)
    finally:
        stop.set()
        watcher.join()
    big, pointer = mnt.key("step_100.pt"), mnt.key("latest")
    assert any(pointer in keys for keys in snapshots)
    for keys in snapshots:
        assert pointer not in keys or big in keys, f"pointer visible before the checkpoint: {keys}"
    first_big = next(i for i, keys in enumerate(snapshots) if big in keys)
    assert all(pointer not in keys for keys in snapshots[:first_big])


def test_rewrite_of_uploaded_range_ends_byte_identical(mnt, s3):
    path = mnt.path / "rewrite.bin"
    data = bytearray(os.urandom(40 * MiB))
    with open(path, "wb") as f:
        f.write(data)
        wait_for(lambda: s3.list_multipart_uploads(Bucket=mnt.bucket).get("Uploads"), timeout=30)
        time.sleep(1)  # let early parts land
        f.seek(MiB)
        f.write(b"\xff" * 4096)
        data[MiB:MiB + 4096] = b"\xff" * 4096
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("rewrite.bin")) == bytes(data)


def test_cache_limit_blocks_writers_until_uploads_drain(bucket, mount_factory, s3):
    limit = 32 * MiB
    mount = mount_factory(bucket, "limited", options={"cache_size": "32MiB", "eager_uploads": 0})
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, staging_bytes(mount.cache_dir))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    blobs = [os.urandom(12 * MiB) for _ in range(6)]
    try:
        for i, blob in enumerate(blobs):
            (mount.path / f"f{i}.bin").write_bytes(blob)
        mount.sync()
    finally:
        stop.set()
        watcher.join()
    # Without the limit all 72 MiB would be staged at once; with it, at most the limit
    # plus the one file being written when the limit was reached.
    assert peak <= limit + 12 * MiB + MiB, f"peak staging {peak / MiB:.1f} MiB"
    for i, blob in enumerate(blobs):
        assert get_bytes(s3, bucket, mount.key(f"f{i}.bin")) == blob
    assert "cache full" in mount.log_tail(400)


@pytest.fixture
def small_cache_disk(tmp_path):
    """A 48 MiB tmpfs as cache dir: a disk that fills up."""
    with tmpfs_dir(tmp_path / "tiny-cache", "48m") as path:
        yield path


def test_full_cache_disk_gives_enospc_and_no_object(bucket, mount_factory, s3, small_cache_disk):
    mount = mount_factory(bucket, "full", cache_dir=small_cache_disk)
    with pytest.raises(OSError) as info:
        with open(mount.path / "too_big.bin", "wb") as f:
            for _ in range(80):
                f.write(os.urandom(MiB))
    assert info.value.errno == errno.ENOSPC
    assert_enospc_left_nothing(mount, s3, bucket)


def test_sync_of_a_subdirectory_and_status(mnt, s3):
    os.mkdir(mnt.path / "a")
    os.mkdir(mnt.path / "b")
    (mnt.path / "a" / "x.bin").write_bytes(os.urandom(3 * MiB))
    (mnt.path / "b" / "y.bin").write_bytes(b"y")
    mnt.sync("a")
    assert get_bytes(s3, mnt.bucket, mnt.key("a/x.bin"))
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("b/y.bin")) == b"y"


def test_objects_carry_a_crc32c_checked_by_the_server(mnt, s3):
    """Every part and PUT is sent with its CRC32C; S3 keeps the object's checksum."""
    (mnt.path / "big.bin").write_bytes(os.urandom(20 * MiB))
    (mnt.path / "small.bin").write_bytes(b"tiny")
    mnt.sync()
    big = s3.head_object(Bucket=mnt.bucket, Key=mnt.key("big.bin"), ChecksumMode="ENABLED")
    assert big.get("ChecksumCRC32C", "").endswith("-3")  # composite over 3 parts
    small = s3.head_object(Bucket=mnt.bucket, Key=mnt.key("small.bin"), ChecksumMode="ENABLED")
    assert small.get("ChecksumCRC32C")
