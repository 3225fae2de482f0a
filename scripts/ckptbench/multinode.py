"""N nodes saving one checkpoint at once: N mounts of one bucket, each saving its own shard.

The state dict is split into N shards (every N-th tensor). In one sample, three
things run one after the other, each with all N at once (one thread per node):

* *local*: each node's ``torch.save`` of its shard to local disk: ``local_stall``
  is the median per node;
* *floor*: N concurrent boto3 ``upload_file`` of those same files, already in the
  page cache: ``floor`` is the time until the last one is done;
* *s3ckptfs*: N fresh mounts of one bucket, each node's ``torch.save`` into its
  own mount: ``stall`` (median per node) and ``stall_max``, and ``durable``, the
  time until every shard is complete in S3 (HEAD polled, as for one node).

``stall / local_stall`` and ``durable / floor`` are the figures of interest. On one
machine the N "nodes" share its cores and disk with the S3 server, so this
measures how the mounts share a machine, not a cluster's network.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import statistics
import time
from pathlib import Path

import torch

from .common import MeasurementError
from .context import Bench, durable_timeout, wait_for_object
from .peers import s3ckptfs_mount


def shards(b: Bench, count: int) -> list[dict[str, torch.Tensor]]:
    names = sorted(b.state())
    return [{name: b.state()[name] for name in names[index::count]} for index in range(count)]


def _all_at_once(actions: list) -> list[float]:
    """Run ``actions`` on one thread each, started together; each one's seconds."""
    def timed(action) -> float:
        start = time.perf_counter()
        action()
        return time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(actions)) as pool:
        return list(pool.map(timed, actions))


def multinode(count: int):
    def measure(b: Bench) -> dict[str, float]:
        parts = shards(b, count)
        local_dir = b.work_dir / "local" / f"{b.label}-{count}-nodes"
        local_dir.mkdir(parents=True, exist_ok=True)
        paths = [local_dir / f"shard_{index}.pt" for index in range(count)]
        b.drop_cache()
        local = _all_at_once([lambda p=part, f=path: torch.save(p, f) for part, path in zip(parts, paths)])
        sizes = [path.stat().st_size for path in paths]
        with b.bucket(f"floor-{count}") as bucket:
            b.drop_cache()
            for path in paths:
                path.read_bytes()  # in the page cache, as right after torch.save
            start = time.perf_counter()
            _all_at_once([lambda f=path: b.client.upload_file(str(f), bucket, f.name, Config=b.transfer)
                          for path in paths])
            floor = time.perf_counter() - start
        for path in paths:
            path.unlink()
        with b.bucket(f"nodes-{count}") as bucket, contextlib.ExitStack() as stack:
            mounts = [stack.enter_context(s3ckptfs_mount(b, bucket, b.s3ckptfs_options)) for _ in range(count)]
            targets = [Path(mount.path) / f"shard_{index}.pt" for index, mount in enumerate(mounts)]
            b.drop_cache()
            start = time.perf_counter()
            stalls = _all_at_once([lambda p=part, f=target: torch.save(p, f) for part, target in zip(parts, targets)])
            deadline = durable_timeout(sum(sizes))
            durable = 0.0
            for index, size in enumerate(sizes):
                durable = max(durable, wait_for_object(b.client, bucket, f"shard_{index}.pt", size, start, deadline))
            if len(stalls) != count:
                raise MeasurementError("a node's save did not return")
        return {"local_stall": statistics.median(local), "floor": floor, "stall": statistics.median(stalls),
                "stall_max": max(stalls), "durable": durable}
    return measure
