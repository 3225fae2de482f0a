"""Helpers for test_outage.py: an outage timeline, a log of timed calls, a trainer loop.

* ``Outage`` drives a ``FaultProxy`` through phases (``hang`` for T seconds, then
  ``refuse`` for T seconds) on its own thread, on a fixed clock: a filesystem call
  that blocks on S3 cannot delay the end of the outage, and the proxy is always
  back to pass-through when the ``with`` block ends.
* ``CallLog`` times every call a test makes (through the mount, or to local disk
  for the baseline), keeps the errno of the ones that fail, and summarises: the
  longest call, the save-time ratios against local saves.
* ``checkpoint_step`` is one step of a trainer-style loop: a new
  ``tmp-checkpoint-N`` directory, ``torch.save`` of model and optimizer state, the
  rename to ``checkpoint-N``, a ``latest`` file, a ``last`` symlink replaced, and
  ``shutil.rmtree`` of all but the newest checkpoints. Its data is a pure function
  of the step, so a reference run without an outage must leave the same bytes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from conftest import get_bytes, list_keys, run_cli
from frameworks_workers import tensors

MiB = 1 << 20
KEEP = 2                        # checkpoints kept by the rotation
# Model and optimizer state of a step: 4 MiB and 8 MiB, times this (S3CKPTFS_OUTAGE_STATE_SCALE=16
# measures saves of checkpoint size, 64 and 128 MiB; the suite keeps them small).
STATE_SCALE = int(os.environ.get("S3CKPTFS_OUTAGE_STATE_SCALE", "1"))
CHECKPOINT = re.compile(r"checkpoint-(\d+)")


# -- the outage ------------------------------------------------------------------------------------

class Outage:
    """An outage of ``proxy``: ``phases`` (``[("hang", 60), ("refuse", 60)]``) once started.

    The proxy follows the phases on its own clock (``FaultProxy.run_schedule``),
    so a call that blocks here, even holding the GIL, cannot delay the end of the
    outage. ``mode`` is ``"before"``, then each phase's name, then ``"healed"``.
    Leaving the ``with`` block ends the outage at once if it is still on (a
    failing test must not leave the proxy hung).
    """

    def __init__(self, proxy: Any, phases: list[tuple[str, float]]) -> None:
        self.proxy = proxy
        self.phases = phases
        self.duration = sum(seconds for _, seconds in phases)
        self.t0: float | None = None
        self._ended = False

    def start(self) -> None:
        self.t0 = self.proxy.run_schedule(self.phases)

    @property
    def started(self) -> bool:
        return self.t0 is not None

    @property
    def mode(self) -> str:
        if self.t0 is None:
            return "before"
        elapsed = time.monotonic() - self.t0
        for mode, seconds in self.phases:
            if elapsed < seconds and not self._ended:
                return mode
            elapsed -= seconds
        return "healed"

    @property
    def active(self) -> bool:
        return self.mode not in ("before", "healed")

    def wait_until(self, offset: float) -> None:
        """Sleep until ``offset`` seconds after the start of the outage (no sleep if past)."""
        assert self.t0 is not None, "the outage has not started"
        time.sleep(max(0.0, self.t0 + offset - time.monotonic()))

    def wait_healed(self) -> None:
        """Wait for the end of the last phase, when the proxy passes again."""
        if self.t0 is None:
            return
        limit = max(0.0, self.t0 + self.duration - time.monotonic()) + 30
        if not self.proxy.wait_schedule(limit):
            raise TimeoutError(f"the outage did not end within {limit:.0f}s of its schedule")
        self._ended = True

    def heal(self) -> None:
        """End the outage now, if it is on."""
        if self.t0 is not None and not self._ended:
            self.proxy.cancel_schedule()
            self._ended = True

    def __enter__(self) -> Outage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.heal()


# -- timed calls -------------------------------------------------------------------------------------

@dataclass
class Call:
    """One timed call: what, where (``mount`` or ``local``), when (seconds from the log's start)."""

    label: str
    where: str
    step: int | None
    phase: str
    started: float
    seconds: float
    error: str | None = None
    save: bool = False


class CallLog:
    """Times calls and keeps them; ``phase`` tells which part of the outage a call started in."""

    def __init__(self, phase: Callable[[], str] = lambda: "none") -> None:
        self.phase = phase
        self.baseline = "local"   # where the saves that ratios compare with were made
        self.calls: list[Call] = []
        self.notes: list[str] = []
        self._t0 = time.monotonic()
        self._lock = threading.Lock()

    def timed(self, label: str, fn: Callable[..., Any], *args: Any, step: int | None = None,
              where: str = "mount", save: bool = False, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` and record how long it took; an exception is recorded
        (with its errno name) and raised again."""
        phase = self.phase()
        started = time.monotonic()
        error = None
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            error = describe_error(exc)
            raise
        finally:
            seconds = time.monotonic() - started
            with self._lock:
                self.calls.append(Call(label, where, step, phase, started - self._t0, seconds, error, save))

    def note(self, text: str) -> None:
        with self._lock:
            self.notes.append(text)

    def adopt_baseline(self, other: CallLog) -> None:
        """Compare saves with ``other``'s (a run on the mount without outage) instead of local ones."""
        self.baseline = "reference run without outage"
        self.calls += [Call(**{**asdict(c), "where": self.baseline}) for c in other.on_mount() if c.save]

    def on_mount(self) -> list[Call]:
        return [c for c in self.calls if c.where == "mount"]

    def errors(self) -> list[Call]:
        return [c for c in self.on_mount() if c.error]

    def longest(self, phases: tuple[str, ...] | None = None) -> Call | None:
        calls = [c for c in self.on_mount() if phases is None or c.phase in phases]
        return max(calls, key=lambda c: c.seconds, default=None)

    def save_ratios(self, baseline: str | None = None) -> list[tuple[Call, float]]:
        """Each save on the mount with the ratio of its time to the same save in ``baseline``
        (by default on local disk, unless ``adopt_baseline`` said otherwise)."""
        baseline = baseline or self.baseline
        local = {(c.step, c.label): c.seconds for c in self.calls if c.where == baseline and c.save}
        return [(c, c.seconds / max(local[(c.step, c.label)], 1e-6)) for c in self.on_mount()
                if c.save and (c.step, c.label) in local]

    def ratio_figures(self, baseline: str, outage_phases: tuple[str, ...]) -> dict[str, Any]:
        ratios = self.save_ratios(baseline)
        during = [r for c, r in ratios if c.phase in outage_phases]
        return {
            "max": max((r for _, r in ratios), default=None),
            "median": statistics.median([r for _, r in ratios]) if ratios else None,
            "max_during_outage": max(during, default=None),
            "median_during_outage": statistics.median(during) if during else None,
        }

    def summary(self, outage_phases: tuple[str, ...] = ("hang", "refuse")) -> dict[str, Any]:
        """The figures a report quotes: longest call (overall, during the outage), save ratios."""
        def brief(call: Call | None) -> dict[str, Any] | None:
            return None if call is None else {k: v for k, v in asdict(call).items() if k != "save"}

        saves = [c.seconds for c in self.on_mount() if c.save]
        return {
            "mount_calls": len(self.on_mount()),
            "longest_call": brief(self.longest()),
            "longest_call_during_outage": brief(self.longest(outage_phases)),
            "errors": [brief(c) for c in self.errors()],
            "saves": len(saves),
            "longest_save_seconds": max(saves, default=None),
            "median_save_seconds": statistics.median(saves) if saves else None,
            "save_ratio_baseline": self.baseline,
            "save_ratio": self.ratio_figures(self.baseline, outage_phases),
            # A close on the mount makes the file durable (local_sync=close): the same save to
            # local disk followed by an fsync is the like-for-like baseline.
            "save_ratio_vs_local_fsync": (self.ratio_figures(LOCAL_FSYNC, outage_phases)
                                          if any(c.where == LOCAL_FSYNC for c in self.calls) else None),
            "notes": list(self.notes),
        }

    def report(self, path: Path, title: str, **extra: Any) -> dict[str, Any]:
        """Write the summary and every call to ``path`` (JSON) and print the summary."""
        summary = {"test": title, **extra, **self.summary()}
        path.write_text(json.dumps({**summary, "calls": [asdict(c) for c in self.calls]}, indent=1))
        print(f"\n=== outage report: {title} ({path}) ===\n{json.dumps(summary, indent=1)}")
        return summary


def describe_error(exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    name = errno.errorcode.get(code, str(code)) if code is not None else type(exc).__name__
    return f"{name}: {exc}"


def call_bound_failures(log: CallLog, bound: float) -> list[str]:
    """Every call on the mount that took ``bound`` seconds or more, described."""
    return [f"{c.label} (step {c.step}, {c.phase}) took {c.seconds:.1f}s"
            + (f" and failed: {c.error}" if c.error else "")
            for c in log.on_mount() if c.seconds >= bound]


# -- bounded calls (for checks that must not block the test) -------------------------------------

class Bounded:
    """Runs ``fn`` on a thread; ``wait(limit)`` returns what happened within ``limit`` seconds.

    A call still blocked at the limit keeps running (a FUSE call cannot be
    cancelled); ``finish`` joins it once the outage is over, before unmount.
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self._fn = fn
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bounded-call")
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        finally:
            self.seconds = time.monotonic() - self._started

    def wait(self, limit: float) -> Bounded:
        self._thread.join(timeout=max(0.0, self._started + limit - time.monotonic()))
        return self

    @property
    def blocked(self) -> bool:
        return self._thread.is_alive()

    def finish(self, timeout: float = 300.0) -> None:
        self._thread.join(timeout=timeout)

    def outcome(self) -> str:
        if self.blocked:
            return f"still blocked after {time.monotonic() - self._started:.1f}s"
        if self.error is not None:
            return f"{describe_error(self.error)} after {self.seconds:.1f}s"
        return f"returned {self.result!r} after {self.seconds:.1f}s"


# -- the trainer loop -------------------------------------------------------------------------------

def step_state(step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model (4 MiB) and AdamW-shaped optimizer state (8 MiB) of a step, from a fixed seed
    (times ``STATE_SCALE``)."""
    model = tensors(4, STATE_SCALE * 256 * 1024, seed=1000 + step)
    moments = tensors(8, STATE_SCALE * 256 * 1024, seed=2000 + step)
    optimizer = {
        "state": {i: {"step": torch.tensor(float(step)), "exp_avg": moments[f"layer{2 * i}.weight"],
                      "exp_avg_sq": moments[f"layer{2 * i + 1}.weight"].abs()} for i in range(4)},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                          "params": [0, 1, 2, 3]}],
    }
    return model, optimizer


SAVES = ("model.pt", "optimizer.pt")


LOCAL_FSYNC = "local, then fsync"


def save_and_fsync(state: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_step(root: Path, step: int, log: CallLog, local: Path | None = None, keep: int = KEEP) -> None:
    """One checkpoint of a trainer-style loop under ``root``, every call timed in ``log``.

    With ``local``, the same saves also go to ``local/checkpoint-N/`` (timed as
    ``where="local"``): the baseline a save on the mount is compared with.
    Raises what the first failing call raised.
    """
    tmp, final = root / f"tmp-checkpoint-{step}", root / f"checkpoint-{step}"
    states = dict(zip(SAVES, step_state(step)))
    log.timed("makedirs", os.makedirs, tmp, step=step)
    for name, state in states.items():
        log.timed(f"torch.save {name}", torch.save, state, tmp / name, step=step, save=True)
        if local is not None:
            (local / final.name).mkdir(parents=True, exist_ok=True)
            log.timed(f"torch.save {name}", torch.save, state, local / final.name / name, step=step,
                      where="local", save=True)
            log.timed(f"torch.save {name}", save_and_fsync, state, local / "fsynced" / final.name / name, step=step,
                      where=LOCAL_FSYNC, save=True)
    log.timed("rename dir", os.rename, tmp, final, step=step)
    log.timed("write latest", (root / "latest").write_text, final.name, step=step)
    log.timed("symlink", os.symlink, final.name, root / "last.tmp", step=step)
    log.timed("replace last", os.replace, root / "last.tmp", root / "last", step=step)
    names = log.timed("listdir", os.listdir, root, step=step)
    done = sorted((n for n in names if CHECKPOINT.fullmatch(n)), key=lambda n: int(n.split("-")[1]))
    for old in done[:-keep]:
        log.timed("rmtree", rmtree_explained, root / old, step=step)


def rmtree_explained(path: Path) -> None:
    """shutil.rmtree, and if it finds a directory's inode number changed between its lstat and its
    open (it then says "Cannot call rmtree on a symbolic link"; seen once, not understood yet), what
    the path looks like right after, so that the failure can be told apart."""
    before = os.lstat(path)
    try:
        shutil.rmtree(path)
    except OSError as exc:
        if "symbolic link" not in str(exc):
            raise
        seen = [f"lstat before rmtree: mode {before.st_mode:o} ino {before.st_ino}"]
        for what, look in (("lstat", os.lstat), ("stat", os.stat)):
            try:
                st = look(path)
                seen.append(f"{what}: mode {st.st_mode:o} ino {st.st_ino}")
            except OSError as err:
                seen.append(f"{what}: {err}")
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                seen.append(f"open+fstat: mode {st.st_mode:o} ino {st.st_ino}")
            finally:
                os.close(fd)
        except OSError as err:
            seen.append(f"open: {err}")
        raise OSError(f"{exc} ({'; '.join(seen)})") from exc


def run_step(root: Path, step: int, log: CallLog, local: Path | None = None) -> bool:
    """``checkpoint_step``, but a failure abandons only this step (it is in ``log``): the loop
    goes on, as a trainer that catches save errors would, so that every stall is measured."""
    try:
        checkpoint_step(root, step, log, local)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed open as RuntimeError
        log.note(f"step {step} abandoned: {describe_error(exc)}")
        return False
    return True


def expected_listing(last_step: int, keep: int = KEEP) -> list[str]:
    """What ``root`` holds after the loop's step ``last_step``."""
    kept = [f"checkpoint-{s}" for s in range(max(1, last_step - keep + 1), last_step + 1)]
    return sorted(kept + ["latest", "last"])


# -- S3 contents -----------------------------------------------------------------------------------

def s3_snapshot(s3: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix/`` (key relative to it) with its bytes."""
    base = prefix.strip("/") + "/"
    return {key[len(base):]: get_bytes(s3, bucket, key) for key in list_keys(s3, bucket, base)}


def snapshot_differences(actual: dict[str, bytes], expected: dict[str, bytes],
                         compare_bytes: Callable[[str], bool] = lambda key: True) -> list[str]:
    """How ``actual`` differs from ``expected`` (names, then bytes of keys ``compare_bytes`` accepts)."""
    problems = [f"missing: {key}" for key in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected: {key}" for key in sorted(actual.keys() - expected.keys())]
    problems += [f"bytes differ: {key} ({len(actual[key])} vs {len(expected[key])} bytes)"
                 for key in sorted(actual.keys() & expected.keys())
                 if compare_bytes(key) and actual[key] != expected[key]]
    return problems


def status_json(mount: Any) -> dict[str, Any]:
    """``s3ckptfs status MOUNTPOINT --json`` (exit status 1 only means something failed)."""
    result = run_cli(["status", str(mount.path), "--json"], mount.env, timeout=60)
    assert result.returncode in (0, 1), result.describe()
    return json.loads(result.stdout)
