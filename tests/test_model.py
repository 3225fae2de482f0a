"""Reference model: random operations on the mount and on a local directory must agree.

Each Hypothesis example works in a fresh directory of one long-lived mount and
applies the same operations (write at offsets, append, truncate, rename of files
and directories, unlink, mkdir, rmdir, read, sync, remount, kill and restart) to
the mount and to a local directory, the model. Every operation must succeed on
both or fail on both with the same errno; reads must return the same bytes.
At the end, after sync, the tree seen through a second mount of the same prefix
(its own cache, no metadata caching: a fresh node) must hold the same names and
bytes as the model.

The mount under test runs with ``-o dedup=on`` and files are also copied (as
``cp`` does), so objects are often made from parts, or whole objects, already in
S3 (dedup.py, wholecopy.py); the fresh mount, which reads every byte from S3,
checks them. The in-process model (test_model_inproc.py) draws dedup per sequence.

S3CKPTFS_MODEL_EXAMPLES sets the number of sequences (default 100; run many more
by hand).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import pid_alive
from inproc import local_tree
from s3ckptfs import control

MiB = 1 << 20
NAMES = ["a", "b", "c.pt", ".tmp1", "d=1"]
DIRS = ["", "x", "x/y", "z"]
EXAMPLES = int(os.environ.get("S3CKPTFS_MODEL_EXAMPLES", "100"))
RESTART_ONE_IN = 4
SYNC_TIMEOUT = 300

paths = st.builds(lambda d, n: f"{d}/{n}" if d else n, st.sampled_from(DIRS), st.sampled_from(NAMES))
dirs = st.sampled_from([d for d in DIRS if d])
offsets = st.one_of(st.integers(0, 64 * 1024), st.integers(0, 12 * MiB))
blobs = st.one_of(st.binary(min_size=1, max_size=4096),
                  st.tuples(st.integers(1, 3), st.integers(0, 255)).map(lambda t: bytes([t[1]]) * (t[0] * MiB)))


def outcome(action):
    """Run ``action``; return ("ok", value) or ("err", errno)."""
    try:
        return ("ok", action())
    except OSError as exc:
        return ("err", exc.errno)


def write_at(path: Path, offset: int, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def append(path: Path, data: bytes) -> int:
    with open(path, "ab") as f:
        return f.write(data)


@pytest.fixture(scope="module")
def model_mounts(s3server, tmp_path_factory):
    """The mount under test, and a second one of the same prefix that reads S3 afresh."""
    import conftest

    bucket = conftest.unique_bucket_name("model")
    client = s3server.client()
    client.create_bucket(Bucket=bucket)
    factory = conftest.MountFactory(s3server, tmp_path_factory.mktemp("model"))
    mount = factory(bucket, "model", options={"metadata_ttl": 1, "negative_ttl": 1, "dedup": "on"})
    fresh = factory(bucket, "model", options={"metadata_ttl": 0, "negative_ttl": 0})
    yield factory, mount, fresh
    problems = factory.teardown()
    assert not problems, problems


# pytest-timeout's default (600 s) would interrupt a long hand run in the middle of a
# step (a kill without its restart), which then looks like a daemon that vanished.
@pytest.mark.timeout(300 + 6 * EXAMPLES)
def test_mount_behaves_like_a_local_directory(model_mounts, tmp_path):
    factory, mount, fresh = model_mounts
    counts = {"sequences": 0, "operations": 0, "restarts": 0}

    class MountVersusLocal(RuleBasedStateMachine):
        # A remount costs about as much as the rest of a sequence: one sequence in
        # RESTART_ONE_IN may use one, so that CI can afford a few hundred sequences.
        @initialize(restart_draw=st.integers(0, RESTART_ONE_IN - 1))
        def start(self, restart_draw: int) -> None:
            name = uuid.uuid4().hex[:8]
            self.real = mount.path / name
            self.model = tmp_path / name
            os.mkdir(self.real)
            os.mkdir(self.model)
            self.restarts = 0 if restart_draw == 0 else 1
            self.steps: list[str] = []

        def both(self, action, what: str = "") -> None:
            self.steps.append(what)
            expected = outcome(lambda: action(self.model))
            actual = outcome(lambda: action(self.real))
            if expected[0] == "err" or actual[0] == "err":
                assert actual == expected, f"mount gave {actual}, a local directory {expected}"

        @rule(path=paths, offset=offsets, data=blobs)
        def write(self, path, offset, data):
            self.both(lambda root: write_at(root / path, offset, data), f"write {path} @{offset} +{len(data)}")

        @rule(path=paths, data=blobs)
        def append_to(self, path, data):
            self.both(lambda root: append(root / path, data), f"append {path} +{len(data)}")

        @rule(path=paths, size=offsets)
        def truncate(self, path, size):
            self.both(lambda root: os.truncate(root / path, size), f"truncate {path} {size}")

        @rule(src=paths, dst=paths)
        def rename_file(self, src, dst):
            self.both(lambda root: os.rename(root / src, root / dst) if (root / src).is_file() else None,
                      f"rename {src} {dst}")

        @rule(src=paths, dst=paths)
        def copy_file(self, src, dst):
            self.both(lambda root: shutil.copyfile(root / src, root / dst)
                      if (root / src).is_file() and src != dst else None, f"copy {src} {dst}")

        @rule(src=dirs, dst=dirs)
        def rename_dir(self, src, dst):
            # Only onto a new name outside itself: the cases every filesystem agrees on.
            if dst.startswith(src + "/") or src.startswith(dst + "/") or src == dst:
                return
            self.both(lambda root: os.rename(root / src, root / dst)
                      if (root / src).is_dir() and not (root / dst).exists() else None, f"rename dir {src} {dst}")

        @rule(path=paths)
        def unlink(self, path):
            self.both(lambda root: os.unlink(root / path), f"unlink {path}")

        @rule(path=dirs)
        def mkdir(self, path):
            self.both(lambda root: os.mkdir(root / path), f"mkdir {path}")

        @rule(path=dirs)
        def rmdir(self, path):
            self.both(lambda root: os.rmdir(root / path), f"rmdir {path}")

        @rule(path=paths)
        def read(self, path):
            self.steps.append(f"read {path}")
            expected = outcome(lambda: (self.model / path).read_bytes())
            actual = outcome(lambda: (self.real / path).read_bytes())
            if expected[0] == "err" and expected[1] in (errno.EISDIR, errno.ENOENT, errno.ENOTDIR):
                assert actual[0] == "err", f"read of {path} gave data, locally {expected}"
            else:
                assert actual == expected, f"read of {path} differs"

        @rule()
        def sync(self):
            self.steps.append("sync")
            sync_now(mount)

        @precondition(lambda self: self.restarts == 0)
        @rule()
        def remount(self):
            self.restarts += 1
            self.steps.append("remount")
            mount.remount()

        @precondition(lambda self: self.restarts == 0)
        @rule()
        def kill_and_restart(self):
            # Closed files are journaled: a crash must not lose them.
            self.restarts += 1
            self.steps.append("kill+restart")
            mount.kill()
            mount.remount()

        @invariant()
        def same_names(self):
            if hasattr(self, "real"):
                assert sorted(tree_names(self.real)) == sorted(tree_names(self.model)), "\n".join(self.steps)

        def teardown(self):
            if not hasattr(self, "real"):
                return
            sync_now(mount)
            assert local_tree(fresh.path / self.real.name) == local_tree(self.model), "\n".join(self.steps)
            shutil.rmtree(self.real)
            shutil.rmtree(self.model)
            counts["sequences"] += 1
            counts["operations"] += len(self.steps)
            counts["restarts"] += sum(step in ("remount", "kill+restart") for step in self.steps)

    MountVersusLocal.TestCase.settings = settings(
        max_examples=EXAMPLES, stateful_step_count=12, deadline=None,
        suppress_health_check=list(HealthCheck))
    MountVersusLocal.TestCase().runTest()
    print(f"\nreference model: {counts['sequences']} sequences checked, {counts['operations']} operations, "
          f"{counts['restarts']} remounts or kill-restarts")


def sync_now(mount) -> None:
    """``s3ckptfs sync`` through the control socket (the CLI's start-up would dominate a sequence)."""
    try:
        answer = control.request(str(mount.path), {"cmd": "sync", "path": "/"}, timeout=SYNC_TIMEOUT)
    except control.ControlError as exc:
        socket = control.socket_path(mount.path)
        raise AssertionError(
            f"{exc}; mounted: {mount.mounted}, daemon {mount.pid} alive: {pid_alive(mount.pid or -1)}, "
            f"socket exists: {socket.exists()}\n{mount.log_tail()}") from None
    assert answer.get("failed") == [], f"sync answered {answer}\n{mount.log_tail()}"


def tree_names(root: Path) -> list[str]:
    names = []
    for current, subdirs, files in os.walk(root):
        rel = os.path.relpath(current, root)
        names += [os.path.normpath(os.path.join(rel, n)) + "/" for n in subdirs]
        names += [os.path.normpath(os.path.join(rel, n)) for n in files]
    return names
