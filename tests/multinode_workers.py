"""Process entry points for test_multinode.py: ranks that save through their own node's mount.

Rank r writes through ``mounts[r]`` (one mount per node, one prefix). After each save
the ranks meet, rank 0 says so in ``control_dir`` (``saved_<step>``) and every rank
waits for the test's ``go_<step>`` (written once a node has been lost and replaced),
so a node is lost right after the save returned on every rank.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

WORLD_SIZE = 2


def shard_state(rank: int, step: int) -> dict:
    """A rank's state at ``step``: a replicated part plus 24 MiB that only this rank writes (a multipart upload)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return {"model": torch.full((64 * 1024,), float(step)),
            f"rank{rank}": torch.randn(6 * 1024 * 1024, generator=generator), "step": step}


def _wait_file(path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.02)


def dcp_save_loop(rank: int, port: int, mounts: list[str], steps: int, control_dir: str, writer: str) -> None:
    """Save ``steps`` DCP checkpoints ``step_<n>`` (rank 0 then points ``latest`` at each).

    ``writer``: ``integration`` (s3ckptfs.integrations.dcp.FileSystemWriter) or ``default``
    (the stock FileSystemWriter with sync_files=False). Each rank's save times go to
    ``control_dir/times_<rank>.json``.
    """
    import torch.distributed.checkpoint as dcp

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    control = Path(control_dir)
    times = []
    try:
        for step in range(steps):
            path = os.path.join(mounts[rank], f"step_{step}")
            if writer == "integration":
                from s3ckptfs.integrations.dcp import FileSystemWriter
                storage = FileSystemWriter(path)
            else:
                storage = dcp.FileSystemWriter(path, sync_files=False)
            started = time.monotonic()
            dcp.save(shard_state(rank, step), storage_writer=storage)
            times.append(time.monotonic() - started)
            if rank == 0:
                with open(os.path.join(mounts[0], "latest"), "w") as pointer:
                    pointer.write(f"step_{step}")
            torch.distributed.barrier()
            if rank == 0:
                (control / f"saved_{step}").touch()
            _wait_file(control / f"go_{step}")
            torch.distributed.barrier()
    finally:
        (control / f"times_{rank}.json").write_text(json.dumps(times))
        torch.distributed.destroy_process_group()
