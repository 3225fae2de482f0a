"""Renames while uploads and namespace changes are still on their way to S3: nothing is lost.

Regression tests for the causes found by random sequences of ordinary file
operations (rename onto existing names while uploads run, then write, append or
truncate); docs/design.md, "Renames while changes are in flight", names the
invariant each one broke. Each test makes the interleaving deterministic by
holding the ordered commit queue behind a hanging upload (``blocked_queue``) or by
making one request slow.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time

import pytest

import fakestore
from conftest import wait_for
from inproc import Vfs

KiB = 1 << 10


def data_of(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(size))


@contextlib.contextmanager
def blocked_queue(store, vfs: Vfs):
    """The ordered commit queue held behind a file whose PUT hangs, until the block ends."""
    rule = store.inject(fakestore.HANG, "put", key="mnt/blocker")
    vfs.write_file("blocker", b"x")
    assert store.wait_hanging("put", "mnt/blocker")
    try:
        yield
    finally:
        rule.remove()
        store.release()


def test_a_file_renamed_onto_a_name_whose_object_moves_away_commits_after_that_move(inproc, fake_store):
    # write f5 (its commit queued); rename f2 -> f3 (a move of f2's object, queued behind it);
    # rename f5 -> f2. f5's commit now writes f2's key: it must come after the move, or the
    # move copies f5's bytes to f3 and deletes them from f2.
    mount = inproc()
    vfs = Vfs(mount.fs)
    vfs.write_file("f2.pt", b"old f2")
    assert mount.fs.sync() == []
    with blocked_queue(fake_store, vfs):
        vfs.write_file("f5.pt", b"new f5")
        vfs.rename("f2.pt", "f3.pt")
        vfs.rename("f5.pt", "f2.pt")
        assert vfs.read_bytes("f2.pt") == b"new f5"
        assert vfs.read_bytes("f3.pt") == b"old f2"
    assert mount.fs.sync() == []
    assert vfs.read_bytes("f2.pt") == b"new f5" and vfs.read_bytes("f3.pt") == b"old f2"
    assert fake_store.objects("mnt/f") == {"mnt/f2.pt": b"new f5", "mnt/f3.pt": b"old f2"}


def test_a_commit_running_when_its_file_is_renamed_away_and_back_waits_for_the_changes_between(
        inproc, fake_store):
    # x's commit is running (its PUT waits); rename x -> f1 queues a delete of x's key;
    # rename f1 -> x. The running commit was requested before both renames: it must not
    # write x's key ahead of that delete, which would then remove the file from S3.
    mount = inproc()
    vfs = Vfs(mount.fs)
    rule = fake_store.inject(fakestore.HANG, "put", key="mnt/x.bin")
    vfs.write_file("x.bin", b"x content")
    assert fake_store.wait_hanging("put", "mnt/x.bin")
    vfs.rename("x.bin", "f1.pt")
    vfs.rename("f1.pt", "x.bin")
    rule.remove()
    fake_store.release()
    assert mount.fs.sync() == []
    assert vfs.read_bytes("x.bin") == b"x content"
    assert fake_store.objects(mount.prefix) == {"mnt/x.bin": b"x content"}


def test_a_renamed_file_keeps_its_place_after_the_changes_before_its_rename_across_a_crash(inproc, fake_store):
    # As the first test, with a crash before anything reached S3: recovery commits the
    # journal in close order, and the rename gave the file a new place in it.
    mount = inproc()
    vfs = Vfs(mount.fs)
    vfs.write_file("f2.pt", b"old f2")
    assert mount.fs.sync() == []
    with blocked_queue(fake_store, vfs):
        vfs.write_file("f5.pt", b"new f5")
        vfs.rename("f2.pt", "f3.pt")
        vfs.rename("f5.pt", "f2.pt")
        mount.crash()
    mount.start()
    assert mount.fs.sync() == []
    assert fake_store.objects("mnt/f") == {"mnt/f2.pt": b"new f5", "mnt/f3.pt": b"old f2"}


def test_a_clean_file_renamed_onto_an_object_shows_its_own_bytes_until_the_move_has_run(inproc, fake_store):
    # y is in S3 (1 byte). f3 is committed but still open (clean, staged); rename f3 -> y
    # queues a server-side move. Once f3 is closed it is retired from the path table before
    # the move has run: y must still show f3's bytes, not the 1-byte object S3 holds (asked
    # again once the metadata cache no longer answers: here at once).
    mount = inproc(metadata_ttl=0, negative_ttl=0)
    vfs = Vfs(mount.fs)
    fs = mount.fs
    vfs.write_file("y.bin", b"1")
    body = data_of(7593)
    fh = vfs.open("f3.pt", os.O_WRONLY | os.O_CREAT)
    fs.write(fh, body, 0)
    fs.fsync(fh)  # committed: the file is clean, and stays staged while open
    with blocked_queue(fake_store, vfs):
        vfs.rename("f3.pt", "y.bin")
        vfs.close(fh)  # retired now, its move still queued
        wait_for(lambda: fs.staged_files() == [] or all(f.path != "/y.bin" for f in fs.staged_files()), 5)
        assert vfs.stat("y.bin").st_size == len(body)
        assert vfs.read_bytes("y.bin") == body
    assert fs.sync() == []
    assert vfs.read_bytes("y.bin") == body
    assert fake_store.objects(mount.prefix) == {"mnt/blocker": b"x", "mnt/y.bin": body}


def test_truncate_of_a_file_whose_move_lands_while_it_is_read_follows_it(inproc, fake_store):
    # rename a -> b queues a move of a's object; truncate b looks b up (the object, still
    # under a's key) and reads it; the move deletes a's key meanwhile. The read must follow
    # the object to b's key, not fail with ENOENT.
    mount = inproc()
    vfs = Vfs(mount.fs)
    body = data_of(10_000)
    fake_store.put_object("mnt/a.pt", body)  # written by another node: not in this one's cache
    fake_store.inject(fakestore.latency(0.05), "copy", key="mnt/a.pt")
    fake_store.inject(fakestore.latency(0.5), "get_range_into", key="mnt/a.pt")
    vfs.rename("a.pt", "b.pt")
    vfs.truncate("b.pt", 4)
    assert vfs.read_bytes("b.pt") == body[:4]
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/b.pt": body[:4]}


def test_a_file_moved_twice_is_read_in_its_version_not_as_the_newer_file_under_its_old_name(inproc, fake_store):
    # rename a -> b, made in S3; rename b -> c (queued), then a new b is written (queued after).
    # truncate c looks c up (the object, still under b's key) and reads it slowly: meanwhile the
    # move lands and the new b commits under b's key. The read must name the version it reads
    # (the copy's ETag, kept when the first move was made), not take the new b's bytes.
    mount = inproc()
    vfs = Vfs(mount.fs)
    body = data_of(10_000)
    fake_store.put_object("mnt/a.pt", body)  # written by another node: not in this one's cache
    vfs.rename("a.pt", "b.pt")
    assert mount.fs.sync() == []
    fake_store.inject(fakestore.latency(0.05), "copy", key="mnt/c.pt")
    fake_store.inject(fakestore.latency(0.5), "get_range_into", key="mnt/b.pt")
    vfs.rename("b.pt", "c.pt")
    vfs.write_file("b.pt", b"new b")
    vfs.truncate("c.pt", 4)
    assert vfs.read_bytes("c.pt") == body[:4]
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/b.pt": b"new b", "mnt/c.pt": body[:4]}


def test_open_for_append_of_a_file_whose_move_lands_while_it_is_read_follows_it(inproc, fake_store):
    mount = inproc()
    vfs = Vfs(mount.fs)
    body = data_of(10_000)
    fake_store.put_object("mnt/a.pt", body)  # written by another node: not in this one's cache
    fake_store.inject(fakestore.latency(0.05), "copy", key="mnt/a.pt")
    fake_store.inject(fakestore.latency(0.5), "get_range_into", key="mnt/a.pt")
    vfs.rename("a.pt", "b.pt")
    vfs.append("b.pt", b"tail")
    assert vfs.read_bytes("b.pt") == body + b"tail"
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/b.pt": body + b"tail"}


def test_readlink_of_a_renamed_symlink_follows_its_move(inproc, fake_store):
    # A trainer's `last` pointer: symlink, sync, rename. readlink looks the new name up (the
    # link, still under its old key) and reads it; the move deletes the old key meanwhile.
    mount = inproc()
    vfs = Vfs(mount.fs)
    vfs.write_file("b.bin", b"checkpoint")
    vfs.symlink("b.bin", "last")
    assert mount.fs.sync() == []
    fake_store.inject(fakestore.latency(0.05), "copy", key="mnt/last")
    fake_store.inject(fakestore.latency(0.5), "get_bytes", key="mnt/last")
    vfs.rename("last", "a.pt")
    assert mount.fs.readlink("/a.pt") == "b.bin"
    assert mount.fs.sync() == []
    assert mount.fs.readlink("/a.pt") == "b.bin"


def test_a_symlink_in_a_renamed_directory_stays_a_symlink(inproc, fake_store):
    # The directory's listing does not tell a symlink from a small file: the renamed
    # directory must still show it as a link until its move has run, and after.
    mount = inproc(metadata_ttl=0, negative_ttl=0)
    vfs = Vfs(mount.fs)
    vfs.mkdir("d")
    vfs.write_file("d/x.pt", b"data")
    vfs.symlink("x.pt", "d/last")
    assert mount.fs.sync() == []
    with blocked_queue(fake_store, vfs):
        vfs.rename("d", "e")
        assert stat.S_ISLNK(vfs.stat("e/last").st_mode)
        assert mount.fs.readlink("/e/last") == "x.pt"
    assert mount.fs.sync() == []
    assert stat.S_ISLNK(vfs.stat("e/last").st_mode)
    assert mount.fs.readlink("/e/last") == "x.pt"


def test_a_directory_renamed_twice_before_its_first_move_ran_is_listed_once(inproc, fake_store):
    # mkdir a; write a/y, a/z; sync; rename a b; rename b c: the listing shows c only (b's
    # files, shown there until the first moves ran, went with the second rename).
    mount = inproc()
    vfs = Vfs(mount.fs)
    vfs.mkdir("a")
    vfs.write_file("a/y", data_of(9000))
    vfs.write_file("a/z", data_of(9000, 1))
    assert mount.fs.sync() == []
    with blocked_queue(fake_store, vfs):
        vfs.rename("a", "b")
        vfs.rename("b", "c")
        assert sorted(vfs.listdir("")) == ["blocker", "c"]
        assert not vfs.exists("b") and sorted(vfs.listdir("c")) == ["y", "z"]
    assert mount.fs.sync() == []
    assert sorted(vfs.listdir("")) == ["blocker", "c"]
    assert fake_store.objects(mount.prefix) == {"mnt/blocker": b"x", "mnt/c/": b"", "mnt/c/y": data_of(9000),
                                                "mnt/c/z": data_of(9000, 1)}


def test_sync_while_a_directory_is_renamed_waits_for_its_moves(inproc, fake_store, monkeypatch):
    # The rename shows its moves at once and journals them one by one; a sync that comes in
    # between must wait for each, not report one as "not yet made in S3".
    mount = inproc()
    vfs = Vfs(mount.fs)
    vfs.mkdir("tmp-k")
    vfs.write_file("tmp-k/model.pt", data_of(17_000))
    vfs.write_file("tmp-k/meta.json", b"{}")
    assert mount.fs.sync() == []
    journal = mount.fs.core.journal
    write = journal.write
    shown = threading.Event()

    def slow_write(name, record):
        if "op" in (record() if callable(record) else record):
            shown.set()
            time.sleep(0.05)
        write(name, record)

    monkeypatch.setattr(journal, "write", slow_write)
    renamer = threading.Thread(target=vfs.rename, args=("tmp-k", "checkpoint-k"))
    renamer.start()
    assert shown.wait(5)
    assert mount.fs.sync(timeout=30) == []
    renamer.join()
    assert mount.fs.sync() == []
    assert sorted(fake_store.objects(mount.prefix)) == ["mnt/checkpoint-k/", "mnt/checkpoint-k/meta.json",
                                                        "mnt/checkpoint-k/model.pt"]


def test_readlink_of_a_file_being_written_is_einval(inproc):
    mount = inproc()
    vfs = Vfs(mount.fs)
    fh = vfs.open("f", os.O_WRONLY | os.O_CREAT)
    mount.fs.write(fh, b"not a link", 0)
    try:
        with pytest.raises(OSError) as raised:
            mount.fs.readlink("/f")
        assert raised.value.errno == errno.EINVAL
    finally:
        vfs.close(fh)


def test_a_file_renamed_between_its_commit_and_its_retirement_is_rewritten_after_its_move(
        inproc, fake_store, monkeypatch):
    # f1's commit has written it (clean) but not yet retired it when f1 is renamed onto x:
    # its bytes move in S3 (a queued copy). Opened with O_TRUNC and closed right after, x's
    # new (empty) version must be committed after that move, never before it.
    mount = inproc()
    vfs = Vfs(mount.fs)
    lifecycle = mount.fs.lifecycle
    committed = lifecycle.committed
    entered, go_on = threading.Event(), threading.Event()

    def slow_committed(file, key, etag, version):
        if key == "mnt/f1":
            entered.set()
            go_on.wait(10)
        committed(file, key, etag, version)

    monkeypatch.setattr(lifecycle, "committed", slow_committed)
    mount.fs.uploader._listener = lifecycle
    vfs.write_file("f1", b"f1 content")
    assert entered.wait(5)
    vfs.rename("f1", "x")
    fh = vfs.open("x", os.O_RDWR | os.O_TRUNC)
    go_on.set()
    vfs.close(fh)
    assert mount.fs.sync() == []
    assert vfs.read_bytes("x") == b""
    assert fake_store.objects(mount.prefix) == {"mnt/x": b""}


def test_a_file_moved_away_and_back_is_read_wherever_its_bytes_are(inproc, fake_store, monkeypatch):
    # rename f1 f0; rename f0 f1: two queued moves. Between the first's delete of f1 and the
    # second's copy back, the bytes are under f0 only: a read of f1 then must find them there,
    # not wait for the second move (which may wait behind a slow upload).
    from s3ckptfs.fs import reads
    monkeypatch.setattr(reads, "FOLLOW_WAIT", 0.3)
    mount = inproc()
    vfs = Vfs(mount.fs)
    body = data_of(10_000)
    fake_store.put_object("mnt/f1", body)  # another node's: not in this one's cache
    fake_store.inject(fakestore.latency(1.0), "copy", key="mnt/f1")  # the second move's copy (by destination)
    fake_store.inject(fakestore.latency(0.2), "get_range_into", key="mnt/f1")
    vfs.rename("f1", "f0")
    vfs.rename("f0", "f1")
    vfs.truncate("f1", 5)
    assert vfs.read_bytes("f1") == body[:5]
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/f1": body[:5]}
@contextlib.contextmanager
def move_ending(mount):
    """Holds the end of the next namespace change made in S3 (the mount not yet told) until the block ends."""
    made, go_on = threading.Event(), threading.Event()
    op_done = mount.fs.pending.op_done

    def held(op, error):
        made.set()
        go_on.wait(10)
        op_done(op, error)

    mount.fs.pending.op_done = held
    try:
        yield made
    finally:
        go_on.set()
        del mount.fs.pending.op_done


def test_a_name_replaced_by_a_rename_reads_while_the_move_ends(inproc, fake_store):
    # os.replace(latest.tmp, latest) of an object already in S3 is a copy, then a delete of the
    # old key. A reader of latest right after must be sent to the new key once the old one may
    # be gone, also before the mount has heard that the move is done: it was ENOENT; then, when
    # shown from the new key without its ETag, an older copy cached here under no ETag.
    mount = inproc(metadata_ttl=0, negative_ttl=0)  # latest.tmp comes from another node: seen at once
    vfs = Vfs(mount.fs)
    fake_store.put_object("mnt/latest", b"step 1")
    assert vfs.read_bytes("latest") == b"step 1"
    readers = []  # each still open when the next move ends, as a release the kernel sends late
    for step in (b"step 2", b"step 3"):
        fake_store.put_object("mnt/latest.tmp", step)  # written by another node: not cached here
        with move_ending(mount) as made:
            vfs.rename("latest.tmp", "latest")
            assert made.wait(10)
            assert fake_store.objects("mnt/") == {"mnt/latest": step}  # copied, the old key deleted
            readers.append(mount.fs.open("/latest", os.O_RDONLY))
            assert mount.fs.read(readers[-1], 100, 0) == step
        assert mount.fs.sync() == []
        assert vfs.read_bytes("latest") == step
    for fh in readers:
        mount.fs.release(fh)


def test_a_name_moved_onto_twice_reads_the_newest_while_the_first_is_still_open(inproc, fake_store):
    # rename f1 f0, then f0 open for reading (its bytes cached here, the copy's ETag unknown);
    # rename f3 f0: a new open of f0 must read f3's bytes, not the copy the first reader holds.
    mount = inproc()
    vfs = Vfs(mount.fs)
    vfs.write_file("f1", b"1")
    assert mount.fs.sync() == []
    vfs.rename("f1", "f0")
    assert mount.fs.sync() == []
    reader = mount.fs.open("/f0", os.O_RDONLY)
    try:
        assert mount.fs.read(reader, 100, 0) == b"1"
        body = data_of(10_198)
        vfs.write_file("f3", body)
        assert mount.fs.sync() == []
        vfs.rename("f3", "f0")
        assert mount.fs.sync() == []
        assert vfs.read_bytes("f0") == body
    finally:
        mount.fs.release(reader)


def test_a_file_renamed_while_its_commit_finishes_is_written_after_its_move(inproc, fake_store):
    # y's PUT has landed (the file is clean) but its commit has not finished when y is renamed
    # to f4: the object is moved in S3 (y -> f4), and the file's next commit, asked for by
    # an O_TRUNC rewrite of f4 right after, must run behind that move. Run ahead of it, the
    # move copies y's old bytes over the new f4 afterwards.
    mount = inproc()
    vfs = Vfs(mount.fs)
    lifecycle = mount.fs.lifecycle
    committed = lifecycle.committed
    inside, go_on = threading.Event(), threading.Event()

    def slow_committed(file, *args):
        if file.path == "/y.bin" and not inside.is_set():
            inside.set()
            assert go_on.wait(10)
        committed(file, *args)

    lifecycle.committed = slow_committed
    old, new = data_of(9000, 1), data_of(7000, 2)
    vfs.write_file("y.bin", old)
    assert inside.wait(10)
    vfs.rename("y.bin", "f4.pt")
    vfs.write_file("f4.pt", new)
    go_on.set()
    assert mount.fs.sync() == []
    assert vfs.read_bytes("f4.pt") == new
    assert fake_store.objects(mount.prefix) == {"mnt/f4.pt": new}


def test_a_directory_renamed_as_its_marker_put_starts_leaves_no_marker_under_the_old_name(inproc, fake_store):
    # mkdir tmp; rename tmp -> ckpt. The rename finds tmp made here with its marker not yet
    # on its way (so nothing of it in S3: a rename without any S3 request), and the commit
    # thread sends the marker's PUT under tmp/ just after. That PUT lands: the old marker
    # must be deleted behind it, or an empty directory tmp stays in S3 for good.
    mount = inproc()
    fs = mount.fs
    vfs = Vfs(fs)
    go = threading.Event()
    candidate = fs.uploader.whole_copy.candidate

    def held(file):  # the commit thread, before it looks at the marker
        if file.is_dir_marker and not go.is_set():
            assert go.wait(10)
        return candidate(file)

    fs.uploader.whole_copy.candidate = held
    table = fs.core.table
    local_dir = table.local_dir_locked

    def racing(path):  # the rename's check, then the commit thread goes on and sends the PUT
        found = local_dir(path)
        if path == "/tmp" and found is not None and not go.is_set():
            go.set()
            wait_for(lambda: fake_store.count("put", "mnt/tmp/") >= 1, 5)
        return found

    table.local_dir_locked = racing
    fake_store.inject(fakestore.latency(0.5), "put", key="mnt/tmp/")
    vfs.mkdir("tmp")
    vfs.rename("tmp", "ckpt")
    assert go.is_set()
    assert fs.sync() == []
    assert vfs.listdir("") == ["ckpt"]
    assert sorted(fake_store.objects(mount.prefix)) == ["mnt/ckpt/"]


def test_a_directory_made_here_and_renamed_keeps_its_marker_ahead_of_what_it_holds(inproc, fake_store):
    # mkdir e; mkdir e/q; rename e d, all while the queue is held: the markers commit under
    # their new keys, d's first. d/q committed and retired before d, the mount took d for a
    # directory not yet in S3 (all it holds still staged) and listed it without q until d's
    # marker landed.
    mount = inproc()
    vfs = Vfs(mount.fs)
    with blocked_queue(fake_store, vfs):
        vfs.mkdir("e")
        vfs.mkdir("e/q")
        vfs.rename("e", "d")
        assert vfs.listdir("d") == ["q"]
    assert mount.fs.sync() == []
    puts = [key for op, key in fake_store.calls if op == "put" and key.startswith("mnt/d")]
    assert puts == ["mnt/d/", "mnt/d/q/"]
    assert vfs.listdir("d") == ["q"]


def test_a_file_renamed_after_its_commit_and_retired_after_the_move_names_the_copy(inproc, fake_store):
    # A file committed (multipart: its ETag is the upload's), still open, renamed: S3 gets a move,
    # whose copy has an ETag of its own. Closed once the move has run, the file retires; it must
    # not record its old object's ETag for the new path (the next reader's conditional GET then
    # met the copy: ESTALE, issue 26's item 8 as the workload model found it).
    mount = inproc()
    fs = mount.fs
    vfs = Vfs(fs)
    body = data_of(10_000)
    vfs.write_file("a.pt", body)
    reader = fs.open("/a.pt", os.O_RDONLY)  # keeps the staged file from retiring
    assert fs.sync() == []
    vfs.rename("a.pt", "b.pt")
    assert fs.sync() == []
    fs.release(reader)
    in_s3 = fake_store.head(mount.key("b.pt"))
    assert fs.lookup.lookup("/b.pt").etag in ("", in_s3.etag)
    fs.core.objects.evict(0)  # no copy kept here: the read goes to S3
    assert vfs.read_bytes("b.pt") == body


def test_a_directory_made_here_and_renamed_moves_on_an_object_a_pending_move_brings_into_it(inproc, fake_store):
    # mkdir d (its marker queued); rename last -> d/x (an object in S3: a queued move); rename d -> g.
    # d is not "all here": the move puts x under d/ in S3, and from there it must go on to g/.
    mount = inproc()
    vfs = Vfs(mount.fs)
    vfs.write_file("last", data_of(10_000))
    assert mount.fs.sync() == []
    with blocked_queue(fake_store, vfs):
        vfs.mkdir("d")
        vfs.rename("last", "d/x")
        vfs.rename("d", "g")
        assert vfs.listdir("") == ["blocker", "g"]
        assert vfs.read_bytes("g/x") == data_of(10_000)
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/blocker": b"x", "mnt/g/": b"", "mnt/g/x": data_of(10_000)}
    assert vfs.listdir("") == ["blocker", "g"]


def test_a_directory_made_here_lists_what_its_rename_moved_into_it_before_its_marker_lands(inproc, fake_store):
    # mkdir d; rename last -> d/x (a queued move); rename d -> g: g's marker (d's, retargeted) commits
    # after the moves that bring x under g/. Once x's move has run it is no longer shown from the
    # path table, so g, still "made here, nothing of it in S3", was listed without x until its
    # marker landed (1 run in 300 of a shrunk workload sequence).
    mount = inproc()
    vfs = Vfs(mount.fs)
    vfs.write_file("last", data_of(10_000))
    assert mount.fs.sync() == []
    fake_store.inject(fakestore.latency(3.0), "put", key="mnt/g/")  # the marker lands late
    with blocked_queue(fake_store, vfs):
        vfs.mkdir("d")
        vfs.rename("last", "d/x")
        vfs.rename("d", "g")
        assert vfs.listdir("g") == ["x"]
    wait_for(lambda: fake_store.count("put", "mnt/g/"), timeout=10)  # every move before it has run
    assert "mnt/g/x" in fake_store.objects(mount.prefix)
    assert vfs.listdir("g") == ["x"]
    assert vfs.read_bytes("g/x") == data_of(10_000)
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/blocker": b"x", "mnt/g/": b"", "mnt/g/x": data_of(10_000)}


@pytest.mark.parametrize("opened", ["before the first move lands", "between the two moves",
                                    "and read between the two moves"])
def test_a_reader_of_a_file_moved_away_and_back_reads_its_bytes_when_the_moves_land(inproc, fake_store, opened):
    # rename f3 -> f2; rename f2 -> f3: two moves in S3, the second bringing a copy (its own
    # ETag) back to f3's key. A reader that opened f3 before they landed read from that key
    # under the old version (ESTALE, "changed in S3 while open") or, opened between them, found
    # it gone (ENOENT): the workload model, seed 1000099.
    mount = inproc()
    vfs = Vfs(mount.fs)
    data = data_of(30000)  # several parts: a copy's ETag differs from the multipart upload's
    vfs.write_file("f3", data)
    assert mount.fs.sync() == []
    held = "mnt/f2" if opened == "before the first move lands" else "mnt/f3"
    read_while_held = opened.startswith("and read")
    fake_store.inject(fakestore.HANG, "copy", key=held)
    vfs.rename("f3", "f2")
    vfs.rename("f2", "f3")
    assert fake_store.wait_hanging("copy", held)
    fh = vfs.open("f3", os.O_RDONLY)
    try:
        if read_while_held:  # f3's key is empty until the second move's copy lands
            assert mount.fs.read(fh, 1000, 20000) == data[20000:21000]
        fake_store.release()
        wait_for(lambda: not mount.fs.pending.status(), timeout=10)
        assert mount.fs.read(fh, 1000, 20000) == data[20000:21000]
    finally:
        mount.fs.release(fh)
    assert vfs.read_bytes("f3") == data


@pytest.mark.xfail(reason="cause 14's crash variant, not fixed (docs/design.md): listing every recovered marker "
                          "from S3 slowed saves during an outage across a restart (test_outage.py)", strict=False)
def test_after_a_crash_a_directory_made_here_still_lists_what_a_rename_moved_into_it(inproc, fake_store):
    # As above, but the daemon dies before anything reached S3: the restart recovers g's marker
    # (made here, not yet in S3) and the move that brings x under g/. That g was filled from S3
    # was known only in memory: g counted as "all here" again and, once x's move had run, was
    # listed without x until its marker landed (cause 14's crash variant, docs/design.md).
    mount = inproc()
    vfs = Vfs(mount.fs)
    vfs.write_file("last", data_of(10_000))
    assert mount.fs.sync() == []
    rule = fake_store.inject(fakestore.HANG, "put", key="mnt/blocker")
    vfs.write_file("blocker", b"x")
    assert fake_store.wait_hanging("put", "mnt/blocker")
    vfs.mkdir("d")
    vfs.rename("last", "d/x")
    vfs.rename("d", "g")
    mount.crash()
    rule.remove()
    fake_store.release()
    fake_store.inject(fakestore.latency(3.0), "put", key="mnt/g/")  # the marker lands late
    vfs = Vfs(mount.start())
    wait_for(lambda: "mnt/g/x" in fake_store.objects(mount.prefix), timeout=10)
    assert "mnt/g/" not in fake_store.objects(mount.prefix)
    assert vfs.listdir("g") == ["x"]
    assert vfs.read_bytes("g/x") == data_of(10_000)
    assert mount.fs.sync() == []
    assert fake_store.objects(mount.prefix) == {"mnt/blocker": b"x", "mnt/g/": b"", "mnt/g/x": data_of(10_000)}


def test_a_file_written_after_its_name_was_moved_onto_and_unlinked_survives_a_crash(inproc, fake_store):
    # rename last -> f0 (a move, queued); unlink f0 (a delete, behind it); a new f0; the daemon dies.
    # After the restart the move's copy lands and told every file at f0 to expect the copy: the new
    # f0 too, written after the delete that removes the copy. Its conditional commit (recovered files
    # are conditional) found the key empty and set the file aside as a conflict: f0 was gone
    # (the workload model, seed 777002637).
    mount = inproc()
    vfs = Vfs(mount.fs)
    vfs.write_file("last", b"xy")
    assert mount.fs.sync() == []
    rule = fake_store.inject(fakestore.HANG, "put", key="mnt/blocker")
    vfs.write_file("blocker", b"x")
    assert fake_store.wait_hanging("put", "mnt/blocker")
    vfs.rename("last", "f0")
    vfs.unlink("f0")
    vfs.write_file("f0", data_of(12289))
    mount.crash()
    rule.remove()
    fake_store.release()
    vfs = Vfs(mount.start())
    assert mount.fs.sync() == []
    assert vfs.read_bytes("f0") == data_of(12289)
    assert fake_store.objects(mount.prefix) == {"mnt/blocker": b"x", "mnt/f0": data_of(12289)}


def test_a_commit_refused_under_the_old_name_of_a_file_renamed_meanwhile_is_no_conflict(inproc, fake_store):
    # A conditional commit (a file over a name that had an object, or recovered after a restart) is
    # on its way when the file is renamed; S3 refuses it, its condition no longer holding under the
    # old key. The refusal was reported as a conflict of the file under its new name, which was
    # set aside: gone from the mount (the workload model, seed 777003799). The file commits under
    # its new name, behind the rename, as for any commit in flight during a rename.
    mount = inproc(conditional_commits="all")
    vfs = Vfs(mount.fs)
    rule = fake_store.inject(fakestore.HANG, "put", key="mnt/f2")
    vfs.write_file("f2", b"mine")
    assert fake_store.wait_hanging("put", "mnt/f2")
    fake_store.put_object("mnt/f2", b"theirs")  # its If-None-Match fails now
    vfs.rename("f2", "f0")
    rule.remove()
    fake_store.release()
    mount.fs.sync()
    assert vfs.read_bytes("f0") == b"mine"
    assert fake_store.objects(mount.prefix)["mnt/f0"] == b"mine"
