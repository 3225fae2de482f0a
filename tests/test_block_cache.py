"""The object cache's block bookkeeping, without FUSE or S3 (pure logic).

Readers through a mount are covered by test_reads.py; this checks what those
tests cannot see: a reader follows a block as it streams in, and a failed
download reaches every reader waiting on it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from s3ckptfs.cache import ObjectCache
from s3ckptfs.errors import S3Error

MiB = 1 << 20


@pytest.fixture
def entry(tmp_path):
    cache = ObjectCache(tmp_path, block_size=32 * MiB, limit_bytes=1 << 30)
    return cache, cache.acquire("k", "etag", 64 * MiB)


def test_a_reader_goes_on_once_its_bytes_of_a_streaming_block_are_on_disk(entry):
    cache, cached = entry
    download: Future = Future()
    cache.fetch_block(cached, 0, lambda _entry, _block: download)
    done = threading.Event()

    def reader():
        cache.wait_for(cached, 0, 3 * MiB, download)
        done.set()

    thread = threading.Thread(target=reader)
    thread.start()
    cache.block_progress(cached, 0, 2 * MiB)
    assert not done.wait(0.2)           # 2 MiB of the 3 it needs
    cache.block_progress(cached, 0, 4 * MiB)
    assert done.wait(5)                 # the block itself is still downloading
    thread.join()
    assert not cached.has_block(0)


def test_a_failed_download_reaches_the_waiting_reader(entry):
    cache, cached = entry
    download: Future = Future()
    cache.fetch_block(cached, 1, lambda _entry, _block: download)
    errors: list[BaseException] = []

    def reader():
        try:
            cache.wait_for(cached, 1, MiB, download)
        except S3Error as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    cache.block_progress(cached, 1, MiB // 2)
    cache.block_done(cached, 1, ok=False, nbytes=0)
    download.set_exception(S3Error("InternalError", "GET k: reset", transient=True))
    thread.join(5)
    assert not thread.is_alive() and len(errors) == 1
    assert 1 not in cached.filled


def test_a_copy_out_of_the_cache_closes_its_descriptor_once(entry, tmp_path):
    """A copy detached for the handles of an unlinked name is closed when its last reader goes; a
    read-ahead that comes after must not download into it, nor close its number a second time:
    that number may be another file's by then (a staging file then committed another file's bytes)."""
    import os

    cache, cached = entry
    cache.detach(cached)
    cache.release(cached)                                # last reader, nothing downloading: closed
    other = os.open(tmp_path / "staging.data", os.O_RDWR | os.O_CREAT)   # may take the same number
    try:
        started: list[int] = []
        download = cache.fetch_block(cached, 0, lambda _entry, block: started.append(block) or Future())
        if download is not None:
            cache.block_done(cached, 0, False, 0)
        assert started == []
        os.fstat(other)                                  # still open
    finally:
        os.close(other)
