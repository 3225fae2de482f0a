"""The Python API for training code (``s3ckptfs.sync``, ``s3ckptfs.status``) against real mounts.

What it promises: ``sync`` returns once every file closed under the path is
complete in S3 and raises naming the files otherwise (failed, or still
pending at the timeout); ``status`` gives what ``status --json`` prints; the
mount is found from any path inside it, through symlinks above it, through a
bind mount at another path (a container's view), and by other users when the
mount is shared; importing the package stays light.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import s3ckptfs
from conftest import get_bytes, list_keys, run_cli
from faultproxy import healing_proxy, running_proxy

MiB = 1 << 20

running_proxy = pytest.fixture(running_proxy)
fault_proxy = pytest.fixture(healing_proxy, name="fault_proxy")


def test_import_is_light():
    """``import s3ckptfs`` loads neither boto3, FUSE nor torch (training code imports it early)."""
    code = ("import sys, s3ckptfs; heavy = [m for m in ('boto3', 'botocore', 'mfusepy', 'torch', "
            "'prometheus_client', 's3ckptfs.daemon', 's3ckptfs.filesystem') if m in sys.modules]; print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_paths_off_any_mount_raise_not_mounted(tmp_path):
    assert s3ckptfs.find_mount(tmp_path) is None
    with pytest.raises(s3ckptfs.NotMountedError, match="not on an s3ckptfs mount"):
        s3ckptfs.sync(tmp_path / "missing.pt")
    with pytest.raises(s3ckptfs.NotMountedError):
        s3ckptfs.status(tmp_path)


@pytest.mark.fuse
def test_sync_waits_for_the_files_under_a_path(mnt, s3, tmp_path):
    (mnt.path / "a").mkdir()
    (mnt.path / "b").mkdir()
    payload = os.urandom(20 * MiB)
    (mnt.path / "a" / "model.pt").write_bytes(payload)
    (mnt.path / "b" / "other.pt").write_bytes(b"other")

    assert s3ckptfs.find_mount(mnt.path / "a" / "model.pt") == str(mnt.path)
    seconds = s3ckptfs.sync(mnt.path / "a")
    assert seconds >= 0
    assert get_bytes(s3, mnt.bucket, mnt.key("a/model.pt")) == payload

    # A single file, and the mount seen through a symlink above it.
    link = tmp_path / "ckpt-link"
    link.symlink_to(mnt.path)
    assert s3ckptfs.find_mount(link / "b" / "other.pt") == str(mnt.path)
    s3ckptfs.sync(link / "b" / "other.pt")
    assert get_bytes(s3, mnt.bucket, mnt.key("b/other.pt")) == b"other"
    into = tmp_path / "into-b"  # a symlink to a directory inside the mount
    into.symlink_to(mnt.path / "b")
    (mnt.path / "b" / "third.pt").write_bytes(b"third")
    assert s3ckptfs.find_mount(into / "third.pt") == str(mnt.path)
    s3ckptfs.sync(into)
    assert get_bytes(s3, mnt.bucket, mnt.key("b/third.pt")) == b"third"
    s3ckptfs.sync(mnt.path)  # everything: nothing left to wait for


@pytest.mark.fuse
def test_status_is_what_status_json_prints(mnt):
    (mnt.path / "x.bin").write_bytes(b"x" * 1000)
    s3ckptfs.sync(mnt.path)
    from_api = s3ckptfs.status(mnt.path / "x.bin")
    cli = run_cli(["status", "--json", str(mnt.path)], mnt.env)
    assert cli.returncode == 0, cli.describe()
    from_cli = json.loads(cli.stdout)
    assert from_api.keys() == from_cli.keys()
    assert from_api["pending"] == from_cli["pending"] == []
    assert from_api["objects_committed"] == from_cli["objects_committed"] >= 1


@pytest.mark.fuse
def test_sync_names_the_failed_files(fault_proxy, bucket, mount_factory):
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url)
    fault_proxy.deny(match=r"^(PUT|POST) ")  # uploads refused, lookups answered
    (mount.path / "denied.pt").write_bytes(os.urandom(MiB))
    with pytest.raises(s3ckptfs.SyncError) as info:
        s3ckptfs.sync(mount.path)
    assert not isinstance(info.value, s3ckptfs.SyncTimeoutError)
    assert [failure.path for failure in info.value.failed] == [str(mount.path / "denied.pt")]
    assert "denied.pt" in str(info.value)
    fault_proxy.passthrough()
    s3ckptfs.sync(mount.path / "denied.pt")  # a sync asks for the upload again


@pytest.mark.fuse
def test_sync_timeout_lists_pending_files_and_uploads_go_on(fault_proxy, bucket, mount_factory, s3):
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url)
    fault_proxy.delay(200)
    payload = os.urandom(24 * MiB)
    (mount.path / "slow.pt").write_bytes(payload)
    with pytest.raises(s3ckptfs.SyncTimeoutError) as info:
        s3ckptfs.sync(mount.path, timeout=1.0)
    assert [failure.path for failure in info.value.failed] == [str(mount.path / "slow.pt")]
    assert "slow.pt" not in "".join(list_keys(s3, bucket))

    # The command line's --timeout says the same, and exits 1.
    cli = run_cli(["sync", "--timeout", "0.5", str(mount.path)], mount.env)
    assert cli.returncode == 1, cli.describe()
    assert "slow.pt is not in S3 yet" in cli.stderr and "timed out after 0.5s" in cli.stderr, cli.stderr

    fault_proxy.passthrough()
    s3ckptfs.sync(mount.path, timeout=120)
    assert get_bytes(s3, bucket, mount.key("slow.pt")) == payload


@pytest.mark.fuse
def test_mount_seen_at_another_path_is_found_by_its_source(mnt, s3, tmp_path):
    """A container bind-mounts the node's mountpoint elsewhere: the mount table names the source."""
    other = tmp_path / "in-container"
    other.mkdir()
    subprocess.run(["mount", "--bind", str(mnt.path), str(other)], check=True)
    try:
        (other / "ckpt.pt").write_bytes(b"seen elsewhere")
        assert s3ckptfs.find_mount(other / "ckpt.pt") == str(other)
        s3ckptfs.sync(other / "ckpt.pt")
        assert get_bytes(s3, mnt.bucket, mnt.key("ckpt.pt")) == b"seen elsewhere"
    finally:
        subprocess.run(["umount", str(other)], check=False)


