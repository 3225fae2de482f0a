"""Several nodes, one prefix, through real mounts: a node that comes back late, what a lost node leaves.

Each mount has its own mountpoint and cache dir and stands for a node (docs/design.md,
"Several nodes"). Losing a node: SIGKILL of its daemon, lazy unmount, and (for a
preempted node) its cache dir deleted; a node coming back late: its daemon restarted
on its old cache dir after others wrote newer objects.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli, wait_for
from faultproxy import healing_proxy, running_proxy

running_proxy = pytest.fixture(running_proxy)
fault_proxy = pytest.fixture(healing_proxy, name="fault_proxy")


def status_json(mount) -> tuple[int, dict]:
    result = run_cli(["status", str(mount.path), "--json"], mount.env)
    return result.returncode, json.loads(result.stdout or "{}")


def test_a_node_back_late_keeps_the_newer_objects_and_reports_the_conflict(fault_proxy, bucket, mount_factory, s3):
    """Node A writes ``latest`` and ``model.pt`` while S3 refuses its PUTs and dies with them journaled;
    node B writes newer ones and syncs; A's daemon restarts on its old cache dir: S3 keeps B's
    objects, A's status and sync report both files as conflicts (exit 1), and its log says so."""
    s3.put_object(Bucket=bucket, Key="job/latest", Body=b"step_50")
    node_a = mount_factory(bucket, "job", endpoint_url=fault_proxy.url)
    assert (node_a.path / "latest").read_text() == "step_50"
    assert "conditional commits: resumed (the server enforces" in node_a.log_tail(200)
    fault_proxy.slowdown(1.0, match=r"^PUT ")   # every PUT answered 503: the commits wait and retry
    (node_a.path / "model.pt").write_bytes(b"A" * 5000)
    (node_a.path / "latest").write_text("step_100")
    wait_for(lambda: fault_proxy.stats["errors"] >= 2, timeout=30)
    node_a.kill()                                # journaled, not in S3; the cache dir is kept
    fault_proxy.passthrough()

    node_b = mount_factory(bucket, "job")
    (node_b.path / "model.pt").write_bytes(b"B" * 7000)
    (node_b.path / "latest").write_text("step_200")
    node_b.sync()

    node_a.remount()                             # back late, on its old cache dir
    wait_for(lambda: len([row for row in status_json(node_a)[1].get("pending", [])
                          if row["state"] == "conflict"]) == 2, timeout=60)
    code, answer = status_json(node_a)
    assert {row["path"]: row["state"] for row in answer["pending"]} == {"/latest": "conflict",
                                                                        "/model.pt": "conflict"}
    assert run_cli(["status", str(node_a.path)], node_a.env).returncode == 1
    synced = node_a.sync(check=False)
    assert synced.returncode == 1 and synced.stderr.count("conflict:") == 2, synced.describe()
    assert s3.get_object(Bucket=bucket, Key="job/latest")["Body"].read() == b"step_200"
    assert s3.get_object(Bucket=bucket, Key="job/model.pt")["Body"].read() == b"B" * 7000
    log = node_a.log_tail(400)
    assert "conflict: /latest was changed in S3 by another writer" in log
    assert "conflict: /model.pt was changed in S3 by another writer" in log
    # This node's bytes stay readable here until the file is deleted, which leaves B's object alone.
    assert (node_a.path / "latest").read_text() == "step_100"
    (node_a.path / "latest").unlink()
    (node_a.path / "model.pt").unlink()
    node_a.sync()
    assert s3.get_object(Bucket=bucket, Key="job/latest")["Body"].read() == b"step_200"
    assert s3.get_object(Bucket=bucket, Key="job/model.pt")["Body"].read() == b"B" * 7000
