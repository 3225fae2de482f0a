"""``s3ckptfs mount`` refuses bad input cleanly.

Contract: a non-zero exit, exactly one line on stderr that starts with
``s3ckptfs: error: `` and names the cause, and nothing left mounted or running.
The keywords accepted for each cause are deliberately loose: the wording is
the daemon's to choose, the cause is not.

Refusals that come before the daemon would talk to S3 (malformed URL, options,
config file, mountpoint, cache dir) are checked in process, without a server:
test_config_inproc.py. Here are the ones that need the server or a live mount.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from typing import Any

import pytest

from conftest import CliResult, Mount, MountFactory, is_daemon, mounted_paths, read_pid
from s3ckptfs import devserver

pytestmark = pytest.mark.timeout(180)

PREFIX = "s3ckptfs: error: "


def attempt(mount: Mount) -> CliResult:
    """Run the mount command of ``mount`` and check that it left nothing behind."""
    result = mount.start(check=False)
    assert not mount.mounted, f"{mount.path} is mounted after a failed mount\n{result.describe()}"
    # Only this test's directory: other test sessions may mount elsewhere meanwhile.
    base = str(mount.factory.base) + os.sep
    stray = sorted(path for path in mounted_paths() if path.startswith(base))
    assert not stray, f"mounts left under the test dir: {stray}\n{result.describe()}"
    pid = read_pid(mount.cache_dir)
    assert pid is None or not is_daemon(pid, mount.cache_dir), f"daemon {pid} still running\n{result.describe()}"
    return result


def assert_error(result: CliResult, keywords: Iterable[str]) -> str:
    """The run failed with one ``s3ckptfs: error:`` line mentioning one of ``keywords``."""
    assert result.returncode != 0, f"expected a failure\n{result.describe()}"
    lines = result.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0], f"expected exactly one line on stderr\n{result.describe()}"
    line = lines[0]
    assert line.startswith(PREFIX), f"stderr must start with {PREFIX!r}\n{result.describe()}"
    words = list(keywords)
    assert any(word.lower() in line.lower() for word in words), (
        f"the message should mention one of {words}\n{result.describe()}")
    return line


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bucket_missing(mount_factory: MountFactory, bucket: str) -> None:
    """A well-formed URL naming a bucket that does not exist."""
    missing = bucket + "-missing"
    result = attempt(mount_factory.new(missing, "ckpt"))
    assert_error(result, ["bucket", missing])


def test_wrong_secret(mount_factory: MountFactory, bucket: str) -> None:
    """A known access key with the wrong secret."""
    mount = mount_factory.new(bucket, env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert_error(attempt(mount), ["credential", "signature", "access", "denied", "auth"])


def test_unknown_access_key(mount_factory: MountFactory, bucket: str) -> None:
    """An access key the server does not know."""
    mount = mount_factory.new(bucket, env={"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "nothing"})
    assert_error(attempt(mount), ["credential", "key", "access", "denied", "auth"])


def test_no_credentials(mount_factory: MountFactory, bucket: str) -> None:
    """No credentials anywhere in boto3's chain."""
    mount = mount_factory.new(bucket, env={"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None})
    assert_error(attempt(mount), ["credential"])


def test_not_allowed(mount_factory: MountFactory, bucket: str, s3: Any, reader_s3: Any) -> None:
    """Valid credentials of an identity that may not list the bucket."""
    policy = {
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Deny",
            "Principal": "*",
            "Action": ["s3:*"],
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            "Condition": {"StringNotEquals": {"aws:username": "admin"}},
        }],
    }
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    with pytest.raises(Exception, match="AccessDenied|Forbidden|403"):
        reader_s3.list_objects_v2(Bucket=bucket)  # the premise: the server denies the listing
    mount = mount_factory.new(bucket, env={"AWS_ACCESS_KEY_ID": devserver.READER_KEY,
                                           "AWS_SECRET_ACCESS_KEY": devserver.READER_SECRET})
    assert_error(attempt(mount), ["access", "denied", "permission", "forbidden", "allowed"])


def test_endpoint_unreachable(mount_factory: MountFactory, bucket: str) -> None:
    """An endpoint URL where nothing listens."""
    port = free_port()
    mount = mount_factory.new(bucket, endpoint_url=f"http://127.0.0.1:{port}",
                              env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    assert_error(attempt(mount), ["endpoint", "connect", "reach", str(port)])


def test_mountpoint_already_mounted(mount_factory: MountFactory, bucket: str) -> None:
    """A second mount on a live s3ckptfs mount point; the first one keeps working."""
    first = mount_factory(bucket, "ckpt")
    second = mount_factory.new(bucket, "other", mountpoint=first.path)
    result = second.start(check=False)
    assert_error(result, ["already mounted", "already"])
    assert first.mounted, "the first mount must survive a refused second mount"
    pid = read_pid(second.cache_dir)
    assert pid is None or not is_daemon(pid, second.cache_dir), f"second daemon {pid} still running"
    (first.path / "alive.txt").write_text("still here\n")
    assert (first.path / "alive.txt").read_text() == "still here\n"


def test_cache_dir_in_use(mount_factory: MountFactory, bucket: str) -> None:
    """A cache dir already used by a running daemon (the lock keeps a second one off)."""
    first = mount_factory(bucket, "ckpt")
    second = mount_factory.new(bucket, "ckpt", cache_dir=first.cache_dir)
    result = second.start(check=False)
    assert_error(result, ["cache", "lock", "in use"])
    assert not second.mounted
    assert first.mounted and is_daemon(first.pid or -1, first.cache_dir), "the first daemon must keep running"
