"""The workload: one deterministic state dict per size, saved and loaded the way training code does.

Also the conditions every timed step starts from (a dropped page cache,
optionally memory faulted in and freed) and the loader processes that load
one checkpoint several at once.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .common import MiB, Janitor, MeasurementError, stop_process

TENSOR_BYTES = 4 * MiB
SEED = 20240601
CHECKPOINT_NAME = "ckpt.pt"
CONCURRENT_LOADERS = 4

LOADER_CODE = """
import sys, time, torch
print("ready", flush=True)
sys.stdin.readline()
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
print(len(state), time.monotonic(), flush=True)
"""


# --------------------------------------------------------------------------- state dict


def tensor_numels(size: int) -> list[int]:
    """Element counts of the tensors making up ``size`` bytes of float32."""
    full, rest = divmod(size, TENSOR_BYTES)
    numels = [TENSOR_BYTES // 4] * full
    if rest >= 4:
        numels.append(rest // 4)
    return numels


def make_tensor(index: int, numel: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(SEED + index)
    return torch.rand(numel, generator=generator, dtype=torch.float32)


def tensor_name(index: int) -> str:
    return f"layers.{index:05d}.weight"


def make_state_dict(size: int) -> dict[str, torch.Tensor]:
    """The deterministic state dict of ``size`` bytes: tensor i depends only on i."""
    return {tensor_name(i): make_tensor(i, n) for i, n in enumerate(tensor_numels(size))}


def check_loaded(state: Any, size: int) -> None:
    """Raise MeasurementError unless ``state`` is the state dict of ``size`` bytes.

    Every tensor's shape is checked; the first and the last are compared value
    by value (each can be regenerated alone).
    """
    numels = tensor_numels(size)
    if not isinstance(state, dict) or len(state) != len(numels):
        raise MeasurementError("loaded checkpoint does not have the expected tensors")
    for index, numel in enumerate(numels):
        if state[tensor_name(index)].numel() != numel:
            raise MeasurementError(f"tensor {index} has the wrong size")
    for index in {0, len(numels) - 1}:
        if not torch.equal(state[tensor_name(index)], make_tensor(index, numels[index])):
            raise MeasurementError(f"tensor {index} differs from what was saved")


# --------------------------------------------------------------------------- save and load


def timed_save(state: dict[str, torch.Tensor], destination: Any) -> float:
    """Seconds ``torch.save`` takes to return."""
    start = time.perf_counter()
    torch.save(state, destination)
    return time.perf_counter() - start


def timed_load(source: Any, size: int) -> float:
    """Seconds ``torch.load`` takes; the loaded state dict is checked afterwards (untimed)."""
    start = time.perf_counter()
    state = torch.load(source, map_location="cpu", weights_only=True)
    seconds = time.perf_counter() - start
    check_loaded(state, size)
    return seconds


def copy_in_pieces(source: Path, destination: Path, piece: int = TENSOR_BYTES) -> None:
    """Write a file sequentially in torch.save-sized pieces (the same bytes it would write)."""
    with open(source, "rb") as reader, open(destination, "wb") as writer:
        while data := reader.read(piece):
            writer.write(data)


def read_whole_file(path: Path) -> None:
    """Bring a file into the page cache."""
    with open(path, "rb", buffering=0) as handle:
        while handle.read(8 * MiB):
            pass


# --------------------------------------------------------------------------- starting conditions


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache; False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError:
        return False
    return True


def warm_free_memory(nbytes: int) -> None:
    """Fault in ``nbytes`` of memory, then free it, so the next step finds it ready.

    On a VM that reports freed memory to its host at once (free page reporting,
    as on the development VM), a step that needs fresh memory (a checkpoint's page
    cache) waits for the host to hand it back, by how long depending on when the
    memory was freed, not on the tool measured: the same 1 GiB write took 0.4 s or
    2.4 s there. Doing this right before every timed step is meant to give each the
    same start. Off by default: measured there, it evened out the s3ckptfs stall in
    the later rounds of a run but not the first ones, and a whole run with it was
    no less noisy (docs/bench/1gib-warm-memory.md).
    """
    if nbytes <= 0:
        return
    with mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE):
        pass


# --------------------------------------------------------------------------- several loaders at once


@contextlib.contextmanager
def loader_processes(janitor: Janitor, path: Path, count: int) -> Iterator[list[subprocess.Popen]]:
    """Loader processes that have imported torch and wait for a line on stdin to load ``path``."""
    loaders: list[subprocess.Popen] = []
    tokens: list[int] = []
    try:
        for _ in range(count):
            process = subprocess.Popen([sys.executable, "-c", LOADER_CODE, str(path)], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, start_new_session=True)
            loaders.append(process)
            tokens.append(janitor.add(f"stop loader {process.pid}", lambda p=process: stop_process(p, 0)))
        for process in loaders:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise MeasurementError(f"loader {process.pid} failed to start")
        yield loaders
    finally:
        for token in tokens:
            janitor.run(token)


def run_loaders(loaders: list[subprocess.Popen], timeout: float) -> float:
    """Release every loader at once; seconds until the last one has loaded."""
    start = time.monotonic()
    for process in loaders:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    finished = []
    for process in loaders:
        output, _ = process.communicate(timeout=timeout)
        if process.returncode != 0 or not output.strip():
            raise MeasurementError(f"loader {process.pid} exited with {process.returncode}")
        finished.append(float(output.split()[-1]))
    return max(finished) - start
