"""FUSE passthrough: files being written bypass the daemon, and stay correct.

These tests run when the mount has passthrough (libfuse 3.17 and Linux >= 6.9, as root);
otherwise they are skipped, and the rest of the suite covers the ordinary write path.
"""

from __future__ import annotations

import errno
import os

import pytest

from conftest import assert_enospc_left_nothing, get_bytes, list_keys, scrape_metrics, tmpfs_dir, wait_for

MiB = 1 << 20


def require_passthrough(mount) -> None:
    log = mount.log_tail(400)
    if "FUSE passthrough: active" not in log:
        reason = next((line for line in log.splitlines() if "FUSE passthrough:" in line), "no passthrough line")
        pytest.skip(f"no FUSE passthrough on this machine: {reason}")


def passthrough_mount(mount_factory, bucket: str, prefix: str, **options):
    """A mount serving metrics, with passthrough active (else the test is skipped)."""
    from s3ckptfs.devserver import free_port_pairs

    port = free_port_pairs(1)[0]
    mount = mount_factory(bucket, prefix, options={"metrics_port": port, **options})
    require_passthrough(mount)
    return mount, port


def test_writes_bypass_the_daemon(bucket, mount_factory, s3):
    mount, port = passthrough_mount(mount_factory, bucket, "pt")
    data = os.urandom(64 * MiB)
    with open(mount.path / "big.bin", "wb") as f:
        f.write(data[:32 * MiB])
        # A reader opened while the file is written sees what was written so far.
        with open(mount.path / "big.bin", "rb") as reader:
            assert reader.read(MiB) == data[:MiB]
        assert os.stat(mount.path / "big.bin").st_size == 32 * MiB
        f.write(data[32 * MiB:])
    assert os.stat(mount.path / "big.bin").st_size == 64 * MiB
    assert (mount.path / "big.bin").read_bytes() == data
    mount.sync()
    assert get_bytes(s3, bucket, mount.key("big.bin")) == data
    metrics = scrape_metrics(port)
    assert metrics.get('s3ckptfs_fuse_operations_total{operation="write_buf"}', 0) == 0
    assert metrics.get('s3ckptfs_fuse_operations_total{operation="write"}', 0) == 0
    assert metrics['s3ckptfs_fuse_operations_total{operation="create"}'] >= 1


def test_passthrough_off_option_uses_the_daemon(bucket, mount_factory, s3):
    mount = mount_factory(bucket, "nopt", options={"passthrough": "off"})
    assert "FUSE passthrough: off (-o passthrough=off)" in mount.log_tail(400)
    (mount.path / "a.bin").write_bytes(b"x" * MiB)
    mount.sync()
    assert get_bytes(s3, bucket, mount.key("a.bin")) == b"x" * MiB


def test_rewrite_of_an_eagerly_uploaded_part_ends_byte_identical(bucket, mount_factory, s3):
    mount = mount_factory(bucket, "rewrite")
    require_passthrough(mount)
    path = mount.path / "rewrite.bin"
    data = bytearray(os.urandom(48 * MiB))
    with open(path, "wb", buffering=0) as f:
        f.write(data)

        def first_part_uploaded():
            uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            for upload in uploads:
                parts = s3.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                if any(part["PartNumber"] == 1 for part in parts.get("Parts", [])):
                    return True
            return False

        wait_for(first_part_uploaded, timeout=60, interval=0.1)
        # Rewrite inside part 1, which S3 already holds: the daemon never sees this write.
        os.pwrite(f.fileno(), b"\xab" * 8192, MiB + 17)
        data[MiB + 17:MiB + 17 + 8192] = b"\xab" * 8192
    mount.sync()
    assert get_bytes(s3, bucket, mount.key("rewrite.bin")) == bytes(data)
    assert "rewritten since" in mount.log_tail(400)


def test_fsync_then_close_uploads_once_and_truncate_rename_unlink_hold(bucket, mount_factory, s3):
    mount, port = passthrough_mount(mount_factory, bucket, "sem")
    data = os.urandom(20 * MiB)
    with open(mount.path / "tmp.safetensors", "wb") as f:
        f.truncate(20 * MiB)                      # size first, then the bytes (as safetensors does)
        os.rename(mount.path / "tmp.safetensors", mount.path / "model.safetensors")  # renamed while open
        f.write(data)
        f.flush()
        os.fsync(f.fileno())                      # complete in S3 now
        assert get_bytes(s3, bucket, mount.key("model.safetensors")) == data
    mount.sync()
    assert get_bytes(s3, bucket, mount.key("model.safetensors")) == data
    # The close after fsync found S3 holding these very bytes: no second upload.
    assert scrape_metrics(port)["s3ckptfs_uploaded_objects_total"] == 1
    assert list_keys(s3, bucket, mount.key("")) == [mount.key("model.safetensors")]
    # Shrinking an open file and appending to it
    with open(mount.path / "model.safetensors", "r+b") as f:
        f.truncate(5 * MiB)
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    mount.sync()
    assert get_bytes(s3, bucket, mount.key("model.safetensors")) == data[:5 * MiB] + b"tail"
    # Unlinked while open: still writable and readable through the descriptor, never uploaded
    f = open(mount.path / "gone.bin", "w+b")
    try:
        f.write(b"a" * MiB)
        os.unlink(mount.path / "gone.bin")
        f.write(b"b" * MiB)
        f.seek(0)
        assert f.read() == b"a" * MiB + b"b" * MiB
    finally:
        f.close()
    mount.sync()
    assert mount.key("gone.bin") not in list_keys(s3, bucket, mount.key(""))


