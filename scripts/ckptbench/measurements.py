"""The measurements, each named by what it measures, and the order they run in.

Write side: the time until ``torch.save`` returns (*stall*) and until the object
is complete in S3 (*durable*, found by polling HEAD every 20 ms for the expected
size). Read side: the time ``torch.load`` takes, cold (page cache dropped, fresh
mount, empty cache) unless the name says otherwise; cold loads also report
*downloads*, the bytes the server sent during the load divided by what one plain
GET of the object costs it (1.0: the checkpoint was fetched once). Every loaded
state dict is checked against the original.

The one-letter names of earlier runs (``--only a,b,g`` in docs/bench/) and the
earlier keys are still accepted by ``--only``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .common import MeasurementError, log
from .context import Bench, durable_timeout
from .incremental import (copy_floor, incremental, next_step, part_copy_floor, second_name,
                          second_name_without_dedup)
from .multinode import multinode
from .peers import peak_rss_mib, rclone_mount, s3ckptfs_mount, s3fs_mount, s3torchconnector_checkpoint
from .workload import (CHECKPOINT_NAME, CONCURRENT_LOADERS, check_loaded, copy_in_pieces, loader_processes,
                       read_whole_file, run_loaders, timed_load, timed_save)

TIME_METRICS = ("seconds", "stall", "durable", "first_stall", "first_durable", "after_first", "local_stall",
                "floor", "stall_max")

LISTING_OBJECTS = 10_000
LISTING_DIR = "many"
LISTING_OBJECT_BYTES = 8 * 1024  # small shards; at most 4 KiB would need a HEAD each to rule out a symlink
ABSENT_NAMES = 20                # a stat storm: the same few missing names, over and over
STORM_ROUNDS = 500


@dataclass(frozen=True)
class Measurement:
    key: str                      # its name in --only, bench.json and the ratios
    label: str                    # its name in the tables and the chart
    side: str                     # "write" (runs first, with the state dict in memory) or "read"
    tool: str | None              # entry of Tools.missing that disables it
    function: Callable[[Bench], dict[str, float]]
    aliases: tuple[str, ...] = ()  # earlier names (a letter, an older key), still accepted by --only


# --------------------------------------------------------------------------- write side


def local_save(b: Bench) -> dict[str, float]:
    """torch.save to local disk (the same disk as every cache dir)."""
    path = b.local_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    state = b.state()
    b.drop_cache()
    seconds = timed_save(state, path)
    b.checkpoint_bytes = path.stat().st_size
    return {"seconds": seconds}


def local_save_fsync(b: Bench) -> dict[str, float]:
    """torch.save, then fsync: the durability s3ckptfs gives at close (the staging file is
    on disk before close returns, so a crash of the node cannot lose a closed checkpoint)."""
    path = b.work_dir / "local" / f"{b.label}-fsync" / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    state = b.state()
    b.drop_cache()
    try:
        start = time.perf_counter()
        torch.save(state, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return {"seconds": time.perf_counter() - start}
    finally:
        path.unlink(missing_ok=True)


def upload_floor(b: Bench) -> dict[str, float]:
    """boto3 upload_file of the saved checkpoint, tuned, the file already in the page cache."""
    path = b.ensure_local_file()
    with b.bucket("upload") as bucket:
        b.drop_cache()
        read_whole_file(path)  # as right after torch.save: the file is in the page cache
        start = time.perf_counter()
        b.upload_client.upload_file(str(path), bucket, CHECKPOINT_NAME, Config=b.transfer)
        return {"seconds": time.perf_counter() - start}


def save_then_upload(b: Bench) -> dict[str, float]:
    """torch.save to local disk, then upload_file, timed as one."""
    path = b.work_dir / "local" / f"{b.label}-save-upload" / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    state = b.state()
    with b.bucket("save-upload") as bucket:
        try:
            b.drop_cache()
            start = time.perf_counter()
            torch.save(state, path)
            b.client.upload_file(str(path), bucket, CHECKPOINT_NAME, Config=b.transfer)
            return {"seconds": time.perf_counter() - start}
        finally:
            path.unlink(missing_ok=True)


def s3torchconnector_write(b: Bench) -> dict[str, float]:
    """s3torchconnector's S3Checkpoint.writer: durable when the writer closes."""
    state = b.state()
    checkpoint = s3torchconnector_checkpoint(b)
    with b.bucket("s3tc-write") as bucket:
        b.drop_cache()
        start = time.perf_counter()
        with checkpoint.writer(f"s3://{bucket}/{CHECKPOINT_NAME}") as writer:
            torch.save(state, writer)
        seconds = time.perf_counter() - start
        # A stream gets a slightly different zip layout from a file: only check that it is there.
        if b.client.head_object(Bucket=bucket, Key=CHECKPOINT_NAME)["ContentLength"] < b.size:
            raise MeasurementError("the object is smaller than the state dict")
        return {"durable": seconds}


