"""Each filesystem operation through a real mount, checked against what S3 holds afterwards."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import time

import pytest

from conftest import get_bytes, list_keys, wait_for

MiB = 1 << 20


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-enough bytes."""
    block = bytes((i * 131 + seed * 7) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


def multipart_uploads(s3, bucket: str) -> list[dict]:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


# -- create, write, close ---------------------------------------------------------------

def test_small_file_becomes_one_object(mnt, s3):
    (mnt.path / "small.txt").write_bytes(b"hello s3")
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("small.txt")) == b"hello s3"
    assert (mnt.path / "small.txt").read_bytes() == b"hello s3"


def test_empty_file_becomes_empty_object(mnt, s3):
    (mnt.path / "empty").touch()
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("empty")) == b""


def test_large_file_is_multipart_and_byte_identical(mnt, s3):
    data = payload(37 * MiB + 123)
    (mnt.path / "large.bin").write_bytes(data)
    mnt.sync()
    head = s3.head_object(Bucket=mnt.bucket, Key=mnt.key("large.bin"))
    assert head["ContentLength"] == len(data)
    assert "-" in head["ETag"], "a file above the single-PUT limit is a multipart upload"
    assert get_bytes(s3, mnt.bucket, mnt.key("large.bin")) == data
    assert multipart_uploads(s3, mnt.bucket) == []


def test_object_never_visible_while_written_and_parts_upload_early(mnt, s3):
    path = mnt.path / "growing.bin"
    with open(path, "wb") as f:
        for i in range(5):
            f.write(payload(8 * MiB, seed=i))
            f.flush()
        # 40 MiB written, file still open: parts are on their way, the object is not there.
        uploads = wait_for(lambda: multipart_uploads(s3, mnt.bucket), timeout=30)
        upload = uploads[0]
        parts = wait_for(lambda: s3.list_parts(Bucket=mnt.bucket, Key=upload["Key"],
                                               UploadId=upload["UploadId"]).get("Parts"), timeout=30)
        assert len(parts) >= 1
        assert list_keys(s3, mnt.bucket, mnt.key("growing.bin")) == []
        f.write(b"tail")
    mnt.sync()
    expected = b"".join(payload(8 * MiB, seed=i) for i in range(5)) + b"tail"
    assert get_bytes(s3, mnt.bucket, mnt.key("growing.bin")) == expected
    assert multipart_uploads(s3, mnt.bucket) == []


def test_sync_mode_close_returns_with_object_in_s3(bucket, mount_factory, s3):
    mount = mount_factory(bucket, "sync", options={"write_mode": "sync"})
    (mount.path / "now.bin").write_bytes(payload(20 * MiB))
    # No sync call: close itself waited for S3.
    assert get_bytes(s3, bucket, mount.key("now.bin")) == payload(20 * MiB)


def test_fsync_returns_with_object_in_s3(mnt, s3):
    with open(mnt.path / "f.bin", "wb") as f:
        f.write(b"x" * 1000)
        f.flush()
        os.fsync(f.fileno())
        assert get_bytes(s3, mnt.bucket, mnt.key("f.bin")) == b"x" * 1000
        f.write(b"y")  # written again after fsync: uploaded again at close
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("f.bin")) == b"x" * 1000 + b"y"


# -- read ---------------------------------------------------------------------------------

def test_read_remote_object_with_ranges(mnt, s3):
    data = payload(20 * MiB + 7, seed=3)
    s3.put_object(Bucket=mnt.bucket, Key=mnt.key("remote.bin"), Body=data)
    path = mnt.path / "remote.bin"
    assert path.stat().st_size == len(data)
    with open(path, "rb") as f:
        f.seek(len(data) - 100)
        assert f.read() == data[-100:]
        f.seek(9 * MiB + 5)
        assert f.read(MiB) == data[9 * MiB + 5:10 * MiB + 5]
        f.seek(0)
        assert f.read() == data


def test_read_back_just_written_file(mnt):
    data = payload(12 * MiB, seed=5)
    (mnt.path / "w.bin").write_bytes(data)
    assert (mnt.path / "w.bin").read_bytes() == data  # before the upload is done
    mnt.sync()
    assert (mnt.path / "w.bin").read_bytes() == data  # served from the cache after commit


