"""Reference model: random operations on the mount and on a local directory must agree.

Each Hypothesis example works in a fresh directory of one long-lived mount and
applies the same operations to the mount and to a local directory, the model, the
way users and training code do: files rewritten whole (open with O_TRUNC, one
write) at sizes on both sides of the single-PUT limit and the part size (0 B to
three parts: the mount under test runs with ``part_size=5MiB`` and
``single_put_limit=1MiB``), writes at offsets, appends, truncates to lengths near
the current size or anywhere, renames onto existing names and onto themselves,
renames of a file right after it was written (its upload still running) or right
after another rename (its move in S3 still queued), writes, appends and truncates
right after a rename, copies, unlink, mkdir, rmdir, directory renames, whole
reads and reads of 100,000 bytes at an offset, and now and then a sync, a remount
or a kill and restart. Most sequences never sync between operations. Every
operation must succeed on both or fail on both with the same errno; writes must
return the same counts and reads the same bytes; after every operation the names
and sizes seen through the mount must be the model's. At the end, after sync, the
tree seen through a second mount of the same prefix (no metadata caching, and
none of the sequence's objects in its cache: a fresh node) must hold the same
names and bytes as the model.

The mount under test runs with ``-o dedup=on`` and files are also copied (as
``cp`` does), and the bytes of a file are one of a few patterns, so objects are
often made from parts, or whole objects, already in S3 (dedup.py, wholecopy.py);
the fresh mount, which reads every byte from S3, checks them. The in-process
model (test_model_inproc.py) draws dedup per sequence.

Environment:

* ``S3CKPTFS_MODEL_EXAMPLES``: sequences per run (default 300);
* ``S3CKPTFS_MODEL_SECONDS``: run rounds of sequences until this many seconds
  have passed (a long search for rare interleavings), at least one run;
* ``S3CKPTFS_MODEL_SEED``: the seed of the first round (default: random); each
  round after it uses the next one. The seed and the counts are printed at the end
  (``-s`` shows them), and a failure names the seed of its round.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, seed as hypothesis_seed, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from conftest import pid_alive
from inproc import local_tree
from s3ckptfs import control

KiB = 1 << 10
MiB = 1 << 20
PART_SIZE = 5 * MiB          # the smallest S3 allows
SINGLE_PUT_LIMIT = 1 * MiB
NAMES = ["a", "c.pt", ".tmp1", "d=1"]
DIRS = ["", "x", "x/y", "z"]
EXAMPLES = int(os.environ.get("S3CKPTFS_MODEL_EXAMPLES", "300"))
SECONDS = float(os.environ.get("S3CKPTFS_MODEL_SECONDS", "0"))
SEED = int(os.environ.get("S3CKPTFS_MODEL_SEED") or random.randrange(1 << 32))
ROUND = 100                  # sequences per round of a timed run
STEPS = 15
RESTART_ONE_IN = 4
SYNC_ONE_IN = 4
SYNC_TIMEOUT = 300
READ_LENGTH = 100_000

paths = st.builds(lambda d, n: f"{d}/{n}" if d else n, st.sampled_from(DIRS), st.sampled_from(NAMES))
dirs = st.sampled_from([d for d in DIRS if d])
offsets = st.one_of(st.integers(0, 64 * KiB), st.integers(0, 12 * MiB))
blobs = st.one_of(st.binary(min_size=1, max_size=4096),
                  st.tuples(st.integers(1, 3), st.integers(0, 255)).map(lambda t: bytes([t[1]]) * (t[0] * MiB)))
# Whole-file sizes: most small (cheap), the rest on both sides of the single-PUT limit and
# of the part boundaries.
SMALL_SIZES = [0, 1, 4 * KiB, 70_000, 5_000]
LARGE_SIZES = [SINGLE_PUT_LIMIT - 1, SINGLE_PUT_LIMIT, SINGLE_PUT_LIMIT + 1, 3 * MiB, PART_SIZE,
               PART_SIZE + 1, 2 * PART_SIZE + 70_000]
sizes = st.one_of(st.sampled_from(SMALL_SIZES), st.sampled_from(SMALL_SIZES), st.sampled_from(LARGE_SIZES))
append_sizes = st.sampled_from([1, 5_000, MiB, 70_000])
tags = st.integers(0, 3)     # few patterns: equal parts and equal files are common (dedup)
PATTERN = bytes((i * 7 + 3) % 251 for i in range(251))


def content(size: int, tag: int) -> bytes:
    """``size`` bytes of pattern ``tag``: every offset tells which pattern and where it came from."""
    start = (tag * 61) % 251
    whole = PATTERN[start:] + PATTERN[:start]
    return (whole * (size // 251 + 1))[:size]


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


def rewrite(path: Path, data: bytes) -> int:
    """open(O_TRUNC), one write, close: what torch.save and Path.write_bytes do."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return os.write(fd, data) if data else 0
    finally:
        os.close(fd)


