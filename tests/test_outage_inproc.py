"""S3 unreachable: checkpointing goes on at local speed; S3 ends up as without the outage (in-process).

A trainer's loop (a new directory per step, model and optimizer files, a
``latest`` pointer, a ``last`` symlink, rename from ``tmp-checkpoint-N``,
removal of all but the newest two checkpoints) runs against the core while the
fake store hangs on every request, or refuses every request, then the store
answers again. Every call must return quickly (none waits for the outage), and
after ``sync`` the store must hold exactly what the same loop leaves without an
outage. Through a real mount: tests/test_outage.py.
"""

from __future__ import annotations

import errno
import os
import time

import pytest

import fakestore
from fakestore import FakeStore
from s3ckptfs.fs.lookup import NO_FALLBACK_DEADLINES
from inproc import InProcessMount, Vfs, fast_tmp_dir, small_options, store_tree

STEPS = 6
KEEP = 2
DEADLINE = 0.5   # metadata_deadline here: the first lookup of an outage waits this long, no other call does


def save(vfs: Vfs, rel: str, step: int, size: int) -> None:
    vfs.write_file(rel, bytes([step % 251]) * size + rel.encode())


def trainer_step(vfs: Vfs, step: int, timings: list[tuple[str, float]]) -> None:
    """One checkpoint the way HF/Lightning-era trainers write it, each call timed."""
    def timed(what, call, *args):
        started = time.monotonic()
        try:
            return call(*args)
        finally:
            timings.append((what, time.monotonic() - started))

    tmp, final = f"ckpt/tmp-checkpoint-{step}", f"ckpt/checkpoint-{step}"
    timed("mkdir", vfs.mkdir, tmp)
    timed("save model", save, vfs, f"{tmp}/model.pt", step, 20_000)   # multipart at the test's sizes
    timed("save optimizer", save, vfs, f"{tmp}/optimizer.pt", step, 3_000)
    timed("rename dir", vfs.rename, tmp, final)
    timed("save latest", vfs.write_file, "ckpt/latest.tmp", f"checkpoint-{step}".encode())
    timed("rename latest", vfs.rename, "ckpt/latest.tmp", "ckpt/latest")
    if vfs.exists("ckpt/last"):
        timed("unlink last", vfs.unlink, "ckpt/last")
    timed("symlink last", vfs.symlink, f"checkpoint-{step}", "ckpt/last")
    names = timed("list", vfs.listdir, "ckpt")
    old = sorted((n for n in names if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))[:-KEEP]
    for name in old:
        for child in timed("list old", vfs.listdir, f"ckpt/{name}"):
            timed("unlink old", vfs.unlink, f"ckpt/{name}/{child}")
        timed("rmdir old", vfs.rmdir, f"ckpt/{name}")


def run_loop(tmp_path, outage: str | None, crash_at: int | None = None) -> tuple[dict, list]:
    store = FakeStore()
    timings: list[tuple[str, float]] = []
    with fast_tmp_dir(tmp_path / ("cache-" + (outage or "none"))) as cache:
        mount = InProcessMount(store, cache, small_options(metadata_ttl=0.5, negative_ttl=0.5, metadata_deadline=DEADLINE))
        try:
            vfs = Vfs(mount.start())
            vfs.mkdir("ckpt")
            trainer_step(vfs, 0, [])       # S3 answering: step 0 lands
            assert not mount.fs.sync(timeout=30)
            vfs.listdir("ckpt")            # the mount knows the directory
            rule = None
            if outage == "hang":
                rule = store.inject(fakestore.HANG)
            elif outage == "refuse":
                rule = store.inject(fakestore.REFUSE)
            time.sleep(0.6)                # past metadata_ttl: lookups must ask S3, and fall back
            for step in range(1, STEPS + 1):
                if crash_at == step:
                    # Killed during the outage and started again on the same cache dir, still during
                    # it (a fresh start knows no listing: training resumes once S3 is back).
                    mount.crash()
                    vfs = Vfs(mount.start())
                    assert mount.recovered
                    store.remove(rule)
                    store.release()
                    rule = None
                trainer_step(vfs, step, timings if rule else [])
            if rule is not None:
                store.remove(rule)
                store.release()
            assert not mount.fs.sync(timeout=60)
            mount.stop()
        finally:
            mount.close()
    return store_tree(store, "mnt/"), timings


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tree, _ = run_loop(tmp_path_factory.mktemp("reference"), None)
    assert "ckpt/latest" in tree and f"ckpt/checkpoint-{STEPS}/model.pt" in tree
    assert "ckpt/checkpoint-1/model.pt" not in tree
    return tree


@pytest.mark.timeout(120)
@pytest.mark.parametrize("outage", ["hang", "refuse"])
def test_trainer_loop_through_an_outage_ends_as_without_it(tmp_path, reference, outage):
    tree, timings = run_loop(tmp_path, outage)
    slowest = max(timings, key=lambda t: t[1])
    assert slowest[1] < DEADLINE + 0.5, f"{slowest[0]} took {slowest[1]:.2f}s while S3 was away"
    waited = [t for t in timings if t[1] > DEADLINE / 2]
    assert len(waited) <= 1, f"more than the first call waited for S3: {waited}"
    assert tree == reference


