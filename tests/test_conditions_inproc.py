"""Conditional commits, in process: a node that comes back late never overwrites a newer object.

Two ``InProcessMount``s of one prefix over one ``FakeStore`` stand for two nodes, each
with its own cache dir. A node "dies" with a journaled upload (``crash`` during an
outage), another writes the same keys, the first restarts on its old cache dir.
"""

from __future__ import annotations

import os

import fakestore
from inproc import Vfs
from s3ckptfs import conditions
from s3ckptfs.daemon import _status
from s3ckptfs.errors import S3Error

KiB = 1 << 10
BIG = 18 * KiB + 123   # several parts with the in-process part size: a multipart upload


def outage(store) -> fakestore.Rule:
    """The store refuses every upload (as a server away would) until the rule is removed."""
    return store.inject(fakestore.REFUSE, fakestore.UPLOAD_OPERATIONS, where=lambda op, key: not key.endswith("/"))


def data_of(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


def node_dies_with(mount, fake_store, files: dict[str, bytes]) -> None:
    """``files`` are closed (journaled) on ``mount`` while S3 refuses uploads; then the node dies."""
    down = outage(fake_store)
    vfs = Vfs(mount.fs)
    for name, body in files.items():
        vfs.write_file(name, body)
    mount.crash()
    down.remove()


def test_a_node_back_late_leaves_the_newer_objects_and_reports_conflicts(inproc, fake_store):
    node_a, node_b = inproc(), inproc()
    Vfs(node_a.fs).write_file("latest", b"step_50")
    assert node_a.fs.sync() == []
    node_dies_with(node_a, fake_store, {"latest": b"step_100", "model.pt": b"A's model",
                                        "big.pt": data_of(BIG, 1)})
    vfs_b = Vfs(node_b.fs)
    for name, body in {"latest": b"step_200", "model.pt": b"B's model", "big.pt": data_of(BIG, 2)}.items():
        vfs_b.write_file(name, body)
    assert node_b.fs.sync() == []

    node_a.start()   # back late, on its old cache dir
    assert node_a.recovered == 3
    failures = dict(node_a.fs.sync())
    assert sorted(failures) == ["/big.pt", "/latest", "/model.pt"]
    assert all(error.startswith("conflict:") for error in failures.values()), failures
    assert fake_store.objects(node_a.prefix) == {
        "mnt/latest": b"step_200", "mnt/model.pt": b"B's model", "mnt/big.pt": data_of(BIG, 2)}
    states = {row["path"]: row["state"] for row in _status(node_a.fs)["pending"]}
    assert states == {"/latest": "conflict", "/model.pt": "conflict", "/big.pt": "conflict"}
    # The mount shows the newer objects, as every node does (a job resumed here reads B's latest);
    # A's bytes are set aside in the cache dir, named by the report; the refused upload is gone.
    assert Vfs(node_a.fs).read_bytes("latest") == b"step_200"
    assert Vfs(node_a.fs).read_bytes("big.pt") == data_of(BIG, 2)
    assert kept_bytes(failures["/big.pt"]) == data_of(BIG, 1)
    assert kept_bytes(failures["/latest"]) == b"step_100"
    assert fake_store.uploads(node_a.prefix) == []


def kept_bytes(report: str) -> bytes:
    """The bytes a conflict report says it kept: ``... (<staging file>); the mount shows ...``."""
    start = report.index("(/") + 1
    with open(report[start:report.index(")", start)], "rb") as kept:
        return kept.read()


def test_a_conflict_set_aside_is_reported_after_a_restart_and_cleared_by_a_new_write(inproc, fake_store):
    node_a, node_b = inproc(), inproc()
    node_dies_with(node_a, fake_store, {"latest": b"step_100", "big.pt": data_of(BIG, 1)})
    Vfs(node_b.fs).write_file("latest", b"step_200")
    Vfs(node_b.fs).write_file("big.pt", data_of(BIG, 2))
    assert node_b.fs.sync() == []
    node_a.start()
    assert sorted(dict(node_a.fs.sync())) == ["/big.pt", "/latest"]
    node_a.crash()
    node_a.start()                                   # reported again, not sent again
    puts = fake_store.count("put") + fake_store.count("upload_part")
    failures = dict(node_a.fs.sync())
    assert sorted(failures) == ["/big.pt", "/latest"]
    assert kept_bytes(failures["/big.pt"]) == data_of(BIG, 1)
    assert fake_store.count("put") + fake_store.count("upload_part") == puts
    vfs = Vfs(node_a.fs)
    assert vfs.read_bytes("latest") == b"step_200"
    vfs.write_file("latest", b"step_300")            # the job on this node saves again
    failures = dict(node_a.fs.sync())
    assert sorted(failures) == ["/big.pt"]
    assert fake_store.objects(node_a.prefix)["mnt/latest"] == b"step_300"


def test_a_conflict_is_never_retried(inproc, fake_store):
    node_a, node_b = inproc(), inproc()
    node_dies_with(node_a, fake_store, {"latest": b"old"})
    Vfs(node_b.fs).write_file("latest", b"new")
    assert node_b.fs.sync() == []
    node_a.start()
    assert [path for path, _ in node_a.fs.sync()] == ["/latest"]
    puts = fake_store.count("put", "mnt/latest")
    assert [path for path, _ in node_a.fs.sync()] == ["/latest"]   # reported again, not sent again
    assert fake_store.count("put", "mnt/latest") == puts
    assert Vfs(node_a.fs).read_bytes("latest") == b"new"
    Vfs(node_a.fs).write_file("latest", b"newer")   # written again here: this node's old version is dropped
    assert node_a.fs.sync() == []
    assert fake_store.objects(node_a.prefix) == {"mnt/latest": b"newer"}


def test_a_node_back_late_commits_what_nobody_changed(inproc, fake_store):
    node_a = inproc()
    Vfs(node_a.fs).write_file("latest", b"step_50")
    assert node_a.fs.sync() == []
    node_dies_with(node_a, fake_store, {"latest": b"step_100", "new.pt": b"x", "big.pt": data_of(BIG)})
    node_a.start()
    assert node_a.fs.sync() == []
    assert fake_store.objects(node_a.prefix) == {"mnt/latest": b"step_100", "mnt/new.pt": b"x",
                                                 "mnt/big.pt": data_of(BIG)}
    assert fake_store.uploads(node_a.prefix) == []


def node_dies_replacing(mount, fake_store, files: dict[str, bytes]) -> None:
    """Each of ``files`` is written as ``<name>.tmp`` and renamed onto ``name`` (the atomic-replace
    pattern of ``latest`` pointers and DCP's ``.metadata``) while S3 refuses uploads; the node dies."""
    down = outage(fake_store)
    vfs = Vfs(mount.fs)
    for name, body in files.items():
        vfs.write_file(name + ".tmp", body)
        vfs.rename(name + ".tmp", name)
    mount.crash()
    down.remove()


def test_a_node_back_late_does_not_replace_a_newer_object_through_a_rename(inproc, fake_store):
    node_a, node_b = inproc(), inproc()
    Vfs(node_a.fs).write_file("latest", b"step_50")
    assert node_a.fs.sync() == []
    node_dies_replacing(node_a, fake_store, {"latest": b"step_100", "fresh": b"A's", "big.pt": data_of(BIG, 1)})
    vfs_b = Vfs(node_b.fs)
    for name, body in {"latest": b"step_200", "fresh": b"B's", "big.pt": data_of(BIG, 2)}.items():
        vfs_b.write_file(name, body)
    assert node_b.fs.sync() == []

    node_a.start()
    failures = dict(node_a.fs.sync())
    assert sorted(failures) == ["/big.pt", "/fresh", "/latest"], failures
    assert all(error.startswith("conflict:") for error in failures.values()), failures
    assert fake_store.objects(node_a.prefix) == {"mnt/latest": b"step_200", "mnt/fresh": b"B's",
                                                 "mnt/big.pt": data_of(BIG, 2)}


def test_a_node_back_late_replaces_through_a_rename_what_nobody_changed(inproc, fake_store):
    node_a = inproc()
    Vfs(node_a.fs).write_file("latest", b"step_50")
    assert node_a.fs.sync() == []
    node_dies_replacing(node_a, fake_store, {"latest": b"step_100", "fresh": b"x", "big.pt": data_of(BIG)})
    node_a.start()
    assert node_a.fs.sync() == []
    assert fake_store.objects(node_a.prefix) == {"mnt/latest": b"step_100", "mnt/fresh": b"x",
                                                 "mnt/big.pt": data_of(BIG)}


def node_dies_moving_and_deleting(mount, fake_store) -> None:
    """``latest``, ``old.pt`` and ``latest.tmp`` are in S3; then, while S3 refuses copies and
    deletes, ``latest.tmp`` is renamed onto ``latest`` (a move) and ``old.pt`` deleted; the node dies."""
    vfs = Vfs(mount.fs)
    vfs.write_file("latest", b"step_50")
    vfs.write_file("old.pt", b"A's old")
    vfs.write_file("latest.tmp", b"step_100")
    assert mount.fs.sync() == []
    down = fake_store.inject(fakestore.REFUSE, ("copy", "delete"))
    vfs.rename("latest.tmp", "latest")
    vfs.unlink("old.pt")
    mount.crash()
    down.remove()


def test_a_node_back_late_neither_moves_nor_deletes_over_a_newer_object(inproc, fake_store):
    """Namespace changes journaled while S3 was away run with conditions when resumed: a move onto
    ``latest`` (its source committed before) and a delete of ``old.pt``; another node rewrote both
    keys meanwhile: both are conflicts, the newer objects stay, and nothing is retried."""
    node_a, node_b = inproc(), inproc()
    node_dies_moving_and_deleting(node_a, fake_store)
    vfs_b = Vfs(node_b.fs)
    vfs_b.write_file("latest", b"step_200")
    vfs_b.write_file("old.pt", b"B's new")
    assert node_b.fs.sync() == []

    node_a.start()
    failures = dict(node_a.fs.sync())
    assert sorted(failures) == ["/latest", "/old.pt"], failures
    assert all(error.startswith("conflict:") for error in failures.values()), failures
    assert fake_store.objects(node_a.prefix) == {"mnt/latest": b"step_200", "mnt/old.pt": b"B's new",
                                                 "mnt/latest.tmp": b"step_100"}
    states = {row["path"]: row["state"] for row in _status(node_a.fs)["pending"]}
    assert states == {"/latest": "conflict", "/old.pt": "conflict"}, states
    copies = fake_store.count("copy", "mnt/latest")
    assert sorted(dict(node_a.fs.sync())) == ["/latest", "/old.pt"]   # reported again, not tried again
    assert fake_store.count("copy", "mnt/latest") == copies


def test_a_node_back_late_makes_the_moves_and_deletes_nobody_overtook(inproc, fake_store):
    node_a = inproc()
    node_dies_moving_and_deleting(node_a, fake_store)
    node_a.start()
    assert node_a.fs.sync() == []
    assert fake_store.objects(node_a.prefix) == {"mnt/latest": b"step_100"}


def test_conditional_commits_off_is_the_old_behaviour(inproc, fake_store):
    node_a, node_b = inproc(conditional_commits="off"), inproc()
    node_dies_with(node_a, fake_store, {"latest": b"step_100"})
    Vfs(node_b.fs).write_file("latest", b"step_200")
    assert node_b.fs.sync() == []
    node_a.start()
    assert node_a.fs.sync() == []
    assert fake_store.objects(node_a.prefix) == {"mnt/latest": b"step_100"}


def test_live_commits_are_unconditional_by_default_and_conditional_with_all(inproc, fake_store):
    node_a, node_b = inproc(), inproc(conditional_commits="all")
    vfs_a, vfs_b = Vfs(node_a.fs), Vfs(node_b.fs)
    assert not vfs_b.exists("latest")           # B sees no object there
    vfs_a.write_file("latest", b"from A")
    assert node_a.fs.sync() == []
    fh = node_b.fs.create("/latest", 0o644, os.O_WRONLY)  # created where B believed nothing was
    node_b.fs.write(fh, b"from B", 0)
    node_b.fs.flush(fh)
    node_b.fs.release(fh)
    failures = node_b.fs.sync()
    assert [path for path, _ in failures] == ["/latest"] and "conflict" in failures[0][1]
    assert fake_store.objects(node_a.prefix) == {"mnt/latest": b"from A"}
    # A's own overwrite (default mode) is unconditional, as before.
    vfs_a.write_file("latest", b"from A again")
    assert node_a.fs.sync() == []


def test_a_node_rewriting_its_own_object_is_not_a_conflict(inproc, fake_store):
    node = inproc(conditional_commits="all")
    vfs = Vfs(node.fs)
    for step in range(3):
        vfs.write_file("latest", f"step_{step}".encode())
        vfs.write_file("big.pt", data_of(BIG, step))
        assert node.fs.sync() == []
    assert fake_store.objects(node.prefix)["mnt/latest"] == b"step_2"


def test_a_record_of_an_older_version_commits_unconditionally(inproc, fake_store):
    node_a, node_b = inproc(), inproc()
    node_dies_with(node_a, fake_store, {"latest": b"old"})
    import json
    for record_path in (node_a.cache_root / "journal").glob("*.json"):
        record = json.loads(record_path.read_text())
        record.pop("expected_key", None)
        record.pop("expected_etag", None)
        record_path.write_text(json.dumps(record))
    Vfs(node_b.fs).write_file("latest", b"new")
    assert node_b.fs.sync() == []
    node_a.start()
    assert node_a.fs.sync() == []
    assert fake_store.objects(node_a.prefix) == {"mnt/latest": b"old"}


class _Ignoring:
    """A store that accepts the condition and ignores it, as a server without conditional writes."""

    def __init__(self, store) -> None:
        self.store = store

    def put(self, key, body, metadata=None, checksum=None, expect=None):
        return self.store.put(key, body, metadata, checksum)

    def delete(self, key, expect=None):
        self.store.delete(key)


class _Rejecting(_Ignoring):
    def put(self, key, body, metadata=None, checksum=None, expect=None):
        if expect is not None:
            raise S3Error("NotImplemented", "conditional writes", 501)
        return super().put(key, body, metadata, checksum)


def test_the_probe_tells_a_server_that_enforces_conditions_from_one_that_does_not(fake_store):
    assert conditions.probe(fake_store, "p/") is None
    assert "accepted" in conditions.probe(_Ignoring(fake_store), "p/")
    assert "NotImplemented" in conditions.probe(_Rejecting(fake_store), "p/")
    assert fake_store.objects("p/") == {}, "the probe object is deleted"