def test_missing_file_is_enoent(mnt):
    with pytest.raises(FileNotFoundError):
        (mnt.path / "nope").read_bytes()
    assert not (mnt.path / "nope").exists()


# -- overwrite, append, truncate, random writes -----------------------------------------------

def test_overwrite_existing_object(mnt, s3):
    s3.put_object(Bucket=mnt.bucket, Key=mnt.key("o.txt"), Body=b"old content that is long")
    (mnt.path / "o.txt").write_bytes(b"new")
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("o.txt")) == b"new"


def test_append_to_existing_object(mnt, s3):
    s3.put_object(Bucket=mnt.bucket, Key=mnt.key("log.txt"), Body=b"line1\n")
    with open(mnt.path / "log.txt", "ab") as f:
        f.write(b"line2\n")
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("log.txt")) == b"line1\nline2\n"


def test_truncate_remote_object_shrink_and_extend(mnt, s3):
    s3.put_object(Bucket=mnt.bucket, Key=mnt.key("t.bin"), Body=b"0123456789")
    os.truncate(mnt.path / "t.bin", 4)
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("t.bin")) == b"0123"
    os.truncate(mnt.path / "t.bin", 6)
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("t.bin")) == b"0123\0\0"
    assert (mnt.path / "t.bin").stat().st_size == 6


def test_ftruncate_then_write_like_safetensors(mnt, s3):
    size = 18 * MiB
    data = payload(size, seed=9)
    fd = os.open(mnt.path / "pre.bin", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    for offset in range(0, size, MiB):
        os.pwrite(fd, data[offset:offset + MiB], offset)
    os.close(fd)
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("pre.bin")) == data


def test_random_writes_and_header_patch(mnt, s3):
    size = 30 * MiB
    data = bytearray(payload(size, seed=11))
    with open(mnt.path / "r.bin", "wb") as f:
        f.write(data)
        # rewrite ranges that were already uploaded as parts
        for offset in (0, 8 * MiB - 3, 17 * MiB):
            f.seek(offset)
            f.write(b"PATCH" * 10)
            data[offset:offset + 50] = b"PATCH" * 10
    with open(mnt.path / "r.bin", "r+b") as f:  # and once more after close, in place
        f.seek(100)
        f.write(b"HEADER")
        data[100:106] = b"HEADER"
    mnt.sync()
    assert get_bytes(s3, mnt.bucket, mnt.key("r.bin")) == bytes(data)
    assert multipart_uploads(s3, mnt.bucket) == []


# -- unlink ---------------------------------------------------------------------------------

def test_unlink_deletes_object(mnt, s3):
    (mnt.path / "u.txt").write_bytes(b"bye")
    mnt.sync()
    os.unlink(mnt.path / "u.txt")
    assert not (mnt.path / "u.txt").exists()  # at once here; gone from S3 in close order
    mnt.sync()
    assert list_keys(s3, mnt.bucket, mnt.key("u.txt")) == []


def test_unlink_pending_file_cancels_upload(mnt, s3):
    with open(mnt.path / "cancel.bin", "wb") as f:
        f.write(payload(30 * MiB))
        os.unlink(mnt.path / "cancel.bin")
        f.write(b"still writable after unlink")
    mnt.sync()
    time.sleep(0.5)
    assert list_keys(s3, mnt.bucket, mnt.key("cancel.bin")) == []
    wait_for(lambda: multipart_uploads(s3, mnt.bucket) == [], timeout=10)


# -- directories ------------------------------------------------------------------------------

