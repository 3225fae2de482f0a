"""Uploads through a faulty network: resets, an outage, 503 storms, a server that refuses.

Every test mounts through ``FaultProxy`` (tests/faultproxy.py) and checks S3
directly (not through the proxy): the object arrives byte-identical, or it is
reported as failed with its data kept in the cache; and no multipart upload is
left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import threading
import time

import boto3
import botocore.config
import botocore.exceptions
import pytest

from conftest import Mount, run_cli, wait_for
from faultproxy import healing_proxy, running_proxy

MiB = 1 << 20

running_proxy = pytest.fixture(running_proxy)
fault_proxy = pytest.fixture(healing_proxy, name="fault_proxy")


# -- helpers shared with test_crash.py -------------------------------------------------

def write_random(f, size: int, chunk: int = 4 * MiB) -> str:
    """Write ``size`` random bytes to the open file ``f`` in ``chunk`` pieces; return their sha256."""
    digest = hashlib.sha256()
    for start in range(0, size, chunk):
        data = os.urandom(min(chunk, size - start))
        f.write(data)
        digest.update(data)
    return digest.hexdigest()


def s3_sha256(s3, bucket: str, key: str) -> str | None:
    """sha256 of an object's body (streamed), or None if it does not exist."""
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except s3.exceptions.NoSuchKey:
        return None
    digest = hashlib.sha256()
    for piece in body.iter_chunks(8 * MiB):
        digest.update(piece)
    return digest.hexdigest()


def object_exists(s3, bucket: str, key: str) -> bool:
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError:
        return False
    return True


def multipart_uploads(s3, bucket: str) -> list[tuple[str, str]]:
    """(key, upload id) of every multipart upload in progress in ``bucket``."""
    return [(u["Key"], u["UploadId"]) for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def parts_done(s3, bucket: str, key: str) -> int:
    """Parts uploaded so far, over every multipart upload of ``key``."""
    return sum(len(s3.list_parts(Bucket=bucket, Key=k, UploadId=u).get("Parts", []))
               for k, u in multipart_uploads(s3, bucket) if k == key)


def assert_no_orphan_uploads(s3, bucket: str, timeout: float = 10.0) -> None:
    """No multipart upload is left in ``bucket`` (background aborts get ``timeout`` seconds)."""
    try:
        wait_for(lambda: not multipart_uploads(s3, bucket), timeout=timeout, interval=0.5)
    except TimeoutError:
        pytest.fail(f"orphan multipart uploads after {timeout:.0f}s: {multipart_uploads(s3, bucket)}")


def status(mount: Mount) -> dict:
    """``s3ckptfs status MOUNTPOINT --json``, parsed."""
    result = run_cli(["status", str(mount.path), "--json"], mount.env, timeout=60)
    assert result.returncode == 0, result.describe()
    return json.loads(result.stdout)


def status_of(mount: Mount, relpath: str) -> dict | None:
    """The status entry of one file, or None if it is not pending or failed."""
    wanted = "/" + relpath.strip("/")
    return next((item for item in status(mount)["pending"] if item["path"] == wanted), None)


def journal_records(mount: Mount) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((mount.cache_dir / "journal").glob("*.json"))]


# -- the proxy itself ----------------------------------------------------------------------

