"""Incremental checkpoints through a real mount against SeaweedFS (-o dedup=on; dedup.py).

Every test mounts through ``FaultProxy`` (tests/faultproxy.py), which records
each request line and, apart, those of server-side copies (a request carrying
``x-amz-copy-source``): a part sent is ``PUT ...partNumber=`` without it, a part
copied is one with it. Objects are checked in S3 directly and read back through
a fresh mount with an empty cache dir.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time

import pytest

from conftest import run_cli, scrape_metrics, wait_for
from faultproxy import healing_proxy, running_proxy
from test_grafana import free_port
from test_faults import assert_no_orphan_uploads, s3_sha256

MiB = 1 << 20
PART = 8 * MiB

running_proxy = pytest.fixture(running_proxy)
fault_proxy = pytest.fixture(healing_proxy, name="fault_proxy")


def part_requests(proxy, key: str) -> tuple[int, int]:
    """(parts sent, parts copied) to ``key`` seen by the proxy so far."""
    pattern = re.compile(rf"^PUT /[^/]+/{re.escape(key)}\?.*partNumber=")
    copies = [line for line in proxy.copy_requests if pattern.search(line)]
    every = [line for line in proxy.requests if pattern.search(line)]
    return len(every) - len(copies), len(copies)


def whole_copies(proxy, key: str) -> int:
    """CopyObject requests (a copy without partNumber) that made ``key``."""
    pattern = re.compile(rf"^PUT /[^/]+/{re.escape(key)} ")
    return sum(1 for line in proxy.copy_requests if pattern.search(line))


def with_end_changed(data: bytes) -> bytes:
    """All parts but the last equal: copied part by part, never as a whole file (wholecopy.py)."""
    return data[:-1] + bytes([data[-1] ^ 1])


def with_part_changed(data: bytes, number: int) -> bytes:
    start = (number - 1) * PART
    return data[:start] + os.urandom(PART) + data[start + PART:]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_unchanged_parts_are_copied_not_sent_and_read_back_identical(fault_proxy, bucket, mount_factory, s3):
    port = free_port()
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options={"dedup": "on", "metrics_port": port})
    first = os.urandom(5 * PART + 12345)
    (mount.path / "step_1.pt").write_bytes(first)
    mount.sync()
    second = with_part_changed(first, 3)
    (mount.path / "step_2.pt").write_bytes(second)
    (mount.path / "last.pt").write_bytes(second)  # the same state under a second name
    mount.sync()
    assert part_requests(fault_proxy, mount.key("step_2.pt")) == (1, 5)
    # the same bytes: parts copied, or the whole file in one copy (after at most a few parts copied
    # while it was written, whose upload is then aborted: wholecopy.py)
    last_sent, last_copied = part_requests(fault_proxy, mount.key("last.pt"))
    whole = whole_copies(fault_proxy, mount.key("last.pt"))
    assert last_sent == 0 and (last_copied, whole) != (0, 0)
    assert whole == 1 and last_copied <= 3 or (last_copied, whole) == (6, 0)
    status = json.loads(run_cli(["status", str(mount.path), "--json"], mount.env, timeout=60).stdout)
    early = last_copied * PART if whole else 0   # counted as copied, then thrown away with their upload
    sent, copied = 5 * PART + 12345 + PART, 4 * PART + 12345 + 5 * PART + 12345 + early
    assert (status["dedup"], status["part_bytes_sent"], status["part_bytes_copied"]) == (True, sent, copied)
    shown = run_cli(["status", str(mount.path)], mount.env, timeout=60).stdout
    assert f"{sent / MiB:.1f} MiB sent, {copied / MiB:.1f} MiB copied in S3" in shown
    metrics = scrape_metrics(port)
    assert (metrics['s3ckptfs_part_bytes_total{how="sent"}'],
            metrics['s3ckptfs_part_bytes_total{how="copied"}']) == (sent, copied)
    assert s3_sha256(s3, bucket, mount.key("step_2.pt")) == sha(second)
    assert s3_sha256(s3, bucket, mount.key("last.pt")) == sha(second)
    fresh = mount_factory(bucket, "p")  # another cache dir: every byte comes from S3
    assert (fresh.path / "step_2.pt").read_bytes() == second
    assert (fresh.path / "last.pt").read_bytes() == second
    assert_no_orphan_uploads(s3, bucket)


def test_a_copy_source_changed_after_it_was_hashed_is_not_copied(fault_proxy, bucket, mount_factory, s3):
    """Another node overwrites the object between this node's hash of it and the copy: the bytes are sent."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options={"dedup": "on"})
    body = os.urandom(3 * PART + 100)
    (mount.path / "step_1.pt").write_bytes(body)
    mount.sync()
    s3.put_object(Bucket=bucket, Key=mount.key("step_1.pt"), Body=os.urandom(3 * PART + 100))
    (mount.path / "step_2.pt").write_bytes(body)
    mount.sync()
    sent, copied = part_requests(fault_proxy, mount.key("step_2.pt"))
    assert sent == 4, (sent, copied)
    assert copied + whole_copies(fault_proxy, mount.key("step_2.pt")) >= 1, "a copy was tried and refused (If-Match)"
    assert s3_sha256(s3, bucket, mount.key("step_2.pt")) == sha(body)
    fresh = mount_factory(bucket, "p")
    assert (fresh.path / "step_2.pt").read_bytes() == body


