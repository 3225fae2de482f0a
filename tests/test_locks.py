"""The lock-order checker (s3ckptfs/locks.py), in-process: no FUSE, no S3 server.

Each test makes its own locks with checking on and strict (a violation raises in the
offending thread), and forgets the violations it provoked on purpose, so that the
suite-wide check in conftest.py only sees unexpected ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from s3ckptfs import locks
from s3ckptfs.s3client import S3Client, _checked_pages

PACKAGE = Path(locks.__file__).parent


@pytest.fixture
def checked():
    """Checking on and strict for this test; the violations it provoked are forgotten after it."""
    was_enabled, was_strict = locks.is_enabled(), locks.is_strict()
    locks.clear_violations()
    locks.enable(strict=True)
    yield
    locks.clear_violations()
    if was_enabled:
        locks.enable(strict=was_strict)
    else:
        locks.disable()


@pytest.fixture
def lenient(checked):
    """Checking on, not strict: violations are recorded and logged, never raised."""
    locks.enable(strict=False)
    yield


def run_in_thread(target, name: str = "helper") -> None:
    """Run ``target`` in another thread and re-raise what it raised."""
    errors: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    thread = threading.Thread(target=body, name=name)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"{name} did not finish"
    if errors:
        raise errors[0]


# -- factories ---------------------------------------------------------------------------

def test_checking_off_gives_plain_threading_types():
    """Production (no S3CKPTFS_LOCK_CHECK) pays nothing: the factories return threading's own types."""
    env = {k: v for k, v in os.environ.items() if k not in (locks.ENV_CHECK, locks.ENV_LOG)}
    code = ("import threading; from s3ckptfs import locks\n"
            "lock, rlock = locks.new_lock('file'), locks.new_rlock('mount')\n"
            "cond = locks.new_condition(lock)\n"
            "assert not locks.is_enabled()\n"
            "assert type(lock) is type(threading.Lock()), type(lock)\n"
            "assert type(rlock) is type(threading.RLock()), type(rlock)\n"
            "assert type(cond) is threading.Condition, type(cond)\n"
            "locks.assert_no_locks_held('S3 HEAD')\n"
            "with lock: locks.assert_no_locks_held('S3 HEAD')\n"
            "print('plain')\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "plain", result.stderr


def test_environment_variable_turns_checking_on_at_import():
    env = dict(os.environ, **{locks.ENV_CHECK: "1"})
    code = ("from s3ckptfs import locks\n"
            "assert locks.is_enabled() and not locks.is_strict()\n"
            "print(type(locks.new_lock('file')).__name__,\n"
            "      type(locks.new_condition(locks.new_rlock('mount'))).__name__)")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["CheckedLock", "CheckedCondition"]


def test_disable_in_process_gives_plain_locks(checked):
    locks.disable()
    assert type(locks.new_lock("handles")) is type(threading.Lock())
    assert type(locks.new_condition(locks.new_lock("room"))) is threading.Condition
    locks.enable(strict=True)
    assert isinstance(locks.new_lock("handles"), locks.CheckedLock)


def test_every_lock_has_a_row_with_the_right_kind(checked):
    with pytest.raises(ValueError, match="not in the lock order"):
        locks.new_lock("nonsense")
    with pytest.raises(ValueError, match="re-entrant"):
        locks.new_lock("mount")          # its row says re-entrant
    with pytest.raises(ValueError, match="not re-entrant"):
        locks.new_rlock("file")          # its row does not
    locks.disable()
    with pytest.raises(ValueError):      # checked whether or not checking is on
        locks.new_lock("nonsense")


# -- the order ---------------------------------------------------------------------------

def test_taking_locks_in_rank_order_passes(checked):
    mount, uploader, file, meta = (locks.new_rlock("mount"), locks.new_lock("uploader"),
                                   locks.new_lock("file"), locks.new_lock("metadata"))
    with mount:
        with uploader:
            with file:
                with meta:
                    assert locks.held_locks() == ("mount", "uploader", "file", "metadata")
                assert locks.held_locks() == ("mount", "uploader", "file")
        with file:   # skipping a rank is fine
            pass
    assert locks.held_locks() == ()
    assert locks.violations() == []


def test_taking_a_lower_rank_fails_and_leaves_the_lock_free(checked):
    mount, file = locks.new_rlock("mount"), locks.new_lock("file")
    with file:
        with pytest.raises(locks.LockOrderError, match="takes mount .* while holding file"):
            mount.acquire()
        assert locks.held_locks() == ("file",)
    assert locks.held_locks() == ()
    # Not taken: another thread can have it at once.
    run_in_thread(lambda: mount.acquire(timeout=1) and mount.release())
    (found,) = locks.violations()
    assert found.thread == threading.current_thread().name
    assert found.held == ("file",) and found.taking == "mount"
    assert "test_taking_a_lower_rank_fails_and_leaves_the_lock_free" in found.stack
    assert "s3ckptfs/locks.py" not in found.stack   # the stack ends at the call site


def test_two_locks_of_one_rank_fail(checked):
    first, second = locks.new_lock("file"), locks.new_lock("file")
    with first:
        with pytest.raises(locks.LockOrderError, match="two locks of one rank"):
            second.acquire()


def test_a_rank_whose_row_says_nests_may_hold_several(checked):
    kind = locks.LockKind("pieces", 30, "nowhere", "a test", nests=True, why="taken in ascending order")
    first, second = locks.CheckedLock(kind, threading.Lock()), locks.CheckedLock(kind, threading.Lock())
    mount = locks.new_rlock("mount")
    with first:
        with second:
            assert locks.held_locks() == ("pieces", "pieces")
            with pytest.raises(locks.LockOrderError):
                mount.acquire()   # still only upwards


def test_a_leaf_is_the_end_of_the_line(checked):
    meta, objects, file = locks.new_lock("metadata"), locks.new_lock("objects"), locks.new_lock("file")
    with meta:
        with pytest.raises(locks.LockOrderError):
            objects.acquire()
        with pytest.raises(locks.LockOrderError, match="out of order"):
            file.acquire()
    assert len(locks.violations()) == 2


def test_rlock_reentry_is_allowed_anywhere_on_the_stack(checked):
    """Re-entering a re-entrant lock never blocks, so it is fine even under a higher rank."""
    mount, file = locks.new_rlock("mount"), locks.new_lock("file")
    with mount:
        with mount:
            with file:
                with mount:   # what PassthroughFiles.choose_locked does through staged_bytes()
                    assert locks.held_locks() == ("mount", "mount", "file", "mount")
            assert locks.held_locks() == ("mount", "mount")
    assert locks.held_locks() == ()
    assert locks.violations() == []


def test_retaking_a_plain_lock_is_reported_instead_of_hanging(checked):
    file = locks.new_lock("file")
    with file:
        with pytest.raises(locks.LockOrderError, match="not re-entrant"):
            file.acquire()


def test_a_try_lock_is_not_checked_against_the_order(checked):
    mount, file = locks.new_rlock("mount"), locks.new_lock("file")
    with file:
        assert mount.acquire(blocking=False)
        assert locks.held_locks() == ("file", "mount")
        mount.release()
    assert locks.violations() == []


def test_each_thread_has_its_own_stack(checked):
    mount, file = locks.new_rlock("mount"), locks.new_lock("file")
    with file:
        run_in_thread(lambda: mount.acquire() and mount.release())   # another thread holds nothing
        assert locks.held_locks() == ("file",)
    assert locks.violations() == []


def test_locks_released_out_of_order_leave_the_stack_right(checked):
    mount, file = locks.new_rlock("mount"), locks.new_lock("file")
    mount.acquire()
    file.acquire()
    mount.release()
    assert locks.held_locks() == ("file",)
    file.release()
    assert locks.held_locks() == ()


def test_releasing_an_unheld_lock_raises_and_changes_nothing(checked):
    file = locks.new_lock("file")
    with pytest.raises(RuntimeError):
        file.release()
    assert locks.held_locks() == ()


# -- conditions ----------------------------------------------------------------------------

def test_wait_releases_the_lock_and_takes_it_back(checked):
    file = locks.new_lock("file")
    changed = locks.new_condition(file)
    seen: list[tuple[str, ...]] = []
    ready = threading.Event()
    state = {"done": False}

    def writer() -> None:
        ready.wait(5)
        with changed:   # possible only because the waiter gave the lock back
            state["done"] = True
            changed.notify_all()

    thread = threading.Thread(target=writer)
    thread.start()
    with changed:
        ready.set()

        def predicate() -> bool:
            seen.append(locks.held_locks())   # the predicate runs with the lock held
            return state["done"]

        assert changed.wait_for(predicate, timeout=10)
        assert locks.held_locks() == ("file",)
    thread.join(5)
    assert locks.held_locks() == ()
    assert set(seen) == {("file",)}
    assert locks.violations() == []


def test_wait_on_a_reentered_rlock_releases_every_level(checked):
    """While a thread waits, another can take the lower-ranked lock it re-entered, then its own order goes on."""
    mount = locks.new_rlock("mount")
    cond = locks.new_condition(mount)
    took = threading.Event()

    def other() -> None:
        with mount:
            took.set()
            with cond:
                cond.notify_all()

    with mount:
        with cond:
            thread = threading.Thread(target=other)
            thread.start()
            assert cond.wait_for(took.is_set, timeout=10)
            assert locks.held_locks() == ("mount", "mount")
        assert locks.held_locks() == ("mount",)
    thread.join(5)
    assert locks.held_locks() == ()
    assert locks.violations() == []


def test_wait_times_out_with_the_stack_intact(checked):
    uploader = locks.new_lock("uploader")
    queue_changed = locks.new_condition(uploader)
    file = locks.new_lock("file")
    with queue_changed:
        assert queue_changed.wait(0.01) is False
        assert not queue_changed.wait_for(lambda: False, timeout=0.01)
        with file:   # still in order after the wait
            assert locks.held_locks() == ("uploader", "file")
    assert locks.violations() == []


def test_waiting_under_the_mount_lock_is_a_violation(checked):
    """A wait for another thread (a commit request) with the mount's lock held stalls the mount."""
    mount, file = locks.new_rlock("mount"), locks.new_lock("file")
    changed = locks.new_condition(file)
    with mount:
        with changed:
            with pytest.raises(locks.LockOrderError, match="waits on a condition of file while holding mount"):
                changed.wait(0.01)
            assert locks.held_locks() == ("mount", "file")


def test_wait_for_under_the_mount_lock_is_a_violation_even_without_waiting(checked):
    """Whether it waits depends on a race (is a commit request in flight?): the call itself is reported."""
    mount, file = locks.new_rlock("mount"), locks.new_lock("file")
    changed = locks.new_condition(file)
    with changed:
        assert changed.wait_for(lambda: True)        # fine with only its own lock
    with mount:
        with changed:
            with pytest.raises(locks.LockOrderError, match="waits on a condition of file while holding mount"):
                changed.wait_for(lambda: True)


def test_waiting_while_holding_a_higher_rank_is_a_violation(checked):
    """The wait must take its lock back while the leaf is still held: out of order."""
    file, meta = locks.new_lock("file"), locks.new_lock("metadata")
    changed = locks.new_condition(file)
    with changed:
        with meta:
            with pytest.raises(locks.LockOrderError, match="take back after the wait while holding metadata"):
                changed.wait(0.01)


def test_notify_without_the_lock_raises(checked):
    cond = locks.new_condition(locks.new_lock("room"))
    with pytest.raises(RuntimeError):
        cond.notify_all()
    with pytest.raises(RuntimeError):
        cond.wait(0.01)


# -- slow calls under locks ------------------------------------------------------------------

def test_assert_no_locks_held(checked):
    mount, uploader, file, objects = (locks.new_rlock("mount"), locks.new_lock("uploader"),
                                      locks.new_lock("file"), locks.new_lock("objects"))
    locks.assert_no_locks_held("S3 PUT")
    with uploader:
        locks.assert_no_locks_held("S3 PUT")       # only the mount's and the files' locks by default
        with objects:
            locks.assert_no_locks_held("S3 PUT")
    with mount:
        with pytest.raises(locks.LockOrderError, match="S3 PUT while holding mount"):
            locks.assert_no_locks_held("S3 PUT")
        locks.assert_no_locks_held("journal fsync", ranks=("file",))
    with file:
        with pytest.raises(locks.LockOrderError, match="S3 PUT while holding file"):
            locks.assert_no_locks_held("S3 PUT")
    with uploader:
        with pytest.raises(locks.LockOrderError, match="while holding uploader"):
            locks.assert_no_locks_held("wait for a commit", ranks=("mount", "uploader", "file"))


def test_fsync_under_a_file_lock_is_a_violation(checked, tmp_path):
    file = locks.new_lock("file")
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        locks.fsync(fd)
        with file:
            with pytest.raises(locks.LockOrderError, match="fsync while holding file"):
                locks.fsync(fd)
            locks.fsync(fd, ranks=("mount",))   # a documented exception may narrow the rule
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def client() -> S3Client:
    # Nothing listens there: every call below must fail in the check, before any request.
    return S3Client("bucket", endpoint_url="http://127.0.0.1:9", region="us-east-1", retry_attempts=1,
                    connect_timeout=0.5, read_timeout=0.5)


S3_CALLS = {
    "head": lambda c: c.head("k"),
    "list_dir": lambda c: c.list_dir("p/"),
    "list_page": lambda c: c.list_page("p/"),
    "list_all": lambda c: list(c.list_all("p/")),
    "dir_summary": lambda c: c.dir_summary("p/"),
    "get_range_into": lambda c: c.get_range_into("k", 0, 10, -1),
    "get_bytes": lambda c: c.get_bytes("k"),
    "put": lambda c: c.put("k", b"x"),
    "create_multipart": lambda c: c.create_multipart("k"),
    "upload_part": lambda c: c.upload_part("k", "u", 1, b"x"),
    "complete_multipart": lambda c: c.complete_multipart("k", "u", [(1, "e", None)]),
    "abort_multipart": lambda c: c.abort_multipart("k", "u"),
    "list_parts": lambda c: c.list_parts("k", "u"),
    "copy": lambda c: c.copy("a", "b", 1),
    "copy_if_unchanged": lambda c: c.copy_if_unchanged("a", "b", '"e"', {}),
    "delete": lambda c: c.delete("k"),
    "check_access": lambda c: c.check_access("p/"),
}


@pytest.mark.parametrize("call", sorted(S3_CALLS))
def test_every_s3_request_under_a_file_lock_is_caught(checked, client, call):
    file = locks.new_lock("file")
    with file:
        with pytest.raises(locks.LockOrderError, match="S3 .* while holding file"):
            S3_CALLS[call](client)
    (found,) = locks.violations()
    assert found.held == ("file",) and found.taking is None


def test_each_page_of_a_listing_is_checked(checked):
    """list_all yields to its caller between pages: the request for the next page is checked too."""
    file = locks.new_lock("file")
    pages = _checked_pages(iter([{"n": 1}, {"n": 2}]), "S3 LIST")
    assert next(pages) == {"n": 1}
    with file:
        with pytest.raises(locks.LockOrderError, match="S3 LIST while holding file"):
            next(pages)


# -- what a violation leaves behind -----------------------------------------------------------

def test_lenient_mode_records_logs_and_goes_on(lenient, tmp_path, caplog):
    log_path = tmp_path / "violations.jsonl"
    locks.enable(log_path=str(log_path))
    try:
        mount, file = locks.new_rlock("mount"), locks.new_lock("file")
        with caplog.at_level(logging.ERROR, logger="s3ckptfs.locks"):
            for _ in range(3):   # one site, three times: recorded thrice, logged once
                with file:
                    with mount:  # taken anyway: a daemon logs and goes on
                        assert locks.held_locks() == ("file", "mount")
            with mount:
                locks.assert_no_locks_held("S3 HEAD")

            def fsync_under_file_lock() -> None:
                fd = os.open(tmp_path / "data", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    with file:
                        locks.fsync(fd)
                finally:
                    os.close(fd)

            run_in_thread(fsync_under_file_lock, name="worker-7")
    finally:
        locks.enable(log_path="")
    found = locks.violations()
    assert [v.taking for v in found] == ["mount", "mount", "mount", None, None]
    assert found[-1].thread == "worker-7" and found[-1].held == ("file",)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 3 and all("lock order violated" in r.getMessage() for r in errors)
    lines = log_path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["rule"] for line in lines)
    daemon_view = locks.read_log(log_path, offset=len(lines[0]) + 1)
    assert [entry["held"] for entry in daemon_view] == [["mount"], ["file"]]
    assert locks.read_log(tmp_path / "absent") == []


def test_checked_path_copes_with_many_threads(checked):
    """Not a timing test: many nested acquisitions in several threads leave nothing behind."""
    mount, uploader = locks.new_rlock("mount"), locks.new_lock("uploader")
    files = [locks.new_lock("file") for _ in range(8)]
    conds = [locks.new_condition(f) for f in files]
    meta = locks.new_lock("metadata")
    rounds = 20_000
    elapsed: list[float] = []
    per_thread = rounds // 3 * 4 + (rounds - rounds // 3) * 2   # acquisitions (rounds is not a multiple of 3)

    def work(index: int) -> None:
        started = time.perf_counter()
        for n in range(1, rounds + 1):
            cond = conds[(index + n) % len(conds)]
            if n % 3 == 0:
                with mount:
                    with uploader:
                        with cond:
                            cond.notify_all()
                            with meta:
                                pass
            else:
                with cond:
                    with meta:
                        pass
        assert locks.held_locks() == ()
        elapsed.append(time.perf_counter() - started)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(elapsed) == 4 and locks.violations() == []
    print(f"checked locks: {per_thread / max(elapsed):,.0f} acquisitions/s per thread, 4 threads")


# -- the table itself ----------------------------------------------------------------------------

def test_the_table_explains_itself():
    names = [kind.name for kind in locks.ORDER]
    assert len(set(names)) == len(names)
    inner = [kind.rank for kind in locks.ORDER if kind.rank != locks.LEAF]
    assert inner == sorted(set(inner)), "ranks of the inner locks, outermost first, each its own"
    for kind in locks.ORDER:
        assert kind.name in locks.__doc__, f"{kind.name} is not in the module docstring"
        assert kind.name in locks.describe()
        if kind.reentrant or kind.nests:
            assert kind.why, f"{kind.name}: re-entrant or nesting without a reason"
    assert set(locks.NO_SLOW_CALLS_UNDER) <= set(names)


# Every lock of the package comes from the table; none is made with threading directly.
NOT_YET_FROM_THE_TABLE: set[tuple[str, str, str]] = set()


def test_no_new_lock_outside_the_table():
    pattern = re.compile(r"^\s*([\w.]+)(?:\s*:[^=]+)?\s*=\s*threading\.(Lock|RLock|Condition|Semaphore|"
                         r"BoundedSemaphore)\(", re.M)
    found = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("locks.py", "lockreport.py"):  # the checker's own, never checked
            continue
        for target, kind in pattern.findall(path.read_text()):
            found.add((str(path.relative_to(PACKAGE)), target, kind))
    new = sorted(found - NOT_YET_FROM_THE_TABLE)
    assert not new, f"make these with s3ckptfs.locks: {new}"