def test_mkdir_rmdir_and_marker(mnt, s3):
    """mkdir and rmdir take effect at once here; their markers reach S3 in close order (sync waits)."""
    os.mkdir(mnt.path / "d")
    mnt.sync()
    assert list_keys(s3, mnt.bucket, mnt.key("d")) == [mnt.key("d") + "/"]
    assert (mnt.path / "d").is_dir()
    with pytest.raises(FileExistsError):
        os.mkdir(mnt.path / "d")
    (mnt.path / "d" / "f").write_bytes(b"1")
    with pytest.raises(OSError) as info:
        os.rmdir(mnt.path / "d")
    assert info.value.errno == errno.ENOTEMPTY
    os.unlink(mnt.path / "d" / "f")
    os.rmdir(mnt.path / "d")
    assert not (mnt.path / "d").exists()
    mnt.sync()
    assert list_keys(s3, mnt.bucket, mnt.key("d")) == []
    assert not (mnt.path / "d").exists()


def test_listing_merges_s3_and_pending_files(mnt, s3):
    s3.put_object(Bucket=mnt.bucket, Key=mnt.key("sub/a.bin"), Body=b"a")
    s3.put_object(Bucket=mnt.bucket, Key=mnt.key("sub/deeper/b.bin"), Body=b"bb")
    with open(mnt.path / "sub" / "pending.bin", "wb") as f:
        f.write(b"p")
        assert sorted(os.listdir(mnt.path / "sub")) == ["a.bin", "deeper", "pending.bin"]
    assert sorted(os.listdir(mnt.path)) == ["sub"]
    assert (mnt.path / "sub" / "deeper").is_dir()
    assert (mnt.path / "sub" / "deeper" / "b.bin").stat().st_size == 2


def test_other_writers_seen_after_ttl(bucket, mount_factory, s3):
    mount = mount_factory(bucket, "ttl", options={"metadata_ttl": 1, "negative_ttl": 1})
    assert not (mount.path / "late.txt").exists()
    s3.put_object(Bucket=bucket, Key=mount.key("late.txt"), Body=b"x")
    wait_for(lambda: (mount.path / "late.txt").exists(), timeout=5)


# -- rename ------------------------------------------------------------------------------------

def test_rename_remote_file(mnt, s3):
    s3.put_object(Bucket=mnt.bucket, Key=mnt.key("a.txt"), Body=b"content")
    os.rename(mnt.path / "a.txt", mnt.path / "b.txt")
    assert (mnt.path / "b.txt").read_bytes() == b"content"  # at once here (read from a.txt until moved)
    assert not (mnt.path / "a.txt").exists()
    mnt.sync()
    assert list_keys(s3, mnt.bucket, mnt.key("")) == [mnt.key("b.txt")]
    assert (mnt.path / "b.txt").read_bytes() == b"content"


def test_rename_open_file_follows_to_new_name(mnt, s3):
    """safetensors: write a temp file, rename it while still open, then close."""
    data = payload(25 * MiB, seed=2)
    with open(mnt.path / ".tmp123", "wb") as f:
        f.write(data)
        os.rename(mnt.path / ".tmp123", mnt.path / "model.safetensors")
    mnt.sync()
    assert list_keys(s3, mnt.bucket, mnt.key("")) == [mnt.key("model.safetensors")]
    assert get_bytes(s3, mnt.bucket, mnt.key("model.safetensors")) == data
    wait_for(lambda: multipart_uploads(s3, mnt.bucket) == [], timeout=10)


def test_rename_over_existing_file(mnt, s3):
    (mnt.path / "new.tmp").write_bytes(b"new")
    (mnt.path / "target").write_bytes(b"old")
    mnt.sync()
    os.rename(mnt.path / "new.tmp", mnt.path / "target")
    mnt.sync()
    assert list_keys(s3, mnt.bucket, mnt.key("")) == [mnt.key("target")]
    assert get_bytes(s3, mnt.bucket, mnt.key("target")) == b"new"


def test_rename_directory_with_pending_and_uploaded_files(mnt, s3):
    os.mkdir(mnt.path / "tmp-ckpt")
    (mnt.path / "tmp-ckpt" / "done.bin").write_bytes(b"uploaded")
    mnt.sync()
    (mnt.path / "tmp-ckpt" / "pending.bin").write_bytes(payload(20 * MiB))
    os.rename(mnt.path / "tmp-ckpt", mnt.path / "ckpt-1")
    mnt.sync()
    assert list_keys(s3, mnt.bucket, mnt.key("")) == sorted(
        [mnt.key("ckpt-1") + "/", mnt.key("ckpt-1/done.bin"), mnt.key("ckpt-1/pending.bin")])
    assert get_bytes(s3, mnt.bucket, mnt.key("ckpt-1/pending.bin")) == payload(20 * MiB)
    assert sorted(os.listdir(mnt.path / "ckpt-1")) == ["done.bin", "pending.bin"]


