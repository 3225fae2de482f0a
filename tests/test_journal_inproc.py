"""The journal's records are rewritten by more than one thread: writers of one record take turns.

A namespace change is journaled by the call that made it (``PendingOps.submit``)
while the uploader may rewrite the same record (a move's copy landed: a delete of
its destination now expects the copy, ``PendingOps._expect_copy_locked``). Both
wrote through one temp name: the second rename of it failed with ENOENT, which
reached the caller (the mount model: ``rename a d=1; unlink d=1`` -> unlink ENOENT
while a local directory succeeds).
"""

from __future__ import annotations

import json
import threading
import time

from s3ckptfs import locks
from s3ckptfs.journal import Journal
from inproc import Vfs


def slow_fsync(monkeypatch, seconds: float) -> None:
    """Every fsync takes ``seconds`` more: a record's temp file stays open long enough to be raced."""
    real = locks.fsync

    def fsync(fd: int) -> None:
        time.sleep(seconds)
        real(fd)

    monkeypatch.setattr(locks, "fsync", fsync)


def test_two_writers_of_one_record_both_succeed_and_the_newest_is_kept(tmp_path, monkeypatch):
    journal = Journal(tmp_path)
    slow_fsync(monkeypatch, 0.05)
    version = {"n": 0}
    errors: list[BaseException] = []

    def newer() -> dict:
        version["n"] += 1
        return {"version": version["n"]}

    def writer() -> None:
        try:
            journal.write("op-1", newer)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads((tmp_path / "op-1.json").read_text()) == {"version": 4}
    assert [p.name for p in tmp_path.iterdir()] == ["op-1.json"]


def test_an_unlink_of_a_name_a_move_is_copying_onto_succeeds(inproc, monkeypatch):
    # rename a -> d=1 (a move of a's object, conditional on what d=1 held), unlink d=1 at once:
    # the unlink's delete is journaled while the move's copy lands and journals it again.
    slow_fsync(monkeypatch, 0.002)
    for round_ in range(40):
        mount = inproc(dedup="on", upload_concurrency=4)
        vfs = Vfs(mount.fs)
        data = bytes((i * 7 + round_) % 251 for i in range(4096))
        vfs.write_file("a", data)
        vfs.write_file("d=1", data)
        time.sleep(0.001 * (round_ % 8))
        vfs.rename("a", "d=1")
        vfs.unlink("d=1")
        assert mount.fs.sync() == []
        assert vfs.listdir() == []
        mount.close()
