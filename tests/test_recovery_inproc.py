"""Crash and restart from the same cache dir, in process (see inproc.InProcessMount.crash).

A crash severs the instance's store client first, so nothing it still had in
flight reaches the store; the next instance recovers from whatever the cache
dir holds, exactly as the daemon does at start.
"""

from __future__ import annotations

import json
import os

import fakestore
from conftest import wait_for
from inproc import Vfs

KiB = 1 << 10
BIG = 18 * KiB + 123


def data_of(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


def outage(store) -> fakestore.Rule:
    """The store refuses every upload until the rule is removed."""
    return store.inject(fakestore.REFUSE, fakestore.UPLOAD_OPERATIONS, where=lambda op, key: not key.endswith("/"))


def test_closed_files_survive_a_crash_and_are_uploaded_after_restart(inproc, fake_store):
    mount = inproc()
    down = outage(fake_store)
    vfs = Vfs(mount.fs)
    vfs.mkdir("run")
    # Markers are not refused: the directory's is in S3 (and out of the journal) before the crash.
    wait_for(lambda: not any(f.is_dir_marker for f in mount.fs.staged_files()), timeout=5)
    files = {"run/a.pt": data_of(BIG), "run/b": b"small", "run/empty": b""}
    for name, body in files.items():
        vfs.write_file(name, body)
    mount.crash()
    down.remove()
    mount.start()
    assert mount.recovered == 3
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/run/": b"", **{"mnt/" + k: v for k, v in files.items()}}
    assert Vfs(mount.fs).read_bytes("run/a.pt") == data_of(BIG)
    assert not list(mount.cache_root.joinpath("journal").glob("*.json")), "records are removed once uploaded"


def test_recovery_commits_in_close_order(inproc, fake_store):
    mount = inproc()
    down = outage(fake_store)
    vfs = Vfs(mount.fs)
    names = ["shard-0", "shard-1", "big", "latest"]
    for index, name in enumerate(names):
        vfs.write_file(name, data_of(BIG if name == "big" else 100, index))
    mount.crash()
    down.remove()
    fake_store.calls.clear()
    mount.start()
    assert mount.fs.sync() == []
    visible = [key for op, key in fake_store.calls if op in ("put", "complete_multipart")]
    assert visible == ["mnt/" + name for name in names]


def test_a_crash_while_writing_leaves_nothing_behind(inproc, fake_store):
    mount = inproc()
    fs = mount.fs
    fh = Vfs(fs).open("partial", os.O_WRONLY | os.O_CREAT)
    for offset in range(0, BIG, 2 * KiB):  # the first parts upload while it is written
        fs.write(fh, data_of(BIG)[offset:offset + 2 * KiB], offset)
    wait_for(lambda: fake_store.uploads() != [], timeout=5)
    mount.crash()  # never closed: nobody was promised this data
    mount.start()
    assert mount.recovered == 0
    assert list(mount.cache_root.joinpath("staging").iterdir()) == []
    wait_for(lambda: fake_store.uploads() == [], timeout=5)  # its multipart upload is aborted
    assert fake_store.objects(mount.prefix) == {}
    assert not Vfs(mount.fs).exists("partial")


def test_parts_uploaded_before_a_crash_are_kept(inproc, fake_store):
    mount = inproc()
    never = fake_store.inject(fakestore.REFUSE, "complete_multipart")
    Vfs(mount.fs).write_file("big", data_of(BIG))
    wait_for(lambda: fake_store.count("complete_multipart") >= 1, timeout=5)  # every part is there
    mount.crash()
    never.remove()
    sent = fake_store.count("upload_part")
    mount.start()
    assert mount.fs.sync() == []
    assert fake_store.count("list_parts") == 1
    assert fake_store.count("upload_part") == sent, "no part sent twice"
    assert fake_store.objects(mount.prefix) == {"mnt/big": data_of(BIG)}


def test_a_changed_staging_file_is_not_trusted_to_match_its_parts(inproc, fake_store):
    mount = inproc()
    never = fake_store.inject(fakestore.REFUSE, "complete_multipart")
    Vfs(mount.fs).write_file("big", data_of(BIG))
    wait_for(lambda: fake_store.count("complete_multipart") >= 1, timeout=5)
    mount.crash()
    never.remove()
    staging = next(mount.cache_root.joinpath("staging").iterdir())
    with open(staging, "r+b") as stream:  # as if the disk had lost a write of part 2
        stream.seek(5 * KiB)
        stream.write(b"X" * 10)
    expected = bytearray(data_of(BIG))
    expected[5 * KiB:5 * KiB + 10] = b"X" * 10
    mount.start()
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/big": bytes(expected)}


def test_rename_and_unlink_of_pending_files_survive_a_crash(inproc, fake_store):
    mount = inproc()
    down = outage(fake_store)
    vfs = Vfs(mount.fs)
    vfs.write_file(".metadata.tmp", b"meta")
    vfs.rename(".metadata.tmp", ".metadata")
    vfs.write_file("scratch", b"gone")
    vfs.unlink("scratch")
    mount.crash()
    down.remove()
    mount.start()
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/.metadata": b"meta"}


def test_a_clean_stop_with_the_store_down_keeps_the_data_for_the_next_start(inproc, fake_store):
    mount = inproc()
    down = outage(fake_store)
    Vfs(mount.fs).write_file("f", data_of(BIG))
    assert mount.stop(drain_timeout=0.2) is False
    down.remove()
    mount.start()
    assert mount.recovered == 1
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/f": data_of(BIG)}


def test_a_crash_during_a_hanging_completion_recovers(inproc, fake_store):
    mount = inproc()
    fake_store.inject(fakestore.HANG, "complete_multipart")
    Vfs(mount.fs).write_file("big", data_of(BIG))
    assert fake_store.wait_hanging("complete_multipart", timeout=5)
    mount.crash()  # the hanging request fails with the dead client, it never completes
    fake_store.clear_faults()
    assert fake_store.objects(mount.prefix) == {}
    mount.start()
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/big": data_of(BIG)}


def test_background_local_sync_marks_records_synced(inproc, fake_store):
    mount = inproc(local_sync="background")
    down = outage(fake_store)
    Vfs(mount.fs).write_file("f", b"data")
    record = mount.cache_root / "journal"

    def synced() -> bool:
        found = [json.loads(p.read_text()) for p in record.glob("*.json")]
        return bool(found) and all(r["data_synced"] for r in found)

    wait_for(synced, timeout=5)
    mount.crash()
    down.remove()
    mount.start()
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/f": b"data"}


def test_a_record_not_synced_in_another_boot_is_reported_lost_not_uploaded(inproc, fake_store):
    mount = inproc(local_sync="background")
    fake_store.put_object("mnt/f", b"older version")
    down = outage(fake_store)
    Vfs(mount.fs).write_file("f", b"maybe torn")
    mount.crash()
    down.remove()
    for path in (mount.cache_root / "journal").glob("*.json"):  # as if the machine had restarted
        record = json.loads(path.read_text())
        record.update(data_synced=False, boot_id="another-boot")
        path.write_text(json.dumps(record))
    mount.start()
    assert mount.recovered == 0
    assert [lost.path for lost in mount.fs.lost_files()] == ["/f"]
    failures = mount.fs.sync()
    assert [path for path, _ in failures] == ["/f"]
    assert fake_store.objects(mount.prefix) == {"mnt/f": b"older version"}
    Vfs(mount.fs).write_file("f", b"written again")  # clears the loss
    assert mount.fs.sync() == []
    assert mount.fs.lost_files() == []
    assert fake_store.objects(mount.prefix) == {"mnt/f": b"written again"}


def test_a_kill_while_an_upload_record_is_written_never_leaves_a_torn_record(tmp_path, monkeypatch):
    """A daemon killed between creating an upload's record and writing it left an empty record at
    its name: the restart could not read it and the multipart upload stayed behind (CI found it,
    test_recovery.py::test_killed_while_writing_leaves_nothing_behind). A record is now visible
    only once whole."""
    from s3ckptfs import cache
    from s3ckptfs.cache import UploadRegistry

    class Killed(BaseException):
        pass

    def killed_before_the_bytes(fd, data):
        raise Killed

    registry = UploadRegistry(tmp_path)
    registry.add("pfx/a.pt", "upload-1")
    monkeypatch.setattr(cache.os, "write", killed_before_the_bytes)
    try:
        registry.add("pfx/b.pt", "upload-2")
    except Killed:
        pass
    monkeypatch.undo()
    assert registry.load_all() == [("pfx/a.pt", "upload-1")]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [registry._path("upload-1").name]
