"""deploy/slurm/prolog.sh and epilog.sh against real mounts, run as slurmd would run them.

The prolog passes on a live, healthy mount and fails fast with one line when
the mount is missing, dead or refused by S3; the epilog waits for uploads up
to its limit, logs what is still pending, and exits 0 whatever happens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import get_bytes, list_keys, wait_for
from faultproxy import healing_proxy, running_proxy

running_proxy = pytest.fixture(running_proxy)
fault_proxy = pytest.fixture(healing_proxy, name="fault_proxy")

SLURM_DIR = Path(__file__).resolve().parents[1] / "deploy" / "slurm"
MiB = 1 << 20

pytestmark = pytest.mark.fuse


def run_script(name: str, mount, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run a script with slurmd's sparse environment plus the test server's credentials."""
    full = {key: value for key, value in mount.env.items() if key.startswith(("AWS_", "XDG_"))}
    full.update(PATH=f"{Path(sys.executable).parent}:/usr/bin:/bin", SLURM_JOB_ID="4242", SLURM_JOB_USER="alice",
                S3CKPTFS_SLURM_ENV=os.devnull, S3CKPTFS_MOUNTPOINT=str(mount.path))
    full.update(env)
    return subprocess.run(["bash", str(SLURM_DIR / name)], env=full, capture_output=True, text=True,
                          timeout=timeout)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_prolog_passes_on_a_live_mount_found_from_env_or_config(mnt, tmp_path):
    result = run_script("prolog.sh", mnt)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    config = tmp_path / "ckpt.toml"
    config.write_text(f'source = "s3://{mnt.bucket}/ckpt"\nmountpoint = "{mnt.path}"\n\n[options]\n'
                      'write_mode = "async"\n')
    result = run_script("prolog.sh", mnt, S3CKPTFS_MOUNTPOINT="", S3CKPTFS_CONFIG=str(config))
    assert result.returncode == 0, result.stderr


def test_prolog_fails_fast_with_one_line(mnt, tmp_path):
    missing = tmp_path / "not-a-mount"
    missing.mkdir()
    result = run_script("prolog.sh", mnt, S3CKPTFS_MOUNTPOINT=str(missing))
    assert result.returncode == 1
    assert lines(result.stderr) == [f"s3ckptfs-prolog: {missing} is not mounted "
                                    "(is the s3ckptfs service running? systemctl status 's3ckptfs@*')"]
    result = run_script("prolog.sh", mnt, S3CKPTFS_MOUNTPOINT="", S3CKPTFS_CONFIG=str(tmp_path / "none.toml"))
    assert result.returncode == 1 and "no s3ckptfs mountpoint configured" in result.stderr

    # A daemon that died leaves a mount that answers ENOTCONN.
    os.kill(mnt.pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{mnt.pid}"), timeout=10)
    started = time.monotonic()
    result = run_script("prolog.sh", mnt, S3CKPTFS_PROLOG_TIMEOUT="5")
    assert result.returncode == 1
    assert time.monotonic() - started < 15
    assert lines(result.stderr) == [f"s3ckptfs-prolog: {mnt.path} does not answer within 5s "
                                    "(its daemon died or hangs)"]


def test_prolog_fails_on_failed_uploads_unless_allowed(fault_proxy, bucket, mount_factory):
    mount = mount_factory(bucket, "ckpt", endpoint_url=fault_proxy.url)
    fault_proxy.deny(match=r"^(PUT|POST) ")
    (mount.path / "refused.pt").write_bytes(b"x" * 1000)
    wait_for(lambda: "failed" in subprocess.run(["s3ckptfs", "status", str(mount.path)], capture_output=True,
                                                text=True, env=mount.env).stdout, timeout=60)
    result = run_script("prolog.sh", mount)
    assert result.returncode == 1
    assert lines(result.stderr) == [f"s3ckptfs-prolog: {mount.path} has 1 failed upload(s): S3 refuses this "
                                    f"node's writes (see s3ckptfs status {mount.path})"]
    result = run_script("prolog.sh", mount, S3CKPTFS_PROLOG_ALLOW_FAILED="1")
    assert result.returncode == 0 and "warning:" in result.stderr
    fault_proxy.passthrough()


def test_epilog_waits_up_to_its_limit_logs_pending_and_never_fails(fault_proxy, bucket, mount_factory, s3):
    mount = mount_factory(bucket, "ckpt", endpoint_url=fault_proxy.url)
    job_dir = mount.path / "runs" / "alice" / "4242"
    job_dir.mkdir(parents=True)
    fault_proxy.delay(200)
    payload = os.urandom(24 * MiB)
    (job_dir / "step_100.pt").write_bytes(payload)

    result = run_script("epilog.sh", mount, S3CKPTFS_EPILOG_TIMEOUT="2", S3CKPTFS_EPILOG_PATH="runs/%u/%j")
    assert result.returncode == 0, result.stderr
    logged = lines(result.stderr)
    assert logged[0].startswith(f"s3ckptfs-epilog: checkpoints under {job_dir} are NOT all in S3 after"), logged
    assert any("/runs/alice/4242/step_100.pt is not in S3 yet" in line for line in logged), logged
    assert not [key for key in list_keys(s3, bucket) if key.endswith("step_100.pt")]

    fault_proxy.passthrough()
    result = run_script("epilog.sh", mount, S3CKPTFS_EPILOG_TIMEOUT="120", S3CKPTFS_EPILOG_PATH="runs/%u/%j")
    assert result.returncode == 0, result.stderr
    assert lines(result.stderr)[0].startswith(f"s3ckptfs-epilog: checkpoints under {job_dir} are in S3"), \
        result.stderr
    assert get_bytes(s3, bucket, mount.key("runs/alice/4242/step_100.pt")) == payload


def test_epilog_logs_failures_and_missing_mounts_but_exits_0(fault_proxy, bucket, mount_factory, tmp_path):
    mount = mount_factory(bucket, "ckpt", endpoint_url=fault_proxy.url)
    fault_proxy.deny(match=r"^(PUT|POST) ")
    (mount.path / "refused.pt").write_bytes(b"x" * 1000)
    result = run_script("epilog.sh", mount, S3CKPTFS_EPILOG_TIMEOUT="30")
    assert result.returncode == 0
    assert "NOT all in S3" in result.stderr and "/refused.pt is not in S3" in result.stderr, result.stderr
    fault_proxy.passthrough()
    result = run_script("epilog.sh", mount, S3CKPTFS_MOUNTPOINT=str(tmp_path))
    assert result.returncode == 0
    assert lines(result.stderr) == [f"s3ckptfs-epilog: {tmp_path} is not mounted; nothing to wait for"]
