"""Running as a service: the systemd unit, the notify protocol, SIGTERM, config files, fstab."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, get_bytes, is_mounted, run_cli, scrape_metrics, unmount, wait_for

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "s3ckptfs@.service"


def s3ckptfs_bin() -> str:
    return str(Path(sys.executable).parent / "s3ckptfs")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit_name", ["s3ckptfs@.service", "s3ckptfs-watch@.service"])
def test_unit_passes_systemd_analyze_verify(tmp_path, unit_name):
    unit = tmp_path / unit_name
    # Point ExecStart at this checkout's command, which verify checks for existence.
    unit.write_text((UNIT.parent / unit_name).read_text().replace("/usr/local/bin/s3ckptfs", s3ckptfs_bin()))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit_name.replace("@", "@ckpt"))],
                            capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines() if "s3ckptfs" in line]
    assert result.returncode == 0 and not problems, result.stderr


def test_notify_ready_after_mount_and_sigterm_drains(bucket, s3server, s3, tmp_path):
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(60)
    mountpoint, cache = tmp_path / "mnt", tmp_path / "cache"
    mountpoint.mkdir()
    env = cli_env(s3server, {"NOTIFY_SOCKET": str(notify_path)})
    log = open(tmp_path / "daemon.log", "wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "s3ckptfs", "mount", f"s3://{bucket}/svc", str(mountpoint), "--cache-dir", str(cache),
         "--endpoint-url", s3server.endpoint_url, "--foreground", "-o", "eager_uploads=0,upload_concurrency=1"],
        env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message
        assert is_mounted(mountpoint), "READY=1 came before the mount was live"
        data = os.urandom(64 * MiB)
        (mountpoint / "big.pt").write_bytes(data)  # close returns; the upload is still to come
        daemon.send_signal(signal.SIGTERM)
        messages = []
        while "STOPPING=1" not in "".join(messages):
            messages.append(listener.recv(4096).decode())
        assert daemon.wait(timeout=120) == 0
        # The object was complete before the process exited, and the mount is gone.
        assert get_bytes(s3, bucket, "svc/big.pt") == data
        assert not is_mounted(mountpoint)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if is_mounted(mountpoint):
            unmount(mountpoint, lazy=True)
        listener.close()
        log.close()


def test_config_file_mount_and_precedence(bucket, s3server, s3, tmp_path, mount_factory):
    mountpoint = mount_factory.fresh_dir("mnt")
    cache = mount_factory.fresh_dir("cache", create=False)
    config = tmp_path / "ckpt.toml"
    config.write_text(f'source = "s3://{bucket}/fromfile"\nmountpoint = "{mountpoint}"\n'
                      f'cache_dir = "{cache}"\nendpoint_url = "{s3server.endpoint_url}"\n'
                      '[options]\nwrite_mode = "async"\nmetadata_ttl = 2\n')
    env = cli_env(s3server, {"S3CKPTFS_WRITE_MODE": "sync"})  # the environment beats the file
    result = run_cli(["mount", "--config", str(config)], env)
    try:
        assert result.returncode == 0, result.describe()
        (mountpoint / "f.txt").write_bytes(b"x")
        assert get_bytes(s3, bucket, "fromfile/f.txt") == b"x"  # sync mode: in S3 at close
    finally:
        run_cli(["unmount", str(mountpoint)], env)


def test_relative_mountpoint_and_cache_dir(bucket, s3server, s3, mount_factory):
    # The background daemon resolves them from the caller's directory, then leaves it.
    mountpoint = mount_factory.fresh_dir("relmnt")
    cache = mount_factory.fresh_dir("relcache", create=False)
    assert mountpoint.parent == cache.parent
    env = cli_env(s3server)
    result = run_cli(["mount", f"s3://{bucket}/rel", mountpoint.name, "--cache-dir", cache.name,
                      "-o", "write_mode=sync"], env, cwd=mountpoint.parent)
    try:
        assert result.returncode == 0, result.describe()
        (mountpoint / "f.txt").write_bytes(b"relative")
        assert get_bytes(s3, bucket, "rel/f.txt") == b"relative"
        assert (cache / "s3ckptfs.log").exists()
        pid = int((cache / "s3ckptfs.pid").read_text())
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
    finally:
        run_cli(["unmount", mountpoint.name], env, cwd=mountpoint.parent)


@pytest.fixture
def installed_command():
    """mount.fuse3 runs 's3ckptfs' from the system PATH, where a pip install as root puts it."""
    system_path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    if shutil.which("s3ckptfs", path=system_path):
        yield
        return
    link = Path("/usr/local/bin/s3ckptfs")
    link.symlink_to(s3ckptfs_bin())
    try:
        yield
    finally:
        link.unlink()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount.fuse3") is None,
                    reason="mount -t fuse.s3ckptfs needs root and mount.fuse3")
def test_fstab_style_mount(bucket, s3server, s3, mount_factory, installed_command):
    mountpoint = mount_factory.fresh_dir("mnt")
    cache = mount_factory.fresh_dir("cache", create=False)
    env = cli_env(s3server)
    result = subprocess.run(
        ["mount", "-t", "fuse.s3ckptfs", f"s3://{bucket}/fstab", str(mountpoint),
         "-o", f"_netdev,noatime,cache_dir={cache},endpoint_url={s3server.endpoint_url}"],
        env=env, capture_output=True, text=True, timeout=60)
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(mountpoint)
        (mountpoint / "ok.txt").write_bytes(b"fstab")
        run_cli(["sync", str(mountpoint)], env)
        assert get_bytes(s3, bucket, "fstab/ok.txt") == b"fstab"
    finally:
        run_cli(["unmount", str(mountpoint)], env)
        wait_for(lambda: not is_mounted(mountpoint), timeout=30)


def test_metrics_are_served_and_change_as_files_are_written(bucket, mount_factory):
    from s3ckptfs.devserver import free_port_pairs

    port = free_port_pairs(1)[0]
    # Without passthrough, so that writes pass through the daemon and are counted.
    mount = mount_factory(bucket, "metrics", options={"metrics_port": port, "passthrough": "off"})

    before = scrape_metrics(port)
    (mount.path / "a.bin").write_bytes(os.urandom(12 * MiB))
    mount.sync()
    after = scrape_metrics(port)
    assert after["s3ckptfs_uploaded_objects_total"] == before.get("s3ckptfs_uploaded_objects_total", 0) + 1
    assert after["s3ckptfs_uploaded_bytes_total"] >= 12 * MiB
    assert after['s3ckptfs_fuse_operations_total{operation="write_buf"}'] >= 12
    assert after["s3ckptfs_pending_uploads"] == 0
    assert "s3ckptfs_upload_duration_seconds_count" in after
    with pytest.raises(FileNotFoundError):
        (mount.path / "missing").read_bytes()
    assert scrape_metrics(port).get('s3ckptfs_fuse_errors_total{errno="ENOENT",operation="getattr"}', 0) >= 1
