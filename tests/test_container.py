"""The container image, run with podman the way the Kubernetes DaemonSet runs the pod.

Privileged, ``/dev/fuse``, host network, the host's directory bind-mounted
``rshared`` (Bidirectional propagation) with the mount in a subdirectory, the cache dir and ``/run/s3ckptfs``
from the host, the TOML config mounted read-only. Checked: the mount appears
on the host, a checkpoint written on the host lands in S3 (and the host's
``s3ckptfs.sync`` finds the container's daemon), ``podman stop`` drains an
upload still in flight, and a new container on the same cache dir resumes an
upload that ``podman kill`` cut.

The image is built once by deploy/container/build.sh and found again by its
content hash; without podman, mmdebstrap or root the tests are skipped with
the reason.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

import s3ckptfs
from conftest import get_bytes, is_mounted, list_keys, wait_for
from faultproxy import healing_proxy, running_proxy

running_proxy = pytest.fixture(running_proxy)
fault_proxy = pytest.fixture(healing_proxy, name="fault_proxy")

pytestmark = pytest.mark.fuse

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "deploy" / "container" / "build.sh"
# The pod propagates a directory and mounts in a subdirectory of it: the daemon refuses a
# mountpoint that is already a mount, which the bind mount of the host path itself would be.
PROPAGATED = "/mnt/s3ckptfs"
CONTAINER_MOUNTPOINT = f"{PROPAGATED}/ckpt"
RUNTIME = "runc"
MiB = 1 << 20


def _own_limits() -> dict[str, tuple[int, int]]:
    """This process's nofile and nproc limits (soft, hard), where they are finite."""
    labels = {"Max open files": "nofile", "Max processes": "nproc"}
    found = {}
    with open("/proc/self/limits") as limits:
        for line in limits:
            for label, name in labels.items():
                if line.startswith(label):
                    soft, hard = line[len(label):].split()[:2]
                    if soft.isdigit() and hard.isdigit():
                        found[name] = (int(soft), int(hard))
    return found


def _ulimit_candidates() -> list[list[str]]:
    """--ulimit flags to try, best first. podman's default limits may be above what this host
    lets a process set without CAP_SYS_RESOURCE (runc then fails with "error setting rlimit"):
    the host's own values, then lower process limits."""
    own = _own_limits()
    candidates = [["--ulimit", "host"]]
    nofile = own.get("nofile", (1024, 1024))
    nproc = own.get("nproc", (32768, 32768))[1]
    while nproc >= 1024:
        candidates.append(["--ulimit", f"nofile={nofile[0]}:{nofile[1]}", "--ulimit", f"nproc={nproc}:{nproc}"])
        nproc //= 2
    return candidates


LIMITS: list[str] = []  # the flags that worked, found by the image fixture


def _limits() -> list[str]:
    return LIMITS


def podman(*args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", "--runtime", RUNTIME, *args], capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


@pytest.fixture(scope="session")
def image() -> str:
    """The s3ckptfs image, built (or found by content hash) by deploy/container/build.sh."""
    if os.geteuid() != 0:
        pytest.skip("the pod lifecycle test runs podman as root")
    for tool in ("podman", "mmdebstrap"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install podman mmdebstrap runc)")
    started = time.monotonic()
    built = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=1200)
    if built.returncode != 0:
        pytest.skip(f"the image could not be built here: {built.stderr.strip()[-800:]}")
    name = built.stdout.strip().splitlines()[-1]
    print(f"image {name} ready in {time.monotonic() - started:.1f}s")
    for flags in _ulimit_candidates():
        probe = podman("run", "--rm", *flags, name, "true", check=False, timeout=120)
        if probe.returncode == 0:
            LIMITS[:] = flags
            return name
    pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-500:]}")


@pytest.fixture
def host_dir(tmp_path: Path):
    """A directory on a shared mount (the host's side of Bidirectional propagation)."""
    base = tmp_path / "host"
    base.mkdir()
    subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
    subprocess.run(["mount", "--make-rshared", str(base)], check=True)
    try:
        yield base
    finally:
        mountpoint = base / "ckpt"
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        subprocess.run(["umount", "-l", str(base)], check=False)


