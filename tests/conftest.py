"""Shared fixtures: a local S3 server, fresh buckets and real FUSE mounts; in-process mounts.

The S3 server (SeaweedFS, see ``s3ckptfs.devserver``) lives for the whole
session. Each mount runs the real command line in background mode, exactly as
a user would, and is always torn down: ``fusermount3 -u``, then ``-uz`` if the
mount is still there, then the daemon is stopped by the pid it wrote into its
cache directory. A test that leaves a mount behind still passes, but a
teardown that had to force anything fails with the tail of the daemon log.

All command-line runs write their output to files, not pipes, so that a
daemon which keeps an inherited descriptor open cannot hang the test.

Every test that uses the server (the ``s3server`` fixture, directly or through
another fixture) is marked ``fuse``: ``-m "not fuse"`` selects the in-process
layer, which needs neither root, FUSE nor SeaweedFS (``inproc`` fixture, see
inproc.py and fakestore.py).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# -- lock-order checking, part 1 of 2 (part 2, the fixtures, is at the end) ------------------
# Before anything imports s3ckptfs: every lock made in this process is checked
# (s3ckptfs/locks.py), and every daemon or command the tests start inherits the setting
# through cli_env.
os.environ["S3CKPTFS_LOCK_CHECK"] = "1"
# --------------------------------------------------------------------------------------------

from s3ckptfs import devserver, locks  # noqa: E402 - after the lock check is switched on
# The mount and daemon-process helpers are the package's own, importable from here too.
from s3ckptfs.mounts import (LOG_FILE, PID_FILE, is_mounted, mounted_paths, pid_alive, read_pid,  # noqa: E402,F401
                             unmount, unmount_until_gone, wait_gone)

MOUNT_TIMEOUT = 60.0
SYNC_TIMEOUT = 300.0
UNMOUNT_TIMEOUT = 300.0
DAEMON_EXIT_TIMEOUT = 15.0
LOG_TAIL_LINES = 60

_counter = itertools.count()


# --------------------------------------------------------------------------
# Plain helpers (importable from tests as ``from conftest import ...``)
# --------------------------------------------------------------------------

def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises ``TimeoutError`` if it is still falsy after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition not met within {timeout:.1f}s: {predicate!r}")
        time.sleep(interval)


def list_keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    """All object keys in ``bucket`` under ``prefix``, sorted."""
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


def get_bytes(s3: Any, bucket: str, key: str) -> bytes:
    """The whole body of one object."""
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def is_daemon(pid: int, cache_dir: Path | None = None) -> bool:
    """Whether ``pid`` is a live s3ckptfs process (of ``cache_dir``, if given).

    pid_max may be as low as 32768, so a pid recorded earlier can belong to another
    test's daemon by now: with ``cache_dir``, only a process holding a file in that
    cache dir (its log or lock) counts.
    """
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if b"s3ckptfs" not in cmdline:
        return False
    if cache_dir is None:
        return True
    inside = str(cache_dir).rstrip("/") + "/"
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(inside):
                return True
        except OSError:
            continue
    return False


def assert_enospc_left_nothing(mount: Mount, s3: Any, bucket: str) -> None:
    """After a writer's ENOSPC: no object and no multipart upload in S3, and the mount still works."""
    mount.sync()
    time.sleep(0.5)
    assert list_keys(s3, bucket, mount.key("")) == []
    wait_for(lambda: not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"), timeout=30)
    (mount.path / "ok.bin").write_bytes(b"fine")
    mount.sync()
    assert get_bytes(s3, bucket, mount.key("ok.bin")) == b"fine"


def scrape_metrics(port: int) -> dict[str, float]:
    """The daemon's Prometheus metrics on ``port``: sample name (with labels) -> value."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


@contextlib.contextmanager
def tmpfs_dir(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (a small disk that fills up); root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def log_tail(cache_dir: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of the daemon log in ``cache_dir``."""
    try:
        text = (cache_dir / LOG_FILE).read_text(errors="replace")
    except OSError as exc:
        return f"(no daemon log: {exc})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class CliResult:
    """Outcome of one command-line run."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"$ {' '.join(self.args)}\nexit {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}")


def cli_env(server: devserver.SeaweedServer,
            overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """A hermetic environment for the CLI: no host AWS settings, the test server's credentials.

    An override of ``None`` removes that variable.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update(server.env())
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def run_cli(args: Iterable[str], env: Mapping[str, str], timeout: float = 120.0,
            cwd: Path | None = None) -> CliResult:
    """Run ``python -m s3ckptfs ARGS``; stdout and stderr go through files, not pipes."""
    argv = [sys.executable, "-m", "s3ckptfs", *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=dict(env),
                                   cwd=cwd)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        out.seek(0)
        err.seek(0)
        return CliResult(argv, returncode, out.read().decode(errors="replace"),
                         err.read().decode(errors="replace"))


def force_cleanup(mountpoint: Path, cache_dir: Path, known_pid: int | None = None) -> list[str]:
    """Make sure nothing is mounted at ``mountpoint`` and no daemon of ``cache_dir`` runs.

    Returns a list of the problems met (things that had to be forced); empty if
    the plain ``fusermount3 -u`` and the daemon's own exit were enough.
    """
    pids = {pid for pid in (known_pid, read_pid(cache_dir)) if pid is not None}
    problems = unmount_until_gone(mountpoint, timeout=30)
    for pid in sorted(pids):
        if not is_daemon(pid, cache_dir):
            continue
        if wait_gone(pid, DAEMON_EXIT_TIMEOUT):
            continue
        problems.append(f"daemon {pid} still running {DAEMON_EXIT_TIMEOUT:.0f}s after unmount; SIGTERM sent")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        if wait_gone(pid, 10.0):
            continue
        problems.append(f"daemon {pid} ignored SIGTERM; SIGKILL sent")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        wait_gone(pid, 5.0)
    if is_mounted(mountpoint):
        unmount(mountpoint, lazy=True, timeout=30)
    return problems


# --------------------------------------------------------------------------
# Mounts
# --------------------------------------------------------------------------

# Mounts in tests keep dedup off unless a test asks for it (as the daemon's default): the tests
# written before auto count the requests they expect, and auto's choices depend on measured rates.
PINNED_OPTIONS = {"dedup": "off"}


def format_options(options: Mapping[str, Any] | None) -> list[str]:
    """``{"write_mode": "sync"}`` -> ``["-o", "write_mode=sync"]`` (nothing for no options)."""
    if not options:
        return []
    return ["-o", ",".join(f"{key}={value}" for key, value in options.items())]


@dataclass
class Mount:
    """One s3ckptfs mount driven through its command line.

    ``key("a/b.pt")`` is the S3 key that ``path / "a/b.pt"`` maps to.
    """

    factory: MountFactory
    bucket: str
    prefix: str
    path: Path
    cache_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    extra_args: tuple[str, ...] = ()
    env_overrides: dict[str, str | None] = field(default_factory=dict)
    endpoint_url: str | None = None
    url_override: str | None = None
    pid: int | None = None

    @property
    def url(self) -> str:
        """The ``s3://`` URL given to ``mount`` (``url_override`` if set, for bad-input tests)."""
        if self.url_override is not None:
            return self.url_override
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def env(self) -> dict[str, str]:
        return cli_env(self.factory.server, self.env_overrides)

    def key(self, relpath: str | os.PathLike[str] = "") -> str:
        """The S3 key of ``relpath`` (relative to the mount root)."""
        rel = Path(relpath).as_posix().strip("/")
        rel = "" if rel == "." else rel
        return "/".join(part for part in (self.prefix, rel) if part)

    def mount_args(self) -> list[str]:
        endpoint = self.endpoint_url or self.factory.server.endpoint_url
        return ["mount", self.url, str(self.path), "--cache-dir", str(self.cache_dir),
                "--endpoint-url", endpoint, "--log-level", "debug",
                *format_options({**PINNED_OPTIONS, **self.options}), *self.extra_args]

    def start(self, check: bool = True) -> CliResult:
        """Run ``s3ckptfs mount``; with ``check``, assert that the mount is live."""
        result = run_cli(self.mount_args(), self.env, timeout=MOUNT_TIMEOUT)
        self.pid = read_pid(self.cache_dir)
        if check:
            assert result.returncode == 0, self._failure("mount failed", result)
            assert self.mounted, self._failure("mount returned 0 but nothing is mounted", result)
            assert self.pid is not None, self._failure(f"no {PID_FILE} in the cache dir", result)
        return result

    @property
    def mounted(self) -> bool:
        return is_mounted(self.path)

    def sync(self, path: str | os.PathLike[str] | None = None, check: bool = True) -> CliResult:
        """Run ``s3ckptfs sync MOUNTPOINT [PATH]``; ``path`` may be relative to the mount."""
        args = ["sync", str(self.path)]
        if path is not None:
            args.append(str(self.path / path))
        result = run_cli(args, self.env, timeout=SYNC_TIMEOUT)
        if check:
            assert result.returncode == 0, self._failure("sync failed", result)
        return result

    def unmount(self, force: bool = False, check: bool = True) -> CliResult:
        """Run ``s3ckptfs unmount``; with ``check``, assert the mount and its daemon are gone."""
        args = ["unmount", str(self.path)] + (["--force"] if force else [])
        result = run_cli(args, self.env, timeout=UNMOUNT_TIMEOUT)
        if check:
            assert result.returncode == 0, self._failure("unmount failed", result)
            assert not self.mounted, self._failure("unmount returned 0 but the mount is still there", result)
            if self.pid is not None:
                assert wait_gone(self.pid, DAEMON_EXIT_TIMEOUT), self._failure(
                    f"daemon {self.pid} still running after unmount", result)
        return result

    def remount(self, *, cache_dir: Path | None = None, options: Mapping[str, Any] | None = None,
                extra_args: Iterable[str] | None = None) -> Mount:
        """Unmount (if mounted) and mount the same bucket and prefix at the same path again.

        Pass ``cache_dir`` (e.g. ``factory.fresh_dir("cache")``) to start with an empty cache.
        """
        if self.mounted:
            self.unmount()
        if cache_dir is not None:
            self.cache_dir = Path(cache_dir)
        if options is not None:
            self.options = dict(options)
        if extra_args is not None:
            self.extra_args = tuple(extra_args)
        self.factory.track(self)
        self.start()
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the daemon (a crash) and clear the dead mount, keeping the cache dir as it is."""
        assert self.pid is not None, "no daemon pid known"
        assert is_daemon(self.pid, self.cache_dir), (f"daemon {self.pid} was not running before the kill\n"
                                     f"--- {self.cache_dir / LOG_FILE} (tail) ---\n{self.log_tail()}")
        os.kill(self.pid, sig)
        wait_gone(self.pid, 10.0)
        unmount_until_gone(self.path, timeout=30)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.cache_dir, lines)

    def _failure(self, what: str, result: CliResult) -> str:
        return f"{what}\n{result.describe()}--- {self.cache_dir / LOG_FILE} (tail) ---\n{self.log_tail()}"


class MountFactory:
    """Creates mounts for one test and tears every one of them down afterwards."""

    def __init__(self, server: devserver.SeaweedServer, base: Path) -> None:
        self.server = server
        self.base = base
        self._tracked: dict[tuple[Path, Path], Mount] = {}
        self._pids: dict[tuple[Path, Path], set[int]] = {}

    def fresh_dir(self, stem: str, create: bool = True) -> Path:
        """A new directory (``create``) or unused path under the test's tmp dir."""
        path = self.base / f"{stem}{next(_counter)}"
        if create:
            path.mkdir(parents=True)
        return path

    def new(self, bucket: str, prefix: str = "", *, cache_dir: Path | None = None,
            mountpoint: Path | None = None, extra_args: Iterable[str] = (),
            options: Mapping[str, Any] | None = None, env: Mapping[str, str | None] | None = None,
            endpoint_url: str | None = None, url: str | None = None) -> Mount:
        """A mount description, registered for teardown but not started.

        ``env`` is laid over the server's credentials; ``url`` replaces the
        ``s3://bucket/prefix`` URL built from ``bucket`` and ``prefix``.
        """
        mount = Mount(
            factory=self, bucket=bucket, prefix=prefix.strip("/"),
            path=Path(mountpoint) if mountpoint is not None else self.fresh_dir("mnt"),
            cache_dir=Path(cache_dir) if cache_dir is not None else self.fresh_dir("cache"),
            options=dict(options or {}), extra_args=tuple(extra_args),
            env_overrides=dict(env or {}), endpoint_url=endpoint_url, url_override=url)
        self.track(mount)
        return mount

    def __call__(self, bucket: str, prefix: str = "", **kwargs: Any) -> Mount:
        """Mount ``s3://bucket/prefix`` in background mode and return the live mount."""
        mount = self.new(bucket, prefix, **kwargs)
        mount.start()
        return mount

    def track(self, mount: Mount) -> None:
        self._tracked[(mount.path, mount.cache_dir)] = mount

    def remember_pids(self) -> None:
        """Record each tracked daemon's pid (a daemon may remove its pid file on exit)."""
        for where, mount in self._tracked.items():
            pid = mount.pid or read_pid(mount.cache_dir)
            if pid is not None:
                self._pids.setdefault(where, set()).add(pid)

    def log_tails(self) -> list[tuple[str, str]]:
        return [(f"s3ckptfs log {mount.path}", mount.log_tail()) for mount in self._tracked.values()
                if (mount.cache_dir / LOG_FILE).exists()]

    def teardown(self) -> list[str]:
        """Unmount and stop everything; return a description of anything that had to be forced."""
        self.remember_pids()
        problems: list[str] = []
        for (path, cache_dir), mount in self._tracked.items():
            pids = self._pids.get((path, cache_dir), set()) | ({mount.pid} if mount.pid else set())
            forced: list[str] = []
            for pid in sorted(pids) or [None]:
                forced += force_cleanup(path, cache_dir, pid)
            if forced:
                problems += forced
                problems.append(f"--- {cache_dir / LOG_FILE} (tail) ---\n{log_tail(cache_dir)}")
        return problems


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devserver.SeaweedServer]:
    """A SeaweedFS S3 server for the whole session, stopped (by its own pid) at the end."""
    server = devserver.start(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3server: devserver.SeaweedServer) -> Any:
    """A boto3 S3 client with full access to the test server."""
    return s3server.client()


