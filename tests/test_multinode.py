"""Several nodes, one prefix, through real mounts: a node that comes back late, what a lost node leaves.

Each mount has its own mountpoint and cache dir and stands for a node (docs/design.md,
"Several nodes"). Losing a node: SIGKILL of its daemon, lazy unmount, and (for a
preempted node) its cache dir deleted; a node coming back late: its daemon restarted
on its old cache dir after others wrote newer objects.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import multinode_workers as workers
from conftest import list_keys, run_cli, wait_for
from faultproxy import healing_proxy, running_proxy
from s3ckptfs import cli

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
    assert "conditional commits: resumed (the server enforces" in node_a.log_tail(200)
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
    # A's mount shows B's objects (a job resumed here reads the newest latest); A's bytes are
    # set aside in its cache dir, where the report says.
    assert (node_a.path / "latest").read_text() == "step_200"
    assert (node_a.path / "model.pt").read_bytes() == b"B" * 7000
    kept = {row["path"]: row["error"] for row in status_json(node_a)[1]["pending"]}
    assert "the mount shows the newer object" in kept["/model.pt"]
    staging = kept["/model.pt"].split(" (", 2)[-1].split(")")[0]
    assert Path(staging).read_bytes() == b"A" * 5000
    # The job on A saves again: a normal write over what the mount shows, which clears latest's report.
    (node_a.path / "latest").write_text("step_300")
    synced = node_a.sync(check=False)
    assert synced.returncode == 1 and synced.stderr.count("conflict:") == 1, synced.describe()
    assert s3.get_object(Bucket=bucket, Key="job/latest")["Body"].read() == b"step_300"
    assert s3.get_object(Bucket=bucket, Key="job/model.pt")["Body"].read() == b"B" * 7000


def test_a_node_back_late_neither_renames_nor_deletes_over_newer_objects(fault_proxy, bucket, mount_factory, s3):
    """While S3 refuses node A's writes and deletes, A replaces ``latest`` by a rename from
    ``latest.tmp`` (not in S3 yet), ``pointer`` by a rename from ``pointer.tmp`` (in S3 already: a
    move), and deletes ``old.pt``; A dies with all that journaled. Node B rewrites the three keys.
    A's daemon restarts on its old cache dir: B's objects stay, A reports three conflicts."""
    for key, body in {"latest": b"step_50", "pointer": b"step_50", "old.pt": b"old"}.items():
        s3.put_object(Bucket=bucket, Key=f"job/{key}", Body=body)
    node_a = mount_factory(bucket, "job", endpoint_url=fault_proxy.url)
    assert sorted(os.listdir(node_a.path)) == ["latest", "old.pt", "pointer"]
    (node_a.path / "pointer.tmp").write_text("step_100")
    node_a.sync()
    fault_proxy.slowdown(1.0, match=r"^(PUT|DELETE) ")   # answered 503: the changes wait and retry
    (node_a.path / "latest.tmp").write_text("step_100")
    os.replace(node_a.path / "latest.tmp", node_a.path / "latest")
    os.replace(node_a.path / "pointer.tmp", node_a.path / "pointer")
    (node_a.path / "old.pt").unlink()
    wait_for(lambda: fault_proxy.stats["errors"] >= 2, timeout=30)
    node_a.kill()
    fault_proxy.passthrough()

    node_b = mount_factory(bucket, "job")
    for name in ("latest", "pointer", "old.pt"):
        (node_b.path / name).write_text("step_200")
    node_b.sync()

    node_a.remount()
    wait_for(lambda: len([row for row in status_json(node_a)[1].get("pending", [])
                          if row["state"] == "conflict"]) == 3, timeout=60)
    synced = node_a.sync(check=False)
    assert synced.returncode == 1 and synced.stderr.count("conflict:") == 3, synced.describe()
    for name in ("latest", "pointer", "old.pt"):
        assert s3.get_object(Bucket=bucket, Key=f"job/{name}")["Body"].read() == b"step_200", name
    assert s3.get_object(Bucket=bucket, Key="job/pointer.tmp")["Body"].read() == b"step_100"


MiB = 1 << 20


def uploads_under(s3, bucket: str, prefix: str) -> list[tuple[str, str]]:
    answer = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return sorted((upload["Key"], upload["UploadId"]) for upload in answer.get("Uploads", []))


def lose_node_while_writing(node, s3, name: str, size: int = 20 * MiB) -> list[tuple[str, str]]:
    """``node`` is writing ``name`` (still open, parts uploading) when it is lost: SIGKILL, lazy
    unmount, cache dir deleted. Returns the multipart uploads it leaves behind."""
    key = node.key(name)
    (node.path / name).parent.mkdir(parents=True, exist_ok=True)
    stream = open(node.path / name, "wb")
    stream.write(b"\1" * size)
    stream.flush()
    left = wait_for(lambda: [u for u in uploads_under(s3, node.bucket, key) if u[0] == key], timeout=60)
    node.kill()
    try:
        stream.close()
    except OSError:
        pass  # the daemon is gone: ENOTCONN
    shutil.rmtree(node.cache_dir)
    return left


def test_cleanup_aborts_what_a_lost_node_left_and_spares_a_live_upload(bucket, mount_factory, s3, monkeypatch,
                                                                        capsys):
    node_a = mount_factory(bucket, "job")
    left = lose_node_while_writing(node_a, s3, "step_1/shard0.distcp")
    time.sleep(6)
    node_b = mount_factory(bucket, "job")
    with open(node_b.path / "shard1.distcp", "wb") as live:   # a live node writing right now
        live.write(b"\2" * 20 * MiB)
        live.flush()
        wait_for(lambda: [u for u in uploads_under(s3, bucket, "job/shard1") if u], timeout=60)
        # In this process: a child process would inherit the open file and close it, which is a close.
        for name, value in node_b.factory.server.env().items():
            monkeypatch.setenv(name, value)
        code = cli.main(["cleanup", f"s3://{bucket}/job", "--older-than", "5s",
                         "--endpoint-url", node_b.factory.server.endpoint_url])
        printed = capsys.readouterr().out
        assert code == 0, printed
        assert f"aborted job/step_1/shard0.distcp (upload {left[0][1]}" in printed
        assert "1 multipart upload(s) older than 5s aborted under s3://" in printed
        assert [key for key, _ in uploads_under(s3, bucket, "job/")] == ["job/shard1.distcp"]
    node_b.sync()
    assert s3.head_object(Bucket=bucket, Key="job/shard1.distcp")["ContentLength"] == 20 * MiB
    assert uploads_under(s3, bucket, "job/") == []
    again = run_cli(["cleanup", f"s3://{bucket}/job", "--endpoint-url", node_b.factory.server.endpoint_url],
                    node_b.env)
    assert again.returncode == 0 and "0 multipart upload(s) older than 1d aborted" in again.stdout


def test_a_mount_with_cleanup_older_than_aborts_a_lost_nodes_uploads(bucket, mount_factory, s3):
    node_a = mount_factory(bucket, "job")
    lose_node_while_writing(node_a, s3, "shard0.distcp")
    time.sleep(3)
    node_c = mount_factory(bucket, "job", options={"cleanup_older_than": "2s"})
    wait_for(lambda: uploads_under(s3, bucket, "job/") == [], timeout=30)
    log = node_c.log_tail(300)
    assert "cleanup: aborted multipart upload job/shard0.distcp" in log
    assert "cleanup: 1 multipart upload(s) older than 2s aborted under job/" in log


# -- durable before the commit marker: DCP, two nodes, a node lost after every save ----------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lose_and_replace(node, factory) -> None:
    """A preempted node: daemon killed, mount gone, local disk gone; a replacement mounts the prefix."""
    node.kill()
    shutil.rmtree(node.cache_dir)
    node.remount(cache_dir=factory.fresh_dir("cache"))


def run_ranks_losing_node_1(loop, nodes, factory, steps: int, control: Path, kind: str) -> None:
    """Run ``loop`` as the ranks, one per node; after each save returns on every rank, lose node 1
    (the ranks wait for ``go_<step>`` meanwhile)."""
    import torch.multiprocessing as tmp

    context = tmp.spawn(loop, args=(free_port(), [str(node.path) for node in nodes], steps, str(control), kind),
                        nprocs=workers.WORLD_SIZE, join=False)
    for step in range(steps):
        wait_for(lambda: (control / f"saved_{step}").exists() or not all(p.is_alive() for p in context.processes),
                 timeout=300, interval=0.02)
        assert (control / f"saved_{step}").exists(), "a rank failed"
        lose_and_replace(nodes[1], factory)
        (control / f"go_{step}").touch()
    context.join()


def torn_checkpoints(s3, bucket: str, prefix: str, steps: int) -> list[str]:
    """Checkpoints whose commit marker (.metadata) is in S3 while a shard it names is not."""
    keys = set(list_keys(s3, bucket, prefix))
    torn = []
    for step in range(steps):
        base = f"{prefix}step_{step}/"
        if base + ".metadata" in keys and not {base + "__0_0.distcp", base + "__1_0.distcp"} <= keys:
            torn.append(f"step_{step}")
    return torn


# The stock writer on write-back mounts tears checkpoints (the README's table): to see it, run
# S3CKPTFS_TEST_DCP_WRITER=default with S3CKPTFS_TEST_DCP_MOUNT=writeback.
@pytest.mark.parametrize("writer, options", [("integration", {}), ("default", {"write_mode": "sync"})],
                         ids=["integration-writer", "stock-writer-on-sync-mounts"])
def test_dcp_never_leaves_a_torn_checkpoint_when_a_node_is_lost(bucket, mount_factory, s3, tmp_path, writer,
                                                                options):
    """2 ranks, each through its own node's mount, 10 saves, either with s3ckptfs.integrations.dcp
    (every other one with dcp.async_save) on write-back mounts, or with the stock FileSystemWriter
    and sync_files=False on mounts with write_mode=sync; after each save node 1 is lost at once
    (SIGKILL, cache dir deleted) and replaced. From a fresh mount: every checkpoint with .metadata
    has both shards, and the newest one loads."""
    import torch
    import torch.distributed.checkpoint as dcp

    steps = 10
    writer = os.environ.get("S3CKPTFS_TEST_DCP_WRITER", writer)
    if os.environ.get("S3CKPTFS_TEST_DCP_MOUNT") == "writeback":
        options = {}
    nodes = [mount_factory(bucket, "job", options=options), mount_factory(bucket, "job", options=options)]
    control = tmp_path / "control"
    control.mkdir()
    run_ranks_losing_node_1(workers.dcp_save_loop, nodes, mount_factory, steps, control, writer)
    times = [json.loads((control / f"times_{rank}.json").read_text()) for rank in range(workers.WORLD_SIZE)]
    print(f"dcp.save ({writer} writer), seconds per save: rank 0 {times[0]}, rank 1 {times[1]}")

    nodes[0].sync()
    torn = torn_checkpoints(s3, bucket, "job/", steps)
    print(f"torn checkpoints ({writer} writer): {len(torn)} of {steps}: {torn}")
    assert torn == []
    fresh = mount_factory(bucket, "job")
    latest = (fresh.path / "latest").read_text()
    assert latest == f"step_{steps - 1}"
    for step in range(steps):
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(fresh.path / f"step_{step}"))
    target = {"model": torch.zeros(64 * 1024), "rank0": torch.zeros(6 * 1024 * 1024), "rank1": torch.zeros(6 * 1024 * 1024),
              "step": -1}
    dcp.load(target, checkpoint_id=str(fresh.path / latest), no_dist=True)
    for rank in range(workers.WORLD_SIZE):
        assert torch.equal(target[f"rank{rank}"], workers.shard_state(rank, steps - 1)[f"rank{rank}"])
    assert target["step"] == steps - 1


# -- Lightning and the Trainer: the node is lost right after every save returns --------------------

def run_losing_the_node_after_each_save(kind: str, node, factory, tmp_path, saves: int) -> list[float]:
    """Run ``kind``'s training loop in a process of its own on ``node``; after each save returns,
    lose the node and replace it (same mountpoint, empty cache dir). Returns the waits for S3."""
    control = tmp_path / f"control-{kind}"
    control.mkdir()
    worker = subprocess.Popen([sys.executable, str(Path(workers.__file__)), kind, str(node.path / "run"),
                               str(control), str(saves)], cwd=Path(workers.__file__).parent,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for count in range(saves):
            wait_for(lambda: (control / f"saved_{count}").exists() or worker.poll() is not None,
                     timeout=300, interval=0.02)
            assert (control / f"saved_{count}").exists(), worker.communicate(timeout=30)[0][-4000:]
            lose_and_replace(node, factory)
            (control / f"go_{count}").touch()
        output = worker.communicate(timeout=300)[0]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, output[-4000:]
    return json.loads((control / "waits.json").read_text())


def test_lightning_durable_checkpoint_io_loses_no_checkpoint_with_the_node(bucket, mount_factory, s3, tmp_path):
    """10 epochs, a 12 MiB checkpoint each through DurableCheckpointIO; the node is lost right after
    each save returns. From a fresh mount every checkpoint is there, whole, and loads."""
    import torch

    pytest.importorskip("lightning")
    node = mount_factory(bucket, "job")
    waits = run_losing_the_node_after_each_save("lightning", node, mount_factory, tmp_path, 10)
    print(f"Lightning DurableCheckpointIO waits for S3 (s): {[round(w, 2) for w in waits]}")
    fresh = mount_factory(bucket, "job")
    names = sorted(os.listdir(fresh.path / "run"))
    assert len([name for name in names if name.endswith(".ckpt")]) == 10, names
    for name in names:
        checkpoint = torch.load(fresh.path / "run" / name, weights_only=False)
        assert checkpoint["state_dict"]["big"].numel() == 3 * 1024 * 1024, name


def test_trainer_complete_checkpoints_never_marks_a_checkpoint_missing_a_file(bucket, mount_factory, s3, tmp_path):
    """10 steps, a checkpoint each with CompleteCheckpoints; the node is lost right after each on_save.
    From a fresh mount every checkpoint is marked complete and holds every file the Trainer writes,
    and latest_complete_checkpoint finds the newest."""
    pytest.importorskip("transformers")
    from s3ckptfs.integrations.transformers import COMPLETE_MARKER, latest_complete_checkpoint

    node = mount_factory(bucket, "job")
    waits = run_losing_the_node_after_each_save("transformers", node, mount_factory, tmp_path, 10)
    print(f"Trainer CompleteCheckpoints waits for S3 (s): {[round(w, 2) for w in waits]}")
    fresh = mount_factory(bucket, "job")
    run = fresh.path / "run"
    marked = sorted(name for name in os.listdir(run) if (run / name / COMPLETE_MARKER).is_file())
    assert len(marked) == 10, sorted(os.listdir(run))
    for name in marked:
        files = set(os.listdir(run / name))
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= files, (name, files)
        assert (run / name / "optimizer.pt").stat().st_size > 20 * MiB
    assert latest_complete_checkpoint(run) == str(run / "checkpoint-10")


def trainer_checkpoints_missing_a_rank(run: Path) -> list[str]:
    """Checkpoints whose trainer_state.json is in S3 while a rank's rng_state_<r>.pth is not."""
    torn = []
    for name in sorted(os.listdir(run)):
        files = set(os.listdir(run / name))
        if "trainer_state.json" in files and not {"rng_state_0.pth", "rng_state_1.pth"} <= files:
            torn.append(name)
    return torn