def stall_and_durable(b: Bench, bucket: str, mountpoint: Any) -> dict[str, float]:
    """torch.save into a mount: stall until it returns, durable until S3 has the object."""
    state = b.state()
    expected = b.checkpoint_size  # known before the clock starts (it may take an untimed save)
    b.drop_cache()
    start = time.perf_counter()
    torch.save(state, mountpoint / CHECKPOINT_NAME)
    stall = time.perf_counter() - start
    return {"stall": stall, "durable": b.wait_durable(bucket, start, expected)}


def rclone_write(b: Bench) -> dict[str, float]:
    with b.bucket("rclone-write") as bucket, rclone_mount(b, bucket) as mountpoint:
        return stall_and_durable(b, bucket, mountpoint)


def s3fs_write(b: Bench) -> dict[str, float]:
    with b.bucket("s3fs-write") as bucket, s3fs_mount(b, bucket) as mountpoint:
        return stall_and_durable(b, bucket, mountpoint)


def s3ckptfs_write(b: Bench, options: str = "") -> dict[str, float]:
    """Stall and durable through a fresh s3ckptfs mount, plus the daemon's peak RSS."""
    with b.bucket("s3ckptfs-write") as bucket, s3ckptfs_mount(b, bucket, options) as mount:
        result = stall_and_durable(b, bucket, mount.path)
        rss = peak_rss_mib(mount.pid())
        if rss is not None:
            result["peak_rss_mib"] = rss
        return result


# --------------------------------------------------------------------------- read side


def local_load(b: Bench) -> dict[str, float]:
    """torch.load from local disk: the baseline of every load."""
    path = b.ensure_local_file()
    b.drop_cache()
    return {"seconds": timed_load(path, b.size)}


def download_then_load(b: Bench) -> dict[str, float]:
    """boto3 download_file (tuned) to local disk, then torch.load, timed as one."""
    bucket = b.ensure_read_object()
    path = b.work_dir / "local" / f"{b.label}-download" / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        b.drop_cache()
        start = time.perf_counter()
        b.client.download_file(bucket, CHECKPOINT_NAME, str(path), Config=b.transfer)
        state = torch.load(path, map_location="cpu", weights_only=True)
        seconds = time.perf_counter() - start
        check_loaded(state, b.size)
        return {"seconds": seconds}
    finally:
        path.unlink(missing_ok=True)


def s3torchconnector_read(b: Bench) -> dict[str, float]:
    """torch.load from s3torchconnector's S3Checkpoint.reader."""
    bucket = b.ensure_read_object()
    checkpoint = s3torchconnector_checkpoint(b)
    result: dict[str, float] = {}
    b.drop_cache()
    with b.count_downloads(result):
        start = time.perf_counter()
        with checkpoint.reader(f"s3://{bucket}/{CHECKPOINT_NAME}") as reader:
            state = torch.load(reader, map_location="cpu", weights_only=True)
        result["seconds"] = time.perf_counter() - start
    check_loaded(state, b.size)
    return result


def cold_load(b: Bench, mountpoint: Any) -> dict[str, float]:
    """torch.load through a fresh mount with a cold page cache, counting the downloads."""
    result: dict[str, float] = {}
    b.drop_cache()
    with b.count_downloads(result):
        result["seconds"] = timed_load(mountpoint / CHECKPOINT_NAME, b.size)
    return result


