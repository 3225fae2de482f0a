"""Every directory a job uses stays answerable through an outage, also across a restart (in-process).

* The first lookup in a directory that has no kept listing lists it (one page
  of a delimited LIST): a job that only ever saves into an existing directory
  has its listing from its first save on, and goes on saving while S3 is away.
* A fresh kept listing answers without asking S3, also right after local
  changes in the directory and while its files' uploads hang.
* Kept listings are kept in the cache dir: a daemon restarted during an outage
  answers from them.
* A directory rename whose content this mount does not know needs no S3 at the
  moment of the call: a journaled tree move lists the old prefix when S3 answers.

Through a real mount: tests/test_outage.py.
"""

from __future__ import annotations

import errno
import time

import pytest

import fakestore
from fakestore import FakeStore
from inproc import InProcessMount, Vfs, fast_tmp_dir, small_options, store_tree

DEADLINE = 0.5
QUICK = 0.25   # a call answered from what the mount knows


def timed(call, *args):
    started = time.monotonic()
    result = call(*args)
    return result, time.monotonic() - started


def rmtree(vfs: Vfs, rel: str) -> None:
    """shutil.rmtree's walk: list, remove files, recurse into directories, rmdir."""
    for name in vfs.listdir(rel):
        child = f"{rel}/{name}"
        if vfs.is_dir(child):
            rmtree(vfs, child)
        else:
            vfs.unlink(child)
    vfs.rmdir(rel)


def outage(store: FakeStore, kind: str):
    return store.inject(fakestore.HANG if kind == "hang" else fakestore.REFUSE)


def heal(store: FakeStore, rule) -> None:
    store.remove(rule)
    store.release()


@pytest.mark.timeout(60)
def test_the_first_lookup_in_a_directory_lists_it_once(tmp_path):
    store = FakeStore()
    store.put_object("mnt/run/a.pt", b"a" * 10_000)
    store.put_object("mnt/run/sub/b.pt", b"b")
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(metadata_ttl=60, negative_ttl=60))
        try:
            vfs = Vfs(mount.start())
            assert not vfs.exists("run/new.pt")
            assert store.count("list_page", "mnt/run/") == 1
            before = len(store.calls)
            assert not vfs.exists("run/other.pt")           # answered by the kept listing
            assert vfs.stat("run/a.pt").st_size == 10_000    # a HEAD tells its own mtime and mode
            asked = [op for op, _key in store.calls[before:]]
            assert asked.count("head") == 1 and "list_page" not in asked, store.calls[before:]
            assert sorted(vfs.listdir("run")) == ["a.pt", "sub"]
        finally:
            mount.close()


@pytest.mark.timeout(60)
def test_a_directory_larger_than_one_page_keeps_what_it_got(tmp_path):
    store = FakeStore()
    for i in range(fakestore.MAX_KEYS + 20):
        store.put_object(f"mnt/big/f{i:05d}", b"x" * 5000)
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(metadata_ttl=60, negative_ttl=60))
        try:
            fs = mount.start()
            vfs = Vfs(fs)
            assert not vfs.exists("big/f00000a")            # within the first page: known absent
            assert vfs.stat("big/f00001").st_size == 5000
            # The absent name needs no request; the present one a HEAD for its own mtime and mode.
            assert store.count("head", "mnt/big/f00001") == 1 and store.count("head", "mnt/big/f00000a") == 0
            assert vfs.stat(f"big/f{fakestore.MAX_KEYS + 10:05d}").st_size == 5000  # past it: asks S3
            assert not vfs.exists("big/zzz")
            assert len(vfs.listdir("big")) == fakestore.MAX_KEYS + 20  # a listing reads every page
            assert not fs.lookup.meta.get_stale_listing("/big") is None
        finally:
            mount.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["hang", "refuse"])
