#!/usr/bin/env python3
"""The workload of issue 22 through a real mount, for as long as asked.

The operations, the comparison with a local directory after each one and the
several processes at once are those of ``tests/mount_workload.py`` (the suite
runs a short version of it, ``tests/test_workload_processes.py``). This script
runs longer sequences, one after the other: each on a fresh bucket, then
``s3ckptfs sync``, then the whole tree read through a fresh mount of the same
prefix with its own empty cache must equal the local directory, names and bytes.

With ``--processes N``, N processes run such sequences at the same time on one
mount, each in a directory of its own (``w0/`` ...) with its own local copy.

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
sys.path.insert(0, str(ROOT / "tests"))  # the workload itself: one implementation, shared with the suite

from mount_workload import Divergence, run_processes, tree, tree_difference  # noqa: E402
from s3ckptfs import devserver  # noqa: E402
from s3ckptfs.mounts import is_mounted, read_pid, unmount_until_gone, wait_gone  # noqa: E402


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
        problems = run_processes(seed, mount.path, local, steps, processes)
        if problems:
            raise Divergence("\n".join(problems))
        mount.sync()
        fresh = Mount(server, base, url, ["metadata_ttl=0", "negative_ttl=0"])
        try:
            seen, wanted = tree(fresh.path), tree(local)
            if seen != wanted:
                raise Divergence(f"after sync, a fresh mount differs (name, fresh, local): "
                                 f"{tree_difference(seen, wanted)}")
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
