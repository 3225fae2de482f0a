"""A Lightning callback that makes the last checkpoint durable in S3.

    from s3ckptfs.integrations.lightning import DurableCheckpoints
    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath="/mnt/ckpt/run", save_last=True),
                                   DurableCheckpoints()])

At the end of ``fit`` it waits until every checkpoint written under the
``ModelCheckpoint`` directories (or the paths given) is complete in S3, and
logs the time it took; a failed upload fails ``fit`` (``raise_errors``).

On SIGTERM (a scheduler's preemption), Lightning finishes the current batch
and stops with ``SIGTERMException``; the callback then waits, at most
``sigterm_timeout`` seconds, for the checkpoints already written, and logs
whether they are durable. The same happens when training stops on any other
exception (but Ctrl-C). It never raises there: the original exception goes on. Either way
the mount's daemon keeps uploading after the process exits; the wait is what
lets the job's log say that the last checkpoint is safe.

On several nodes, local rank 0 of each node waits for its node's mount (with
sharded checkpoints every node writes part of each checkpoint).

Across nodes, add ``DurableCheckpointIO`` too: each checkpoint file is in S3
before ``save_checkpoint`` returns, so before Lightning's post-save barrier lets
any rank go on, and before ``ModelCheckpoint`` removes the checkpoint it replaces:

    trainer = L.Trainer(plugins=[DurableCheckpointIO()], callbacks=[ModelCheckpoint(...)])

Works with the ``lightning`` package, or ``pytorch_lightning`` when that is
the one installed.
"""

from __future__ import annotations

import os
from typing import Any

from ._durable import (DEFAULT_SIGTERM_TIMEOUT, checkpoint_dirs, ensure_visible_logging, log, make_durable,
                       wait_until_durable)

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import TorchCheckpointIO
except ImportError:  # the standalone package
    from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[no-redef]
    from pytorch_lightning.callbacks import ModelCheckpoint  # type: ignore[no-redef]
    from pytorch_lightning.plugins.io import TorchCheckpointIO  # type: ignore[no-redef]

__all__ = ["DurableCheckpoints", "DurableCheckpointIO"]


class DurableCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose ``save_checkpoint`` returns once the file is complete in S3.

    Lightning calls it on every rank that saves (rank 0 with DDP, every rank with
    sharded strategies) and passes its barrier afterwards; ``ModelCheckpoint``
    removes the previous checkpoint only after the save returned. ``timeout``:
    seconds to wait (None: as long as it takes); a file that cannot be made durable
    fails the save (``s3ckptfs.SyncError``). ``last_wait``: seconds the last save waited.
    """

    def __init__(self, timeout: float | None = None) -> None:
        super().__init__()
        self.timeout = timeout
        self.last_wait = 0.0
        ensure_visible_logging()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.last_wait = wait_until_durable([path], timeout=self.timeout, why="Lightning checkpoint")


class DurableCheckpoints(Callback):
    """Wait for checkpoints to be in S3 at the end of ``fit``, and when training is interrupted.

    ``paths``: directories (or files) to wait for; by default the ``dirpath``
    of every ``ModelCheckpoint`` of the trainer. ``timeout``: seconds to wait
    at the end of ``fit`` (None: as long as it takes). ``sigterm_timeout``:
    seconds to wait when training stops on SIGTERM or an error.
    ``raise_errors``: a checkpoint not in S3 at the end of ``fit`` raises
    ``s3ckptfs.SyncError``.
    """

    def __init__(self, paths: list[str | os.PathLike[str]] | None = None, *, timeout: float | None = None,
                 sigterm_timeout: float | None = DEFAULT_SIGTERM_TIMEOUT, raise_errors: bool = True) -> None:
        super().__init__()
        self.paths = None if paths is None else [os.fspath(path) for path in paths]
        self.timeout = timeout
        self.sigterm_timeout = sigterm_timeout
        self.raise_errors = raise_errors
        ensure_visible_logging()

    def _dirs(self, trainer: Trainer) -> list[str]:
        if self.paths is not None:
            return checkpoint_dirs(self.paths)
        return checkpoint_dirs(callback.dirpath for callback in trainer.checkpoint_callbacks
                               if isinstance(callback, ModelCheckpoint))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.local_rank == 0:
            make_durable(self._dirs(trainer), timeout=self.timeout, why="end of training",
                         raise_errors=self.raise_errors)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.local_rank != 0 or isinstance(exception, KeyboardInterrupt):
            return  # Ctrl-C at a terminal: the user is there, and the daemon keeps uploading
        why = "SIGTERM" if type(exception).__name__ == "SIGTERMException" else f"stopped by {exception!r}"
        try:
            make_durable(self._dirs(trainer), timeout=self.sigterm_timeout, why=why, raise_errors=False)
        except Exception:  # never hide the exception that stopped training
            log.exception("waiting for checkpoints failed")

    def state_dict(self) -> dict[str, Any]:
        return {}
