"""What every part of the benchmark shares: units, logging, the error that skips a
measurement, and the janitor that releases everything the run started."""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


class MeasurementError(RuntimeError):
    """A measurement could not be completed; the benchmark goes on with the next one."""


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the final report."""
    print(message, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    """Bytes in '256MiB', '1GiB', '8MB', '1048576'."""
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": MiB, "mb": 10**6,
             "mib": MiB, "g": GiB, "gb": 10**9, "gib": GiB, "t": 1 << 40, "tib": 1 << 40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def format_size(size: int) -> str:
    """The shortest exact name of a size: '1GiB', '256MiB', '1000B'."""
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def tail(path: Any, lines: int = 15) -> str:
    """The last lines of a log file, for an error message."""
    try:
        with open(path, errors="replace") as handle:
            return "\n".join(handle.read().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait for a child we started to exit; terminate it, then kill it, if it does not."""
    try:
        process.wait(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        pass
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------- cleanup


class Janitor:
    """Undo actions (unmount, stop, delete), run newest first, each exactly once.

    Actions are registered the moment a resource is created, so that an error,
    Ctrl-C or SIGTERM at any point still releases it.
    """

    def __init__(self) -> None:
        self._actions: dict[int, tuple[str, Callable[[], None]]] = {}
        self._next = 0
        self._lock = threading.Lock()

    def add(self, description: str, action: Callable[[], None]) -> int:
        """Register an undo action; the returned token runs it early with ``run``."""
        with self._lock:
            self._next += 1
            self._actions[self._next] = (description, action)
            return self._next

    def run(self, token: int) -> None:
        """Run one action now (if still pending) and forget it."""
        with self._lock:
            entry = self._actions.pop(token, None)
        if entry is not None:
            self._call(*entry)

    def run_all(self) -> None:
        """Run every pending action, newest first; signals are ignored meanwhile."""
        previous = _ignore_signals()
        try:
            while True:
                with self._lock:
                    if not self._actions:
                        return
                    token = max(self._actions)
                    entry = self._actions.pop(token)
                self._call(*entry)
        finally:
            _restore_signals(previous)

    @staticmethod
    def _call(description: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as exc:  # cleanup must go on with the rest
            log(f"cleanup: {description} failed: {exc}")


HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_on_signal(signum: int, _frame: Any) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    log(f"{signal.Signals(signum).name}: cleaning up")
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """Turn SIGINT, SIGTERM and SIGHUP into exceptions so that finally blocks run."""
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, _raise_on_signal)


def _ignore_signals() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, signal.SIG_IGN) for signum in HANDLED_SIGNALS}


def _restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
