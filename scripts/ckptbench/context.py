"""What one size's measurements share: the server, the state dict, buckets, scratch dirs.

Also how the benchmark watches S3 from outside (HEAD until an object is
complete; the server's bytes written, to count downloads).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from s3ckptfs import devserver
from s3ckptfs.mounts import is_mounted

from .common import MiB, Janitor, MeasurementError, format_size, log
from .workload import CHECKPOINT_NAME, drop_page_cache, make_state_dict, warm_free_memory

if TYPE_CHECKING:
    from .peers import Tools

HEAD_POLL_SECONDS = 0.02


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
    drop_caches: bool = True    # False: leave the page cache alone (quick runs on a shared machine)
    warm_memory: bool = False   # see workload.warm_free_memory
    checkpoint_bytes: int | None = None
    # --link-rate: the mounts and the upload floor reach the server through a bandwidth-limited
    # proxy (s3ckptfs/linkproxy.py); setup and the HEAD polls that time durability go direct.
    link_url: str | None = None
    link_client: Any = None
    _state: dict[str, torch.Tensor] | None = None
    _read_bucket: str | None = None
    _listing_bucket: str | None = None
    _download_cost: int | None = None
    _counter: int = 0

    # -- shared inputs

    @property
    def s3_endpoint(self) -> str:
        """Where the daemon under test sends its requests: through the link, if there is one."""
        return self.link_url or self.server.endpoint_url

    @property
    def upload_client(self) -> Any:
        """The boto3 client of the upload floor: through the same link as the daemon."""
        return self.link_client or self.client

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
        dropped = drop_page_cache() if self.drop_caches else False
        if self.warm_memory:
            warm_free_memory(self.size + self.size // 4)
        if not dropped and self.page_cache_dropped:
            self.page_cache_dropped = False
            if self.drop_caches:
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

    def ensure_listing_bucket(self, objects: int, folder: str, object_bytes: int) -> str:
        """A bucket with ``objects`` small objects under ``folder/`` (made once per size)."""
        if self._listing_bucket is None:
            name = self.new_bucket_name("listing")
            self.janitor.add(f"delete bucket {name}", lambda: delete_bucket(self.client, name))
            self.client.create_bucket(Bucket=name)
            body = b"x" * object_bytes
            with concurrent.futures.ThreadPoolExecutor(10) as pool:
                list(pool.map(lambda i: self.client.put_object(Bucket=name, Key=f"{folder}/obj-{i:05d}", Body=body),
                              range(objects)))
            self._listing_bucket = name
        return self._listing_bucket

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

    def wait_durable(self, bucket: str, start: float, expected: int) -> float:
        """Seconds from ``start`` until the checkpoint (``expected`` bytes) is complete in ``bucket``."""
        return wait_for_object(self.client, bucket, CHECKPOINT_NAME, expected, start, durable_timeout(self.size))

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
            if not is_mounted(mountpoint):
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
    """How long a save of ``size`` bytes may take to reach S3 before the measurement fails."""
    return 120.0 + size / (5 * MiB)