def test_proxy_modes(fault_proxy, s3server, bucket):
    """Each mode does what it says, seen by a client without retries."""
    client = boto3.client(
        "s3", endpoint_url=fault_proxy.url, aws_access_key_id=s3server.env()["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3server.env()["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
        config=botocore.config.Config(retries={"mode": "standard", "max_attempts": 1},
                                      s3={"addressing_style": "path"}, connect_timeout=5, read_timeout=10))
    client.put_object(Bucket=bucket, Key="a", Body=b"x" * 1000)

    def error_code(call) -> str:
        with pytest.raises((botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)) as info:
            call()
        if isinstance(info.value, botocore.exceptions.ClientError):
            return info.value.response["Error"]["Code"]
        return type(info.value).__name__

    fault_proxy.slowdown(1.0)
    assert error_code(lambda: client.get_object(Bucket=bucket, Key="a")) == "SlowDown"
    assert error_code(lambda: client.head_object(Bucket=bucket, Key="a")) == "503"
    fault_proxy.deny()
    assert error_code(lambda: client.put_object(Bucket=bucket, Key="b", Body=b"y" * 2 * MiB)) == "AccessDenied"
    fault_proxy.deny(match=r"^PUT ")
    assert client.get_object(Bucket=bucket, Key="a")["Body"].read() == b"x" * 1000
    fault_proxy.reset(after_bytes=MiB)
    client.put_object(Bucket=bucket, Key="small", Body=b"z" * 1000)
    assert error_code(lambda: client.put_object(Bucket=bucket, Key="b", Body=b"y" * 4 * MiB)) in (
        "ConnectionClosedError", "EndpointConnectionError", "ReadTimeoutError")
    assert fault_proxy.stats["resets"] >= 1
    fault_proxy.down()
    assert error_code(lambda: client.head_object(Bucket=bucket, Key="a")) in (
        "ConnectionClosedError", "EndpointConnectionError")
    fault_proxy.delay(20)
    started = time.monotonic()
    assert client.get_object(Bucket=bucket, Key="a")["Body"].read() == b"x" * 1000
    assert time.monotonic() - started >= 0.04
    fault_proxy.passthrough()
    client.put_object(Bucket=bucket, Key="b", Body=b"y" * 4 * MiB)
    assert client.get_object(Bucket=bucket, Key="b")["Body"].read() == b"y" * 4 * MiB
    assert "b" not in [k for k, _ in multipart_uploads(client, bucket)]
    client.close()


# -- scenarios through a mount -------------------------------------------------------------

def test_resets_during_part_uploads(fault_proxy, bucket, mount_factory, s3):
    """Connections cut in the middle of part uploads: the object still arrives whole."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url)
    fault_proxy.reset(after_bytes=MiB, every=2)
    with open(mount.path / "ckpt.pt", "wb") as f:
        digest = write_random(f, 40 * MiB)
    (mount.path / "latest").write_text("ckpt.pt")
    mount.sync()
    assert fault_proxy.stats["resets"] >= 2, f"the proxy cut too few uploads: {fault_proxy.stats}"
    assert s3_sha256(s3, bucket, mount.key("ckpt.pt")) == digest
    assert s3.get_object(Bucket=bucket, Key=mount.key("latest"))["Body"].read() == b"ckpt.pt"
    assert_no_orphan_uploads(s3, bucket)


@pytest.mark.parametrize("checksums", ["true", "false"])
def test_damaged_bodies_are_refused_and_sent_again(fault_proxy, bucket, mount_factory, s3, checksums):
    """Bytes flipped in transit: the server refuses the body and it is sent again.

    Bodies go out as UNSIGNED-PAYLOAD: the CRC32C each part and PUT carries catches
    the damage, or with checksums=false their Content-MD5 (SeaweedFS does not check
    the payload SHA-256 of a signature, so that would not).
    """
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options={"checksums": checksums})
    fault_proxy.corrupt(every=2, match=r"^PUT ")
    with open(mount.path / "ckpt.pt", "wb") as f:
        digest = write_random(f, 40 * MiB)
    (mount.path / "latest").write_bytes(b"ckpt.pt")
    mount.sync()
    assert fault_proxy.stats["corrupted"] >= 2, f"the proxy damaged too few bodies: {fault_proxy.stats}"
    assert s3_sha256(s3, bucket, mount.key("ckpt.pt")) == digest
    assert s3.get_object(Bucket=bucket, Key=mount.key("latest"))["Body"].read() == b"ckpt.pt"
    fault_proxy.passthrough()
    assert_no_orphan_uploads(s3, bucket)


OUTAGE = 30.0


def test_server_down_mid_checkpoint(fault_proxy, bucket, mount_factory, s3):
    """S3 unreachable for 30 s while a checkpoint is written: it arrives once S3 is back.

    Closed data is retried without limit in time: during the outage the file
    stays pending (never failed), and it reaches S3 after the outage without
    anyone calling sync.
    """
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url)
    key = mount.key("step_10.pt")
    digest = hashlib.sha256()
    with open(mount.path / "step_10.pt", "wb") as f:
        for i in range(12):  # 48 MiB: parts upload while it is written
            data = os.urandom(4 * MiB)
            f.write(data)
            digest.update(data)
            if i == 5:
                f.flush()
                wait_for(lambda: multipart_uploads(s3, bucket), timeout=30)
                fault_proxy.down()
                down_since = time.monotonic()
    states = []
    while time.monotonic() - down_since < OUTAGE:
        entry = status_of(mount, "step_10.pt")
        states.append(entry and entry["state"])
        time.sleep(2)
    assert not object_exists(s3, bucket, key), "an object appeared while S3 was unreachable"
    fault_proxy.passthrough()
    up_since = time.monotonic()
    assert "failed" not in states, f"the daemon gave up during a {OUTAGE:.0f}s outage: {states}"
    assert states and all(state in ("pending", "retrying") for state in states), \
        f"status should show the file pending or retrying during the outage: {states}"
    try:
        wait_for(lambda: object_exists(s3, bucket, key), timeout=90, interval=0.5)
    except TimeoutError:
        pytest.fail(f"not in S3 90s after the outage ended, without sync; status: {status(mount)}")
    arrived_after = time.monotonic() - up_since
    mount.sync()
    assert s3_sha256(s3, bucket, key) == digest.hexdigest()
    assert_no_orphan_uploads(s3, bucket)
    assert arrived_after < 60, f"arrived {arrived_after:.0f}s after S3 came back"


@pytest.mark.parametrize("change", ["rename", "unlink"])
def test_an_upload_s3_keeps_refusing_stalls_nothing_else(fault_proxy, bucket, mount_factory, s3, change):
    """While the PUT of a closed file is refused and retried, and a rename or unlink of that file
    waits for it (the kernel holds the file's directory meanwhile), the rest of the mount answers
    at once: lookups, listings, other files written, read and uploaded. (The request used to hold
    the file's lock, and the release of the file then held up every operation of the mount.)
    Once S3 answers, the rename or unlink completes as if it came after the upload."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url)
    (mount.path / "elsewhere").mkdir()
    fault_proxy.slowdown(1.0, match=r"^PUT ")
    (mount.path / "latest").write_text("step-1")
    wait_for(lambda: fault_proxy.stats["errors"] >= 1, timeout=30, interval=0.1)
    if change == "rename":
        changer = threading.Thread(target=os.rename, args=(mount.path / "latest", mount.path / "kept"), daemon=True)
    else:
        changer = threading.Thread(target=os.unlink, args=(mount.path / "latest",), daemon=True)
    changer.start()
    time.sleep(0.5)
    done: list[str] = []

    def other_work() -> None:
        other = mount.path / "elsewhere"
        assert not (other / "absent.py").exists()
        assert os.listdir(other) == []
        (other / "other.pt").write_bytes(b"x" * 1000)
        assert (other / "other.pt").read_bytes() == b"x" * 1000
        done.append("ok")

    worker = threading.Thread(target=other_work, daemon=True)
    worker.start()
    worker.join(timeout=15)  # botocore alone retries the refused PUT for longer than this
    assert done == ["ok"], f"the mount stalled behind a refused upload: {status(mount)}"
    fault_proxy.passthrough()
    changer.join(timeout=120)
    assert not changer.is_alive()
    mount.sync()
    assert not object_exists(s3, bucket, mount.key("latest"))
    if change == "rename":
        assert s3.get_object(Bucket=bucket, Key=mount.key("kept"))["Body"].read() == b"step-1"
    assert s3.get_object(Bucket=bucket, Key=mount.key("elsewhere/other.pt"))["Body"].read() == b"x" * 1000


def test_slowdown_storm(fault_proxy, bucket, mount_factory, s3):
    """Half of all requests answered 503 SlowDown: every file still arrives, in close order."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url)
    fault_proxy.slowdown(0.5)
    digests = {}
    for name, size in (("model.pt", 40 * MiB), ("optim.pt", 24 * MiB), ("small.pt", 1 * MiB)):
        with open(mount.path / name, "wb") as f:
            digests[name] = write_random(f, size)
    (mount.path / "latest").write_text("step")
    mount.sync()
    assert fault_proxy.stats["errors"] >= 5, fault_proxy.stats
    for name, digest in digests.items():
        assert s3_sha256(s3, bucket, mount.key(name)) == digest, name
    assert s3.get_object(Bucket=bucket, Key=mount.key("latest"))["Body"].read() == b"step"
    fault_proxy.passthrough()
    assert_no_orphan_uploads(s3, bucket)


def check_failed_and_kept(mount: Mount, s3, relpath: str, size: int) -> None:
    """``relpath`` is not in S3, is reported failed (sync and status), and its data is in the cache."""
    key = mount.key(relpath)
    try:
        entry = wait_for(lambda: (e := status_of(mount, relpath)) and e["state"] == "failed" and e,
                         timeout=60, interval=0.5)
    except TimeoutError:
        pytest.fail(f"not reported failed within 60s: {status(mount)}")
    assert "AccessDenied" in (entry["error"] or ""), entry
    result = mount.sync(check=False)
    assert result.returncode != 0, result.describe()
    assert "/" + relpath in result.stderr and "AccessDenied" in result.stderr, result.describe()
    assert not object_exists(s3, mount.bucket, key)
    records = [r for r in journal_records(mount) if r["key"] == key]
    assert len(records) == 1, journal_records(mount)
    staging = mount.cache_dir / "staging" / f"{records[0]['id']}.data"
    assert staging.stat().st_size == size


@pytest.mark.parametrize("recovery", ["sync", "remount"])
def test_refusing_server_keeps_data_then_recovers(fault_proxy, bucket, mount_factory, s3, recovery):
    """AccessDenied on every request: fsync fails, the data stays in the cache and is reported
    failed; once S3 accepts again, ``sync`` (or a restart on the same cache dir) uploads it."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url)
    size = 24 * MiB
    with open(mount.path / "denied.pt", "wb") as f:
        fault_proxy.deny()
        digest = write_random(f, size)
        f.flush()
        with pytest.raises(OSError) as info:
            os.fsync(f.fileno())
        assert info.value.errno in (errno.EACCES, errno.EIO), info.value
    check_failed_and_kept(mount, s3, "denied.pt", size)
    fault_proxy.passthrough()
    if recovery == "remount":
        mount.unmount(force=True)
        mount.remount()
        try:
            wait_for(lambda: object_exists(s3, bucket, mount.key("denied.pt")), timeout=60, interval=0.5)
        except TimeoutError:
            pytest.fail(f"not uploaded within 60s of the restart: {status(mount)}")
    mount.sync()
    assert s3_sha256(s3, bucket, mount.key("denied.pt")) == digest
    assert status_of(mount, "denied.pt") is None
    assert not journal_records(mount)
    assert_no_orphan_uploads(s3, bucket)


def test_refusing_server_fails_sync_mode_close(fault_proxy, bucket, mount_factory, s3):
    """With ``write_mode=sync``, close itself reports the refusal; the data is still kept."""
    mount = mount_factory(bucket, "p", endpoint_url=fault_proxy.url, options={"write_mode": "sync"})
    size = 12 * MiB
    f = open(mount.path / "denied.pt", "wb")
    fault_proxy.deny()
    try:
        digest = write_random(f, size)
    finally:
        with pytest.raises(OSError) as info:
            f.close()
    assert info.value.errno in (errno.EACCES, errno.EIO), info.value
    check_failed_and_kept(mount, s3, "denied.pt", size)
    fault_proxy.passthrough()
    mount.sync()
    assert s3_sha256(s3, bucket, mount.key("denied.pt")) == digest
    assert_no_orphan_uploads(s3, bucket)