def test_saves_into_an_existing_never_listed_directory_go_on_through_an_outage(tmp_path, kind):
    """A job saves once into a directory it never lists; S3 goes away; five more saves there
    each return at once (only the first call of the outage waits one deadline)."""
    store = FakeStore()
    store.put_object("mnt/run/old.pt", b"o" * 3000)
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(metadata_ttl=0.3, negative_ttl=0.3,
                                                           metadata_deadline=DEADLINE))
        try:
            vfs = Vfs(mount.start())
            vfs.write_file("run/step_0.pt", b"0" * 9000)
            assert not mount.fs.sync(timeout=30)
            rule = outage(store, kind)
            time.sleep(0.4)  # past the TTL: the kept listing is stale, lookups ask S3 first
            times = []
            for step in range(1, 6):
                _, seconds = timed(vfs.write_file, f"run/step_{step}.pt", bytes([48 + step]) * 9000)
                times.append(seconds)
            assert max(times) < DEADLINE + 0.5, times
            assert sum(1 for t in times if t > QUICK) <= 1, times
            assert sorted(vfs.listdir("run")) == ["old.pt"] + [f"step_{i}.pt" for i in range(6)]
            heal(store, rule)
            assert not mount.fs.sync(timeout=30)
            tree = store_tree(store, "mnt/")
            assert tree["run/step_5.pt"] == b"5" * 9000 and tree["run/old.pt"] == b"o" * 3000
        finally:
            mount.close()


@pytest.mark.timeout(60)
def test_a_fresh_listing_answers_while_an_upload_of_the_directory_hangs(tmp_path):
    """metadata_ttl=120: a listdir 0.x s after listing, with a new file's PUT hanging, is
    answered from the kept listing, not after the metadata deadline."""
    store = FakeStore()
    store.put_object("mnt/run/a.pt", b"a")
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(metadata_ttl=120, negative_ttl=120,
                                                           metadata_deadline=2.0))
        try:
            vfs = Vfs(mount.start())
            assert vfs.listdir("run") == ["a.pt"]
            rule = store.inject(fakestore.HANG)
            vfs.write_file("run/b.pt", b"b" * 100)
            assert store.wait_hanging("put", "mnt/run/b.pt")
            names, seconds = timed(vfs.listdir, "run")
            assert sorted(names) == ["a.pt", "b.pt"] and seconds < QUICK, seconds
            _, seconds = timed(vfs.rename, "run/b.pt", "run/c.pt")
            names, seconds2 = timed(vfs.listdir, "run")
            assert sorted(names) == ["a.pt", "c.pt"] and seconds + seconds2 < QUICK, (seconds, seconds2)
            heal(store, rule)
            assert not mount.fs.sync(timeout=30)
            assert sorted(store.objects("mnt/")) == ["mnt/run/a.pt", "mnt/run/c.pt"]
        finally:
            mount.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["hang", "refuse"])
def test_a_restart_during_an_outage_answers_from_the_kept_listings(tmp_path, kind):
    """kill -9 during the outage and start again on the same cache dir: saves into an existing
    directory, a rename of a directory made here, and a rotation go on without S3."""
    store = FakeStore()
    store.put_object("mnt/run/checkpoint-1/model.pt", b"1" * 5000)
    with fast_tmp_dir(tmp_path / "cache") as cache:
        options = small_options(metadata_ttl=0.3, negative_ttl=0.3, metadata_deadline=DEADLINE)
        mount = InProcessMount(store, cache, options)
        try:
            vfs = Vfs(mount.start())
            assert sorted(vfs.listdir("run/checkpoint-1")) == ["model.pt"]
            vfs.mkdir("run/tmp-checkpoint-2")
            vfs.write_file("run/tmp-checkpoint-2/model.pt", b"2" * 5000)
            assert not mount.fs.sync(timeout=30)
            rule = outage(store, kind)
            vfs.write_file("run/latest", b"checkpoint-1")
            mount.crash()
            vfs = Vfs(mount.start())
            times = {}
            _, times["save"] = timed(vfs.write_file, "run/tmp-checkpoint-2/optimizer.pt", b"o" * 5000)
            _, times["rename"] = timed(vfs.rename, "run/tmp-checkpoint-2", "run/checkpoint-2")
            _, times["latest"] = timed(vfs.write_file, "run/latest", b"checkpoint-2")
            _, times["rmtree"] = timed(rmtree, vfs, "run/checkpoint-1")
            assert max(times.values()) < DEADLINE + 0.5, times
            assert sum(1 for t in times.values() if t > QUICK) <= 1, times
            assert sorted(vfs.listdir("run")) == ["checkpoint-2", "latest"]
            assert sorted(vfs.listdir("run/checkpoint-2")) == ["model.pt", "optimizer.pt"]
            heal(store, rule)
            assert not mount.fs.sync(timeout=30)
            assert store_tree(store, "mnt/") == {
                "run": None, "run/checkpoint-2": None, "run/checkpoint-2/model.pt": b"2" * 5000,
                "run/checkpoint-2/optimizer.pt": b"o" * 5000, "run/latest": b"checkpoint-2"}
        finally:
            mount.close()


