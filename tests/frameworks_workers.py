"""Process entry points for test_frameworks.py.

``torch.multiprocessing.spawn`` and ``multiprocessing`` with the spawn start
method import their target by module name, so these functions live in a plain
module beside the tests rather than in the test file itself. Everything here is
deterministic: the parent regenerates the same data to check what S3 holds.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

import torch

DCP_WORLD_SIZE = 2


# -- deterministic data ------------------------------------------------------------------------

def tensors(count: int, numel: int, seed: int, prefix: str = "layer") -> dict[str, torch.Tensor]:
    """``count`` float32 tensors of ``numel`` elements each, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return {f"{prefix}{i}.weight": torch.randn(numel, generator=generator) for i in range(count)}


def assert_equal_states(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys(), (sorted(expected), sorted(actual))
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert isinstance(actual[name], torch.Tensor), name
            assert value.dtype == actual[name].dtype, name
            assert torch.equal(value, actual[name]), name
        elif isinstance(value, dict):
            assert_equal_states(value, actual[name])
        else:
            assert value == actual[name], name


# -- torch.distributed.checkpoint (2 ranks, gloo) -------------------------------------------------

def dcp_state(rank: int) -> dict[str, Any]:
    """A rank's state: replicated tensors (saved once, deduplicated by the planner) plus
    tensors only this rank holds, so that every rank writes a data file."""
    state: dict[str, Any] = {
        "model": tensors(3, 64 * 1024, seed=100),  # 3 x 256 KiB, the same on every rank
        "step": 7,
    }
    state[f"rank{rank}"] = tensors(2, 256 * 1024, seed=200 + rank)  # 2 x 1 MiB per rank
    return state


def dcp_zeros_like(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[name] = torch.zeros_like(value)
        elif isinstance(value, dict):
            out[name] = dcp_zeros_like(value)
        else:
            out[name] = -1
    return out


def _init_gloo(rank: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=DCP_WORLD_SIZE)


def dcp_save_worker(rank: int, port: int, local_dir: str, mount_dir: str, async_result: str) -> None:
    """Save the same state with DCP to a local reference directory and into the mount.

    Under the mount: ``default`` (FileSystemWriter from ``checkpoint_id``),
    ``threaded`` (FileSystemWriter with 4 threads and one file per item) and
    ``async`` (``dcp.async_save``; its outcome is written to ``async_result``).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    _init_gloo(rank, port)
    try:
        state = dcp_state(rank)
        for base in (local_dir, mount_dir):
            dcp.save(state, checkpoint_id=os.path.join(base, "default"))
            dcp.save(state, storage_writer=FileSystemWriter(
                os.path.join(base, "threaded"), thread_count=4, single_file_per_rank=False))
        outcome = "ok"
        try:
            for base in (local_dir, mount_dir):
                future = dcp.async_save(state, checkpoint_id=os.path.join(base, "async"))
                future.result()
        except Exception:  # noqa: BLE001 - reported to the parent, which decides
            outcome = "error\n" + traceback.format_exc()
        if rank == 0:
            Path(async_result).write_text(outcome)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def dcp_load_worker(rank: int, port: int, mount_dir: str, names: list[str]) -> None:
    """Load each named checkpoint under ``mount_dir`` into zeroed tensors and compare."""
    import torch.distributed.checkpoint as dcp

    _init_gloo(rank, port)
    try:
        expected = dcp_state(rank)
        for name in names:
            target = dcp_zeros_like(expected)
            dcp.load(target, checkpoint_id=os.path.join(mount_dir, name))
            assert_equal_states(expected, target)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


# -- many small files mixed with large ones, several writer processes ------------------------------

SMALL_JSON_FILES = 12
LARGE_NUMEL = 5 * 1024 * 1024  # 20 MiB of float32: a multipart upload


def small_files_plan(worker: int) -> dict[str, bytes]:
    """Every file a writer process writes into the shared directory (name -> bytes),
    except the torch.save files, which are checked by loading them."""
    files: dict[str, bytes] = {}
    for i in range(SMALL_JSON_FILES):
        files[f"w{worker}_state_{i:02d}.json"] = json.dumps(
            {"worker": worker, "index": i, "loss": 1.0 / (i + 1), "tags": ["a", "b", "=x"]},
            sort_keys=True).encode()
    vocab = "\n".join(f"tok{worker}_{i}" for i in range(2000)) + "\n"
    files[f"w{worker}_vocab.txt"] = vocab.encode()
    files[f"w{worker}_merges.txt"] = ("#version: 0.2\n" + "".join(
        f"t{i} o{i}\n" for i in range(1500))).encode()
    files[f"w{worker}_tokenizer.json"] = json.dumps(
        {"model": {"vocab": {f"tok{worker}_{i}": i for i in range(2000)}}}, sort_keys=True).encode()
    files[f"w{worker}_special_tokens_map.json"] = b'{"eos_token": "</s>"}'
    return files


def rng_state(worker: int) -> torch.Tensor:
    torch.manual_seed(1000 + worker)
    return torch.get_rng_state()


def large_state(worker: int) -> dict[str, torch.Tensor]:
    return tensors(1, LARGE_NUMEL, seed=300 + worker, prefix=f"w{worker}.")


def small_files_writer(worker: int, directory: str, error_file: str) -> None:
    """Interleave small JSON/text files, an RNG-state torch.save and one large torch.save."""
    try:
        out = Path(directory)
        files = list(small_files_plan(worker).items())
        half = len(files) // 2
        for name, data in files[:half]:
            (out / name).write_bytes(data)
        torch.save(rng_state(worker), out / f"w{worker}_rng_state.pth")
        torch.save(large_state(worker), out / f"w{worker}_model.pt")
        for name, data in files[half:]:
            with open(out / name, "wb") as f:  # written in two pieces
                f.write(data[: len(data) // 2])
                f.write(data[len(data) // 2:])
    except BaseException:
        Path(error_file).write_text(traceback.format_exc())
        raise
