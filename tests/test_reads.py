"""The read path through a real mount: block cache, ETag validation, eviction, shared downloads."""

from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import wait_for
from faultproxy import FaultProxy

MiB = 1 << 20
BLOCK = 32 * MiB  # the default read_block


def cached_bytes(cache_dir) -> int:
    return sum(e.stat().st_blocks * 512 for e in os.scandir(cache_dir / "objects"))


def test_changed_object_is_read_fresh_after_the_ttl(bucket, mount_factory, s3):
    mount = mount_factory(bucket, "etag", options={"metadata_ttl": 1, "negative_ttl": 1})
    key = mount.key("model.pt")
    s3.put_object(Bucket=bucket, Key=key, Body=b"A" * (3 * MiB))
    assert (mount.path / "model.pt").read_bytes() == b"A" * (3 * MiB)  # now cached
    s3.put_object(Bucket=bucket, Key=key, Body=b"B" * (2 * MiB))  # another node overwrites it
    wait_for(lambda: (mount.path / "model.pt").read_bytes() == b"B" * (2 * MiB), timeout=5)


def test_eviction_under_a_small_cache_keeps_reads_correct(bucket, mount_factory, s3):
    mount = mount_factory(bucket, "evict", options={"cache_size": "40MiB"})
    blobs = {f"o{i}.bin": os.urandom(24 * MiB) for i in range(4)}
    for name, blob in blobs.items():
        s3.put_object(Bucket=bucket, Key=mount.key(name), Body=blob)
    for _ in range(2):
        for name, blob in blobs.items():
            assert (mount.path / name).read_bytes() == blob
            # at most the limit, plus the object being read
            assert cached_bytes(mount.cache_dir) <= 40 * MiB + 24 * MiB


def test_mmap_reads_only_what_it_touches(bucket, mount_factory, s3):
    import mmap

    mount = mount_factory(bucket, "mmap")
    blob = os.urandom(96 * MiB)
    s3.put_object(Bucket=bucket, Key=mount.key("big.bin"), Body=blob)
    with open(mount.path / "big.bin", "rb") as f:
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:
            assert view[90 * MiB:90 * MiB + 4096] == blob[90 * MiB:90 * MiB + 4096]
    assert cached_bytes(mount.cache_dir) < 64 * MiB


@pytest.fixture
def counting_proxy(s3server):
    proxy = FaultProxy(s3server.s3_port)
    yield proxy
    proxy.stop()


def test_concurrent_readers_share_one_download(bucket, mount_factory, s3, counting_proxy):
    size = 64 * MiB
    blob = os.urandom(size)
    mount = mount_factory(bucket, "shared", endpoint_url=counting_proxy.url)
    s3.put_object(Bucket=bucket, Key=mount.key("ckpt.pt"), Body=blob)
    results: list[bool] = []
    start = threading.Barrier(4)

    def load() -> None:
        start.wait()
        with open(mount.path / "ckpt.pt", "rb") as f:
            results.append(f.read() == blob)

    before = len(counting_proxy.requests)
    readers = [threading.Thread(target=load) for _ in range(4)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    time.sleep(0.2)
    assert results == [True] * 4
    gets = [line for line in counting_proxy.requests[before:]  # object GETs, not the lookup's LIST
            if line.startswith("GET") and "ckpt.pt" in line and "list-type=" not in line]
    assert len(gets) == size // BLOCK, f"{len(gets)} GETs for 4 readers: {gets}"