def test_a_checkpoint_rotated_right_after_the_save_stays_whole(fault_proxy, bucket, mount_factory, s3):
    """Trainer-style rotation: the next checkpoint shares most parts with the one deleted right after it."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options={"dedup": "on"})
    body = os.urandom(4 * PART)
    (mount.path / "step_1.pt").write_bytes(body)
    mount.sync()
    changed = with_part_changed(body, 1)
    (mount.path / "step_2.pt").write_bytes(changed)
    os.unlink(mount.path / "step_1.pt")
    mount.sync()
    assert part_requests(fault_proxy, mount.key("step_2.pt")) == (1, 3)
    assert s3_sha256(s3, bucket, mount.key("step_1.pt")) is None
    fresh = mount_factory(bucket, "p")
    assert (fresh.path / "step_2.pt").read_bytes() == changed


def test_a_kill_in_the_middle_of_a_copied_upload_resumes_without_sending(fault_proxy, bucket, mount_factory, s3):
    """SIGKILL once every part of a checkpoint is copied but before its completion: the restart
    completes it from the copied parts (journal + ListParts), byte-identical, sending nothing."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options={"dedup": "on"})
    body = os.urandom(4 * PART + 777)
    (mount.path / "step_1.pt").write_bytes(body)
    mount.sync()
    key = mount.key("step_2.pt")
    fault_proxy.slowdown(1.0, match=r"^POST \S*[?&]uploadId=")  # only CompleteMultipartUpload
    second = with_end_changed(body)
    (mount.path / "step_2.pt").write_bytes(second)
    wait_for(lambda: part_requests(fault_proxy, key) == (1, 4) and fault_proxy.stats["errors"] >= 1,
             timeout=120, interval=0.5)
    mount.kill()
    assert s3_sha256(s3, bucket, key) is None
    fault_proxy.passthrough()
    fault_proxy.requests.clear()
    fault_proxy.copy_requests.clear()
    mount.remount()
    mount.sync()
    assert part_requests(fault_proxy, key) == (0, 0), fault_proxy.requests
    assert s3_sha256(s3, bucket, key) == sha(second)
    fresh = mount_factory(bucket, "p")
    assert (fresh.path / "step_2.pt").read_bytes() == second
    assert_no_orphan_uploads(s3, bucket)