class Pod:
    """Containers of one test, run like the DaemonSet's pod; all removed at the end."""

    def __init__(self, image: str, host: Path, bucket: str, endpoint: str, env: dict[str, str]) -> None:
        self.image = image
        self.host = host
        self.mountpoint = host / "ckpt"
        self.cache = host.parent / "cache"  # the node's cache dir, outside the propagated tree
        self.mountpoint.mkdir()
        self.cache.mkdir()
        self.config = host.parent / "config.toml"
        self.config.write_text(f'source = "s3://{bucket}/pod"\nmountpoint = "{CONTAINER_MOUNTPOINT}"\n'
                               f'cache_dir = "/var/cache/s3ckptfs"\nendpoint_url = "{endpoint}"\n'
                               'log_level = "debug"\n\n[options]\ndrain_timeout = 120\n')
        self.env = env
        self.names: list[str] = []

    def start(self) -> str:
        name = f"s3ckptfs-test-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        env_flags = [flag for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
                     for flag in ("-e", f"{key}={self.env[key]}")]
        podman("run", "-d", "--name", name, "--privileged", "--device", "/dev/fuse", "--network", "host",
               *_limits(), *env_flags,
               "-v", f"{self.host}:{PROPAGATED}:rshared",
               "-v", f"{self.cache}:/var/cache/s3ckptfs",
               "-v", "/run/s3ckptfs:/run/s3ckptfs",
               "-v", f"{self.config}:/etc/s3ckptfs/config.toml:ro",
               self.image)
        try:
            wait_for(self._live, timeout=60, interval=0.2)
        except TimeoutError:
            pytest.fail(f"the mount did not appear on the host:\n{self.logs(name)}")
        return name

    def _live(self) -> bool:
        """Mounted and answering (a dead mount left by a killed container answers ENOTCONN)."""
        if not is_mounted(self.mountpoint):
            return False
        try:
            os.stat(self.mountpoint)
        except OSError:
            return False
        return True

    def logs(self, name: str) -> str:
        return podman("logs", name, check=False).stderr[-4000:]

    def exit_code(self, name: str) -> int:
        return int(podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip())

    def remove_all(self) -> None:
        for name in self.names:
            podman("rm", "-f", "-t", "5", name, check=False)


@pytest.fixture
def pod(image, host_dir, bucket, s3server, fault_proxy):
    made = Pod(image, host_dir, bucket, fault_proxy.url, s3server.env())
    try:
        yield made
    finally:
        fault_proxy.passthrough()
        made.remove_all()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_pod_mounts_on_the_host_and_stop_drains(pod, fault_proxy, s3, bucket):
    name = pod.start()
    (pod.mountpoint / "step_1.pt").write_bytes(b"first checkpoint")
    s3ckptfs.sync(pod.mountpoint / "step_1.pt", timeout=60)  # the host finds the container's daemon
    assert get_bytes(s3, bucket, "pod/step_1.pt") == b"first checkpoint"
    ready = podman("exec", name, "/usr/local/bin/s3ckptfs-entrypoint", "ready", check=False)
    assert ready.returncode == 0, ready.stderr  # the DaemonSet's readiness probe

    fault_proxy.delay(40)
    payload = os.urandom(24 * MiB)
    (pod.mountpoint / "step_2.pt").write_bytes(payload)
    assert "pod/step_2.pt" not in list_keys(s3, bucket, "pod/"), "uploaded before the stop: no drain to test"
    started = time.monotonic()
    podman("stop", "-t", "150", name, timeout=200)
    took = time.monotonic() - started
    assert pod.exit_code(name) == 0, pod.logs(name)
    assert sha256(get_bytes(s3, bucket, "pod/step_2.pt")) == sha256(payload), pod.logs(name)
    assert not is_mounted(pod.mountpoint)
    assert "pending upload" in pod.logs(name)
    print(f"podman stop drained a 24 MiB upload in {took:.1f}s")


def test_new_pod_resumes_an_upload_a_kill_cut(pod, fault_proxy, s3, bucket):
    first = pod.start()
    fault_proxy.delay(40)
    payload = os.urandom(24 * MiB)
    (pod.mountpoint / "cut.pt").write_bytes(payload)
    podman("kill", first)
    assert "pod/cut.pt" not in list_keys(s3, bucket, "pod/")
    with pytest.raises(OSError) as dead:
        os.stat(pod.mountpoint)
    assert dead.value.errno == errno.ENOTCONN
    fault_proxy.passthrough()

    # The dead mount is still on the host (ENOTCONN); the new daemon clears it and mounts again.
    second = pod.start()
    try:
        wait_for(lambda: "pod/cut.pt" in list_keys(s3, bucket, "pod/"), timeout=90, interval=0.5)
    except TimeoutError:
        pytest.fail(f"the interrupted upload was not resumed:\n{pod.logs(second)}")
    assert sha256(get_bytes(s3, bucket, "pod/cut.pt")) == sha256(payload)
    assert "1 upload(s) resumed" in pod.logs(second)
    assert (pod.mountpoint / "cut.pt").stat().st_size == len(payload)
    podman("stop", "-t", "150", second, timeout=200)
    assert pod.exit_code(second) == 0, pod.logs(second)
