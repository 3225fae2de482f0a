"""A drop-in ``FileSystemWriter`` for ``torch.distributed.checkpoint`` that is safe across nodes.

    from s3ckptfs.integrations.dcp import FileSystemWriter
    dcp.save(state, storage_writer=FileSystemWriter("/mnt/ckpt/step_1000"))
    dcp.async_save(state, storage_writer=FileSystemWriter("/mnt/ckpt/step_1000"))   # works too

DCP's coordinator writes ``.metadata`` (the checkpoint's commit marker) once every
rank has returned its write results. With the stock writer and ``sync_files=False``
a rank returns them as soon as its files are closed, which on a write-back mount
is before they are in S3: a node lost right then leaves ``.metadata`` naming a
shard S3 never got. With ``sync_files=True`` (DCP's default) every file's fsync
waits for its upload, which is safe but costs the upload's time file by file.

This writer writes at local-disk speed (no fsync), then waits once for the rank's
own files to be complete in S3 (``s3ckptfs.sync`` through the mount's control
socket) before handing its write results back. So the coordinator writes
``.metadata`` only after every shard is in S3, and a failed upload fails the
save on that rank instead of publishing a torn checkpoint. ``dcp.async_save``
runs the same ``write_data`` in its background thread: the wait happens there,
and the future completes once the shards are durable.

Files not on an s3ckptfs mount are written as by the stock writer and not waited for.
"""

from __future__ import annotations

import os
from typing import Any

from torch.futures import Future
from torch.distributed.checkpoint import FileSystemWriter as _TorchFileSystemWriter
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult

from ._durable import ensure_visible_logging, log, wait_until_durable

__all__ = ["FileSystemWriter"]


class FileSystemWriter(_TorchFileSystemWriter):
    """``torch.distributed.checkpoint.FileSystemWriter`` that returns write results only once durable.

    Takes the stock writer's arguments; ``sync_files`` defaults to False (the mount makes
    the files durable, not fsync). ``durable_timeout``: seconds to wait for S3 (None: as
    long as it takes); past it the save fails with ``s3ckptfs.SyncTimeoutError``.
    ``last_wait`` is the seconds the last ``write_data`` waited for S3.
    """

    def __init__(self, path: str | os.PathLike[str], *args: Any, sync_files: bool = False,
                 durable_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(path, *args, sync_files=sync_files, **kwargs)
        self.durable_timeout = durable_timeout
        self.last_wait = 0.0
        ensure_visible_logging()

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results = super().write_data(plan, planner).wait()  # the stock writer's files are closed here
        directory = os.fspath(self.path)
        files = sorted({os.path.join(directory, result.storage_data.relative_path) for result in results})
        self.last_wait = wait_until_durable(files, timeout=self.durable_timeout,
                                            why=f"DCP shards of {directory}")
        log.debug("%d DCP file(s) under %s durable after %.2fs", len(files), directory, self.last_wait)
        done: Future[list[WriteResult]] = Future()  # torch's, as the stock writer returns
        done.set_result(results)
        return done