def test_the_same_state_under_a_second_name_is_one_server_side_copy(fault_proxy, bucket, mount_factory, s3):
    """Lightning's save_last=True: the second file, written while the first is still uploading, is made
    with one CopyObject of the first once it is complete, and carries its own mtime."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options={"dedup": "on"})
    body = os.urandom(5 * PART + 4321)
    first, second = mount.key("epoch3.ckpt"), mount.key("last.ckpt")
    fault_proxy.slowdown(1.0, match=rf"^POST /[^/]+/{re.escape(first)}\?uploadId=")  # its completion waits
    (mount.path / "epoch3.ckpt").write_bytes(body)
    time.sleep(1.1)  # a later mtime for the second file
    (mount.path / "last.ckpt").write_bytes(body)
    wait_for(lambda: any(line.startswith(f"POST /{bucket}/{second}?uploads") for line in fault_proxy.requests),
             timeout=60, interval=0.1)
    time.sleep(0.5)  # its parts look at the bytes, find them in the first file's upload, and are left
    fault_proxy.passthrough()
    mount.sync()
    assert part_requests(fault_proxy, second) == (0, 0)
    assert whole_copies(fault_proxy, second) == 1
    assert s3_sha256(s3, bucket, second) == sha(body)
    mtime = os.stat(mount.path / "last.ckpt").st_mtime
    fresh = mount_factory(bucket, "p")
    assert (fresh.path / "last.ckpt").read_bytes() == body
    assert abs(os.stat(fresh.path / "last.ckpt").st_mtime - mtime) < 0.01
    assert os.stat(fresh.path / "epoch3.ckpt").st_mtime < mtime - 1
    assert_no_orphan_uploads(s3, bucket)


def test_a_save_after_a_resume_copies_what_it_shares_with_the_checkpoint_read(fault_proxy, bucket, mount_factory,
                                                                               s3):
    """A new node (empty cache dir) resumes from a checkpoint another node wrote, then saves the next one:
    the parts it shares with the checkpoint it read are copied in S3, not sent."""
    body = os.urandom(4 * PART + 999)
    s3.put_object(Bucket=bucket, Key="p/step_1.pt", Body=body)   # another node's checkpoint
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options={"dedup": "on"})
    assert (mount.path / "step_1.pt").read_bytes() == body
    hashes = mount.cache_dir / "parthashes.db"
    wait_for(lambda: hashes.exists() and sqlite3.connect(hashes).execute(
        "SELECT count(*) FROM objects WHERE key = 'p/step_1.pt'").fetchone() == (1,), timeout=30, interval=0.2)
    second = with_end_changed(body)
    (mount.path / "step_2.pt").write_bytes(second)
    mount.sync()
    assert part_requests(fault_proxy, mount.key("step_2.pt")) == (1, 4)
    fresh = mount_factory(bucket, "p")
    assert (fresh.path / "step_2.pt").read_bytes() == second


def test_a_second_name_written_once_the_first_is_complete_is_copied_not_sent(fault_proxy, bucket, mount_factory,
                                                                              s3):
    """The same bytes under a second name once the first object is complete: parts are copied while the
    file is still written (the copy lane), or the file is one CopyObject; nothing is sent, nothing left.
    (Which one depends on how much was copied by close: the in-process tests pin each case down.)"""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options={"dedup": "on"})
    body = os.urandom(6 * PART + 4321)
    (mount.path / "epoch=1.ckpt").write_bytes(body)
    mount.sync()
    key = mount.key("last.ckpt")
    (mount.path / "last.ckpt").write_bytes(body)
    mount.sync()
    sent, copied = part_requests(fault_proxy, key)
    assert sent == 0 and copied + whole_copies(fault_proxy, key) >= 1, (sent, copied)
    assert whole_copies(fault_proxy, key) <= 1
    assert s3_sha256(s3, bucket, key) == sha(body)
    fresh = mount_factory(bucket, "p")
    assert (fresh.path / "last.ckpt").read_bytes() == body
    assert_no_orphan_uploads(s3, bucket)


def test_dedup_auto_saves_are_byte_identical(fault_proxy, bucket, mount_factory, s3):
    """-o dedup=auto (an option; off is the default): whatever it chooses from the rates it measures, every object is
    the file's bytes, also read back from a fresh mount, and no upload is left behind."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options={"dedup": "auto"})
    first = os.urandom(5 * PART + 999)
    saves = {"step-1.ckpt": first, "step-2.ckpt": with_part_changed(first, 4), "last.ckpt": first,
             "step-3.ckpt": os.urandom(5 * PART + 999)}
    for name, data in saves.items():
        (mount.path / name).write_bytes(data)
        mount.sync()
    status = json.loads(run_cli(["status", str(mount.path), "--json"], mount.env, timeout=60).stdout)
    assert status["dedup"] is True
    fresh = mount_factory(bucket, "p")
    for name, data in saves.items():
        assert s3_sha256(s3, bucket, mount.key(name)) == sha(data)
        assert (fresh.path / name).read_bytes() == data
    assert_no_orphan_uploads(s3, bucket)
