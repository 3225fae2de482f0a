"""Descriptors kept open across unlink, truncate and replace, through a real mount.

What the kernel and libfuse add to test_open_files_inproc.py: calls that arrive
without a path once a name is gone, and readers passed through to a local file.
"""

from __future__ import annotations

import os
import tempfile
import time

from conftest import get_bytes, list_keys


def data_of(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


def test_fstat_after_unlink(mnt):
    path = mnt.path / "p.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data_of(1000))
        os.unlink(path)
        assert os.fstat(fd).st_size == 1000
        assert not path.exists() and os.listdir(mnt.path) == []
        os.ftruncate(fd, 10)
        os.fchmod(fd, 0o600)
        assert os.fstat(fd).st_size == 10
    finally:
        os.close(fd)
    assert os.listdir(mnt.path) == []


def test_ftruncate_after_unlink(mnt, s3):
    path = mnt.path / "t.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data_of(70_000))
        os.unlink(path)
        os.ftruncate(fd, 1000)
        assert os.pread(fd, 100_000, 0) == data_of(1000)
    finally:
        os.close(fd)
    with tempfile.TemporaryFile(dir=mnt.path) as f:  # unlinked at once, then used
        f.write(data_of(5000))
        f.truncate(100)
        f.seek(0)
        assert f.read() == data_of(100)
    mnt.sync()
    assert list_keys(s3, mnt.bucket, mnt.key("")) == []
    assert "Traceback" not in mnt.log_tail(2000)


def test_fsync_then_close_commits_without_a_state_error(mnt, s3):
    # torch.distributed.checkpoint: write, fsync, close
    for name, size in (("small.bin", 70_000), ("large.bin", 20 << 20)):
        with open(mnt.path / name, "wb") as f:
            f.write(data_of(size))
            f.flush()
            os.fsync(f.fileno())
        mnt.sync()
        assert get_bytes(s3, mnt.bucket, mnt.key(name)) == data_of(size)
    assert "commit state" not in mnt.log_tail(2000)


def test_a_reader_sees_a_truncate_through_the_path(mnt):
    # its copy here is complete and it reads it through passthrough: the truncate is made to that file
    path = mnt.path / "b.bin"
    path.write_bytes(data_of(5_000_000))
    mnt.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data_of(4096)
        os.truncate(path, 1000)
        assert os.fstat(fd).st_size == 1000
        assert os.pread(fd, 1 << 20, 0) == data_of(1000)
    finally:
        os.close(fd)
    mnt.sync()
    assert path.read_bytes() == data_of(1000)


def test_a_reader_sees_a_rewrite_through_another_descriptor(bucket, mount_factory):
    mnt = mount_factory(bucket, "ckpt", options={"passthrough": "off"})
    path = mnt.path / "b.bin"
    path.write_bytes(data_of(200_000))
    mnt.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data_of(4096)
        path.write_bytes(data_of(100_000, seed=5))  # open(O_TRUNC): the same file
        assert os.pread(fd, 1 << 20, 0) == data_of(100_000, seed=5)
    finally:
        os.close(fd)


def test_a_reader_sees_a_truncate_after_the_file_was_renamed(mnt):
    # The reader is passed through to the cached copy of b.bin's object; once the rename has been
    # made in S3, the path names the copy under the new key, and the truncate must still be made
    # to the file the reader reads (on a local disk it is the same file).
    path, renamed = mnt.path / "b.bin", mnt.path / "c.bin"
    path.write_bytes(data_of(5_000_000))
    mnt.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data_of(4096)
        os.rename(path, renamed)
        mnt.sync()  # the move has been made in S3
        os.truncate(renamed, 1000)
        assert os.fstat(fd).st_size == 1000
        assert os.pread(fd, 1 << 20, 0) == data_of(1000)
    finally:
        os.close(fd)
    mnt.sync()
    assert renamed.read_bytes() == data_of(1000)


def test_a_reader_sees_a_truncate_after_its_directory_was_moved_as_a_whole(bucket, mount_factory):
    # The directory's listing is older than metadata_ttl when it is renamed: S3 moves whatever is
    # under its prefix then (one MOVE_TREE), and no ETag of what it moved was kept.
    mnt = mount_factory(bucket, "ckpt", options={"metadata_ttl": 1, "negative_ttl": 1})
    (mnt.path / "d").mkdir()
    path = mnt.path / "d" / "b.bin"
    path.write_bytes(data_of(100_000))
    mnt.sync()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0) == data_of(4096)
        time.sleep(1.5)
        os.rename(mnt.path / "d", mnt.path / "e")
        mnt.sync()
        os.truncate(mnt.path / "e" / "b.bin", 1000)
        assert os.pread(fd, 1 << 20, 0) == data_of(1000)
    finally:
        os.close(fd)
    assert "move_tree" in mnt.log_tail(400)


def test_a_file_written_again_byte_for_byte_is_not_the_unlinked_one_still_open(mnt, s3):
    # Same name, same bytes: the same key and ETag, hence once the same cached copy. The reader of
    # the unlinked file read it through the daemon (downloaded as it read), the new file's reader
    # through passthrough: the copy could not be taken over by the truncate (the daemon reader
    # would have seen it), and the new reader kept reading the old bytes.
    data = data_of(100_000)
    s3.put_object(Bucket=mnt.bucket, Key=mnt.key("b.bin"), Body=data)  # another node's object
    path = mnt.path / "b.bin"
    unlinked = os.open(path, os.O_RDONLY)  # through the daemon: not in the cache yet
    try:
        assert os.pread(unlinked, 1 << 20, 0) == data
        os.unlink(path)
        path.write_bytes(data)
        mnt.sync()
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == data[:4096]
            os.truncate(path, 1000)
            assert os.pread(fd, 1 << 20, 0) == data[:1000]
        finally:
            os.close(fd)
        assert os.pread(unlinked, 1 << 20, 0) == data
    finally:
        os.close(unlinked)


def test_a_reader_of_an_unlinked_file_does_not_see_a_truncate_of_the_same_bytes_written_again(mnt):
    # The other way round: both readers passed through to the one cached copy, the truncate of
    # the new file took it over, and the reader of the unlinked file saw it.
    path = mnt.path / "b.bin"
    data = data_of(100_000)
    path.write_bytes(data)
    mnt.sync()
    unlinked = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(unlinked, 4096, 0) == data[:4096]
        os.unlink(path)
        path.write_bytes(data)
        mnt.sync()
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == data[:4096]
            os.truncate(path, 1000)
            assert os.pread(fd, 1 << 20, 0) == data[:1000]
        finally:
            os.close(fd)
        assert os.pread(unlinked, 1 << 20, 0) == data
    finally:
        os.close(unlinked)
    mnt.sync()
    assert path.read_bytes() == data[:1000]
