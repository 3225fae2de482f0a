"""Reference model, in process: random operations on the core and on a local directory must agree.

The same operations as the FUSE model (test_model.py): write at offsets, append,
truncate, rename of files and directories, unlink, mkdir, rmdir, read, sync, a
clean restart and a crash with a restart from the same cache dir, plus an fsync
between two writes of one open file, and store faults between operations (503s,
refused connections, short hangs and latency, AccessDenied where the write mode
lets a sequence see it only in sync, and outages during which every upload is
refused, so that a crash finds files still pending, and outages during which S3
is unreachable: every request refused or hanging, lookups and listings answered
from kept listings, namespace changes queued; a call that needs bytes only S3
has may then fail with EIO, and changes nothing). Outages also begin before the
first listing of anything, and the daemon is killed and restarted while they
last: until S3 answers, a restarted daemon knows only the listings it saved
before the kill, so any call may then fail with EIO, and changes nothing; what
succeeds must be what a local directory does. Each sequence runs a fresh
``Filesystem`` over a fresh ``FakeStore`` with KiB-sized parts, so the multipart
paths run on small data; its options are drawn too (metadata caching on or off,
write mode, local sync, checksums, eager uploads, dedup, a slow disk). Files are also copied
(with or without one range changed), so that many share content and, with
dedup, their equal parts are copied in the store instead of being sent.

Every operation must succeed on both or fail on both with the same errno; reads
and write counts must be equal; after each step the names seen through the core
must be the local directory's. At the end, after sync, the store must hold
exactly the local tree (names and bytes, directories as markers or prefixes),
the core and a fresh instance on its own cache (a new node) must read back the
same bytes, and no multipart upload may be left.

S3CKPTFS_INPROC_EXAMPLES sets the number of sequences (default 1000; more for a longer search).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fakestore
from fakestore import UPLOAD_OPERATIONS, FakeStore
from s3ckptfs import locks
from inproc import InProcessMount, Vfs, fast_tmp_dir, local_tree, small_options, store_tree

KiB = 1 << 10
NAMES = ["a", "b", "c.pt", ".tmp1", "d=1"]
DIRS = ["", "x", "x/y", "z"]
EXAMPLES = int(os.environ.get("S3CKPTFS_INPROC_EXAMPLES", "1000"))
STEPS = 12
MAX_RESTARTS = 2
SYNC_TIMEOUT = 30.0

paths = st.builds(lambda d, n: f"{d}/{n}" if d else n, st.sampled_from(DIRS), st.sampled_from(NAMES))
dirs = st.sampled_from([d for d in DIRS if d])
# Parts are 4 KiB and files up to 6 KiB go in one PUT (inproc.SMALL_SIZES).
offsets = st.one_of(st.integers(0, 2 * KiB), st.integers(0, 24 * KiB))
blobs = st.one_of(st.binary(min_size=1, max_size=2 * KiB),
                  st.tuples(st.integers(1, 10), st.integers(0, 255)).map(lambda t: bytes([t[1]]) * (t[0] * 1500)))
FAULTS = {
    "error503": fakestore.ERROR503,
    "refuse": fakestore.REFUSE,
    "latency": fakestore.latency(0.003),
    "short_hang": fakestore.hang(0.02),
    "denied": fakestore.DENIED,
}


def outcome(action):
    """Run ``action``; return ("ok", value) or ("err", errno)."""
    try:
        return ("ok", action())
    except OSError as exc:
        return ("err", exc.errno)


def not_a_marker(op: str, key: str) -> bool:
    """Faults and upload outages hit file uploads only (full outages hit everything)."""
    return not key.endswith("/")


class Local:
    """The model: the same calls as inproc.Vfs, on a local directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write_at(self, rel: str, offset: int, data: bytes) -> int:
        fd = os.open(self.root / rel, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            return os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def write_fsync_write(self, rel: str, first: tuple[int, bytes], second: tuple[int, bytes]) -> int:
        fd = os.open(self.root / rel, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            written = os.pwrite(fd, first[1], first[0])
            os.fsync(fd)
            return written + os.pwrite(fd, second[1], second[0])
        finally:
            os.close(fd)

    def write_file(self, rel: str, data: bytes) -> None:
        (self.root / rel).write_bytes(data)

    def append(self, rel: str, data: bytes) -> int:
        with open(self.root / rel, "ab") as stream:
            return stream.write(data)

    def truncate(self, rel: str, size: int) -> None:
        os.truncate(self.root / rel, size)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.root / src, self.root / dst)

    def unlink(self, rel: str) -> None:
        os.unlink(self.root / rel)

    def mkdir(self, rel: str) -> None:
        os.mkdir(self.root / rel)

    def rmdir(self, rel: str) -> None:
        os.rmdir(self.root / rel)

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def is_file(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def is_dir(self, rel: str) -> bool:
        return (self.root / rel).is_dir()

    def exists(self, rel: str) -> bool:
        return (self.root / rel).exists()


def vfs_write_fsync_write(vfs: Vfs, rel: str, first: tuple[int, bytes], second: tuple[int, bytes]) -> int:
    fh = vfs.open(rel, os.O_WRONLY | os.O_CREAT)
    try:
        written = vfs.fs.write(fh, first[1], first[0])
        vfs.fs.fsync(fh)
        written += vfs.fs.write(fh, second[1], second[0])
    except BaseException:
        vfs.fs.release(fh)
        raise
    vfs.close(fh)
    return written


@pytest.mark.timeout(900)
def test_core_behaves_like_a_local_directory(tmp_path, caplog, monkeypatch):
    # Thousands of sequences with faults log tens of thousands of retries: keep only what
    # a failure needs, the sequence's steps (in the assertion message).
    caplog.set_level(logging.CRITICAL, logger="s3ckptfs")
    # A lookup with nothing to fall back on waits 15 deadlines; while S3 hangs before anything
    # was listed, every call would (0.75 s each here). Two are enough to tell the outcomes apart.
    from s3ckptfs.fs import lookup
    monkeypatch.setattr(lookup, "NO_FALLBACK_DEADLINES", 2)
    counts: Counter[str] = Counter()
    numbers = itertools.count()
    # Some sequences run on a slow disk: every fsync of the cache dir takes a moment, which widens
    # the windows in which threads journal the same record (a memory file system has none).
    disk = {"fsync_seconds": 0.0}
    real_fsync = locks.fsync

    def fsync(fd: int) -> None:
        if disk["fsync_seconds"]:
            time.sleep(disk["fsync_seconds"])
        real_fsync(fd)
    monkeypatch.setattr(locks, "fsync", fsync)

    with fast_tmp_dir(tmp_path) as base:

        class CoreVersusLocal(RuleBasedStateMachine):
            @initialize(ttl=st.sampled_from([0.0, 5.0]), write_mode=st.sampled_from(["async", "sync"]),
                        local_sync=st.sampled_from(["close", "background"]), checksums=st.booleans(),
                        eager=st.sampled_from([0, 1]), outage=st.booleans(),
                        premade=st.sampled_from([(), ("x", "x/y", "z"), ("x", "x/y", "z")]),
                        final_crash=st.booleans(), dedup=st.sampled_from(["off", "on", "auto"]),
                        unreachable_first=st.sampled_from([None] * 7 + ["refuse", "refuse", "hang"]),
                        fsync_seconds=st.sampled_from([0.0, 0.0, 0.002]))
            def start(self, ttl, write_mode, local_sync, checksums, eager, outage, premade, final_crash,
                      dedup, unreachable_first, fsync_seconds) -> None:
                number = next(numbers)
                disk["fsync_seconds"] = fsync_seconds
                self.store = FakeStore()
                self.model_root = base / f"model{number}"
                self.model_root.mkdir()
                self.local = Local(self.model_root)
                options = small_options(metadata_ttl=ttl, negative_ttl=ttl, write_mode=write_mode,
                                        local_sync=local_sync, checksums=checksums, eager_uploads=eager,
                                        dedup=dedup, metadata_deadline=0.05)  # full outages: fall back fast
                self.mount = InProcessMount(self.store, base / f"cache{number}", options)
                self.mount.start()
                self.write_mode = write_mode
                self.outage: fakestore.Rule | None = None
                self.full_outage: fakestore.Rule | None = None   # every request fails: S3 unreachable
                # S3 unreachable since before the mount listed what it uses (from the start, or
                # since a restart during the outage): any call may fail with EIO until it answers.
                self.blind = False
                self.restarts = 0
                self.final_crash = final_crash
                self.denied: list[fakestore.Rule] = []
                self.denials_seen = 0   # AccessDenied hits that a failed sync has already accounted for
                self.steps = [f"options: ttl={ttl} write_mode={write_mode} local_sync={local_sync} "
                              f"checksums={checksums} eager_uploads={eager} dedup={dedup} fsync_seconds={fsync_seconds}"]
                if unreachable_first and write_mode == "async":  # before anything is listed
                    self.full_outage_begins(unreachable_first)
                    self.blind = True
                for directory in premade:  # most sequences start with every directory there
                    self.both(lambda fs: fs.mkdir(directory), f"mkdir {directory}")
                if outage and write_mode == "async":
                    self.outage_begins()

            @property
            def vfs(self) -> Vfs:
                assert self.mount.fs is not None
                return Vfs(self.mount.fs)

            def both(self, action, what: str, needs_data: bool = False) -> None:
                """The same call on the model and the core: the same result or the same errno.

                While S3 is unreachable, a call that ``needs_data`` (the bytes of an object
                not in the cache), or any call while the mount is ``blind``, may fail with EIO
                on the core alone; it then changes nothing.
                """
                self.steps.append(what)
                if (needs_data or self.blind) and self.full_outage is not None:
                    actual = outcome(lambda: action(self.vfs))
                    if actual == ("err", errno.EIO):
                        self.steps.append("  (EIO: its data is in S3 only)" if needs_data else
                                          "  (EIO: not listed before S3 became unreachable)")
                        return
                    expected = outcome(lambda: action(self.local))
                    assert actual == expected, (f"core gave {actual}, a local directory {expected}\n"
                                                + "\n".join(self.steps))
                    return
                expected = outcome(lambda: action(self.local))
                actual = outcome(lambda: action(self.vfs))
                assert actual == expected, (f"core gave {actual}, a local directory {expected}\n"
                                            + "\n".join(self.steps))

            # -- operations ------------------------------------------------------------

            @rule(path=paths, offset=offsets, data=blobs)
            def write(self, path, offset, data):
                self.both(lambda fs: fs.write_at(path, offset, data), f"write {path} @{offset} +{len(data)}",
                          needs_data=True)

            # Not while S3 hangs: a crash then leaves an upload whose ListParts the restart waits for.
            @precondition(lambda self: self.full_outage is None)
            @rule(src=paths, dst=paths, change=st.one_of(st.none(), st.tuples(offsets, blobs)))
            def copy_file(self, src, dst, change):
                """cp src dst (as the model holds it), maybe with one range changed: files sharing
                content, whose equal parts dedup copies in S3 instead of sending them."""
                if not self.local.is_file(src):
                    return
                data = bytearray(self.local.read_bytes(src))
                if change is not None:
                    offset, blob = change
                    data[len(data):offset] = bytes(max(0, offset - len(data)))
                    data[offset:offset + len(blob)] = blob
                body = bytes(data)
                self.both(lambda fs: fs.write_file(dst, body), f"copy {src} -> {dst} ({len(body)} bytes)",
                          needs_data=True)

            @rule(path=paths, data=blobs)
            def append_to(self, path, data):
                self.both(lambda fs: fs.append(path, data), f"append {path} +{len(data)}", needs_data=True)

            # Not once AccessDenied may strike: fsync would fail where the model's does not.
            @precondition(lambda self: not self.denied and self.outage is None and self.full_outage is None)
            @rule(path=paths, first=st.tuples(offsets, blobs), second=st.tuples(offsets, blobs))
            def write_fsync_write(self, path, first, second):
                def action(fs):
                    if isinstance(fs, Local):
                        return fs.write_fsync_write(path, first, second)
                    return vfs_write_fsync_write(fs, path, first, second)
                self.both(action, f"write {path} @{first[0]} +{len(first[1])}, fsync, "
                                  f"write @{second[0]} +{len(second[1])}, close")

            @rule(path=paths, size=offsets)
            def truncate(self, path, size):
                self.both(lambda fs: fs.truncate(path, size), f"truncate {path} {size}", needs_data=True)

            @rule(src=paths, dst=paths)
            def rename_file(self, src, dst):
                self.both(lambda fs: fs.rename(src, dst) if fs.is_file(src) else None, f"rename {src} {dst}")

            @rule(src=dirs, dst=dirs)
            def rename_dir(self, src, dst):
                # Only onto a new name outside itself: the cases every filesystem agrees on.
                if dst.startswith(src + "/") or src.startswith(dst + "/") or src == dst:
                    return
                self.both(lambda fs: fs.rename(src, dst) if fs.is_dir(src) and not fs.exists(dst) else None,
                          f"rename dir {src} {dst}")

            @rule(path=paths)
            def unlink(self, path):
                self.both(lambda fs: fs.unlink(path), f"unlink {path}")

            @rule(path=dirs)
            def mkdir(self, path):
                self.both(lambda fs: fs.mkdir(path), f"mkdir {path}")

            @rule(path=dirs)
            def rmdir(self, path):
                self.both(lambda fs: fs.rmdir(path), f"rmdir {path}")

            @rule(path=paths)
            def read(self, path):
                self.both(lambda fs: fs.read_bytes(path), f"read {path}", needs_data=True)

            @precondition(lambda self: self.outage is None and self.full_outage is None)
            @rule()
            def sync(self):
                self.steps.append("sync")
                self.sync_all()

            @precondition(lambda self: self.restarts < MAX_RESTARTS)
            @rule(crash=st.booleans(), saved=st.booleans())
            def restart(self, crash, saved):
                # Closed files are journaled: neither a clean stop nor a crash may lose them.
                self.restarts += 1
                self.steps.append("crash+restart" if crash else "stop+start")
                # During an outage a clean stop gives up draining at once (the data is journaled).
                if not crash:
                    self.end_full_outage()  # a clean stop waits for requests in flight: let them end
                elif saved:  # killed more than a moment after the last change: its listings are saved
                    self.mount.fs.kept_listings.save_now()
                self.mount.restart(crash=crash, drain_timeout=0.05 if self.outage else SYNC_TIMEOUT)
                # Killed while S3 is unreachable, and started again: what the restarted daemon knows
                # is what the cache dir kept. Without the last changes' listings, any call may fail.
                if self.full_outage is not None and not saved:
                    self.blind = True
                if self.full_outage is not None:
                    self.steps[-1] += " while S3 is unreachable" + (", listings saved" if saved else "")

            @rule(kind=st.sampled_from(sorted(FAULTS)), times=st.integers(1, 3),
                  op=st.sampled_from([None, *UPLOAD_OPERATIONS]))
            def fault(self, kind, times, op):
                if kind == "denied" and self.write_mode == "sync":
                    kind = "error503"  # a sync-mode close would fail where the model's does not
                ops = UPLOAD_OPERATIONS if op is None else op
                rule = self.store.inject(FAULTS[kind], ops, where=not_a_marker, times=times)
                if kind == "denied":
                    self.denied.append(rule)
                self.steps.append(f"fault {kind} x{times} on {op or 'uploads'}")

            # An outage: the store refuses every upload until it ends, so that closed files are
            # still pending when the next steps (a crash above all) come. Not in sync mode, whose
            # close would wait for it.
            @precondition(lambda self: self.outage is None and self.write_mode == "async")
            @rule()
            def outage_begins(self):
                self.outage = self.store.inject(fakestore.REFUSE, UPLOAD_OPERATIONS, where=not_a_marker)
                self.steps.append("outage begins")

            @precondition(lambda self: self.outage is not None)
            @rule()
            def outage_ends(self):
                self.end_outage()

            # S3 unreachable: every request refused, or hanging (then lookups wait the deadline
            # once and answer from kept listings; the uploads wait until the hang is released).
            @precondition(lambda self: self.outage is None and self.full_outage is None
                          and self.write_mode == "async")
            @rule(kind=st.sampled_from(["refuse", "hang"]))
            def full_outage_begins(self, kind):
                self.full_outage = self.store.inject(fakestore.REFUSE if kind == "refuse" else fakestore.HANG)
                self.steps.append(f"S3 unreachable ({kind})")

            @precondition(lambda self: self.full_outage is not None)
            @rule()
            def full_outage_ends(self):
                self.end_full_outage()

            @invariant()
            def same_names(self):
                # Not while blind: the root itself may not be listed yet (EIO, after the deadlines).
                if hasattr(self, "mount") and not self.blind:
                    assert sorted(self.vfs.tree()) == sorted(local_tree(self.model_root)), "\n".join(self.steps)

            # -- helpers ---------------------------------------------------------------

            def end_full_outage(self) -> None:
                self.blind = False
                if self.full_outage is not None:
                    self.full_outage.remove()
                    self.store.release()
                    self.full_outage = None
                    self.steps.append("S3 answers again")

            def end_outage(self) -> None:
                if self.outage is not None:
                    self.outage.remove()
                    self.outage = None
                    self.steps.append("outage ends")

            def sync_all(self) -> None:
                """Sync until nothing fails. A sync tries failed files again, so it may fail only if
                an AccessDenied fault struck while it ran; each does a limited number of times."""
                while True:
                    failures = self.mount.fs.sync(timeout=SYNC_TIMEOUT)
                    if not failures:
                        return
                    # Each failed sync must be explained by a denial not yet seen: one that struck
                    # while it ran, or before it (an eager part upload while the file was written).
                    struck = sum(rule.hits for rule in self.denied)
                    assert struck > self.denials_seen, f"sync failed: {failures}\n" + "\n".join(self.steps)
                    self.denials_seen = struck

            def teardown(self):
                if not hasattr(self, "mount"):
                    return
                try:
                    if self.final_crash:  # before the outage ends: what is still pending must be journaled
                        self.steps.append("crash+restart")
                        self.mount.restart(crash=True)
                        self.restarts += 1
                    self.end_outage()
                    self.end_full_outage()
                    self.sync_all()
                    expected = local_tree(self.model_root)
                    history = "\n".join(self.steps)
                    assert store_tree(self.store, self.mount.prefix) == expected, history
                    assert self.vfs.tree(with_bytes=True) == expected, history
                    # A fresh node (its own cache, no metadata caching) reads the same tree from the store.
                    fresh = InProcessMount(self.store, self.mount.cache_root.with_name(
                        self.mount.cache_root.name + "-fresh"), small_options(metadata_ttl=0, negative_ttl=0))
                    fresh.start()
                    try:
                        assert Vfs(fresh.fs).tree(with_bytes=True) == expected, history
                    finally:
                        fresh.stop()
                        shutil.rmtree(fresh.cache_root, ignore_errors=True)
                    self.store.clear_faults()
                    assert self.mount.stop(SYNC_TIMEOUT), history
                    assert self.store.uploads() == [], f"multipart uploads left behind\n{history}"
                    counts["sequences"] += 1
                    counts["operations"] += len(self.steps) - 1
                    counts["restarts"] += self.restarts
                    counts["faults"] += sum(step.startswith("fault") for step in self.steps)
                    counts["unreachable"] += sum(step.startswith("S3 unreachable") for step in self.steps)
                    counts["eio"] += sum(step.startswith("  (EIO") for step in self.steps)
                    counts["blind"] += sum(step.startswith("  (EIO: not listed") for step in self.steps)
                    counts["copied"] += self.store.count("upload_part_copy")
                finally:
                    self.store.clear_faults()
                    self.mount.close()
                    shutil.rmtree(self.mount.cache_root, ignore_errors=True)
                    shutil.rmtree(self.model_root, ignore_errors=True)

        CoreVersusLocal.TestCase.settings = settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
            suppress_health_check=list(HealthCheck))
        CoreVersusLocal.TestCase().runTest()

    print(f"\nin-process reference model: {counts['sequences']} sequences checked, {counts['operations']} "
          f"operations, {counts['restarts']} restarts or crashes, {counts['faults']} store faults, "
          f"{counts['unreachable']} times S3 unreachable ({counts['eio']} calls failed with EIO, "
          f"{counts['blind']} of them on names not listed before), "
          f"{counts['copied']} parts copied in the store (dedup)")
    assert counts["sequences"] >= min(EXAMPLES, 100)
