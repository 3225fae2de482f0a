"""Watch mode (no FUSE): files closed in a local directory are shipped to S3."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import cli_env, get_bytes, list_keys, run_cli, wait_for

torch = pytest.importorskip("torch")


class WatchDaemon:
    def __init__(self, server, bucket: str, local, cache, *extra: str) -> None:
        self.args = [sys.executable, "-m", "s3ckptfs", "watch", str(local), f"s3://{bucket}/w",
                     "--cache-dir", str(cache), "--endpoint-url", server.endpoint_url, "--settle", "0.3", *extra]
        self.env = cli_env(server)
        self.log_path = cache.parent / f"{cache.name}.watch.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        wait_for(lambda: b"watching" in self.log_path.read_bytes() or self.process.poll() is not None, timeout=60)
        assert self.process.poll() is None, self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=120)


@pytest.fixture
def watched(s3server, bucket, tmp_path):
    local, cache = tmp_path / "ckpt", tmp_path / "cache"
    local.mkdir()
    daemon = WatchDaemon(s3server, bucket, local, cache, "--delete")
    daemon.start()
    yield daemon, local
    daemon.stop(signal.SIGKILL if daemon.process and daemon.process.poll() is None else signal.SIGTERM)


def test_torch_save_into_watched_dir_is_uploaded(watched, s3, bucket):
    daemon, local = watched
    state = {"w": torch.randn(4 << 20)}
    torch.save(state, local / "step_1.pt")
    expected = (local / "step_1.pt").read_bytes()
    wait_for(lambda: list_keys(s3, bucket, "w/step_1.pt"), timeout=60)
    assert get_bytes(s3, bucket, "w/step_1.pt") == expected
    result = run_cli(["sync", str(local)], daemon.env)
    assert result.returncode == 0, result.describe()
    status = run_cli(["status", str(local), "--json"], daemon.env)
    assert status.returncode == 0 and '"pending": []' in status.stdout


def test_temp_file_then_rename_uploads_only_the_final_name(watched, s3, bucket):
    daemon, local = watched
    seen: set[str] = set()
    stop = threading.Event()

    def watch_keys() -> None:
        while not stop.is_set():
            seen.update(list_keys(s3, bucket, "w/"))
            time.sleep(0.02)

    poller = threading.Thread(target=watch_keys)
    poller.start()
    try:
        (local / "sub").mkdir()
        (local / "sub" / ".tmp-model").write_bytes(os.urandom(3 << 20))
        os.rename(local / "sub" / ".tmp-model", local / "sub" / "model.safetensors")
        wait_for(lambda: list_keys(s3, bucket, "w/sub/model.safetensors"), timeout=60)
        time.sleep(0.5)
    finally:
        stop.set()
        poller.join()
    assert not any(".tmp-model" in key for key in seen), seen
    assert get_bytes(s3, bucket, "w/sub/model.safetensors") == (local / "sub" / "model.safetensors").read_bytes()
    os.unlink(local / "sub" / "model.safetensors")  # --delete mirrors it
    wait_for(lambda: not list_keys(s3, bucket, "w/sub/model.safetensors"), timeout=30)


def test_restart_reconciles_files_written_while_stopped(s3server, bucket, s3, tmp_path):
    local, cache = tmp_path / "ckpt", tmp_path / "cache"
    local.mkdir()
    daemon = WatchDaemon(s3server, bucket, local, cache)
    daemon.start()
    (local / "a.bin").write_bytes(b"a" * 1000)
    wait_for(lambda: list_keys(s3, bucket, "w/a.bin"), timeout=60)
    daemon.stop()
    (local / "b.bin").write_bytes(os.urandom(9 << 20))  # written while no daemon runs
    (local / "a.bin").write_bytes(b"changed")
    daemon.start()
    try:
        wait_for(lambda: list_keys(s3, bucket, "w/b.bin"), timeout=60)
        assert hashlib.sha256(get_bytes(s3, bucket, "w/b.bin")).digest() == \
            hashlib.sha256((local / "b.bin").read_bytes()).digest()
        wait_for(lambda: get_bytes(s3, bucket, "w/a.bin") == b"changed", timeout=60)
    finally:
        daemon.stop()