def daemon_reads(port: int) -> float:
    metrics = scrape_metrics(port)
    return sum(metrics.get(f's3ckptfs_fuse_operations_total{{operation="{op}"}}', 0) for op in ("read", "read_buf"))


def read_and_forget(path) -> bytes:
    """The whole file, then drop the kernel's page cache of it (so that the next read asks again)."""
    with open(path, "rb") as f:
        data = f.read()
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return data


def test_complete_cached_copies_are_read_through_passthrough(bucket, mount_factory, s3):
    mount, port = passthrough_mount(mount_factory, bucket, "warm")
    # Another node's object, there before this mount lists the directory (a name another node
    # makes after that is seen once the listing is older than metadata_ttl).
    s3.put_object(Bucket=bucket, Key=mount.key("remote.pt"), Body=(remote := os.urandom(24 * MiB)))
    written = os.urandom(24 * MiB)
    (mount.path / "written.pt").write_bytes(written)
    mount.sync()
    # Written here and committed: read at local speed, the daemon sees no read.
    assert read_and_forget(mount.path / "written.pt") == written
    assert daemon_reads(port) == 0
    # Downloaded by a first (ordinary) read; a second open passes through to the complete copy.
    assert read_and_forget(mount.path / "remote.pt") == remote
    after_download = daemon_reads(port)
    assert after_download > 0
    with open(mount.path / "remote.pt", "rb") as f:
        import mmap
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as view:   # torch.load(mmap=True)
            assert view[5 * MiB:6 * MiB] == remote[5 * MiB:6 * MiB]
        assert f.read() == remote
    assert daemon_reads(port) == after_download
    assert 'passthrough, backing id' in mount.log_tail(400)


def test_opens_of_a_passed_through_file_share_its_backing_file(bucket, mount_factory, s3):
    mount, port = passthrough_mount(mount_factory, bucket, "mixed", metadata_ttl="1", negative_ttl="1")
    old = os.urandom(8 * MiB)
    (mount.path / "latest.pt").write_bytes(old)
    mount.sync()
    reader = open(mount.path / "latest.pt", "rb")          # passed through to the cached copy
    try:
        assert reader.read(MiB) == old[:MiB]
        # Overwritten (torch.save truncates) while the reader is open: the writer takes the
        # cached copy over, as on a local disk (no EIO, no download), and S3 gets the new bytes.
        new = os.urandom(6 * MiB)
        with open(mount.path / "latest.pt", "wb") as writer:
            writer.write(new)
            with open(mount.path / "latest.pt", "rb") as second:   # a reader of the staged file
                assert second.read() == new
        mount.sync()
        assert get_bytes(s3, bucket, mount.key("latest.pt")) == new
        assert daemon_reads(port) == 0
        # Changed in S3 behind the mount while a reader here still has it open: the kernel allows
        # one backing file per inode, so a new open is refused (EBUSY), never served stale bytes.
        newer = os.urandom(5 * MiB)
        assert (mount.path / "latest.pt").read_bytes() == new       # (the same file: shared, no refusal)
        s3.put_object(Bucket=bucket, Key=mount.key("latest.pt"), Body=newer)

        def refused() -> bool:
            try:
                (mount.path / "latest.pt").read_bytes()
            except OSError as exc:
                return exc.errno == errno.EBUSY
            return False
        wait_for(refused, timeout=30, interval=0.5)
        reader.seek(0)
        assert len(reader.read()) == 6 * MiB               # the open reader reads on, undisturbed
    finally:
        reader.close()
    assert read_and_forget(mount.path / "latest.pt") == newer   # downloaded, through the daemon
    assert read_and_forget(mount.path / "latest.pt") == newer   # then passed through
    assert "refused an open while readers here have another version" in mount.log_tail(400)


@pytest.fixture
def cache_disk_1g(tmp_path):
    """A tmpfs cache dir with just enough room for passthrough, that a big write fills."""
    with tmpfs_dir(tmp_path / "cache-disk", "1400m") as path:
        yield path


def test_enospc_of_a_passthrough_writer_never_becomes_an_object(bucket, mount_factory, s3, cache_disk_1g):
    mount = mount_factory(bucket, "full", cache_dir=cache_disk_1g, options={"cache_size": "64MiB"})
    require_passthrough(mount)
    block = os.urandom(16 * MiB)
    with pytest.raises(OSError) as info:
        with open(mount.path / "too_big.bin", "wb") as f:
            for _ in range(100):   # 1.6 GiB into 1.4 GiB
                f.write(block)
    assert info.value.errno == errno.ENOSPC
    # The writer alone saw its ENOSPC; the daemon refused the file for the reservation that failed.
    assert "a write may have failed (ENOSPC), so it will not be uploaded" in mount.log_tail(400)
    assert_enospc_left_nothing(mount, s3, bucket)
