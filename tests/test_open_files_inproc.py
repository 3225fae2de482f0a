"""Descriptors kept open while their file is unlinked, truncated or rewritten through another one.

An open descriptor names an inode, not a path: after ``unlink`` it still works
(fstat, ftruncate, write), and a truncate or rewrite of the same file through its
path or another descriptor is what a reader sees next, as on a local disk. The
kernel's side of this is tested through a mount in test_open_files.py.
"""

from __future__ import annotations

import errno
import logging
import os

import pytest

from inproc import Vfs

KiB = 1 << 10


def data_of(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


class FakeBacking:
    """Kernel backing files as the FUSE layer registers them; here, numbers only."""

    def __init__(self) -> None:
        self.next_id = 0

    def open(self, fd: int) -> int:
        self.next_id += 1
        return self.next_id

    def close(self, backing_id: int) -> None:
        pass


# -- unlink while open -------------------------------------------------------------------

def test_ftruncate_of_an_unlinked_file_uses_its_handle(inproc, fake_store):
    mount = inproc()
    fs = mount.fs
    fh = fs.create("/t.bin", 0o100644, os.O_RDWR)
    fs.write(fh, data_of(70 * KiB), 0)
    fs.unlink("/t.bin")
    fs.truncate(None, 1000, fh)  # libfuse passes no path once the name is gone
    assert fs.getattr(None, fh).size == 1000
    assert fs.read(fh, 4 * KiB, 0) == data_of(1000)
    with pytest.raises(OSError) as raised:
        fs.truncate(None, 10)  # neither a name nor a handle: an errno, not a traceback
    assert raised.value.errno == errno.EBADF
    fs.flush(fh)
    fs.release(fh)
    assert fs.sync() == []
    assert fake_store.objects(mount.prefix) == {}


# -- fsync, then close -------------------------------------------------------------------

def test_fsync_then_close_of_a_passthrough_file_commits_once_without_a_state_error(inproc, fake_store, caplog):
    # DCP: write, fsync (committed), close. The close of a passthrough writer always counts
    # as a change; the commit finds S3 holding the same bytes and does nothing.
    mount = inproc(passthrough="auto")
    fs = mount.fs
    fs.enable_passthrough(FakeBacking())
    caplog.set_level(logging.ERROR)
    for name, size in (("small.bin", 5 * KiB), ("large.bin", 70 * KiB)):
        path = "/" + name
        fh = fs.create(path, 0o100644, os.O_WRONLY)
        assert fs.backing_id(fh), "the test needs a passthrough writer"
        staged = fs.handles.get(fh).staged
        os.pwrite(staged.fd, data_of(size), 0)  # what the kernel does for a passthrough writer
        fs.fsync(fh)
        puts = fake_store.count("put") + fake_store.count("complete_multipart")
        parts = fake_store.count("upload_part")
        fs.flush(fh)
        fs.release(fh)
        assert fs.sync() == []
        assert fake_store.count("put") + fake_store.count("complete_multipart") == puts, "uploaded twice"
        assert fake_store.count("upload_part") == parts, "parts uploaded again"
        assert fake_store.objects(mount.key(path)) == {mount.key(path): data_of(size)}
        assert fs.staged_files() == []  # retired: no part left on its way
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# -- a reader sees the file as it is now ---------------------------------------------------

def written_and_retired(mount, vfs: Vfs, name: str, data: bytes) -> None:
    vfs.write_file(name, data)
    assert mount.fs.sync() == []
    assert mount.fs.staged_files() == []  # read through the object cache from here on


def test_a_reader_sees_a_truncate_through_the_path(inproc):
    mount = inproc()
    vfs = Vfs(mount.fs)
    written_and_retired(mount, vfs, "b.bin", data_of(50 * KiB))
    fh = mount.fs.open("/b.bin", os.O_RDONLY)
    assert mount.fs.read(fh, 4 * KiB, 0) == data_of(4 * KiB)
    vfs.truncate("b.bin", 1000)
    assert mount.fs.getattr("/b.bin", fh).size == 1000
    assert mount.fs.read(fh, 64 * KiB, 0) == data_of(1000)
    mount.fs.release(fh)
    assert mount.fs.sync() == []
    assert vfs.read_bytes("b.bin") == data_of(1000)


def test_a_reader_sees_a_rewrite_through_another_descriptor(inproc):
    mount = inproc()
    vfs = Vfs(mount.fs)
    written_and_retired(mount, vfs, "b.bin", data_of(50 * KiB))
    reader = mount.fs.open("/b.bin", os.O_RDONLY)
    assert mount.fs.read(reader, 4 * KiB, 0) == data_of(4 * KiB)
    vfs.write_file("b.bin", data_of(20 * KiB, seed=3))  # open(O_TRUNC) of the same file
    assert mount.fs.read(reader, 64 * KiB, 0) == data_of(20 * KiB, seed=3)
    writer = vfs.open("b.bin", os.O_WRONLY)  # written in place, without O_TRUNC
    mount.fs.write(writer, b"patched", 0)
    assert mount.fs.read(reader, 7, 0) == b"patched"
    vfs.close(writer)
    mount.fs.release(reader)
    assert mount.fs.sync() == []
    assert vfs.read_bytes("b.bin") == b"patched" + data_of(20 * KiB, seed=3)[7:]


HIDDEN = "/.fuse_hidden0000000a00000001"


def test_a_reader_of_a_replaced_name_keeps_the_old_file(inproc):
    # rename over a name is a new file there: the reader keeps what it opened, as on a local disk
    mount = inproc()
    vfs = Vfs(mount.fs)
    written_and_retired(mount, vfs, "latest", b"old")
    reader = mount.fs.open("/latest", os.O_RDONLY)
    vfs.write_file("latest.tmp", b"new")
    vfs.rename("latest.tmp", "latest")
    assert mount.fs.read(reader, 100, 0) == b"old"
    mount.fs.release(reader)
    assert vfs.read_bytes("latest") == b"new"


@pytest.mark.parametrize("how", ["renamed over", "unlinked"])
def test_a_reader_of_an_object_not_yet_downloaded_keeps_it_when_its_name_goes(inproc, fake_store, how):
    # The reader opened an object of S3 and read its first bytes only; its name is replaced by a
    # rename (a move in S3) or unlinked (a delete). The rest of the object was fetched from S3 on
    # the next read, after the change had removed it: ESTALE (the workload model, seed 777001179:
    # a rename onto a name open for reading after a restart). The change now waits for the
    # rest of what its readers opened to be downloaded.
    writer = inproc()
    old, new = data_of(100_000, 1), data_of(50_000, 2)
    Vfs(writer.fs).write_file("f1", old)
    Vfs(writer.fs).write_file("f2", new)
    assert writer.fs.sync() == []
    mount = inproc()  # a node of its own: nothing of f1 in its cache
    vfs = Vfs(mount.fs)
    reader = mount.fs.open("/f1", os.O_RDONLY)
    assert mount.fs.read(reader, 10, 0) == old[:10]
    if how == "renamed over":
        vfs.rename("f2", "f1")
    else:
        mount.fs.unlink("/f1", keep_open_as=HIDDEN)
    assert mount.fs.sync() == []
    assert mount.fs.read(reader, 1000, 90_000) == old[90_000:91_000]
    mount.fs.release(reader)
    assert fake_store.objects(mount.prefix) == ({"mnt/f1": new} if how == "renamed over" else {"mnt/f2": new})


# -- the private name libfuse keeps an unlinked open file under ----------------------------------


def test_an_unlinked_open_file_answers_to_the_name_it_is_kept_as(inproc, fake_store):
    mount = inproc()
    fs = mount.fs
    fh = fs.create("/p.bin", 0o100644, os.O_RDWR)
    fs.write(fh, data_of(1000), 0)
    fs.unlink("/p.bin", keep_open_as=HIDDEN)
    kept = fs.kept_open(HIDDEN)
    assert kept == fh and fs.getattr(None, kept).size == 1000
    assert [name for name, _ in fs.readdir("/")] == []
    fs.flush(fh)
    fs.release(fh)
    assert fs.kept_open(HIDDEN) is None
    assert fs.sync() == []
    assert fake_store.objects(mount.prefix) == {}


def test_a_rename_onto_an_open_name_just_unlinked_leaves_no_gap_in_s3(inproc, fake_store):
    # libfuse renames an open target away (an unlink here) right before the rename onto it:
    # S3 keeps the old object under the name until the new one replaces it, never deleting it.
    mount = inproc()
    vfs = Vfs(mount.fs)
    written_and_retired(mount, vfs, "latest", b"step 1")
    reader = mount.fs.open("/latest", os.O_RDONLY)
    vfs.write_file("latest.tmp", b"step 2")
    assert mount.fs.sync() == []
    mount.fs.unlink("/latest", keep_open_as=HIDDEN)
    vfs.rename("latest.tmp", "latest")
    assert mount.fs.read(reader, 100, 0) == b"step 1"
    mount.fs.release(reader)
    assert mount.fs.sync() == []
    assert fake_store.count("delete", key=mount.key("latest")) == 0
    assert fake_store.objects(mount.prefix) == {mount.key("latest"): b"step 2"}
    assert vfs.read_bytes("latest") == b"step 2"


def test_an_open_file_unlinked_alone_is_deleted_after_a_moment(inproc, fake_store):
    mount = inproc()
    vfs = Vfs(mount.fs)
    written_and_retired(mount, vfs, "old.pt", b"old")
    reader = mount.fs.open("/old.pt", os.O_RDONLY)
    mount.fs.unlink("/old.pt", keep_open_as=HIDDEN)
    assert not vfs.exists("old.pt")
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {}
    assert mount.fs.read(mount.fs.kept_open(HIDDEN), 100, 0) == b"old"
    mount.fs.release(reader)
