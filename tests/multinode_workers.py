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

    ``writer``: ``integration`` (s3ckptfs.integrations.dcp.FileSystemWriter; odd steps with
    ``dcp.async_save``, waited for before the node is lost) or ``default``
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
            if writer == "integration" and step % 2:  # every other save with dcp.async_save
                dcp.async_save(shard_state(rank, step), storage_writer=storage).result()
            else:
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


# -- Lightning and the Hugging Face Trainer: the node is lost right after each save returns ----------

def handshake(control_dir: str, count: int) -> None:
    """Tell the test that save ``count`` returned, and wait until it has lost and replaced the node."""
    control = Path(control_dir)
    (control / f"saved_{count}").touch()
    _wait_file(control / f"go_{count}")


def _regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator)
    return x, x.sum(dim=1, keepdim=True)


def lightning_loop(dirpath: str, control_dir: str, epochs: int) -> None:
    """``epochs`` epochs, a checkpoint each (save_top_k=-1), written through DurableCheckpointIO."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from s3ckptfs.integrations.lightning import DurableCheckpointIO

    saves = []

    class LoseNodeAfterSave(DurableCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
            super().save_checkpoint(checkpoint, path, storage_options)
            saves.append(self.last_wait)
            handshake(control_dir, len(saves) - 1)

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 1)
            self.big = torch.nn.Parameter(torch.zeros(3 * 1024 * 1024), requires_grad=False)  # 12 MiB

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.01)

    x, y = _regression_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=dirpath, plugins=[LoseNodeAfterSave()],
                        callbacks=[ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1)])
    trainer.fit(Tiny(), loader)
    (Path(control_dir) / "waits.json").write_text(json.dumps(saves))


class _Pairs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = _regression_data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "labels": self.y[index]}


class _Regressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 1)
        self.big = torch.nn.Parameter(torch.zeros(3 * 1024 * 1024))  # 12 MiB of weights, 24 MiB optimizer state

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = self.net(x) + 0 * self.big[0]
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def transformers_loop(output_dir: str, control_dir: str, steps: int) -> None:
    """``steps`` steps, a checkpoint after each, with CompleteCheckpoints; the node is lost after each on_save."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from s3ckptfs.integrations.transformers import CompleteCheckpoints

    complete = CompleteCheckpoints()
    waits = []

    class LoseNodeAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            waits.append(complete.last_wait)
            handshake(control_dir, state.global_step - 1)

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=output_dir, max_steps=steps, save_steps=1, save_strategy="steps",
                             per_device_train_batch_size=8, report_to=[], use_cpu=True, logging_strategy="no",
                             disable_tqdm=True)
    Trainer(model=_Regressor(), args=args, train_dataset=_Pairs(),
            callbacks=[complete, LoseNodeAfterSave()]).train()
    (Path(control_dir) / "waits.json").write_text(json.dumps(waits))


def trainer_ranks_loop(rank: int, port: int, mounts: list[str], steps: int, control_dir: str, mode: str) -> None:
    """Rank ``rank`` of a 2-rank Trainer (DDP over gloo), its ``output_dir`` on its own node's mount.

    Every rank writes ``rng_state_<rank>.pth`` into each checkpoint (rank 0 the rest), so a
    checkpoint needs a file from each node. ``mode``: ``complete`` (with CompleteCheckpoints)
    or ``stock`` (no s3ckptfs callback). After each save the ranks meet, rank 0 says so in
    ``control_dir`` and every rank waits for the test to lose and replace node 1.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from s3ckptfs.integrations.transformers import CompleteCheckpoints

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK="0",
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE="1")  # one rank per node

    class LoseNodeAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            torch.distributed.barrier()
            if rank == 0:
                (Path(control_dir) / f"saved_{state.global_step - 1}").touch()
            _wait_file(Path(control_dir) / f"go_{state.global_step - 1}")
            torch.distributed.barrier()

    callbacks = ([CompleteCheckpoints()] if mode == "complete" else []) + [LoseNodeAfterSave()]
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=os.path.join(mounts[rank], "run"), max_steps=steps, save_steps=1,
                             save_strategy="steps", per_device_train_batch_size=8, report_to=[], use_cpu=True,
                             ddp_backend="gloo", logging_strategy="no", disable_tqdm=True)
    Trainer(model=_Regressor(), args=args, train_dataset=_Pairs(), callbacks=callbacks).train()


def resume_trainer(output_dir: str, checkpoint: str, steps: int) -> int:
    """Resume a one-process Trainer from ``checkpoint`` up to ``steps``; return how many steps it trained."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    trained = []

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trained.append(state.global_step)

    args = TrainingArguments(output_dir=output_dir, max_steps=steps, save_strategy="no",
                             per_device_train_batch_size=8, report_to=[], use_cpu=True, logging_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=_Regressor(), args=args, train_dataset=_Pairs(), callbacks=[CountSteps()])
    trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == steps, trainer.state.global_step
    return len(trained)


if __name__ == "__main__":
    import sys

    if sys.argv[1] == "resume":
        print(json.dumps({"trained": resume_trainer(sys.argv[2], sys.argv[3], int(sys.argv[4]))}))
        sys.exit(0)
    kind, target, control, count = sys.argv[1:]
    {"lightning": lightning_loop, "transformers": transformers_loop}[kind](target, control, int(count))
