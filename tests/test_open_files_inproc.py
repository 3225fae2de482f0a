"""Descriptors kept open while their file is unlinked, truncated or rewritten through another one.

An open descriptor names an inode, not a path: after ``unlink`` it still works
(fstat, ftruncate, write), and a truncate or rewrite of the same file through its
path or another descriptor is what a reader sees next, as on a local disk. The
kernel's side of this is tested through a mount in test_open_files.py.
"""

from __future__ import annotations

import errno
import os

import pytest

KiB = 1 << 10


def data_of(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


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
