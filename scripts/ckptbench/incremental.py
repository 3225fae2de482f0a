"""Incremental checkpoints (``-o dedup=on``): a second save that shares bytes with the first.

Each sample mounts a fresh bucket with ``-o dedup=on``, saves the state dict
once (``step_1.pt``, its *first durable* time measured as for any write), then
saves a second state dict and measures its stall and durable time:

* ``s3ckptfs_incremental_N``: the next step (``step-2/ckpt.pt`` after
  ``step-1/ckpt.pt``, as trainers lay them out), with the first N% of the tensors
  unchanged (a frozen backbone: torch.save lays tensors out at the same offsets
  when the structure is the same, so the unchanged ones fill the same parts);
  the others are new values. N=0 is a save with nothing in common: it shows
  what hashing every part costs.
* ``s3ckptfs_second_name``: Lightning's ``save_last=True``: the same state
  saved again under a second name right after the first save returns, while
  the first is still uploading (no wait for it); each save serializes into
  memory and writes the buffer, as Lightning does, so both files hold the same
  bytes. ``s3ckptfs_second_name_off`` is the same with ``-o dedup=off``.

``sent_mib`` and ``copied_mib`` are the part bytes the daemon sent and had S3
copy for the second save (from ``s3ckptfs status --json``; for the second
name, everything since the mount less one checkpoint, since the first save is
still uploading when the second begins).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .common import MiB
from .context import Bench, durable_timeout, wait_for_object
from .peers import s3ckptfs_env, s3ckptfs_mount
from .workload import CHECKPOINT_NAME

# Trainer-style: each step in its own directory, the same file name (torch.save names the records in
# its zip after the file, so two names give different bytes; Lightning's in-memory save below does not).
FIRST, SECOND = "step-1", "step-2"


def changed_state(state: dict[str, torch.Tensor], unchanged: float) -> dict[str, torch.Tensor]:
    """``state`` with the first ``unchanged`` fraction of its tensors kept, the rest new values."""
    names = list(state)
    keep = int(len(names) * unchanged)
    generator = torch.Generator().manual_seed(7)
    return {name: state[name] if index < keep else torch.rand(state[name].numel(), generator=generator)
            for index, name in enumerate(names)}


def part_bytes(b: Bench, mountpoint: Any) -> tuple[int, int]:
    assert b.tools.s3ckptfs is not None
    result = subprocess.run([b.tools.s3ckptfs, "status", str(mountpoint), "--json"], capture_output=True,
                            text=True, timeout=60, env=s3ckptfs_env(b))
    answer = json.loads(result.stdout)
    return answer.get("part_bytes_sent", 0), answer.get("part_bytes_copied", 0)


def save_file(state: dict[str, torch.Tensor], path: Path) -> None:
    torch.save(state, path)


def save_through_memory(state: dict[str, torch.Tensor], path: Path) -> None:
    """As Lightning does: torch.save into a buffer, then the buffer written to the file (same bytes for any name)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def second_save(b: Bench, unchanged: float | None, options: str = "dedup=on") -> dict[str, float]:
    """The first save, then the second (``unchanged`` None: the same state under a second name)."""
    state = b.state()
    timeout = durable_timeout(b.size)
    with b.bucket("s3ckptfs-incremental") as bucket, s3ckptfs_mount(b, bucket, options) as mount:
        if unchanged is None:
            save, first, second_path = save_through_memory, "epoch=1-step=100.ckpt", "last.ckpt"
        else:
            save, first, second_path = save_file, f"{FIRST}/{CHECKPOINT_NAME}", f"{SECOND}/{CHECKPOINT_NAME}"
            (mount.path / FIRST).mkdir()
            (mount.path / SECOND).mkdir()
        b.drop_cache()
        sent_before, copied_before = part_bytes(b, mount.path)
        start = time.perf_counter()
        save(state, mount.path / first)
        first_stall = time.perf_counter() - start
        size = os.stat(mount.path / first).st_size
        if unchanged is None:
            second = state
        else:
            first_durable = wait_for_object(b.client, bucket, first, size, start, timeout)
            second = changed_state(state, unchanged)
            b.drop_cache()
            sent_before, copied_before = part_bytes(b, mount.path)
        start2 = time.perf_counter()
        save(second, mount.path / second_path)
        stall = time.perf_counter() - start2
        if unchanged is None:
            first_durable = wait_for_object(b.client, bucket, first, size, start, timeout)
        durable = wait_for_object(b.client, bucket, second_path, size, start2, timeout)
        sent, copied = part_bytes(b, mount.path)
        if unchanged is None:
            sent -= size  # counted from before the first save, which sent every byte
        # Objects appear in close order: the second is complete only after the first. "after_first":
        # how long after the first it was complete.
        after_first = (start2 + durable) - (start + first_durable)
        return {"first_stall": first_stall, "first_durable": first_durable, "stall": stall, "durable": durable,
                "after_first": after_first, "sent_mib": (sent - sent_before) / MiB,
                "copied_mib": (copied - copied_before) / MiB}