@pytest.fixture
def reader_s3(s3server: devserver.SeaweedServer) -> Any:
    """A boto3 S3 client for the read-and-list identity."""
    return s3server.client(devserver.READER_KEY, devserver.READER_SECRET)


def unique_bucket_name(hint: str = "t") -> str:
    """A valid S3 bucket name that no other test uses."""
    clean = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")[:30].strip("-")
    return f"{clean or 't'}-{uuid.uuid4().hex[:12]}"


def delete_bucket(s3: Any, bucket: str) -> None:
    """Abort its multipart uploads, delete every object, then the bucket itself."""
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if objects:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    s3.delete_bucket(Bucket=bucket)


@pytest.fixture
def late_cleanup() -> Iterator[list[Callable[[], None]]]:
    """Callbacks run after the fixtures that depend on this one are torn down.

    ``bucket`` and ``mount_factory`` both depend on it, so a bucket is deleted
    only once every mount of the test is gone, whatever order a test names them in.
    """
    callbacks: list[Callable[[], None]] = []
    yield callbacks
    for callback in reversed(callbacks):
        callback()


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest, late_cleanup: list[Callable[[], None]]) -> str:
    """A fresh, empty bucket with a unique name, deleted after the test.

    Deleting matters: SeaweedFS gives every bucket its own volumes, and a
    session that kept them all would run out of volumes after a few dozen tests.
    """
    name = unique_bucket_name(request.node.name)
    s3.create_bucket(Bucket=name)

    def remove() -> None:
        try:
            delete_bucket(s3, name)
        except Exception as exc:  # a leftover bucket must not fail the test
            warnings.warn(f"could not delete bucket {name}: {exc}", stacklevel=1)

    late_cleanup.append(remove)
    return name