def test_trainer_on_two_nodes_marks_only_checkpoints_every_rank_finished_and_resumes_from_the_newest(
        bucket, mount_factory, s3, tmp_path):
    """A 2-rank Trainer (DDP over gloo), each rank's output_dir on its own node's mount, 10 steps with
    a checkpoint each and CompleteCheckpoints; node 1 (rank 1 writes rng_state_1.pth into every
    checkpoint) is lost right after each save. From a fresh mount: every checkpoint is marked
    complete and holds both ranks' files; a real Trainer resumes from latest_complete_checkpoint."""
    pytest.importorskip("transformers")
    from s3ckptfs.integrations.transformers import COMPLETE_MARKER, latest_complete_checkpoint

    steps = 10
    nodes = [mount_factory(bucket, "job"), mount_factory(bucket, "job")]
    control = tmp_path / "control"
    control.mkdir()
    mode = os.environ.get("S3CKPTFS_TEST_TRAINER_MODE", "complete")  # "stock": no s3ckptfs callback
    run_ranks_losing_node_1(workers.trainer_ranks_loop, nodes, mount_factory, steps, control, mode)

    fresh = mount_factory(bucket, "job")
    run = fresh.path / "run"
    torn = trainer_checkpoints_missing_a_rank(run)
    print(f"Trainer checkpoints missing rank 1's file ({mode}): {len(torn)} of {steps}: {torn}")
    assert torn == []
    marked = sorted(name for name in os.listdir(run) if (run / name / COMPLETE_MARKER).is_file())
    assert len(marked) == steps, sorted(os.listdir(run))
    newest = latest_complete_checkpoint(run)
    assert newest == str(run / f"checkpoint-{steps}")
    resumed = subprocess.run([sys.executable, str(Path(workers.__file__)), "resume", str(tmp_path / "resumed"),
                              newest, str(steps + 2)], cwd=Path(workers.__file__).parent,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == {"trained": 2}  # steps 11 and 12 only
