"""What users do to a checkpoint directory, drawn at random and checked against a local directory.

A *sequence* is a list of operations drawn from a seed (``draw``): whole-file
writes, patches, appends and truncates of sizes across the part size and the
single-PUT limit (0 B to several parts), renames onto existing names and onto
themselves, renames of files whose upload or move is still running, writes right
after a rename, unlinks, reads at offsets, symlinks (a trainer's ``last``) read
and replaced, descriptors kept open across rename and unlink, directories made,
removed and renamed (chained), ``sync`` in the middle of changes, a slow store,
uploads refused for a while, and crashes with a restart from the same cache dir.
No sync between operations unless drawn.

``Checker`` applies a sequence to the filesystem core in process (over
fakestore) and to a local directory, the model. Every call must give the same
result or the same errno; after every operation the whole tree must look the
same (names, types, sizes, link targets); at the end, after sync, the store must
hold the same tree (names and bytes), read back through a fresh instance with its
own empty cache, and no multipart upload may be left. ``shrink`` reduces a
failing sequence to a short one that still fails, to keep as a regression test.

Sizes are those of ``inproc.SMALL_SIZES``: 4 KiB parts, one PUT up to 6 KiB.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import time
from pathlib import Path
from typing import Callable

import fakestore
from fakestore import UPLOAD_OPERATIONS, FakeStore
from inproc import InProcessMount, Vfs, small_options

KiB = 1 << 10
FILES = ["f0", "f1", "f2", "f3", "last", "d/x", "d/y", "e/z"]
DIRS = ["d", "e", "g"]
SIZES = [0, 1, 1000, 4095, 4096, 4097, 6143, 6144, 6145, 8192, 12289, 30000]
APPENDS = [1, 500, 4096, 6145]
SLOW_OPERATIONS = UPLOAD_OPERATIONS + ("copy", "delete")
MAX_FDS = 3
MAX_CRASHES = 2

Op = tuple  # (name, *arguments): plain data, printable as a regression test


def draw(seed: int, steps: int) -> list[Op]:
    """A sequence of ``steps`` operations (plus its options, first) drawn from ``seed``."""
    rng = random.Random(seed)
    ops: list[Op] = [("options", rng.choice([0.0, 5.0]), rng.choice(["async", "async", "sync"]),
                      rng.random() < 0.5, rng.choice([0.0, 0.0, 0.003]))]
    kinds = (["write"] * 6 + ["patch"] * 2 + ["append"] * 3 + ["truncate"] * 3 + ["rename"] * 6
             + ["unlink"] * 2 + ["read"] * 3 + ["symlink"] * 2 + ["readlink"] + ["fd_open"] * 2
             + ["fd_write", "fd_read", "fd_stat", "fd_truncate", "fd_close"] + ["mkdir", "rmdir", "rename_dir"]
             + ["sync", "refuse_uploads", "crash"])
    for _ in range(steps):
        kind = rng.choice(kinds)
        name = rng.choice(FILES)
        if kind == "write":
            ops.append((kind, name, rng.choice(SIZES), rng.randrange(256)))
        elif kind == "patch":
            ops.append((kind, name, rng.choice(SIZES), rng.randrange(1, 5000), rng.randrange(256)))
        elif kind == "append":
            ops.append((kind, name, rng.choice(APPENDS), rng.randrange(256)))
        elif kind == "truncate":
            ops.append((kind, name, rng.random(), rng.randrange(12)))
        elif kind == "rename":
            ops.append((kind, name, name if rng.random() < 0.1 else rng.choice(FILES)))
        elif kind == "read":
            ops.append((kind, name, rng.random(), rng.choice([100, 5000, 100_000])))
        elif kind in ("unlink", "readlink"):
            ops.append((kind, name))
        elif kind == "symlink":  # made in the top directory: a target never leaves the tree, even once moved
            ops.append((kind, rng.choice(["last", "last", "f3"]), rng.choice(FILES + ["missing"])))
        elif kind in ("fd_open",):
            ops.append((kind, name, rng.choice(["rw", "rw", "ro", "trunc"])))
        elif kind in ("fd_write", "fd_read", "fd_stat", "fd_truncate", "fd_close"):
            ops.append((kind, rng.randrange(MAX_FDS), rng.choice(SIZES), rng.randrange(256)))
        elif kind in ("mkdir", "rmdir"):
            ops.append((kind, rng.choice(DIRS + ["e/q"])))
        elif kind == "rename_dir":
            ops.append((kind, rng.choice(DIRS), rng.choice(DIRS)))
        elif kind == "refuse_uploads":
            ops.append((kind, rng.randrange(1, 6)))
        else:
            ops.append((kind,))
    return ops


def outcome(action: Callable[[], object]) -> tuple[str, object]:
    try:
        return ("ok", action())
    except OSError as exc:
        return ("err", exc.errno)


class Divergence(AssertionError):
    pass


class LocalSide:
    """The model: the operations on a local directory, as a process would make them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fds: dict[int, int] = {}

    def p(self, rel: str) -> Path:
        return self.root / rel

    def write(self, rel: str, data: bytes) -> None:
        self.p(rel).write_bytes(data)

    def patch(self, rel: str, offset: int, data: bytes) -> int:
        fd = os.open(self.p(rel), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            return os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def append(self, rel: str, data: bytes) -> int:
        with open(self.p(rel), "ab") as stream:
            return stream.write(data)

    def size(self, rel: str) -> int:
        return os.stat(self.p(rel)).st_size

    def truncate(self, rel: str, length: int) -> None:
        os.truncate(self.p(rel), length)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.p(src), self.p(dst))

    def unlink(self, rel: str) -> None:
        os.unlink(self.p(rel))

    def read(self, rel: str, offset: int, length: int) -> bytes:
        fd = os.open(self.p(rel), os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def symlink(self, target: str, rel: str) -> None:
        os.symlink(target, self.p(rel))

    def readlink(self, rel: str) -> str:
        return os.readlink(self.p(rel))

    def mkdir(self, rel: str) -> None:
        os.mkdir(self.p(rel))

    def rmdir(self, rel: str) -> None:
        os.rmdir(self.p(rel))

    def fd_open(self, slot: int, rel: str, how: str) -> None:
        flags = {"rw": os.O_RDWR | os.O_CREAT, "ro": os.O_RDONLY, "trunc": os.O_RDWR | os.O_CREAT | os.O_TRUNC}[how]
        self.fds[slot] = os.open(self.p(rel), flags, 0o644)

    def fd_write(self, slot: int, offset: int, data: bytes) -> int:
        return os.pwrite(self.fds[slot], data, offset)

    def fd_read(self, slot: int, offset: int, length: int) -> bytes:
        return os.pread(self.fds[slot], length, offset)

    def fd_size(self, slot: int) -> int:
        return os.fstat(self.fds[slot]).st_size

    def fd_truncate(self, slot: int, length: int) -> None:
        os.ftruncate(self.fds[slot], length)

    def fd_close(self, slot: int) -> None:
        os.close(self.fds.pop(slot))

    def tree(self) -> dict[str, object]:
        return local_shape(self.root)


class CoreSide:
    """The same operations on the filesystem core, as the kernel would hand them to it."""

    def __init__(self, mount: InProcessMount) -> None:
        self.mount = mount
        self.fds: dict[int, tuple[int, str]] = {}   # slot -> (fh, path it was opened by)
        self.writable: dict[int, bool] = {}

    @property
    def vfs(self) -> Vfs:
        assert self.mount.fs is not None
        return Vfs(self.mount.fs)

    def follow(self, rel: str) -> str:
        """The kernel follows a symlink in the last component of a path it opens."""
        for _ in range(8):
            try:
                st = self.vfs.stat(rel)
            except OSError:
                return rel
            if not stat.S_ISLNK(st.st_mode):
                return rel
            target = self.mount.fs.readlink(self.vfs.path(rel))
            rel = os.path.normpath(os.path.join(os.path.dirname(rel), target))
        raise OSError(errno.ELOOP, rel)

    def write(self, rel: str, data: bytes) -> None:
        self.vfs.write_file(self.follow(rel), data)

    def patch(self, rel: str, offset: int, data: bytes) -> int:
        return self.vfs.write_at(self.follow(rel), offset, data)

    def append(self, rel: str, data: bytes) -> int:
        return self.vfs.append(self.follow(rel), data)

    def size(self, rel: str) -> int:
        return self.vfs.stat(self.follow(rel)).st_size

    def truncate(self, rel: str, length: int) -> None:
        self.vfs.truncate(self.follow(rel), length)

    def rename(self, src: str, dst: str) -> None:
        self.vfs.rename(src, dst)

    def unlink(self, rel: str) -> None:
        self.vfs.unlink(rel)

    def read(self, rel: str, offset: int, length: int) -> bytes:
        rel = self.follow(rel)
        fs = self.mount.fs
        fh = self.vfs.open(rel, os.O_RDONLY)
        try:
            return fs.read(fh, length, offset)
        finally:
            fs.release(fh)

    def symlink(self, target: str, rel: str) -> None:
        self.vfs.symlink(target, rel)

    def readlink(self, rel: str) -> str:
        st = self.vfs.stat(rel)
        if not stat.S_ISLNK(st.st_mode):
            raise OSError(errno.EINVAL, rel)
        return self.mount.fs.readlink(self.vfs.path(rel))

    def mkdir(self, rel: str) -> None:
        self.vfs.mkdir(rel)

    def rmdir(self, rel: str) -> None:
        self.vfs.rmdir(rel)

    def fd_open(self, slot: int, rel: str, how: str) -> None:
        flags = {"rw": os.O_RDWR | os.O_CREAT, "ro": os.O_RDONLY, "trunc": os.O_RDWR | os.O_CREAT | os.O_TRUNC}[how]
        rel = self.follow(rel)
        self.fds[slot] = (self.vfs.open(rel, flags), self.vfs.path(rel))
        self.writable[slot] = how != "ro"

    def fd_write(self, slot: int, offset: int, data: bytes) -> int:
        fh, _ = self.fds[slot]
        if not self.writable[slot]:
            raise OSError(errno.EBADF, "not open for writing")  # the kernel's answer
        return self.mount.fs.write(fh, data, offset)

    def fd_read(self, slot: int, offset: int, length: int) -> bytes:
        fh, _ = self.fds[slot]
        return self.mount.fs.read(fh, length, offset)

    def fd_size(self, slot: int) -> int:
        fh, path = self.fds[slot]
        return self.mount.fs.getattr(path, fh).size

    def fd_truncate(self, slot: int, length: int) -> None:
        fh, path = self.fds[slot]
        if not self.writable[slot]:
            raise OSError(errno.EINVAL, "not open for writing")  # the kernel's answer
        self.mount.fs.truncate(path, length, fh)

    def fd_close(self, slot: int) -> None:
        fh, _ = self.fds.pop(slot)
        self.vfs.close(fh)

    def tree(self) -> dict[str, object]:
        return core_shape(self.vfs)


def local_shape(root: Path, with_bytes: bool = False) -> dict[str, object]:
    """rel -> "dir" | ("link", target) | size (or bytes): the tree as a process sees it."""
    found: dict[str, object] = {}
    for current, subdirs, files in os.walk(root):
        rel_dir = os.path.relpath(current, root)
        for name in subdirs + files:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            path = Path(current, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = "dir"
            else:
                found[rel] = path.read_bytes() if with_bytes else st.st_size
    return found


def core_shape(vfs: Vfs, with_bytes: bool = False) -> dict[str, object]:
    found: dict[str, object] = {}
    fs = vfs.fs

    def visit(rel: str) -> None:
        for name, _ in fs.readdir(vfs.path(rel)):
            child = f"{rel}/{name}" if rel else name
            st = fs.getattr(vfs.path(child))
            if stat.S_ISDIR(st.mode):
                found[child] = "dir"
                visit(child)
            elif stat.S_ISLNK(st.mode):
                found[child] = ("link", fs.readlink(vfs.path(child)))
            else:
                found[child] = vfs.read_bytes(child) if with_bytes else st.size

    visit("")
    return found


class Checker:
    """Runs sequences on the core and on a local directory under ``base``; raises Divergence."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runs = 0

    def run(self, ops: list[Op]) -> dict[str, int]:
        """Apply ``ops``; returns counts of what ran. Raises Divergence with the steps so far."""
        self.runs += 1
        work = self.base / f"run{self.runs}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        _, ttl, write_mode, checksums, latency = ops[0]
        store = FakeStore()
        if latency:  # uploads and namespace changes in S3 take a while: they are in flight meanwhile
            store.inject(fakestore.latency(latency), SLOW_OPERATIONS)
        options = small_options(metadata_ttl=ttl, negative_ttl=ttl, write_mode=write_mode, checksums=checksums)
        mount = InProcessMount(store, work / "cache", options)
        (work / "model").mkdir()
        local, core = LocalSide(work / "model"), CoreSide(mount)
        mount.start()
        steps: list[str] = [repr(ops[0])]
        state = {"refused": 0, "crashes": 0}
        try:
            for op in ops[1:]:
                steps.append(repr(op))
                self._step(op, local, core, store, mount, state, steps)
                expected, actual = local.tree(), core.tree()
                if expected != actual:
                    raise Divergence(f"after {op!r}: tree differs\n  local {expected}\n  core  {actual}")
            for slot in list(local.fds):
                self._both(lambda side: side.fd_close(slot), local, core, f"close fd {slot}")
            store.clear_faults()
            if latency:
                store.inject(fakestore.latency(latency), SLOW_OPERATIONS)
            failures = mount.fs.sync(timeout=30)
            if failures:
                raise Divergence(f"final sync failed: {failures}")
            expected = local_shape(local.root, with_bytes=True)
            actual = core_shape(core.vfs, with_bytes=True)
            if actual != expected:
                raise Divergence(f"at the end, the mount differs from the model:\n{diff(expected, actual)}")
            fresh = InProcessMount(store, work / "fresh", small_options(metadata_ttl=0, negative_ttl=0))
            fresh.start()
            try:
                again = core_shape(Vfs(fresh.fs), with_bytes=True)
            finally:
                fresh.stop(5)
            if again != expected:
                raise Divergence(f"a fresh mount with an empty cache reads another tree:\n{diff(expected, again)}")
            store.clear_faults()
            if not mount.stop(30):
                raise Divergence("uploads did not drain at the end")
            if store.uploads():
                raise Divergence(f"multipart uploads left behind: {store.uploads()}")
            return {"operations": len(ops) - 1, "crashes": state["crashes"]}
        except Divergence as exc:
            raise Divergence(f"{exc}\nsteps:\n  " + "\n  ".join(steps)) from None
        except OSError as exc:  # a call outside the compared ones (the final reads) failed
            raise Divergence(f"{exc!r}\nsteps:\n  " + "\n  ".join(steps)) from None
        finally:
            for fd in local.fds.values():
                os.close(fd)
            store.clear_faults()
            mount.close()
            shutil.rmtree(work, ignore_errors=True)

    def _both(self, action: Callable[[object], object], local: LocalSide, core: CoreSide, what: str) -> None:
        expected = outcome(lambda: action(local))
        actual = outcome(lambda: action(core))
        if expected != actual:
            show = (lambda o: (o[0], len(o[1])) if isinstance(o[1], bytes) and o[1] and len(o[1]) > 64 else o)
            raise Divergence(f"{what}: local directory {show(expected)}, mount {show(actual)}")

    def _step(self, op: Op, local: LocalSide, core: CoreSide, store: FakeStore, mount: InProcessMount,
              state: dict, steps: list[str]) -> None:
        kind = op[0]
        both = lambda action, what=repr(op): self._both(action, local, core, what)  # noqa: E731
        if kind == "write":
            _, name, size, fill = op
            both(lambda side: side.write(name, bytes([fill]) * size))
        elif kind == "patch":
            _, name, size, length, fill = op
            both(lambda side: side.patch(name, size, bytes([fill]) * length))
        elif kind == "append":
            _, name, size, fill = op
            both(lambda side: side.append(name, bytes([fill]) * size))
        elif kind == "truncate":
            _, name, fraction, extra = op
            try:
                length = int(fraction * local.size(name)) + extra
            except OSError:
                length = extra
            both(lambda side: side.truncate(name, length))
        elif kind == "rename":
            _, src, dst = op
            both(lambda side: side.rename(src, dst))
        elif kind == "unlink":
            both(lambda side: side.unlink(op[1]))
        elif kind == "read":
            _, name, fraction, length = op
            try:
                offset = int(fraction * local.size(name))
            except OSError:
                offset = 0
            both(lambda side: side.read(name, offset, length))
        elif kind == "symlink":
            _, name, target = op
            both(lambda side: side.symlink(target, name))
        elif kind == "readlink":
            both(lambda side: side.readlink(op[1]))
        elif kind == "fd_open":
            _, name, how = op
            slot = next((s for s in range(MAX_FDS) if s not in local.fds), None)
            if slot is not None:
                both(lambda side: side.fd_open(slot, name, how), f"{op!r} as fd {slot}")
        elif kind.startswith("fd_"):
            _, slot, size, fill = op
            if slot not in local.fds:
                return
            if kind == "fd_write":
                both(lambda side: side.fd_write(slot, size // 2, bytes([fill]) * (size // 2 + 1)))
            elif kind == "fd_read":
                both(lambda side: side.fd_read(slot, size // 3, 5000))
            elif kind == "fd_stat":
                both(lambda side: side.fd_size(slot))
            elif kind == "fd_truncate":
                both(lambda side: side.fd_truncate(slot, size))
            else:
                both(lambda side: side.fd_close(slot))
        elif kind == "mkdir":
            both(lambda side: side.mkdir(op[1]))
        elif kind == "rmdir":
            both(lambda side: side.rmdir(op[1]))
        elif kind == "rename_dir":
            _, src, dst = op
            if src != dst:
                both(lambda side: side.rename(src, dst))
        elif kind == "sync":
            failures = mount.fs.sync(timeout=30) if not state["refused"] else []
            if failures:
                raise Divergence(f"sync failed: {failures}")
        elif kind == "refuse_uploads":
            if not state["refused"]:
                state["refused"] = op[1]
                state["rule"] = store.inject(fakestore.REFUSE, UPLOAD_OPERATIONS,
                                             where=lambda _op, key: not key.endswith("/"))
                if mount.options.write_mode == "sync":  # a sync-mode close would wait for it
                    state["rule"].remove()
                    state["refused"] = 0
        elif kind == "crash":
            if state["crashes"] < MAX_CRASHES:
                state["crashes"] += 1
                for slot in list(local.fds):  # the processes holding them exit first (a file never
                    self._both(lambda side: side.fd_close(slot), local, core, f"close fd {slot}")  # closed is not kept)
                mount.restart(crash=True)
        if state["refused"]:
            state["refused"] -= 1
            if not state["refused"]:
                state["rule"].remove()


def diff(expected: dict[str, object], actual: dict[str, object]) -> str:
    def brief(value: object) -> object:
        return len(value) if isinstance(value, bytes) else value
    names = sorted(set(expected) | set(actual))
    return "\n".join(f"  {name}: model {brief(expected.get(name, '-'))}, mount {brief(actual.get(name, '-'))}"
                     for name in names if expected.get(name, "-") != actual.get(name, "-"))


def shrink(checker: Checker, ops: list[Op], tries: int = 3, budget: float = 60.0) -> list[Op]:
    """A shorter sequence that still fails (each candidate run ``tries`` times: timing varies)."""
    deadline = time.monotonic() + budget

    def fails(candidate: list[Op]) -> bool:
        for _ in range(tries):
            try:
                checker.run(candidate)
            except Divergence:
                return True
        return False

    chunk = max(1, (len(ops) - 1) // 2)
    while chunk >= 1 and time.monotonic() < deadline:
        index, reduced = 1, False
        while index < len(ops) and time.monotonic() < deadline:
            candidate = ops[:index] + ops[index + chunk:]
            if len(candidate) > 1 and fails(candidate):
                ops, reduced = candidate, True
            else:
                index += chunk
        if not reduced:
            chunk //= 2
    return ops