@pytest.mark.timeout(60)
def test_a_fresh_start_on_a_cache_dir_that_knows_the_prefix_answers_at_once(tmp_path):
    store = FakeStore()
    store.put_object("mnt/run/a.pt", b"a" * 5000)
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(metadata_deadline=DEADLINE))
        try:
            vfs = Vfs(mount.start())
            assert vfs.listdir("run") == ["a.pt"]
            assert mount.stop(10)
            rule = store.inject(fakestore.HANG)
            vfs = Vfs(mount.start())
            mount.fs.note_outage("start-up check: no answer")
            assert mount.fs.lookup.outage.active
            (names, seconds) = timed(vfs.listdir, "run")
            assert names == ["a.pt"] and seconds < QUICK
            heal(store, rule)
        finally:
            mount.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["hang", "refuse"])
def test_a_directory_rename_whose_content_is_unknown_is_made_later(tmp_path, kind):
    """The directory was looked up, never listed: the rename is taken here at once and a tree
    move, journaled in close order, lists and moves the old prefix once S3 answers; a restart
    meanwhile keeps it. A file written into the new directory after the rename lands after it."""
    store = FakeStore()
    store.put_object("mnt/run/d/", b"", metadata={"mtime": "1000.0", "mode": "40755"})
    store.put_object("mnt/run/d/x.pt", b"x" * 5000)
    store.put_object("mnt/run/d/sub/y.pt", b"y" * 7000)
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(metadata_ttl=0.3, negative_ttl=0.3,
                                                           metadata_deadline=DEADLINE))
        try:
            vfs = Vfs(mount.start())
            assert vfs.is_dir("run/d")
            rule = outage(store, kind)
            time.sleep(0.4)
            vfs.exists("run/whatever")  # the first call of the outage waits one deadline
            _, seconds = timed(vfs.rename, "run/d", "run/e")
            assert seconds < QUICK
            assert sorted(vfs.listdir("run")) == ["e"]
            mount.crash()
            vfs = Vfs(mount.start())
            assert sorted(vfs.listdir("run")) == ["e"]
            heal(store, rule)
            assert not mount.fs.sync(timeout=30)
            assert store_tree(store, "mnt/") == {
                "run": None, "run/e": None, "run/e/x.pt": b"x" * 5000, "run/e/sub": None,
                "run/e/sub/y.pt": b"y" * 7000}
            assert float(store.stored("mnt/run/e/").metadata["mtime"]) == 1000.0
            assert sorted(vfs.listdir("run/e")) == ["sub", "x.pt"]
        finally:
            mount.close()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["hang", "refuse"])
def test_rename_and_rmtree_of_a_directory_made_here_once_its_marker_is_in_s3(tmp_path, kind):
    """The issue's case: mkdir, sync, S3 away, four saves into it, rename, later rmtree."""
    store = FakeStore()
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(metadata_ttl=0.3, negative_ttl=0.3,
                                                           metadata_deadline=DEADLINE))
        try:
            vfs = Vfs(mount.start())
            vfs.mkdir("tmp-checkpoint-100")
            assert not mount.fs.sync(timeout=30)
            rule = outage(store, kind)
            time.sleep(0.4)
            for i in range(4):
                vfs.write_file(f"tmp-checkpoint-100/part-{i}.pt", bytes([65 + i]) * 9000)
            _, seconds = timed(vfs.rename, "tmp-checkpoint-100", "checkpoint-100")
            assert seconds < QUICK
            assert sorted(vfs.listdir("checkpoint-100")) == [f"part-{i}.pt" for i in range(4)]
            _, seconds = timed(rmtree, vfs, "checkpoint-100")
            assert seconds < QUICK
            assert vfs.listdir("") == []
            heal(store, rule)
            assert not mount.fs.sync(timeout=30)
            assert store.objects("mnt/") == {}
        finally:
            mount.close()


@pytest.mark.timeout(60)
def test_a_directory_never_seen_still_fails_with_eio(tmp_path):
    """Nothing kept for it: an outage must never read as "no checkpoint"."""
    store = FakeStore()
    store.put_object("mnt/elsewhere/step.pt", b"x")
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(metadata_deadline=0.1))
        try:
            fs = mount.start()
            rule = store.inject(fakestore.REFUSE)
            with pytest.raises(OSError) as failure:
                fs.readdir("/elsewhere")
            assert failure.value.errno == errno.EIO
            heal(store, rule)
        finally:
            mount.close()