def incremental(unchanged: float):
    def measure(b: Bench) -> dict[str, float]:
        return second_save(b, unchanged)
    measure.__doc__ = f"a second save with {unchanged:.0%} of the tensors unchanged, -o dedup=on"
    return measure


def second_name(b: Bench) -> dict[str, float]:
    """The same state saved again under a second name right away (save_last=True), -o dedup=on."""
    return second_save(b, None)


def second_name_without_dedup(b: Bench) -> dict[str, float]:
    """The baseline of ``second_name``: the same two saves with -o dedup=off."""
    return second_save(b, None, options="dedup=off")


# -- the cases: every save into an open file, as Lightning saves (torch.save into a file object
# names its zip records "archive", whatever the file is called: the same state gives the same bytes).


def save_into_open_file(state: dict[str, torch.Tensor], path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(state, handle)


def next_save(b: Bench, unchanged: float, options: str = "") -> dict[str, float]:
    """Save, wait until durable, then save the next step (``unchanged`` of its tensors as before;
    1.0: the same bytes under a second name). ``ratio``: its durable time / the first save's."""
    state = b.state()
    timeout = durable_timeout(b.size)
    with b.bucket("s3ckptfs-next") as bucket, s3ckptfs_mount(b, bucket, options) as mount:
        first, second_path = "step-1.ckpt", "step-2.ckpt" if unchanged < 1 else "last.ckpt"
        b.drop_cache()
        start = time.perf_counter()
        save_into_open_file(state, mount.path / first)
        first_stall = time.perf_counter() - start
        size = os.stat(mount.path / first).st_size
        first_durable = wait_for_object(b.client, bucket, first, size, start, timeout)
        second = changed_state(state, unchanged) if unchanged < 1 else state
        b.drop_cache()
        sent_before, copied_before = part_bytes(b, mount.path)
        start2 = time.perf_counter()
        save_into_open_file(second, mount.path / second_path)
        stall = time.perf_counter() - start2
        durable = wait_for_object(b.client, bucket, second_path, size, start2, timeout)
        sent, copied = part_bytes(b, mount.path)
        return {"first_stall": first_stall, "first_durable": first_durable, "stall": stall, "durable": durable,
                "ratio": durable / first_durable, "sent_mib": (sent - sent_before) / MiB,
                "copied_mib": (copied - copied_before) / MiB}


def next_step(unchanged: float):
    def measure(b: Bench, options: str = "") -> dict[str, float]:
        return next_save(b, unchanged, options)
    measure.__doc__ = f"the next save into an open file, {unchanged:.0%} of the tensors unchanged"
    return measure


# -- what the server itself needs to copy the bytes: the floors the ratios above are read against

PART = 8 * MiB   # s3ckptfs's part size for the first parts (partplan.py)


def copy_floor(b: Bench) -> dict[str, float]:
    """boto3 CopyObject of the checkpoint to a second key: the server-side copy of the whole object."""
    with b.bucket("copy-floor") as bucket:
        b.client.upload_file(str(b.ensure_local_file()), bucket, CHECKPOINT_NAME, Config=b.transfer)
        start = time.perf_counter()
        b.client.copy_object(Bucket=bucket, Key="copy.pt", CopySource={"Bucket": bucket, "Key": CHECKPOINT_NAME})
        return {"seconds": time.perf_counter() - start}


def part_copy_floor(b: Bench) -> dict[str, float]:
    """Every 8 MiB range of the checkpoint made with UploadPartCopy into an upload with CRC32C checksums,
    as many at once as boto3's transfers use: what the server needs to build an object from copied parts."""
    with b.bucket("part-copy-floor") as bucket:
        b.client.upload_file(str(b.ensure_local_file()), bucket, CHECKPOINT_NAME, Config=b.transfer)
        size = b.client.head_object(Bucket=bucket, Key=CHECKPOINT_NAME)["ContentLength"]
        start = time.perf_counter()
        upload = b.client.create_multipart_upload(Bucket=bucket, Key="copy.pt", ChecksumAlgorithm="CRC32C")["UploadId"]

        def copy(number: int) -> dict[str, Any]:
            first = (number - 1) * PART
            result = b.client.upload_part_copy(
                Bucket=bucket, Key="copy.pt", UploadId=upload, PartNumber=number,
                CopySource={"Bucket": bucket, "Key": CHECKPOINT_NAME},
                CopySourceRange=f"bytes={first}-{min(size, first + PART) - 1}")["CopyPartResult"]
            return {"PartNumber": number, "ETag": result["ETag"], "ChecksumCRC32C": result["ChecksumCRC32C"]}
        with ThreadPoolExecutor(b.transfer.max_concurrency) as pool:
            parts = list(pool.map(copy, range(1, -(-size // PART) + 1)))
        b.client.complete_multipart_upload(Bucket=bucket, Key="copy.pt", UploadId=upload,
                                           MultipartUpload={"Parts": parts})
        return {"seconds": time.perf_counter() - start}
