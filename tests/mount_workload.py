"""Ordinary file operations through a real mount, compared with a local directory after each one.

The workload of issue 22, shared by ``tests/test_workload_processes.py`` (a short
run in every suite run) and ``scripts/workload.py`` (long runs): eight names (six
in the directory's root, two in ``d/``), long sequences of operations with no
sync between them, each applied to the mount and to a local directory:

* write (open with O_TRUNC, one write) of 0 B, 1 B, 4 KiB, 70,000 B, 3 MiB or 9 MiB;
* append of 1 B, 5,000 B or 1 MiB;
* truncate to a random length up to the size + 10;
* ``os.replace`` onto another of the names (often an existing one, sometimes itself);
* unlink;
* read of 100,000 bytes at a random offset.

After every operation both must have given the same result (errno, count, bytes)
and the eight names must exist alike with the same sizes. ``run_processes`` runs
several such sequences at the same time, each in a directory of its own on one
mount (``w0/`` ...) with its own local copy: the daemon serves their requests
concurrently (its queue, locks and commits are shared), while each process's
outcome stays comparable with a local directory.
"""

from __future__ import annotations

import concurrent.futures
import errno
import multiprocessing
import os
import random
from pathlib import Path

KiB, MiB = 1 << 10, 1 << 20
NAMES = [f"f{i}.pt" for i in range(6)] + ["d/x.bin", "d/y.bin"]
WRITE_SIZES = [0, 1, 4 * KiB, 70_000, 3 * MiB, 9 * MiB]
APPEND_SIZES = [1, 5_000, MiB]
READ_LENGTH = 100_000


class Divergence(Exception):
    pass


def outcome(action):
    try:
        return ("ok", action())
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, exc.errno))


def shown(result):
    if result[0] == "ok" and isinstance(result[1], bytes):
        return ("ok", f"{len(result[1])} bytes")
    return result


def write_whole(path: Path, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def append(path: Path, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def read_at(path: Path, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, READ_LENGTH, offset)
    finally:
        os.close(fd)


def sizes(root: Path) -> dict[str, int]:
    found = {}
    for name in NAMES:
        try:
            found[name] = os.lstat(root / name).st_size
        except FileNotFoundError:
            pass
    return found


def tree(root: Path) -> dict[str, bytes | None]:
    """Every directory (``name/`` -> None) and file (name -> bytes) below ``root``."""
    found: dict[str, bytes | None] = {}
    for current, subdirs, files in os.walk(root):
        for name in subdirs:
            found[os.path.relpath(os.path.join(current, name), root) + "/"] = None
        for name in files:
            found[os.path.relpath(os.path.join(current, name), root)] = Path(current, name).read_bytes()
    return found


def tree_difference(seen: dict[str, bytes | None], wanted: dict[str, bytes | None]) -> list[tuple]:
    """(name, size or None or "absent" as seen, the same as wanted) for each name that differs."""
    def brief(found: dict[str, bytes | None], name: str) -> object:
        return len(found[name]) if found.get(name) else found.get(name, "absent")
    return [(name, brief(seen, name), brief(wanted, name)) for name in sorted(set(seen) | set(wanted))
            if seen.get(name, 0) != wanted.get(name, 0)]


def operation(rng: random.Random, local: Path):
    """One operation drawn as the issue describes: (description, action(root))."""
    now = sizes(local)
    name = rng.choice(NAMES)
    kind = rng.choice(["write", "write", "append", "truncate", "rename", "unlink", "read"])
    if kind == "write":
        data = rng.randbytes(rng.choice(WRITE_SIZES))
        return f"write {name} {len(data)}", lambda root: write_whole(root / name, data)
    if kind == "append":
        data = rng.randbytes(rng.choice(APPEND_SIZES))
        return f"append {name} {len(data)}", lambda root: append(root / name, data)
    if kind == "truncate":
        length = rng.randint(0, now.get(name, 0) + 10)
        return f"truncate {name} {length}", lambda root: os.truncate(root / name, length)
    if kind == "rename":
        draw = rng.random()
        existing = [n for n in NAMES if n in now and n != name]
        if draw < 0.15:
            dst = name
        elif draw < 0.75 and existing:
            dst = rng.choice(existing)
        else:
            dst = rng.choice(NAMES)
        return f"rename {name} -> {dst}", lambda root: os.replace(root / name, root / dst)
    if kind == "unlink":
        return f"unlink {name}", lambda root: os.unlink(root / name)
    offset = rng.randint(0, now.get(name, 0))
    return f"read {name} @{offset}", lambda root: read_at(root / name, offset)


def run_worker(seed: str, mounted: Path, local: Path, steps: int) -> str | None:
    """One process's sequence in its own directories; None, or what diverged and the steps before."""
    rng = random.Random(seed)
    history: list[str] = []
    try:
        for root in (mounted, local):
            os.makedirs(root / "d", exist_ok=True)
        for step in range(steps):
            what, action = operation(rng, local)
            history.append(what)
            expected = outcome(lambda: action(local))
            actual = outcome(lambda: action(mounted))
            if actual != expected:
                raise Divergence(f"step {step}, {what}: mount {shown(actual)}, local {shown(expected)}")
            if sizes(mounted) != sizes(local):
                raise Divergence(f"step {step}, after {what}: mount {sizes(mounted)}, local {sizes(local)}")
    except Divergence as exc:
        return f"{mounted.name or 'root'}: {exc}\n  operations before it:\n    " + "\n    ".join(history[-30:])
    return None


def run_processes(seed: int, mounted: Path, local: Path, steps: int, processes: int) -> list[str]:
    """``processes`` sequences at once, process i in ``w{i}/`` of both roots (seeded ``{seed}/{i}``);
    what diverged, one entry per process that did (empty if none)."""
    if processes == 1:
        found = [run_worker(str(seed), mounted, local, steps)]
    else:
        # Started fresh, not forked: the caller (a test process) may hold locks in other threads.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
            found = list(pool.map(run_worker, [f"{seed}/{i}" for i in range(processes)],
                                  [mounted / f"w{i}" for i in range(processes)],
                                  [local / f"w{i}" for i in range(processes)], [steps] * processes))
    return [problem for problem in found if problem is not None]
