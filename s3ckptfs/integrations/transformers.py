"""A Hugging Face ``TrainerCallback`` that makes the last checkpoint durable in S3.

    from s3ckptfs.integrations.transformers import DurableCheckpoints
    trainer = Trainer(model, TrainingArguments(output_dir="/mnt/ckpt/run", ...),
                      callbacks=[DurableCheckpoints()])

At the end of ``train`` it waits until every checkpoint under ``output_dir``
(or the paths given) is complete in S3, and logs the time it took; a failed
upload fails ``train`` (``raise_errors``).

The Trainer has no SIGTERM handling of its own: SIGTERM kills it at once. The
callback installs a handler for the length of ``train`` (main thread only)
that waits, at most ``sigterm_timeout`` seconds, for the checkpoints already
closed, logs whether they are durable, and then lets the signal do what it
did before (the previous handler, or the default: the process ends by
SIGTERM). A checkpoint that was being written at that moment is not waited
for: it is left as incomplete as it would be on a local disk, so resume from
the one before it. The mount's daemon keeps
uploading after the process exits; the wait is what lets the job's log say
the last checkpoint is safe.

On several nodes, the local main process of each node waits for its node's mount.

Across nodes, use ``CompleteCheckpoints`` as well (or instead): at every save, each
rank waits for the checkpoint directory on its node's mount to be in S3, all ranks
meet at a barrier (when ``torch.distributed`` is up), and the main process writes
``COMPLETE_MARKER`` into it. ``latest_complete_checkpoint(output_dir)`` returns the
newest checkpoint so marked, for ``resume_from_checkpoint``; one without the
marker may have lost a shard with a node. Keep ``save_total_limit`` at 2 or more:
the Trainer rotates old checkpoints before its ``on_save`` callbacks run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from types import FrameType
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ._durable import (DEFAULT_SIGTERM_TIMEOUT, checkpoint_dirs, ensure_visible_logging, log, make_durable,
                       wait_until_durable)

__all__ = ["DurableCheckpoints", "CompleteCheckpoints", "latest_complete_checkpoint", "COMPLETE_MARKER"]

COMPLETE_MARKER = "s3ckptfs-complete.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def latest_complete_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The newest ``checkpoint-N`` under ``output_dir`` that ``CompleteCheckpoints`` marked complete, or None."""
    try:
        names = os.listdir(output_dir)
    except FileNotFoundError:
        return None
    steps = sorted((int(match.group(1)), name) for name in names if (match := _CHECKPOINT_DIR.match(name)))
    for _, name in reversed(steps):
        if os.path.isfile(os.path.join(output_dir, name, COMPLETE_MARKER)):
            return os.path.join(os.fspath(output_dir), name)
    return None


class CompleteCheckpoints(TrainerCallback):
    """Mark a checkpoint complete once every rank's files of it are in S3.

    At ``on_save`` every process waits for ``checkpoint-<step>`` on its node's mount
    (``timeout`` seconds at most, None: as long as it takes; a failure raises
    ``s3ckptfs.SyncError`` and the checkpoint stays unmarked), then all meet at a
    ``torch.distributed`` barrier when one is initialized, then the world's main
    process writes ``COMPLETE_MARKER`` (and waits for it too). ``last_wait``: seconds
    this process last waited for S3.
    """

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self.last_wait = 0.0
        ensure_visible_logging()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        directory = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(directory):
            log.warning("%s not found after a save: not marked complete", directory)
            return
        self.last_wait = wait_until_durable([directory], timeout=self.timeout, why="Trainer checkpoint")
        _barrier()
        if state.is_world_process_zero:
            marker = os.path.join(directory, COMPLETE_MARKER)
            with open(marker, "w", encoding="utf-8") as stream:
                json.dump({"step": state.global_step, "time": time.time()}, stream)
            wait_until_durable([marker], timeout=self.timeout, why="Trainer checkpoint marker")
        _barrier()


def _barrier() -> None:
    try:
        import torch.distributed as dist
    except ImportError:
        return
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class DurableCheckpoints(TrainerCallback):
    """Wait for checkpoints to be in S3 at the end of ``train``, and on SIGTERM.

    ``paths``: directories to wait for (default: ``args.output_dir``).
    ``timeout``: seconds to wait at the end of training (None: as long as it
    takes). ``sigterm_timeout``: seconds to wait on SIGTERM. ``raise_errors``:
    a checkpoint not in S3 at the end of training raises ``s3ckptfs.SyncError``.
    """

    def __init__(self, paths: list[str | os.PathLike[str]] | None = None, *, timeout: float | None = None,
                 sigterm_timeout: float | None = DEFAULT_SIGTERM_TIMEOUT, raise_errors: bool = True) -> None:
        self.paths = None if paths is None else [os.fspath(path) for path in paths]
        self.timeout = timeout
        self.sigterm_timeout = sigterm_timeout
        self.raise_errors = raise_errors
        self._dirs_now: list[str] = []
        self._previous: Any = None
        self._installed = False
        ensure_visible_logging()

    def _dirs(self, args: TrainingArguments) -> list[str]:
        return checkpoint_dirs(self.paths if self.paths is not None else [args.output_dir])

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if not state.is_local_process_zero or threading.current_thread() is not threading.main_thread():
            return
        self._dirs_now = self._dirs(args)
        if self._dirs_now and not self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._installed = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self._restore()
        if state.is_local_process_zero:
            make_durable(self._dirs(args), timeout=self.timeout, why="end of training",
                         raise_errors=self.raise_errors)

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous
        self._restore()
        try:
            make_durable(self._dirs_now, timeout=self.sigterm_timeout, why="SIGTERM", raise_errors=False)
        except Exception:  # the signal must still end the process
            log.exception("waiting for checkpoints failed")
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)  # the default action, now that the handler is gone
