"""Training runs for tests/test_integrations.py, each in a process of its own (they get SIGTERM).

    python integration_workers.py lightning DIRPATH MAX_EPOCHS [SIGTERM_AT_EPOCH]
    python integration_workers.py transformers OUTPUT_DIR MAX_STEPS SAVE_STEPS [sigterm-after-save]

A SIGTERM is sent by the run to itself at a known point (an epoch start, just
after a save), as a scheduler would send it, so that what is on the mount at
that moment is known.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import torch


def _data(count: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(count, 8, generator=generator)
    return x, x.sum(dim=1, keepdim=True)


def lightning_run(dirpath: str, max_epochs: int, sigterm_at_epoch: int | None) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from s3ckptfs.integrations.lightning import DurableCheckpoints

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Preempt(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch == sigterm_at_epoch:
                os.kill(os.getpid(), signal.SIGTERM)

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=dirpath,
                        callbacks=[Preempt(), ModelCheckpoint(dirpath=dirpath, save_last=True),
                                   DurableCheckpoints()])
    trainer.fit(Tiny(), loader)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data(64)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "labels": self.y[index]}


class _TinyRegressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


def transformers_trainer(output_dir: str, max_steps: int, save_steps: int, extra_callbacks: list | None = None):
    """A Trainer with the durable-checkpoint callback, on a tiny model and data made here."""
    from transformers import Trainer, TrainingArguments

    from s3ckptfs.integrations.transformers import DurableCheckpoints

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=output_dir, max_steps=max_steps, save_steps=save_steps,
                             save_strategy="steps", per_device_train_batch_size=8, report_to=[], use_cpu=True,
                             logging_strategy="no", disable_tqdm=True, save_total_limit=2)
    return Trainer(model=_TinyRegressor(), args=args, train_dataset=_Pairs(),
                   callbacks=[*(extra_callbacks or []), DurableCheckpoints()])


def transformers_run(output_dir: str, max_steps: int, save_steps: int, sigterm_after_save: bool) -> None:
    from transformers import TrainerCallback

    class Preempt(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if sigterm_after_save:
                os.kill(os.getpid(), signal.SIGTERM)

    transformers_trainer(output_dir, max_steps, save_steps, [Preempt()]).train()
    print(f"SIGTERM handler after train: {signal.getsignal(signal.SIGTERM)!r}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    kind, *rest = sys.argv[1:]
    if kind == "lightning":
        lightning_run(rest[0], int(rest[1]), int(rest[2]) if len(rest) > 2 else None)
    elif kind == "transformers":
        transformers_run(rest[0], int(rest[1]), int(rest[2]), len(rest) > 3 and rest[3] == "sigterm-after-save")
    else:
        sys.exit(f"unknown run {kind!r}")
