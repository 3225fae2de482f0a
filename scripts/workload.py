#!/usr/bin/env python3
"""Ordinary file operations through a real mount, compared with a local directory after each one.

The workload of issue 22: eight names (six in the mount's root, two in ``d/``),
long sequences of operations with no sync between them, each applied to the mount
and to a local directory:

* write (open with O_TRUNC, one write) of 0 B, 1 B, 4 KiB, 70,000 B, 3 MiB or 9 MiB;
* append of 1 B, 5,000 B or 1 MiB;
* truncate to a random length up to the size + 10;
* ``os.replace`` onto another of the names (often an existing one, sometimes itself);
* unlink;
* read of 100,000 bytes at a random offset.

After every operation both must have given the same result (errno, count, bytes)
and the eight names must exist alike with the same sizes. At the end: ``s3ckptfs
sync``, then the whole tree read through a fresh mount of the same prefix with its
own empty cache must equal the local directory, names and bytes.

With ``--processes N``, N processes run such sequences at the same time on one
mount, each in a directory of its own (``w0/`` ...) with its own local copy: the
daemon serves their requests concurrently (its queue, locks and commits are
shared), while each process's outcome stays comparable with a local directory.

It starts its own SeaweedFS (free loopback ports) and mounts with default options
(FUSE passthrough where the machine has it) plus any ``-o``; everything it starts
is unmounted and stopped at the end. Run it with the test environment's Python:

    .venv/bin/python scripts/workload.py --seeds 1-20 --steps 300
    .venv/bin/python scripts/workload.py --seconds 3600          # random seeds until the time is up
    .venv/bin/python scripts/workload.py --seeds 1-5 --processes 4

Exit status 1 if any sequence diverged; each divergence is printed with its seed,
the step and the operations before it, and the daemon log is kept.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from s3ckptfs import devserver  # noqa: E402
from s3ckptfs.mounts import is_mounted, read_pid, unmount_until_gone, wait_gone  # noqa: E402

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
    found: dict[str, bytes | None] = {}
    for current, subdirs, files in os.walk(root):
        for name in subdirs:
            found[os.path.relpath(os.path.join(current, name), root) + "/"] = None
        for name in files:
            found[os.path.relpath(os.path.join(current, name), root)] = Path(current, name).read_bytes()
    return found


class Mount:
    """One ``s3ckptfs mount`` in background mode, with its own cache dir."""

    def __init__(self, server: devserver.SeaweedServer, base: Path, url: str, options: list[str]) -> None:
        self.path = base / f"mnt-{uuid.uuid4().hex[:8]}"
        self.cache = base / f"cache-{uuid.uuid4().hex[:8]}"
        self.path.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.env.update(server.env())
        self.env.update(AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
        args = ["mount", url, str(self.path), "--cache-dir", str(self.cache), "--endpoint-url",
                server.endpoint_url, "--log-level", "debug"]
        for option in options:
            args += ["-o", option]
        result = self.cli(args, timeout=60)
        self.pid = read_pid(self.cache)
        if result.returncode != 0 or not is_mounted(self.path):
            raise RuntimeError(f"mount failed: {result.stderr.decode(errors='replace')}")

    def cli(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            result = subprocess.run([sys.executable, "-m", "s3ckptfs", *args], env=self.env, cwd=ROOT,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=timeout)
            out.seek(0)
            err.seek(0)
            return subprocess.CompletedProcess(result.args, result.returncode, out.read(), err.read())

    def sync(self) -> None:
        result = self.cli(["sync", str(self.path)], timeout=600)
        if result.returncode != 0:
            raise Divergence(f"sync failed: {result.stderr.decode(errors='replace')}")

    def close(self) -> None:
        if is_mounted(self.path):
            self.cli(["unmount", str(self.path)], timeout=600)
        unmount_until_gone(self.path, timeout=30)
        if self.pid is not None and not wait_gone(self.pid, 15):
            os.kill(self.pid, 15)
            wait_gone(self.pid, 10)


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


def run_sequence(server: devserver.SeaweedServer, base: Path, seed: int, steps: int,
                 options: list[str], processes: int = 1) -> str | None:
    """One sequence (or ``processes`` at once); returns None, or what diverged (the daemon log is kept then)."""
    bucket = f"workload-{uuid.uuid4().hex[:10]}"
    server.client().create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/run"
    mount = Mount(server, base, url, options)
    local = base / f"local-{uuid.uuid4().hex[:8]}"
    local.mkdir()
    diverged = None
    try:
        if processes == 1:
            found = [run_worker(str(seed), mount.path, local, steps)]
        else:
            with concurrent.futures.ProcessPoolExecutor(processes) as pool:
                found = list(pool.map(run_worker, [f"{seed}/{i}" for i in range(processes)],
                                      [mount.path / f"w{i}" for i in range(processes)],
                                      [local / f"w{i}" for i in range(processes)], [steps] * processes))
        problems = [problem for problem in found if problem is not None]
        if problems:
            raise Divergence("\n".join(problems))
        mount.sync()
        fresh = Mount(server, base, url, ["metadata_ttl=0", "negative_ttl=0"])
        try:
            seen, wanted = tree(fresh.path), tree(local)
            if seen != wanted:
                differ = [(k, len(seen[k]) if seen.get(k) else seen.get(k, "absent"),
                           len(wanted[k]) if wanted.get(k) else wanted.get(k, "absent"))
                          for k in sorted(set(seen) | set(wanted)) if seen.get(k, 0) != wanted.get(k, 0)]
                raise Divergence(f"after sync, a fresh mount differs (name, fresh, local): {differ}")
        finally:
            fresh.close()
    except Divergence as exc:
        diverged = f"{exc}\n  daemon log: {mount.cache / 's3ckptfs.log'}"
    finally:
        mount.close()
        shutil.rmtree(local, ignore_errors=True)
        if diverged is None:
            shutil.rmtree(mount.cache, ignore_errors=True)
        delete_bucket(server.client(), bucket)  # SeaweedFS gives each bucket volumes of its own
    return diverged


def delete_bucket(s3, bucket: str) -> None:
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    s3.delete_bucket(Bucket=bucket)


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += list(range(int(first), int(last) + 1)) if last else [int(first)]
    return seeds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", help="e.g. 1-20,33 (default: random seeds)")
    parser.add_argument("--seconds", type=float, default=0, help="with random seeds: run until this many seconds")
    parser.add_argument("--steps", type=int, default=300, help="operations per sequence (default 300)")
    parser.add_argument("-o", dest="options", action="append", default=[], help="mount option(s), key=value")
    parser.add_argument("--dir", help="scratch directory (default: a new one under /tmp)")
    parser.add_argument("--processes", type=int, default=1,
                        help="processes running sequences at once, each in its own directory (default 1)")
    args = parser.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="s3ckptfs-workload-"))
    base.mkdir(parents=True, exist_ok=True)
    server = devserver.start(base / "seaweedfs")
    started = time.monotonic()
    failures = runs = 0
    try:
        seeds = iter(parse_seeds(args.seeds)) if args.seeds else None
        while True:
            if seeds is not None:
                seed = next(seeds, None)
                if seed is None:
                    break
            elif runs and time.monotonic() - started >= args.seconds:
                break
            else:
                seed = random.randrange(1 << 32)
            diverged = run_sequence(server, base, seed, args.steps, args.options, args.processes)
            runs += 1
            failures += diverged is not None
            print(f"seed {seed}: " + ("ok" if diverged is None else f"DIVERGED {diverged}"), flush=True)
    finally:
        server.stop()
    print(f"{runs} sequences of {args.steps} operations, {failures} diverged, "
          f"{time.monotonic() - started:.0f} s; scratch: {base}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