def rclone_cold_load(b: Bench) -> dict[str, float]:
    with rclone_mount(b, b.ensure_read_object()) as mountpoint:
        return cold_load(b, mountpoint)


def s3fs_cold_load(b: Bench) -> dict[str, float]:
    with s3fs_mount(b, b.ensure_read_object()) as mountpoint:
        return cold_load(b, mountpoint)


def s3ckptfs_cold_load(b: Bench) -> dict[str, float]:
    with s3ckptfs_mount(b, b.ensure_read_object()) as mount:
        return cold_load(b, mount.path)


def s3ckptfs_warm_load(b: Bench) -> dict[str, float]:
    """torch.load of a checkpoint just written through the mount (it is in the mount's cache)."""
    source = b.ensure_local_file()
    with b.bucket("s3ckptfs-warm") as bucket, s3ckptfs_mount(b, bucket) as mount:
        copy_in_pieces(source, mount.path / CHECKPOINT_NAME)
        b.wait_durable(bucket, time.perf_counter(), b.checkpoint_size)
        b.drop_cache()
        return {"seconds": timed_load(mount.path / CHECKPOINT_NAME, b.size)}


def s3ckptfs_four_loaders(b: Bench) -> dict[str, float]:
    """CONCURRENT_LOADERS processes loading one checkpoint at once from one fresh mount
    (time until the last one is done)."""
    bucket = b.ensure_read_object()
    with (s3ckptfs_mount(b, bucket) as mount,
          loader_processes(b.janitor, mount.path / CHECKPOINT_NAME, CONCURRENT_LOADERS) as loaders):
        result: dict[str, float] = {}
        b.drop_cache()
        with b.count_downloads(result):
            result["seconds"] = run_loaders(loaders, durable_timeout(b.size))
        return result


def local_four_loaders(b: Bench) -> dict[str, float]:
    """The same loaders on local disk: what this machine's cores allow, with no S3 or FUSE at all."""
    path = b.ensure_local_file()
    with loader_processes(b.janitor, path, CONCURRENT_LOADERS) as loaders:
        b.drop_cache()
        return {"seconds": run_loaders(loaders, durable_timeout(b.size))}