@pytest.fixture
def mount_factory(s3server: devserver.SeaweedServer, tmp_path: Path, request: pytest.FixtureRequest,
                  late_cleanup: list[Callable[[], None]]) -> Iterator[MountFactory]:
    """``mount_factory(bucket, prefix="", *, cache_dir=None, extra_args=(), options=None)`` -> Mount.

    Every mount made through it is unmounted and its daemon stopped at teardown.
    """
    factory = MountFactory(s3server, tmp_path)
    request.node.stash[_FACTORIES_KEY] = request.node.stash.get(_FACTORIES_KEY, []) + [factory]
    yield factory
    problems = factory.teardown()
    if problems:
        pytest.fail("mount teardown had to force its way:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def mnt(bucket: str, mount_factory: MountFactory) -> Mount:
    """``bucket`` mounted with the prefix ``ckpt``."""
    return mount_factory(bucket, "ckpt")


_FACTORIES_KEY = pytest.StashKey[list[MountFactory]]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the daemon logs to a failing test's report while the mounts still exist."""
    outcome = yield
    report = outcome.get_result()
    if report.when in ("setup", "call") and report.failed:
        for factory in item.stash.get(_FACTORIES_KEY, []):
            factory.remember_pids()
            for title, text in factory.log_tails():
                report.sections.append((title, text))


# --------------------------------------------------------------------------
# Lock-order checking, part 2 of 2 (s3ckptfs/locks.py)
# --------------------------------------------------------------------------
# In-process, a violation raises LockOrderError in the offending thread (strict) and is
# recorded; daemons only record and log theirs, and append them to one file for the whole
# session. A test fails if anything was recorded while it ran, in-process or by a daemon.
# A violation in a background thread between two tests is counted against the next one.

locks.enable(strict=True)


@pytest.fixture(scope="session", autouse=True)
def lock_check_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The file every daemon of the session appends its lock-order violations to."""
    path = tmp_path_factory.mktemp("lock-check") / "violations.jsonl"
    previous = os.environ.get(locks.ENV_LOG)
    os.environ[locks.ENV_LOG] = str(path)   # inherited through cli_env by every daemon
    yield path
    if previous is None:
        os.environ.pop(locks.ENV_LOG, None)
    else:
        os.environ[locks.ENV_LOG] = previous


@pytest.fixture(autouse=True)
def lock_order_checked(lock_check_log: Path) -> Iterator[None]:
    """Fail the test if a lock-order violation was recorded while it ran (set up first, torn down last)."""
    offset = lock_check_log.stat().st_size if lock_check_log.exists() else 0
    yield
    found = [str(violation) for violation in locks.clear_violations()]
    found += [f"(in a daemon) {entry.get('rule')} [thread {entry.get('thread')}; "
              f"held: {', '.join(entry.get('held') or []) or 'nothing'}]\n{entry.get('stack', '').rstrip()}"
              for entry in locks.read_log(lock_check_log, offset)]
    if found:
        pytest.fail("lock order violated (see s3ckptfs/locks.py):\n\n" + "\n\n".join(found), pytrace=False)


# Under pytest-xdist (scripts/test.sh runs two workers with --dist loadgroup):
# * the tests of a module in WORKER_GROUPS run one after the other on one worker: the outage
#   tests mostly wait for their outages, beside the other worker's tests; the container tests
#   share the image (built once) and the container's mountpoint, whose control socket in
#   /run/s3ckptfs is named after that path. (A group made here, by module, not by xdist_group
#   marks: pytest-xdist 3.8 loses those with pytest >= 9.2, pytest-xdist issue 1386.)
# * the modules whose tests take longest are handed out first, so that no long test starts
#   when the other worker is almost done.
WORKER_GROUPS = {"test_outage.py": "outage", "test_container.py": "container"}
LONGEST_FIRST = ("test_outage.py", "test_model_inproc.py", "test_container.py", "test_model.py",
                 "test_workload_processes.py",
                 "test_integrations.py", "test_faults.py", "test_frameworks.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``, with the groups of WORKER_GROUPS (groups first, the largest first)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class ModuleGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            return WORKER_GROUPS.get(module) or super()._split_scope(nodeid)

    return ModuleGroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark ``fuse`` every test that needs the S3 server (and so, here, a mount), however it gets it.

    In a pytest-xdist worker, also put the tests of ``LONGEST_FIRST`` first (in that order).
    """
    for item in items:
        if "s3server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.fuse)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: same order otherwise


# --------------------------------------------------------------------------
# In-process layer: the core over an in-memory store, no FUSE, no server
# --------------------------------------------------------------------------

@pytest.fixture
def fake_store() -> Iterator[Any]:
    """A fresh FakeStore; every hang is released at teardown."""
    from fakestore import FakeStore

    store = FakeStore()
    yield store
    store.clear_faults()


@pytest.fixture
def inproc(fake_store: Any, tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``inproc(**options)`` -> a started ``InProcessMount`` over ``fake_store``, cache dir in memory.

    Options are ``Options`` fields on top of ``inproc.small_options()``. At teardown every
    hang is released and every instance still running is stopped without draining.
    """
    from inproc import InProcessMount, fast_tmp_dir, small_options

    mounts: list[Any] = []
    with fast_tmp_dir(tmp_path / "cache") as base:
        def make(**options: Any) -> Any:
            mount = InProcessMount(fake_store, base / f"cache{len(mounts)}", small_options(**options))
            mounts.append(mount)
            mount.start()
            return mount

        try:
            yield make
        finally:
            fake_store.clear_faults()
            for mount in mounts:
                mount.close()
