"""The mount-table and process helpers shared by the daemon, the tests and the benchmark (no mount needed)."""

from __future__ import annotations

import os
import subprocess
import sys

from s3ckptfs import mounts


def test_mount_fields_are_unescaped():
    assert mounts.unescape_mount_field(rb"/mnt/my\040ckpt\011x\012y\134z") == "/mnt/my ckpt\tx\ny\\z"
    assert mounts.unescape_mount_field("/mnt/é".encode()) == "/mnt/é"


def test_the_root_and_proc_are_mounted_and_a_plain_directory_is_not(tmp_path):
    assert "/" in mounts.mounted_paths()
    assert mounts.is_mounted("/proc")
    assert not mounts.is_mounted(tmp_path)
    assert not mounts.is_dead_fuse_mount(tmp_path)


def test_paths_resolve_through_symlinks_as_the_mount_table_names_them(tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (tmp_path / "link").symlink_to("real")
    (tmp_path / "chain").symlink_to(tmp_path / "link")
    expected = os.path.realpath(target)
    assert mounts.resolve_without_stat(tmp_path / "link") == expected
    assert mounts.resolve_without_stat(tmp_path / "chain") == expected
    assert mounts.resolve_without_stat(tmp_path / "absent") == os.path.join(os.path.realpath(tmp_path), "absent")
    (tmp_path / "proc-link").symlink_to("/proc")
    assert mounts.is_mounted(tmp_path / "proc-link")


def test_pids_alive_exited_and_recorded(tmp_path):
    assert mounts.pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not mounts.pid_alive(child.pid)
    assert mounts.wait_gone(child.pid, timeout=1)
    assert not mounts.wait_gone(os.getpid(), timeout=0.1)
    assert mounts.read_pid(tmp_path) is None
    (tmp_path / mounts.PID_FILE).write_text("12345\n")
    assert mounts.read_pid(tmp_path) == 12345
    (tmp_path / mounts.PID_FILE).write_text("garbage")
    assert mounts.read_pid(tmp_path) is None


def test_a_zombie_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert mounts.wait_gone(child.pid, timeout=30)  # exited, not yet reaped
    finally:
        child.wait()