@pytest.mark.fuse
def test_other_users_sync_a_shared_mount(bucket, mount_factory, s3):
    """With allow_other, a training job running as a user syncs the mount root serves."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    # The system's python3: the package needs nothing outside the standard library to talk to a
    # daemon, and the test venv's interpreter may live where other users cannot read it.
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip(f"{python} is missing")
    top = Path(tempfile.mkdtemp(prefix="s3ckptfs-shared-"))
    try:
        top.chmod(0o755)
        mountpoint = top / "mnt"
        mountpoint.mkdir()
        mount = mount_factory(bucket, "shared", mountpoint=mountpoint, options={"allow_other": "true"})
        mountpoint.chmod(0o777)
        code = ("import sys, s3ckptfs; open(sys.argv[1], 'wb').write(b'by nobody'); "
                "print(s3ckptfs.sync(sys.argv[1]) >= 0, s3ckptfs.status(sys.argv[1])['pending'])")
        env = {"PATH": os.environ["PATH"], "HOME": "/", "PYTHONPATH": str(Path(s3ckptfs.__file__).parents[1])}
        result = subprocess.run([python, "-c", code, str(mountpoint / "user.pt")], capture_output=True,
                                text=True, user=65534, group=65534, env=env, cwd="/", timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "True []"
        assert get_bytes(s3, bucket, mount.key("user.pt")) == b"by nobody"
        mount.unmount()
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.fuse
def test_sync_right_after_close_waits_for_the_file(mnt, s3):
    """close(2) returns before the daemon hears of the release: sync must still wait for the file."""
    for index in range(60):
        name = f"quick{index}.pt"
        (mnt.path / name).write_bytes(b"q" * 100)
        s3ckptfs.sync(mnt.path / name)
        assert list_keys(s3, mnt.bucket, mnt.key(name)) == [mnt.key(name)], f"missed after {index} tries"
