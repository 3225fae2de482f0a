"""The Lightning and Hugging Face callbacks with the real trainers, through a slow S3 link.

Every run goes through the fault proxy with a delay, so that uploads take
longer than training: what is in S3 the moment the trainer returns (or the
process ends on SIGTERM) was waited for by the callback, not uploaded by chance.
Nothing here calls ``s3ckptfs sync`` before checking S3. Training runs in a
process of its own (tests/integration_workers.py): torch.save may hold the GIL
while it opens a file, and the fault proxy answering that open's lookup runs
in the test process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from conftest import get_bytes, list_keys  # noqa: E402
from faultproxy import healing_proxy, running_proxy  # noqa: E402

running_proxy = pytest.fixture(running_proxy)
fault_proxy = pytest.fixture(healing_proxy, name="fault_proxy")

WORKERS = Path(__file__).with_name("integration_workers.py")
DELAY_MS = 150  # per 64 KiB piece, both ways: every upload takes at least ~0.3 s


def files_under(root: Path) -> dict[str, bytes]:
    """Relative path -> content of every regular file under ``root``."""
    return {path.relative_to(root).as_posix(): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file() and not path.is_symlink()}


def assert_all_in_s3(s3, mount, subdir: str) -> dict[str, bytes]:
    """Every file under ``subdir`` of the mount is in S3 right now, with the same content."""
    local = files_under(mount.path / subdir)
    assert local, f"nothing was written under {subdir}"
    base = mount.key(subdir) + "/"
    in_s3 = {key[len(base):] for key in list_keys(s3, mount.bucket, base) if not key.endswith("/")}
    assert set(local) <= in_s3, f"not in S3 yet: {sorted(set(local) - in_s3)}"
    for name, data in local.items():
        assert get_bytes(s3, mount.bucket, base + name) == data, name
    return local


def run_worker(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKERS), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=WORKERS.parent)


# -- Lightning -----------------------------------------------------------------------------------

@pytest.mark.fuse
def test_lightning_fit_returns_with_checkpoints_in_s3(fault_proxy, bucket, mount_factory, s3):
    pytest.importorskip("lightning")
    mount = mount_factory(bucket, "ckpt", endpoint_url=fault_proxy.url)
    fault_proxy.delay(DELAY_MS)
    result = run_worker("lightning", str(mount.path / "run"), "3")
    assert result.returncode == 0, result.stderr[-3000:]
    files = assert_all_in_s3(s3, mount, "run")
    assert "last.ckpt" in files
    assert "durable in S3 after" in result.stderr and "(end of training)" in result.stderr, result.stderr[-3000:]


@pytest.mark.fuse
def test_lightning_sigterm_makes_last_checkpoint_durable(fault_proxy, bucket, mount_factory, s3):
    pytest.importorskip("lightning")
    mount = mount_factory(bucket, "ckpt", endpoint_url=fault_proxy.url)
    fault_proxy.delay(DELAY_MS)
    result = run_worker("lightning", str(mount.path / "run"), "50", "2")
    assert "durable in S3 after" in result.stderr and "(SIGTERM)" in result.stderr, result.stderr[-3000:]
    files = assert_all_in_s3(s3, mount, "run")
    assert "last.ckpt" in files and any(name.startswith("epoch=1-") for name in files), sorted(files)


# -- Hugging Face Trainer ------------------------------------------------------------------------

@pytest.mark.fuse
def test_transformers_train_returns_with_checkpoints_in_s3(fault_proxy, bucket, mount_factory, s3):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    mount = mount_factory(bucket, "ckpt", endpoint_url=fault_proxy.url)
    fault_proxy.delay(DELAY_MS)
    result = run_worker("transformers", str(mount.path / "hf"), "6", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    files = assert_all_in_s3(s3, mount, "hf")
    assert {name.split("/")[0] for name in files} == {"checkpoint-4", "checkpoint-6"}  # save_total_limit=2
    assert "durable in S3 after" in result.stderr and "(end of training)" in result.stderr, result.stderr[-3000:]
    assert "SIGTERM handler after train: <Handlers.SIG_DFL: 0>" in result.stdout  # the handler is gone


@pytest.mark.fuse
def test_transformers_sigterm_makes_last_checkpoint_durable(fault_proxy, bucket, mount_factory, s3):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    mount = mount_factory(bucket, "ckpt", endpoint_url=fault_proxy.url)
    fault_proxy.delay(DELAY_MS)
    result = run_worker("transformers", str(mount.path / "hf"), "1000", "3", "sigterm-after-save")
    assert result.returncode == -signal.SIGTERM, (result.returncode, result.stderr[-3000:])
    assert "durable in S3 after" in result.stderr and "(SIGTERM)" in result.stderr, result.stderr[-3000:]
    files = assert_all_in_s3(s3, mount, "hf")
    assert {name.split("/")[0] for name in files} == {"checkpoint-3"}
    assert "checkpoint-3/trainer_state.json" in files


@pytest.mark.fuse
def test_callbacks_log_when_a_checkpoint_is_not_durable(fault_proxy, bucket, mount_factory, caplog):
    """A refused upload: the end-of-training wait raises SyncError naming the file; on SIGTERM it only logs."""
    import s3ckptfs
    from s3ckptfs.integrations._durable import make_durable

    mount = mount_factory(bucket, "ckpt", endpoint_url=fault_proxy.url)
    (mount.path / "run").mkdir()
    fault_proxy.deny(match=r"^(PUT|POST) ")
    (mount.path / "run" / "last.ckpt").write_bytes(os.urandom(1000))
    caplog.set_level(logging.INFO, logger="s3ckptfs.integrations")
    with pytest.raises(s3ckptfs.SyncError):
        make_durable([str(mount.path / "run")], timeout=30, why="end of training", raise_errors=True)
    assert not make_durable([str(mount.path / "run")], timeout=30, why="SIGTERM", raise_errors=False)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("NOT durable" in m and "last.ckpt" in m for m in errors), errors
    fault_proxy.passthrough()
    s3ckptfs.sync(mount.path)