def timed(action: Callable[[], Any]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def s3ckptfs_metadata(b: Bench) -> dict[str, float]:
    """Listing a 10,000-object prefix through a fresh mount (cold, then cached), a stat of every
    listed file, and a stat storm of absent names; boto3 list_objects_v2 as the baseline."""
    bucket = b.ensure_listing_bucket(LISTING_OBJECTS, LISTING_DIR, LISTING_OBJECT_BYTES)
    paginator = b.client.get_paginator("list_objects_v2")
    result = {"boto3 list": timed(lambda: [page for page in paginator.paginate(
        Bucket=bucket, Prefix=f"{LISTING_DIR}/", Delimiter="/")])}
    with s3ckptfs_mount(b, bucket) as mount:
        folder = mount.path / LISTING_DIR
        names: list[str] = []
        result["seconds"] = timed(lambda: names.extend(os.listdir(folder)))
        if len(names) != LISTING_OBJECTS:
            raise MeasurementError(f"listing gave {len(names)} names, expected {LISTING_OBJECTS}")
        result["listing again"] = timed(lambda: os.listdir(folder))
        result["stat every listed file"] = timed(lambda: [os.stat(folder / name) for name in names])
        absent = [mount.path / f"absent-{i}.py" for i in range(ABSENT_NAMES)]

        def stat_storm() -> None:
            for _ in range(STORM_ROUNDS):
                for path in absent:
                    if path.exists():
                        raise MeasurementError(f"{path} exists")
        result[f"stat storm ({ABSENT_NAMES * STORM_ROUNDS:,} stats of {ABSENT_NAMES} absent names)"] = \
            timed(stat_storm)
    return result


# --------------------------------------------------------------------------- the table


MEASUREMENTS = [
    Measurement("local_save", "torch.save to local disk", "write", None, local_save, ("a",)),
    Measurement("local_save_fsync", "torch.save to local disk, then fsync", "write", None, local_save_fsync,
                ("r",)),
    Measurement("upload_floor", "upload floor (boto3 upload_file)", "write", None, upload_floor,
                ("b", "upload")),
    Measurement("save_then_upload", "torch.save then upload_file", "write", None, save_then_upload,
                ("c", "save_upload")),
    Measurement("s3torchconnector_write", "s3torchconnector writer", "write", "s3torchconnector",
                s3torchconnector_write, ("d", "s3tc_write")),
    Measurement("rclone_write", "rclone mount write", "write", "rclone", rclone_write, ("e",)),
    Measurement("s3fs_write", "s3fs-fuse write", "write", "s3fs", s3fs_write, ("f",)),
    Measurement("s3ckptfs_write", "s3ckptfs write", "write", "s3ckptfs", s3ckptfs_write, ("g",)),
    Measurement("copy_floor", "server-side copy floor (boto3 copy_object)", "write", None, copy_floor),
    Measurement("part_copy_floor", "server-side part copy floor (UploadPartCopy, CRC32C)", "write", None,
                part_copy_floor),
    Measurement("s3ckptfs_incremental_0", "s3ckptfs next save, 0% unchanged [dedup=on]", "write", "s3ckptfs",
                incremental(0.0)),
    Measurement("s3ckptfs_incremental_50", "s3ckptfs next save, 50% unchanged [dedup=on]", "write", "s3ckptfs",
                incremental(0.5)),
    Measurement("s3ckptfs_incremental_90", "s3ckptfs next save, 90% unchanged [dedup=on]", "write", "s3ckptfs",
                incremental(0.9)),
    Measurement("s3ckptfs_second_name", "s3ckptfs same state, second name [dedup=on]", "write", "s3ckptfs",
                second_name),
    Measurement("s3ckptfs_second_name_off", "s3ckptfs same state, second name [dedup=off]", "write", "s3ckptfs",
                second_name_without_dedup),
    # Saved into an open file, each measured once per --s3ckptfs-options variant (dedup at its default
    # against dedup=off, say); "ratio" is the second save's durable time over the first's.
    Measurement("s3ckptfs_next_0", "s3ckptfs next save, nothing in common", "write", "s3ckptfs", next_step(0.0)),
    Measurement("s3ckptfs_next_50", "s3ckptfs next save, 50% unchanged", "write", "s3ckptfs", next_step(0.5)),
    Measurement("s3ckptfs_next_90", "s3ckptfs next save, 90% unchanged", "write", "s3ckptfs", next_step(0.9)),
    Measurement("s3ckptfs_next_same", "s3ckptfs same bytes, second name", "write", "s3ckptfs", next_step(1.0)),
    Measurement("s3ckptfs_4_nodes", "4 nodes, one shard each, at once", "write", "s3ckptfs", multinode(4)),
    Measurement("s3ckptfs_8_nodes", "8 nodes, one shard each, at once", "write", "s3ckptfs", multinode(8)),
    Measurement("local_load", "torch.load from local disk", "read", None, local_load, ("h",)),
    Measurement("download_then_load", "boto3 download_file + torch.load", "read", None, download_then_load,
                ("i", "download_load")),
    Measurement("s3torchconnector_read", "s3torchconnector reader", "read", "s3torchconnector",
                s3torchconnector_read, ("j", "s3tc_read")),
    Measurement("rclone_cold_load", "rclone mount cold load", "read", "rclone", rclone_cold_load,
                ("k", "rclone_read")),
    Measurement("s3fs_cold_load", "s3fs-fuse cold load", "read", "s3fs", s3fs_cold_load, ("l", "s3fs_read")),
    Measurement("s3ckptfs_cold_load", "s3ckptfs cold load", "read", "s3ckptfs", s3ckptfs_cold_load,
                ("m", "s3ckptfs_cold")),
    Measurement("s3ckptfs_warm_load", "s3ckptfs warm load", "read", "s3ckptfs", s3ckptfs_warm_load,
                ("n", "s3ckptfs_warm")),
    Measurement("s3ckptfs_four_loaders", f"s3ckptfs {CONCURRENT_LOADERS} loaders at once", "read", "s3ckptfs",
                s3ckptfs_four_loaders, ("o", "s3ckptfs_4proc")),
    Measurement("local_four_loaders", f"{CONCURRENT_LOADERS} loaders at once from local disk", "read", None,
                local_four_loaders, ("p", "local_4proc")),
    Measurement("s3ckptfs_metadata", f"s3ckptfs listing of {LISTING_OBJECTS:,} objects", "read", "s3ckptfs",
                s3ckptfs_metadata, ("q", "metadata")),
]


PER_VARIANT = ("s3ckptfs_write", "s3ckptfs_next_0", "s3ckptfs_next_50", "s3ckptfs_next_90", "s3ckptfs_next_same")


def with_write_variants(measurements: list[Measurement], variants: list[str]) -> list[Measurement]:
    """One s3ckptfs write measurement per -o variant (to compare upload policies in one run)."""
    expanded: list[Measurement] = []
    for measurement in measurements:
        if measurement.key not in PER_VARIANT:
            expanded.append(measurement)
            continue
        for index, options in enumerate(variants):
            expanded.append(dataclasses.replace(
                measurement,
                key=measurement.key if index == 0 else f"{measurement.key}@{options}",
                label=f"{measurement.label} [{options}]" if options else measurement.label,
                function=functools.partial(measurement.function, options=options)))
    return expanded


def select_measurements(only: str | None) -> list[Measurement]:
    """The measurements named in ``only`` (keys or earlier names, comma-separated), in table order."""
    if not only:
        return list(MEASUREMENTS)
    wanted = {item.strip() for item in only.split(",") if item.strip()}
    known = {name for m in MEASUREMENTS for name in (m.key, *m.aliases)}
    unknown = wanted - known
    if unknown:
        raise SystemExit(f"--only: unknown measurement(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(m.key for m in MEASUREMENTS)}")
    return [m for m in MEASUREMENTS if wanted & {m.key, *m.aliases}]


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """All samples of one measurement at one size."""

    measurement: Measurement
    samples: dict[str, list[float]] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None

    def add(self, sample: dict[str, float]) -> None:
        for metric, value in sample.items():
            self.samples.setdefault(metric, []).append(value)

    def median(self, metric: str) -> float | None:
        values = self.samples.get(metric)
        return statistics.median(values) if values else None


def describe_sample(sample: dict[str, float]) -> str:
    parts = []
    for metric, value in sample.items():
        unit = "s" if metric in TIME_METRICS else ""
        parts.append(f"{metric} {value:.2f}{unit}")
    return ", ".join(parts)


def run_phase(b: Bench, measurements: list[Measurement], outcomes: dict[str, Outcome], repeat: int) -> None:
    """Run the measurements round-robin, ``repeat`` rounds, so that noise spreads evenly."""
    for round_index in range(repeat):
        for measurement in measurements:
            outcome = outcomes[measurement.key]
            if outcome.skipped or outcome.error:
                continue
            try:
                sample = measurement.function(b)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:
                outcome.error = f"{type(exc).__name__}: {exc}"
                log(f"[{b.label}] {measurement.label}: FAILED: {outcome.error}")
                continue
            outcome.add(sample)
            log(f"[{b.label}] {measurement.label} #{round_index + 1}: {describe_sample(sample)}")


def run_size(b: Bench, measurements: list[Measurement], repeat: int) -> dict[str, Outcome]:
    """Every measurement at one size: the write side first, then the read side."""
    outcomes: dict[str, Outcome] = {}
    for measurement in measurements:
        outcome = Outcome(measurement)
        if measurement.tool and measurement.tool in b.tools.missing:
            outcome.skipped = b.tools.missing[measurement.tool]
        outcomes[measurement.key] = outcome
    run_phase(b, [m for m in measurements if m.side == "write"], outcomes, repeat)
    b.release_state()  # the read side needs memory for loads, not the original
    run_phase(b, [m for m in measurements if m.side == "read"], outcomes, repeat)
    return outcomes
