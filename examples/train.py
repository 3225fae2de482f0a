"""A tiny training loop that checkpoints the ordinary way.

Saves ``step_N.pt`` (model, optimizer, step) every ``--save-every`` steps into
``--ckpt-dir``, writes the newest name into a ``latest`` text file, keeps the
last ``--keep-last`` checkpoints, and resumes from ``latest`` when it exists.
Nothing here knows what kind of directory ``--ckpt-dir`` is.

    python examples/train.py --ckpt-dir /mnt/ckpt --steps 30
    python examples/train.py --ckpt-dir /mnt/ckpt --steps 60   # resumes at 30
"""

from __future__ import annotations

import argparse
import os
import re
import time

import torch
from torch import nn


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


def save_checkpoint(ckpt_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    loss: float, keep_last: int) -> str:
    """Write ``step_<step>.pt``, point ``latest`` at it, drop checkpoints beyond ``keep_last``."""
    name = f"step_{step}.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "loss": loss}, f"{ckpt_dir}/{name}")
    with open(os.path.join(ckpt_dir, "latest"), "w") as f:
        f.write(name + "\n")
    if keep_last > 0:
        steps = sorted(int(m.group(1)) for m in map(re.compile(r"step_(\d+)\.pt$").match, os.listdir(ckpt_dir))
                       if m)
        for old in steps[:-keep_last]:
            os.remove(os.path.join(ckpt_dir, f"step_{old}.pt"))
    return name


def resume(ckpt_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load the checkpoint named in ``latest``; return the step to continue from (0 if none)."""
    latest = os.path.join(ckpt_dir, "latest")
    if not os.path.exists(latest):
        print(f"no checkpoint in {ckpt_dir}: starting from scratch")
        return 0
    with open(latest) as f:
        name = f.read().strip()
    state = torch.load(os.path.join(ckpt_dir, name))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    print(f"resumed from {name} (step {state['step']}, loss {state['loss']:.4f})")
    return state["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--steps", type=int, default=30, help="train until this step")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--keep-last", type=int, default=0, help="0 keeps every checkpoint")
    parser.add_argument("--hidden", type=int, default=1024, help="width (1024: ~13 MB checkpoints)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    os.makedirs(args.ckpt_dir, exist_ok=True)
    model = make_model(args.hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = resume(args.ckpt_dir, model, optimizer)

    # A fixed random regression problem: y = x @ w + noise.
    data_gen = torch.Generator().manual_seed(1234)
    true_w = torch.randn(64, 1, generator=data_gen)
    began = time.monotonic()
    loss_value = float("nan")
    for step in range(start + 1, args.steps + 1):
        x = torch.randn(args.batch_size, 64)
        y = x @ true_w + 0.1 * torch.randn(args.batch_size, 1)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if step % args.save_every == 0 or step == args.steps:
            name = save_checkpoint(args.ckpt_dir, step, model, optimizer, loss_value, args.keep_last)
            print(f"step {step:4d}  loss {loss_value:.4f}  saved {name}")
    if start >= args.steps:
        print(f"already at step {start}; nothing to do (raise --steps to train further)")
    else:
        print(f"trained steps {start + 1}..{args.steps} in {time.monotonic() - began:.1f}s")


if __name__ == "__main__":
    main()