@pytest.mark.timeout(120)
def test_a_crash_during_the_outage_resumes_pending_changes_in_order(tmp_path, reference):
    tree, _ = run_loop(tmp_path, "refuse", crash_at=4)
    assert tree == reference


@pytest.mark.timeout(60)
def test_a_directory_never_listed_fails_with_eio_during_an_outage(tmp_path):
    store = FakeStore()
    store.put_object("mnt/elsewhere/step.pt", b"x")
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(metadata_deadline=0.2))
        try:
            fs = mount.start()
            rule = store.inject(fakestore.HANG)
            started = time.monotonic()
            with pytest.raises(OSError) as failure:
                fs.readdir("/elsewhere")
            assert failure.value.errno == errno.EIO
            assert time.monotonic() - started < NO_FALLBACK_DEADLINES * 0.2 + 1
            store.remove(rule)
            store.release()
        finally:
            mount.close()


@pytest.mark.timeout(60)
def test_files_in_a_new_directory_are_created_while_its_marker_put_hangs(tmp_path):
    """A trainer's second save into a directory it just made: the directory's marker PUT is
    in flight (S3 hangs on it), yet nothing else can be in S3 under it, so lookups and the
    listing of the directory are answered here at once, without waiting for the deadline."""
    store = FakeStore()
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(metadata_deadline=5.0))
        try:
            vfs = Vfs(mount.start())
            vfs.mkdir("run")
            assert not mount.fs.sync(timeout=30)
            rule = store.inject(fakestore.HANG)
            vfs.mkdir("run/tmp-checkpoint-2")
            vfs.write_file("run/tmp-checkpoint-2/model.pt", b"m" * 5000)
            assert store.wait_hanging("put", "mnt/run/tmp-checkpoint-2/")  # the marker PUT hangs
            started = time.monotonic()
            vfs.write_file("run/tmp-checkpoint-2/optimizer.pt", b"o" * 5000)
            assert not vfs.exists("run/tmp-checkpoint-2/scheduler.pt")
            assert sorted(vfs.listdir("run/tmp-checkpoint-2")) == ["model.pt", "optimizer.pt"]
            assert time.monotonic() - started < 1.0
            store.remove(rule)
            store.release()
            assert not mount.fs.sync(timeout=30)
            assert store.objects("mnt/run/tmp-checkpoint-2/")["mnt/run/tmp-checkpoint-2/optimizer.pt"] == b"o" * 5000
        finally:
            mount.close()


@pytest.mark.timeout(60)
def test_fsync_fails_with_eio_once_s3_has_answered_nothing_for_the_limit(tmp_path):
    """fsync must reach S3: while S3 hangs it fails with EIO after ``sync_stall_limit``, not at
    the end of the outage; the file stays staged and is uploaded once S3 answers."""
    store = FakeStore()
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(sync_stall_limit=1.0))
        try:
            vfs = Vfs(mount.start())
            vfs.mkdir("run")
            assert not mount.fs.sync(timeout=30)
            rule = store.inject(fakestore.HANG)
            vfs.write_file("run/step.pt", b"s" * 5000)
            started = time.monotonic()
            with pytest.raises(OSError) as failure:
                vfs.fsync_file("run/step.pt")
            assert failure.value.errno == errno.EIO
            assert 1.0 <= time.monotonic() - started < 5.0
            store.remove(rule)
            store.release()
            assert not mount.fs.sync(timeout=30)
            assert store.objects("mnt/run/")["mnt/run/step.pt"] == b"s" * 5000
        finally:
            mount.close()


@pytest.mark.timeout(60)
def test_an_upload_created_after_the_file_shrank_is_aborted(tmp_path):
    """While S3 hangs, a large file's CreateMultipartUpload is held; the file is truncated to one
    PUT's size and closed. When S3 answers, the upload it created is not needed: it is aborted,
    not left behind in S3 (the reference model found one left after such a sequence)."""
    store = FakeStore()
    with fast_tmp_dir(tmp_path / "cache") as cache:
        mount = InProcessMount(store, cache, small_options(eager_uploads=1))
        try:
            vfs = Vfs(mount.start())
            vfs.listdir()  # known: the create goes ahead while S3 hangs
            rule = store.inject(fakestore.HANG)
            fh = vfs.open("c.pt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            for offset in range(0, 40_000, 4000):  # sequential: parts behind the writer go early
                mount.fs.write(fh, b"c" * 4000, offset)
            assert store.wait_hanging("create_multipart")
            mount.fs.truncate(vfs.path("c.pt"), 100, fh)
            vfs.close(fh)
            store.remove(rule)
            store.release()
            assert not mount.fs.sync(timeout=30)
            assert store.objects("mnt/") == {"mnt/c.pt": b"c" * 100}
            assert mount.stop(30)
            assert store.uploads() == []
        finally:
            mount.close()