# -- symlinks, links, attributes --------------------------------------------------------------

def test_symlink_and_readlink_survive_remount(mnt, s3, mount_factory):
    (mnt.path / "step_10.pt").write_bytes(b"ckpt")
    os.symlink("step_10.pt", mnt.path / "last")
    assert os.readlink(mnt.path / "last") == "step_10.pt"
    assert (mnt.path / "last").read_bytes() == b"ckpt"
    mnt.sync()
    head = s3.head_object(Bucket=mnt.bucket, Key=mnt.key("last"))
    assert stat.S_ISLNK(int(head["Metadata"]["mode"], 8))
    assert get_bytes(s3, mnt.bucket, mnt.key("last")) == b"step_10.pt"
    mnt.remount(cache_dir=mount_factory.fresh_dir("cache"))
    assert os.path.islink(mnt.path / "last")
    assert os.readlink(mnt.path / "last") == "step_10.pt"


def test_hard_link_is_eperm(mnt):
    (mnt.path / "f").write_bytes(b"x")
    with pytest.raises(PermissionError) as info:
        os.link(mnt.path / "f", mnt.path / "g")
    assert info.value.errno == errno.EPERM


def test_chmod_chown_utime_accepted_and_cp_p_works(mnt, tmp_path, s3):
    src = tmp_path / "src.txt"
    src.write_bytes(b"copy me")
    os.utime(src, (1_600_000_000, 1_600_000_000))
    subprocess.run(["cp", "-p", str(src), str(mnt.path / "copied.txt")], check=True)
    assert (mnt.path / "copied.txt").stat().st_mtime == pytest.approx(1_600_000_000, abs=1)
    os.chmod(mnt.path / "copied.txt", 0o600)
    os.chown(mnt.path / "copied.txt", os.getuid(), os.getgid())
    mnt.sync()
    head = s3.head_object(Bucket=mnt.bucket, Key=mnt.key("copied.txt"))
    assert float(head["Metadata"]["mtime"]) == pytest.approx(1_600_000_000, abs=1)
    assert get_bytes(s3, mnt.bucket, mnt.key("copied.txt")) == b"copy me"


def test_statfs(mnt):
    st = os.statvfs(mnt.path)
    assert st.f_bavail * st.f_frsize > 1 << 40
    assert shutil.disk_usage(mnt.path).free > 0


def test_key_too_long_is_enametoolong(mnt):
    deep = mnt.path
    for i in range(5):
        deep = deep / ("d" * 200 + str(i))
        os.mkdir(deep)
    with pytest.raises(OSError) as info:
        (deep / ("f" * 200)).write_bytes(b"x")
    assert info.value.errno == errno.ENAMETOOLONG


def test_write_without_permission_fails_on_fsync_with_eacces(bucket, mount_factory, s3):
    from s3ckptfs import devserver
    mount = mount_factory(bucket, "ro", env={"AWS_ACCESS_KEY_ID": devserver.READER_KEY,
                                             "AWS_SECRET_ACCESS_KEY": devserver.READER_SECRET})
    with open(mount.path / "denied.bin", "wb") as f:
        f.write(b"data")
        f.flush()
        with pytest.raises(PermissionError):
            os.fsync(f.fileno())
    assert list_keys(s3, bucket, mount.key("denied.bin")) == []
    result = mount.sync(check=False)
    assert result.returncode != 0 and "denied.bin" in result.stderr
    mount.unmount(force=True)


def test_name_that_is_not_utf8_is_eilseq(mnt, s3):
    with pytest.raises(OSError) as info:
        open(os.path.join(os.fsencode(mnt.path), b"bad\xff.pt"), "wb").close()
    assert info.value.errno == errno.EILSEQ
    assert list_keys(s3, mnt.bucket, mnt.key("")) == []
