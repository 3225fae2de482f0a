"""``-o local_sync=background``: close returns once the journal record is durable; the
staging file is fsync'd just after, on a background thread.

A restart of the machine cannot be staged in a test, but what it leaves behind can: the
journal record of a closed file still marked ``data_synced: false`` under another boot id.
The daemon must then report the file lost and never upload it. A daemon killed while the
machine stays up resumes such a file as before (the page cache holds its bytes).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import get_bytes, run_cli, wait_for
from faultproxy import healing_proxy, running_proxy
from test_crash import restart_and_check_arrival
from test_faults import assert_no_orphan_uploads, journal_records, object_exists, s3_sha256, status_of, write_random

MiB = 1 << 20
BACKGROUND = {"local_sync": "background"}
OTHER_BOOT = "00000000-0000-4000-8000-000000000000"
COMPLETE_MULTIPART = r"^POST \S*[?&]uploadId="

running_proxy = pytest.fixture(running_proxy)
fault_proxy = pytest.fixture(healing_proxy, name="fault_proxy")


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def record_of(mount, key: str) -> dict | None:
    return next((record for record in journal_records(mount) if record["key"] == key), None)


def edit_record(mount, key: str, **fields) -> None:
    """Change fields of the journal record of ``key`` (the daemon must not be running)."""
    for path in (mount.cache_dir / "journal").glob("*.json"):
        record = json.loads(path.read_text())
        if record["key"] == key:
            record.update(fields)
            path.write_text(json.dumps(record))
            return
    pytest.fail(f"no journal record of {key}: {journal_records(mount)}")


def test_record_marked_synced_after_close(fault_proxy, bucket, mount_factory, s3):
    """The record written at close is rewritten with ``data_synced: true`` and this boot's id
    once the background fsync is done (the upload is held back so that the record stays)."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options=BACKGROUND)
    key = mount.key("step_1.pt")
    fault_proxy.deny(match=COMPLETE_MULTIPART)
    with open(mount.path / "step_1.pt", "wb") as f:
        digest = write_random(f, 16 * MiB)
    try:
        record = wait_for(lambda: (r := record_of(mount, key)) and r["data_synced"] and r, timeout=30, interval=0.1)
    except TimeoutError:
        pytest.fail(f"record not marked synced within 30s: {journal_records(mount)}")
    assert record["boot_id"] == boot_id(), record
    assert not object_exists(s3, bucket, key)
    fault_proxy.passthrough()
    mount.sync()
    assert s3_sha256(s3, bucket, key) == digest
    assert not journal_records(mount)


def test_kill_right_after_close_resumes(fault_proxy, bucket, mount_factory, s3):
    """Killed right after close, the machine still up, the record still unsynced: the restart
    uploads the file byte-identical (from the page cache) and leaves no multipart upload."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options=BACKGROUND)
    key = mount.key("step_2.pt")
    fault_proxy.delay(5)  # the upload outlives close and the kill
    with open(mount.path / "step_2.pt", "wb") as f:
        digest = write_random(f, 64 * MiB)
    mount.kill()
    assert not object_exists(s3, bucket, key), "upload finished before the kill; make it slower"
    # The background fsync may or may not have run before the kill: make the record say it had not.
    edit_record(mount, key, data_synced=False, boot_id=boot_id())
    restart_and_check_arrival(mount, fault_proxy, s3, key, digest, timeout=120)
    assert not journal_records(mount)


def test_restart_of_machine_before_sync_reports_lost(fault_proxy, bucket, mount_factory, s3):
    """A record unsynced from another boot: never uploaded, the previous object stays, one error
    line in the log, failed in status and sync, also after another restart; writing the path
    again clears it."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options=BACKGROUND)
    key = mount.key("step_3.pt")
    (mount.path / "step_3.pt").write_bytes(b"previous version")
    mount.sync()
    fault_proxy.deny(match=COMPLETE_MULTIPART)  # parts upload, the object is never completed
    with open(mount.path / "step_3.pt", "wb") as f:
        write_random(f, 24 * MiB)
    wait_for(lambda: (e := status_of(mount, "step_3.pt")) and e["state"] == "failed", timeout=60, interval=0.5)
    mount.kill()
    lost_id = record_of(mount, key)["id"]
    edit_record(mount, key, data_synced=False, boot_id=OTHER_BOOT)
    fault_proxy.passthrough()
    for restart in range(2):
        mount.remount()
        entry = status_of(mount, "step_3.pt")
        assert entry is not None and entry["state"] == "failed" and "lost" in entry["error"], entry
        shown = run_cli(["status", str(mount.path)], mount.env, timeout=60)
        assert shown.returncode == 1 and "/step_3.pt" in shown.stdout and "lost" in shown.stdout, shown.describe()
        synced = mount.sync(check=False)
        assert synced.returncode == 1, synced.describe()
        assert "/step_3.pt" in synced.stderr and "lost" in synced.stderr, synced.describe()
        assert get_bytes(s3, bucket, key) == b"previous version"
        assert_no_orphan_uploads(s3, bucket)  # the multipart upload of the lost version is aborted
        mount.unmount(force=True)  # a plain unmount refuses while a file is not in S3
    log_lines = [line for line in (mount.cache_dir / "s3ckptfs.log").read_text().splitlines()
                 if "/step_3.pt is not uploaded" in line]
    assert len(log_lines) == 2 and all("ERROR" in line and "local_sync=background" in line for line in log_lines), \
        log_lines
    assert get_bytes(s3, bucket, key) == b"previous version"

    mount.remount()
    (mount.path / "step_3.pt").write_bytes(b"written again")
    mount.sync()
    assert get_bytes(s3, bucket, key) == b"written again"
    assert status_of(mount, "step_3.pt") is None
    assert not journal_records(mount)
    assert not (mount.cache_dir / "staging" / f"{lost_id}.data").exists()