def append(path: Path, data: bytes) -> int:
    with open(path, "ab") as f:
        return f.write(data)


def pread(path: Path, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, READ_LENGTH, offset)
    finally:
        os.close(fd)


def shown(result: tuple) -> tuple:
    """An outcome as a failure message shows it (lengths, not bytes)."""
    if result[0] == "ok" and isinstance(result[1], bytes):
        return ("ok", f"{len(result[1])} bytes")
    return result


@pytest.fixture(scope="module")
def model_mounts(s3server, tmp_path_factory):
    """The mount under test, and a second one of the same prefix that reads S3 afresh."""
    import conftest

    bucket = conftest.unique_bucket_name("model")
    client = s3server.client()
    client.create_bucket(Bucket=bucket)
    factory = conftest.MountFactory(s3server, tmp_path_factory.mktemp("model"))
    mount = factory(bucket, "model", options={"metadata_ttl": 1, "negative_ttl": 1, "dedup": "on",
                                              "part_size": PART_SIZE, "single_put_limit": SINGLE_PUT_LIMIT})
    fresh = factory(bucket, "model", options={"metadata_ttl": 0, "negative_ttl": 0})
    yield factory, mount, fresh
    problems = factory.teardown()
    assert not problems, problems


# pytest-timeout's default (600 s) would interrupt a long hand run in the middle of a
# step (a kill without its restart), which then looks like a daemon that vanished.
@pytest.mark.timeout(300 + 3 * EXAMPLES + 2 * SECONDS)
def test_mount_behaves_like_a_local_directory(model_mounts, tmp_path):
    factory, mount, fresh = model_mounts
    counts = {"sequences": 0, "operations": 0, "restarts": 0, "syncs": 0}

    class MountVersusLocal(RuleBasedStateMachine):
        # A remount costs about as much as the rest of a sequence: one sequence in
        # RESTART_ONE_IN may use one, so that CI can afford a few hundred sequences.
        @initialize(restart_draw=st.integers(0, RESTART_ONE_IN - 1), sync_draw=st.integers(0, SYNC_ONE_IN - 1))
        def start(self, restart_draw: int, sync_draw: int) -> None:
            name = uuid.uuid4().hex[:8]
            self.real = mount.path / name
            self.model = tmp_path / name
            os.mkdir(self.real)
            os.mkdir(self.model)
            self.restarts = 0 if restart_draw == 0 else 1
            self.may_sync = sync_draw == 0  # most sequences never wait for S3 between operations
            self.steps: list[str] = []

        # -- helpers ---------------------------------------------------------------------

        def both(self, action, what: str) -> None:
            """``action(root)`` on the model, then on the mount: the same outcome, values included."""
            self.steps.append(what)
            expected = outcome(lambda: action(self.model))
            actual = outcome(lambda: action(self.real))
            assert actual == expected, (f"{what}: mount gave {shown(actual)}, a local directory {shown(expected)}"
                                        + self.history())

        def history(self) -> str:
            return "\n  after: " + "; ".join(self.steps)

        def files(self) -> list[str]:
            return sorted(p for p, size in tree_sizes(self.model).items() if size is not None)

        def size_of(self, path: str) -> int:
            try:
                return os.stat(self.model / path).st_size
            except OSError:
                return 0

        def pick(self, data, also_new: bool = True) -> str:
            """An existing file most of the time; otherwise any path (new, a directory, missing parent)."""
            files = self.files()
            if files and (not also_new or data.draw(st.integers(0, 3), label="existing?") > 0):
                return data.draw(st.sampled_from(files), label="file")
            return data.draw(paths, label="path")

        def target(self, data, src: str) -> str:
            """Where a rename goes: often onto another existing file, sometimes onto itself."""
            choice = data.draw(st.integers(0, 5), label="target kind")
            others = [f for f in self.files() if f != src]
            if choice == 0:
                return src
            if choice <= 3 and others:
                return data.draw(st.sampled_from(others), label="onto")
            return data.draw(paths, label="to")

        def change(self, data, path: str) -> None:
            """A write, append or truncate of ``path`` right away."""
            kind = data.draw(st.sampled_from(["rewrite", "append", "truncate"]), label="then")
            if kind == "rewrite":
                self.do_rewrite(path, data.draw(sizes, label="size"), data.draw(tags, label="tag"))
            elif kind == "append":
                self.do_append(path, data.draw(append_sizes, label="size"), data.draw(tags, label="tag"))
            else:
                self.do_truncate(path, data.draw(st.integers(0, self.size_of(path) + 10), label="length"))

        def do_rewrite(self, path: str, size: int, tag: int) -> None:
            data = content(size, tag)
            self.both(lambda root: rewrite(root / path, data), f"rewrite {path} {size}#{tag}")

        def do_append(self, path: str, size: int, tag: int) -> None:
            data = content(size, tag)
            self.both(lambda root: append(root / path, data), f"append {path} +{size}#{tag}")

        def do_truncate(self, path: str, length: int) -> None:
            self.both(lambda root: os.truncate(root / path, length), f"truncate {path} {length}")

        def do_rename(self, src: str, dst: str) -> None:
            self.both(lambda root: os.rename(root / src, root / dst) if (root / src).is_file() else None,
                      f"rename {src} {dst}")

        # -- rules -----------------------------------------------------------------------

        @rule(path=paths, offset=offsets, data=blobs)
        def write(self, path, offset, data):
            self.both(lambda root: write_at(root / path, offset, data), f"write {path} @{offset} +{len(data)}")

        @rule(data=st.data())
        def rewrite_file(self, data):
            self.do_rewrite(self.pick(data), data.draw(sizes, label="size"), data.draw(tags, label="tag"))

        @rule(data=st.data())
        def append_to(self, data):
            self.do_append(self.pick(data), data.draw(append_sizes, label="size"), data.draw(tags, label="tag"))

        @rule(data=st.data())
        def truncate(self, data):
            path = self.pick(data)
            length = data.draw(st.one_of(st.integers(0, self.size_of(path) + 10), offsets), label="length")
            self.do_truncate(path, length)

        @rule(data=st.data())
        def rename_file(self, data):
            src = self.pick(data)
            self.do_rename(src, self.target(data, src))

        @rule(data=st.data())
        def rename_then_change(self, data):
            # The file's move in S3 (or its commit under the new key) is still queued.
            src = self.pick(data, also_new=False)
            dst = self.target(data, src)
            self.do_rename(src, dst)
            self.change(data, data.draw(st.sampled_from([dst, src]), label="changed"))

        @rule(data=st.data())
        def write_then_rename(self, data):
            # Renamed while its upload runs, often onto a name whose own upload or move runs too.
            src = self.pick(data)
            self.do_rewrite(src, data.draw(sizes, label="size"), data.draw(tags, label="tag"))
            dst = self.target(data, src)
            self.do_rename(src, dst)
            if data.draw(st.booleans(), label="change after?"):
                self.change(data, dst)

        @rule(src=paths, dst=paths)
        def copy_file(self, src, dst):
            def copy(root: Path) -> None:
                if (root / src).is_file() and src != dst:
                    shutil.copyfile(root / src, root / dst)
            self.both(copy, f"copy {src} {dst}")

        @rule(src=dirs, dst=dirs)
        def rename_dir(self, src, dst):
            # Only onto a new name outside itself: the cases every filesystem agrees on.
            if dst.startswith(src + "/") or src.startswith(dst + "/") or src == dst:
                return
            self.both(lambda root: os.rename(root / src, root / dst)
                      if (root / src).is_dir() and not (root / dst).exists() else None, f"rename dir {src} {dst}")

        @rule(data=st.data())
        def unlink(self, data):
            path = self.pick(data)
            self.both(lambda root: os.unlink(root / path), f"unlink {path}")

        @rule(path=dirs)
        def mkdir(self, path):
            self.both(lambda root: os.mkdir(root / path), f"mkdir {path}")

        @rule(path=dirs)
        def rmdir(self, path):
            self.both(lambda root: os.rmdir(root / path), f"rmdir {path}")

        @rule(data=st.data())
        def read(self, data):
            path = self.pick(data)
            self.steps.append(f"read {path}")
            expected = outcome(lambda: (self.model / path).read_bytes())
            actual = outcome(lambda: (self.real / path).read_bytes())
            if expected[0] == "err" and expected[1] in (errno.EISDIR, errno.ENOENT, errno.ENOTDIR):
                assert actual[0] == "err", f"read of {path} gave data, locally {expected}" + self.history()
            else:
                assert actual == expected, (f"read of {path}: mount {shown(actual)}, locally {shown(expected)}"
                                            + self.history())

        @rule(data=st.data())
        def read_at(self, data):
            path = self.pick(data)
            offset = data.draw(st.integers(0, self.size_of(path)), label="offset")
            self.both(lambda root: pread(root / path, offset), f"read {path} @{offset}")

        @precondition(lambda self: self.may_sync)
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
        def same_names_and_sizes(self):
            if hasattr(self, "real"):
                assert tree_sizes(self.real) == tree_sizes(self.model), "names or sizes differ" + self.history()

        def teardown(self):
            if not hasattr(self, "real"):
                return
            sync_now(mount)
            assert local_tree(fresh.path / self.real.name) == local_tree(self.model), (
                "a fresh mount after sync differs" + self.history())
            shutil.rmtree(self.real)
            shutil.rmtree(self.model)
            counts["sequences"] += 1
            counts["operations"] += len(self.steps)
            counts["restarts"] += sum(step in ("remount", "kill+restart") for step in self.steps)
            counts["syncs"] += any(step == "sync" for step in self.steps)

    started = time.monotonic()
    rounds = 0
    print(f"\nreference model: seed {SEED}" + (f", for {SECONDS:.0f} s" if SECONDS else ""), flush=True)
    while True:
        round_seed = SEED + rounds
        examples = EXAMPLES if not SECONDS else ROUND
        run = settings(max_examples=examples, stateful_step_count=STEPS, deadline=None,
                       suppress_health_check=list(HealthCheck))
        hypothesis_seed(round_seed)(MountVersusLocal)
        try:
            run_state_machine_as_test(MountVersusLocal, settings=run)
        except BaseException as exc:
            exc.add_note(f"reference model: round seed {round_seed} (S3CKPTFS_MODEL_SEED={round_seed} repeats it)")
            raise
        rounds += 1
        if not SECONDS or time.monotonic() - started >= SECONDS:
            break
    print(f"\nreference model: seed {SEED}, {rounds} round(s), {counts['sequences']} sequences, "
          f"{counts['operations']} operations, {counts['syncs']} sequences with a sync, "
          f"{counts['restarts']} remounts or kill-restarts, {time.monotonic() - started:.0f} s")


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


def tree_sizes(root: Path) -> dict[str, int | None]:
    """Relative path -> size of each file (lstat), None for each directory."""
    found: dict[str, int | None] = {}
    for current, subdirs, files in os.walk(root):
        rel = os.path.relpath(current, root)
        for name in subdirs:
            found[os.path.normpath(os.path.join(rel, name))] = None
        for name in files:
            found[os.path.normpath(os.path.join(rel, name))] = os.lstat(os.path.join(current, name)).st_size
    return found
